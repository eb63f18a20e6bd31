"""Files as the stages write and read them: atomic writes, the write errors a user can fix, JSON, hashes.

Every file is written to a temporary name and renamed into place (write_atomic, torch_save,
save_model_atomic), so an interrupted run never leaves a half-written file that a later stage would
take; what a kill leaves of the temporary names is TEMPORARY. A write that fails for want of space or
under the file size limit is one line naming the file (write_failure). The sha256 of a file, of a model
folder's weights and of its config.json are what records name an input by (weights_sha256, config_sha256).
"""

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

TMP_INFIX = ".tmp-"  # write_atomic's temporary file: <name>.tmp-<8 characters of mkstemp>
TEMPORARY = (".save-tmp-*", f"*{TMP_INFIX}*")  # what write_atomic / save_model_atomic leave when killed


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


# ------------------------------------------------------------------ write errors a user can fix

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


# ------------------------------------------------------------------ what the stages write

def write_json(path, obj):
    """Write JSON atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, default=str)))


def torch_save(path, obj):
    """torch.save atomically (resumable states), through a Python file object: a failed write then keeps its
    OSError (ENOSPC, EFBIG) as the context of torch's RuntimeError, whose own words ("unexpected pos") name
    no cause."""
    def dump(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    write_atomic(path, dump)


def check_finite_tensors(tensors, what):
    """Never save NaN or infinite weights: a checkpoint a later stage would take as valid."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{what} holds non-finite values in {len(bad)} tensor(s) ({bad[0]}, ...): not saved; "
                         f"lower the learning rates and start again with --overwrite")


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


# ------------------------------------------------------------------ reading JSON

def json_object_of(text):
    """A JSON text's object (dict), or None where it is damaged, not JSON, or not an object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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


# ------------------------------------------------------------------ hashes: what a record names an input by

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
