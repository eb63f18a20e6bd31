"""Priming: meta-learn a pretrained encoder for later PEFT fine-tuning (METHOD.md).

    python meta_pretrain.py                                   # the default: e5-small, adapters, en -> de,es, CPU
    python meta_pretrain.py --gpu 0 --model xlm-roberta-base --steps 2000 --max-sentences 20000
    python meta_pretrain.py --peft prefix --first-order       # an ablation: first-order meta-gradient
    python meta_pretrain.py --method mtl                      # multi-task priming, same data and steps
    python meta_pretrain.py --resume                          # continue an interrupted run in --out
    python meta_pretrain.py --inner-loop implicit             # the inner loop: a near-converged fine-tuning
    torchrun --nproc_per_node 4 meta_pretrain.py --model xlm-roberta-base --tasks-per-step 8   # 4 GPUs, 2 tasks each

One meta-step (METHOD.md, "One priming episode"), for each of --tasks-per-step tasks:
  1. the episode: a support batch in the source language (what downstream PEFT will see) and a
     query batch in a priming language, or the source language with --query same (episodes.py),
  2. where phi starts and which tensors are fast: fresh PEFT tensors and head (`phi_start`),
  3. the inner loop: --inner-steps SGD steps on the fast tensors only (maml.inner_loop),
  4. the meta-gradient: the query loss of (theta, phi') back-propagated into theta
     (`meta_gradient`), then AdamW on theta (the outer loop).
With --inner-loop implicit, 2.-4. are implicit_priming.meta_gradient: the inner loop is a fine-tuning of phi
on its own stream of source-language batches (Adam by default, as finetune_peft.py), continued
from the previous meta-step's phi and re-drawn fresh every --fresh-every meta-steps (a warm
start), and the meta-gradient is implicit.hypergradient on each task's support and query batch.
The output folder is an ordinary transformers checkpoint of the primed body theta (the PEFT
tensors and head are dropped: downstream fine-tuning starts them fresh), plus run.json (every
flag), metrics.jsonl, resume.pt (resume_state.py) and README.md, its model card in the hub's
format (model_card.py).
"""

import argparse
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import adapters
import episodes
import implicit_priming
import maml
import peft_config
from plumbing import distributed, model_card, peft_state, resume_state
from plumbing.ner_data import (
    LABELS,
    add_data_flags,
    check_language,
    data_format_from_flags,
    data_provenance,
    parse_languages,
)
from plumbing.pretrained import (
    DEFAULT_ALIASES,
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
    code_version,
    derive_seed,
    parser_taking_negative_numbers,
    read_json_object,
    read_record,
    run_cli,
    save_model_atomic,
    set_seed,
    write_record,
)

# --------------------------------------------------------------------- defaults -----
# Budget: the README's main job; a meta-step of these defaults takes ~5 s on a quiet CPU core (RESULTS.md).
STEPS = 60               # meta-steps (outer optimizer steps); the paper-scale run wants thousands
TASKS_PER_STEP = 2       # tasks averaged per meta-step (METHOD.md step 4)
BATCH_SIZE = 8           # sentences per support / query batch
MAX_LEN = 64             # sub-words; WikiANN sentences are short (median ~ 14 sub-words)
MAX_SENTENCES = 2000     # sentences read per language: enough for the default budget
INNER_STEPS = 5          # with INNER_LR: support loss 1.95 -> 1.12 (0.58 x) on fresh adapters (search_inner.py)
INNER_LR = 0.3           # the search's pick: lowest held-out query loss among settings that adapt (RESULTS.md)
OUTER_LR = 5e-5          # AdamW on the body: 2e-4 diverged after 30 meta-steps, 2e-5 is slower (RESULTS.md)
META_SGD_LR = 1e-3       # AdamW on Meta-SGD's learned inner rates: they are O(inner lr), not O(weights)
EVAL_EVERY = 20          # held-out query loss every N meta-steps
SAVE_EVERY = 20          # resumable checkpoint every N meta-steps
# flags that may change between an interrupted run and its --resume (everything else shapes the run;
# --data-dir is compared resolved, with $WIKIANN_DIR and the files' bytes, by runs.check_same_data)
NOT_SHAPING = {"steps", "resume", "overwrite", "gpu", "out", "eval_every", "save_every", "reference_ft", "keep_resume",
               "log_adaptation_every", "data_dir"}


