"""The paper's comparison: does priming help PEFT, and which MAML modification matters?

    python compare.py --data-dir ../shared/data/wikiann                     # the CPU budget (README table)
    python compare.py --gpu 0 --budget gpu --model xlm-roberta-base         # a larger budget on a GPU
    python compare.py --search --data-dir ../shared/data/wikiann            # inner lr x inner steps, on de/es dev

Runs the three stages for every condition and seed, skipping runs whose results already exist
(so an interrupted comparison continues where it stopped), then writes into --out:
  table.md / results.json   target-language F1 (fr, nl, pt test) per condition: mean and std over seeds
  f1.png                    average target F1 by condition
  curves.png                learning curves: held-out query loss in priming, en dev F1 in fine-tuning
Conditions, for each --pefts method: no priming, MTL priming, MAML priming (the project's
defaults), and the ablations (inner loop on all parameters, same-language query, first order,
outer update of the initial PEFT tensors); full fine-tuning is a reference row. The main rows
use --seeds seeds; the ablations --ablation-seeds. MTL and MAML priming get the same data and
the same number of optimizer steps. Priming languages (de, es) and target languages (fr, nl, pt)
are disjoint, so the evaluation stays zero-shot.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from meta_pretrain import INNER_LR, INNER_STEPS

HERE = Path(__file__).resolve().parent

# Budgets: the stage flags of each run. "cpu" finishes in about two hours on 2 CPU cores.
BUDGETS = {
    "cpu": {"prime": ["--steps", "40", "--tasks-per-step", "2", "--batch-size", "8", "--max-sentences", "2000"],
            "finetune": ["--steps", "300", "--batch-size", "16", "--max-sentences", "4000", "--eval-every", "100"],
            "evaluate": ["--max-sentences", "1000"]},
    "gpu": {"prime": ["--steps", "1000", "--tasks-per-step", "4", "--batch-size", "16", "--max-sentences", "20000"],
            "finetune": ["--steps", "3000", "--batch-size", "32", "--max-sentences", "20000", "--eval-every", "500"],
            "evaluate": []},
    "smoke": {"prime": ["--steps", "2", "--tasks-per-step", "1", "--batch-size", "4", "--max-sentences", "40",
                        "--eval-every", "1", "--eval-sentences", "8", "--max-len", "32"],
              "finetune": ["--steps", "4", "--batch-size", "4", "--max-sentences", "40", "--eval-every", "2",
                           "--dev-sentences", "16", "--max-len", "32"],
              "evaluate": ["--max-sentences", "16"]},
}

# condition -> meta_pretrain.py flags (None: no priming). The first three are the main rows.
CONDITIONS = {
    "no priming": None,
    "MTL priming": ["--method", "mtl"],
    "MAML priming": [],
    "ablation: inner loop on all parameters": ["--inner-params", "all"],
    "ablation: same-language query": ["--query", "same"],
    "ablation: first-order": ["--first-order"],
    "ablation: outer update of initial PEFT": ["--outer-peft"],
}
MAIN_ROWS = ("no priming", "MTL priming", "MAML priming")
FULL_ROW = ("full", "full fine-tuning (reference)")


def build_parser():
    p = argparse.ArgumentParser(description="Run the priming comparison and write its table and plots.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="stage flags per run (see BUDGETS)")
    p.add_argument("--pefts", default="adapter,prefix", help="PEFT methods to compare")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main rows (no priming, MTL, MAML)")
    p.add_argument("--ablation-seeds", type=int, default=1, help="seeds of the ablation rows")
    p.add_argument("--full-seeds", type=int, default=1, help="seeds of the full fine-tuning reference row")
    p.add_argument("--conditions", default=None, help="comma-separated subset of condition keys (default: all)")
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning reference row")
    p.add_argument("--langs", default="fr,nl,pt", help="target languages (never priming languages)")
    p.add_argument("--priming-langs", default="de,es", help="priming languages")
    p.add_argument("--inner-lr", type=float, default=None, help="inner learning rate for MAML rows (default: meta_pretrain's)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps for MAML rows (default: meta_pretrain's)")
    p.add_argument("--search", action="store_true",
                   help="instead: grid over --search-lrs x --search-steps, scored by de/es dev F1 after fine-tuning")
    p.add_argument("--search-lrs", default="3e-3,1e-2,3e-2", help="inner learning rates of the search")
    p.add_argument("--search-steps", default="1,3", help="inner step counts of the search")
    p.add_argument("--model", default="e5-small", help="the pretrained model (name, folder or hub id)")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub)")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    p.add_argument("--out", default=None, help="results folder (default: results/<budget>)")
    p.add_argument("--runs", default=None, help="where the stage checkpoints go (default: <out>/runs)")
    return p


def run_stage(script, flags, done_marker):
    """Run one stage unless its result exists (the comparison can be continued)."""
    if Path(done_marker).exists():
        return
    command = [sys.executable, str(HERE / script), *flags]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def data_gpu_flags(args):
    """--data-dir and --gpu, which every stage takes."""
    flags = ["--data-dir", args.data_dir] if args.data_dir else []
    return flags + (["--gpu", str(args.gpu)] if args.gpu is not None else [])


def primed_folder(tuned):
    """The priming run a fine-tuning run started from: ft-<tag> <- primed-<tag>, side by side."""
    return tuned.parent / ("primed-" + tuned.name[len("ft-"):])


def one_run(args, runs, peft, condition, seed, eval_langs=None, split="test", extra_prime=()):
    """prime (unless no priming / full FT) -> fine-tune -> evaluate; returns the eval JSON path."""
    budget, data_gpu = BUDGETS[args.budget], data_gpu_flags(args)
    tag = f"{peft}-{condition.replace(' ', '_').replace(':', '')}-s{seed}" + "".join(extra_prime)
    init = args.model
    tuned = runs / f"ft-{tag}"
    if CONDITIONS.get(condition) is not None:
        primed = primed_folder(tuned)
        maml_flags = []
        if "--method" not in CONDITIONS[condition]:
            maml_flags += ["--inner-lr", str(args.inner_lr)] if args.inner_lr else []
            maml_flags += ["--inner-steps", str(args.inner_steps)] if args.inner_steps else []
        run_stage("meta_pretrain.py", ["--model", args.model, *data_gpu, *budget["prime"], "--peft", peft, "--seed", str(seed),
                                       "--priming-langs", args.priming_langs, *CONDITIONS[condition],
                                       *maml_flags, *extra_prime, "--out", str(primed)], primed / "config.json")
        init = str(primed)
    run_stage("finetune_peft.py", [*data_gpu, *budget["finetune"], "--init", init, "--peft", peft,
                                   "--seed", str(seed), "--out", str(tuned)], tuned / "run.json")
    result = tuned / f"eval-{split}.json"
    run_stage("evaluate_ner.py", [*data_gpu, *budget["evaluate"], "--ckpt", str(tuned), "--split", split,
                                  "--langs", eval_langs or args.langs, "--out", str(result)], result)
    return result


def rows_order(pefts, conditions):
    """The table's order: PEFT by PEFT, conditions as listed, full fine-tuning last."""
    rank = {row: i for i, row in enumerate([(p, c) for p in pefts for c in conditions] + [FULL_ROW])}
    return lambda row: rank[row]


