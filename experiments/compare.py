"""The paper's comparison: does priming help PEFT, and which MAML modification matters?

    python experiments/compare.py --data-dir ../shared/data/wikiann              # the CPU budget (RESULTS.md's verdict)
    python experiments/compare.py --pefts adapter --conditions "no priming,MAML priming" --finetune-seeds 8
    python experiments/compare.py --gpu 0 --budget gpu --model xlm-roberta-base  # a larger budget on a GPU
    python experiments/compare.py --langs es,nl --eval-data-dir conll2002 --eval-data-format conll --eval-tag-map MISC=O

Runs the three stages for every condition and seed, then writes into --out:
  table.md / results.json   target-language F1 (fr, nl, pt test, seqeval default mode) per condition,
                            and paired differences with 95% CIs (baselines_of: each primed row against no
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

Run identity: a run folder is named by what it is and a hash of every flag that shapes it
(model, data folder, budget, PEFT, priming flags, seed, languages) and of TRAINING_CODE, so a
run is reused only when all of them agree, and a changed flag makes a new run. Paths enter it by
name only (the data folder's, a primed body's folder), so a clone anywhere finds the committed records.
An interrupted comparison continues where it stopped; two compare.py processes on one --runs folder
share the work (a lock per run).
"""

import argparse
import functools
import hashlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for python experiments/compare.py
from experiments.compare_report import add_body_change, collect, paired_rows, read_run, write_results  # noqa: E402
from experiments.stats import seeds_for_half_width  # noqa: E402
from plumbing.conll import parse_tag_map  # noqa: E402
from plumbing.ner_data import DATA_FORMATS, files_sha256, parse_languages, resolve_data_dir  # noqa: E402
from plumbing.runs import (  # noqa: E402
    HelpFormatter,
    Stopped,
    is_finished,
    json_object_or_none,
    read_record,
    run_cli,
    try_lock,
    write_atomic,
)

ROOT = Path(__file__).resolve().parents[1]  # where the stage scripts are

# Budgets: the stage flags of each run. They spell out every flag that shapes a run (not the
# stages' defaults), so a changed default in a stage cannot silently change a comparison.
# The priming of every budget: the inner loop of the inner-loop search (0.3 x 5 steps: support loss
# to ~0.58 x) and the outer learning rate of the outer-loop pilot (RESULTS.md: 2e-4 diverges after 30
# meta-steps, 2e-5 is slower, 5e-5 keeps the held-out query loss falling to meta-step 200).
PRIME_SHAPE = ["--inner-steps", "5", "--inner-lr", "0.3", "--outer-lr", "5e-5"]
# Full fine-tuning (the reference row) takes finetune_peft.LR_FULL, not the budgets' PEFT rate: at 1e-3
# the whole encoder collapses (dev F1 0.0 at step 100; RESULTS.md).
FULL_FT_LR = "3e-5"
BUDGETS = {
    "cpu": {"prime": ["--steps", "200", "--tasks-per-step", "2", "--batch-size", "8", "--max-sentences", "2000",
                      *PRIME_SHAPE],
            "finetune": ["--steps", "1000", "--batch-size", "16", "--max-sentences", "20000", "--lr", "1e-3",
                         "--warmup", "0.1", "--eval-every", "100", "--dev-sentences", "1000"],
            "evaluate": []},
    "gpu": {"prime": ["--steps", "1000", "--tasks-per-step", "4", "--batch-size", "16", "--max-sentences", "20000",
                      *PRIME_SHAPE],
            "finetune": ["--steps", "3000", "--batch-size", "32", "--max-sentences", "20000", "--lr", "1e-3",
                         "--warmup", "0.1", "--eval-every", "300", "--dev-sentences", "10000"],
            "evaluate": []},
    "smoke": {"prime": ["--steps", "2", "--tasks-per-step", "1", "--batch-size", "4", "--max-sentences", "40",
                        "--eval-every", "1", "--eval-sentences", "8", "--max-len", "32", *PRIME_SHAPE],
              "finetune": ["--steps", "4", "--batch-size", "4", "--max-sentences", "40", "--eval-every", "2",
                           "--dev-sentences", "16", "--max-len", "32"],
              "evaluate": []},
}

