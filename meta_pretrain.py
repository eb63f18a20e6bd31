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
  2. where phi starts and which tensors are fast: fresh PEFT tensors and head
     (episodes.INNER_PARAMS, chosen by --inner-params),
  3. the inner loop: --inner-steps steps of --inner-optimizer (SGD) on the fast tensors only
     (maml.inner_loop; the update rules are maml.INNER_OPTIMIZERS),
  4. the meta-gradient: the query loss of (theta, phi') back-propagated into theta
     (maml.meta_step runs 3. and 4. task by task), then AdamW on theta (the outer loop).
With --inner-loop implicit, 2.-4. are implicit_priming.meta_gradient: the inner loop is a fine-tuning of phi
on its own stream of source-language batches (Adam by default, as finetune_peft.py), continued
from the previous meta-step's phi and re-drawn fresh every --fresh-every meta-steps (a warm
start), and the meta-gradient is implicit.hypergradient on each task's support and query batch.
The output folder is an ordinary transformers checkpoint of the primed body theta (the PEFT
tensors and head are dropped: downstream fine-tuning starts them fresh), plus run.json (every
flag), metrics.jsonl, resume.pt (resume_state.py) and README.md, its model card in the hub's
format (model_card.py); plumbing/priming_run.py keeps the folder.
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import adapters
import episodes
import implicit_priming
import maml
import peft_config
from plumbing import cli, distributed, ner_data, pretrained, priming_run, runs

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



# ============================================================================ the algorithm

def prime(args, model, tokenizer, source, held_out, out, device, world, rank, inputs):
    """The priming loop (METHOD.md, "One priming episode"): --steps meta-steps from the start or
    from resume.pt, then the primed body. `model`: the input model with its initial PEFT tensors
    and head (drawn after cli.set_seed)."""
    run = start(args, model, source, held_out, out, device, rank, inputs)
    bar = tqdm(range(run.start, args.steps), initial=run.start, total=args.steps, desc=f"priming ({args.method})",
               disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        tasks = source.sample(args.tasks_per_step, run.task_rng)          # 1. the episodes (the global meta-batch)
        mine = distributed.my_tasks(len(tasks), world, rank)               # this process's share of them
        with pretrained.precision_context(device, args.precision):
            if args.method == "mtl":                                        # multi-task priming: the plain loss
                metrics = mtl_gradient(model, [tasks[j] for j in mine])
            elif args.inner_loop == "implicit":                             # 2.-4. by the implicit function theorem
                metrics = implicit_priming.meta_gradient(model, run.loss_fn, tasks, source, run.carried,
                                                         run.phi_rng, args)
            else:  # 2. where phi starts; then, task by task, 3. the inner loop and 4. the query loss's backward
                phi_0 = episodes.phi_0_of_tasks(model, args.inner_params, args.outer_peft, run.phi_rng, len(tasks),
                                                mine)
                metrics = maml.meta_step(run.loss_fn, [tasks[j] for j in mine], phi_0, args.inner_steps,
                                         args.inner_lr, first_order=args.first_order, clip=args.inner_clip,
                                         rates=run.rates or None, optimizer=args.inner_optimizer,
                                         measure_after=(step + 1) % args.log_adaptation_every == 0)
        distributed.average_across_processes(model, metrics, world)
        priming_run.check_losses(metrics, step + 1, args.inner_loop)
        run.optimizer.step()                                                # the outer update of theta
        metrics.update(step=step + 1, seconds=round(time.perf_counter() - t0, 3), **priming_run.rate_summary(run.rates))
        if rank == 0:
            evaluate_and_log(args, model, run, held_out, metrics, step + 1, device)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if "loss" in k})
        priming_run.save_resumable(args, model, run, source, out, step + 1, world, rank,
                                   also=adapters.peft_parameters(model))
    if rank == 0:
        body, change = priming_run.body_only(model, args), episodes.body_change(model, run.origin)
        priming_run.finish(out, args, body, tokenizer, change, inputs, run.rates)
    distributed.wait_for_all(world)


def set_trainable(model, method, outer_peft, inner_params, freeze_embeddings):
    """theta (the body, minus the word embeddings when frozen) is what priming updates. The
    PEFT tensors and head are trained by the inner loop, and by the outer loop only with
    --outer-peft (MAML) or --method mtl (or --inner-params all, where they are fast like theta)."""
    peft_names = set(adapters.peft_parameters(model))
    for name, p in model.named_parameters():
        if name in peft_names:
            p.requires_grad_(method == "mtl" or outer_peft or inner_params == "all")
        else:
            p.requires_grad_(not (freeze_embeddings and "word_embeddings" in name))


