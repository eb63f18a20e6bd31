"""The three stages end to end through their command lines, on a tiny random model and a few
dozen sentences of the shared WikiANN data: outputs, resume, ablation flags, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import prime_argv, tune_argv
from safetensors.torch import load_file

import evaluate_ner
import finetune_peft
import maml
import meta_pretrain

ROOT = Path(__file__).resolve().parents[1]


prime_args, finetune_args = prime_argv, tune_argv


def test_body_change_is_logged_and_agrees_with_the_saved_weights(tiny_model_dir, data_dir, tmp_path):
    from experiments import compare_report
    primed = tmp_path / "primed"
    meta_pretrain.main(prime_args(tiny_model_dir, data_dir, primed, "--outer-lr", "1e-3"))
    record = json.loads((primed / "run.json").read_text())
    lines = [json.loads(line) for line in (primed / "metrics.jsonl").read_text().splitlines()]
    measured = compare_report.primed_body_change(primed, str(tiny_model_dir))  # from the two checkpoints' files
    assert measured > 1e-4 and abs(record["body_change"] - measured) < 1e-6 * measured
    assert [("body_change" in line) for line in lines] == [False, True, True]  # at the evaluations (steps 2, 3)
    assert lines[-1]["body_change"] == record["body_change"] and 0 < lines[1]["body_change"]


def test_three_stages_end_to_end(tiny_model_dir, data_dir, tmp_path, capsys):
    from transformers import AutoModel
    primed, tuned = tmp_path / "primed", tmp_path / "tuned"
    meta_pretrain.main(prime_args(tiny_model_dir, data_dir, primed))
    record = json.loads((primed / "run.json").read_text())
    assert record["args"]["method"] == "maml" and record["input_model"] == str(tiny_model_dir)
    assert record["code_version"] and record["args"]["seed"] == 0
    lines = [json.loads(line) for line in (primed / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and "held_out_query_loss" in lines[1]
    body = AutoModel.from_pretrained(primed)  # an ordinary checkpoint, no PEFT, no head
    assert not any("adapter" in n or "classifier" in n for n, _ in body.named_parameters())
    original = AutoModel.from_pretrained(tiny_model_dir)
    changed = [n for n, p in body.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert changed and not any("word_embeddings" in n for n in changed)  # frozen by default

    finetune_peft.main(finetune_args(primed, data_dir, tuned))
    saved = load_file(tuned / "peft.safetensors")
    assert saved and all(("adapter" in n or "classifier" in n) for n in saved)
    assert json.loads((tuned / "run.json").read_text())["init_record"]["stage"] == "meta_pretrain"

    capsys.readouterr()
    evaluate_ner.main(["--ckpt", str(tuned), "--langs", "fr,nl", "--max-sentences", "20", "--data-dir", data_dir])
    table = capsys.readouterr().out
    assert "| fr |" in table and "| average |" in table
    scores = json.loads((tuned / "eval-test.json").read_text())
    assert set(scores["results"]) == {"fr", "nl", "average"} and scores["results"]["fr"]["sentences"] == 20


def test_resume_equals_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    meta_pretrain.main(prime_args(tiny_model_dir, data_dir, whole, "--steps", "4"))
    real_step, calls = maml.meta_step, []
    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run dies in step 3, after the checkpoint of step 2
        return real_step(*args, **kwargs)
    monkeypatch.setattr(maml, "meta_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        meta_pretrain.main(prime_args(tiny_model_dir, data_dir, cut, "--steps", "4"))
    assert not (cut / "config.json").exists()  # nothing a later stage would take
    monkeypatch.setattr(maml, "meta_step", real_step)
    meta_pretrain.main(prime_args(tiny_model_dir, data_dir, cut, "--steps", "4", "--resume"))
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "metrics.jsonl").read_text().count("\n") == (cut / "metrics.jsonl").read_text().count("\n") == 4

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in p.read_text().splitlines()]
    assert strip(whole / "metrics.jsonl") == strip(cut / "metrics.jsonl")


def two_meta_steps(model, data, out, *flags):
    """A priming run of two meta-steps (the second shows a changed meta-gradient) and what it leaves:
    the primed body (less the frozen word embeddings), metrics.jsonl, and the adapters in resume.pt."""
    meta_pretrain.main(prime_args(model, data, out, "--steps", "2", "--tasks-per-step", "1", "--inner-steps", "1",
                                  "--eval-every", "0", *flags))
    body = {k: v for k, v in load_file(out / "model.safetensors").items() if "word_embeddings" not in k}
    metrics = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    adapters = {k: v for k, v in torch.load(out / "resume.pt", weights_only=False)["model"].items() if "adapter" in k}
    return body, metrics, adapters


@pytest.fixture(scope="module")
def default_priming(tiny_model_dir, data_dir, tmp_path_factory):
    return two_meta_steps(tiny_model_dir, data_dir, tmp_path_factory.mktemp("default") / "primed")


def differ(a, b):
    assert a.keys() == b.keys() and a
    return any(not torch.equal(a[k], b[k]) for k in a)


# What each ablation changes in the outputs of a run with the default's seed (m: its metrics,
# d: the default's, a / da: the adapters in resume.pt); a flag the code ignored changes nothing.
SIGNS = {
    "--method mtl": lambda m, d, a, da: "train_loss" in m[0] and "query_loss" not in m[0],     # no inner loop
    "--inner-params all": lambda m, d, a, da: m[0]["support_loss_before"] == d[0]["support_loss_before"]
    and m[0]["support_loss_after"] != d[0]["support_loss_after"],                            # the body adapts too
    "--outer-peft": lambda m, d, a, da: differ(a, da)               # the initial adapters got the meta-gradient
    and m[0]["support_loss_before"] != d[0]["support_loss_before"],                          # and phi starts there
    "--query same": lambda m, d, a, da: m[0]["query_loss"] != d[0]["query_loss"],           # English query batches
    "--first-order": lambda m, d, a, da: m[0] == d[0] and m[1] != d[1],  # same forward passes, another gradient
    "--peft prefix": lambda m, d, a, da: m[0]["support_loss_before"] != d[0]["support_loss_before"],
    "--peft lora": lambda m, d, a, da: m[0]["support_loss_before"] != d[0]["support_loss_before"],
}


@pytest.mark.parametrize("flags", ["", *SIGNS])
def test_every_ablation_changes_what_priming_does(tiny_model_dir, data_dir, tmp_path, default_priming, flags):
    body, metrics, adapters = two_meta_steps(tiny_model_dir, data_dir, tmp_path / "primed", *flags.split())
    default_body, default_metrics, default_adapters = default_priming
    if not flags:  # the control: the same seed gives the same run, so any difference below is the flag's
        assert not differ(body, default_body) and metrics == default_metrics
        assert not differ(adapters, default_adapters)
        return
    assert differ(body, default_body)
    assert SIGNS[flags](metrics, default_metrics, adapters, default_adapters)


@pytest.mark.parametrize("peft", ["prefix", "lora", "full"])
def test_finetune_other_methods(tiny_model_dir, data_dir, tmp_path, peft):
    out = tmp_path / "tuned"
    finetune_peft.main(finetune_args(tiny_model_dir, data_dir, out, "--peft", peft, "--steps", "3"))
    evaluate_ner.main(["--ckpt", str(out), "--langs", "pt", "--max-sentences", "10", "--data-dir", data_dir])
    assert json.loads((out / "eval-test.json").read_text())["results"]["pt"]["sentences"] == 10


def test_bad_input_is_one_clear_line(tiny_model_dir, data_dir, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "meta_pretrain.py"), "--method", "mtl", "--first-order"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == \
        ["error: --first-order is a MAML option; it has no meaning with --method mtl"]
    run = subprocess.run([sys.executable, str(ROOT / "evaluate_ner.py"), "--ckpt", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("argv,message", [
    (["--priming-langs", "de,xx"], "unknown language 'xx'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--gpu", "0"], "--gpu 0"),
    (["--resume"], "resume.pt does not exist"),
])
def test_meta_pretrain_bad_flags(tiny_model_dir, data_dir, tmp_path, argv, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        meta_pretrain.main(prime_args(tiny_model_dir, data_dir, tmp_path / "p", *argv))


def test_wrong_folders_and_labels(tiny_model_dir, data_dir, tmp_path):
    tuned, primed = tmp_path / "tuned", tmp_path / "primed"
    finetune_peft.main(finetune_args(tiny_model_dir, data_dir, tuned, "--steps", "3"))
    with pytest.raises(FileNotFoundError, match="PEFT checkpoint"):  # a PEFT folder given to --init
        finetune_peft.main(finetune_args(tuned, data_dir, tmp_path / "x"))
    meta_pretrain.main(prime_args(tiny_model_dir, data_dir, primed, "--steps", "1"))
    with pytest.raises(ValueError, match="already holds a finished meta_pretrain run"):
        meta_pretrain.main(prime_args(tiny_model_dir, data_dir, primed, "--steps", "1"))
    record = json.loads((tuned / "peft_config.json").read_text())
    record["extra"]["labels"] = ["O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    (tuned / "peft_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="predicts labels"):
        evaluate_ner.main(["--ckpt", str(tuned), "--langs", "pt", "--data-dir", data_dir])


def test_priming_language_in_evaluation_warns(tiny_model_dir, data_dir, tmp_path):
    primed, tuned = tmp_path / "primed", tmp_path / "tuned"
    meta_pretrain.main(prime_args(tiny_model_dir, data_dir, primed, "--steps", "1"))
    finetune_peft.main(finetune_args(primed, data_dir, tuned, "--steps", "3"))
    with pytest.warns(UserWarning, match="de was used in fine-tuning or priming"):
        evaluate_ner.main(["--ckpt", str(tuned), "--langs", "de", "--max-sentences", "5", "--data-dir", data_dir])
    with pytest.raises(FileNotFoundError, match="not a fine-tuned checkpoint.*finetune_peft.py --init"):
        evaluate_ner.main(["--ckpt", str(primed), "--langs", "fr", "--data-dir", data_dir])