def write_table(table, langs, out):
    (out / "table.md").write_text(markdown(table, langs) + "\n")
    (out / "results.json").write_text(json.dumps({f"{p} | {c}": r for (p, c), r in table.items()}, indent=1))


def body_change(primed, model):
    """How far priming moved the body: ||theta' - theta|| / ||theta|| over its non-embedding
    weights (the embeddings are 80% of e5-small and barely move). None where the original
    weights are not a local safetensors file (a hub id)."""
    from safetensors.torch import load_file

    import pretrained
    original = Path(pretrained.resolve_model(model)) / "model.safetensors"
    if not original.is_file():
        return None
    before, after = load_file(str(original)), load_file(str(Path(primed) / "model.safetensors"))
    keys = [k for k in before if "embeddings" not in k and k in after]
    change = sum((after[k].double() - before[k].double()).pow(2).sum() for k in keys).sqrt()
    return float(change / sum(before[k].double().pow(2).sum() for k in keys).sqrt())


def add_body_change(table, row_runs, model):
    """The mean body change of each primed row's runs, in the table's results."""
    for row, tuned in row_runs.items():
        primed = [primed_folder(f) for f in tuned]
        changes = [body_change(f, model) for f in primed if (f / "model.safetensors").is_file()]
        if changes and None not in changes:
            table[row]["body_change"] = statistics.mean(changes)


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(result_files, langs):
    """Per language and average: mean and std of F1 over seeds."""
    scores = [json.loads(Path(f).read_text())["results"] for f in result_files]
    return {lang: mean_std([s[lang]["f1"] for s in scores]) for lang in [*langs, "average"]} | {"seeds": len(scores)}


def markdown(table, langs):
    header = "| PEFT | condition | seeds | " + " | ".join(langs) + " | average |"
    rows = [header, "|---|---|---:|" + "---:|" * (len(langs) + 1)]
    changes = any("body_change" in r for r in table.values())
    if changes:  # how far priming moved the body (add_body_change)
        rows = [rows[0] + " body change |", rows[1] + "---:|"]
    for (peft, condition), r in table.items():
        cells = " | ".join(f"{r[l][0]:.2f} ± {r[l][1]:.2f}" if r["seeds"] > 1 else f"{r[l][0]:.2f}"  # 1 seed: no std
                           for l in [*langs, "average"])
        change = (f" {r['body_change']:.1e} |" if "body_change" in r else " - |") if changes else ""
        rows.append(f"| {peft} | {condition} | {r['seeds']} | {cells} |{change}")
    return "\n".join(rows)


