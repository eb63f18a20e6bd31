"""The run folder of a priming run (meta_pretrain.py): claimed before training, recorded while it
runs, finished with the primed body. Nothing here is the method; meta_pretrain.py calls it.

    lock = claim(args, shaping, data)              # --out is this run's (or one clear error)
    record(out, args, "running", data=data)       # run.json: every flag, the code version, the input model
    finish(out, args, body, tokenizer, ...)       # the primed body, its model card, run.json "finished"
"""

import os
import warnings
from pathlib import Path

import torch

from plumbing import cli, distributed, files, model_card, ner_data, pretrained, resume_state, runs

STAGE = "meta_pretrain"
# flags that may change between an interrupted run and its --resume (everything else shapes the run;
# --data-dir is compared resolved, with $WIKIANN_DIR and the files' bytes, by runs.check_same_data)
NOT_SHAPING = {"steps", "resume", "overwrite", "gpu", "threads", "out", "eval_every", "save_every", "reference_ft",
               "keep_resume", "log_adaptation_every", "data_dir"}
# what Ctrl-C leaves, said by run_cli
INTERRUPTED = "the last resumable checkpoint is kept: continue with --resume (same --out)"


def default_out(args):
    return f"checkpoints/primed-{Path(args.model).name}-{args.method}-{args.peft}-s{args.seed}"


def check_inputs_survive(args):
    """The folders this run reads: --overwrite (or a resumed run's first save) would delete them."""
    model = None if args.model in pretrained.DEFAULT_ALIASES else args.model
    runs.check_out_is_not_input(args.out, model, "--model", "the body")
    runs.check_out_is_not_input(args.out, args.reference_ft, "--reference-ft", "the reference fine-tuning")


def claim(args, data):
    """--out becomes this run's folder (runs.claim_run_folder); returns the lock to hold while it runs."""
    return runs.claim_run_folder(Path(args.out), STAGE, args, shaping=shaping_flags(args), resume=args.resume,
                            overwrite=args.overwrite, data=data)


def interrupted_advice(out, save_every, claimed):
    """What a Ctrl-C leaves, truly said (run_cli prints it): --resume only where a resume.pt is there."""
    if (out / resume_state.FILE).is_file():
        return INTERRUPTED
    if claimed:
        return (f"no resumable checkpoint was saved yet in {out} (the first comes after --save-every {save_every} "
                f"meta-steps), so --resume cannot continue it: start it again with --overwrite (same --out)")
    return f"nothing in {out} was written or changed"


def start_log(out, args, inputs, start):
    """A run being extended is no finished model until it ends; run.json says "running"."""
    for finished_only in ("config.json", model_card.CARD):
        (out / finished_only).unlink(missing_ok=True)
    record(out, args, status="running", **inputs)
    if args.resume:
        print(f"resuming {out} from step {start}")


def resume_flags(args, data, parser, check):
    """The flags that give this run back to meta_pretrain.py --resume (cli.flags_for through the stage's
    `parser` and `check`), its input model and data folder as the run resolved them; run.json keeps them
    so that advice to re-save the body (pretrained.resume_command) is the run's own command."""
    values = dict(vars(args))
    if values["model"] not in pretrained.DEFAULT_ALIASES:
        values["model"] = pretrained.resolve_model(args.model)
    values["data_dir"] = (data or {}).get("dir") or values.get("data_dir")
    return cli.flags_for(parser, values, check, leave_out={"resume", "overwrite", "out", "steps", "gpu", "threads",
                                                            "reference_ft"})


def record(out, args, status, **extra):
    """run.json: every flag, the seed, the code version, the input model (and its own record)."""
    source = pretrained.resolve_model(args.model)
    runs.write_record(out, STAGE, args, status=status, input_model=args.model, input_model_path=source,
                 input_record=runs.read_record(source) if Path(source).is_dir() else None, **extra)


def finish(out, args, body, tokenizer, body_change, inputs, rates):
    """The primed body and its model card, then the record that marks the run finished (written last)."""
    files.save_model_atomic(body, tokenizer, out)
    model_card.write_model_card(out, vars(args), body_change, runs.code_version())
    record(out, args, status="finished", body_change=body_change, **inputs,
           **({"meta_sgd_rates": {n: r.item() for n, r in rates.items()}} if rates else {}))
    resume = out / resume_state.FILE
    if not args.keep_resume:
        resume.unlink(missing_ok=True)
    elif resume.is_file():
        print(f"{resume} ({resume.stat().st_size / 2**20:.0f} MB) is kept so that --resume --steps N can extend "
              f"this run; delete it (or pass --no-keep-resume) if the run is final")
    print(f"primed body written to {out} (load it with --init {out} or AutoModel.from_pretrained)")


