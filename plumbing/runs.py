"""The run-folder convention shared by the three stages: records, metrics logs, atomic writes.

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
Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file that a later stage would take.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECORD = "run.json"
STAGES = ("meta_pretrain", "finetune_peft")  # the stages whose --out is a run folder (its run.json names one)
METRICS = "metrics.jsonl"
LOCK = ".lock"
TMP_INFIX = ".tmp-"  # write_atomic's temporary file: <name>.tmp-<8 characters of mkstemp>
TEMPORARY = (".save-tmp-*", f"*{TMP_INFIX}*")  # what write_atomic / save_model_atomic leave when killed
# every file a stage of this project writes into its run folder (records, weights, the names transformers
# gives a model's and a tokenizer's files, scores of evaluate_ner.py and compare.py): all --overwrite may
# delete, with the model card (is_model_card). Names, not patterns, where a user's file could match one.
RUN_FILES = (RECORD, METRICS, LOCK, "resume.pt", "peft.safetensors", "peft_config.json", "config.json",
             "generation_config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
             "pytorch_model*.bin", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "sentencepiece.bpe.model", "spiece.model", "vocab.txt",
             "vocab.json", "merges.txt", "chat_template.jinja", "eval-*.json", *TEMPORARY)
CARD_TAG = '- "peft-priming"'  # in the front matter of the model card model_card.py writes (README.md)


def set_seed(seed):
    """Seed every RNG the stages use (python, torch CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def derive_seed(seed, purpose):
    """The seed of one RNG of a run: a hash of the run's --seed and the RNG's purpose ("query
    stream de", "fresh phi", ...). Different purposes and different --seed values never share
    a seed (offsets like seed + 1 collide with the next run's seed)."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1  # 31 bits: safe for every torch and BatchStream use


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


def umask_mode(mode=0o666):
    """`mode` as the user's umask leaves it: what open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def give_umask_modes(folder):
    """Give every file in `folder` the umask's mode: a library may write its own (transformers writes
    model.safetensors 0600), and what a run publishes is readable like its other files."""
    for f in Path(folder).iterdir():
        if f.is_file():
            os.chmod(f, umask_mode())


def write_atomic(path, write):
    """Call write(tmp_path), then rename tmp_path to path (atomic on one file system). The file
    gets the umask's mode like any new file (mkstemp alone would leave it 0600). A full device or
    the file size limit is one line naming the file (write_failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_write_failures(path):
        fd, tmp = tempfile.mkstemp(prefix=path.name + TMP_INFIX, dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, umask_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def remove_stale_temporaries(folder, names):
    """Delete what a kill left of write_atomic's temporary files for these file names (the name, TMP_INFIX and
    mkstemp's 8 characters), nothing else. Call it holding the lock that every writer of those files holds:
    then none of them is another process's write in progress."""
    import re
    left = re.compile("(" + "|".join(map(re.escape, names)) + ")" + re.escape(TMP_INFIX) + "[a-z0-9_]{8}")
    for f in Path(folder).iterdir():
        if left.fullmatch(f.name) and f.is_file():
            f.unlink(missing_ok=True)


def file_sha256(path, chunk=1 << 20):
    """The sha256 of a file's bytes (read in 1 MiB pieces: a 470 MB body takes ~1 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(chunk), b""):
            digest.update(piece)
    return digest.hexdigest()


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def weights_sha256(folder):
    """One sha256 over the weight files of a model folder (name and bytes of each), or None for
    a hub id (no folder): what evaluation checks a body against."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern)})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{file_sha256(f)}\0".encode())
    return digest.hexdigest()


def config_sha256(folder):
    """The sha256 of a model folder's config.json (None for a hub id, or a folder without one): what
    shapes the body's outputs beside its weights (hidden_act, layer norm eps ...). A field of its own
    beside weights_sha256, so records written before it still check their weights."""
    path = Path(folder) / "config.json"
    return file_sha256(path) if path.is_file() else None