def build_parser():
    p = argparse.ArgumentParser(description="Prime a pretrained encoder for PEFT with MAML (or MTL).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=["maml", "mtl"], default="maml",
                   help="maml: meta-learning priming; mtl: plain multi-task training on the same data")
    p.add_argument("--peft", choices=peft_config.METHODS, default="adapter",
                   help="the PEFT method that priming prepares for (simulated in the inner loop)")
    peft_config.add_peft_flags(p)
    p.add_argument("--inner-params", choices=["peft", "all"], default="peft",
                   help="what the inner loop updates: peft (PEFT + head, the paper) or all (standard MAML ablation)")
    p.add_argument("--outer-peft", action="store_true",
                   help="keep one initial PEFT + head across episodes and meta-update it too (plain MAML ablation)")
    p.add_argument("--query", choices=["cross", "same"], default="cross",
                   help="query batch in a priming language (cross) or in the source language (same, ablation)")
    p.add_argument("--first-order", action="store_true",
                   help="first-order meta-gradient (drops the Hessian term; with --inner-loop implicit: only "
                        "dL_Q/dtheta at phi_hat, no CG)")
    p.add_argument("--inner-loop", choices=["unrolled", "implicit"], default="unrolled",
                   help="unrolled: --inner-steps SGD steps differentiated through (maml.py); implicit: a "
                        "near-converged fine-tuning differentiated by the implicit function theorem (implicit.py)")
    p.add_argument("--inner-steps", type=int, default=INNER_STEPS, help="SGD steps of the inner loop")
    p.add_argument("--inner-lr", type=float, default=INNER_LR, help="inner-loop SGD learning rate")
    p.add_argument("--inner-clip", type=float, default=None, help="clip the inner gradient to this global norm")
    p.add_argument("--meta-sgd", action="store_true",
                   help="Meta-SGD (Li et al. 2017): one learned inner learning rate per fast tensor, starting at "
                        "--inner-lr, updated by the outer optimizer")
    p.add_argument("--meta-sgd-lr", type=float, default=META_SGD_LR, help="outer AdamW learning rate of those rates")
    implicit_priming.add_flags(p)
    p.add_argument("--outer-lr", type=float, default=OUTER_LR, help="AdamW learning rate of the outer loop")
    p.add_argument("--tasks-per-step", type=int, default=TASKS_PER_STEP,
                   help="tasks averaged per meta-step; under torchrun the global count, split evenly across processes")
    p.add_argument("--steps", type=int, default=STEPS, help="meta-steps (optimizer steps); same for mtl")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per support/query batch")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="also cut support/query batches at this many padded tokens (sentences x length): even "
                        "memory per step on a GPU")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast for the forward passes (second-order MAML included)")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="sub-word truncation length")
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the word embeddings fixed (most of the parameters; saves optimizer memory)")
    p.add_argument("--source-lang", default="en", help="language of the support batches (downstream training)")
    p.add_argument("--priming-langs", default="de,es",
                   help="comma-separated query languages (never evaluation languages)")
    p.add_argument("--max-sentences", type=int, default=MAX_SENTENCES, help="train sentences read per language")
    p.add_argument("--eval-sentences", type=int, default=200,
                   help="dev sentences per priming language for the held-out query loss")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="held-out query loss every N steps (0: never)")
    p.add_argument("--log-adaptation-every", type=int, default=1,
                   help="support loss after the inner loop every N meta-steps (an extra forward, ~11%% of a step)")
    p.add_argument("--save-every", type=int, default=SAVE_EVERY, help="resumable checkpoint every N steps")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="e5-small (offline default), a folder, or a hub id (xlm-roberta-base)")
    add_data_flags(p)
    p.add_argument("--gpu", type=int, default=None,
                   help="CUDA device index; leave out for the CPU. Under torchrun leave it out: each process "
                        "takes GPU LOCAL_RANK (choose GPUs with CUDA_VISIBLE_DEVICES; with none visible, "
                        "gloo on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of every RNG (data order, fresh PEFT draws, dropout)")
    p.add_argument("--out", default=None,
                   help="output folder (default: checkpoints/primed-<model>-<method>-<peft>-s<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted (or extend the finished) run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (another run's files are deleted)")
    p.add_argument("--keep-resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep resume.pt after the run (it lets --resume --steps N extend it; hundreds of MB)")
    p.add_argument("--reference-ft", default=None,
                   help="a finetune_peft.py folder (same PEFT, fine-tuned on --model without priming): then each "
                        "evaluation also logs inner_loop_strength, the share of the held-out loss gap between fresh "
                        "and fine-tuned PEFT that the inner loop closes")
    return parser_taking_negative_numbers(p)