def body_only(model, args):
    """The primed body theta: the encoder without the PEFT modules and head, an ordinary pretrained
    model; its config.json notes the priming (method, PEFT, languages, steps)."""
    from transformers import AutoModel
    encoder = getattr(model, model.base_model_prefix)
    plain = AutoModel.from_config(encoder.config, add_pooling_layer=False) \
        if encoder.config.model_type in ("bert", "xlm-roberta", "roberta") else AutoModel.from_config(encoder.config)
    body = {k: v for k, v in encoder.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(body, strict=True)
    plain.config.priming = {"method": args.method, "peft": args.peft, "source_lang": args.source_lang,
                            "priming_langs": args.priming_langs, "steps": args.steps}
    return plain


def check_priming_flags(args, world, local_rank):
    """Inconsistent or out-of-range flags of meta_pretrain.py: one clear error each."""
    if args.resume and args.overwrite:  # --overwrite would delete the resume.pt that --resume reads
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one of them "
                         "(nothing was changed)")
    if args.method == "mtl":
        for flag, bad in [("--first-order", args.first_order), ("--outer-peft", args.outer_peft),
                          ("--inner-params all", args.inner_params == "all"), ("--meta-sgd", args.meta_sgd)]:
            if bad:
                raise ValueError(f"{flag} is a MAML option; it has no meaning with --method mtl")
    cli.check_at_least(args, 1, "steps", "tasks_per_step", "batch_size", "max_len", "inner_steps", "max_sentences",
                   "save_every", "eval_sentences", "max_tokens", "log_adaptation_every")
    cli.check_at_least(args, 0, "eval_every")
    cli.check_positive(args, "inner_lr", "outer_lr", "inner_clip", "meta_sgd_lr")
    cli.check_seed(args)
    ner_data.check_language(args.source_lang, "--source-lang")
    if args.tasks_per_step % world:
        raise ValueError(f"--tasks-per-step {args.tasks_per_step} must be divisible by the number of processes "
                         f"({world}): it is the global meta-batch, split evenly across them")
    if world > 1 and args.gpu is not None:
        raise ValueError("--gpu with several torchrun processes: leave it out, each process takes GPU LOCAL_RANK "
                         "(choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if world > 1 and args.meta_sgd:
        raise ValueError("--meta-sgd runs in one process only (its rates are not averaged across torchrun processes)")
    if "LOCAL_RANK" in os.environ and args.gpu is None and torch.cuda.is_available():
        args.gpu = local_rank  # under torchrun: one GPU per process
    args.priming_langs = ",".join(ner_data.parse_languages(args.priming_langs, "--priming-langs"))
    if args.source_lang in ner_data.parse_languages(args.priming_langs):
        warnings.warn(f"--source-lang {args.source_lang} is also a priming language")
    check_reference_ft(args)
    args.out = args.out or default_out(args)
    check_inputs_survive(args)


def check_reference_ft(args):
    """--reference-ft is a fine-tuning folder of the same PEFT method, checked before --out is claimed."""
    if args.reference_ft is None:
        return
    config = Path(args.reference_ft) / "peft_config.json"
    if not config.is_file():
        raise ValueError(f"--reference-ft {args.reference_ft} holds no peft_config.json: give a finetune_peft.py "
                         f"folder of --peft {args.peft}")
    saved = files.read_json_object(config, "give another --reference-ft").get("peft_config")
    method = saved.get("method") if isinstance(saved, dict) else None
    if method is None:
        raise ValueError(f"{config} holds no \"peft_config\" (the PEFT method and its sizes): give another "
                         f"--reference-ft")
    if method != args.peft:
        raise ValueError(f"--reference-ft {args.reference_ft} was fine-tuned with --peft {method}, but this run primes "
                         f"for --peft {args.peft}: give a reference of the same PEFT method")


def shaping_flags(args):
    """The flags a --resume must repeat (run.json holds them all)."""
    return sorted(set(vars(args)) - NOT_SHAPING)


def run_identity(args):
    """What resume.pt records of the run it belongs to: the flags a --resume must repeat (--seed,
    --peft, --method ... as run.json holds them), so another run's resume.pt is refused."""
    return {flag: getattr(args, flag) for flag in shaping_flags(args)}


def resume(args, model, run, source, out, device, rank):
    """--resume: the state of resume.pt into `model`, `run` and `source` (resume_state.py)."""
    rngs = {"task_rng": run.task_rng, "phi_rng": run.phi_rng}
    run.start = resume_state.load(out, model, run.optimizer, source, rngs, rank, run.rates, run.carried,
                                  run_identity(args))
    if run.start > args.steps:  # the folder would hold `start` steps of training recorded as --steps
        raise ValueError(f"--resume --steps {args.steps}: the run in {out} has done {run.start} meta-steps already; "
                         f"give --steps {run.start} or more (nothing was changed)")
    for key in ("phi_0", "phi"):  # resume_state loads onto the CPU
        if run.carried and key in run.carried:
            run.carried[key] = {n: t.to(device) for n, t in run.carried[key].items()}


def save_resumable(args, model, run, source, out, step, world, rank, also):
    """resume.pt every --save-every meta-steps and at the end (every process takes part: RNG states)."""
    if step % args.save_every == 0 or step == args.steps:
        processes = distributed.rng_states(world)  # every process calls it (a collective); rank 0 saves
        if rank == 0:
            rngs = {"task_rng": run.task_rng, "phi_rng": run.phi_rng, "processes": processes}
            resume_state.save(out, step, model, run.optimizer, source, rngs, run.rates, run.carried,
                              run_identity(args), also=also)
        distributed.wait_for_all(world)


def rate_summary(rates):
    """Meta-SGD's learned inner rates in metrics.jsonl: their mean, min and max."""
    if not rates:
        return {}
    values = torch.stack([r.detach() for r in rates.values()])
    return {"inner_lr_mean": values.mean().item(), "inner_lr_min": values.min().item(),
            "inner_lr_max": values.max().item()}


def check_losses(metrics, step, inner_loop="unrolled"):
    """Every logged loss finite, before the optimizer step it would poison."""
    rates = "--implicit-lr / --outer-lr" if inner_loop == "implicit" else "--inner-lr / --outer-lr or set --inner-clip"
    for name, value in metrics.items():
        if "loss" in name:
            cli.check_finite(value, f"{name} at meta-step {step}",  # not --overwrite: it would delete resume.pt
                         f"lower {rates} and start again with a new --out (this folder's resume.pt, "
                         f"saved before the failure, is kept)")
