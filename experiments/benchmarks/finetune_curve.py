"""The fine-tuning length: en dev F1 against the step for runs of different --steps.

    python experiments/benchmarks/finetune_curve.py --data-dir ../shared/data/wikiann --steps 1000,2000 \\
        --out experiments/results/finetune-curve
    python experiments/benchmarks/finetune_curve.py --peft prefix --steps 2000 --out experiments/results/finetune-curve

Runs finetune_peft.py on the unprimed default model once per --steps value (dev F1 every
--eval-every steps; a run whose folder already holds run.json is kept), then plots every run
found in --out into <out>/curve.png and prints the curve as a table. The schedule decays to
zero at each run's own last step, so each run is a separate line.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def curve(folder):
    """(steps, en dev F1) of a fine-tuning folder; older runs logged the strict mode as dev_f1."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    key = "dev_f1_default" if any("dev_f1_default" in line for line in lines) else "dev_f1"
    points = [(line["step"], line[key]) for line in lines if key in line]
    scheme = "seqeval default" if key == "dev_f1_default" else "strict IOB2"
    return [s for s, _ in points], [f for _, f in points], scheme


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="1000,2000", help="comma-separated run lengths")
    p.add_argument("--peft", default="adapter", help="PEFT method")
    p.add_argument("--eval-every", type=int, default=100, help="dev F1 every N steps")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR)")
    p.add_argument("--out", default="experiments/results/finetune-curve", help="folder of the runs and the plot")
    args = p.parse_args()
    out = Path(args.out)
    for steps in args.steps.split(","):
        run = out / f"{args.peft}-{steps}"
        if not (run / "run.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "finetune_peft.py"), "--init", "e5-small", "--peft", args.peft,
                            "--steps", steps, "--eval-every", str(args.eval_every), "--out", str(run),
                            *(["--data-dir", args.data_dir] if args.data_dir else [])], check=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in sorted(out.glob("*/metrics.jsonl")):
        steps, f1, mode = curve(run.parent)
        ax.plot(steps, f1, marker="o", ms=3, label=f"{run.parent.name} ({mode})")
        print(f"{run.parent.name} ({mode}): " + ", ".join(f"{s}: {f:.1f}" for s, f in zip(steps, f1)))
    ax.set(xlabel="step", ylabel="en dev F1 (1,000 sentences)", title="fine-tuning e5-small, linear warmup + decay")
    ax.set_ylim(50, None)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    print(f"written: {out / 'curve.png'}")


if __name__ == "__main__":
    main()
