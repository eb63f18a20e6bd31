"""Issue 47's speed changes keep the numbers: fine-tuning's dev F1 is evaluate_ner.py's score of the
kept checkpoint, and the foreach AdamW trains the for-loop AdamW's weights bit for bit. And the
thread policy: each stage sets torch's threads from the cores it may use, or --threads."""
import json
import os

import pytest
import torch
from conftest import prime_argv, tune_argv
from safetensors.torch import load_file

import evaluate_ner
import finetune_peft
import meta_pretrain
from adapters import WEIGHTS_FILE

# a tiny run long enough, at a large enough lr, that its dev F1 is not 0 (an equality of zeros bites nothing)
LEARNING = ("--steps", "24", "--lr", "2e-2", "--eval-every", "8", "--dev-sentences", "40")


def test_dev_f1_of_fine_tuning_is_evaluate_ners(tiny_model_dir, data_dir, tmp_path):
    ft = tmp_path / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, ft, *LEARNING))
    best = json.loads((ft / "run.json").read_text())["best"]
    assert best["dev_f1_default"] > 0
    evaluate_ner.main(["--ckpt", str(ft), "--split", "dev", "--langs", "en", "--max-sentences", "40",
                       "--max-len", "32", "--data-dir", data_dir, "--out", str(tmp_path / "dev.json")])
    scored = json.loads((tmp_path / "dev.json").read_text())["results"]["en"]
    assert scored["f1_default"] == best["dev_f1_default"]


def test_foreach_adamw_trains_the_for_loop_weights(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    real, asked = torch.optim.AdamW, []
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: asked.append(kw) or real(params, **kw))
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, tmp_path / "foreach", *LEARNING))
    assert asked[0].get("foreach") is True  # the multi-tensor update (on the CPU torch's default is the loop)
    plain = {"foreach": False, "fused": False}  # torch's for-loop AdamW, whatever finetune_peft asks for
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: real(params, **{**kw, **plain}))
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, tmp_path / "loop", *LEARNING))
    ours, loop = (load_file(tmp_path / run / WEIGHTS_FILE) for run in ("foreach", "loop"))
    assert ours.keys() == loop.keys() and all(torch.equal(ours[k], loop[k]) for k in ours)


@pytest.fixture
def restore_threads():
    """The stages set torch's threads process-wide: give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_stages_use_the_cores_they_may_use_and_record_it(tiny_model_dir, data_dir, tmp_path, capsys,
                                                         restore_threads):
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores + 3)  # not what the stage will choose, so the assertion below bites
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, tmp_path / "ft", "--steps", "1"))
    assert torch.get_num_threads() == cores
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["args"]["threads"] == cores
    assert f"torch threads: {cores} (the cores this process may use)" in capsys.readouterr().out
    evaluate_ner.main(["--ckpt", str(tmp_path / "ft"), "--langs", "fr", "--max-sentences", "4", "--max-len", "32",
                       "--data-dir", data_dir, "--threads", "1"])
    assert torch.get_num_threads() == 1 and "torch threads: 1 (--threads)" in capsys.readouterr().out


def test_threads_flag_is_recorded_and_checked(tiny_model_dir, data_dir, tmp_path, restore_threads):
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, tmp_path / "primed", "--threads", "1"))
    assert torch.get_num_threads() == 1
    assert json.loads((tmp_path / "primed" / "run.json").read_text())["args"]["threads"] == 1
    with pytest.raises(ValueError, match="--threads must be at least 1, got 0"):
        finetune_peft.main(tune_argv(tiny_model_dir, data_dir, tmp_path / "ft", "--threads", "0"))
    assert not (tmp_path / "ft").exists()  # refused before any write
