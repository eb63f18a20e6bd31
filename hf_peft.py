"""A LoRA fine-tuning of finetune_peft.py as an HF peft adapter folder, so that the de-facto PEFT
library loads what this project trains.

    python -m hf_peft --ckpt checkpoints/ft-e5-small-lora-en-s0 --out hf-lora-en-s0   # peft not needed here

    # then, wherever HF peft is installed (requirements-optional.txt):
    from transformers import AutoModelForTokenClassification
    from peft import PeftModel
    body = AutoModelForTokenClassification.from_pretrained(BODY, num_labels=7)  # BODY: the body it prints
    model = PeftModel.from_pretrained(body, "hf-lora-en-s0")   # the same logits as evaluate_ner.py's model

The folder holds adapter_config.json and adapter_model.safetensors, HF peft's two files. The
mapping is exact, not an approximation (adapters.py's LoRA, Hu et al. 2021):
  this project                                   HF peft (LoraConfig)
  W x + (alpha / r) B A x on attention.self.      target_modules=["query", "value"], r, lora_alpha
    query and value of every layer                (scaling = lora_alpha / r: use_rslora=False)
  no dropout on the LoRA input                   lora_dropout=0.0
  no bias terms in A, B                          bias="none"
  A (r x d_in), B (d_out x r)                    lora_A.weight (r x d_in), lora_B.weight (d_out x r)
  the NER head `classifier` (phi)                modules_to_save=["classifier"], saved with the LoRA
Only LoRA maps one to one: HF peft has no Houlsby / Pfeiffer bottleneck adapters, and its prefix
tuning keeps its prefixes in a prefix encoder and a key/value cache of its own, so --peft adapter
and prefix runs are refused with a one-line error.
"""

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from adapters import CONFIG_FILE, HEAD, WEIGHTS_FILE, PeftConfig, peft_config_of
from peft_checkpoint import saved_peft_config
from plumbing.cli import run_cli
from plumbing.files import read_json_object, write_atomic
from plumbing.ner_data import LABELS
from plumbing.runs import is_finished, read_record

HF_CONFIG_FILE, HF_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # what PeftModel reads
PREFIX = "base_model.model."  # HF peft keys: the wrapped model's own parameter names behind this
TARGETS = ["query", "value"]  # the projections adapters.add_peft gives a LoRA (attention.self.query / .value)
LORA_FACTORS = {"A": "lora_A.weight", "B": "lora_B.weight"}  # adapters.LoRA's factors, HF peft's names


def hf_lora_config(config: PeftConfig, base_model_name_or_path=None) -> dict:
    """adapter_config.json of the project's LoRA: the fields that decide the function, spelled
    out; HF peft gives every other LoraConfig field its default."""
    if config.method != "lora":
        raise ValueError(f"HF peft export covers --peft lora only; this run is --peft {config.method}, "
                         f"which HF peft does not represent in the same form")
    return {"peft_type": "LORA", "task_type": "TOKEN_CLS", "base_model_name_or_path": base_model_name_or_path,
            "r": config.lora_rank, "lora_alpha": config.lora_alpha, "use_rslora": False,
            "target_modules": TARGETS, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": [HEAD], "inference_mode": True}


def hf_peft_tensors(phi) -> dict:
    """The project's phi {name: tensor} under HF peft's names:
    `X.lora.A` -> `base_model.model.X.lora_A.weight`, `classifier.weight` -> `base_model.model.classifier.weight`."""
    out = {}
    for name, tensor in phi.items():
        module, _, factor = name.rpartition(".")
        if factor in LORA_FACTORS and module.endswith(tuple(f".{t}.lora" for t in TARGETS)):
            out[f"{PREFIX}{module.removesuffix('.lora')}.{LORA_FACTORS[factor]}"] = tensor
        elif name.split(".", 1)[0] == HEAD:
            out[PREFIX + name] = tensor
        else:
            raise ValueError(f"{name} is neither a LoRA factor of {'/'.join(TARGETS)} nor the head: not a LoRA run")
    if not any(k.startswith(PREFIX + HEAD + ".") for k in out):
        raise ValueError("the PEFT tensors hold no head (classifier): nothing for modules_to_save")
    return {k: t.detach().cpu().contiguous() for k, t in out.items()}


def write_hf_peft(folder, phi, config: PeftConfig, base_model_name_or_path=None):
    """Write an HF peft adapter folder from phi (the PEFT tensors + head) and its PeftConfig."""
    tensors, hf_config = hf_peft_tensors(phi), hf_lora_config(config, base_model_name_or_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / HF_WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomic(folder / HF_CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2)))
    return folder


def export_hf_peft(model, folder, base_model_name_or_path=None):
    """A model with this project's LoRA (adapters.add_peft) as an HF peft adapter folder."""
    from adapters import peft_parameters
    config = peft_config_of(model)
    if config is None:
        raise ValueError("export_hf_peft: the model has no PEFT; call add_peft with PeftConfig('lora') first")
    return write_hf_peft(folder, peft_parameters(model), config, base_model_name_or_path)


def export_checkpoint(ckpt, out, overwrite=False):
    """A finished `finetune_peft.py --peft lora` folder as an HF peft adapter folder (its files only:
    no model is loaded). Returns the body path the adapter was trained on and the head's labels."""
    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / CONFIG_FILE).is_file() or not (ckpt / WEIGHTS_FILE).is_file():
        raise ValueError(f"--ckpt {ckpt} has no {CONFIG_FILE} and {WEIGHTS_FILE}: give a folder of "
                         f"finetune_peft.py --peft lora")
    record = read_record(ckpt)
    if record is not None and not is_finished(record):
        raise ValueError(f"--ckpt {ckpt} holds an unfinished fine-tuning run: finish it first "
                         f"(finetune_peft.py --overwrite --out {ckpt})")
    taken = [name for name in (HF_CONFIG_FILE, HF_WEIGHTS_FILE) if (out / name).exists()]
    if taken and not overwrite:  # either file, an adapter's or a user's: it would be replaced
        raise ValueError(f"--out {out} already holds {' and '.join(taken)}: pass --overwrite to replace "
                         f"{'it' if len(taken) == 1 else 'them'}, or choose another --out (nothing was written)")
    fix = f"export another --ckpt, or run finetune_peft.py --peft lora again with --overwrite --out {ckpt}"
    saved = read_json_object(ckpt / CONFIG_FILE, fix)
    config = saved_peft_config(saved, ckpt / CONFIG_FILE, fix)
    extra = saved.get("extra", {})
    body = extra.get("body_path") or extra.get("body")
    hf_lora_config(config)  # a non-LoRA run is refused before anything is written
    write_hf_peft(out, load_file(str(ckpt / WEIGHTS_FILE)), config, body)
    return body, extra.get("labels", LABELS)


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a finetune_peft.py --peft lora folder as an HF peft adapter.")
    p.add_argument("--ckpt", required=True, help="a finished finetune_peft.py --peft lora output folder")
    p.add_argument("--out", required=True, help="the HF peft adapter folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an HF peft adapter (or either of its files) already in --out")
    args = p.parse_args(argv)
    body, labels = export_checkpoint(args.ckpt, args.out, args.overwrite)
    print(f"HF peft adapter written to {args.out}; load it with\n"
          f"  body = AutoModelForTokenClassification.from_pretrained({body!r}, id2label={dict(enumerate(labels))})\n"
          f"  model = PeftModel.from_pretrained(body, {str(args.out)!r})")


if __name__ == "__main__":
    run_cli(main)
