"""The comparison's report (compare.py): what finished runs scored, their paired differences,
and the table that says where every number comes from.

    runs_of_row = [read_run(f) for f in eval_files]      # scores, fine-tuning seed, commits, folders
    table = {(peft, condition): collect(runs_of_row, ["fr", "nl", "pt"]), ...}
    write_results(table, paired_rows(table, primed_conditions), langs, args, out)   # table.md, results.json
"""

import json
from pathlib import Path

from runs import read_record
from stats import mean_std, paired_difference


def read_run(result):
    """One finished run: its scores, fine-tuning seed, code versions and folders."""
    scores = json.loads(Path(result).read_text())
    tuned = Path(result).parent
    record = read_record(tuned) or {}
    primed = (record.get("init_record") or {})
    versions = {record.get("code_version"), primed.get("code_version"), scores.get("code_version")} - {None}
    return {"results": scores["results"], "finetune_seed": record.get("args", {}).get("seed"),
            "versions": sorted(versions), "tuned": tuned,
            "primed": Path(record["init_path"]) if primed else None, "body_change": primed.get("body_change")}


def collect(runs_of_row, langs):
    """Per language and average: mean and std of F1 (seqeval default) over the row's runs, and
    the average F1 per fine-tuning seed (mean over priming seeds), the input of the pairing."""
    row = {lang: mean_std([r["results"][lang]["f1_default"] for r in runs_of_row]) for lang in [*langs, "average"]}
    by_seed = {}
    for r in runs_of_row:
        by_seed.setdefault(r["finetune_seed"], []).append(r["results"]["average"]["f1_default"])
    row["by_finetune_seed"] = {s: sum(v) / len(v) for s, v in sorted(by_seed.items())}
    row["runs"] = len(runs_of_row)
    row["sentences"] = sorted({r["results"][lang]["sentences"] for r in runs_of_row for lang in langs})
    row["code_versions"] = sorted({v for r in runs_of_row for v in r["versions"]})
    return row


def paired_rows(table, primed):
    """Each primed condition (in `primed`) against no priming of the same PEFT, MAML against MTL
    priming, and each ablation against the MAML priming it removes one piece of (the paper's
    ablation question: what does that piece add?)."""
    pairs = []
    for (peft, condition), row in table.items():
        base = (peft, "no priming")
        if condition in primed and base in table:
            pairs.append(((peft, condition), base))
        if condition == "MAML priming" and (peft, "MTL priming") in table:
            pairs.append(((peft, condition), (peft, "MTL priming")))
        if condition.startswith("ablation:") and (peft, "MAML priming") in table:
            pairs.append(((peft, condition), (peft, "MAML priming")))
    differences = {f"{peft} | {cond} vs {other}": paired_difference(table[(peft, cond)]["by_finetune_seed"],
                                                                     table[(peft, other)]["by_finetune_seed"])
                   for (peft, cond), (_, other) in pairs}
    return {name: d for name, d in differences.items() if d is not None}  # None: no seed finished in both rows


def markdown(table, langs):
    header = "| PEFT | condition | runs | " + " | ".join(langs) + " | average |"
    rows = [header, "|---|---|---:|" + "---:|" * (len(langs) + 1)]
    changes = any("body_change" in r for r in table.values())
    if changes:  # how far priming moved the body (add_body_change)
        rows = [rows[0] + " body change |", rows[1] + "---:|"]
    for (peft, condition), r in table.items():
        cells = " | ".join(f"{r[l][0]:.2f} ± {r[l][1]:.2f}" if r["runs"] > 1 else f"{r[l][0]:.2f}"  # 1 run: no std
                           for l in [*langs, "average"])
        change = (f" {r['body_change']:.1e} |" if "body_change" in r else " - |") if changes else ""
        rows.append(f"| {peft} | {condition} | {r['runs']} | {cells} |{change}")
    return "\n".join(rows)


def paired_markdown(paired):
    # names are "PEFT | condition vs baseline" (paired_rows): two cells
    rows = ["| PEFT | comparison | seeds | mean difference | 95% CI | half-width | seeds favouring | sd of differences |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, d in paired.items():
        ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
        half = f"{d['half_width']:.2f}" if d["half_width"] is not None else "-"
        rows.append(f"| {name} | {d['n']} | {d['mean']:+.2f} | {ci} | {half} | {d['favour']} of {d['n']} | {d['sd']:.2f} |")
    return "\n".join(rows)


def dose_markdown(table, paired, doses):
    """The dose-response: average target F1 after 0, ..., N meta-steps of MAML priming, per PEFT.
    doses: [(condition, meta-steps)], from "no priming" (0) to the full MAML row."""
    rows = ["| PEFT | meta-steps | condition | average F1 | minus no priming (95% CI) | body change |",
            "|---|---:|---|---:|---:|---:|"]
    for peft in dict.fromkeys(p for p, _ in table):
        for condition, steps in doses:
            r = table.get((peft, condition))
            if r is None:
                continue
            d = paired.get(f"{peft} | {condition} vs no priming")
            diff = (f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d and d["ci95"]
                    else "0" if condition == "no priming" else "-")
            change = f"{r['body_change']:.1e}" if "body_change" in r else "-"
            rows.append(f"| {peft} | {steps} | {condition} | {r['average'][0]:.2f} | {diff} | {change} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def provenance(table, args):
    """What a reader must know next to the numbers: F1 mode, test size, budget, commits."""
    sentences = sorted({n for r in table.values() for n in r["sentences"]})
    versions = sorted({v for r in table.values() for v in r["code_versions"]})
    lines = [f"F1: seqeval default mode (conlleval-like, as XTREME), average of {', '.join(args.langs.split(','))}; "
             f"test sentences per language: {', '.join(map(str, sentences))}"
             f"{' (the full test sets)' if args.eval_sentences is None else f' (--eval-sentences {args.eval_sentences})'}.",
             f"Budget: {args.budget}; model: {args.model}; priming seeds {args.priming_seeds}, fine-tuning seeds "
             f"{args.finetune_seeds} (ablations {args.ablation_finetune_seeds})."]
    if len(versions) > 1:
        lines.append(f"**The rows come from different commits: {', '.join(versions)}** (see results.json).")
    else:
        lines.append(f"Code version of every run: {', '.join(versions)}.")
    return lines


def write_results(table, paired, langs, args, out, doses=()):
    text = "\n".join(provenance(table, args)) + "\n\n" + markdown(table, langs) + "\n"
    if paired:
        text += "\nPaired differences of average target F1 (condition minus baseline, same fine-tuning seeds):\n\n"
        text += paired_markdown(paired) + "\n"
    dose = dose_markdown(table, paired, doses)
    if dose:
        text += "\nDose-response: MAML priming after 0, ..., N meta-steps (same fine-tuning seeds):\n\n" + dose + "\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "provenance": provenance(table, args),
        "rows": {f"{p} | {c}": {k: v for k, v in r.items()} for (p, c), r in table.items()},
        "paired": paired}, indent=1, default=str))


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
    """The mean body change of each primed row's priming runs, in the table's results: as the
    priming run recorded it, else measured from its weights (runs of older code)."""
    for row, runs_of_row in row_runs.items():
        recorded = {r["primed"]: r["body_change"] for r in runs_of_row if r["primed"] is not None}
        changes = [change if change is not None else body_change(f, model) for f, change in sorted(recorded.items())
                   if change is not None or (f / "model.safetensors").is_file()]
        if changes and None not in changes:
            table[row]["body_change"] = sum(changes) / len(changes)
