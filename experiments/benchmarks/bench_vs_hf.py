"""Speed beside what a user would pick instead: this project's LoRA fine-tuning against the
transformers Trainer + HF peft LoRA, and evaluate_ner.py's scoring against transformers'
token-classification pipeline. Printed as ratios (ours / theirs). --whole-run: finetune_peft.py's
whole default run against the Trainer's, adapter, prefix and LoRA (whole_run.py).

    pip install --no-deps -r requirements-optional.txt           # peft, accelerate
    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_vs_hf.py --data-dir ../shared/data/wikiann
    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_vs_hf.py --steps 40 --warmup 5 --repeats 3 \\
        --eval-sentences 500
    # where the time goes (cProfile)
    python experiments/benchmarks/bench_vs_hf.py --steps 20 --warmup 3 --repeats 1 --profile

Fine-tuning: the same model (default e5-small), LoRA of the same shape (hf_peft.hf_lora_config),
batch size, AdamW, and the very same batches: finetune_peft.fine_tune draws its length-bucketed
batches, and the Trainer reads the same sentences in the same order with a sequential sampler,
so every step pads to the same length on both sides. A step is timed from the end of the
previous step to the end of this one (data, forward, backward, optimizer, scheduler, the loop's
own bookkeeping); the first --warmup steps and the last one (where finetune_peft.py scores the
dev set) are left out, and nothing is evaluated in the timed window.
Evaluation: the same model object, sentences and batch size; ours is evaluate_ner.py's path
(encode_sentences + predict_words: word-level label ids), the pipeline's is pre-split words with
aggregation_strategy="first", its entity groups mapped back to one tag per word.
Both sides run in one process, interleaved within each repeat, so load from other processes
hits both alike; on a shared machine the steadier fine-tuning figure is the median over steps of
the paired ratio (the same batch's time on both sides), which a burst of load moves little.
Targets: fine-tuning >= 1.0x the Trainer, evaluation >= 2x the pipeline.
"""

import argparse
import bisect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]
import whole_run  # noqa: E402
from hf_peft_trainer import hf_lora_model, hf_trainer, trainer_dataset  # noqa: E402

import adapters  # noqa: E402
import finetune_peft  # noqa: E402
from plumbing import cli, runs  # noqa: E402
from plumbing.batches import BatchStream, encode_sentences  # noqa: E402
from plumbing.cli import check_at_least, derive_seed, run_cli  # noqa: E402
from plumbing.ner_data import LABELS, load_wikiann  # noqa: E402
from plumbing.pretrained import load_token_classifier, load_tokenizer  # noqa: E402
from plumbing.scoring import predict_words  # noqa: E402

STEPS = 60            # fine-tuning steps per side and repeat (the first WARMUP are not timed)
WARMUP = 10           # steps left out of the timing: first allocations, lazy initialisation
BATCH_SIZE = 16       # finetune_peft.py's
EVAL_BATCH = 64       # evaluate_ner.py's --batch-size
EVAL_SENTENCES = 500  # fr test sentences scored per side and repeat
TRAIN_SENTENCES = 2000  # English train sentences the batches come from (enough for STEPS x BATCH_SIZE)
PROFILE_LINES = 15    # functions printed per profile


class StepClock:
    """perf_counter() at the end of every step (finetune_peft's metrics line, the Trainer's on_step_end)."""

    def __init__(self):
        self.ends = []

    def durations(self, steps, warmup):
        """Seconds of each of the steps warmup+1 .. steps-1."""
        if len(self.ends) < steps - 1:
            raise RuntimeError(f"only {len(self.ends)} steps were timed, expected {steps}")
        return [b - a for a, b in zip(self.ends[warmup - 1:steps - 2], self.ends[warmup:steps - 1])]


def timed_metrics_log(clock):
    """finetune_peft's MetricsLog, also noting when each step's line is written (the step's end)."""
    class TimedLog(runs.MetricsLog):
        def write(self, **metrics):
            super().write(**metrics)
            clock.ends.append(time.perf_counter())
    return TimedLog


def ours_train(args, train, seed):
    """Seconds of each timed step of finetune_peft.fine_tune (--peft lora)."""
    clock, real_log = StepClock(), runs.MetricsLog
    with tempfile.TemporaryDirectory(prefix="bench-vs-hf-") as out:
        ft_args = finetune_peft.build_parser().parse_args(
            ["--init", args.model, "--peft", "lora", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--eval-every", str(args.steps + 1), "--dev-sentences", "8", "--max-len", str(args.max_len),
             "--seed", str(seed), "--out", out])
        config = finetune_peft.check_args(ft_args)
        runs.MetricsLog = timed_metrics_log(clock)
        try:
            cli.set_seed(seed)  # as finetune_peft.main: the same PEFT draw and data order per seed
            model = finetune_peft.build_model(args.model, config, seed, torch.device("cpu"))
            tokenizer = load_tokenizer(args.model)
            finetune_peft.fine_tune(ft_args, model, tokenizer, train, train.select(range(8)), Path(out),
                                    {"init_path": None, "init_sha256": None, "init_config_sha256": None},
                                    torch.device("cpu"))
        finally:
            runs.MetricsLog = real_log
    return clock.durations(args.steps, args.warmup)


