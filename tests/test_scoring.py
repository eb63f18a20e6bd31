"""Fine-tuning's schedule and model selection; scoring in both seqeval modes; prediction files
that seqeval re-scores to the reported numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tune_argv

import evaluate_ner
import finetune_peft
from plumbing import scoring

ROOT = Path(__file__).resolve().parents[1]


def test_linear_schedule_warms_up_then_decays_to_zero():
    factors = [finetune_peft.linear_schedule(i, 100, 0.1) for i in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)   # 10 warmup steps
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert factors[99] == pytest.approx(1 / 90) and all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert finetune_peft.linear_schedule(0, 10, 0.0) == 1.0                       # no warmup


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "tuned"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--steps", "20", "--lr", "1e-2"))
    return out


def test_fine_tuning_follows_the_schedule_and_evaluates_ten_times(tuned):
    lines = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    lrs = [line["lr"] for line in lines]
    assert lrs[0] == pytest.approx(1e-2 / 2) and lrs[1] == pytest.approx(1e-2)   # 2 warmup steps of 20
    assert lrs[-1] == pytest.approx(1e-2 / 18) and lrs[2:] == sorted(lrs[2:], reverse=True)
    evals = [line for line in lines if "dev_f1_default" in line]
    assert [line["step"] for line in evals] == list(range(2, 21, 2)) and all("dev_f1_strict" in line for line in evals)
    best = json.loads((tuned / "run.json").read_text())["best"]
    assert best["dev_f1_default"] == max(line["dev_f1_default"] for line in evals)


def test_predictions_files_rescore_to_the_reported_numbers(tuned, data_dir, tmp_path):
    from seqeval.metrics import f1_score, precision_score
    from seqeval.scheme import IOB2
    preds = tmp_path / "preds"
    evaluate_ner.main(["--ckpt", str(tuned), "--langs", "fr,nl", "--max-sentences", "30", "--data-dir", data_dir,
                       "--predictions", str(preds), "--out", str(tmp_path / "eval.json")])
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    for lang in ("fr", "nl"):
        sentences = (preds / f"{lang}.conll").read_text().strip("\n").split("\n\n")   # parsed here, independently
        rows = [[line.split(" ") for line in s.split("\n")] for s in sentences]
        assert len(rows) == 30 and all(len(r) == 3 for s in rows for r in s)
        gold, pred = [[r[1] for r in s] for s in rows], [[r[2] for r in s] for s in rows]
        assert 100 * f1_score(gold, pred) == pytest.approx(results[lang]["f1_default"])
        assert 100 * precision_score(gold, pred) == pytest.approx(results[lang]["precision_default"])
        assert 100 * f1_score(gold, pred, mode="strict", scheme=IOB2) == pytest.approx(results[lang]["f1_strict"])
    assert scoring.tag_scores(*scoring.read_conll(preds / "fr.conll")) == pytest.approx(
        {k: v for k, v in results["fr"].items() if k != "sentences"})


def test_default_and_strict_modes_differ_on_a_stray_inside_tag():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["I-PER", "I-PER", "O", "B-LOC"]]          # conlleval counts I-PER I-PER as a PER entity; strict does not
    scores = scoring.tag_scores(gold, pred)
    assert scores["f1_default"] == pytest.approx(100.0) and scores["f1_strict"] == pytest.approx(100 * 2 / 3)


def test_unwritable_predictions_folder_fails_before_scoring(tuned, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = subprocess.run([sys.executable, str(ROOT / "evaluate_ner.py"), "--ckpt", str(tuned),
                          "--predictions", str(blocker / "preds")], capture_output=True, text=True)
    assert run.returncode == 2 and "--predictions" in run.stderr and "not a writable folder" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not list(tuned.glob("eval-*.json"))
