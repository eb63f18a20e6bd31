"""Does priming's gain survive other fine-tuning code? LoRA fine-tuning with HF peft and the
transformers Trainer, on an unprimed and on a primed body, same budget, paired seeds, scored with
this project's evaluation (scoring.py: seqeval default-mode F1 on fr, nl, pt test).

    pip install --no-deps -r requirements-optional.txt           # peft, accelerate
    OMP_NUM_THREADS=1 python experiments/benchmarks/hf_peft_trainer.py \\
        --primed checkpoints/primed-e5-small-maml-lora-s0 \\
        --data-dir ../shared/data/wikiann --steps 300 --seeds 0,1,2 --eval-sentences 1000
    python experiments/benchmarks/hf_peft_trainer.py --primed ... --base e5-small --out experiments/results/hf-peft.json

Nothing of this project trains here: the body is loaded with AutoModelForTokenClassification,
wrapped by peft.get_peft_model with the LoraConfig of hf_peft.hf_lora_config (the project's LoRA:
query and value, r, alpha, no dropout, the head as a module to save), and trained by
transformers.Trainer with its own data collator, sampler (grouped by length) and linear schedule
with warmup. Hyper-parameters are finetune_peft.py's (lr 1e-3, batch 16, 10% warmup, English
train); the model after the last step is scored (the Trainer's default; finetune_peft.py keeps
its best dev step instead). Seed s draws the head and LoRA A the same way on both bodies and
orders the data the same way, so the two are compared paired (stats.paired_difference).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root
from experiments.stats import mean_std, paired_difference  # noqa: E402
from hf_peft import hf_lora_config  # noqa: E402
from peft_config import PeftConfig  # noqa: E402
from plumbing.batches import encode_sentences  # noqa: E402
from plumbing.cli import check_at_least, run_cli  # noqa: E402
from plumbing.files import write_json  # noqa: E402
from plumbing.ner_data import LABELS, load_wikiann, parse_languages  # noqa: E402
from plumbing.pretrained import load_tokenizer, resolve_model  # noqa: E402
from plumbing.runs import read_record  # noqa: E402
from plumbing.scoring import entity_scores, predict_words  # noqa: E402

STEPS = 300            # a modest CPU budget; finetune_peft.py's default is 1000
BATCH_SIZE = 16        # finetune_peft.py's
LR = 1e-3              # finetune_peft.py's PEFT learning rate
WARMUP = 0.1           # finetune_peft.py's: linear warmup over 10% of the steps, then linear decay
WEIGHT_DECAY = 0.01    # torch.optim.AdamW's default, which finetune_peft.py uses (the Trainer's is 0)
MAX_SENTENCES = 20000  # English train sentences (the whole split)
MAX_LEN = 128          # sub-words, as finetune_peft.py
LANGS = "fr,nl,pt"     # evaluate_ner.py's zero-shot targets


def hf_lora_model(body, lora_rank, seed):
    """AutoModelForTokenClassification + HF peft LoRA; `seed` draws the head and LoRA A."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForTokenClassification, set_seed
    from transformers.utils import logging as hf_logging
    set_seed(seed)
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected
    model = AutoModelForTokenClassification.from_pretrained(
        resolve_model(body), id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
    config = hf_lora_config(PeftConfig("lora", lora_rank=lora_rank))
    config = {k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path")}
    return get_peft_model(model, LoraConfig(**{**config, "inference_mode": False}))


def trainer_dataset(examples):
    """The encoded sentences as the Trainer takes them (input_ids, labels; it pads them)."""
    from datasets import Dataset
    return Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples],
                              "labels": [e["labels"] for e in examples]})


def hf_trainer(model, tokenizer, train, steps, batch_size, seed, out_dir, sampling="group_by_length"):
    """A transformers Trainer with finetune_peft.py's optimiser settings, no evaluation, no saving."""
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="linear",
                             weight_decay=WEIGHT_DECAY, optim="adamw_torch", seed=seed,
                             train_sampling_strategy=sampling, eval_strategy="no", save_strategy="no",
                             logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=train,
                   data_collator=DataCollatorForTokenClassification(tokenizer))


def average_f1(model, targets, pad_id, batch_size=64):
    """This project's evaluation (scoring.py) of a model: {lang: F1 (seqeval default)}, and their mean."""
    scores = {lang: float(entity_scores(list(data["ner_tags"]), predict_words(model, examples, batch_size, "cpu",
                                                                              pad_id))["f1_default"])
              for lang, (data, examples) in targets.items()}  # float: seqeval gives numpy scalars
    return scores, sum(scores.values()) / len(scores)