def batch_order(examples, batch_size, seed, steps, pad_id):
    """The sentence indices of finetune_peft.fine_tune's first `steps` batches (its BatchStream, epoch 0)."""
    stream = BatchStream(examples, batch_size, seed=derive_seed(seed, "train stream"), pad_id=pad_id)
    batches = stream._epoch_batches()[:steps]  # the stream's own draw, not a copy of its logic
    if len(batches) < steps or any(len(b) != batch_size for b in batches):
        raise ValueError(f"--train-sentences is too small for {steps} full batches of {batch_size}")
    return [i for b in batches for i in b]


def full_batches(train, batch_size):
    """The first sentences of `train` that fill whole batches: the stream's length pools then all
    hold a multiple of batch_size (BatchStream cuts pools of 100 batches), so no short batch falls
    among the steps (the Trainer's sequential sampler cuts fixed-size batches). A split shorter than
    --train-sentences (the tests' corpus: 120 en train sentences) is cut the same way."""
    return train.select(range(len(train) - len(train) % batch_size))


def hf_train(args, examples, order, tokenizer, seed):
    """Seconds of each timed step of Trainer + HF peft LoRA on the same batches (sequential sampler)."""
    from transformers import TrainerCallback
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.ends.append(time.perf_counter())

    model = hf_lora_model(args.model, 8, seed)
    with tempfile.TemporaryDirectory(prefix="bench-vs-hf-") as out:
        trainer = hf_trainer(model, tokenizer, trainer_dataset([examples[i] for i in order]), args.steps,
                             args.batch_size, seed, out, sampling="sequential")
        trainer.add_callback(Clock())
        trainer.train()
    return clock.durations(args.steps, args.warmup)


def ours_eval(model, data, tokenizer, max_len):
    """evaluate_ner.py's path: encode, predict, one label id per word. (sentences/s, predictions)."""
    t0 = time.perf_counter()
    examples = encode_sentences(data, tokenizer, max_len)
    predicted = predict_words(model, examples, EVAL_BATCH, "cpu", tokenizer.pad_token_id)
    return len(data) / (time.perf_counter() - t0), predicted


def word_tags(groups, words):
    """The pipeline's entity groups (aggregation "first") as one IOB2 tag per word."""
    starts, position = [], 0
    for word in words:
        starts.append(position)
        position += len(word) + 1  # the pipeline joins pre-split words with one space
    tags = ["O"] * len(words)
    for group in groups:  # a group spans the words whose characters it covers
        first = bisect.bisect_right(starts, group["start"]) - 1
        last = bisect.bisect_left(starts, group["end"]) - 1
        if group["entity_group"] != "O":
            tags[first:last + 1] = [f"B-{group['entity_group']}"] + [f"I-{group['entity_group']}"] * (last - first)
    return tags


def pipeline_eval(model, data, tokenizer):
    """transformers' token-classification pipeline on the same words: (sentences/s, tags per word)."""
    from transformers import pipeline
    ner = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="first",
                   ignore_labels=[], batch_size=EVAL_BATCH, device="cpu")
    sentences = [list(words) for words in data["tokens"]]
    t0 = time.perf_counter()
    groups = ner(sentences, is_split_into_words=True)
    tags = [word_tags(g, words) for g, words in zip(groups, sentences)]
    return len(sentences) / (time.perf_counter() - t0), tags


def type_agreement(ours, theirs):
    """Fraction of words whose entity type (PER / ORG / LOC / O) both sides predict alike."""
    pairs = [(LABELS[o].split("-")[-1], t.split("-")[-1]) for os_, ts in zip(ours, theirs) for o, t in zip(os_, ts)]
    return sum(a == b for a, b in pairs) / len(pairs)


def profiled(enabled, title, function, *args):
    """function(*args), under cProfile when enabled: prints where its time went (top functions by own time)."""
    if not enabled:
        return function(*args)
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    result = profiler.runcall(function, *args)
    print(f"\n--- {title}: top functions by own time", flush=True)
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(PROFILE_LINES)
    return result