def check_args(args):
    """Inconsistent or out-of-range flags: one clear error each. Returns the PEFT config."""
    if args.method == "mtl":
        for flag, bad in [("--first-order", args.first_order), ("--outer-peft", args.outer_peft),
                          ("--inner-params all", args.inner_params == "all"), ("--meta-sgd", args.meta_sgd)]:
            if bad:
                raise ValueError(f"{flag} is a MAML option; it has no meaning with --method mtl")
    implicit_priming.check_flags(args, distributed.torchrun_world()[0],
                                 {"inner_steps": INNER_STEPS, "inner_lr": INNER_LR})
    check_at_least(args, 1, "steps", "tasks_per_step", "batch_size", "max_len", "inner_steps", "max_sentences",
                   "save_every", "eval_sentences", "max_tokens", "log_adaptation_every")
    check_at_least(args, 0, "eval_every")
    check_positive(args, "inner_lr", "outer_lr", "inner_clip", "meta_sgd_lr")
    check_seed(args)
    check_language(args.source_lang, "--source-lang")
    world, _, local_rank = distributed.torchrun_world()
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
    args.priming_langs = ",".join(parse_languages(args.priming_langs, "--priming-langs"))
    if args.source_lang in parse_languages(args.priming_langs):
        warnings.warn(f"--source-lang {args.source_lang} is also a priming language")
    check_reference_ft(args)
    if args.out is None:
        args.out = f"checkpoints/primed-{Path(args.model).name}-{args.method}-{args.peft}-s{args.seed}"
    # the folders this run reads: --overwrite (or a resumed run's first save) would delete them
    check_out_is_not_input(args.out, None if args.model in DEFAULT_ALIASES else args.model, "--model", "the body")
    check_out_is_not_input(args.out, args.reference_ft, "--reference-ft", "the reference fine-tuning")
    return peft_config.peft_config_from_flags(args, args.peft)


def check_reference_ft(args):
    """--reference-ft is a fine-tuning folder of the same PEFT method, checked before --out is claimed."""
    if args.reference_ft is None:
        return
    config = Path(args.reference_ft) / "peft_config.json"
    if not config.is_file():
        raise ValueError(f"--reference-ft {args.reference_ft} holds no peft_config.json: give a finetune_peft.py "
                         f"folder of --peft {args.peft}")
    method = peft_state.saved_peft_config(read_json_object(config, "give another --reference-ft"), config,
                                          "give another --reference-ft").method
    if method != args.peft:
        raise ValueError(f"--reference-ft {args.reference_ft} was fine-tuned with --peft {method}, but this run primes "
                         f"for --peft {args.peft}: give a reference of the same PEFT method")


# ----------------------------------------------------------------------------- the algorithm

