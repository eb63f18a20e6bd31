"""The comparison's report (compare.py): what finished runs scored, their paired differences,
and the table that says where every number comes from.

    runs_of_row = [read_run(f) for f in eval_files]      # scores, fine-tuning seed, commits, folders
    table = {(peft, condition): collect(runs_of_row, ["fr", "nl", "pt"]), ...}
    write_results(table, paired_rows(table, primed_conditions), langs, args, out)   # table.md, results.json
"""

import contextlib
import json
from pathlib import Path

from experiments.compare_conditions import OPT_IN
from experiments.stats import holm, mean_std, priming_sd, two_level_difference
from plumbing.files import read_json_object, remove_stale_temporaries, write_atomic
from plumbing.runs import read_metrics, read_record

# what to do about a finished run's log with a damaged line (a finished run never leaves one: its last line is
# written before its record says "finished")
METRICS_FIX = "remove that line by hand, or delete the run's folder: compare.py runs it again"
RESULTS = ("table.md", "results.json")  # what write_results writes into --out


def read_run(result):
    """One finished run: its scores, priming and fine-tuning seeds, code versions, folders and
    the seconds its priming took (the sum of the meta-steps' times in the priming run's log)."""
    scores = read_scores(result)
    tuned = Path(result).parent
    record = read_record(tuned) or {}
    primed = (record.get("init_record") or {})
    versions = {record.get("code_version"), primed.get("code_version"), scores.get("code_version")} - {None}
    primed_folder = primed_folder_of(record, tuned) if primed else None
    return {"results": scores["results"], "finetune_seed": record.get("args", {}).get("seed"),
            "priming_seed": primed.get("args", {}).get("seed") if primed else None,
            "versions": sorted(versions), "tuned": tuned, "primed": primed_folder,
            "body_change": primed.get("body_change"), "priming_seconds": priming_seconds(primed_folder),
            "exposure": data_exposure(primed.get("args") if primed else None, record.get("args", {}))}


def read_scores(result):
    """An evaluation's JSON, or one line naming it: a damaged one (not JSON, not an object of scores) is
    evaluated again once it is gone, as any evaluation that is not there."""
    fix = "delete it and re-run compare.py, which evaluates that run again"
    scores = read_json_object(result, fix)
    if not isinstance(scores.get("results"), dict):
        raise ValueError(f"{result} is damaged (it holds no \"results\" of evaluate_ner.py): {fix}")
    return scores


def data_exposure(priming, tuning):
    """Labelled priming-language sentences a row's training saw and the passes over their pool
    (priming: --max-sentences of each priming language), from the runs' recorded flags; None where
    the batches are by tokens (--max-tokens) and so not a fixed count of sentences.
    - primed rows: every (meta-)step reads tasks-per-step query batches of batch-size sentences in
      the priming languages (MTL priming trains on the same batches); --query same: none;
    - multi-source fine-tuning: batches drawn from en (--max-sentences) plus the pool
      (--extra-sentences per extra language): the expected share of steps x batch-size ("expected");
    - no priming: 0."""
    try:
        return _data_exposure(priming, tuning)
    except (KeyError, TypeError, AttributeError):   # a record of older code without these flags
        return None


def _data_exposure(priming, tuning):
    if priming:
        if priming.get("max_tokens") or priming.get("query") == "same":
            return None if priming.get("max_tokens") else {"sentences": 0, "passes": 0.0, "expected": False}
        seen = priming["steps"] * priming["tasks_per_step"] * priming["batch_size"]
        pool = priming["max_sentences"] * len(priming["priming_langs"].split(","))
        return {"sentences": seen, "passes": seen / pool, "expected": False}
    if tuning.get("extra_langs"):
        if tuning.get("max_tokens"):
            return None
        pool = tuning["extra_sentences"] * len(tuning["extra_langs"].split(","))
        seen = tuning["steps"] * tuning["batch_size"] * pool / (tuning["max_sentences"] + pool)
        return {"sentences": round(seen), "passes": seen / pool, "expected": True}
    return {"sentences": 0, "passes": 0.0, "expected": False}


def primed_folder_of(record, tuned):
    """The primed body a fine-tuned run started from: its recorded folder's name in the runs folder the
    fine-tuned run sits in (compare.py keeps both there; a fresh checkout restores both from
    --records), else the recorded path. The recorded path alone names the machine that ran it."""
    recorded = Path(record["init_path"])
    beside = Path(tuned).parent / recorded.name
    return beside if beside.exists() else recorded


def priming_seconds(primed):
    """Seconds of the meta-steps of a priming run (its metrics.jsonl), or None (no priming, no log)."""
    log = Path(primed) / "metrics.jsonl" if primed else None
    if log is None or not log.is_file():
        return None
    return sum(line.get("seconds", 0.0) for line in read_metrics(log, METRICS_FIX))


