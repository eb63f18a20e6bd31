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
HF peft adapter (python -m plumbing.hf_peft --ckpt <folder> --out <adapter folder>).
"""

import argparse
import time
from pathlib import Path

import datasets
import torch
from tqdm import tqdm

import adapters
import peft_config
from plumbing import peft_state
from plumbing.ner_data import (
    LABELS,
    BatchStream,
    add_data_flags,
    check_language,
    data_format_from_flags,
    data_provenance,
    encode_sentences,
    load_wikiann,
    parse_languages,
)
from plumbing.pretrained import (
    DEFAULT_MODEL,
    PRECISIONS,
    check_max_len,
    load_token_classifier,
    load_tokenizer,
    model_config,
    pick_device,
    precision_context,
    resolve_model,
)
from plumbing.runs import (
    MetricsLog,
    check_at_least,
    check_finite,
    check_out_is_not_input,
    check_positive,
    check_seed,
    claim_run_folder,
    config_sha256,
    derive_seed,
    is_finished,
    parser_taking_negative_numbers,
    read_record,
    run_cli,
    save_model_atomic,
    set_seed,
    weights_sha256,
    write_record,
)
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


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune PEFT tensors (or the full model) for NER on one language.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", default=DEFAULT_MODEL,
                   help="the body: a primed folder, e5-small, a model folder or hub id")
    p.add_argument("--peft", choices=[*peft_config.METHODS, "full"], default="adapter",
                   help="what trains: a PEFT method (body frozen) or full fine-tuning (reference)")
    peft_config.add_peft_flags(p)
    p.add_argument("--lang", default="en", help="training language (the source language; its dev set selects the step)")
    p.add_argument("--extra-langs", default=None,
                   help="more training languages, comma-separated (e.g. de,es): their train sentences join --lang's, "
                        "shuffled together; evaluate_ner.py leaves them out of the zero-shot average")
    p.add_argument("--extra-sentences", type=int, default=None,
                   help="train sentences read per --extra-langs language (default: --max-sentences); 2000 is the "
                        "pool the CPU budget's priming draws from")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per batch")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="also cut batches at this many padded tokens (sentences x length): even memory per step")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast for the forward passes")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak AdamW learning rate (default: {LR_PEFT} for PEFT, {LR_FULL} for full)%(default).0s")
    p.add_argument("--warmup", type=float, default=WARMUP,
                   help="fraction of --steps with linear warmup (then linear decay to 0)")
    p.add_argument("--max-sentences", type=int, default=MAX_SENTENCES, help="train sentences read")
    p.add_argument("--dev-sentences", type=int, default=DEV_SENTENCES, help="dev sentences for model selection")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"dev F1 every N steps and at the end (default: --steps / {EVALS}, so {EVALS} evaluations)"
                        "%(default).0s")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="sub-word truncation length")
    add_data_flags(p)
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of every RNG (PEFT init, data order, dropout)")
    p.add_argument("--out", default=None, help="output folder (default: checkpoints/ft-<init>-<peft>-<lang>-s<seed>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (another run's files are deleted)")
    return parser_taking_negative_numbers(p)


def check_args(args):
    """Out-of-range flags: one clear error each. Returns the PEFT config (None for --peft full)."""
    check_at_least(args, 1, "steps", "batch_size", "max_sentences", "dev_sentences", "eval_every", "max_len",
                   "max_tokens", "extra_sentences")
    args.extra_langs = check_extra_langs(args.lang, args.extra_langs, args.extra_sentences)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // EVALS)
    if not 0 <= args.warmup < 1:
        raise ValueError(f"--warmup must be in [0, 1) (got {args.warmup}): the fraction of --steps that warms up")
    if args.lr is None:
        args.lr = LR_FULL if args.peft == "full" else LR_PEFT
    check_positive(args, "lr")
    check_seed(args)
    check_language(args.lang, "--lang")
    if args.out is None:
        args.out = f"checkpoints/ft-{Path(args.init).name}-{args.peft}-{args.lang}-s{args.seed}"
    return None if args.peft == "full" else peft_config.peft_config_from_flags(args, args.peft)


def check_extra_langs(lang, extra_langs, extra_sentences):
    """--extra-langs as a normalised string (None: the source language only); the source language
    or a repeated one among them is an error, and so is --extra-sentences without them."""
    if extra_langs is None:
        if extra_sentences is not None:
            raise ValueError("--extra-sentences needs --extra-langs (e.g. --extra-langs de,es)")
        return None
    langs = parse_languages(extra_langs, "--extra-langs")
    if lang in langs:
        raise ValueError(f"--extra-langs {extra_langs}: give languages other than --lang {lang}, each once")
    return ",".join(langs)


def load_training_sentences(args, fmt=None):
    """The train sentences: --lang's, plus each --extra-langs language's first --extra-sentences
    (fmt: the data format, ner_data.data_format_from_flags; None: PAN-X)."""
    train = load_wikiann(args.lang, "train", args.data_dir, args.max_sentences, fmt)
    if args.extra_langs is None:
        return train
    extra = [load_wikiann(lang, "train", args.data_dir, args.extra_sentences or args.max_sentences, fmt)
             for lang in parse_languages(args.extra_langs)]
    return datasets.concatenate_datasets([train, *extra])  # BatchStream shuffles them together


def linear_schedule(step, steps, warmup):
    """The lr factor at optimizer step `step` (0-based) of `steps`: linear warmup over the first
    warmup * steps steps, then linear decay to 0 at the end (transformers' get_linear_schedule_with_warmup,
    the schedule of its NER examples)."""
    warm = int(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(1, steps - warm))


def build_model(init, config, seed, device):
    """The body `init` with fresh PEFT tensors and a fresh head (METHOD.md: after priming,
    downstream PEFT starts from fresh PEFT parameters and a fresh head); config None: full
    fine-tuning. The same seed draws the same PEFT tensors and head on every body."""
    model = load_token_classifier(init, num_labels=len(LABELS), id2label=LABELS, device=device)
    if config is not None:
        adapters.add_peft(model, config, seed=derive_seed(seed, "fresh phi"))
        peft_state.freeze_body(model)
    return model


def save_checkpoint(model, tokenizer, out, extra):
    """PEFT tensors + head (or the whole model after full fine-tuning), atomically."""
    if adapters.peft_config_of(model) is None:
        save_model_atomic(model, tokenizer, out)
    else:
        peft_state.save_peft(model, out, extra=extra)


def init_record(init_path):
    """The record of the body's run (a primed folder), which must be finished; None for a plain model."""
    record = read_record(init_path) if Path(init_path).is_dir() else None
    if record is not None and not is_finished(record):
        raise ValueError(f"--init {init_path} is an unfinished {record.get('stage')} run: finish it "
                         f"(meta_pretrain.py --resume) or pick a finished body")
    return record


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = check_args(args)
    fmt = data_format_from_flags(args)
    device = pick_device(args.gpu)
    init_path = resolve_model(args.init)
    check_out_is_not_input(args.out, init_path, "--init", "the body")
    body_config = model_config(init_path)  # before the tokenizer, which reads config.json too: the error names it
    tokenizer = load_tokenizer(args.init)
    check_max_len(args.max_len, body_config, tokenizer)
    peft_config.check_fits(config, body_config)
    train = load_training_sentences(args, fmt)  # bad data: an error before any write
    dev = load_wikiann(args.lang, "dev", args.data_dir, args.dev_sentences, fmt)
    extra = [(lang, "train") for lang in parse_languages(args.extra_langs)] if args.extra_langs else []
    record = dict(init=args.init, init_path=init_path, init_record=init_record(init_path),
                  init_sha256=weights_sha256(init_path),  # evaluation checks the body against them
                  init_config_sha256=config_sha256(init_path),
                  data=data_provenance(args.data_dir, [(args.lang, "train"), (args.lang, "dev"), *extra], fmt))
    set_seed(args.seed)
    model = build_model(args.init, config, args.seed, device)  # a body that does not load: an error before any write
    out = Path(args.out)
    lock = claim_run_folder(out, "finetune_peft", args, overwrite=args.overwrite)
    try:
        print(f"fine-tuning into {out}", flush=True)
        write_record(out, "finetune_peft", args, status="running", **record)
        best = fine_tune(args, model, tokenizer, train, dev, out, record, device)
        write_record(out, "finetune_peft", args, status="finished", best=best, **record)  # last: the run is complete
    finally:
        lock.close()
    print(f"best {args.lang} dev F1 (seqeval default) {best['dev_f1_default']:.2f} at step {best['step']}; "
          f"checkpoint in {out}")


