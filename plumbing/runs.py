"""The run-folder convention shared by the three stages: run records, who owns a run folder (its lock,
--resume, --overwrite), metrics logs.

    checkpoints/
      primed-e5-small-maml-adapter-s0/   meta_pretrain.py --out: an ordinary transformers checkpoint
        config.json, model.safetensors, tokenizer.json ...   (the primed body theta)
        run.json                     every flag, the seed, the code version, the input model, and "data":
                                     the data folder (absolute) and a sha256 of the files read
        metrics.jsonl                one JSON line per logged step
        resume.pt                    the latest resumable state (model, optimizer, data streams, RNGs)
      ft-<init>-adapter-en-s0/       finetune_peft.py --out: PEFT tensors + head only (megabytes)
        peft.safetensors, peft_config.json, run.json (its "init" points to the body, "init_sha256"
        names the body's weights and "init_config_sha256" its config.json: evaluation refuses a
        body that changed since), metrics.jsonl
        eval-test.json               evaluate_ner.py's scores for that checkpoint

So every number in a results table traces back: eval-*.json -> its fine-tuning folder's run.json
-> "init" (a primed folder's run.json, or a model name) -> that priming run's flags.
Every file is written to a temporary name and renamed into place (files.py), so an interrupted run
never leaves a half-written file that a later stage would take.
"""

import contextlib
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from plumbing import files

RECORD = "run.json"
STAGES = ("meta_pretrain", "finetune_peft")  # the stages whose --out is a run folder (its run.json names one)
METRICS = "metrics.jsonl"
LOCK = ".lock"
# every file a stage of this project writes into its run folder (records, weights, the names transformers
# gives a model's and a tokenizer's files, scores of evaluate_ner.py and compare.py): all --overwrite may
# delete, with the model card (is_model_card). Names, not patterns, where a user's file could match one.
RUN_FILES = (RECORD, METRICS, LOCK, "resume.pt", "peft.safetensors", "peft_config.json", "config.json",
             "generation_config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
             "pytorch_model*.bin", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "sentencepiece.bpe.model", "spiece.model", "vocab.txt",
             "vocab.json", "merges.txt", "chat_template.jinja", "eval-*.json", *files.TEMPORARY)
CARD_TAG = '- "peft-priming"'  # in the front matter of the model card model_card.py writes (README.md)


@functools.lru_cache(maxsize=1)
def code_version():
    """The git commit of this code (with -dirty when it has local changes), else 'unknown'. Read
    once per process, at its first call (a stage calls it when it starts), so a record never
    names a commit made while the run was going."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_record(folder, stage, args, status="finished", **extra):
    """run.json: the stage, its status ("running" from the start, "finished" written last, once
    every output is in place), every flag, the code version and anything the stage adds."""
    record = {"stage": stage, "status": status, "args": vars(args), "code_version": code_version(),
              "command": shlex.join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    files.write_json(Path(folder) / RECORD, record)
    return record


def read_record(folder):
    """A run folder's run.json, or None where the folder has none (e.g. a hub model)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    record = files.json_object_or_none(path)
    if not isinstance(record, dict) or not isinstance(record.get("args", {}), dict):
        raise ValueError(f"{path} is not a run record (damaged or not valid JSON): restore it, or choose another "
                         f"folder; the stage that wrote {Path(folder)} replaces it only with --overwrite")
    return record


def is_finished(record):
    """Whether a run.json describes a complete run (its status, written last)."""
    return record is not None and record.get("status") == "finished"


# ------------------------------------------------------------------ who owns a run folder

def try_lock(path):
    """An exclusive lock on the file `path` (created if needed): the open file, or None if another
    process holds it. The operating system drops the lock when the process ends, kill -9 included."""
    import fcntl
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def lock_briefly(path, wait=10.0):
    """The lock on `path` within `wait` seconds (another evaluation holds it for a moment), else None
    (a run holds it for its whole life); a lock that does nothing where the folder cannot be written,
    for want of permission or on a read-only mount (EROFS: nothing can write it then either)."""
    import errno
    deadline = time.monotonic() + wait
    while True:
        try:
            handle = try_lock(path)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return contextlib.nullcontext()
        if handle is not None or time.monotonic() > deadline:
            return handle
        time.sleep(0.2)