# condition -> meta_pretrain.py flags (None: no priming). The first three are the main rows.
CONDITIONS = {
    "no priming": None,
    "MTL priming": ["--method", "mtl"],
    "MAML priming": [],
    "dose: MAML priming for 1/4 of the meta-steps": [],
    "ablation: inner loop on all parameters": ["--inner-params", "all"],
    "ablation: same-language query": ["--query", "same"],
    "ablation: first-order": ["--first-order"],
    "ablation: outer update of initial PEFT": ["--outer-peft"],
    "MTL priming at MAML's compute": ["--method", "mtl"],                  # + EQUAL_COMPUTE's --steps
    "multi-source fine-tuning (en + priming languages)": None,          # + MULTI_SOURCE's fine-tuning flags
    "implicit MAML priming": ["--inner-loop", "implicit", "--curvature", "hessian"],   # the inner loop is a fine-tuning
    "implicit MAML priming (first order)": ["--inner-loop", "implicit", "--first-order"],
    "implicit MAML priming (Gauss-Newton)": ["--inner-loop", "implicit", "--curvature", "ggn"],
}
# Run only when --conditions names them: an implicit meta-step costs ~2x an unrolled one (RESULTS.md).
OPT_IN = ("implicit MAML priming", "implicit MAML priming (first order)", "implicit MAML priming (Gauss-Newton)")
MAIN_ROWS = ("no priming", "MTL priming", "MAML priming")
# The practitioner's baseline: no priming; the PEFT tensors and head fine-tuned on en plus the
# priming languages' train sentences (the pool priming draws from: the budget's --max-sentences).
MULTI_SOURCE = "multi-source fine-tuning (en + priming languages)"
# MTL priming given the wall time of MAML priming: MAML's meta-step costs this many MTL steps
# (sum of the meta-steps' seconds in the verdict-cpu priming logs: adapter 1021 s vs 180 s, prefix
# 1081 s vs 176 s for 200 steps, both on the 2-core CPU with two processes; RESULTS.md).
EQUAL_COMPUTE = "MTL priming at MAML's compute"
EQUAL_COMPUTE_FACTOR = {"adapter": 1021 / 180, "prefix": 1081 / 176, "lora": 1021 / 180}
# dose-response rows: MAML priming with a fraction of the budget's meta-steps (0 is "no priming"),
# fine-tuned with the main rows' seeds so they pair with them
DOSES = {"dose: MAML priming for 1/4 of the meta-steps": 0.25}
FIRST = MAIN_ROWS + tuple(DOSES) + (MULTI_SOURCE, EQUAL_COMPUTE)  # run first, with the main rows' fine-tuning seeds
FULL_ROW = ("full", "full fine-tuning (reference)")
SOURCE_LANG = "en"  # fine-tuning language of every run
HASH_CHARS = 10
# Bump when a stage trains differently for the same flags (changed defaults, seeding, modules):
# 2 = AdapterHub adapter placements and non-linearities, seeds derived per purpose (commit b15aa73 on).
TRAINING_CODE = "2"
LOCKS = ".locks"  # in --runs: one lock file per run, held while a compare.py process runs it
WEIGHTS_MARKERS = ("config.json", "peft_config.json")  # a primed or fully fine-tuned model; PEFT tensors
RECORD_FILES = ("run.json", "metrics.jsonl", "eval-*.json")  # what --records keeps of every finished run
REFERENCE_FILES = ("peft.safetensors", "peft_config.json")   # + of no priming's seed 0 (~2 MB): primed rows
                                                              # measure their inner-loop strength against it


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


# ----------------------------------------------------------------------------- running stages

def run_hash(flags, runs):
    """A short hash of the flags that shape a run (order kept: later flags override earlier) and
    of TRAINING_CODE, so runs of code that trains differently are never reused for each other.
    The flags are taken free of where things are (location_free): a clone anywhere, with the data
    anywhere, finds the committed records."""
    return flags_hash(location_free(flags, runs))


def flags_hash(flags):
    return hashlib.sha256(json.dumps([TRAINING_CODE, *flags]).encode()).hexdigest()[:HASH_CHARS]


