"""Meta-steps per second of meta_pretrain.py with 1 and 2 CPU processes (torchrun, gloo).

    python experiments/benchmarks/bench_distributed.py --data-dir ../shared/data/wikiann
    python experiments/benchmarks/bench_distributed.py --runs 1x1,2x1,1x2 --hidden 128 --steps 12

Each run primes a tiny random BERT (the real XLM-R tokenizer, dropout 0) with the same global
meta-batch (--tasks-per-step, split across the processes), once as a plain `python
meta_pretrain.py` (1 process) and once under `python -m torch.distributed.run` (several). The
rate is rank 0's own step time from metrics.jsonl (first step left out as warm-up; the
all_reduce is inside it, the start-up is not); the wall time of the whole command, start-up
included, is printed beside it. On a 2-core machine 2 processes share the cores that 1 process
with 2 threads would use, so do not expect a speed-up there; on GPUs each process has its own.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from plumbing.pretrained import load_tokenizer  # noqa: E402


def tiny_model(folder, hidden, layers):
    """A random BERT of the given size with the default model's tokenizer, saved like any model."""
    from transformers import BertConfig, BertModel
    tokenizer = load_tokenizer("e5-small")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
                        max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prime(processes, threads, model, out, args):
    """One priming run; returns (meta-steps per second of rank 0's steps after the first, wall seconds)."""
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, str(ROOT / "meta_pretrain.py"), "--model", str(model), "--out", str(out),
               "--steps", str(args.steps), "--tasks-per-step", str(args.tasks_per_step),
               "--inner-steps", str(args.inner_steps), "--batch-size", str(args.batch_size),
               "--max-len", str(args.max_len), "--max-sentences", "200", "--eval-every", "0",
               "--save-every", str(args.steps)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    start = time.perf_counter()
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    seconds = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return len(seconds) / sum(seconds), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="1x1,2x1",
                        help="comma-separated PROCESSESxTHREADS settings to time, e.g. 1x1,2x1,1x2")
    parser.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub's wikiann)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny BERT")
    parser.add_argument("--layers", type=int, default=2, help="layers of the tiny BERT")
    parser.add_argument("--steps", type=int, default=8, help="meta-steps per run (the first is not timed)")
    parser.add_argument("--tasks-per-step", type=int, default=4,
                        help="global meta-batch; must be divisible by every process count in --runs")
    parser.add_argument("--inner-steps", type=int, default=3, help="inner-loop SGD steps per task")
    parser.add_argument("--batch-size", type=int, default=8, help="sentences per support/query batch")
    parser.add_argument("--max-len", type=int, default=64, help="sub-word truncation length")
    args = parser.parse_args()
    runs = [tuple(int(x) for x in run.split("x")) for run in args.runs.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "tiny", args.hidden, args.layers)
        print(f"tiny BERT hidden {args.hidden}, {args.layers} layers; {args.tasks_per_step} tasks per meta-step, "
              f"{args.inner_steps} inner steps, batch {args.batch_size}; {os.cpu_count()} CPU cores")
        print("| processes x threads | meta-steps/s | wall s (start-up included) |")
        print("|---|---|---|")
        for processes, threads in runs:
            rate, wall = prime(processes, threads, model, Path(tmp) / f"run-{processes}x{threads}", args)
            print(f"| {processes} x {threads} | {rate:.2f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
