"""meta_pretrain.py under torchrun: 2 gloo processes on the CPU give the parameters of one
process whose meta-batch holds the same tasks, for MAML, MTL and a resumed run (tiny model,
dropout 0, so that the only randomness is the seeded task and phi draws)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import prime_argv, save_tiny_body
from safetensors.torch import load_file

import episodes
import meta_pretrain
from plumbing import distributed
from plumbing.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")


def prime_args(model, data, out, *extra):
    # --outer-lr 1e-3 moves the body by ~1e-3 in 3 steps, far beyond TOLERANCE, so a process
    # that ran other tasks (or other phi_0) would show
    return prime_argv(model, data, out, "--outer-lr", "1e-3", *extra)


@pytest.fixture(scope="module")
def dropout_free_model_dir(tmp_path_factory, default_tokenizer):
    """conftest's tiny BERT without dropout: each process draws its own dropout masks, so with
    dropout the runs would differ by design."""
    return save_tiny_body(tmp_path_factory.mktemp("tiny-bert-no-dropout"), default_tokenizer, dropout=0.0)


def torchrun(argv, processes=2):
    """meta_pretrain.py under `python -m torch.distributed.run` (gloo: no GPU here), one thread each."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={processes}", str(ROOT / "meta_pretrain.py"), *argv],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def metrics(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one, several, input_model):
    a, b = load_file(one / "model.safetensors"), load_file(several / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
    start = load_file(input_model / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 100 * TOLERANCE  # the check means something
    # the logged losses are averaged across processes; the held-out loss is rank 0's
    assert metrics(several) == [pytest.approx(m, rel=TOLERANCE) for m in metrics(one)]


def test_each_process_keeps_each_tasks_phi(monkeypatch):
    """Process r runs global tasks r, r + world, ...; task j gets the j-th phi_0 drawn."""
    drawn = []

    def start(model, generator, outer_peft):
        drawn.append(len(drawn))
        return {"phi": torch.tensor(float(drawn[-1]))}
    monkeypatch.setitem(episodes.INNER_PARAMS, "peft", start)
    mine = distributed.my_tasks(6, world=2, rank=1)
    phi_0 = episodes.phi_0_of_tasks(None, "peft", False, None, 6, mine)
    assert list(mine) == [1, 3, 5] and drawn == [0, 1, 2, 3, 4, 5]  # every phi drawn, in global order
    assert [phi_0(i)["phi"].item() for i in range(3)] == [1.0, 3.0, 5.0]
    assert list(distributed.my_tasks(6, world=3, rank=0)) == [0, 3]
    assert list(distributed.my_tasks(6, world=1, rank=0)) == list(range(6))


@pytest.mark.slow  # two torchrun launches of 2 processes each
def test_maml_on_two_processes_and_resume(dropout_free_model_dir, data_dir, tmp_path):
    """2 processes x 1 task = 1 process x 2 tasks, after 2 steps; then that torchrun run resumed to
    step 3 equals an uninterrupted 3-step run (one process: by the first check, the same as two)."""
    model = dropout_free_model_dir
    two, two_steps_one = tmp_path / "two-processes", tmp_path / "one-process-2-steps"
    torchrun(prime_args(model, data_dir, two, "--steps", "2"))
    meta_pretrain.main(prime_args(model, data_dir, two_steps_one, "--steps", "2"))
    assert not torch.distributed.is_initialized()  # one process joins no process group
    assert_same_run(two_steps_one, two, model)
    assert len(torch.load(two / "resume.pt", weights_only=False)["rank_rngs"]) == 2

    torchrun(prime_args(model, data_dir, two, "--steps", "3", "--resume"))
    one = tmp_path / "one-process-3-steps"
    meta_pretrain.main(prime_args(model, data_dir, one, "--steps", "3"))
    assert_same_run(one, two, model)
    assert json.loads((two / "run.json").read_text())["args"]["resume"]


@pytest.mark.slow  # a torchrun launch of 2 processes
def test_mtl_on_two_processes(dropout_free_model_dir, data_dir, tmp_path):
    model, one, two = dropout_free_model_dir, tmp_path / "one", tmp_path / "two"
    torchrun(prime_args(model, data_dir, two, "--method", "mtl"))
    meta_pretrain.main(prime_args(model, data_dir, one, "--method", "mtl"))
    assert_same_run(one, two, model)


@pytest.mark.parametrize("argv,message", [
    (["--tasks-per-step", "3"],
     "--tasks-per-step 3 must be divisible by the number of processes (2): it is the global meta-batch, "
     "split evenly across them"),
    (["--gpu", "1"], "--gpu with several torchrun processes: leave it out"),
])
def test_bad_flags_under_torchrun(dropout_free_model_dir, data_dir, tmp_path, monkeypatch, capsys, argv, message):
    """Checked before any process group is joined, so each process stops with this one line
    (here one process of two, with the environment torchrun gives it)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as stop:
        run_cli(meta_pretrain.main, prime_args(dropout_free_model_dir, data_dir, tmp_path / "p", *argv))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")