def set_trainable(model, method, outer_peft, inner_params, freeze_embeddings):
    """theta (the body, minus the word embeddings when frozen) is what priming updates. The
    PEFT tensors and head are trained by the inner loop, and by the outer loop only with
    --outer-peft (MAML) or --method mtl (or --inner-params all, where they are fast like theta)."""
    peft_names = set(peft_state.peft_parameters(model))
    for name, p in model.named_parameters():
        if name in peft_names:
            p.requires_grad_(method == "mtl" or outer_peft or inner_params == "all")
        else:
            p.requires_grad_(not (freeze_embeddings and "word_embeddings" in name))


def phi_start(model, outer_peft, inner_params, generator):
    """Where phi starts and which tensors are fast (METHOD.md, "One priming episode"): a function of
    the task index giving phi_0. Default: fresh PEFT tensors and head drawn as downstream PEFT
    draws them, so the inner loop simulates a fresh fine-tuning; --outer-peft: the model's own
    meta-learned ones (plain MAML). --inner-params all: the body's trainable Parameters are
    fast too (standard MAML)."""
    body = {n: p for n, p in peft_state.body_parameters(model).items() if p.requires_grad}

    def init_fast(task_index):
        phi = peft_state.peft_parameters(model) if outer_peft else peft_state.fresh_peft_tensors(model, generator)
        return {**body, **phi} if inner_params == "all" else dict(phi)
    return init_fast


def meta_sgd_rates(model, inner_lr, inner_params, device):
    """Meta-SGD (Li et al. 2017), one learned rate per fast tensor (a per-tensor simplification
    of their per-element rates), starting at --inner-lr."""
    names = [n for n, p in model.named_parameters()
             if n in peft_state.peft_parameters(model) or (inner_params == "all" and p.requires_grad)]
    return {n: torch.tensor(float(inner_lr), device=device, requires_grad=True) for n in names}


def meta_gradient(loss_fn, tasks, init_fast, inner, measure_after=True):
    """Steps 2-4 for a meta-batch: the inner loop `inner` (maml.InnerLoop) from phi_0 on each
    support batch, then the query loss at phi' back-propagated into theta (second order unless
    inner.first_order), averaged over tasks into .grad. Returns the logged losses (maml.meta_step)."""
    return inner.meta_step(loss_fn, tasks, init_fast, measure_after=measure_after)


def mtl_gradient(model, tasks):
    """Multi-task priming: the plain loss of body + PEFT + head on the same support and query batches."""
    losses = []
    for support, query in tasks:
        loss = (model(**support).loss + model(**query).loss) / (2 * len(tasks))
        loss.backward()
        losses.append(loss.item() * 2 * len(tasks))
    return {"train_loss": sum(losses) / len(losses)}


def check_losses(metrics, step, inner_loop="unrolled"):
    """Every logged loss finite, before the optimizer step it would poison."""
    rates = "--implicit-lr / --outer-lr" if inner_loop == "implicit" else "--inner-lr / --outer-lr or set --inner-clip"
    for name, value in metrics.items():
        if "loss" in name:
            check_finite(value, f"{name} at meta-step {step}",  # not --overwrite: it would delete resume.pt
                         f"lower {rates} and start again with a new --out (this folder's resume.pt, "
                         f"saved before the failure, is kept)")


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    args = build_parser().parse_args(argv)
    config = check_args(args)
    claimed = []  # filled once --out is this run's: what a Ctrl-C leaves depends on it
    try:
        run(args, config, claimed)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_advice(Path(args.out), args.save_every, bool(claimed))) from None


def interrupted_advice(out, save_every, claimed):
    """What a Ctrl-C leaves, truly said (run_cli prints it): --resume only where a resume.pt is there."""
    if (out / resume_state.FILE).is_file():
        return INTERRUPTED
    if claimed:
        return (f"no resumable checkpoint was saved yet in {out} (the first comes after --save-every {save_every} "
                f"meta-steps), so --resume cannot continue it: start it again with --overwrite (same --out)")
    return f"nothing in {out} was written or changed"


