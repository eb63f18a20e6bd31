"""The paper's comparison: does priming help PEFT, and which MAML modification matters?

    python experiments/compare.py --data-dir ../shared/data/wikiann              # the CPU budget (RESULTS.md's verdict)
    python experiments/compare.py --pefts adapter --conditions "no priming,MAML priming" --finetune-seeds 8
    python experiments/compare.py --gpu 0 --budget gpu --model xlm-roberta-base  # a larger budget on a GPU
    python experiments/compare.py --langs es,nl --eval-data-dir conll2002 --eval-data-format conll --eval-tag-map MISC=O

Runs the three stages for every condition and seed, then writes into --out:
  table.md / results.json   target-language F1 (fr, nl, pt test, seqeval default mode) per condition (priming
                            runs weighted equally), and paired differences with 95% CIs, p and Holm p within
                            each family of comparisons (baselines_of: each primed row against no
                            priming; MAML against MTL and MTL at MAML's compute; both primings against
                            multi-source; ablations against MAML; the implicit rows against MTL and MAML)
  f1.png, paired.png        average target F1 by condition; paired differences with their CIs
  curves.png                learning curves: held-out query loss in priming, en dev F1 in fine-tuning
Conditions, for each --pefts method: no priming, MTL priming, MAML priming, and the ablations
(inner loop on all parameters, same-language query, first order, outer update of the initial
PEFT tensors), a dose-response row (MAML priming with 1/4 of the meta-steps; the full dose is
the MAML row, zero is no priming), multi-source fine-tuning (no priming; en + the priming languages),
MTL priming at MAML's compute, and, only when --conditions names them, implicit MAML priming and its
first-order variant; full fine-tuning is a reference row. Every primed body (--priming-seeds) is
fine-tuned with every fine-tuning seed (--finetune-seeds; --ablation-finetune-seeds for the
ablations); fine-tuning seed s is the same fresh PEFT draw and data order in every row, so rows
compare paired, seed by seed. MTL and MAML priming get the same data and optimizer steps.

The conditions and budgets are compare_conditions.py's; which run folder a run is (its identity hash: the
flags that shape it), whether it is done, and running its stage are compare_runs.py's. An interrupted
comparison continues where it stopped; two compare.py processes on one --runs folder share the work
(a lock per run).
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for python experiments/compare.py
from experiments import compare_runs  # noqa: E402
from experiments.compare_conditions import (  # noqa: E402
    BUDGETS,
    CONDITIONS,
    DOSES,
    EQUAL_COMPUTE,
    EQUAL_COMPUTE_FACTOR,
    FIRST,
    FULL_FT_LR,
    FULL_ROW,
    MULTI_SOURCE,
    OPT_IN,
    SOURCE_LANG,
    baselines_of,
    budget_steps,
    dose_ladder,
)
from experiments.compare_report import add_body_change, collect, paired_rows, read_run, write_results  # noqa: E402
from experiments.stats import seeds_for_half_width  # noqa: E402
from plumbing.cli import HelpFormatter, run_cli  # noqa: E402
from plumbing.conll import parse_tag_map  # noqa: E402
from plumbing.ner_data import DATA_FORMATS, parse_languages, resolve_data_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the project root: where results go by default


def build_parser():
    p = argparse.ArgumentParser(description="Run the priming comparison and write its table and plots.",
                                formatter_class=HelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="stage flags per run (see BUDGETS)")
    p.add_argument("--pefts", default="adapter,prefix", help="PEFT methods to compare")
    p.add_argument("--priming-seeds", type=int, default=1,
                   help="priming runs per primed condition (seeds 0..N-1); with 2 or more, differences between rows "
                        "are tested over priming runs (stats.two_level_difference; against an unprimed row: the "
                        "priming-run means against the baseline's mean over all its seeds, Welch)")
    p.add_argument("--replicate-finetune-seeds", type=int, default=None,
                   help="fine-tuning seeds (0..N-1) of priming seeds 1.. (default: as many as priming seed 0 gets): "
                        "e.g. 5 priming runs x 2 fine-tuning seeds, seed 0 keeping its 5")
    p.add_argument("--finetune-seeds", type=int, default=5,
                   help="fine-tuning seeds of the main rows (0..N-1), the same in every row: the pairing")
    p.add_argument("--ablation-finetune-seeds", type=int, default=3, help="fine-tuning seeds of the ablation rows")
    p.add_argument("--full-seeds", type=int, default=1, help="seeds of the full fine-tuning reference row")
    p.add_argument("--conditions", default=None,
                   help="comma-separated subset of the conditions (default: all but the implicit rows, which "
                        "run only when named): " + ", ".join(CONDITIONS))
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning reference row")
    p.add_argument("--langs", default="fr,nl,pt", help="target languages (never priming languages nor en)")
    p.add_argument("--priming-langs", default="de,es", help="priming languages")
    p.add_argument("--eval-sentences", type=int, default=None,
                   help="score only the first N test sentences per language (default: the full test sets)")
    p.add_argument("--inner-lr", type=float, default=None,
                   help="inner learning rate of the MAML rows (default: the budget's)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps of the MAML rows (default: the budget's)")
    p.add_argument("--model", default="e5-small", help="the pretrained model (name, folder or hub id)")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub)")
    p.add_argument("--eval-data-dir", default=None,
                   help="the folder of the target languages' test data (default: --data-dir)%(default).0s")
    p.add_argument("--eval-data-format", choices=DATA_FORMATS, default="panx",
                   help="format of --eval-data-dir: panx, or conll (CoNLL columns; see evaluate_ner.py --help)")
    p.add_argument("--eval-tag-map", default=None,
                   help="with --eval-data-format conll: entity types to rename, e.g. MISC=O "
                        "(evaluate_ner.py --tag-map)")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    p.add_argument("--out", default=None, help="results folder (default: experiments/results/<budget>)")
    p.add_argument("--runs", default=None, help="where the stage checkpoints go (default: <out>/runs)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the table and plots from the runs finished so far (safe beside running "
                        "compare.py processes)")
    p.add_argument("--records", default=None,
                   help="where every finished run's records (run.json, metrics, scores; no weights) are mirrored, "
                        "to commit with the results: a fresh checkout continues from them (default: <out>/records)")
    return p


def check_args(args):
    """One clear error per bad flag, before anything runs."""
    for flag in ["priming_seeds", "finetune_seeds", "ablation_finetune_seeds", "full_seeds",
                 "replicate_finetune_seeds"]:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if args.inner_steps is not None and args.inner_steps < 1:
        raise ValueError(f"--inner-steps must be at least 1 (got {args.inner_steps}); leave it out for the budget's")
    if args.inner_lr is not None and not 0 < args.inner_lr < float("inf"):
        raise ValueError(f"--inner-lr must be a positive number (got {args.inner_lr}); leave it out for the budget's")
    if args.eval_sentences is not None and args.eval_sentences < 1:
        raise ValueError(f"--eval-sentences must be at least 1 (got {args.eval_sentences}); "
                         f"leave it out for the full test sets")
    langs, priming = parse_languages(args.langs), parse_languages(args.priming_langs, "--priming-langs")
    overlap = sorted(set(langs) & (set(priming) | {SOURCE_LANG}))
    if overlap:
        raise ValueError(f"{','.join(overlap)} is both a priming or source language and a target language: "
                         f"not zero-shot; choose --langs outside {','.join(priming + [SOURCE_LANG])}")
    conditions = ([c.strip() for c in args.conditions.split(",")] if args.conditions
                  else [c for c in CONDITIONS if c not in OPT_IN])
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; known: {', '.join(CONDITIONS)}")
    data_dir = resolve_data_dir(args.data_dir)  # $WIKIANN_DIR included, made absolute: part of run identity
    args.data_dir = str(data_dir.resolve()) if data_dir else None
    check_eval_data(args)
    return langs, conditions


def check_eval_data(args):
    """The evaluation's data flags, as evaluate_ner.py would check them (made absolute: run identity)."""
    if args.eval_data_format == "conll" and not args.eval_data_dir:
        raise ValueError("--eval-data-format conll needs --eval-data-dir: the folder of <lang>/test CoNLL files")
    if args.eval_tag_map and args.eval_data_format != "conll":
        raise ValueError("--eval-tag-map applies to --eval-data-format conll only")
    parse_tag_map(args.eval_tag_map)
    if args.eval_data_dir:
        args.eval_data_dir = str(resolve_data_dir(args.eval_data_dir).resolve())


