"""The whole job beside the Trainer (bench_vs_hf.py --whole-run): finetune_peft.py's default run, dev
selection included, against the transformers Trainer doing the same steps with the same dev
evaluations, for adapter, prefix and LoRA; the time of each, start (data read) to end, and the ratio.

    python experiments/benchmarks/bench_vs_hf.py --whole-run                 # the default run: long
    python experiments/benchmarks/bench_vs_hf.py --whole-run --steps 100     # a few minutes a method

Ours: finetune_peft.main with its defaults (--steps 1000, 10 dev evaluations of 1,000 en dev
sentences, the best step's tensors saved). --steps N keeps the shape of that run (10 evaluations)
and scales the dev sentences with it (1,000 x N / 1000), so the share of time spent evaluating
stays the default run's. Theirs: a Trainer on the same sentences (the same tokenisation) with the
same batch size, lr, schedule and steps, its own length-grouped sampler and collator, and
eval_strategy "steps" on the same dev sentences at the same steps (batch 64, as ours), scored
with seqeval's default mode on the labelled (first) sub-words; the model trained is this project's
for adapter and prefix (HF peft has no Houlsby adapter) and HF peft's LoRA for lora.
Like for like: both clip nothing and decay every trainable tensor by 0.01 (finetune_peft.py's
AdamW; the Trainer's defaults would clip at 1.0 and keep biases and LayerNorm out of the decay).
The Trainer saves nothing (ours saves each new best), which can only favour it. The two sides run
one after the other per method (a Trainer's loop cannot be driven step by step beside ours), in
alternating order over --repeats, so a burst of load lands on both alike only on average.
"""

import statistics
import tempfile
import time

import torch

import finetune_peft
from plumbing import batches, ner_data, pretrained
from plumbing.runs import read_record
from plumbing.scoring import tag_scores

METHODS = ("adapter", "prefix", "lora")
DEFAULT_STEPS = finetune_peft.STEPS
DEV_PER_STEP = finetune_peft.DEV_SENTENCES / finetune_peft.STEPS  # dev sentences per step of the default run
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default: finetune_peft.py's, on every trainable tensor


def run_shape(steps):
    """(dev sentences, eval_every) of a run of `steps` with the default run's shape."""
    return max(1, round(DEV_PER_STEP * steps)), max(1, steps // finetune_peft.EVALS)


def ours(model, peft, steps, data_dir, seed, threads):
    """Seconds of finetune_peft.main (its defaults but --steps, scaled dev) and its best dev F1."""
    dev_sentences, _ = run_shape(steps)
    with tempfile.TemporaryDirectory(prefix="whole-run-") as out:
        argv = ["--init", model, "--peft", peft, "--steps", str(steps), "--dev-sentences", str(dev_sentences),
                "--seed", str(seed), "--threads", str(threads), "--out", out,
                "--overwrite"] + (["--data-dir", data_dir] if data_dir else [])
        t0 = time.perf_counter()
        finetune_peft.main(argv)
        seconds = time.perf_counter() - t0
        best = read_record(out)["best"]["dev_f1_default"]
    return seconds, best


def trainer_model(model, peft, seed):
    """The model the Trainer trains: ours for adapter and prefix, HF peft's LoRA for lora."""
    if peft == "lora":
        from hf_peft_trainer import hf_lora_model
        return hf_lora_model(model, 8, seed)
    args = finetune_peft.build_parser().parse_args(["--peft", peft])
    return finetune_peft.build_model(model, finetune_peft.check_args(args), seed, torch.device("cpu"))


def seqeval_metrics(prediction):
    """The Trainer's compute_metrics: seqeval default-mode F1 over the labelled sub-words."""
    logits, labels = prediction
    best = logits.argmax(-1)
    gold, pred = [], []
    for row_pred, row_gold in zip(best, labels):
        keep = row_gold != -100
        gold.append([ner_data.LABELS[t] for t in row_gold[keep]])
        pred.append([ner_data.LABELS[t] for t in row_pred[keep]])
    return {"f1": tag_scores(gold, pred)["f1_default"]}


def theirs(model, peft, steps, data_dir, seed, threads):
    """Seconds of the Trainer's run of the same shape (data read to the end) and its best dev F1."""
    torch.set_num_threads(threads)
    from hf_peft_trainer import BATCH_SIZE, LR, WARMUP, trainer_dataset
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments
    dev_sentences, eval_every = run_shape(steps)
    t0 = time.perf_counter()
    tokenizer = pretrained.load_tokenizer(model)
    encode = lambda split, n: trainer_dataset(batches.encode_sentences(  # noqa: E731
        ner_data.load_wikiann("en", split, data_dir, n), tokenizer, finetune_peft.MAX_LEN))
    train, dev = encode("train", finetune_peft.MAX_SENTENCES), encode("dev", dev_sentences)
    net = trainer_model(model, peft, seed)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)  # one group: every tensor decays
    with tempfile.TemporaryDirectory(prefix="whole-run-") as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH_SIZE,
                                 per_device_eval_batch_size=64, learning_rate=LR, warmup_steps=WARMUP,
                                 lr_scheduler_type="linear", max_grad_norm=0.0, seed=seed,
                                 train_sampling_strategy="group_by_length", eval_strategy="steps",
                                 eval_steps=eval_every, save_strategy="no", logging_strategy="no",
                                 report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=net, args=args, train_dataset=train, eval_dataset=dev,
                          data_collator=DataCollatorForTokenClassification(tokenizer),
                          compute_metrics=seqeval_metrics, optimizers=(optimizer, None))
        trainer.train()
        evaluations = [e["eval_f1"] for e in trainer.state.log_history if "eval_f1" in e]
    return time.perf_counter() - t0, max(evaluations)


def whole_run(args):
    """Both sides per method, --repeats times (alternating which goes first); prints one line each."""
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    ratios = {}
    for peft in METHODS:
        times = {"ours": [], "theirs": []}
        for repeat in range(args.repeats):
            sides = [("ours", ours), ("theirs", theirs)][::1 if repeat % 2 == 0 else -1]
            for name, side in sides:
                seconds, f1 = side(args.model, peft, steps, args.data_dir, repeat, args.threads)
                times[name].append(seconds)
                print(f"  {peft} repeat {repeat} {name}: {seconds:.1f} s, best dev F1 {f1:.2f}", flush=True)
        o, t = statistics.median(times["ours"]), statistics.median(times["theirs"])
        ratios[peft] = t / o
        print(f"whole-run {peft}: ours {o:.1f} s, Trainer {t:.1f} s, ratio {t / o:.2f}", flush=True)
    return ratios