def location_free(flags, runs):
    """The flags with the paths that say where, not what, replaced: a data folder by its name, and a
    body that is a run of this comparison (a folder in `runs`) by its folder name. (The data's bytes
    are checked when a run is reused: check_data.)"""
    flags = list(flags)
    for i in range(len(flags) - 1):
        if flags[i] == "--data-dir":
            flags[i + 1] = "data:" + Path(flags[i + 1]).name
        elif flags[i] == "--init" and Path(flags[i + 1]).parent == Path(runs):
            flags[i + 1] = "run:" + Path(flags[i + 1]).name
    return flags


def recorded_flags(folder):
    """(flags, runs folder) of the stage command a run folder's run.json records (the flags before its
    --out, as run_stage wrote them), or None."""
    try:
        argv = shlex.split(read_record(folder)["command"])
        out = argv.index("--out")
    except (KeyError, TypeError, ValueError):
        return None
    return argv[1:out], Path(argv[out + 1]).parent


def with_curvature(flags):
    """A second-order implicit run recorded before --curvature existed (2026-12-03) solved the exact
    Hessian's system: its flags as they would be written now."""
    for i in range(len(flags) - 1):
        if (flags[i:i + 2] == ["--inner-loop", "implicit"] and "--first-order" not in flags
                and "--curvature" not in flags):
            return flags[:i + 2] + ["--curvature", "hessian"] + flags[i + 2:]
    return flags


def existing_run(folder, flags, runs):
    """`folder`, or the run of the same flags recorded under an older name: before 2026-12-02 a
    run's identity hashed absolute paths (the data folder, the primed body), so the verdict's
    records carry names of the machine that ran them; and second-order implicit runs recorded before
    --curvature existed lack it (with_curvature). A candidate counts only if its name is the hash of
    its own recorded flags, as they were hashed then (so a changed TRAINING_CODE still makes a new
    run), and its location-free flags are these; a finished one is preferred. A reused run must have read the
    bytes of this --data-dir (check_data)."""
    if not folder.exists():
        prefix, want, found = folder.name[:-HASH_CHARS], location_free(flags, runs), []
        for other in sorted(folder.parent.glob(prefix + "?" * HASH_CHARS)):
            recorded = recorded_flags(other)
            if (recorded is not None
                    and other.name[-HASH_CHARS:] in (flags_hash(recorded[0]), flags_hash(location_free(*recorded)))
                    and location_free(with_curvature(recorded[0]), recorded[1]) == want):
                found.append(other)
        found.sort(key=lambda other: not is_finished(read_record(other)))
        folder = found[0] if found else folder
    if (folder / "run.json").is_file():
        check_data(read_record(folder), flags, folder)
    return folder


def existing_eval(result, flags, tuned):
    """`result`, or the evaluation of the same flags under its older name: its hash held the data
    folder's absolute path, the one its fine-tuning run recorded (see existing_run). Evaluations on
    --eval-data-dir (whose older hash held that folder's path, recorded nowhere) have no older name."""
    recorded = recorded_flags(tuned)
    if (not result.exists() and recorded is not None and "--data-dir" in flags and "--data-dir" in recorded[0]
            and "data:" + Path(recorded[0][recorded[0].index("--data-dir") + 1]).name
            == location_free(flags, tuned)[flags.index("--data-dir") + 1]):
        old = list(flags)
        old[old.index("--data-dir") + 1] = recorded[0][recorded[0].index("--data-dir") + 1]
        legacy = result.with_name(f"{result.name[:-HASH_CHARS - len('.json')]}{flags_hash(old)}.json")
        result = legacy if legacy.exists() else result
    if result.is_file():
        check_data(json_object_or_none(result), flags, result)
    return result


def check_data(record, flags, where):
    """A run (or evaluation) is reused by the name of its data folder; its record's sha256 over the
    files it read (data_provenance) must match the bytes of this --data-dir. Records from before
    provenance, or from the hub, carry none and pass."""
    data = (record or {}).get("data") or {}
    if not data.get("sha256") or "--data-dir" not in flags:
        return
    folder = flags[flags.index("--data-dir") + 1]
    try:
        same = current_sha256(folder, tuple(data["files"])) == data["sha256"]
    except OSError:
        same = False
    if not same:
        raise ValueError(f"{where} was made from other data than {folder} holds ({', '.join(data['files'])} "
                         f"differ or are missing): another folder of the same name? "
                         f"give it its own --runs and --records")


