"""Pick the inner loop: how far do k SGD steps at learning rate alpha take fresh PEFT tensors,
and what does a meta-step cost? (METHOD.md: the inner loop should simulate downstream PEFT.)

    python experiments/search_inner.py --data-dir ../shared/data/wikiann                        # the default grid
    python experiments/search_inner.py --lrs 0.1,0.3,1.0 --steps 5,10 --batch-sizes 8,16 --clip 1.0
    python experiments/search_inner.py --reference-ft checkpoints/ft-e5-small-adapter-en-s0     # + inner-loop strength

On the input model (no priming, dropout off), for each inner lr x inner steps x support batch
size, over --episodes episodes (a source-language train batch and a fresh phi each, the same
ones for every setting of a batch size):
  support loss before -> after the inner loop, and their ratio (the priming defaults ask <= 0.6)
  held-out query loss: the adapted phi scored on the priming languages' dev split (never a
      target language): the score of the search, lower is better
  inner-loop strength (with --reference-ft, a finetune_peft.py folder on the same model):
      (fresh - adapted) / (fresh - fine-tuned) held-out query loss
  seconds per second-order meta-step of --tasks-per-step tasks (median of --timed-steps)
It writes <out>/search.md and search.json and names the setting with the lowest held-out query
loss among those with ratio <= --max-ratio and meta-step cost <= --max-seconds.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for python experiments/search_inner.py
import adapters  # noqa: E402
import episodes  # noqa: E402
import maml  # noqa: E402
import peft_config  # noqa: E402
from plumbing.cli import HelpFormatter, derive_seed, run_cli, set_seed  # noqa: E402
from plumbing.files import write_json  # noqa: E402
from plumbing.ner_data import LABELS, parse_languages  # noqa: E402
from plumbing.pretrained import DEFAULT_MODEL, load_token_classifier, load_tokenizer, pick_device  # noqa: E402
from plumbing.runs import code_version  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="Grid over the inner loop's lr, steps and support batch size.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the input model of priming")
    p.add_argument("--peft", choices=peft_config.METHODS, default="adapter", help="the PEFT method simulated")
    p.add_argument("--lrs", default="0.01,0.03,0.1,0.3,1.0", help="inner learning rates (a log grid)")
    p.add_argument("--steps", default="3,5,10", help="inner step counts")
    p.add_argument("--batch-sizes", default="8,16", help="support (and query) batch sizes")
    p.add_argument("--clip", type=float, default=None, help="clip each inner gradient to this global norm")
    p.add_argument("--episodes", type=int, default=4, help="support batches (fresh phi each) per setting")
    p.add_argument("--eval-sentences", type=int, default=100, help="dev sentences per priming language")
    p.add_argument("--tasks-per-step", type=int, default=2, help="tasks of the timed meta-step")
    p.add_argument("--timed-steps", type=int, default=2, help="meta-steps timed per setting (median)")
    p.add_argument("--max-ratio", type=float, default=0.6, help="largest support-loss ratio after/before to pick")
    p.add_argument("--max-seconds", type=float, default=20.0, help="largest meta-step cost to pick (seconds)")
    p.add_argument("--reference-ft", default=None, help="a finetune_peft.py folder (same PEFT, on --model)")
    p.add_argument("--source-lang", default="en", help="support language")
    p.add_argument("--priming-langs", default="de,es", help="held-out query languages")
    p.add_argument("--max-len", type=int, default=64, help="sub-word truncation length")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub)")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes and fresh phi draws")
    p.add_argument("--out", default="experiments/results/inner-search", help="folder for search.md and search.json")
    return p


def check_args(args):
    for flag in ["episodes", "eval_sentences", "tasks_per_step", "timed_steps", "max_len"]:
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    grid = {"lrs": [float(x) for x in args.lrs.split(",")], "steps": [int(x) for x in args.steps.split(",")],
            "batch_sizes": [int(x) for x in args.batch_sizes.split(",")]}
    for name, values in grid.items():
        if not all(v > 0 for v in values):
            raise ValueError(f"--{name.replace('_', '-')} must be positive numbers (got {values})")
    if args.clip is not None and args.clip <= 0:
        raise ValueError(f"--clip must be positive (got {args.clip})")
    return grid


def adaptation(model, loss_fn, supports, held_out_query, phis, steps, lr, clip):
    """Mean support loss before/after the inner loop and held-out query loss before/after, over episodes."""
    model.eval()
    rows = []
    for support, phi in zip(supports, phis):
        adapted = maml.inner_loop(loss_fn, phi, support, steps, lr, first_order=True, clip=clip)
        rows.append({"support_before": episodes.query_loss(loss_fn, phi, [support]),
                     "support_after": episodes.query_loss(loss_fn, adapted, [support]),
                     "query_fresh": episodes.query_loss(loss_fn, phi, held_out_query),
                     "query_after": episodes.query_loss(loss_fn, adapted, held_out_query)})
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]}


def meta_step_seconds(model, loss_fn, source, n_tasks, timed, steps, lr, clip, phi_rng):
    """Median seconds of a second-order meta-step (train mode, body gradients, no optimizer step)."""
    model.train()
    seconds = []
    for _ in range(timed + 1):  # the first one warms up
        tasks = source.sample(n_tasks, torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        maml.meta_step(loss_fn, tasks, lambda i: adapters.fresh_peft_tensors(model, phi_rng), steps, lr, clip=clip)
        seconds.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(seconds[1:])


def pick(rows, max_ratio, max_seconds):
    """The row with the lowest held-out query loss among those whose inner loop really adapts
    (support loss ratio after/before <= max_ratio) at an affordable meta-step; None if none.
    A diverged setting (NaN loss) fails every comparison, so it is never picked."""
    eligible = [r for r in rows if r["ratio"] <= max_ratio and r["seconds"] <= max_seconds]
    return min(eligible, key=lambda r: r["query_after"]) if eligible else None


def search_markdown(rows, picked):
    head = ["| inner lr | inner steps | batch | support loss before -> after | ratio | held-out query loss "
            "(fresh -> adapted) | strength | s / meta-step |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    body = []
    for r in rows:
        strength = f"{r['strength']:.2f}" if r.get("strength") is not None else "-"
        mark = " **picked**" if r is picked else ""
        body.append(f"| {r['lr']:g} | {r['steps']} | {r['batch_size']} | {r['support_before']:.3f} -> "
                    f"{r['support_after']:.3f} | {r['ratio']:.2f} | "
                    f"{r['query_fresh']:.3f} -> {r['query_after']:.3f}{mark} "
                    f"| {strength} | {r['seconds']:.2f} |")
    return "\n".join(head + body)


def main(argv=None):
    args = build_parser().parse_args(argv)
    grid = check_args(args)
    version = code_version()  # the code that runs, read now
    out = Path(args.out)
    set_seed(args.seed)
    device = pick_device(args.gpu)
    tokenizer = load_tokenizer(args.model)
    model = load_token_classifier(args.model, num_labels=len(LABELS), id2label=LABELS, device=device)
    adapters.add_peft(model, adapters.PeftConfig(method=args.peft), seed=derive_seed(args.seed, "initial phi"))
    for name, p in model.named_parameters():  # the body as priming trains it: word embeddings frozen
        p.requires_grad_(name not in adapters.peft_parameters(model) and "word_embeddings" not in name)
    loss_fn = maml.functional_loss(model)
    priming_langs = parse_languages(args.priming_langs)
    rows = []
    settings = [(b, lr, k) for b in grid["batch_sizes"] for lr in grid["lrs"] for k in grid["steps"]]
    bar = tqdm(settings, desc="inner-loop search")
    for batch_size in grid["batch_sizes"]:
        source = episodes.EpisodeSource(tokenizer, args.source_lang, priming_langs, args.data_dir, 2000, batch_size,
                                        args.max_len, args.seed, device)
        supports = [source.support.next_batch() for _ in range(args.episodes)]
        held_out = episodes.held_out_episode(tokenizer, args.source_lang, priming_langs, args.data_dir,
                                             args.eval_sentences, batch_size, args.max_len, device)
        reference = (episodes.reference_query_loss(model, args.reference_ft, held_out, loss_fn)
                     if args.reference_ft else None)
        for lr in grid["lrs"]:
            for steps in grid["steps"]:
                seeds = [derive_seed(args.seed, f"search phi {e}") for e in range(args.episodes)]
                phis = [adapters.fresh_peft_tensors(model, torch.Generator().manual_seed(seed)) for seed in seeds]
                row = {"lr": lr, "steps": steps, "batch_size": batch_size, "clip": args.clip,
                       **adaptation(model, loss_fn, supports, held_out["query"], phis, steps, lr, args.clip)}
                row["ratio"] = row["support_after"] / row["support_before"]
                row["strength"] = ((row["query_fresh"] - row["query_after"]) / (row["query_fresh"] - reference)
                                   if reference is not None else None)
                row["seconds"] = meta_step_seconds(model, loss_fn, source, args.tasks_per_step, args.timed_steps,
                                                   steps, lr, args.clip, torch.Generator().manual_seed(0))
                rows.append(row)
                bar.update()
                bar.set_postfix(lr=lr, steps=steps, query=f"{row['query_after']:.3f}", ratio=f"{row['ratio']:.2f}")
    bar.close()
    picked = pick(rows, args.max_ratio, args.max_seconds)
    text = search_markdown(rows, picked)
    if reference is not None:
        text += f"\n\nReference (finetune_peft.py, {args.reference_ft}): held-out query loss {reference:.3f}."
    text += ("\n\nPicked: " + (f"inner lr {picked['lr']:g}, {picked['steps']} steps, batch {picked['batch_size']}"
                              if picked else f"none (no setting has ratio <= {args.max_ratio} "
                                             f"at <= {args.max_seconds} s)"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.md").write_text(text + "\n")
    write_json(out / "search.json", {"args": vars(args), "rows": rows, "picked": picked, "reference_loss": reference,
                                     "code_version": version, "device": str(device),
                                     "threads": torch.get_num_threads()})
    print(text)
    print(f"written: {out}/search.md, search.json")


if __name__ == "__main__":
    run_cli(main)