def collect(runs_of_row, langs):
    """Per language and average: mean and std of F1 (seqeval default) over the row's balanced runs
    (balanced_runs: each priming run weighted equally, as the paired differences weight it); the
    average F1 of every (priming seed, fine-tuning seed), the input of the pairing (priming seed
    None for unprimed rows); sigma_p, the spread between priming runs; the priming time of its fastest priming run."""
    balanced = balanced_runs(runs_of_row)
    row = {lang: mean_std([r["results"][lang]["f1_default"] for r in balanced]) for lang in [*langs, "average"]}
    row["scores"] = {(r["priming_seed"], r["finetune_seed"]): r["results"]["average"]["f1_default"]
                     for r in sorted(runs_of_row, key=lambda r: (r["priming_seed"] or 0, r["finetune_seed"]))}
    row["priming_runs"] = len({p for p, _ in row["scores"] if p is not None})
    row["priming_sd"] = priming_sd(row["scores"])
    # the fastest priming run: wall time only grows with what else the machine runs at the time
    seconds = {r["primed"]: r["priming_seconds"] for r in runs_of_row if r["priming_seconds"] is not None}
    row["priming_seconds"] = min(seconds.values()) if seconds else None
    row["runs"], row["runs_in_means"] = len(runs_of_row), len(balanced)
    row["exposure"] = runs_of_row[0].get("exposure")   # the same flags in every run of a row
    row["sentences"] = sorted({r["results"][lang]["sentences"] for r in runs_of_row for lang in langs})
    row["code_versions"] = sorted({v for r in runs_of_row for v in r["versions"]})
    return row


def balanced_runs(runs_of_row):
    """The runs a row's means are over: of a primed row, those of the fine-tuning seeds every priming run
    has (priming run 0 has 5 seeds, the replicates 2: all runs would weight run 0 more than the paired
    differences do, stats.two_level_difference); of an unprimed row, all. With no seed common to every
    priming run, all runs (the pairing then falls back to one priming run too)."""
    by_p = {}
    for r in runs_of_row:
        by_p.setdefault(r["priming_seed"], set()).add(r["finetune_seed"])
    common = set.intersection(*by_p.values())
    if None in by_p or not common:
        return runs_of_row
    return [r for r in runs_of_row if r["finetune_seed"] in common]


def paired_rows(table, baselines):
    """Every row against each of its baselines of the same PEFT (compare_conditions.baselines_of: no
    priming; MAML against MTL priming; each ablation against the MAML priming it removes one
    piece of; primings against the multi-source fine-tuning), as stats.two_level_difference:
    over priming runs where a row has several; with its family and Holm-adjusted p (add_holm)."""
    pairs = [((peft, condition), (peft, base)) for peft, condition in table
             for base in baselines(condition) if (peft, base) in table]
    differences = {f"{peft} | {cond} vs {other}": two_level_difference(table[(peft, cond)]["scores"],
                                                                        table[(peft, other)]["scores"])
                   for (peft, cond), (_, other) in pairs}
    families = {f"{peft} | {cond} vs {other}": family_of(peft, cond, table[(peft, other)])
                for (peft, cond), (_, other) in pairs}
    paired = {name: d for name, d in differences.items() if d is not None}  # None: no seed finished in both rows
    return add_holm(paired, families)


FAMILIES = {"primed vs primed": "MAML vs MTL, equal compute vs MTL, the ablations vs MAML",
            "primed vs unprimed": "every comparison against no priming or multi-source, multi-source vs no priming too",
            "implicit rows": "every comparison of an implicit row"}


def family_of(peft, condition, baseline_row):
    """The family a comparison's Holm adjustment is within, per PEFT: the implicit rows (every comparison of
    an implicit row), against an unprimed row (no priming, multi-source; multi-source vs no priming too),
    else primed vs primed (MAML vs MTL, the ablations vs MAML, equal compute vs MTL)."""
    unprimed = all(p is None for p, _ in baseline_row["scores"])
    kind = "implicit rows" if condition in OPT_IN else "primed vs unprimed" if unprimed else "primed vs primed"
    return f"{peft}: {kind}"


def add_holm(paired, families):
    """Each comparison's family, the family's size (the intervals with a p) and Holm-adjusted p."""
    for family in set(families.values()):
        members = {name: d["p"] for name, d in paired.items() if families[name] == family}
        adjusted = holm(members)
        for name in members:
            paired[name].update(family=family, family_size=len(adjusted), holm_p=adjusted.get(name))
    return paired