def write_failure(error, what, kept="what was written before is kept"):
    """One line for a write that failed for want of space or under the file size limit (`what`: the file
    or folder written; `kept`: what is left as it was), or None for any other failure."""
    import errno
    import resource
    code = failed_write_errno(error)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{' (disk quota)' if code == errno.EDQUOT else ''} while writing {what}: "
                f"free space there ({kept}), or choose another --out")
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit == resource.RLIM_INFINITY:
            return (f"{what} is larger than the file system there allows (EFBIG): choose an --out on another "
                    f"file system ({kept})")
        return (f"the file size limit (ulimit -f: {limit} bytes) stopped the writing of {what}: raise it "
                f"(ulimit -f unlimited) and run again ({kept})")
    return None


def failed_write_errno(error):
    """The errno of the OSError behind a failed write, or None. torch.save says only "unexpected pos" and
    keeps the OSError as its exception's context (when it writes to a file object: torch_save); the Rust
    writers (safetensors, tokenizers) say "(os error N)"."""
    import re
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return error.errno
        said = re.search(r"\(os error (\d+)\)", str(error))
        if said:
            return int(said.group(1))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)  # `from None`: named
    return None


@contextlib.contextmanager
def naming_write_failures(what, kept="what was written before is kept"):
    """A write inside that fails for want of space or under the file size limit is one line naming `what`."""
    try:
        yield
    except Exception as e:
        message = write_failure(e, what, kept)
        if message is None:
            raise
        raise ValueError(message) from None


def write_json(path, obj):
    """Write JSON atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, default=str)))


def torch_save(path, obj):
    """torch.save atomically (resumable states), through a Python file object: a failed write then keeps its
    OSError (ENOSPC, EFBIG) as the context of torch's RuntimeError, whose own words ("unexpected pos") name
    no cause."""
    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    write_atomic(path, save)


def write_record(folder, stage, args, status="finished", **extra):
    """run.json: the stage, its status ("running" from the start, "finished" written last, once
    every output is in place), every flag, the code version and anything the stage adds."""
    record = {"stage": stage, "status": status, "args": vars(args), "code_version": code_version(),
              "command": shlex.join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    write_json(Path(folder) / RECORD, record)
    return record


def read_record(folder):
    """A run folder's run.json, or None where the folder has none (e.g. a hub model)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    record = json_object_or_none(path)
    if not isinstance(record, dict) or not isinstance(record.get("args", {}), dict):
        raise ValueError(f"{path} is not a run record (damaged or not valid JSON): restore it, or choose another "
                         f"folder; the stage that wrote {Path(folder)} replaces it only with --overwrite")
    return record


def json_object_or_none(path):
    """A JSON file's object (dict), or None where the file is damaged, not JSON, or not an object."""
    try:
        return json_object_of(Path(path).read_text())
    except UnicodeDecodeError:
        return None


def read_json_object(path, fix):
    """A JSON object a stage needs (peft_config.json, ...), or one line naming the file and `fix`."""
    value = json_object_or_none(path)
    if value is None:
        raise ValueError(f"{path} is damaged (not a JSON object): {fix}")
    return value


def is_finished(record):
    """Whether a run.json describes a complete run (records older than the status field: those
    that name their result)."""
    return record is not None and record.get("status", "finished" if "best" in record or
                                             record.get("stage") == "meta_pretrain" else None) == "finished"


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
    for pattern in TEMPORARY:
        for leftover in Path(folder).glob(pattern):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def only_first_record_leftovers(names):
    """Whether a folder without run.json holds nothing but what a run killed while writing its
    first run.json leaves (run.json.tmp-*): then it is a run's folder, not a user's."""
    return bool(names) and all(n.startswith(RECORD + ".tmp-") for n in names)