# ----------------------------------------------------------------------------- the plan: each run's flags and folder

def device_flags(args):
    return ["--gpu", str(args.gpu)] if args.gpu is not None else []


def data_flags(args):
    return ["--data-dir", args.data_dir] if args.data_dir else []


def eval_data_flags(args):
    """The evaluation's data flags: --data-dir's unless --eval-data-* say otherwise (then, and only
    then, they join the evaluation's identity, so existing evaluations keep theirs)."""
    flags = ["--data-dir", args.eval_data_dir] if args.eval_data_dir else data_flags(args)
    if args.eval_data_format != "panx":
        flags += ["--data-format", args.eval_data_format]
    return flags + (["--tag-map", args.eval_tag_map] if args.eval_tag_map else [])


def prime_plan(args, runs, peft, condition, seed):
    """(flags, folder) of the priming run of (condition, priming seed)."""
    flags = ["--model", args.model, *data_flags(args), *BUDGETS[args.budget]["prime"], "--peft", peft,
             "--seed", str(seed), "--source-lang", SOURCE_LANG, "--priming-langs", args.priming_langs,
             *CONDITIONS[condition], *maml_overrides(args, condition), *dose_steps(args, condition),
             *equal_compute_steps(args, peft, condition)]
    folder = runs / f"primed-{peft}-{slug(condition)}-p{seed}-{compare_runs.run_hash(flags, runs)}"
    return flags, compare_runs.existing_run(folder, flags, runs)


