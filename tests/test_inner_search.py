"""Inner-loop strength (meta_pretrain.py --reference-ft) and the inner-loop search's bookkeeping."""
import json

import pytest
import torch
from conftest import tune_argv

import adapters
import episodes
import finetune_peft
import maml
import meta_pretrain
import peft_checkpoint
from experiments import search_inner
from plumbing.ner_data import LABELS
from plumbing.pretrained import load_token_classifier, load_tokenizer


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--steps", "30", "--batch-size", "8",
                                 "--max-sentences", "80", "--lr", "1e-2"))
    return out


def test_reference_loss_is_the_fine_tuned_models_loss(tiny_model_dir, data_dir, reference):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_token_classifier(tiny_model_dir, num_labels=len(LABELS), id2label=LABELS)
    adapters.add_peft(model, adapters.PeftConfig("adapter"), seed=0)
    held_out = episodes.held_out_episode(tokenizer, "en", ["de"], data_dir, 16, 8, 32)
    loss = episodes.reference_query_loss(model, reference, held_out, maml.functional_loss(model))
    peft_checkpoint.load_peft(model, reference)                                     # independently: load and run
    model.eval()
    with torch.no_grad():
        expected = sum(model(**b).loss.item() for b in held_out["query"]) / len(held_out["query"])
    assert loss == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(model.classifier.weight, adapters.fresh_peft_tensors(model)["classifier.weight"])


def strength_run(tiny_model_dir, data_dir, out, reference, inner_lr):
    meta_pretrain.main(["--model", str(tiny_model_dir), "--data-dir", data_dir, "--out", str(out), "--steps", "1",
                        "--tasks-per-step", "1", "--batch-size", "8", "--inner-steps", "3", "--inner-lr", inner_lr,
                        "--max-sentences", "40", "--eval-sentences", "16", "--eval-every", "1", "--max-len", "32",
                        "--reference-ft", str(reference)])
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_inner_loop_strength_is_the_share_of_the_gap_closed(tiny_model_dir, data_dir, reference, tmp_path):
    weak = strength_run(tiny_model_dir, data_dir, tmp_path / "weak", reference, "1e-4")
    strong = strength_run(tiny_model_dir, data_dir, tmp_path / "strong", reference, "0.5")
    for m in (weak, strong):
        assert {"held_out_query_loss", "held_out_query_loss_fresh", "inner_loop_strength"} <= set(m)
    # the same fresh tensors and reference in both runs: strength is (fresh - adapted) / (fresh - reference)
    reference_loss = weak["held_out_query_loss_fresh"] \
        - (weak["held_out_query_loss_fresh"] - weak["held_out_query_loss"]) / weak["inner_loop_strength"]
    assert strong["inner_loop_strength"] == pytest.approx(
        (strong["held_out_query_loss_fresh"] - strong["held_out_query_loss"])
        / (strong["held_out_query_loss_fresh"] - reference_loss), rel=1e-4)
    assert abs(weak["inner_loop_strength"]) < 0.02 < strong["inner_loop_strength"]


def test_no_reference_no_strength(tiny_model_dir, data_dir, tmp_path):
    meta_pretrain.main(["--model", str(tiny_model_dir), "--data-dir", data_dir, "--out", str(tmp_path / "p"),
                        "--steps", "1", "--tasks-per-step", "1", "--batch-size", "4", "--max-sentences", "20",
                        "--eval-sentences", "8", "--eval-every", "1", "--max-len", "32"])
    metrics = json.loads((tmp_path / "p" / "metrics.jsonl").read_text())
    assert "held_out_query_loss_fresh" in metrics and "inner_loop_strength" not in metrics


def test_pick_takes_the_lowest_query_loss_that_adapts_and_is_affordable():
    rows = [{"ratio": 0.9, "seconds": 1.0, "query_after": 0.5},               # does not adapt enough
            {"ratio": 0.5, "seconds": 99.0, "query_after": 0.6},              # too slow
            {"ratio": 0.5, "seconds": 2.0, "query_after": 0.9},
            {"ratio": 0.4, "seconds": 3.0, "query_after": 0.8},
            {"ratio": float("nan"), "seconds": 1.0, "query_after": float("nan")}]   # diverged
    assert search_inner.pick(rows, 0.6, 10.0) is rows[3]
    assert search_inner.pick(rows, 0.3, 10.0) is None


def test_search_grid_rows_and_files(tiny_model_dir, data_dir, reference, tmp_path):
    search_inner.main(["--model", str(tiny_model_dir), "--data-dir", data_dir, "--lrs", "0.001,0.5", "--steps", "1,3",
                       "--batch-sizes", "4", "--episodes", "2", "--eval-sentences", "8", "--timed-steps", "1",
                       "--max-len", "32", "--reference-ft", str(reference), "--max-ratio", "1.5",
                       "--out", str(tmp_path / "s")])
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    rows = saved["rows"]
    assert [(r["lr"], r["steps"]) for r in rows] == [(0.001, 1), (0.001, 3), (0.5, 1), (0.5, 3)]
    assert all(r["ratio"] == pytest.approx(r["support_after"] / r["support_before"]) for r in rows)
    assert len({round(r["support_before"], 6) for r in rows}) == 1       # the same episodes for every setting
    strong, weak = rows[3], rows[0]
    assert strong["support_after"] < weak["support_after"]
    gap = [r["query_fresh"] - saved["reference_loss"] for r in rows]
    assert [r["strength"] for r in rows] == pytest.approx([(r["query_fresh"] - r["query_after"]) / g
                                                          for r, g in zip(rows, gap)])
    assert saved["picked"] == min(rows, key=lambda r: r["query_after"])
    assert "**picked**" in (tmp_path / "s" / "search.md").read_text()
