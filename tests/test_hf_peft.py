"""The HF peft round trip (hf_peft.py): a LoRA fine-tuned here, exported, and loaded with
PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(body), folder) gives
this project's logits; a broken export (scaling or head dropped) would not."""
import json

import pytest
import torch
from conftest import tiny_classifier, tune_argv
from safetensors.torch import load_file, save_file

import adapters
import finetune_peft
import hf_peft
from plumbing.ner_data import LABELS

peft = pytest.importorskip("peft", reason="HF peft is optional: pip install --no-deps -r requirements-optional.txt")

TOLERANCE = 1e-5


def batch(vocab=120, seed=0):
    """Random ids with padding in the second row, so the attention mask matters."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def trained_lora(tmp_path):
    """A tiny body saved as a folder, and the same body with a LoRA whose B and head are random
    (B = 0 at init would make the LoRA a no-op and hide a wrong scaling)."""
    body = tmp_path / "body"
    tiny_classifier().save_pretrained(body)  # its own classifier differs from the trained head below
    model = tiny_classifier()
    adapters.add_peft(model, adapters.PeftConfig("lora", lora_rank=4, lora_alpha=16.0), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapters.peft_parameters(model).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return body, model.eval()


def hf_logits(body, folder, inputs):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification
    model = PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(body), folder).eval()
    with torch.no_grad():
        return model(**inputs).logits


def round_trip_error(body, folder, inputs, want):
    """Largest logit difference of the loaded adapter from `want`; infinite when it does not load."""
    try:
        return float((hf_logits(body, folder, inputs) - want).abs().max())
    except (KeyError, ValueError, RuntimeError):
        return float("inf")


def ours(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_peft_model_gives_our_logits(trained_lora, tmp_path):
    body, model = trained_lora
    folder = hf_peft.export_hf_peft(model, tmp_path / "hf", str(body))
    assert sorted(p.name for p in folder.iterdir()) == [hf_peft.HF_CONFIG_FILE, hf_peft.HF_WEIGHTS_FILE]
    inputs = batch()
    assert (hf_logits(body, folder, inputs) - ours(model, inputs)).abs().max() < TOLERANCE


def test_dropping_the_scaling_or_the_head_breaks_the_round_trip(trained_lora, tmp_path):
    """What the round-trip test guards: lora_alpha / r (here 4, not 1) and the trained head both
    change the logits, so an export that lost either one fails it."""
    body, model = trained_lora
    inputs = batch()
    want = ours(model, inputs)
    no_scaling = hf_peft.export_hf_peft(model, tmp_path / "no-scaling", str(body))
    config = json.loads((no_scaling / hf_peft.HF_CONFIG_FILE).read_text())
    (no_scaling / hf_peft.HF_CONFIG_FILE).write_text(json.dumps({**config, "lora_alpha": config["r"]}))
    assert round_trip_error(body, no_scaling, inputs, want) > 1e-2
    no_head = hf_peft.export_hf_peft(model, tmp_path / "no-head", str(body))
    weights = no_head / hf_peft.HF_WEIGHTS_FILE
    save_file({k: t for k, t in load_file(weights).items() if ".classifier." not in k}, weights)
    assert round_trip_error(body, no_head, inputs, want) > 1e-2  # peft 0.21 refuses it (KeyError)


def test_config_maps_every_lora_setting():
    config = hf_peft.hf_lora_config(adapters.PeftConfig("lora", lora_rank=4, lora_alpha=8.0), "body")
    hf = peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
    assert (hf.r, hf.lora_alpha, hf.lora_dropout, hf.bias, hf.use_rslora) == (4, 8.0, 0.0, "none", False)
    assert set(hf.target_modules) == {"query", "value"} and hf.modules_to_save == ["classifier"]


def test_finetuned_folder_exports_from_the_command_line(tiny_model_dir, data_dir, tmp_path, capsys):
    """finetune_peft.py --peft lora, then hf_peft.py: PeftModel on the tiny body predicts what the
    project's own loader (evaluate_ner.load_finetuned) predicts."""
    from transformers import AutoModelForTokenClassification

    import evaluate_ner
    ft, out = tmp_path / "ft", tmp_path / "hf"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, ft, "--peft", "lora"))
    hf_peft.main(["--ckpt", str(ft), "--out", str(out)])
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    model, tokenizer, _ = evaluate_ner.load_finetuned(ft, "cpu")
    inputs = dict(tokenizer(["Angela Merkel visited Paris", "Lisbon"], return_tensors="pt", padding=True))
    inputs.pop("token_type_ids", None)
    base = AutoModelForTokenClassification.from_pretrained(tiny_model_dir, id2label=dict(enumerate(LABELS)))
    hf = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        assert (hf(**inputs).logits - model.eval()(**inputs).logits).abs().max() < TOLERANCE
    assert hf.config.id2label[1] == "B-PER"


def test_non_lora_runs_and_occupied_folders_are_one_line_errors(tiny_model_dir, data_dir, tmp_path):
    ft = tmp_path / "ft-adapter"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, ft, "--peft", "adapter", "--steps", "1"))
    with pytest.raises(ValueError, match="--peft lora only"):
        hf_peft.main(["--ckpt", str(ft), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf" / hf_peft.HF_CONFIG_FILE).exists()
    with pytest.raises(ValueError, match="finetune_peft.py --peft lora"):
        hf_peft.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")])
    model = tiny_classifier()
    adapters.add_peft(model, adapters.PeftConfig("lora"), seed=0)
    hf_peft.export_hf_peft(model, tmp_path / "taken")
    before = (tmp_path / "taken" / hf_peft.HF_WEIGHTS_FILE).read_bytes()
    lora_ft = tmp_path / "ft-lora"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, lora_ft, "--peft", "lora", "--steps", "1"))
    with pytest.raises(ValueError, match="--overwrite"):
        hf_peft.main(["--ckpt", str(lora_ft), "--out", str(tmp_path / "taken")])
    assert (tmp_path / "taken" / hf_peft.HF_WEIGHTS_FILE).read_bytes() == before  # nothing lost


