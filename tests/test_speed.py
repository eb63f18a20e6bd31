"""Issue 47's speed changes keep the numbers: fine-tuning's dev F1 is evaluate_ner.py's score of the
kept checkpoint, and the foreach AdamW trains the for-loop AdamW's weights bit for bit."""
import json

import torch
from conftest import tune_argv
from safetensors.torch import load_file

import evaluate_ner
import finetune_peft
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
