"""The comparison's figures (compare.py): F1 by condition, paired differences, learning curves.

    python experiments/compare.py ...   # writes f1.png, paired.png and curves.png next to table.md

matplotlib is imported inside each function: nothing else in the project needs it.
"""

import statistics
from pathlib import Path

from experiments.compare_report import METRICS_FIX
from plumbing.runs import read_metrics


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_f1(table, path):
    """Average target F1 (seqeval default) by condition, error bars one std over runs."""
    plt = pyplot()
    labels = [f"{p}\n{c.replace('ablation: ', '')}" for p, c in table]
    means = [r["average"][0] for r in table.values()]
    stds = [r["average"][1] for r in table.values()]
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3,
           color=["C1" if label.startswith("prefix") else "C0" for label in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("average target F1 (seqeval default), ± 1 std")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_paired(paired, path):
    """Mean paired difference of average target F1 with its 95% CI, one line per comparison."""
    plt = pyplot()
    names = list(paired)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    for i, name in enumerate(names):
        d = paired[name]
        err = [[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]] if d["ci95"] else None
        ax.errorbar([d["mean"]], [i], xerr=err, fmt="o", capsize=4, color="C1" if name.startswith("prefix") else "C0")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("paired difference of average target F1 (95% CI, t distribution)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_curve(folder, key):
    """(steps, values) of one metric from a run folder's metrics.jsonl."""
    points = read_metrics(Path(folder) / "metrics.jsonl", METRICS_FIX)
    points = [p for p in points if key in p]
    return [p["step"] for p in points], [p[key] for p in points]


def mean_curve(folders, key):
    """The curve averaged over runs, step by step over the runs that logged that step (the runs of
    one row log at the same steps; one still running has logged fewer)."""
    by_step = {}
    for folder in folders:
        if (Path(folder) / "metrics.jsonl").exists():
            for step, value in zip(*read_curve(folder, key)):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.mean(by_step[s]) for s in steps]


def condition_colors(row_runs, conditions):
    """One colour per condition plotted, in `conditions`' order: matplotlib's 10-colour cycle, so
    up to 10 conditions never share one (numbering every known condition would wrap around)."""
    plotted = {condition for _, condition in row_runs}
    return {condition: f"C{i % 10}" for i, condition in enumerate(c for c in conditions if c in plotted)}


def plot_curves(row_runs, conditions, path):
    """Held-out query loss during priming and en dev F1 during fine-tuning: one line per table
    row, the mean over its runs. row_runs: {(peft, condition): [compare.read_run(...), ...]}."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = condition_colors(row_runs, conditions)
    for (peft, condition), runs in row_runs.items():
        # one colour per condition, one line style per PEFT method: the same condition reads across
        label = f"{peft}: {condition.replace('ablation: ', '')}"
        style = {"lw": 1.2, "color": colors.get(condition, "k"), "ls": "--" if peft == "prefix" else "-"}
        primed = sorted({r["primed"] for r in runs if r["primed"] is not None})
        left.plot(*mean_curve([f for f in primed if f.exists()], "held_out_query_loss"), marker="o", ms=3,
                  label=label, **style)
        right.plot(*mean_curve([r["tuned"] for r in runs], "dev_f1_default"), marker="o", ms=3, label=label, **style)
    left.set(title="priming: held-out de/es query loss after each row's inner loop on en", xlabel="meta-step",
             ylabel="loss")
    right.set(title="fine-tuning: en dev F1, seqeval default (mean over runs)", xlabel="step", ylabel="F1")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