def run(args, config, claimed):
    """main's run: the model and data, then (rank 0) the run folder, then priming."""
    fmt = data_format_from_flags(args)
    world, rank, _ = distributed.torchrun_world()
    device = pick_device(args.gpu)
    if rank == 0:
        check_max_len(args.max_len, model_config(resolve_model(args.model)))  # (converts the default model once)
    distributed.join_process_group(device, world)
    distributed.wait_for_all(world)
    tokenizer = load_tokenizer(args.model)
    check_max_len(args.max_len, model_config(resolve_model(args.model)), tokenizer)
    peft_config.check_fits(config, model_config(resolve_model(args.model)))
    priming_langs = parse_languages(args.priming_langs)
    query_langs = episodes.query_languages(args.source_lang, priming_langs, args.query)
    source = episodes.EpisodeSource(tokenizer, args.source_lang, query_langs,  # bad data: an error before any write
                                    args.data_dir, args.max_sentences, args.batch_size, args.max_len, args.seed, device,
                                    args.max_tokens, fmt, fine_tune_batch_size=args.implicit_batch_size)
    held_out = episodes.held_out_episode(tokenizer, args.source_lang, priming_langs, args.data_dir,
                                         args.eval_sentences, args.batch_size, args.max_len, device, fmt)
    data = data_provenance(args.data_dir, [(args.source_lang, "train"), *[(q, "train") for q in query_langs],
                                           (args.source_lang, "dev"), *[(p, "dev") for p in priming_langs]], fmt)
    set_seed(args.seed)
    model = load_token_classifier(args.model, num_labels=len(LABELS), id2label=LABELS, device=device)  # a body that
    adapters.add_peft(model, config, seed=derive_seed(args.seed, "initial phi"))  # does not load: before any write
    out, lock = Path(args.out), None
    if rank == 0:  # only rank 0 writes the run folder; it owns it for the run's whole life
        lock = claim_run_folder(out, "meta_pretrain", args, shaping=shaping_flags(args),
                                resume=args.resume, overwrite=args.overwrite, data=data,
                                defaults=vars(build_parser().parse_args([])))  # for records older than a flag
    claimed.append(out)
    try:
        prime(args, model, tokenizer, source, held_out, out, device, world, rank, data)
    finally:
        if lock is not None:
            lock.close()
    if world > 1:
        distributed.leave_process_group()


def shaping_flags(args):
    """The flags a --resume must repeat. Runs recorded before --inner-loop existed are unrolled runs
    (their record lacks it), so an unrolled run does not compare it; an implicit run does, and the
    --implicit-* flags (None in an unrolled run) tell the two loops apart either way."""
    shaping = set(vars(args)) - NOT_SHAPING
    return sorted(shaping - {"inner_loop"} if args.inner_loop == "unrolled" else shaping)


def run_identity(args):
    """What resume.pt records of the run it belongs to: the flags a --resume must repeat (--seed,
    --peft, --method ... as run.json holds them), so another run's resume.pt is refused."""
    return {flag: getattr(args, flag) for flag in shaping_flags(args)}


def prime(args, model, tokenizer, source, held_out, out, device, world, rank, data):
    """The priming loop (METHOD.md, "One priming episode"): --steps meta-steps from the start or
    from resume.pt, then the primed body (`model`: the input model with its initial PEFT tensors
    and head, drawn after set_seed)."""
    run = start_run(args, model, source, held_out, out, device, rank, data)
    bar = tqdm(range(run.start, args.steps), initial=run.start, total=args.steps, desc=f"priming ({args.method})",
               disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        tasks = source.sample(args.tasks_per_step, run.rngs["task_rng"])  # 1. episodes: the global meta-batch
        with precision_context(device, args.precision):
            metrics = priming_gradient(args, model, run, tasks, source, step, world, rank)  # 2.-4. into .grad
        distributed.average_across_processes(model, metrics, world)
        check_losses(metrics, step + 1, args.inner_loop)
        run.optimizer.step()                                               # the outer update of theta
        metrics.update(step=step + 1, seconds=round(time.perf_counter() - t0, 3), **rate_summary(run.rates))
        if rank == 0:
            evaluate_and_log(args, model, run, held_out, metrics, step + 1, device)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if "loss" in k})
        save_resumable(args, model, run, source, out, step + 1, world, rank)
    if rank == 0:
        finish(out, args, model, tokenizer, run.rates, peft_state.body_change(model, run.origin), data)
    distributed.wait_for_all(world)


