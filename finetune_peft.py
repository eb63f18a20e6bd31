"""Downstream fine-tuning: train fresh PEFT tensors and a fresh NER head on the source language.

    python finetune_peft.py --init checkpoints/primed-e5-small-maml-adapter-s0 --peft adapter   # on a primed body
    python finetune_peft.py --init e5-small --peft adapter                               # no priming (reference)
    python finetune_peft.py --init e5-small --peft full                                  # full fine-tuning (reference)
    python finetune_peft.py --init xlm-roberta-base --peft prefix --gpu 0 --steps 3000
    python finetune_peft.py --init e5-small --extra-langs de,es --extra-sentences 2000   # multi-source baseline

The body (--init: a primed folder of meta_pretrain.py or any model name) stays frozen; only
the PEFT tensors and the head train (with --peft full, everything trains). The step with the
best source-language dev F1 is kept. --extra-langs adds other languages' train sentences to the
source language's (the multi-source baseline: no priming, the same labelled languages priming
sees); model selection stays on the source language's dev set. The output folder holds the PEFT tensors and head only
(megabytes; a full model with --peft full), run.json (whose "init" points to the body) and
metrics.jsonl. evaluate_ner.py --ckpt takes that folder; a --peft lora folder also exports to an
HF peft adapter (python -m hf_peft --ckpt <folder> --out <adapter folder>).
"""

import argparse
import time

import datasets
import torch
from tqdm import tqdm

import adapters
import peft_checkpoint
import peft_config
from plumbing import batches, cli, files, finetune_run, ner_data, pretrained, runs
from plumbing.scoring import score_model

# --------------------------------------------------------------------- defaults -----
STEPS = 1000           # optimizer steps: en dev F1 of adapters on e5-small is flat from step 800 (RESULTS.md)
BATCH_SIZE = 16        # sentences per batch
LR_PEFT = 1e-3         # PEFT methods take large steps (few parameters, fresh head)
LR_FULL = 3e-5         # full fine-tuning: the usual small step for a pretrained encoder
WARMUP = 0.1           # fraction of the steps with a linearly rising lr, then linear decay to 0
MAX_SENTENCES = 20000  # English train sentences read (the whole split)
DEV_SENTENCES = 1000   # English dev sentences for model selection
EVALS = 10             # dev F1 evaluations spread over the run; the best step is kept
MAX_LEN = 128          # sub-words


# ============================================================================ the algorithm

def build_model(init, config, seed, device):
    """The body `init` with fresh PEFT tensors and a fresh head (METHOD.md: after priming,
    downstream PEFT starts from fresh PEFT parameters and a fresh head); config None: full
    fine-tuning. The same seed draws the same PEFT tensors and head on every body."""
    labels = ner_data.LABELS
    model = pretrained.load_token_classifier(init, num_labels=len(labels), id2label=labels, device=device)
    if config is not None:
        adapters.add_peft(model, config, seed=cli.derive_seed(seed, "fresh phi"))
        adapters.freeze_body(model)
    return model