def claim_run_folder(out, stage, args, shaping=(), resume=False, overwrite=False, data=None, defaults=None):
    """Make `out` this run's folder, or stop with one line naming the problem and the fix.

    Refuses: a folder another process is writing (lock); a file; a folder of files that no
    run wrote; another stage's folder or a finished run (unless --overwrite); an interrupted
    run without --resume (the stage says whether it can resume); --resume whose flags in
    `shaping` differ from the run's (a flag that a record predates counts as its value in
    `defaults`, the parser's defaults), or whose data (`data`: ner_data.data_provenance) differ.
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
        check_ownership(out, stage, args, shaping, resume, overwrite, data, defaults)
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
            record = json_object_or_none(candidate / RECORD) if (candidate / RECORD).is_file() else None
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
        stage = json_object_or_none(run / RECORD)["stage"]
        raise ValueError(f"{flag} {value} is inside the run folder {run} (a {stage} run), which holds only what "
                         f"that run writes: choose an {flag} outside it (nothing was written)")


def check_ownership(out, stage, args, shaping, resume, overwrite, data, defaults=None):
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
            was, now = record["args"].get(flag, (defaults or {}).get(flag)), getattr(args, flag)
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
                  or (p.is_dir() and not any(fnmatch(p.name, pattern) for pattern in TEMPORARY)))


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


# ------------------------------------------------------------------ values and flags

def few(names, shown=3):
    """A list of names for a one-line error: the first `shown`, then how many more (a model's tensor
    names run to kilobytes)."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def check_finite(value, what, fix):
    """Stop before an optimizer step (or a save) that a NaN or infinite loss would poison."""
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: {fix}; nothing from this step was saved")


def check_finite_tensors(tensors, what):
    """Never save NaN or infinite weights: a checkpoint a later stage would take as valid."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{what} holds non-finite values in {len(bad)} tensor(s) ({bad[0]}, ...): not saved; "
                         f"lower the learning rates and start again with --overwrite")


def check_at_least(args, minimum, *flags):
    """Every named integer flag is at least `minimum`; the error names the flag."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {minimum} (got {value})")


SEED_LIMIT = 2**32  # what every RNG takes (numpy's and the data streams' included); no run needs more


def check_seed(args):
    """--seed within what every RNG accepts (10**20 would fail deep inside torch, after --out is claimed)."""
    if not 0 <= args.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be between 0 and {SEED_LIMIT - 1} (got {args.seed})")


def check_positive(args, *flags):
    """Every named float flag is a positive finite number (NaN fails too)."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and not (0 < value < math.inf):
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number (got {value})")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's real default: argparse's "(default: X)", except where the help text
    already says the default (one computed from other flags) or there is none to say (a switch)."""

    def _get_help_string(self, action):
        said = any(text in (action.help or "") for text in ("(default", "; default"))
        if said or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser_taking_negative_numbers(parser):
    """Let `--outer-lr -1e-5` reach the range check (argparse's own matcher misses exponents and
    would say "expected one argument")."""
    import re
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    return parser


def flags_for(parser, values, check, leave_out=()):
    """The command-line flags that give a run's recorded args (`values`) back through `parser` and its
    stage's `check` (which fills in some values itself): every value that is not the parser's default,
    but those that `check` fills in alone (given beside others, some of them would be refused)."""
    import warnings
    parser.exit_on_error = False  # a value it refuses (a record of older code) raises, not exits
    given = {}
    for action in parser._actions:
        if action.option_strings and action.dest in values and action.dest not in leave_out \
                and values[action.dest] != action.default and flag_of(action, values[action.dest]):
            given[action.dest] = flag_of(action, values[action.dest])
    left_out = True
    while left_out:  # again after each pass: leaving one out may let check accept leaving out another
        left_out = False
        for dest in list(given):
            args = parser.parse_args([word for other, flag in given.items() if other != dest for word in flag])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    check(args)
            except ValueError:
                continue
            if getattr(args, dest) == values[dest]:
                del given[dest]
                left_out = True
    return [word for flag in given.values() for word in flag]


def flag_of(action, value):
    """The words that give an argparse action `value` (not its default), or None where none can (None)."""
    import argparse
    long = [option for option in action.option_strings if option.startswith("--")] or action.option_strings
    if isinstance(action, argparse.BooleanOptionalAction):
        return [long[0] if value else long[1]]
    if action.nargs == 0:  # store_true, store_false, store_const: given, since the value is not the default
        return [long[0]]
    return None if value is None else [long[0], str(value)]