def priming_gradient(args, model, run, tasks, source, step, world, rank):
    """Steps 2-4 of a meta-step into .grad: MTL's plain loss, or MAML's phi_0 -> inner loop ->
    meta-gradient (unrolled: this process's share of the tasks; implicit: implicit_priming)."""
    if args.method == "mtl":
        return mtl_gradient(model, distributed.task_share(tasks, world, rank)[0])
    if args.inner_loop == "implicit":
        return implicit_priming.meta_gradient(model, run.loss_fn, tasks, source, run.carried, run.rngs["phi_rng"], args)
    mine, init_mine = distributed.task_share(tasks, world, rank, run.init_fast)
    return meta_gradient(run.loss_fn, mine, init_mine, run.inner, (step + 1) % args.log_adaptation_every == 0)


def start_run(args, model, source, held_out, out, device, rank, data):
    """Everything the loop needs, from the start or from resume.pt: which tensors train, the outer
    optimizer (AdamW on theta; Meta-SGD's rates as their own group), the RNGs, the inner loop, the
    meta-validation reference and (rank 0) the run folder's log and record."""
    if rank == 0:
        print(f"priming into {out}", flush=True)
    origin = peft_state.body_snapshot(model) if rank == 0 else None  # the pretrained body, for body_change
    set_trainable(model, args.method, args.outer_peft, args.inner_params, args.freeze_embeddings)
    model.train()  # from_pretrained returns eval mode; priming trains with dropout as fine-tuning will
    if rank:  # the model is alike everywhere; dropout masks differ (rank 0 keeps a one-process run's)
        torch.manual_seed(derive_seed(args.seed, f"dropout of rank {rank}"))
    rates = meta_sgd_rates(model, args.inner_lr, args.inner_params, device) if args.meta_sgd else {}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if rates:  # the learned rates are no weights: their own step size, no weight decay
        groups.append({"params": list(rates.values()), "lr": args.meta_sgd_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=args.outer_lr)
    rngs = {"task_rng": torch.Generator().manual_seed(derive_seed(args.seed, "task sampling")),
            "phi_rng": torch.Generator().manual_seed(derive_seed(args.seed, "fresh phi"))}  # on the CPU, any device
    loss_fn = maml.functional_loss(model)
    reference_loss = (episodes.reference_query_loss(model, args.reference_ft, held_out, loss_fn)
                      if args.reference_ft else None)
    carried = {} if args.inner_loop == "implicit" else None  # the implicit loop's warm start (implicit_priming)
    start = resume_state.load(out, model, optimizer, source, rngs, rank, rates, carried,
                              run_identity(args)) if args.resume else 0
    if start > args.steps:  # the folder would hold `start` steps of training recorded as --steps
        raise ValueError(f"--resume --steps {args.steps}: the run in {out} has done {start} meta-steps already; "
                         f"give --steps {start} or more (nothing was changed)")
    for key in ("phi_0", "phi"):  # resume_state loads onto the CPU
        if carried and key in carried:
            carried[key] = {n: t.to(device) for n, t in carried[key].items()}
    log = None
    if rank == 0:
        for finished_only in ("config.json", model_card.CARD):  # a run being extended is no finished model
            (out / finished_only).unlink(missing_ok=True)        # until it ends
        log = MetricsLog(out, fresh=not args.resume)
        log.truncate_after(start)
        record_inputs(out, args, status="running", data=data)
        if args.resume:
            print(f"resuming {out} from step {start}")
    inner = maml.InnerLoop(args.inner_steps, args.inner_lr, args.first_order, args.inner_clip, rates or None)
    return SimpleNamespace(start=start, origin=origin, rates=rates, optimizer=optimizer, rngs=rngs, loss_fn=loss_fn,
                           reference_loss=reference_loss, carried=carried, log=log, inner=inner,
                           init_fast=phi_start(model, args.outer_peft, args.inner_params, rngs["phi_rng"]))


def evaluate_and_log(args, model, run, held_out, metrics, step, device):
    """Rank 0: meta-validation every --eval-every meta-steps and at the end (held-out losses,
    inner-loop strength, body change), then the step's line in metrics.jsonl."""
    if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
        with precision_context(device, args.precision):  # no collective
            metrics.update(implicit_priming.held_out_losses(model, held_out, run.loss_fn, run.carried,
                                                            run.reference_loss)
                           if args.inner_loop == "implicit" else
                           episodes.held_out_losses(model, held_out, run.loss_fn, run.inner, run.reference_loss))
        metrics["body_change"] = peft_state.body_change(model, run.origin)
    run.log.write(**metrics)


def save_resumable(args, model, run, source, out, step, world, rank):
    """resume.pt every --save-every meta-steps and at the end (every process takes part: RNG states)."""
    if step % args.save_every == 0 or step == args.steps:
        processes = distributed.rng_states(world)  # every process calls it (a collective); rank 0 saves
        if rank == 0:
            resume_state.save(out, step, model, run.optimizer, source, {**run.rngs, "processes": processes},
                              run.rates, run.carried, run_identity(args))
        distributed.wait_for_all(world)


def rate_summary(rates):
    """Meta-SGD's learned inner rates in metrics.jsonl: their mean, min and max."""
    if not rates:
        return {}
    values = torch.stack([r.detach() for r in rates.values()])
    return {"inner_lr_mean": values.mean().item(), "inner_lr_min": values.min().item(),
            "inner_lr_max": values.max().item()}


def finish(out, args, model, tokenizer, rates, body_change, data):
    """The primed body and its model card, then the record that marks the run finished (written last)."""
    save_model_atomic(body_only(model, args), tokenizer, out)
    model_card.write_model_card(out, vars(args), body_change, code_version())
    record_inputs(out, args, status="finished", body_change=body_change, data=data,
                  **({"meta_sgd_rates": {n: r.item() for n, r in rates.items()}} if rates else {}))
    resume = out / resume_state.FILE
    if not args.keep_resume:
        resume.unlink(missing_ok=True)
    elif resume.is_file():
        print(f"{resume} ({resume.stat().st_size / 2**20:.0f} MB) is kept so that --resume --steps N can extend "
              f"this run; delete it (or pass --no-keep-resume) if the run is final")
    print(f"primed body written to {out} (load it with --init {out} or AutoModel.from_pretrained)")


def record_inputs(out, args, status, **extra):
    """run.json: every flag, the seed, the code version, the input model (and its own record)."""
    source = resolve_model(args.model)
    write_record(out, "meta_pretrain", args, status=status, input_model=args.model, input_model_path=source,
                 input_record=read_record(source) if Path(source).is_dir() else None, **extra)


def body_only(model, args):
    """The primed encoder without the PEFT modules and head: an ordinary pretrained model."""
    from transformers import AutoModel
    encoder = getattr(model, model.base_model_prefix)
    plain = AutoModel.from_config(encoder.config, add_pooling_layer=False) \
        if encoder.config.model_type in ("bert", "xlm-roberta", "roberta") else AutoModel.from_config(encoder.config)
    body = {k: v for k, v in encoder.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(body, strict=True)
    plain.config.priming = {"method": args.method, "peft": args.peft, "source_lang": args.source_lang,
                            "priming_langs": args.priming_langs, "steps": args.steps}
    return plain


# what Ctrl-C leaves, said by run_cli
INTERRUPTED = "the last resumable checkpoint is kept: continue with --resume (same --out)"


if __name__ == "__main__":
    run_cli(main, interrupted=INTERRUPTED)
