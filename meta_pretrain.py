"""Priming: meta-learn a pretrained encoder for later PEFT fine-tuning (../shared/PAPER.md).

    python meta_pretrain.py                                   # the default: e5-small, adapters, en -> de,es, ~10 min CPU
    python meta_pretrain.py --gpu 0 --model xlm-roberta-base --steps 2000 --max-sentences 20000
    python meta_pretrain.py --peft prefix --first-order       # an ablation: first-order meta-gradient
    python meta_pretrain.py --method mtl                      # multi-task priming, same data and steps
    python meta_pretrain.py --resume                          # continue an interrupted run in --out
    torchrun --nproc_per_node 4 meta_pretrain.py --model xlm-roberta-base --tasks-per-step 8   # 4 GPUs, 2 tasks each

One priming step (PAPER.md, "One priming episode"), for each of --tasks-per-step tasks:
  1. support batch in the source language (what downstream PEFT will see),
  2. inner loop: --inner-steps SGD steps on phi only (maml.inner_loop), phi drawn fresh,
  3. query batch in a priming language (or the source language with --query same),
  4. outer loop: the query loss of (theta, phi') back-propagated into theta; AdamW on theta.
The output folder is an ordinary transformers checkpoint of the primed body theta (the PEFT
tensors and head are dropped: downstream fine-tuning starts them fresh), plus run.json (every
flag), metrics.jsonl, and resume.pt.
"""

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import adapters
import distributed
import maml
from ner_data import LABELS, BatchStream, encode_sentences, load_wikiann, parse_languages
from pretrained import DEFAULT_MODEL, load_token_classifier, load_tokenizer, pick_device, resolve_model
from runs import MetricsLog, read_record, run_cli, save_model_atomic, set_seed, torch_save, write_record

# --------------------------------------------------------------------- defaults -----
# Budget: the default run is the README's main job and finishes in ~10 minutes on 2 CPU cores.
STEPS = 60               # meta-steps (outer optimizer steps); the paper-scale run wants thousands
TASKS_PER_STEP = 2       # tasks averaged per meta-step (PAPER.md step 4)
BATCH_SIZE = 8           # sentences per support / query batch
MAX_LEN = 64             # sub-words; WikiANN sentences are short (median ~ 14 sub-words)
MAX_SENTENCES = 2000     # sentences read per language: enough for the default budget
INNER_STEPS = 3          # a fresh head needs several steps to learn anything (PAPER.md)
INNER_LR = 1e-2          # SGD on adapters + head; tune on priming-language dev data
OUTER_LR = 2e-5          # AdamW on the body: a small step, the body is already pretrained
EVAL_EVERY = 20          # held-out query loss every N meta-steps
SAVE_EVERY = 20          # resumable checkpoint every N meta-steps