@functools.lru_cache(maxsize=None)
def current_sha256(folder, names):
    return files_sha256(folder, names)   # once per (folder, files) and process: ~10 ms a file


def finished(done_marker):
    """Whether a stage's result is complete and usable, by the stages' own rule: a run folder's
    run.json says "finished" (runs.is_finished) and its weights are there (a run restored from
    --records has none: a later stage could not use it, so it is run again); an eval JSON is
    written last, so it is done when it exists."""
    done_marker = Path(done_marker)
    if done_marker.name == "run.json":
        folder = done_marker.parent
        return is_finished(read_record(folder)) and any((folder / f).is_file() for f in WEIGHTS_MARKERS)
    return done_marker.exists()


def run_stage(script, flags, done_marker, extra=(), records=None, weights=False):
    """Run one stage unless its result exists. Returns True when the result is there, False when
    another compare.py process is producing it right now. `extra` flags do not shape the run
    (--gpu) and are left out of its identity. records: mirror the finished run's records there
    (keep_record; weights: its PEFT tensors too)."""
    done_marker = Path(done_marker)
    folder = done_marker.parent
    if not finished(done_marker):
        name = folder.name if script != "evaluate_ner.py" else f"{folder.name}-{done_marker.stem}"
        locks = folder.parent / LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        lock = try_lock(locks / f"{name}.lock")
        if lock is None:
            print(f"- {name}: another compare.py is running it; skipped here", flush=True)
            return False
        with lock:
            if not finished(done_marker):  # else: finished while we waited for the lock
                restart = [] if script == "evaluate_ner.py" or not folder.exists() else \
                    ["--resume"] if (folder / "resume.pt").is_file() else ["--overwrite"]  # an interrupted run
                command = [sys.executable, str(ROOT / script), *flags, *extra, *restart]
                print("+", " ".join(command), flush=True)
                if run_child(command).returncode != 0:
                    raise ValueError(f"{script} failed (its message is above); fix that and re-run compare.py: "
                                     f"finished runs are kept")
    if records is not None:
        keep_record(folder, records, weights)
    return True


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what compare.py passes on to its running stage