def test_trainer_script_pairs_seeds_and_prints_the_paired_difference(tiny_model_dir, data_dir, tmp_path, capsys):
    """experiments/benchmarks/hf_peft_trainer.py on a tiny budget, with the same body as "unprimed" and
    "primed": a seed gives the same run on both (the pairing), another seed another run."""
    script = load_benchmark("hf_peft_trainer")
    results, diff = script.main(["--primed", str(tiny_model_dir), "--base", str(tiny_model_dir), "--seeds", "0,1",
                                 "--steps", "3", "--batch-size", "4", "--max-sentences", "16", "--langs", "fr,nl",
                                 "--eval-sentences", "6", "--max-len", "32", "--data-dir", data_dir,
                                 "--out", str(tmp_path / "hf.json")])
    for seed in (0, 1):
        assert results["primed"][seed] == results["unprimed"][seed]
    assert results["unprimed"][0]["train_loss"] != results["unprimed"][1]["train_loss"]
    assert diff["n"] == 2 and diff["mean"] == 0.0
    printed = capsys.readouterr().out
    assert "| 1 |" in printed and "paired difference primed - unprimed: +0.00" in printed
    assert json.loads((tmp_path / "hf.json").read_text())["paired"]["favour"] == 0  # a number, not "0"
    with pytest.raises(ValueError, match="--seeds"):
        script.main(["--primed", str(tiny_model_dir), "--seeds", "0,x"])


def load_benchmark(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_groups_become_one_tag_per_word():
    """bench_vs_hf maps the pipeline's entity groups (character spans of the words joined by
    spaces) back to words: a two-word PER, an O group, a one-word LOC."""
    bench = load_benchmark("bench_vs_hf")
    words = ["Angela", "Merkel", "visited", "Paris", "."]
    groups = [{"entity_group": "PER", "start": 0, "end": 13}, {"entity_group": "O", "start": 14, "end": 21},
              {"entity_group": "LOC", "start": 22, "end": 27}, {"entity_group": "O", "start": 28, "end": 29}]
    assert bench.word_tags(groups, words) == ["B-PER", "I-PER", "O", "B-LOC", "O"]


def test_trainer_reads_the_batches_of_our_fine_tuning(tiny_model_dir, data_dir, tmp_path):
    """bench_vs_hf's Trainer gets finetune_peft's batches: same sentences, same padded shapes."""
    from plumbing.batches import BatchStream, encode_sentences
    from plumbing.cli import derive_seed
    from plumbing.ner_data import load_wikiann
    from plumbing.pretrained import load_tokenizer
    bench, trainer_script = load_benchmark("bench_vs_hf"), load_benchmark("hf_peft_trainer")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = encode_sentences(load_wikiann("en", "train", data_dir, 200), tokenizer, 32)
    order = bench.batch_order(examples, 8, 3, 6, tokenizer.pad_token_id)
    trainer = trainer_script.hf_trainer(trainer_script.hf_lora_model(str(tiny_model_dir), 8, 0), tokenizer,
                                        trainer_script.trainer_dataset([examples[i] for i in order]), 6, 8, 0,
                                        tmp_path, sampling="sequential")
    stream = BatchStream(examples, 8, seed=derive_seed(3, "train stream"), pad_id=tokenizer.pad_token_id)
    for theirs in list(trainer.get_train_dataloader())[:6]:
        ours = stream.next_batch()
        assert torch.equal(theirs["input_ids"].cpu(), ours["input_ids"])
        assert torch.equal(theirs["labels"].cpu(), ours["labels"])


@pytest.mark.parametrize("corpus", ["data_dir", pytest.param("full_data_dir", marks=pytest.mark.slow)])
def test_speed_benchmark_prints_both_ratios(tiny_model_dir, corpus, request, capsys):
    """On the tests' corpus (120 en train sentences: 7.5 batches of 16, so a short batch would fall among
    the steps unless the benchmark cuts it) and on the full one (160 of 20,000 read)."""
    bench = load_benchmark("bench_vs_hf")
    rates = bench.main(["--model", str(tiny_model_dir), "--steps", "7", "--warmup", "1", "--repeats", "1",
                        "--train-sentences", "160", "--eval-sentences", "8", "--max-len", "32",
                        "--data-dir", request.getfixturevalue(corpus)])
    assert all(len(v) == 1 and v[0] > 0 for v in rates.values())
    printed = capsys.readouterr().out
    assert "x (target >= 1.0x)" in printed and "x (target >= 2x)" in printed
    with pytest.raises(ValueError, match="--warmup"):
        bench.main(["--model", str(tiny_model_dir), "--steps", "5", "--warmup", "4"])


@pytest.mark.slow  # six tiny runs with their start-ups: ~100 s on a loaded 2-core CPU
def test_whole_run_prints_one_ratio_per_method(tiny_model_dir, data_dir, capsys):
    """--whole-run on a tiny budget: both sides train and select on the dev set, a line per method."""
    bench = load_benchmark("bench_vs_hf")
    ratios = bench.main(["--whole-run", "--model", str(tiny_model_dir), "--steps", "10", "--repeats", "1",
                         "--data-dir", data_dir])
    assert sorted(ratios) == ["adapter", "lora", "prefix"] and all(r > 0 for r in ratios.values())
    printed = capsys.readouterr().out
    for peft in ratios:
        assert f"whole-run {peft}: ours " in printed and f"{peft} repeat 0 theirs: " in printed
    assert printed.count("best dev F1") == 6