def build_parser():
    p = argparse.ArgumentParser(description="Prime a pretrained encoder for PEFT with MAML (or MTL).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=["maml", "mtl"], default="maml",
                   help="maml: meta-learning priming; mtl: plain multi-task training on the same data")
    p.add_argument("--peft", choices=["adapter", "prefix", "lora"], default="adapter",
                   help="the PEFT method that priming prepares for (simulated in the inner loop)")
    p.add_argument("--adapter-placement", choices=["houlsby", "pfeiffer"], default="houlsby", help="adapter positions")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapter width = hidden / this")
    p.add_argument("--prefix-length", type=int, default=16, help="prefix tokens per layer")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--inner-params", choices=["peft", "all"], default="peft",
                   help="what the inner loop updates: peft (PEFT + head, the paper) or all (standard MAML ablation)")
    p.add_argument("--outer-peft", action="store_true",
                   help="keep one initial PEFT + head across episodes and meta-update it too (plain MAML ablation)")
    p.add_argument("--query", choices=["cross", "same"], default="cross",
                   help="query batch in a priming language (cross) or in the source language (same, ablation)")
    p.add_argument("--first-order", action="store_true", help="first-order meta-gradient (drops the Hessian term)")
    p.add_argument("--inner-steps", type=int, default=INNER_STEPS, help="SGD steps of the inner loop")
    p.add_argument("--inner-lr", type=float, default=INNER_LR, help="inner-loop SGD learning rate")
    p.add_argument("--inner-clip", type=float, default=None, help="clip the inner gradient to this global norm")
    p.add_argument("--outer-lr", type=float, default=OUTER_LR, help="AdamW learning rate of the outer loop")
    p.add_argument("--tasks-per-step", type=int, default=TASKS_PER_STEP,
                   help="tasks averaged per meta-step; under torchrun the global count, split evenly across processes")
    p.add_argument("--steps", type=int, default=STEPS, help="meta-steps (optimizer steps); same for mtl")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sentences per support/query batch")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="sub-word truncation length")
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the word embeddings fixed (most of the parameters; saves optimizer memory)")
    p.add_argument("--source-lang", default="en", help="language of the support batches (downstream training)")
    p.add_argument("--priming-langs", default="de,es", help="comma-separated query languages (never evaluation languages)")
    p.add_argument("--max-sentences", type=int, default=MAX_SENTENCES, help="train sentences read per language")
    p.add_argument("--eval-sentences", type=int, default=200, help="dev sentences per priming language for the held-out query loss")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="held-out query loss every N steps (0: never)")
    p.add_argument("--save-every", type=int, default=SAVE_EVERY, help="resumable checkpoint every N steps")
    p.add_argument("--model", default=DEFAULT_MODEL, help="e5-small (offline default), a folder, or a hub id (xlm-roberta-base)")
    p.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR, else the hub's wikiann)")
    p.add_argument("--gpu", type=int, default=None,
                   help="CUDA device index; leave out for the CPU. Under torchrun leave it out: each process "
                        "takes GPU LOCAL_RANK (choose GPUs with CUDA_VISIBLE_DEVICES; with none visible, gloo on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of every RNG (data order, fresh PEFT draws, dropout)")
    p.add_argument("--out", default=None, help="output folder (default: checkpoints/primed-<method>-<peft>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/resume.pt")
    return p