def prime_condition(args, runs, peft, condition, seed, reference):
    """The primed body of (condition, priming seed): its folder, or None while another process runs it.
    reference: the unprimed fine-tuning run the priming run measures its inner-loop strength against."""
    flags, folder = prime_plan(args, runs, peft, condition, seed)
    extra = [*device_flags(args), "--reference-ft", str(reference)]  # logging only: not part of the identity
    done = compare_runs.run_stage("meta_pretrain.py", [*flags, "--out", str(folder)], folder / "run.json", extra,
                                  args.records)
    return folder if done else None


def dose_steps(args, condition):
    """--steps for a dose-response row: its fraction of the budget's meta-steps (the later flag wins)."""
    if condition not in DOSES:
        return []
    return ["--steps", str(max(1, round(budget_steps(args) * DOSES[condition])))]


def equal_compute_steps(args, peft, condition):
    """--steps of the equal-compute MTL row: the MTL steps that fit in MAML priming's time."""
    if condition != EQUAL_COMPUTE:
        return []
    return ["--steps", str(round(budget_steps(args) * EQUAL_COMPUTE_FACTOR[peft]))]


def maml_overrides(args, condition):
    """--inner-lr / --inner-steps of compare.py apply to the (unrolled) MAML rows only."""
    if "--method" in CONDITIONS[condition] or "--inner-loop" in CONDITIONS[condition]:
        return []
    return ((["--inner-lr", str(args.inner_lr)] if args.inner_lr else [])
            + (["--inner-steps", str(args.inner_steps)] if args.inner_steps else []))


def finetune_plan(args, runs, init, peft, seed, tag, condition=None):
    """(flags, folder) of a fine-tuning run of PEFT `peft` on the body `init` with fine-tuning seed `seed`."""
    flags = [*data_flags(args), *BUDGETS[args.budget]["finetune"], "--init", str(init), "--peft", peft,
             "--lang", SOURCE_LANG, "--seed", str(seed)]
    if condition == MULTI_SOURCE:  # appended: every other run keeps its identity
        prime = BUDGETS[args.budget]["prime"]
        flags += ["--extra-langs", args.priming_langs, "--extra-sentences", prime[prime.index("--max-sentences") + 1]]
    if peft == "full":  # the budgets' --lr is a PEFT rate; appended, it overrides and keeps the PEFT runs' identity
        flags += ["--lr", FULL_FT_LR]
    folder = runs / f"ft-{tag}-f{seed}-{compare_runs.run_hash(flags, runs)}"
    return flags, compare_runs.existing_run(folder, flags, runs)