def fine_tune(args, model, tokenizer, train, dev, out, record, device):
    """The training loop: AdamW with linear warmup and decay on the trainable tensors; the PEFT
    tensors and head (or the model) of the best dev step are saved. Returns that step's record."""
    stream = batches.BatchStream(batches.encode_sentences(train, tokenizer, args.max_len), args.batch_size,
                                  seed=cli.derive_seed(args.seed, "train stream"), pad_id=tokenizer.pad_token_id,
                                  device=device, max_tokens=args.max_tokens)
    dev_examples = batches.encode_sentences(dev, tokenizer, args.max_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # foreach: one multi-tensor update instead of a Python loop over the ~100 PEFT tensors; the same
    # arithmetic, so bit-identical weights (fused=True is faster still but rounds differently)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: linear_schedule(i, args.steps, args.warmup))
    record.update(trainable_parameters=sum(p.numel() for p in trainable),
                  total_parameters=sum(p.numel() for p in model.parameters()))
    log, best = runs.MetricsLog(out), {"dev_f1_default": -1.0, "step": 0}
    model.train()
    langs = args.lang + (f"+{args.extra_langs}" if args.extra_langs else "")
    bar = tqdm(range(1, args.steps + 1), desc=f"fine-tuning ({args.peft}, {langs})")
    for step in bar:
        t0 = time.perf_counter()
        with pretrained.precision_context(device, args.precision):
            loss = model(**stream.next_batch()).loss
        train_loss = loss.item()  # one host sync a step: the check and the metrics line share it
        cli.check_finite(train_loss, f"the training loss at step {step}",
                          "lower --lr, and start again with --overwrite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        metrics = {"step": step, "train_loss": train_loss, "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
        if step % args.eval_every == 0 or step == args.steps:
            with pretrained.precision_context(device, args.precision):
                scores = score_model(model, dev, dev_examples, device=device, pad_id=tokenizer.pad_token_id)
            metrics.update(dev_f1_default=scores["f1_default"], dev_f1_strict=scores["f1_strict"])
            if metrics["dev_f1_default"] > best["dev_f1_default"]:  # model selection on source-language dev F1
                best = {"dev_f1_default": metrics["dev_f1_default"], "step": step}
                save_checkpoint(model, tokenizer, out, {
                    "best": best, "body": args.init, "body_path": record["init_path"],
                    "body_sha256": record["init_sha256"], "body_config_sha256": record["init_config_sha256"],
                    "labels": ner_data.LABELS})
        log.write(**metrics)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", best_dev_f1=f"{best['dev_f1_default']:.1f}")
    return best


def linear_schedule(step, steps, warmup):
    """The lr factor at optimizer step `step` (0-based) of `steps`: linear warmup over the first
    warmup * steps steps, then linear decay to 0 at the end (transformers' get_linear_schedule_with_warmup,
    the schedule of its NER examples)."""
    warm = int(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(1, steps - warm))


def save_checkpoint(model, tokenizer, out, extra):
    """PEFT tensors + head (or the whole model after full fine-tuning), atomically."""
    if adapters.peft_config_of(model) is None:
        files.save_model_atomic(model, tokenizer, out)
    else:
        peft_checkpoint.save_peft(model, out, extra=extra)


def load_training_sentences(args, fmt=None):
    """The train sentences: --lang's, plus each --extra-langs language's first --extra-sentences
    (fmt: the data format, ner_data.data_format_from_flags; None: PAN-X)."""
    train = ner_data.load_wikiann(args.lang, "train", args.data_dir, args.max_sentences, fmt)
    if args.extra_langs is None:
        return train
    extra = [ner_data.load_wikiann(lang, "train", args.data_dir, args.extra_sentences or args.max_sentences, fmt)
             for lang in ner_data.parse_languages(args.extra_langs)]
    return datasets.concatenate_datasets([train, *extra])  # batches.BatchStream shuffles them together


# ============================================================================ the interface

def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune PEFT tensors (or the full model) for NER on one language.",
                                formatter_class=cli.HelpFormatter)
    method = p.add_argument_group("what trains")
    method.add_argument("--init", default=pretrained.DEFAULT_MODEL,
                        help="the body: a primed folder, e5-small, a model folder or hub id")
    method.add_argument("--peft", choices=[*peft_config.METHODS, "full"], default="adapter",
                        help="what trains: a PEFT method (body frozen) or full fine-tuning (reference)")
    peft_config.add_peft_flags(method)
    budget = p.add_argument_group("budget and optimizer")
    budget.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    budget.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per batch")
    budget.add_argument("--max-tokens", type=int, default=None,
                        help="also cut batches at this many padded tokens (sentences x length): even memory per step")
    budget.add_argument("--lr", type=float, default=None,
                        help=f"peak AdamW learning rate (default: {LR_PEFT} for PEFT, {LR_FULL} for full)%(default).0s")
    budget.add_argument("--warmup", type=float, default=WARMUP,
                        help="fraction of --steps with linear warmup (then linear decay to 0)")
    budget.add_argument("--max-len", type=int, default=MAX_LEN, help="sub-word truncation length")
    data = p.add_argument_group("data and model selection")
    data.add_argument("--lang", default="en",
                      help="training language (the source language; its dev set selects the step)")
    data.add_argument("--extra-langs", default=None,
                      help="more training languages, comma-separated (e.g. de,es): their train sentences join "
                           "--lang's, shuffled together; evaluate_ner.py leaves them out of the zero-shot average")
    data.add_argument("--extra-sentences", type=int, default=None,
                      help="train sentences read per --extra-langs language (default: --max-sentences); 2000 is the "
                           "pool the CPU budget's priming draws from")
    data.add_argument("--max-sentences", type=int, default=MAX_SENTENCES, help="train sentences read")
    data.add_argument("--dev-sentences", type=int, default=DEV_SENTENCES, help="dev sentences for model selection")
    data.add_argument("--eval-every", type=int, default=None,
                      help=f"dev F1 every N steps and at the end (default: --steps / {EVALS}, so {EVALS} evaluations)"
                           "%(default).0s")
    ner_data.add_data_flags(data)
    folder = p.add_argument_group("run folder")
    folder.add_argument("--seed", type=int, default=0, help="seed of every RNG (PEFT init, data order, dropout)")
    folder.add_argument("--out", default=None,
                        help="output folder (default: checkpoints/ft-<init>-<peft>-<lang>-s<seed>)")
    folder.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (another run's files are deleted)")
    hardware = p.add_argument_group("hardware")
    hardware.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    hardware.add_argument("--precision", choices=pretrained.PRECISIONS, default="fp32",
                          help="fp32, or bf16 autocast for the forward passes")
    hardware.add_argument("--threads", type=int, default=None, help=cli.THREADS_HELP)
    return cli.parser_taking_negative_numbers(p)


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = check_args(args)
    cli.set_threads(args)
    fmt = ner_data.data_format_from_flags(args)
    device = pretrained.pick_device(args.gpu)
    init_path = pretrained.resolve_model(args.init)
    runs.check_out_is_not_input(args.out, init_path, "--init", "the body")
    body_config = pretrained.model_config(init_path)  # before the tokenizer (it reads config.json too): named errors
    tokenizer = pretrained.load_tokenizer(args.init)
    pretrained.check_max_len(args.max_len, body_config, tokenizer)
    peft_config.check_fits(config, body_config)
    train = load_training_sentences(args, fmt)  # bad data: an error before any write
    dev = ner_data.load_wikiann(args.lang, "dev", args.data_dir, args.dev_sentences, fmt)
    record = finetune_run.body_record(args, init_path, fmt)
    cli.set_seed(args.seed)
    model = build_model(args.init, config, args.seed, device)  # a body that does not load: an error before any write
    with finetune_run.run_folder(args, record) as (out, finished):
        finished["best"] = best = fine_tune(args, model, tokenizer, train, dev, out, record, device)
    print(f"best {args.lang} dev F1 (seqeval default) {best['dev_f1_default']:.2f} at step {best['step']}; "
          f"checkpoint in {out}")


def check_args(args):
    """Out-of-range flags: one clear error each (finetune_run.check_finetune_flags). Returns the PEFT config
    (None for --peft full)."""
    finetune_run.check_finetune_flags(args, EVALS, LR_PEFT, LR_FULL)
    return None if args.peft == "full" else peft_config.peft_config_from_flags(args, args.peft)


INTERRUPTED = finetune_run.INTERRUPTED


if __name__ == "__main__":
    cli.run_cli(main, interrupted=INTERRUPTED)
