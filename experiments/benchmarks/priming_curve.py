"""The course of priming runs, from their metrics.jsonl: held-out query loss, adaptation, body change.

    python experiments/benchmarks/priming_curve.py checkpoints/primed-a checkpoints/primed-b --labels "lr 5e-5,lr 2e-5"
    python experiments/benchmarks/priming_curve.py experiments/results/outer-lr-pilot/* --every 20 \\
        --out experiments/results/outer-lr-pilot

For every run and every --every-th meta-step with a held-out evaluation: the held-out query loss
after the inner loop (priming languages' dev split), the mean support loss after / before the
inner loop over the meta-steps since the previous row, the body change (||theta - theta_0|| /
||theta_0||, non-embedding weights) and the inner-loop strength where the run logged one
(--reference-ft). With --out: table.md and curve.png there.
"""
import argparse
import json
from pathlib import Path


def rows_of(folder, every):
    """[(step, held-out query loss, support after/before, body change, strength)] of one run."""
    lines = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out, last = [], 0
    for line in lines:
        if "held_out_query_loss" not in line or line["step"] % every:
            continue
        window = [entry for entry in lines if last < entry["step"] <= line["step"] and "support_loss_after" in entry]
        ratio = (sum(line["support_loss_after"] / line["support_loss_before"] for line in window) / len(window)
                 if window else None)
        out.append((line["step"], line["held_out_query_loss"], ratio, line.get("body_change"),
                    line.get("inner_loop_strength")))
        last = line["step"]
    return out


def curve_markdown(curves):
    text = ["| run | meta-step | held-out query loss | support after / before | body change | inner-loop strength |",
            "|---|---:|---:|---:|---:|---:|"]
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for label, rows in curves.items():
        text += [f"| {label} | {s} | {q:.3f} | {cell(r, '.2f')} | {cell(b, '.2e')} | {cell(g, '.2f')} |"
                 for s, q, r, b, g in rows]
    return "\n".join(text)


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in curves.items():
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker=".", label=label)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("held-out query loss after the inner loop")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Tabulate and plot priming runs' metrics.jsonl.")
    p.add_argument("runs", nargs="+", help="priming run folders (each with metrics.jsonl)")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: the folder names)")
    p.add_argument("--every", type=int, default=20, help="a row every N meta-steps (those with a held-out evaluation)")
    p.add_argument("--out", default=None, help="write table.md and curve.png into this folder")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(args.runs)} runs")
    curves = {label: rows_of(run, args.every) for label, run in zip(labels, args.runs)}
    print(curve_markdown(curves))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "table.md").write_text(curve_markdown(curves) + "\n")
        plot(curves, Path(args.out) / "curve.png")


if __name__ == "__main__":
    main()