def build_parser():
    p = argparse.ArgumentParser(description="This project's fine-tuning and evaluation speed against transformers'.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="e5-small", help="the body on both sides")
    p.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps per side and repeat (default {STEPS}; with --whole-run the default "
                        f"run's {whole_run.DEFAULT_STEPS}, and fewer keep its shape: a run of minutes)")
    p.add_argument("--whole-run", action="store_true",
                   help="time finetune_peft.py's whole default run (dev selection included) against the Trainer's, "
                        "for adapter, prefix and LoRA (whole_run.py)")
    p.add_argument("--warmup", type=int, default=WARMUP, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per training batch")
    p.add_argument("--train-sentences", type=int, default=TRAIN_SENTENCES, help="English train sentences read")
    p.add_argument("--eval-sentences", type=int, default=EVAL_SENTENCES, help="fr test sentences scored per side")
    p.add_argument("--max-len", type=int, default=128, help="sub-word truncation length")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every measurement")
    p.add_argument("--threads", type=int, default=None, help=f"with --whole-run: {cli.THREADS_HELP}")
    p.add_argument("--profile", action="store_true",
                   help="also print cProfile's top functions of each side's fine-tuning and evaluation (first repeat)")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub's wikiann)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.whole_run:
        check_at_least(args, 1, "steps", "repeats")
        cli.set_threads(args)  # both sides: the Trainer in this process, ours through finetune_peft's --threads
        return whole_run.whole_run(args)
    args.steps = STEPS if args.steps is None else args.steps
    check_at_least(args, 1, "steps", "batch_size", "train_sentences", "eval_sentences", "max_len", "repeats")
    if not 1 <= args.warmup < args.steps - 1:
        raise ValueError(f"--warmup must be at least 1 and below --steps - 1 ({args.steps - 1}), got {args.warmup}")
    tokenizer = load_tokenizer(args.model)
    train = full_batches(load_wikiann("en", "train", args.data_dir, args.train_sentences), args.batch_size)
    examples = encode_sentences(train, tokenizer, args.max_len)
    test = load_wikiann("fr", "test", args.data_dir, args.eval_sentences)
    model = load_token_classifier(args.model, num_labels=len(LABELS), id2label=LABELS)
    adapters.add_peft(model, adapters.PeftConfig("lora"), seed=0)  # the model both evaluations run
    rates = {k: [] for k in ("ours_train", "hf_train", "ours_eval", "pipeline_eval")}
    print(f"torch threads {torch.get_num_threads()}; {args.steps} steps ({args.warmup} warm-up), batch "
          f"{args.batch_size}; {len(test)} fr test sentences, batch {EVAL_BATCH}", flush=True)
    ours_eval(model, test.select(range(8)), tokenizer, args.max_len)  # warm-up of both, not timed
    pipeline_eval(model, test.select(range(8)), tokenizer)
    step_ratios = []
    for repeat in range(args.repeats):
        order = batch_order(examples, args.batch_size, repeat, args.steps, tokenizer.pad_token_id)
        profile = args.profile and repeat == 0
        ours = profiled(profile, "ours: fine-tuning", ours_train, args, train, repeat)
        theirs = profiled(profile, "Trainer + HF peft", hf_train, args, examples, order, tokenizer, repeat)
        rates["ours_train"].append(len(ours) / sum(ours))
        rates["hf_train"].append(len(theirs) / sum(theirs))
        step_ratios += [t / o for o, t in zip(ours, theirs)]  # step i is the same batch on both sides
        ours_rate, ours_pred = profiled(profile, "ours: evaluation", ours_eval, model, test, tokenizer, args.max_len)
        pipe_rate, pipe_tags = profiled(profile, "pipeline", pipeline_eval, model, test, tokenizer)
        rates["ours_eval"].append(ours_rate)
        rates["pipeline_eval"].append(pipe_rate)
        print(f"repeat {repeat}: fine-tuning {rates['ours_train'][-1]:.2f} vs {rates['hf_train'][-1]:.2f} steps/s; "
              f"evaluation {ours_rate:.1f} vs {pipe_rate:.1f} sentences/s; word types agree on "
              f"{100 * type_agreement(ours_pred, pipe_tags):.1f}% of words", flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nfine-tuning (LoRA): ours {median['ours_train']:.2f} steps/s, Trainer + HF peft "
          f"{median['hf_train']:.2f} steps/s: {median['ours_train'] / median['hf_train']:.2f}x; median over the "
          f"{len(step_ratios)} timed steps of (Trainer's time / ours) on the same batch: "
          f"{statistics.median(step_ratios):.2f}x (target >= 1.0x)")
    print(f"evaluation: ours {median['ours_eval']:.1f} sentences/s, token-classification pipeline "
          f"{median['pipeline_eval']:.1f} sentences/s: {median['ours_eval'] / median['pipeline_eval']:.2f}x "
          f"(target >= 2x)   (medians over {args.repeats} repeats)")
    return rates


if __name__ == "__main__":
    run_cli(main)
