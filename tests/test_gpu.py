"""The GPU path (pytest -m gpu; experiments/benchmarks/gpu_check.sh runs them): skipped, with the reason,
where no CUDA device is visible. The same code as on the CPU, only the device differs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate_ner
import finetune_peft
import maml
import meta_pretrain

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


def test_three_stages_end_to_end_on_cuda(tiny_model_dir, data_dir, tmp_path):
    primed, tuned = tmp_path / "primed", tmp_path / "tuned"
    meta_pretrain.main(["--model", str(tiny_model_dir), "--data-dir", data_dir, "--out", str(primed), "--gpu", "0",
                        "--steps", "2", "--tasks-per-step", "2", "--batch-size", "4", "--max-sentences", "40",
                        "--eval-sentences", "8", "--eval-every", "1", "--max-len", "32", "--precision", "bf16"])
    finetune_peft.main(["--init", str(primed), "--data-dir", data_dir, "--out", str(tuned), "--gpu", "0",
                        "--steps", "4", "--batch-size", "4", "--max-sentences", "40", "--dev-sentences", "16",
                        "--max-len", "32", "--max-tokens", "64"])
    evaluate_ner.main(["--ckpt", str(tuned), "--langs", "fr", "--max-sentences", "20", "--data-dir", data_dir,
                       "--gpu", "0"])
    saved = json.loads((tuned / "eval-test.json").read_text())
    assert saved["device"] == "cuda:0" and saved["results"]["fr"]["sentences"] == 20


def test_meta_gradient_on_cuda_equals_the_cpu_one(tiny_model_dir):
    import adapters
    from plumbing.pretrained import load_token_classifier, load_tokenizer
    tokenizer = load_tokenizer(tiny_model_dir)
    grads = {}
    for device in ("cpu", "cuda:0"):
        model = load_token_classifier(tiny_model_dir, num_labels=7, device=device)
        adapters.add_peft(model, adapters.PeftConfig("adapter"), seed=0)
        enc = tokenizer(["Paris is in France", "Angela Merkel visited Berlin"], return_tensors="pt", padding=True)
        batch = {k: v.to(device) for k, v in enc.items()} | {"labels": torch.zeros_like(enc["input_ids"]).to(device)}
        phi = adapters.fresh_peft_tensors(model, torch.Generator().manual_seed(0))
        body = [p for n, p in adapters.body_parameters(model).items() if "word_embeddings" not in n]
        maml.meta_step(maml.functional_loss(model), [(batch, batch)], lambda i: phi, 2, 0.1)
        grads[device] = torch.cat([p.grad.flatten().cpu() for p in body])
    assert torch.allclose(grads["cpu"], grads["cuda:0"], rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torchrun with NCCL needs 2 GPUs")
def test_torchrun_with_nccl(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "p"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(ROOT / "meta_pretrain.py"), "--model", str(tiny_model_dir), "--data-dir", data_dir,
                          "--out", str(out), "--steps", "2", "--tasks-per-step", "2", "--batch-size", "4",
                          "--max-sentences", "40", "--eval-sentences", "8", "--max-len", "32"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