def fine_tune(args, model, tokenizer, train, dev, out, record, device):
    """The training loop: AdamW with linear warmup and decay on the trainable tensors; the PEFT
    tensors and head (or the model) of the best dev step are saved. Returns that step's record."""
    stream = BatchStream(encode_sentences(train, tokenizer, args.max_len), args.batch_size,
                         seed=derive_seed(args.seed, "train stream"), pad_id=tokenizer.pad_token_id, device=device,
                         max_tokens=args.max_tokens)
    dev_examples = encode_sentences(dev, tokenizer, args.max_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: linear_schedule(i, args.steps, args.warmup))
    record.update(trainable_parameters=sum(p.numel() for p in trainable),
                  total_parameters=sum(p.numel() for p in model.parameters()))
    log, best = MetricsLog(out), {"dev_f1_default": -1.0, "step": 0}
    model.train()
    langs = args.lang + ("+" + args.extra_langs if args.extra_langs else "")
    bar = tqdm(range(1, args.steps + 1), desc=f"fine-tuning ({args.peft}, {langs})")
    for step in bar:
        t0 = time.perf_counter()
        with precision_context(device, args.precision):
            loss = model(**stream.next_batch()).loss
        check_finite(loss.item(), f"the training loss at step {step}", "lower --lr, and start again with --overwrite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        metrics = {"step": step, "train_loss": loss.item(), "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
        if step % args.eval_every == 0 or step == args.steps:
            with precision_context(device, args.precision):
                scores = score_model(model, dev, dev_examples, device=device, pad_id=tokenizer.pad_token_id)
            metrics.update(dev_f1_default=scores["f1_default"], dev_f1_strict=scores["f1_strict"])
            if metrics["dev_f1_default"] > best["dev_f1_default"]:  # model selection on source-language dev F1
                best = {"dev_f1_default": metrics["dev_f1_default"], "step": step}
                save_checkpoint(model, tokenizer, out, {"best": best, "body": args.init,
                                                        "body_path": record["init_path"],
                                                        "body_sha256": record["init_sha256"],
                                                        "body_config_sha256": record["init_config_sha256"],
                                                        "labels": LABELS})
            model.train()
        log.write(**metrics)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", best_dev_f1=f"{best['dev_f1_default']:.1f}")
    return best


# what Ctrl-C leaves, said by run_cli
INTERRUPTED = "the folder holds an unfinished run that evaluate_ner.py refuses; start it again with --overwrite"


if __name__ == "__main__":
    run_cli(main, interrupted=INTERRUPTED)