def finetune(args, runs, init, peft, seed, tag, condition=None):
    """The fine-tuned folder, or None while another process runs it."""
    flags, folder = finetune_plan(args, runs, init, peft, seed, tag, condition)
    reference = str(init) == args.model and seed == 0 and peft != "full"  # its PEFT tensors go into --records
    done = compare_runs.run_stage("finetune_peft.py", [*flags, "--out", str(folder)], folder / "run.json",
                                  device_flags(args), args.records, weights=reference)
    return folder if done else None


def evaluate_plan(args, tuned, langs, split):
    """(flags, eval JSON) of a fine-tuned folder on `langs`; each language set and size is its own file."""
    flags = [*eval_data_flags(args), *BUDGETS[args.budget]["evaluate"], "--split", split, "--langs", ",".join(langs)]
    flags += ["--max-sentences", str(args.eval_sentences)] if args.eval_sentences else []
    result = Path(tuned) / f"eval-{split}-{compare_runs.run_hash(flags, tuned)}.json"
    return flags, compare_runs.existing_eval(result, flags, Path(tuned))


def evaluate_checkpoint(args, tuned, langs, split):
    """The eval JSON, or None while another process runs it."""
    flags, result = evaluate_plan(args, tuned, langs, split)
    done = compare_runs.run_stage("evaluate_ner.py", [*flags, "--ckpt", str(tuned), "--out", str(result)], result,
                     device_flags(args), args.records)
    return result if done else None


def slug(condition):
    """A condition as a folder-name part: letters and digits, runs of anything else as one _."""
    return re.sub(r"[^A-Za-z0-9]+", "_", condition.replace("ablation: ", "")).strip("_")


def one_run(args, runs, peft, condition, priming_seed, finetune_seed, langs, split="test"):
    """prime (unless no priming / full FT) -> fine-tune -> evaluate; the eval JSON, or None
    while another process is running one of its stages."""
    init, tag, primed = args.model, f"{peft}-{slug(condition)}", CONDITIONS[condition] is not None
    if primed:
        init = prime_plan(args, runs, peft, condition, priming_seed)[1]
        tag = init.name[len("primed-"):]
    tuned_out = finetune_plan(args, runs, init, peft, finetune_seed, tag, condition)[1]
    result = evaluate_plan(args, tuned_out, langs, split)[1]
    if compare_runs.finished(result):  # also when restored from --records, where the primed body's weights are gone
        return result
    if args.report_only:
        return None
    if primed:
        reference = finetune(args, runs, args.model, peft, 0, f"{peft}-no_priming")  # the no-priming row's seed 0
        if reference is None or prime_condition(args, runs, peft, condition, priming_seed, reference) is None:
            return None
    tuned = finetune(args, runs, init, peft, finetune_seed, tag, condition)
    return evaluate_checkpoint(args, tuned, langs, split) if tuned else None


def row_plan(args, peft, condition):
    """(priming seed, fine-tuning seed) pairs of one row."""
    if (peft, condition) == FULL_ROW:
        return [(0, f) for f in range(args.full_seeds)]
    finetune_seeds = args.finetune_seeds if condition in FIRST else args.ablation_finetune_seeds
    if CONDITIONS[condition] is None:
        return [(0, f) for f in range(finetune_seeds)]
    replicates = args.replicate_finetune_seeds or finetune_seeds
    return [(p, f) for p in range(args.priming_seeds) for f in range(finetune_seeds if p == 0 else replicates)]