def mtl_gradient(model, tasks):
    """Multi-task priming: the plain loss of body + PEFT + head on the same support and query batches."""
    losses = []
    for support, query in tasks:
        loss = (model(**support).loss + model(**query).loss) / (2 * len(tasks))
        loss.backward()
        losses.append(loss.item() * 2 * len(tasks))
    return {"train_loss": sum(losses) / len(losses)}


def meta_sgd_rates(model, inner_lr, inner_params, device):
    """Meta-SGD (Li et al. 2017), one learned rate per fast tensor (a per-tensor simplification
    of their per-element rates), starting at --inner-lr."""
    names = [n for n, p in model.named_parameters()
             if n in adapters.peft_parameters(model) or (inner_params == "all" and p.requires_grad)]
    return {n: torch.tensor(float(inner_lr), device=device, requires_grad=True) for n in names}


@dataclass
class PrimingRun:
    """What the loop carries from meta-step to meta-step."""
    start: int                 # the first meta-step to run (0, or the resumed one)
    optimizer: torch.optim.Optimizer   # AdamW on theta (Meta-SGD's rates as their own group)
    loss_fn: object            # maml.functional_loss(model)
    task_rng: torch.Generator  # which languages and sentences each task draws
    phi_rng: torch.Generator   # the fresh phi_0 draws
    rates: dict                # Meta-SGD's learned inner rates ({} without --meta-sgd)
    carried: dict | None       # the implicit loop's warm start (implicit_priming)
    origin: dict | None        # the pretrained body (rank 0), for body_change
    reference_loss: float | None   # --reference-ft's held-out query loss, for inner_loop_strength
    log: runs.MetricsLog | None     # metrics.jsonl (rank 0)


def start(args, model, source, held_out, out, device, rank, inputs):
    """Everything the loop needs, from the start or from resume.pt."""
    if rank == 0:
        print(f"priming into {out}", flush=True)
    origin = episodes.body_snapshot(model) if rank == 0 else None
    set_trainable(model, args.method, args.outer_peft, args.inner_params, args.freeze_embeddings)
    model.train()  # from_pretrained returns eval mode; priming trains with dropout as fine-tuning will
    if rank:  # the model is alike everywhere; dropout masks differ (rank 0 keeps a one-process run's)
        torch.manual_seed(cli.derive_seed(args.seed, f"dropout of rank {rank}"))
    rates = meta_sgd_rates(model, args.inner_lr, args.inner_params, device) if args.meta_sgd else {}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if rates:  # the learned rates are no weights: their own step size, no weight decay
        groups.append({"params": list(rates.values()), "lr": args.meta_sgd_lr, "weight_decay": 0.0})
    loss_fn = maml.functional_loss(model)
    run = PrimingRun(start=0, optimizer=torch.optim.AdamW(groups, lr=args.outer_lr), loss_fn=loss_fn,
                     task_rng=torch.Generator().manual_seed(cli.derive_seed(args.seed, "task sampling")),
                     phi_rng=torch.Generator().manual_seed(cli.derive_seed(args.seed, "fresh phi")),  # CPU, any device
                     rates=rates, carried={} if args.inner_loop == "implicit" else None, origin=origin,
                     reference_loss=(episodes.reference_query_loss(model, args.reference_ft, held_out, loss_fn)
                                     if args.reference_ft else None), log=None)
    if args.resume:
        priming_run.resume(args, model, run, source, out, device, rank)
    if rank == 0:
        run.log = runs.MetricsLog(out, fresh=not args.resume)
        run.log.truncate_after(run.start)
        priming_run.start_log(out, args, inputs, run.start)
    return run


def evaluate_and_log(args, model, run, held_out, metrics, step, device):
    """Rank 0: meta-validation every --eval-every meta-steps and at the end (held-out losses,
    inner-loop strength, body change), then the step's line in metrics.jsonl."""
    if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
        with pretrained.precision_context(device, args.precision):  # no collective
            if args.inner_loop == "implicit":
                metrics.update(implicit_priming.implicit_held_out_losses(model, held_out, run.loss_fn, run.carried,
                                                                         run.reference_loss))
            else:
                inner = dict(steps=args.inner_steps, lr=args.inner_lr, clip=args.inner_clip, rates=run.rates or None,
                             optimizer=args.inner_optimizer)
                metrics.update(episodes.held_out_losses(model, held_out, run.loss_fn, inner, run.reference_loss))
        metrics["body_change"] = episodes.body_change(model, run.origin)
    run.log.write(**metrics)


# ============================================================================ the interface

