"""The runs of the comparison: which run folder a run is, whether it is done, and running its stage.

Run identity: a run folder is named by what it is and a hash of every flag that shapes it
(model, data folder, budget, PEFT, priming flags, seed, languages) and of TRAINING_CODE, so a
run is reused only when all of them agree, and a changed flag makes a new run. Paths enter it by
name only (the data folder's, a primed body's folder), so a clone anywhere finds the committed records
(existing_run and existing_eval also find a run under the name older code gave it; check_data checks
that a reused run read this --data-dir's bytes).
Running: run_stage runs a stage in a child process (run_child) unless its result is there, under a
lock per run in --runs, so two compare.py processes on one --runs folder share the work; every
finished run's records are mirrored into --records (keep_record), from which a fresh checkout
continues (restore_records).
"""

import functools
import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from plumbing.cli import Stopped
from plumbing.files import json_object_or_none, write_atomic
from plumbing.ner_data import files_sha256
from plumbing.runs import is_finished, read_record, try_lock

ROOT = Path(__file__).resolve().parents[1]  # where the stage scripts are
HASH_CHARS = 10
# Bump when a stage trains differently for the same flags (changed defaults, seeding, modules):
# 2 = AdapterHub adapter placements and non-linearities, seeds derived per purpose (commit b15aa73 on).
TRAINING_CODE = "2"
# What TRAINING_CODE's stages log on a tiny random model (tests/test_training_fingerprint.py runs them): a change
# that trains differently fails that test until TRAINING_CODE is bumped and these losses are stored anew with it.
TRAINING_FINGERPRINT = {"training_code": "2", "losses": {
    "adapter MAML priming": [
        {"support_loss_before": 1.912419, "query_loss": 1.427323, "support_loss_after": 0.734034,
         "held_out_query_loss": 1.432079, "held_out_query_loss_fresh": 1.923945},
        {"support_loss_before": 1.888061, "query_loss": 0.714914, "support_loss_after": 0.496125,
         "held_out_query_loss": 1.429399, "held_out_query_loss_fresh": 1.923291},
        {"support_loss_before": 1.935152, "query_loss": 2.407012, "support_loss_after": 0.532267,
         "held_out_query_loss": 1.425544, "held_out_query_loss_fresh": 1.92306},
    ],
    "adapter MTL priming": [
        {"train_loss": 3.936511, "held_out_query_loss": 1.444127, "held_out_query_loss_fresh": 1.92803},
        {"train_loss": 3.925975, "held_out_query_loss": 1.45018, "held_out_query_loss_fresh": 1.927913},
        {"train_loss": 3.815355, "held_out_query_loss": 1.455612, "held_out_query_loss_fresh": 1.928712},
    ],
    "prefix MAML priming": [
        {"support_loss_before": 1.966908, "query_loss": 1.506132, "support_loss_after": 0.741504,
         "held_out_query_loss": 1.432659, "held_out_query_loss_fresh": 1.891495},
        {"support_loss_before": 1.93983, "query_loss": 0.912011, "support_loss_after": 0.387485,
         "held_out_query_loss": 1.429998, "held_out_query_loss_fresh": 1.894432},
        {"support_loss_before": 1.958694, "query_loss": 2.401593, "support_loss_after": 0.545691,
         "held_out_query_loss": 1.425324, "held_out_query_loss_fresh": 1.897083},
    ],
    "adapter fine-tuning on MAML priming": [
        {"train_loss": 1.988723},
        {"train_loss": 1.93678},
        {"train_loss": 1.911513},
        {"train_loss": 1.930137},
    ],
    "prefix fine-tuning (multi-source) on MAML priming": [
        {"train_loss": 1.995708},
        {"train_loss": 1.938973},
        {"train_loss": 1.982654},
        {"train_loss": 1.984428},
    ],
}}
LOCKS = ".locks"  # in --runs: one lock file per run, held while a compare.py process runs it
WEIGHTS_MARKERS = ("config.json", "peft_config.json")  # a primed or fully fine-tuned model; PEFT tensors
RECORD_FILES = ("run.json", "metrics.jsonl", "eval-*.json")  # what --records keeps of every finished run
REFERENCE_FILES = ("peft.safetensors", "peft_config.json")   # + of no priming's seed 0 (~2 MB): primed rows
                                                              # measure their inner-loop strength against it


# ----------------------------------------------------------------------------- run identity

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


# ----------------------------------------------------------------------------- running stages

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

    def pass_on(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signum)
    forwarded = [sig for sig in FORWARDED if signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, pass_on) for sig in forwarded}
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