def plot_f1(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{p}\n{c.replace('ablation: ', '')}" for p, c in table]
    means = [r["average"][0] for r in table.values()]
    stds = [r["average"][1] for r in table.values()]
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=["C0" if "prefix" not in l else "C1" for l in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("average target F1 (fr, nl, pt)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_curve(folder, key):
    """(steps, values) of one metric from a run folder's metrics.jsonl."""
    points = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    points = [p for p in points if key in p]
    return [p["step"] for p in points], [p[key] for p in points]


def mean_curve(folders, key):
    """The curve averaged over seeds (the runs of one row log at the same steps)."""
    curves = [read_curve(f, key) for f in folders if (f / "metrics.jsonl").exists()]
    if not curves:
        return [], []
    return curves[0][0], [statistics.mean(values) for values in zip(*(c[1] for c in curves))]


def plot_curves(row_runs, path):
    """Held-out query loss during priming and en dev F1 during fine-tuning: one line per table
    row, the mean over its seeds. row_runs: {(peft, condition): [fine-tuning folder, ...]}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {condition: f"C{i}" for i, condition in enumerate(list(CONDITIONS) + [FULL_ROW[1]])}
    for (peft, condition), tuned in row_runs.items():
        # one colour per condition, one line style per PEFT method: the same condition reads across
        label = f"{peft}: {condition.replace('ablation: ', '')}"
        style = {"lw": 1.2, "color": colors.get(condition, "k"), "ls": "--" if peft == "prefix" else "-"}
        primed = [primed_folder(f) for f in tuned]
        left.plot(*mean_curve([f for f in primed if f.exists()], "held_out_query_loss"), marker="o", ms=3, label=label, **style)
        right.plot(*mean_curve(tuned, "dev_f1"), marker="o", ms=3, label=label, **style)
    left.set(title="priming: held-out query loss (de/es dev, fresh PEFT adapted on en)", xlabel="meta-step", ylabel="loss")
    right.set(title="fine-tuning: en dev F1 (mean over seeds)", xlabel="step", ylabel="F1")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search(args, out, runs):
    """Inner lr x inner steps for MAML priming, scored on the priming languages' dev split
    after downstream fine-tuning (never on the target languages)."""
    results = {}
    for peft in args.pefts.split(","):
        for lr in args.search_lrs.split(","):
            for steps in args.search_steps.split(","):
                # the default setting is the MAML row's seed-0 run: reuse it rather than run it twice
                default = float(lr) == INNER_LR and int(steps) == INNER_STEPS
                extra = () if default else ("--inner-lr", lr, "--inner-steps", steps)
                f = one_run(args, runs, peft, "MAML priming", 0, eval_langs=args.priming_langs, split="dev",
                            extra_prime=extra)
                results[f"{peft} inner-lr {lr} inner-steps {steps}"] = json.loads(f.read_text())["results"]["average"]["f1"]
    none = {peft: json.loads(one_run(args, runs, peft, "no priming", 0, eval_langs=args.priming_langs,
                                     split="dev").read_text())["results"]["average"]["f1"] for peft in args.pefts.split(",")}
    lines = ["| setting | de/es dev F1 |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in results.items()]
    lines += [f"| {p} no priming | {v:.2f} |" for p, v in none.items()]
    (out / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    args = build_parser().parse_args()
    out = Path(args.out or f"results/{args.budget}")
    runs = Path(args.runs) if args.runs else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    if args.search:
        return search(args, out, runs)
    langs = args.langs.split(",")
    overlap = set(langs) & set(args.priming_langs.split(","))
    if overlap:
        raise SystemExit(f"error: {','.join(sorted(overlap))} is both a priming and a target language: not zero-shot")
    conditions = args.conditions.split(",") if args.conditions else list(CONDITIONS)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise SystemExit(f"error: unknown condition(s) {unknown}; known: {list(CONDITIONS)}")
    # Run order: the main rows first (they answer the question), then the ablations, then full FT;
    # the table is rewritten after every row, so an interrupted comparison still leaves one.
    rows = [(peft, c) for main in (True, False) for peft in args.pefts.split(",") for c in conditions
            if (c in MAIN_ROWS) == main]
    rows += [] if args.no_full else [FULL_ROW]
    table, row_runs = {}, {}
    for peft, condition in rows:
        if (peft, condition) == FULL_ROW:
            files = [one_run(args, runs, "full", "no priming", s) for s in range(args.full_seeds)]
        else:
            seeds = args.seeds if condition in MAIN_ROWS else args.ablation_seeds
            files = [one_run(args, runs, peft, condition, s) for s in range(seeds)]
        table[(peft, condition)], row_runs[(peft, condition)] = collect(files, langs), [f.parent for f in files]
        order = sorted(table, key=rows_order(args.pefts.split(","), conditions))
        table, row_runs = {row: table[row] for row in order}, {row: row_runs[row] for row in order}
        write_table(table, langs, out)
    add_body_change(table, row_runs, args.model)
    write_table(table, langs, out)
    plot_f1(table, out / "f1.png")
    plot_curves(row_runs, out / "curves.png")
    print(markdown(table, langs))
    print(f"written: {out}/table.md, results.json, f1.png, curves.png")


if __name__ == "__main__":
    main()
