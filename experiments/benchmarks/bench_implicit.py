"""Cost of an implicit-MAML meta-step (meta_pretrain.py --inner-loop implicit) against N, beside today's unrolled one.

    # N = 10, 50, 200
    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_implicit.py --data-dir ../shared/data/wikiann
    # fewer N, steadier
    python experiments/benchmarks/bench_implicit.py --steps 10,50 --repeats 3 --threads 2

Setting: the default model and the stage's default flags (adapters, 2 tasks of 8 sentences, max
length 64). Configurations, each in a fresh subprocess (this script with --worker):
  unrolled    maml.meta_step: 5 SGD steps at 0.3, second order (today's default
              meta-step), then AdamW on the body;
  implicit N  implicit_priming.meta_gradient with --implicit-steps N --fresh-every 1 (N Adam
              steps of fine-tuning from a fresh phi_0 on batches of 16, then the hypergradient
              of each task with the default CG budget), then AdamW on the body.
The tasks are drawn once and reused, and the fine-tuning cycles over the same 4 batches of 16
for every N, so the widest batch, and with it the largest single step, is alike for every N:
what the figures compare is what grows with N.

Timing: one warm-up meta-step (creates AdamW's state; the implicit warm-up fine-tunes 4 steps, one
per batch), then --repeats measured meta-steps; the median is printed, and the split between
fine-tuning and hypergradient (implicit). The machine may be shared: the figures then include
contention (run with OMP_NUM_THREADS=1 and say so).

Peak memory: bench_maml.peak_memory around each measured meta-step: VmHWM after a reset of the
kernel's high-water mark (/proc/self/clear_refs), minus VmRSS before the step ("peak delta": the
memory the step touches on top of the resting model, data and optimizer state), and VmHWM itself
("process peak"). Resident memory, not torch's allocator: the CPU allocator has no peak counter,
and RSS is what the machine runs out of. The largest figure over the repeats is printed.
"""
import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_maml import peak_memory  # noqa: E402

import adapters  # noqa: E402
import episodes  # noqa: E402
import implicit  # noqa: E402
import implicit_priming  # noqa: E402
import maml  # noqa: E402
import meta_pretrain  # noqa: E402
from plumbing.cli import derive_seed  # noqa: E402
from plumbing.ner_data import LABELS, parse_languages  # noqa: E402
from plumbing.pretrained import load_token_classifier, load_tokenizer, pick_device  # noqa: E402

FINE_TUNE_BATCHES = 4   # cycled by every N, so the widest fine-tuning batch is the same for all


def build_parser():
    p = argparse.ArgumentParser(description="Seconds and peak memory of implicit vs unrolled meta-steps.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", default="10,50,200", help="inner fine-tuning lengths N of the implicit meta-step")
    p.add_argument("--repeats", type=int, default=2, help="measured meta-steps per configuration (median time)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each worker")
    p.add_argument("--model", default="e5-small", help="the input model of priming")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "unrolled" or an N
    return p


def stage_args(data_dir, implicit_steps=None):
    """meta_pretrain's default flags (and --inner-loop implicit --implicit-steps N --fresh-every 1)."""
    flags = ["--data-dir", data_dir] if data_dir else []
    if implicit_steps is not None:
        flags += ["--inner-loop", "implicit", "--implicit-steps", str(implicit_steps), "--fresh-every", "1"]
    args = meta_pretrain.build_parser().parse_args(flags)
    return args, meta_pretrain.check_args(args)


class FixedBatches:
    """Stands in for episodes.EpisodeSource in implicit_gradient: the same fine-tuning batches, cycled."""

    def __init__(self, batches):
        self.batches = batches

    def fine_tune_batches(self):
        return itertools.cycle(self.batches)


