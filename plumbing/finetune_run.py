"""The run folder of a fine-tuning run (finetune_peft.py): its flags checked, the body it starts
from recorded, the folder claimed and recorded. Nothing here trains; finetune_peft.py does.
"""

from contextlib import contextmanager
from pathlib import Path

from plumbing import cli, files, ner_data, runs

STAGE = "finetune_peft"
# what Ctrl-C leaves, said by cli.run_cli
INTERRUPTED = "the folder holds an unfinished run that evaluate_ner.py refuses; start it again with --overwrite"


def check_finetune_flags(args, evals, lr_peft, lr_full):
    """Out-of-range flags: one clear error each; fills in --eval-every (--steps / evals), --lr and --out."""
    cli.check_at_least(args, 1, "steps", "batch_size", "max_sentences", "dev_sentences", "eval_every", "max_len",
                        "max_tokens", "extra_sentences")
    args.extra_langs = check_extra_langs(args.lang, args.extra_langs, args.extra_sentences)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // evals)
    if not 0 <= args.warmup < 1:
        raise ValueError(f"--warmup must be in [0, 1) (got {args.warmup}): the fraction of --steps that warms up")
    if args.lr is None:
        args.lr = lr_full if args.peft == "full" else lr_peft
    cli.check_positive(args, "lr")
    cli.check_seed(args)
    ner_data.check_language(args.lang, "--lang")
    if args.out is None:
        args.out = f"checkpoints/ft-{Path(args.init).name}-{args.peft}-{args.lang}-s{args.seed}"


def check_extra_langs(lang, extra_langs, extra_sentences):
    """--extra-langs as a normalised string (None: the source language only); the source language
    or a repeated one among them is an error, and so is --extra-sentences without them."""
    if extra_langs is None:
        if extra_sentences is not None:
            raise ValueError("--extra-sentences needs --extra-langs (e.g. --extra-langs de,es)")
        return None
    langs = ner_data.parse_languages(extra_langs, "--extra-langs")
    if lang in langs:
        raise ValueError(f"--extra-langs {extra_langs}: give languages other than --lang {lang}, each once")
    return ",".join(langs)


def body_record(args, init_path, fmt):
    """What run.json says of the inputs: the body (its record, weights and config hashes, which
    evaluation checks the body against) and the data read."""
    extra = [(lang, "train") for lang in ner_data.parse_languages(args.extra_langs)] if args.extra_langs else []
    read = [(args.lang, "train"), (args.lang, "dev"), *extra]
    return dict(init=args.init, init_path=init_path, init_record=init_record(init_path),
                init_sha256=files.weights_sha256(init_path), init_config_sha256=files.config_sha256(init_path),
                data=ner_data.data_provenance(args.data_dir, read, fmt))


def init_record(init_path):
    """The record of the body's run (a primed folder), which must be finished; None for a plain model."""
    record = runs.read_record(init_path) if Path(init_path).is_dir() else None
    if record is not None and not runs.is_finished(record):
        raise ValueError(f"--init {init_path} is an unfinished {record.get('stage')} run: finish it "
                         f"(meta_pretrain.py --resume) or pick a finished body")
    return record


@contextmanager
def run_folder(args, record):
    """--out claimed for this run and recorded "running"; the caller adds "best" to `finished`, which
    is recorded last, when the run is complete."""
    out = Path(args.out)
    lock = runs.claim_run_folder(out, STAGE, args, overwrite=args.overwrite)
    try:
        print(f"fine-tuning into {out}", flush=True)
        runs.write_record(out, STAGE, args, status="running", **record)
        finished = {}
        yield out, finished
        runs.write_record(out, STAGE, args, status="finished", **finished, **record)
    finally:
        lock.close()