def half_width_hint(name, d, target=0.7):
    """A line saying how many more replicates would narrow a wide interval to `target` F1, in the
    unit the interval is over: priming runs when it has several (stats.two_level_difference),
    else fine-tuning seeds. None when the interval is narrow enough, there is none, or it is over
    priming runs against an unprimed row (its width is not sd(D) alone)."""
    if d["n"] < 2 or d["half_width"] is None or d["half_width"] <= target:
        return None
    if d.get("baseline_seeds") is not None:
        return None   # against an unprimed row the width also holds the baseline's seeds: no simple count
    unit = "priming runs" if d["priming_seeds"] > 1 else "fine-tuning seeds"
    needed = seeds_for_half_width(d["sd"], target)
    return f"{name}: CI half-width {d['half_width']:.2f}; about {needed} {unit} would give {target}"


def check_no_fewer(path, table):
    """--report-only never replaces results with fewer: runs it cannot match (other flags, other data) read
    as not finished, and a table of them would hide the real one."""
    try:
        written = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no results yet, or none this script could read: nothing real to lose
    now = {f"{p} | {c}": row["runs"] for (p, c), row in table.items()}
    lost = [name for name, row in written.items() if isinstance(row, dict) and now.get(name, 0) < row.get("runs", 0)]
    if lost:
        raise ValueError(f"--report-only: the runs matching these flags would replace {path} with fewer "
                         f"({lost[0]}: {now.get(lost[0], 0)} run(s) here, {written[lost[0]]['runs']} there): give the "
                         f"flags and data (--data-dir) those runs were made with (table.md and results.json are "
                         f"left as they were)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    langs, conditions = check_args(args)
    out = Path(args.out or ROOT / "experiments" / "results" / args.budget)
    runs = Path(args.runs) if args.runs else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    args.records = Path(args.records) if args.records else out / "records"
    compare_runs.restore_records(args.records, runs)
    pefts = [p.strip() for p in args.pefts.split(",")]
    # Run order: the main and dose rows first (they answer the question), then the ablations, then full FT;
    # the table is rewritten after every row, so an interrupted comparison still leaves one.
    rows = [(peft, c) for main in (True, False) for peft in pefts for c in conditions if (c in FIRST) == main]
    rows += [] if args.no_full else [FULL_ROW]
    order = {row: i for i, row in enumerate([(p, c) for p in pefts for c in conditions] + [FULL_ROW])}
    table, row_runs, missing = {}, {}, 0
    for peft, condition in rows:
        run_peft, run_condition = ("full", "no priming") if (peft, condition) == FULL_ROW else (peft, condition)
        files = [one_run(args, runs, run_peft, run_condition, p, f, langs) for p, f in row_plan(args, peft, condition)]
        missing += files.count(None)
        finished = [read_run(f) for f in files if f is not None]
        if finished:
            row_runs[(peft, condition)] = finished
            table[(peft, condition)] = collect(finished, langs)
            table = {row: table[row] for row in sorted(table, key=order.get)}
            if not args.report_only:  # a report is written once, checked first (check_no_fewer)
                write_results(table, paired_rows(table, baselines_of), langs, args, out, dose_ladder(args))
    if args.report_only:
        check_no_fewer(out / "results.json", table)
    row_runs = {row: row_runs[row] for row in table}
    add_body_change(table, row_runs, args.model)
    paired = paired_rows(table, baselines_of)
    write_results(table, paired, langs, args, out, dose_ladder(args))
    from experiments import compare_plots
    compare_plots.plot_f1(table, out / "f1.png")
    compare_plots.plot_paired(paired, out / "paired.png")
    compare_plots.plot_curves(row_runs, CONDITIONS, out / "curves.png")
    print((out / "table.md").read_text())
    for name, d in paired.items():
        hint = half_width_hint(name, d)
        if hint:
            print(hint)
    if missing:
        print(f"{missing} run(s) not finished" + (" (--report-only)" if args.report_only else
              " (another compare.py is running them)") + ": re-run this command when they are for the full table")
    print(f"written: {out}/table.md, results.json, f1.png, paired.png, curves.png")


if __name__ == "__main__":
    run_cli(main)
