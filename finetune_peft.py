"""Downstream fine-tuning: train fresh PEFT tensors and a fresh NER head on the source language.

    python finetune_peft.py --init checkpoints/primed-maml-adapter-s0 --peft adapter     # on a primed body
    python finetune_peft.py --init e5-small --peft adapter                               # no priming (reference)
    python finetune_peft.py --init e5-small --peft full                                  # full fine-tuning (reference)
    python finetune_peft.py --init xlm-roberta-base --peft prefix --gpu 0 --steps 3000

The body (--init: a primed folder of meta_pretrain.py or any model name) stays frozen; only
the PEFT tensors and the head train (with --peft full, everything trains). The step with the
best source-language dev F1 is kept. The output folder holds the PEFT tensors and head only
(megabytes; a full model with --peft full), run.json (whose "init" points to the body) and
metrics.jsonl. evaluate_ner.py --ckpt takes that folder.
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

import adapters
from ner_data import LABELS, BatchStream, encode_sentences, load_wikiann
from pretrained import DEFAULT_MODEL, load_token_classifier, load_tokenizer, pick_device, resolve_model
from runs import MetricsLog, read_record, run_cli, save_model_atomic, set_seed, write_record
from scoring import score_model

# --------------------------------------------------------------------- defaults -----
STEPS = 1000           # optimizer steps: en dev F1 of adapters on e5-small is flat from step 800 (README curve)
BATCH_SIZE = 16        # sentences per batch
LR_PEFT = 1e-3         # PEFT methods take large steps (few parameters, fresh head)
LR_FULL = 3e-5         # full fine-tuning: the usual small step for a pretrained encoder
WARMUP = 0.1           # fraction of the steps with a linearly rising lr, then linear decay to 0
MAX_SENTENCES = 20000  # English train sentences read (the whole split)
DEV_SENTENCES = 1000   # English dev sentences for model selection
EVALS = 10             # dev F1 evaluations spread over the run; the best step is kept
MAX_LEN = 128          # sub-words


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune PEFT tensors (or the full model) for NER on one language.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", default=DEFAULT_MODEL, help="the body: a primed folder, e5-small, a model folder or hub id")
    p.add_argument("--peft", choices=["adapter", "prefix", "lora", "full"], default="adapter",
                   help="what trains: a PEFT method (body frozen) or full fine-tuning (reference)")
    p.add_argument("--adapter-placement", choices=["houlsby", "pfeiffer"], default="houlsby", help="adapter positions")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapter width = hidden / this")
    p.add_argument("--prefix-length", type=int, default=16, help="prefix tokens per layer")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lang", default="en", help="training language (the source language)")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per batch")
    p.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default: {LR_PEFT} PEFT, {LR_FULL} full)")
    p.add_argument("--warmup", type=float, default=WARMUP, help="fraction of --steps with linear warmup (then linear decay to 0)")
    p.add_argument("--max-sentences", type=int, default=MAX_SENTENCES, help="train sentences read")
    p.add_argument("--dev-sentences", type=int, default=DEV_SENTENCES, help="dev sentences for model selection")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"dev F1 every N steps and at the end (default: --steps / {EVALS}, so {EVALS} evaluations)")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="sub-word truncation length")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub's wikiann)")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of every RNG (PEFT init, data order, dropout)")
    p.add_argument("--out", default=None, help="output folder (default: checkpoints/ft-<init>-<peft>-<lang>-s<seed>)")
    return p


def check_args(args):
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // EVALS)
    if not 0 <= args.warmup < 1:
        raise ValueError(f"--warmup must be in [0, 1) (got {args.warmup}): the fraction of --steps that warms up")
    for flag in ["steps", "batch_size", "max_sentences", "dev_sentences", "eval_every", "max_len"]:
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if args.lr is None:
        args.lr = LR_FULL if args.peft == "full" else LR_PEFT
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive (got {args.lr})")
    if args.out is None:
        args.out = f"checkpoints/ft-{Path(args.init).name}-{args.peft}-{args.lang}-s{args.seed}"


def linear_schedule(step, steps, warmup):
    """The lr factor at optimizer step `step` (0-based) of `steps`: linear warmup over the first
    warmup * steps steps, then linear decay to 0 at the end (transformers' get_linear_schedule_with_warmup,
    the schedule of its NER examples)."""
    warm = int(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(1, steps - warm))


def build_model(args, device):
    """The body from --init with fresh PEFT tensors and a fresh head (PAPER.md: after priming,
    downstream PEFT starts from fresh PEFT parameters and a fresh head)."""
    model = load_token_classifier(args.init, num_labels=len(LABELS), id2label=LABELS, device=device)
    if args.peft != "full":
        config = adapters.PeftConfig(method=args.peft, placement=args.adapter_placement,
                                     reduction_factor=args.reduction_factor, prefix_length=args.prefix_length,
                                     lora_rank=args.lora_rank)
        adapters.add_peft(model, config, seed=args.seed)
        adapters.freeze_body(model)
    return model


def save_checkpoint(model, tokenizer, args, out, extra):
    """PEFT tensors + head (or the whole model with --peft full), atomically."""
    if args.peft == "full":
        save_model_atomic(model, tokenizer, out)
    else:
        adapters.save_peft(model, out, extra=extra)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    set_seed(args.seed)
    device = pick_device(args.gpu)
    init_path = resolve_model(args.init)
    tokenizer = load_tokenizer(args.init)
    model = build_model(args, device)
    train = load_wikiann(args.lang, "train", args.data_dir, args.max_sentences)
    dev = load_wikiann(args.lang, "dev", args.data_dir, args.dev_sentences)
    stream = BatchStream(encode_sentences(train, tokenizer, args.max_len), args.batch_size, seed=args.seed,
                         pad_id=tokenizer.pad_token_id, device=device)
    dev_examples = encode_sentences(dev, tokenizer, args.max_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: linear_schedule(i, args.steps, args.warmup))
    out = Path(args.out)
    record = dict(init=args.init, init_path=init_path, init_record=read_record(init_path) if Path(init_path).is_dir() else None,
                  trainable_parameters=sum(p.numel() for p in trainable),
                  total_parameters=sum(p.numel() for p in model.parameters()))
    log, best = MetricsLog(out), {"dev_f1_default": -1.0, "step": 0}
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc=f"fine-tuning ({args.peft}, {args.lang})")
    for step in bar:
        t0 = time.perf_counter()
        loss = model(**stream.next_batch()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        metrics = {"step": step, "train_loss": loss.item(), "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
        if step % args.eval_every == 0 or step == args.steps:
            scores = score_model(model, dev, dev_examples, device=device, pad_id=tokenizer.pad_token_id)
            metrics.update(dev_f1_default=scores["f1_default"], dev_f1_strict=scores["f1_strict"])
            if metrics["dev_f1_default"] > best["dev_f1_default"]:  # model selection on source-language dev F1
                best = {"dev_f1_default": metrics["dev_f1_default"], "step": step}
                save_checkpoint(model, tokenizer, args, out, {"best": best, "body": args.init, "body_path": init_path,
                                                                 "labels": LABELS})
            model.train()
        log.write(**metrics)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", best_dev_f1=f"{best['dev_f1_default']:.1f}")
    write_record(out, "finetune_peft", args, best=best, **record)
    print(f"best {args.lang} dev F1 (seqeval default) {best['dev_f1_default']:.2f} at step {best['step']}; checkpoint in {out}")


if __name__ == "__main__":
    run_cli(main)