def markdown(table, langs):
    """One row per condition: runs (and how many of them the means are over: balanced_runs) and priming
    runs, F1 mean ± std over the balanced runs, sigma_p, the priming cost (seconds of meta-steps of the
    fastest priming run; F1 gained over no priming per priming hour), the labelled priming-language
    sentences seen (data_exposure) and, where known, how far priming moved the body."""
    header = ("| PEFT | condition | runs (in the means) | priming runs | " + " | ".join(langs)
              + " | average | σp | priming s | F1 / priming h | priming-language sentences (passes) |")
    rows = [header, "|---|---|---:|---:|" + "---:|" * (len(langs) + 5)]
    changes = any("body_change" in r for r in table.values())
    if changes:  # how far priming moved the body (add_body_change)
        rows = [rows[0] + " body change |", rows[1] + "---:|"]
    for (peft, condition), r in table.items():
        in_means = r.get("runs_in_means", r["runs"])
        # 1 run: no std
        cells = " | ".join(f"{r[lang][0]:.2f} ± {r[lang][1]:.2f}" if in_means > 1 else f"{r[lang][0]:.2f}"
                           for lang in [*langs, "average"])
        sigma = "-" if r.get("priming_sd") is None else "0*" if r["priming_sd"] == 0 else f"{r['priming_sd']:.2f}"
        seconds, per_hour = "-", "-"
        if r.get("priming_seconds"):
            seconds = f"{r['priming_seconds']:.0f}"
            base = table.get((peft, "no priming"))
            if base is not None:
                per_hour = f"{(r['average'][0] - base['average'][0]) / (r['priming_seconds'] / 3600):+.1f}"
        change = (f" {r['body_change']:.1e} |" if "body_change" in r else " - |") if changes else ""
        runs = f"{r['runs']}" if in_means == r["runs"] else f"{r['runs']} ({in_means})"
        rows.append(f"| {peft} | {condition} | {runs} | {r.get('priming_runs', 0) or '-'} | {cells} | {sigma} "
                    f"| {seconds} | {per_hour} | {exposure_cell(r.get('exposure'))} |{change}")
    return "\n".join(rows)


def exposure_cell(exposure):
    """'3,200 (0.80)'; '~2,667 (0.67)' for an expected count; '-' where unknown."""
    if exposure is None:
        return "-"
    return f"{'~' if exposure['expected'] else ''}{exposure['sentences']:,} ({exposure['passes']:.2f})"


MIN_SIGN_COUNT = 5   # "k of n favour": only from 5 on; 3 of 3 is p = 0.25 in a two-sided sign test, 5 of 5 0.06