def remove_temporaries(folder):
    """Delete what an interrupted atomic write left behind (only once the folder is known to be
    a run's and we hold its lock: a user's `thesis.tex.tmp-v2` in a foreign folder is kept)."""
    import shutil
    for pattern in files.TEMPORARY:
        for leftover in Path(folder).glob(pattern):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def only_first_record_leftovers(names):
    """Whether a folder without run.json holds nothing but what a run killed while writing its
    first run.json leaves (run.json.tmp-*): then it is a run's folder, not a user's."""
    return bool(names) and all(n.startswith(RECORD + ".tmp-") for n in names)


def claim_run_folder(out, stage, args, shaping=(), resume=False, overwrite=False, data=None):
    """Make `out` this run's folder, or stop with one line naming the problem and the fix.

    Refuses: a folder another process is writing (lock); a file; a folder of files that no
    run wrote; another stage's folder or a finished run (unless --overwrite); an interrupted
    run without --resume (the stage says whether it can resume); --resume whose flags in
    `shaping` differ from the run's, or whose data (`data`: ner_data.data_provenance) differ.
    Nothing is deleted before the folder is known to be a run's, and --overwrite deletes only the files
    a run writes (RUN_FILES): a folder holding anything else is refused whole. A refused folder keeps no
    .lock of ours. Returns the lock (keep it open while the run lasts)."""
    out = Path(out)
    check_not_inside_a_run(out, "--out", out.resolve().parent)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out} is a broken symbolic link (to {os.readlink(out)}): remove it or choose "
                         f"another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    had_lock = (out / LOCK).exists()
    lock = try_lock(out / LOCK)
    if lock is None:
        raise ValueError(f"{out} is being written by another running process: wait for it, or choose another --out")
    try:
        check_ownership(out, stage, args, shaping, resume, overwrite, data)
    except BaseException:
        lock.close()  # else the error's traceback keeps it open: a caller in the same process could not retry
        if not had_lock:  # a folder we refused keeps no trace of us
            (out / LOCK).unlink(missing_ok=True)
        raise
    return lock


def enclosing_run(folder):
    """The nearest of `folder` and the folders above it that is a run folder of this project (its run.json
    names one of STAGES), or None."""
    folder = Path(folder).expanduser().resolve()
    for candidate in (folder, *folder.parents):
        try:
            record = files.json_object_or_none(candidate / RECORD) if (candidate / RECORD).is_file() else None
        except OSError:  # a folder above that cannot be read holds no run of ours we could see
            continue
        if record is not None and record.get("stage") in STAGES:
            return candidate
    return None


def check_not_inside_a_run(value, flag, folder, own=None):
    """Nothing is written inside a run folder but what its own run writes: `folder` (where `flag` `value`
    writes) must not be inside one, unless the nearest is `own` (an evaluation's scores beside its run).
    A run's --overwrite refuses a folder holding anything else, so a run nested in it would block it."""
    run = enclosing_run(folder)
    if run is not None and (own is None or run != Path(own).expanduser().resolve()):
        stage = files.json_object_or_none(run / RECORD)["stage"]
        raise ValueError(f"{flag} {value} is inside the run folder {run} (a {stage} run), which holds only what "
                         f"that run writes: choose an {flag} outside it (nothing was written)")


def check_ownership(out, stage, args, shaping, resume, overwrite, data):
    """claim_run_folder's decision, taken with the lock held; clears or tidies only a run's folder."""
    try:
        record = read_record(out)
    except ValueError:
        if not overwrite:
            raise
        record = {"stage": "damaged"}  # a run's folder whose record broke: --overwrite may replace it
    others = [p.name for p in out.iterdir() if p.name != LOCK]
    if record is None and others and not only_first_record_leftovers(others):
        raise ValueError(f"{out} holds files that no run of this project wrote ({', '.join(sorted(others)[:3])}): "
                         f"choose a new or empty --out")
    if record is None:
        remove_temporaries(out)
        return
    owner = f"{record.get('stage')} run"
    if overwrite:
        check_only_run_files(out)
        clear_folder(out)
        return
    if record.get("stage") != stage:
        raise ValueError(f"{out} holds a {owner}: choose another --out (or --overwrite to replace it)")
    if resume:
        for flag in shaping:
            was, now = record["args"].get(flag), getattr(args, flag)
            if was != now:
                raise ValueError(f"--resume: --{flag.replace('_', '-')} is {now} here but {was} in the run in {out}: "
                                 f"resume with the same flags, or start a new --out")
        check_same_data(record, data, out)
    elif is_finished(record):
        raise ValueError(f"{out} already holds a finished {owner}: choose another --out (or --overwrite to replace it)")
    else:
        how = "--resume to continue it, " if "resume" in vars(args) else ""
        raise ValueError(f"{out} holds an interrupted {owner}: {how}--overwrite to start over, or choose another --out")
    remove_temporaries(out)