def run_worker(cli):
    torch.set_num_threads(cli.threads)
    implicit_steps = None if cli.worker == "unrolled" else int(cli.worker)
    args, config = stage_args(cli.data_dir, implicit_steps)
    device = pick_device(None)
    tokenizer = load_tokenizer(args.model)
    fine_tune_size = implicit_priming.IMPLICIT["implicit_batch_size"]
    source = episodes.EpisodeSource(tokenizer, args.source_lang, parse_languages(args.priming_langs), args.data_dir,
                                    args.max_sentences, args.batch_size, args.max_len, args.seed, device,
                                    fine_tune_batch_size=fine_tune_size)
    tasks = source.sample(args.tasks_per_step, torch.Generator().manual_seed(0))
    fixed = FixedBatches([source.fine_tune.next_batch() for _ in range(FINE_TUNE_BATCHES)])
    torch.manual_seed(args.seed)
    model = load_token_classifier(args.model, num_labels=len(LABELS), id2label=LABELS, device=device)
    adapters.add_peft(model, config, seed=derive_seed(args.seed, "initial phi"))
    meta_pretrain.set_trainable(model, "maml", False, "peft", True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.outer_lr)
    loss_fn = maml.functional_loss(model)
    phi_rng = torch.Generator().manual_seed(derive_seed(args.seed, "fresh phi"))
    phases, cg = {"fine_tune": 0.0, "hypergradient": 0.0}, []

    def timed_phase(name, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            result = fn(*a, **k)
            phases[name] += time.perf_counter() - t0
            return result
        return run
    implicit.inner_fine_tune = timed_phase("fine_tune", implicit.inner_fine_tune)
    implicit.hypergradient = timed_phase("hypergradient", implicit.hypergradient)

    def meta_step(steps=implicit_steps):
        optimizer.zero_grad(set_to_none=True)
        if implicit_steps is None:
            phi_0 = episodes.phi_0_of_tasks(model, "peft", False, phi_rng, len(tasks), range(len(tasks)))
            maml.meta_step(loss_fn, tasks, phi_0, args.inner_steps, args.inner_lr)
        else:
            args.implicit_steps = steps
            cg.append(implicit_priming.meta_gradient(model, loss_fn, tasks, fixed, {}, phi_rng, args)["cg_iterations"])
        optimizer.step()

    meta_step(FINE_TUNE_BATCHES if implicit_steps is not None else None)     # warm-up
    seconds, peaks, split = [], [], []
    for _ in range(cli.repeats):
        phases.update(fine_tune=0.0, hypergradient=0.0)
        t0 = time.perf_counter()
        delta, peak, method = peak_memory(meta_step, device, prepare=lambda: optimizer.zero_grad(set_to_none=True))
        seconds.append(time.perf_counter() - t0)
        peaks.append((delta, peak))
        split.append(dict(phases))
    out = {"config": cli.worker, "seconds": statistics.median(seconds), "all_seconds": seconds,
           "peak_delta_mb": max(d for d, _ in peaks), "process_peak_mb": max(p for _, p in peaks), "method": method,
           "fine_tune_s": statistics.median(s["fine_tune"] for s in split),
           "hypergradient_s": statistics.median(s["hypergradient"] for s in split),
           "cg_iterations": cg[1:] if cg else None, "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(out), flush=True)


def run_config(cli, argv, name):
    run = subprocess.run([sys.executable, __file__, *argv, "--worker", name], capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise RuntimeError(f"worker {name} failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = build_parser().parse_args(argv)
    if cli.worker:
        return run_worker(cli)
    rows = []
    for name in ["unrolled", *cli.steps.split(",")]:
        row = run_config(cli, argv, name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| meta-step | s / meta-step (median of {cli.repeats}) | fine-tuning s | hypergradient s | CG iterations "
          f"| peak delta MB | process peak MB |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = "unrolled, 5 SGD steps (today)" if r["config"] == "unrolled" else f"implicit, N = {r['config']}"
        implicit_only = (f"{r['fine_tune_s']:.1f} | {r['hypergradient_s']:.1f} | {r['cg_iterations']}"
                         if r["config"] != "unrolled" else "- | - | -")
        memory = f"{r['peak_delta_mb']:.0f} | {r['process_peak_mb']:.0f}"
        print(f"| {label} | {r['seconds']:.1f} | {implicit_only} | {memory} |")
    print(f"\nmemory: {rows[0]['method']}; torch threads per worker: {rows[0]['threads']}")
    if cli.json:
        Path(cli.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