def check_args(args):
    """Inconsistent or out-of-range flags: one clear error each (priming_run.check_priming_flags,
    implicit_priming.check_implicit_flags). Returns the PEFT config."""
    world, _, local_rank = distributed.torchrun_world()
    priming_run.check_priming_flags(args, world, local_rank)
    if args.inner_optimizer != "sgd" and (args.method == "mtl" or args.inner_loop == "implicit"):  # it would do nothing
        other = "--method mtl" if args.method == "mtl" else "--inner-loop implicit"
        raise ValueError(f"--inner-optimizer {args.inner_optimizer} sets the unrolled MAML inner loop's update rule; "
                         f"{other} has none: leave it out")
    implicit_priming.check_implicit_flags(args, world, {"inner_steps": INNER_STEPS, "inner_lr": INNER_LR})
    return peft_config.peft_config_from_flags(args, args.peft)



def build_parser():
    p = argparse.ArgumentParser(description="Prime a pretrained encoder for PEFT with MAML (or MTL).",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=pretrained.DEFAULT_MODEL,
                   help="e5-small (offline default), a folder, or a hub id (xlm-roberta-base)")
    method = p.add_argument_group("the method (METHOD.md)")
    method.add_argument("--method", choices=["maml", "mtl"], default="maml",
                        help="maml: meta-learning priming; mtl: plain multi-task training on the same data")
    method.add_argument("--peft", choices=peft_config.METHODS, default="adapter",
                        help="the PEFT method that priming prepares for (simulated in the inner loop)")
    peft_config.add_peft_flags(method)
    method.add_argument("--query", choices=["cross", "same"], default="cross",
                        help="query batch in a priming language (cross) or in the source language (same, ablation)")
    method.add_argument("--outer-peft", action="store_true",
                        help="keep one initial PEFT + head across episodes and meta-update it too (plain MAML)")
    method.add_argument("--first-order", action="store_true",
                        help="first-order meta-gradient (drops the Hessian term; with --inner-loop implicit: only "
                             "dL_Q/dtheta at phi_hat, no CG)")
    inner = p.add_argument_group("the inner loop (maml.py)")
    inner.add_argument("--inner-loop", choices=["unrolled", "implicit"], default="unrolled",
                       help="unrolled: --inner-steps steps differentiated through (maml.py); implicit: a "
                            "near-converged fine-tuning differentiated by the implicit function theorem (implicit.py)")
    inner.add_argument("--inner-params", choices=sorted(episodes.INNER_PARAMS), default="peft",
                       help="what the inner loop adapts (episodes.INNER_PARAMS): peft (PEFT + head, the paper) or "
                            "all (standard MAML ablation)")
    inner.add_argument("--inner-optimizer", choices=sorted(maml.INNER_OPTIMIZERS), default="sgd",
                       help="the inner loop's update rule (maml.INNER_OPTIMIZERS)")
    inner.add_argument("--inner-steps", type=int, default=INNER_STEPS, help="steps of the inner loop")
    inner.add_argument("--inner-lr", type=float, default=INNER_LR, help="inner-loop learning rate")
    inner.add_argument("--inner-clip", type=float, default=None, help="clip the inner gradient to this global norm")
    inner.add_argument("--meta-sgd", action="store_true",
                       help="Meta-SGD (Li et al. 2017): one learned inner learning rate per fast tensor, starting at "
                            "--inner-lr, updated by the outer optimizer")
    inner.add_argument("--meta-sgd-lr", type=float, default=META_SGD_LR,
                       help="outer AdamW learning rate of those rates")
    implicit_priming.add_flags(p.add_argument_group("the implicit inner loop (implicit_priming.py)"))
    budget = p.add_argument_group("budget")
    budget.add_argument("--steps", type=int, default=STEPS, help="meta-steps (optimizer steps); same for mtl")
    budget.add_argument("--tasks-per-step", type=int, default=TASKS_PER_STEP,
                        help="tasks averaged per meta-step; under torchrun the global count, split evenly across "
                             "processes")
    budget.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per support/query batch")
    budget.add_argument("--max-tokens", type=int, default=None,
                        help="also cut support/query batches at this many padded tokens (sentences x length): even "
                             "memory per step on a GPU")
    budget.add_argument("--max-len", type=int, default=MAX_LEN, help="sub-word truncation length")
    budget.add_argument("--outer-lr", type=float, default=OUTER_LR, help="AdamW learning rate of the outer loop")
    budget.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the word embeddings fixed (most of the parameters; saves optimizer memory)")
    data = p.add_argument_group("data")
    data.add_argument("--source-lang", default="en", help="language of the support batches (downstream training)")
    data.add_argument("--priming-langs", default="de,es",
                      help="comma-separated query languages (never evaluation languages)")
    data.add_argument("--max-sentences", type=int, default=MAX_SENTENCES, help="train sentences read per language")
    ner_data.add_data_flags(data)
    logging = p.add_argument_group("meta-validation and logging")
    logging.add_argument("--eval-sentences", type=int, default=200,
                         help="dev sentences per priming language for the held-out query loss")
    logging.add_argument("--eval-every", type=int, default=EVAL_EVERY,
                         help="held-out query loss every N steps (0: never)")
    logging.add_argument("--log-adaptation-every", type=int, default=1,
                         help="support loss after the inner loop every N meta-steps (an extra forward, ~11%% of a "
                              "step)")
    logging.add_argument("--reference-ft", default=None,
                         help="a finetune_peft.py folder (same PEFT, fine-tuned on --model without priming): then "
                              "each evaluation also logs inner_loop_strength, the share of the held-out loss gap "
                              "between fresh and fine-tuned PEFT that the inner loop closes")
    folder = p.add_argument_group("run folder and resume")
    folder.add_argument("--seed", type=int, default=0,
                        help="seed of every RNG (data order, fresh PEFT draws, dropout)")
    folder.add_argument("--out", default=None,
                        help="output folder (default: checkpoints/primed-<model>-<method>-<peft>-s<seed>)")
    folder.add_argument("--resume", action="store_true",
                        help="continue the interrupted (or extend the finished) run in --out")
    folder.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (another run's files are deleted)")
    folder.add_argument("--save-every", type=int, default=SAVE_EVERY, help="resumable checkpoint every N steps")
    folder.add_argument("--keep-resume", action=argparse.BooleanOptionalAction, default=True,
                        help="keep resume.pt after the run (it lets --resume --steps N extend it; hundreds of MB)")
    hardware = p.add_argument_group("hardware")
    hardware.add_argument("--gpu", type=int, default=None,
                          help="CUDA device index; leave out for the CPU. Under torchrun leave it out: each process "
                               "takes GPU LOCAL_RANK (choose GPUs with CUDA_VISIBLE_DEVICES; with none visible, gloo "
                               "on the CPU)")
    hardware.add_argument("--precision", choices=pretrained.PRECISIONS, default="fp32",
                          help="fp32, or bf16 autocast for the forward passes (second-order MAML included)")
    hardware.add_argument("--threads", type=int, default=None, help=cli.THREADS_HELP)
    return cli.parser_taking_negative_numbers(p)


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = check_args(args)
    cli.set_threads(args)
    claimed = []  # filled once --out is this run's: what a Ctrl-C leaves depends on it
    try:
        run(args, config, claimed)
    except KeyboardInterrupt:
        advice = priming_run.interrupted_advice(Path(args.out), args.save_every, bool(claimed))
        raise KeyboardInterrupt(advice) from None


def run(args, config, claimed):
    """main's run: the model and data (any error before a write), then (rank 0) the run folder, then priming."""
    fmt = ner_data.data_format_from_flags(args)
    world, rank, _ = distributed.torchrun_world()
    device = pretrained.pick_device(args.gpu)
    if rank == 0:
        pretrained.resolve_model(args.model)  # (converts the default model once, before the others read it)
    distributed.join_process_group(device, world)
    distributed.wait_for_all(world)
    body_config = pretrained.model_config(pretrained.resolve_model(args.model))
    pretrained.check_max_len(args.max_len, body_config)
    tokenizer = pretrained.load_tokenizer(args.model)
    pretrained.check_max_len(args.max_len, body_config, tokenizer)
    peft_config.check_fits(config, body_config)
    priming_langs = ner_data.parse_languages(args.priming_langs)
    query_langs = episodes.query_languages(args.source_lang, priming_langs, args.query)
    source = episodes.EpisodeSource(tokenizer, args.source_lang, query_langs, args.data_dir, args.max_sentences,
                                    args.batch_size, args.max_len, args.seed, device, args.max_tokens, fmt,
                                    fine_tune_batch_size=args.implicit_batch_size)
    held_out = episodes.held_out_episode(tokenizer, args.source_lang, priming_langs, args.data_dir,
                                         args.eval_sentences, args.batch_size, args.max_len, device, fmt)
    read = [(args.source_lang, "train"), *[(q, "train") for q in query_langs], (args.source_lang, "dev"),
            *[(p, "dev") for p in priming_langs]]
    data = ner_data.data_provenance(args.data_dir, read, fmt)
    cli.set_seed(args.seed)
    labels = ner_data.LABELS
    model = pretrained.load_token_classifier(args.model, num_labels=len(labels), id2label=labels, device=device)
    adapters.add_peft(model, config, seed=cli.derive_seed(args.seed, "initial phi"))
    inputs = {"data": data, "resume_flags": priming_run.resume_flags(args, data, build_parser(), check_args)}
    out, lock = Path(args.out), None
    if rank == 0:  # only rank 0 writes the run folder; it owns it for the run's whole life
        lock = priming_run.claim(args, data)
    claimed.append(out)
    try:
        prime(args, model, tokenizer, source, held_out, out, device, world, rank, inputs)
    finally:
        if lock is not None:
            lock.close()
    if world > 1:
        distributed.leave_process_group()




if __name__ == "__main__":
    cli.run_cli(main, interrupted=priming_run.INTERRUPTED)