def check_same_data(record, data, out):
    """--resume reads the data the run started with: the same resolved folder and the same bytes
    (a record older than provenance compares its --data-dir as written)."""
    if data is None:
        return
    was = record.get("data")
    if was is None:
        was_dir = record["args"].get("data_dir")
        if was_dir is None:
            return  # an old record of a run that read $WIKIANN_DIR or the hub: which one is unknown
        was = {"dir": str(Path(was_dir).resolve())}
    if was.get("dir") != data["dir"]:
        raise ValueError(f"--resume: the data folder is {data['dir']} here but {was.get('dir')} in the run in {out}: "
                         f"resume with the same --data-dir (or WIKIANN_DIR), or start a new --out")
    if was.get("sha256") and was["sha256"] != data["sha256"]:
        raise ValueError(f"--resume: the data files in {data['dir']} changed since the run in {out} started "
                         f"(content hash {data['sha256'][:12]} here, {was['sha256'][:12]} then): restore them, "
                         f"or start a new --out")


def check_out_is_not_input(out, path, flag, what="the folder"):
    """--out must not be a folder the run reads (`path`, given by `flag`): --overwrite would delete it
    before it is read. Checked before anything is claimed or deleted."""
    if path is not None and Path(path).expanduser().is_dir() and \
            Path(out).resolve() == Path(path).expanduser().resolve():
        raise ValueError(f"--out {out} is {what} that {flag} names: choose another --out (nothing was changed)")


def foreign_files(folder):
    """What a folder holds that no stage of this project writes: a user's notes, plots, a run folder
    nested inside (a folder is never a run's file, but for an interrupted save's temporary one)."""
    from fnmatch import fnmatch
    return sorted(p.name for p in Path(folder).iterdir()
                  if not (any(fnmatch(p.name, pattern) for pattern in RUN_FILES) or is_model_card(p))
                  or (p.is_dir() and not any(fnmatch(p.name, pattern) for pattern in files.TEMPORARY)))


def is_model_card(path):
    """Whether `path` is the README.md that model_card.py writes into a primed folder (a user's README.md
    in a run folder is the user's)."""
    if path.name != "README.md" or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return CARD_TAG in f.read(4096)


def check_only_run_files(folder):
    """--overwrite deletes a run's files only: a folder that holds anything else is refused whole,
    before anything is deleted."""
    foreign = foreign_files(folder)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ValueError(f"--overwrite: {folder} holds what no run of this project wrote ({', '.join(foreign[:3])}"
                         f"{more}): move it out of the folder, or choose another --out (nothing was deleted)")


def clear_folder(folder):
    """Remove a run folder's contents (not its lock): --overwrite, once check_only_run_files passed."""
    import shutil
    for p in Path(folder).iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# ------------------------------------------------------------------ the metrics log

class MetricsLog:
    """Append-only JSON-lines metrics file in a run folder (one line per logged step)."""

    def __init__(self, folder, fresh=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / METRICS
        if fresh:
            self.path.unlink(missing_ok=True)

    def write(self, **metrics):
        with files.naming_write_failures(self.path, kept="the lines before are kept"), open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def truncate_after(self, step):
        """On resume, drop lines logged after the checkpoint's step (they will be redone), and a last line
        that a kill or a full disk cut short: it was being logged after the checkpoint (resume.pt is saved
        after a step's line), so it is redone too."""
        if self.path.is_file():
            fix = "restore it, or start the run again with --overwrite (same --out)"
            lines = [line for line in read_metrics(self.path, fix, torn_end=True) if line.get("step", 0) <= step]
            files.write_atomic(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(line) + "\n"
                                                                             for line in lines)))


def read_metrics(path, fix, torn_end=False):
    """The lines of a metrics.jsonl, each a JSON object; a damaged line (a write cut short by a kill or a
    full disk) is one line naming it and `fix`, unless it is the last and `torn_end` lets it go."""
    lines = Path(path).read_text().splitlines()
    values = [(n, files.json_object_of(line)) for n, line in enumerate(lines, 1) if line.strip()]
    if torn_end and values and values[-1][1] is None:
        values.pop()
    for n, value in values:
        if value is None:
            raise ValueError(f"{path}: line {n} is cut short or damaged (not a JSON object): {fix}")
    return [value for _, value in values]
