"""Cost of each PEFT method: trainable fraction and forward-time overhead over the bare model.

    python experiments/benchmarks/bench_adapters.py          # default model (e5-small), WikiANN en dev sentences
    python experiments/benchmarks/bench_adapters.py --tiny   # random BERT (hidden 384, 12 layers), no files needed
    python experiments/benchmarks/bench_adapters.py --attn eager --train-step

Batches of 32 sentences (length-bucketed, as training uses them). Methods are timed in turn
within every repeat, so drift from other processes hits all alike; the median and the
minimum over repeats are printed (on a shared machine the minimum is the steadier figure).
Target: overhead <= 15% for adapters and LoRA. Every model shares the same body tensors.
With --train-step the body is frozen everywhere, so "bare" trains the head only and its
backward stops there, while every PEFT method back-propagates through the whole encoder.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root
from adapters import PeftConfig, add_peft, body_parameters, freeze_body, peft_parameters  # noqa: E402  # noqa: E402

METHODS = {
    "bare": None,
    "adapter houlsby": PeftConfig("adapter", placement="houlsby"),
    "adapter pfeiffer": PeftConfig("adapter", placement="pfeiffer"),
    "prefix": PeftConfig("prefix"),
    "lora": PeftConfig("lora"),
}


def tiny_model_and_batches(args):
    """Random 12-layer BERT of hidden 384 (e5-small's shape) and random ids of WikiANN-like lengths."""
    from transformers import BertConfig, BertForTokenClassification
    config = BertConfig(vocab_size=250037, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=1536, num_labels=7)
    model = BertForTokenClassification._from_config(config, attn_implementation=args.attn).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        lengths = torch.randint(8, 48, (args.batch_size,), generator=g).sort().values
        ids = torch.randint(5, config.vocab_size, (args.batch_size, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return model, batches


def real_model_and_batches(args):
    """The default model (pretrained.py) and bucketed batches of English WikiANN dev sentences."""
    from plumbing.batches import bucketed_batches, collate, encode_sentences
    from plumbing.ner_data import load_wikiann
    from plumbing.pretrained import load_token_classifier, load_tokenizer
    tokenizer = load_tokenizer(args.model)
    model = load_token_classifier(args.model, num_labels=7, attn_implementation=args.attn).eval()
    dev = load_wikiann("en", "dev", args.data_dir, max_sentences=args.batch_size * args.batches * 4)
    examples = encode_sentences(dev, tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    index = bucketed_batches(lengths, args.batch_size, generator=torch.Generator().manual_seed(0))
    batches = [collate([examples[i] for i in b], tokenizer.pad_token_id) for b in index[:args.batches]]
    return model, [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]


def with_method(base, config):
    """A copy of `base` that shares its body tensors (not its head), with `config`'s PEFT added."""
    body = {id(p): p for p in body_parameters(base).values()}
    model = copy.deepcopy(base, memo=body)
    if config is not None:
        add_peft(model, config, seed=0)
    return freeze_body(model)


def run_once(model, batches, train_step):
    start = time.perf_counter()
    for batch in batches:
        if train_step:
            model(**batch).logits.square().mean().backward()
        else:
            with torch.inference_mode():
                model(**batch)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="random 12-layer hidden-384 BERT instead of the default model")
    p.add_argument("--model", default="e5-small", help="model name or folder for pretrained.load_token_classifier")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    p.add_argument("--batches", type=int, default=4, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=7, help="timed passes per method")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--train-step", action="store_true", help="time forward + backward to phi instead of forward")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, batches = tiny_model_and_batches(args) if args.tiny else real_model_and_batches(args)
    models = {name: with_method(base, config) for name, config in METHODS.items()}
    total = sum(p.numel() for p in base.parameters())
    for model in models.values():
        run_once(model, batches[:1], args.train_step)  # warm-up
    times = {name: [] for name in models}
    names = list(models)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no method always first
            times[name].append(run_once(models[name], batches, args.train_step))

    tokens = sum(b["attention_mask"].sum().item() for b in batches)
    print(f"{'tiny random BERT-384x12' if args.tiny else args.model}, attn={args.attn}, "
          f"{len(batches)} batches of {args.batch_size} ({tokens} real tokens), threads={torch.get_num_threads()}, "
          f"{'forward+backward' if args.train_step else 'forward'}, {args.repeats} repeats")
    bare, best = statistics.median(times["bare"]), min(times["bare"])
    print(f"{'method':18s} {'trainable':>10s} {'fraction':>9s} "
          f"{'median':>8s} {'overhead':>9s} {'min':>8s} {'overhead':>9s}")
    for name, model in models.items():
        trainable = sum(p.numel() for p in peft_parameters(model).values())  # PEFT + head ("bare": head)
        own = sum(p.numel() for p in peft_parameters(model, include_head=False).values())
        t, m = statistics.median(times[name]), min(times[name])
        print(f"{name:18s} {trainable:10,d} {trainable / (total + own):9.4%} {t:7.3f}s {t / bare - 1:+9.1%} "
              f"{m:7.3f}s {m / best - 1:+9.1%}")


if __name__ == "__main__":
    main()
