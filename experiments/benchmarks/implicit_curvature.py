"""Which curvature and CG damping make the implicit hypergradient second order on the real model?

    python experiments/benchmarks/implicit_curvature.py --data-dir ../shared/data/wikiann            # the damping sweep
    python experiments/benchmarks/implicit_curvature.py --dampings 0.1 --steps 50 --out runs/curv50  # correction size
    python experiments/benchmarks/implicit_curvature.py --curvature hessian --dampings 0.001         # the exact Hessian

For each --cg-damping, a short `meta_pretrain.py --inner-loop implicit` run at the defaults (the
default model, adapters, 2 tasks a meta-step, 5 CG iterations to a relative residual of 1e-2), then
from its metrics.jsonl, over all its tasks: the share whose CG reached --cg-tol, the mean
correction ratio ||second-order term|| / ||dL_Q/dtheta|| and the mean cosine of the hypergradient
with the first-order one, and the mean CG iterations. implicit_priming.CG_DAMPING is chosen from
this table: the smallest damping whose CG converges in >= 90% of tasks (RESULTS.md).
One thread; ~3-5 min a damping for 10 meta-steps on a busy 2-core machine.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import meta_pretrain  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub)")
    p.add_argument("--dampings", default="0.001,0.01,0.1,1", help="--cg-damping values to try")
    p.add_argument("--curvature", default="ggn", choices=["ggn", "hessian"], help="the CG system's matrix")
    p.add_argument("--steps", type=int, default=10, help="meta-steps a damping (2 tasks each)")
    p.add_argument("--cg-steps", type=int, default=None, help="most CG iterations (default: the stage's)")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed (the same data and phi_0 for every damping)")
    p.add_argument("--out", default="runs/implicit-curvature", help="folder of the runs (one per damping)")
    return p.parse_args()


def summary(metrics):
    """Means over the logged meta-steps (each already a mean over its tasks)."""
    steps = [m for m in metrics if "cg_converged_share" in m]

    def mean(key):
        return sum(m[key] for m in steps) / len(steps)
    return {"meta_steps": len(steps), "cg_converged_share": mean("cg_converged_share"),
            "correction_ratio": mean("correction_ratio"), "cosine_to_first_order": mean("cosine_to_first_order"),
            "min_cosine": min(m["cosine_to_first_order"] for m in steps), "cg_iterations": mean("cg_iterations"),
            "steps_with_zero_correction": sum(m["correction_ratio"] == 0 for m in steps),
            "seconds_per_meta_step": mean("seconds")}


def main():
    args = parse()
    rows = []
    for damping in args.dampings.split(","):
        out = Path(args.out) / (f"{args.curvature}-{damping}" + (f"-cg{args.cg_steps}" if args.cg_steps else ""))
        argv = ["--inner-loop", "implicit", "--curvature", args.curvature, "--cg-damping", damping,
                "--steps", str(args.steps), "--eval-every", str(10 * args.steps), "--seed", str(args.seed),
                "--out", str(out), "--overwrite", *(["--data-dir", args.data_dir] if args.data_dir else []),
                *(["--cg-steps", str(args.cg_steps)] if args.cg_steps else [])]
        meta_pretrain.main(argv)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows.append({"curvature": args.curvature, "cg_damping": float(damping), "cg_steps": args.cg_steps or 5,
                     **summary(metrics)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| curvature | cg damping | CG steps | meta-steps | CG converged | correction / direct "
          "| cosine to first order (min) | CG iterations | s / meta-step |"
          "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['curvature']} | {r['cg_damping']:g} | {r['cg_steps']} | {r['meta_steps']} | "
              f"{r['cg_converged_share']:.0%} | "
              f"{r['correction_ratio']:.3f} | {r['cosine_to_first_order']:.3f} ({r['min_cosine']:.3f}) | "
              f"{r['cg_iterations']:.1f} | {r['seconds_per_meta_step']:.1f} |")


if __name__ == "__main__":
    torch_threads = __import__("torch").set_num_threads(1)
    main()