def fine_tune_and_score(body, seed, args, train, targets, pad_id, tokenizer):
    """One LoRA fine-tuning with HF peft + Trainer, scored: {"f1": {lang: F1}, "average", "train_loss"}."""
    model = hf_lora_model(body, args.lora_rank, seed)
    with tempfile.TemporaryDirectory(prefix="hf-peft-trainer-") as tmp:
        result = hf_trainer(model, tokenizer, train, args.steps, args.batch_size, seed, tmp).train()
    scores, average = average_f1(model, targets, pad_id)
    return {"f1": scores, "average": average, "train_loss": result.training_loss}


def base_of(primed):
    """The model a primed folder was primed from (its run.json), e5-small where it does not say."""
    record = read_record(primed) or {}
    return record.get("args", {}).get("model") or "e5-small"


def report(results, seeds):
    """Per-seed F1 of both bodies, and the paired difference primed - unprimed with its 95% CI."""
    rows = ["| seed | unprimed avg F1 | primed avg F1 | primed - unprimed |", "|---:|---:|---:|---:|"]
    for s in seeds:
        u, p = results["unprimed"][s]["average"], results["primed"][s]["average"]
        rows.append(f"| {s} | {u:.2f} | {p:.2f} | {p - u:+.2f} |")
    means = {b: mean_std(results[b][s]["average"] for s in seeds) for b in ("unprimed", "primed")}
    rows.append(f"| mean ± std | {means['unprimed'][0]:.2f} ± {means['unprimed'][1]:.2f} "
                f"| {means['primed'][0]:.2f} ± {means['primed'][1]:.2f} | |")
    diff = paired_difference({s: results["primed"][s]["average"] for s in seeds},
                             {s: results["unprimed"][s]["average"] for s in seeds})
    ci = f"[{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}]" if diff["ci95"] else "(one seed: no CI)"
    verdict = ("the gain reproduces" if diff["ci95"] and diff["ci95"][0] > 0 else
               "a loss" if diff["ci95"] and diff["ci95"][1] < 0 else "not resolved at this budget")
    rows.append(f"\npaired difference primed - unprimed: {diff['mean']:+.2f} {ci}, {diff['favour']} of {diff['n']} "
                f"seeds favour the primed body: {verdict}")
    return "\n".join(rows), diff


def build_parser():
    p = argparse.ArgumentParser(description="LoRA with HF peft + Trainer on an unprimed and a primed body, paired.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--primed", required=True, help="a primed body: a meta_pretrain.py output folder")
    p.add_argument("--base", default=None, help="the unprimed body (default: the model the primed run started from)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds, each run on both bodies")
    p.add_argument("--steps", type=int, default=STEPS, help="Trainer optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per batch")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha 16, as this project's LoRA)")
    p.add_argument("--max-sentences", type=int, default=MAX_SENTENCES, help="English train sentences read")
    p.add_argument("--langs", default=LANGS, help="comma-separated target languages, scored on their test split")
    p.add_argument("--eval-sentences", type=int, default=None, help="score the first N test sentences per language")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="sub-word truncation length")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub's wikiann)")
    p.add_argument("--out", default=None, help="also write every score as JSON here")
    return p


def check_args(args):
    """Flag values that would fail later: one line each, before anything trains."""
    check_at_least(args, 1, "steps", "batch_size", "lora_rank", "max_sentences", "eval_sentences", "max_len")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("HF peft is not installed: pip install --no-deps -r requirements-optional.txt") from None
    return seeds, parse_languages(args.langs)


def main(argv=None):
    args = build_parser().parse_args(argv)
    seeds, langs = check_args(args)
    base = args.base or base_of(args.primed)
    bodies = {"unprimed": base, "primed": args.primed}
    for body in bodies.values():
        resolve_model(body)  # a missing body is an error before any training
    tokenizer = load_tokenizer(base)
    train = trainer_dataset(encode_sentences(load_wikiann("en", "train", args.data_dir, args.max_sentences),
                                             tokenizer, args.max_len))
    targets = {}
    for lang in langs:
        data = load_wikiann(lang, "test", args.data_dir, args.eval_sentences)
        targets[lang] = (data, encode_sentences(data, tokenizer, args.max_len))
    results = {name: {} for name in bodies}
    for seed in seeds:  # both bodies per seed, so an interrupted run still has paired seeds
        for name, body in bodies.items():
            results[name][seed] = fine_tune_and_score(body, seed, args, train, targets, tokenizer.pad_token_id,
                                                      tokenizer)
            print(f"seed {seed} {name}: average F1 {results[name][seed]['average']:.2f} "
                  f"({', '.join(f'{lang} {f:.2f}' for lang, f in results[name][seed]['f1'].items())}), "
                  f"train loss {results[name][seed]['train_loss']:.3f}", flush=True)
    table, diff = report(results, seeds)
    print(table)
    if args.out:
        write_json(args.out, {"bodies": bodies, "args": vars(args), "results": results, "paired": diff})
    return results, diff


if __name__ == "__main__":
    run_cli(main)