def check_args(args):
    """Inconsistent or out-of-range flags: one clear error each."""
    if args.method == "mtl":
        for flag, bad in [("--first-order", args.first_order), ("--outer-peft", args.outer_peft),
                          ("--inner-params all", args.inner_params == "all")]:
            if bad:
                raise ValueError(f"{flag} is a MAML option; it has no meaning with --method mtl")
    for flag in ["steps", "tasks_per_step", "batch_size", "max_len", "inner_steps", "max_sentences", "save_every"]:
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if args.inner_lr <= 0 or args.outer_lr <= 0:
        raise ValueError("--inner-lr and --outer-lr must be positive")
    world, _, local_rank = distributed.torchrun_world()
    if args.tasks_per_step % world:
        raise ValueError(f"--tasks-per-step {args.tasks_per_step} must be divisible by the number of processes "
                         f"({world}): it is the global meta-batch, split evenly across them")
    if world > 1 and args.gpu is not None:
        raise ValueError("--gpu with several torchrun processes: leave it out, each process takes GPU LOCAL_RANK "
                         "(choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if "LOCAL_RANK" in os.environ and args.gpu is None and torch.cuda.is_available():
        args.gpu = local_rank  # under torchrun: one GPU per process
    args.priming_langs = ",".join(parse_languages(args.priming_langs))
    if args.source_lang in parse_languages(args.priming_langs):
        warnings.warn(f"--source-lang {args.source_lang} is also a priming language")
    if args.out is None:
        args.out = f"checkpoints/primed-{args.method}-{args.peft}-s{args.seed}"


def peft_config(args):
    return adapters.PeftConfig(method=args.peft, placement=args.adapter_placement,
                               reduction_factor=args.reduction_factor, prefix_length=args.prefix_length,
                               lora_rank=args.lora_rank)


def load_streams(args, tokenizer, device):
    """Endless batch streams: source-language support, per-language query, held-out dev batches."""
    def stream(lang, seed_offset):
        ds = load_wikiann(lang, "train", args.data_dir, args.max_sentences)
        return BatchStream(encode_sentences(ds, tokenizer, args.max_len), args.batch_size,
                           seed=args.seed * 1000 + seed_offset, pad_id=tokenizer.pad_token_id, device=device)
    langs = parse_languages(args.priming_langs)
    streams = {"support": stream(args.source_lang, 0)}
    for i, lang in enumerate(langs if args.query == "cross" else [args.source_lang]):
        streams[f"query-{lang}"] = stream(lang, i + 1)
    def dev_batches(lang, n_sentences):
        ds = load_wikiann(lang, "dev", args.data_dir, n_sentences)
        dev = BatchStream(encode_sentences(ds, tokenizer, args.max_len), args.batch_size, seed=12345,
                          pad_id=tokenizer.pad_token_id, device=device)
        return [dev.next_batch() for _ in range(max(1, len(ds) // args.batch_size))]
    # Held out: one fixed source-language dev batch to adapt on, priming-language dev batches to
    # score; the same for every ablation (--query same included), so their curves compare.
    held_out = {"support": dev_batches(args.source_lang, args.batch_size)[0],
                "query": [b for lang in langs for b in dev_batches(lang, args.eval_sentences)]}
    return streams, held_out


def sample_tasks(streams, n_tasks, generator):
    """n (support, query) pairs; the query language of each task is drawn from the priming languages."""
    query_names = [k for k in streams if k.startswith("query-")]
    tasks = []
    for _ in range(n_tasks):
        name = query_names[torch.randint(len(query_names), (1,), generator=generator).item()]
        tasks.append((streams["support"].next_batch(), streams[name].next_batch()))
    return tasks


def set_trainable(model, args):
    """theta (the body, minus the word embeddings when frozen) is what priming updates; the
    PEFT tensors and head are trained by the inner loop, and by the outer loop only with
    --outer-peft (MAML) or --method mtl."""
    peft_names = set(adapters.peft_parameters(model))
    for name, p in model.named_parameters():
        if name in peft_names:
            p.requires_grad_(args.method == "mtl" or args.outer_peft or args.inner_params == "all")
        else:
            p.requires_grad_(not (args.freeze_embeddings and "word_embeddings" in name))


def fast_initialiser(model, args, generator):
    """phi_0 for each task (PAPER.md, "Where phi starts"): fresh PEFT tensors and head drawn
    as downstream PEFT draws them, or with --outer-peft the model's own (meta-learned) ones.
    With --inner-params all the body's own Parameters join the fast set (standard MAML)."""
    body = {n: p for n, p in adapters.body_parameters(model).items() if p.requires_grad}

    def init_fast(task_index):
        phi = adapters.peft_parameters(model) if args.outer_peft else adapters.fresh_peft_tensors(model, generator)
        return {**body, **phi} if args.inner_params == "all" else dict(phi)
    return init_fast


def held_out_query_loss(model, args, held_out, loss_fn):
    """Meta-validation: adapt a fixed fresh phi on a fixed source-language dev batch (first
    order, nothing kept, dropout off), then the mean loss on priming-language dev batches."""
    model.eval()
    fast = adapters.fresh_peft_tensors(model, torch.Generator().manual_seed(777))
    adapted = maml.inner_loop(loss_fn, fast, held_out["support"], args.inner_steps, args.inner_lr,
                              first_order=True, clip=args.inner_clip)
    with torch.no_grad():
        detached = {n: t.detach() for n, t in adapted.items()}
        loss = sum(loss_fn(detached, b).item() for b in held_out["query"]) / len(held_out["query"])
    model.train()
    return loss


def mtl_step(model, tasks):
    """Multi-task priming: plain loss of body + PEFT + head on the same support and query batches."""
    losses = []
    for support, query in tasks:
        loss = (model(**support).loss + model(**query).loss) / (2 * len(tasks))
        loss.backward()
        losses.append(loss.item() * 2 * len(tasks))
    return {"train_loss": sum(losses) / len(losses)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    out = Path(args.out)
    if (out / "config.json").is_file() and not args.resume:
        raise ValueError(f"{out} already holds a primed model: pass --resume to continue it or a new --out")
    set_seed(args.seed)
    device = pick_device(args.gpu)
    world, rank, _ = distributed.torchrun_world()
    distributed.join_process_group(device, world)
    if rank == 0:
        resolve_model(args.model)  # a first-use conversion of the default model: once, not per process
    distributed.wait_for_all(world)
    tokenizer = load_tokenizer(args.model)
    model = load_token_classifier(args.model, num_labels=len(LABELS), id2label=LABELS, device=device)
    adapters.add_peft(model, peft_config(args), seed=args.seed)
    set_trainable(model, args)
    model.train()  # from_pretrained returns eval mode; priming trains with dropout as fine-tuning will
    if rank:  # the model is alike everywhere; dropout masks differ (rank 0 keeps a one-process run's)
        torch.manual_seed(args.seed * 1000 + rank)
    streams, held_out = load_streams(args, tokenizer, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.outer_lr)
    task_rng = torch.Generator().manual_seed(args.seed)
    phi_rng = torch.Generator().manual_seed(args.seed + 1)  # fresh PEFT draws (on the CPU, any device)
    loss_fn = maml.functional_loss(model)
    start = 0
    if args.resume:
        start = load_resume_state(out, model, optimizer, streams, task_rng, phi_rng, rank)
    if rank == 0:  # only rank 0 writes the run folder
        log = MetricsLog(out, fresh=not args.resume)
        log.truncate_after(start)
        record_inputs(out, args)
    init_fast = fast_initialiser(model, args, phi_rng)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"priming ({args.method})",
               disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        tasks = sample_tasks(streams, args.tasks_per_step, task_rng)  # the global meta-batch, alike everywhere
        if args.method == "maml":
            mine, init_mine = distributed.task_share(tasks, world, rank, init_fast)
            metrics = maml.meta_step(loss_fn, mine, init_mine, args.inner_steps, args.inner_lr,
                                     first_order=args.first_order, clip=args.inner_clip)
        else:
            metrics = mtl_step(model, distributed.task_share(tasks, world, rank)[0])
        distributed.average_across_processes(model, metrics, world)
        optimizer.step()
        metrics.update(step=step + 1, seconds=round(time.perf_counter() - t0, 3))
        if rank == 0 and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            metrics["held_out_query_loss"] = held_out_query_loss(model, args, held_out, loss_fn)  # no collective
        if rank == 0:
            log.write(**metrics)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if "loss" in k})
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            rngs = distributed.rng_states(world)  # every process calls it (a collective); rank 0 saves
            if rank == 0:
                save_resume_state(out, step + 1, model, optimizer, streams, task_rng, phi_rng, rngs)
            distributed.wait_for_all(world)
    if rank == 0:
        save_model_atomic(body_only(model, args), tokenizer, out)
        print(f"primed body written to {out} (load it with --init {out} or AutoModel.from_pretrained)")
    distributed.wait_for_all(world)
    if world > 1:
        distributed.leave_process_group()


def record_inputs(out, args):
    """run.json: every flag, the seed, the code version, the input model (and its own record)."""
    source = resolve_model(args.model)
    write_record(out, "meta_pretrain", args, input_model=args.model, input_model_path=source,
                 input_record=read_record(source) if Path(source).is_dir() else None)


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


def trained_state(model):
    """What priming changes: the parameters that train, and the PEFT tensors and head (frozen
    word embeddings, most of the model, are the input model's and need no copy)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | set(adapters.peft_parameters(model))
    return {n: t for n, t in model.state_dict().items() if n in keep}


def save_resume_state(out, step, model, optimizer, streams, task_rng, phi_rng, rngs):
    """rngs: distributed.rng_states(), one per process; the top-level torch_rng / cuda_rng are rank 0's."""
    torch_save(Path(out) / "resume.pt", {
        "step": step, "model": trained_state(model), "optimizer": optimizer.state_dict(),
        "streams": {k: s.state() for k, s in streams.items()}, "task_rng": task_rng.get_state(),
        "phi_rng": phi_rng.get_state(), **rngs[0], "rank_rngs": rngs})


def load_resume_state(out, model, optimizer, streams, task_rng, phi_rng, rank=0):
    path = Path(out) / "resume.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (no checkpoint saved yet in {out})")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"], strict=False)  # the frozen rest is the input model's
    optimizer.load_state_dict(state["optimizer"])
    for k, s in streams.items():
        s.load_state(state["streams"][k])
    task_rng.set_state(state["task_rng"])
    phi_rng.set_state(state["phi_rng"])
    saved = state.get("rank_rngs") or [{"torch_rng": state["torch_rng"], "cuda_rng": state["cuda_rng"]}]
    if rank < len(saved):  # else a process new to the run keeps its own seed (resumed on more processes)
        torch.set_rng_state(saved[rank]["torch_rng"])
        if saved[rank]["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved[rank]["cuda_rng"])
    if rank == 0:
        print(f"resuming {out} from step {state['step']}")
    return state["step"]


if __name__ == "__main__":
    run_cli(main)