def save_model_atomic(model, tokenizer, folder):
    """Save a transformers model and tokenizer into folder so that it is never half-written:
    config.json (what from_pretrained and resolve_model look for) is removed first and moved in
    last, and every file goes through a temporary folder and a rename."""
    check_finite_tensors(model.state_dict(), "the model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-tmp-", dir=folder))
    try:
        with naming_write_failures(f"the model into {folder}",
                                   kept="resume.pt, when there is one, is kept: --resume saves the model again"):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            give_umask_modes(tmp)
            files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config.json last
            for f in files:
                os.replace(f, folder / f.name)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


class MetricsLog:
    """Append-only JSON-lines metrics file in a run folder (one line per logged step)."""

    def __init__(self, folder, fresh=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / METRICS
        if fresh:
            self.path.unlink(missing_ok=True)

    def write(self, **metrics):
        with naming_write_failures(self.path, kept="the lines before are kept"), open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def truncate_after(self, step):
        """On resume, drop lines logged after the checkpoint's step (they will be redone), and a last line
        that a kill or a full disk cut short: it was being logged after the checkpoint (resume.pt is saved
        after a step's line), so it is redone too."""
        if self.path.is_file():
            fix = "restore it, or start the run again with --overwrite (same --out)"
            lines = [line for line in read_metrics(self.path, fix, torn_end=True) if line.get("step", 0) <= step]
            write_atomic(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(line) + "\n"
                                                                             for line in lines)))


def read_metrics(path, fix, torn_end=False):
    """The lines of a metrics.jsonl, each a JSON object; a damaged line (a write cut short by a kill or a
    full disk) is one line naming it and `fix`, unless it is the last and `torn_end` lets it go."""
    lines = Path(path).read_text().splitlines()
    values = [(n, json_object_of(line)) for n, line in enumerate(lines, 1) if line.strip()]
    if torn_end and values and values[-1][1] is None:
        values.pop()
    for n, value in values:
        if value is None:
            raise ValueError(f"{path}: line {n} is cut short or damaged (not a JSON object): {fix}")
    return [value for _, value in values]


def json_object_of(text):
    """A JSON text's object (dict), or None where it is damaged, not JSON, or not an object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def user_error_message(e):
    """One line for an error a user can fix, or None for a bug (which keeps its traceback)."""
    from safetensors import SafetensorError
    failed_write = write_failure(e, getattr(e, "filename", None) or "a file (its name was not said)")
    if failed_write:  # before the damaged-file advice below: a full disk is no corrupt file
        return failed_write
    if isinstance(e, SafetensorError):
        return (f"a .safetensors file is truncated or corrupt ({e}): restore it, or re-run the stage that wrote "
                f"it into a new --out (a damaged default model: delete its cache folder, it is converted again)")
    if isinstance(e, PermissionError):
        return f"{e.strerror}: {e.filename}: choose a folder you can write (--out) or fix its permissions"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, (ValueError, FileNotFoundError, ImportError)):
        return str(e)
    return None


class Stopped(KeyboardInterrupt):
    """A stop by a signal (SIGTERM, SIGHUP, or SIGINT passed on), said by run_cli as a Ctrl-C is
    ("interrupted: ..."), with the shell's exit status for that signal (128 + its number)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.status = 128 + signum


def run_cli(main, argv=None, interrupted="the last complete checkpoint is kept"):
    """Run a stage's main(argv) (None: the command line); a user error (bad flag, missing folder,
    unknown language, unreadable file, ...) is one line on stderr and exit status 2, never a
    traceback (PRIMING_DEBUG=1 shows it). `interrupted` is what Ctrl-C leaves, in the stage's words,
    unless the stage re-raised the KeyboardInterrupt with its own words (what it knows was left)."""
    try:
        main(argv)
    except KeyboardInterrupt as e:
        print(f"interrupted: {str(e) or interrupted}", file=sys.stderr)
        raise SystemExit(getattr(e, "status", 130))
    except Exception as e:
        message = user_error_message(e)
        if message is None or os.environ.get("PRIMING_DEBUG"):
            raise  # a bug, or the full traceback for developers
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
