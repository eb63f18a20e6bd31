"""phi on disk: the PEFT tensors and head of a fine-tuning, and the PeftConfig they were made with.

    from peft_checkpoint import save_peft, load_peft
    save_peft(model, folder)       # peft.safetensors + peft_config.json (megabytes)
    load_peft(model, folder)       # checked against the model: method, sizes, names and shapes

A saved phi names the PeftConfig it was made with; loading adds PEFT to a model that has none
and checks the rest against the model.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters import CONFIG_FILE, HEAD, WEIGHTS_FILE, PeftConfig, add_peft, peft_config_of, peft_parameters
from plumbing.cli import few
from plumbing.files import check_finite_tensors, read_json_object, write_atomic


def save_peft(model, folder, extra: dict | None = None):
    """Write phi to folder/peft.safetensors and {"peft_config", "num_labels", "extra"} to peft_config.json."""
    config = peft_config_of(model)
    if config is None:
        raise ValueError("save_peft: the model has no PEFT; call add_peft first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in peft_parameters(model).items()}
    check_finite_tensors(tensors, "the PEFT tensors and head")
    record = {"peft_config": config.to_dict(), "num_labels": getattr(model, HEAD).out_features,
              "extra": extra or {}}
    write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomic(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def saved_peft_config(record, path, fix) -> PeftConfig:
    """The PeftConfig that a peft_config.json's record names, or one line naming the file (a record
    without its "peft_config" key, or one whose fields are no PeftConfig's) and `fix`."""
    value = record.get("peft_config")
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds no \"peft_config\" (the PEFT method and its sizes): {fix}")
    try:
        return PeftConfig.from_dict(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its \"peft_config\" is no PEFT configuration ({e}): {fix}") from None


def read_peft(model, folder) -> tuple:
    """phi saved by save_peft, checked against `model` (adding PEFT first if it has none), without
    loading it: ({name: tensor} on the model's device, the JSON record)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"load_peft: no such folder {folder}")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"load_peft: {folder} has no {name}; is it a save_peft folder?")
    fix = f"run finetune_peft.py again with --overwrite --out {folder}"
    record = read_json_object(folder / CONFIG_FILE, fix)
    saved = saved_peft_config(record, folder / CONFIG_FILE, fix)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # truncated or damaged
        raise ValueError(f"{folder / WEIGHTS_FILE} is unreadable ({type(e).__name__}): run finetune_peft.py "
                         f"again with --overwrite --out {folder}") from None
    labels, model_labels = tensors[f"{HEAD}.weight"].shape[0], getattr(model, HEAD).out_features
    if labels != model_labels:
        raise ValueError(f"load_peft: checkpoint head has {labels} labels but the model has {model_labels}")
    current = peft_config_of(model)
    if current is None:
        add_peft(model, saved)
    elif current.method != saved.method:
        raise ValueError(f"load_peft: checkpoint holds {saved.method} but the model has {current.method}")
    elif current != saved:
        raise ValueError(f"load_peft: checkpoint config {saved} differs from the model's {current}")
    params = peft_parameters(model)
    if set(tensors) != set(params):  # an edited method in peft_config.json, or a body of another model type
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the {saved.method} of {folder / CONFIG_FILE} on "
                         f"this body ({type(model).__name__}): missing {few(sorted(set(params) - set(tensors)))}; "
                         f"unexpected {few(sorted(set(tensors) - set(params)))}: restore those files (or the body's "
                         f"config.json), or {fix}")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} has shape {tuple(tensors[name].shape)}, the model "
                             f"{tuple(p.shape)}: restore it, or {fix}")
    return {n: t.to(params[n].device, params[n].dtype) for n, t in tensors.items()}, record


def load_peft(model, folder) -> dict:
    """Load phi saved by save_peft into the model (adding PEFT first if it has none); returns the JSON record."""
    tensors, record = read_peft(model, folder)
    with torch.no_grad():
        for name, p in peft_parameters(model).items():
            p.copy_(tensors[name])
    return record