def paired_markdown(paired):
    """names are "PEFT | condition vs baseline" (paired_rows): two cells. "design" is priming runs x
    fine-tuning seeds; with one priming run the interval is over fine-tuning seeds only (no
    priming variance), else over priming runs (stats.two_level_difference)."""
    rows = ["| PEFT | comparison | priming runs x fine-tuning seeds | mean difference | 95% CI | half-width "
            "| favouring | sd of the interval's inputs | p | Holm p (family, size) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in paired.items():
        ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
        half = f"{d['half_width']:.2f}" if d["half_width"] is not None else "-"
        over = f"{d['favour_of']} priming runs" if d["priming_seeds"] > 1 else f"{d['n']} seeds"
        favour = f"{d['favour']} of {over}" if d.get("favour_of", d["n"]) >= MIN_SIGN_COUNT else "-"
        holm_p = f"{p_cell(d.get('holm_p'))} ({family_label(d)}, {d['family_size']})" if d.get("holm_p") is not None \
            else "-"
        rows.append(f"| {name} | {d['priming_seeds']} x {d['finetune_seeds']} | {d['mean']:+.2f} | {ci} | {half} "
                    f"| {favour} | {sd_cell(d)} | {p_cell(d.get('p'))} | {holm_p} |")
    return "\n".join(rows)


def family_label(d):
    return d["family"].split(": ", 1)[1]   # the PEFT is the row's first cell


def p_cell(p):
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def sd_cell(d):
    """The sd of what the interval is over, named: D_p (priming runs' mean differences), d_f (one priming
    run's seed differences), or X_p and y (Welch: the primed row's priming-run means, the unprimed row's seeds)."""
    if "baseline_seeds" in d:
        return f"X_p {d['sd']:.2f}, y {d['baseline_sd']:.2f}"
    return f"{d['sd']:.2f} ({'D_p' if d['priming_seeds'] > 1 else 'd_f'})"


PAIRED_LEGEND = (
    "favouring: how many priming runs (or seeds) favour the condition, shown from {n} on (a sign test on n of them "
    "cannot go below p = 2^(1-n): 0.25 at 3, 0.06 at 5). sd of the interval's inputs: D_p, a priming run's mean "
    "paired difference (primed vs primed); d_f, a fine-tuning seed's paired difference (one priming run); X_p and "
    "y, the primed row's priming-run means and the unprimed row's seeds (Welch). p: two-sided t test of a zero "
    "difference (the interval excludes 0 exactly when p < 0.05). Holm p: adjusted for the comparisons of its family "
    "(size: how many), per PEFT: {families}.")


def survival_lines(paired):
    """Which intervals that exclude 0 survive Holm within their family (adjusted p < 0.05), and which do not."""
    excluding = [name for name, d in paired.items() if d.get("p") is not None and d["p"] < 0.05]
    survive = [name for name in excluding if paired[name]["holm_p"] < 0.05]
    fall = [f"{name} (p {p_cell(paired[name]['p'])}, Holm {p_cell(paired[name]['holm_p'])})"
            for name in excluding if name not in survive]
    return [f"Intervals that exclude 0 and survive Holm within their family: {'; '.join(survive) or 'none'}.",
            f"Intervals that exclude 0 but do not survive it: {'; '.join(fall) or 'none'}."]


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
    scope = " (the full test sets)" if args.eval_sentences is None else f" (--eval-sentences {args.eval_sentences})"
    lines = [f"F1: seqeval default mode (conlleval-like, as XTREME), average of {', '.join(args.langs.split(','))}; "
             f"test sentences per language: {', '.join(map(str, sentences))}"
             f"{scope}.",
             f"Budget: {args.budget}; model: {args.model}; priming seeds {args.priming_seeds}, fine-tuning seeds "
             f"{args.finetune_seeds} (ablations {args.ablation_finetune_seeds}"
             + (f"; priming runs after the first: {args.replicate_finetune_seeds} each"
                if getattr(args, "replicate_finetune_seeds", None) else "") + ")."]
    if len(versions) > 1:
        lines.append(f"**The rows come from different commits: {', '.join(versions)}** (see results.json).")
    else:
        lines.append(f"Code version of every run: {', '.join(versions)}.")
    return lines


def write_results(table, paired, langs, args, out, doses=()):
    text = "\n".join(provenance(table, args)) + "\n\n" + markdown(table, langs) + "\n"
    text += ("\nMeans ± sd over the runs in the means: of a primed row, the fine-tuning seeds every priming run has "
             "(each priming run weighted equally, as in the paired differences; rows with other priming runs pair "
             "only the runs both have); of an unprimed row, all its runs.\n")
    if any(r.get("priming_sd") is not None for r in table.values()):
        text += ("\nσp: the sd of F1 between priming runs net of fine-tuning noise (two-way ANOVA over the fine-tuning "
                 "seeds every priming run has); 0*: the priming runs' means differ no more than fine-tuning noise "
                 "explains (the estimate is floored at 0).\n")
    if paired:
        text += ("\nPaired differences of average target F1 (condition minus baseline; same fine-tuning seeds, and "
                 "same priming seeds where both rows are primed). Rows with several priming runs: the interval is over "
                 "priming runs and holds their variance (σp in the table above); with 1 priming run it is over "
                 "fine-tuning seeds only and holds none:\n\n")
        text += paired_markdown(paired) + "\n\n"
        families = "; ".join(f"{name} ({what})" for name, what in FAMILIES.items())
        text += PAIRED_LEGEND.format(n=MIN_SIGN_COUNT, families=families) + "\n\n"
        text += "\n".join(survival_lines(paired)) + "\n"
    dose = dose_markdown(table, paired, doses)
    if dose:
        text += "\nDose-response: MAML priming after 0, ..., N meta-steps (same fine-tuning seeds):\n\n" + dose + "\n"
    results = json.dumps({
        "provenance": provenance(table, args),
        "rows": {f"{p} | {c}": {k: v if k != "scores" else {f"p{ps}-f{fs}": x for (ps, fs), x in v.items()}
                                for k, v in r.items()} for (p, c), r in table.items()},
        "paired": paired}, indent=1, default=str)
    with results_lock(out):  # every compare.py writing into --out holds it: a temporary left now is a kill's
        remove_stale_temporaries(out, RESULTS)
        write_atomic(out / "table.md", lambda tmp: Path(tmp).write_text(text))
        write_atomic(out / "results.json", lambda tmp: Path(tmp).write_text(results))


@contextlib.contextmanager
def results_lock(out):
    """A lock on the folder --out itself (no lock file beside the results), held while the table and
    results are written: a second compare.py on the same --out waits a moment for it."""
    import fcntl
    import os
    folder = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


def primed_body_change(primed, model):
    """How far priming moved the body: ||theta' - theta|| / ||theta|| over its non-embedding
    weights (the embeddings are 80% of e5-small and barely move). None where the original
    weights are not a local safetensors file (a hub id)."""
    from safetensors.torch import load_file

    from plumbing import pretrained
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
        changes = [change if change is not None else primed_body_change(f, model)
                   for f, change in sorted(recorded.items())
                   if change is not None or (f / "model.safetensors").is_file()]
        if changes and None not in changes:
            table[row]["body_change"] = sum(changes) / len(changes)