def run_child(command):
    """Run a stage in its own process group (a terminal's Ctrl-C reaches compare.py alone) and pass on
    SIGTERM, SIGINT and SIGHUP to it (those compare.py does not ignore, as under nohup): the stage ends
    as its own handling says (Ctrl-C: its last checkpoint kept), compare.py waits for it and then stops,
    so no stage outlives compare.py holding its run's lock."""
    child, received = None, []

    def forward(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signum)
    forwarded = [sig for sig in FORWARDED if signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        child = subprocess.Popen(command, process_group=0)
        for signum in received:  # arrived while it was starting
            child.send_signal(signum)
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Stopped(f"{signal.Signals(received[0]).name}: the running stage ({Path(command[1]).name}) was stopped "
                      f"with it and has ended; re-run compare.py to continue (finished runs are kept, an interrupted "
                      f"priming run resumes from its last checkpoint)", received[0])
    return subprocess.CompletedProcess(command, returncode)


# --------------------------------------------------------------- records: continuing in a fresh checkout

def keep_record(folder, records, weights=False):
    """Mirror a run's small files (RECORD_FILES; with weights, REFERENCE_FILES too) into --records,
    which is committed with the results: a fresh checkout then knows which runs finished, what
    they scored and logged, without their weights."""
    dest = Path(records) / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in RECORD_FILES + (REFERENCE_FILES if weights else ()):
        for f in folder.glob(pattern):
            if not (dest / f.name).is_file() or (dest / f.name).read_bytes() != f.read_bytes():
                write_atomic(dest / f.name, lambda tmp, f=f: shutil.copy2(f, tmp))  # a kill leaves no torn record


def restore_records(records, runs):
    """Copy every recorded run that --runs lacks (a fresh checkout) into --runs: finished runs are
    then skipped. A primed body's weights are not recorded: if a row still needs one of them
    (a fine-tuning seed not finished), that priming run is run again (same seed, same result)."""
    records = Path(records)
    for recorded in sorted(records.iterdir()) if records.is_dir() else []:
        if recorded.is_dir() and not (runs / recorded.name).exists():
            shutil.copytree(recorded, runs / recorded.name)


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
    folder = runs / f"primed-{peft}-{slug(condition)}-p{seed}-{run_hash(flags, runs)}"
    return flags, existing_run(folder, flags, runs)


def prime_condition(args, runs, peft, condition, seed, reference):
    """The primed body of (condition, priming seed): its folder, or None while another process runs it.
    reference: the unprimed fine-tuning run the priming run measures its inner-loop strength against."""
    flags, folder = prime_plan(args, runs, peft, condition, seed)
    extra = [*device_flags(args), "--reference-ft", str(reference)]  # logging only: not part of the identity
    done = run_stage("meta_pretrain.py", [*flags, "--out", str(folder)], folder / "run.json", extra, args.records)
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


def baselines_of(condition):
    """The rows a condition is compared with (compare_report.paired_rows), in the table's order."""
    if condition == "no priming":
        return []
    bases = ["no priming"]
    if condition in ("MAML priming", EQUAL_COMPUTE):
        bases.append("MTL priming")
    if condition == "MAML priming":
        bases.append(EQUAL_COMPUTE)
    if condition in OPT_IN:   # does a faithful simulation of the fine-tuning change the answer? and at what cost?
        bases += ["MTL priming", "MAML priming", EQUAL_COMPUTE]
        bases += ["implicit MAML priming"] if "first order" in condition else []
    if condition.startswith("ablation:"):
        bases.append("MAML priming")
    if condition in ("MTL priming", "MAML priming", EQUAL_COMPUTE):
        bases.append(MULTI_SOURCE)   # does priming beat fine-tuning on the same labelled languages?
    return bases


def dose_ladder(args):
    """[(condition, meta-steps)] of the dose-response: no priming, the dose rows, the MAML row."""
    steps = budget_steps(args)
    doses = sorted((max(1, round(steps * f)), c) for c, f in DOSES.items())
    return [("no priming", 0), *[(c, n) for n, c in doses], ("MAML priming", steps)]


def budget_steps(args):
    budget = BUDGETS[args.budget]["prime"]
    return int(budget[budget.index("--steps") + 1])


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
    folder = runs / f"ft-{tag}-f{seed}-{run_hash(flags, runs)}"
    return flags, existing_run(folder, flags, runs)


def finetune(args, runs, init, peft, seed, tag, condition=None):
    """The fine-tuned folder, or None while another process runs it."""
    flags, folder = finetune_plan(args, runs, init, peft, seed, tag, condition)
    reference = str(init) == args.model and seed == 0 and peft != "full"  # its PEFT tensors go into --records
    done = run_stage("finetune_peft.py", [*flags, "--out", str(folder)], folder / "run.json", device_flags(args),
                     args.records, weights=reference)
    return folder if done else None


def evaluate_plan(args, tuned, langs, split):
    """(flags, eval JSON) of a fine-tuned folder on `langs`; each language set and size is its own file."""
    flags = [*eval_data_flags(args), *BUDGETS[args.budget]["evaluate"], "--split", split, "--langs", ",".join(langs)]
    flags += ["--max-sentences", str(args.eval_sentences)] if args.eval_sentences else []
    result = Path(tuned) / f"eval-{split}-{run_hash(flags, tuned)}.json"
    return flags, existing_eval(result, flags, Path(tuned))


def evaluate_checkpoint(args, tuned, langs, split):
    """The eval JSON, or None while another process runs it."""
    flags, result = evaluate_plan(args, tuned, langs, split)
    done = run_stage("evaluate_ner.py", [*flags, "--ckpt", str(tuned), "--out", str(result)], result,
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
    if finished(result):  # also when restored from --records, where the primed body's weights are gone
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    langs, conditions = check_args(args)
    out = Path(args.out or ROOT / "experiments" / "results" / args.budget)
    runs = Path(args.runs) if args.runs else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    args.records = Path(args.records) if args.records else out / "records"
    restore_records(args.records, runs)
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
            write_results(table, paired_rows(table, baselines_of), langs, args, out, dose_ladder(args))
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
