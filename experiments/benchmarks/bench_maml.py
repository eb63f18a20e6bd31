"""Cost of one MAML priming meta-step against a plain PEFT step and a full fine-tuning step.

    # defaults: e5-small, CPU, ~4-8 min
    python experiments/benchmarks/bench_maml.py --data-dir ../shared/data/wikiann
    # steadier figures, longer
    python experiments/benchmarks/bench_maml.py --repeats 7 --warmup 2
    # on a GPU (same code path)
    python experiments/benchmarks/bench_maml.py --gpu 0 --repeats 10 --inner-steps 3
    # timings only
    python experiments/benchmarks/bench_maml.py --no-higher --no-memory
    # XLM-R-base size, bf16
    python experiments/benchmarks/bench_maml.py --gpu 0 --model random-xlmr-base --precision bf16

Setting (METHOD.md, meta_pretrain.py defaults): the default model (pretrained.py) with Houlsby
adapters, support batches of --batch-size English WikiANN sentences, query batches of German
ones (--support-lang, --query-lang). Configurations:
  peft step     body frozen (adapters.freeze_body): forward + backward + AdamW on PEFT + head;
  full FT step  the bare model (no adapters), every parameter trainable: forward + backward +
                AdamW; timed on the support batch and on the query batch;
  meta-step     maml.meta_step on 1 task, phi_0 = adapters.fresh_peft_tensors(model, generator),
                body trainable except the word embeddings (meta_pretrain.set_trainable with the
                stage's default flags), then AdamW on the body; second order and first order.
                meta_step runs one extra no-grad forward per task to report the support loss
                after adaptation: the step is timed as the stage runs it, and also without that
                forward (the same calls minus it), and that forward alone;
  higher        the same second-order meta-step written with the `higher` library (Grefenstette
                et al. 2019): innerloop_ctx + DifferentiableSGD over the PEFT tensors + head,
                the same fresh phi, the same math attention kernel for the support forwards.
Timing: --warmup then --repeats rounds; within a round every configuration runs once, in turn,
so drift from other processes on the machine hits all alike; median and minimum printed.
Dropout is on (train mode), as in the stage script.

Peak memory: each configuration runs in a fresh subprocess (this script with --worker): load,
a warm-up step (creates the optimizer state; the meta-batch worker warms up on all --tasks tasks,
because the first step on a new batch shape touches extra one-time memory), then for every
measured step: every .grad freed, garbage collection and malloc_trim(0) (free heap pages go back
to the OS), reset of the kernel's resident-set high-water mark (writing 5 to
/proc/self/clear_refs), the step, and VmHWM - VmRSS(before) from /proc/self/status: the memory
the step touches on top of the resting model and optimizer state ("peak delta"); VmHWM itself
is printed as the process peak. Where clear_refs cannot be written, ru_maxrss is used instead
(then only a step that beats the earlier high-water mark is measured; the output says so).
With --gpu: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
memory_allocated before the step. glibc's malloc keeps freed blocks below its (self-raising)
mmap threshold in the heap, which is part of the CPU figures; `MALLOC_MMAP_THRESHOLD_=131072
python experiments/benchmarks/bench_maml.py ...` (inherited by the workers) shows the figures without it.
The meta-batch test runs 1 task, then --tasks tasks, in one worker; task 0 is the heaviest of
the --tasks tasks (most padded sub-words), so the 1-task figure is the largest single task and
the comparison isolates what grows with the number of tasks.

Targets (PASS/MISS on the medians, as measured; nothing is adjusted):
  second-order meta-step <= 0.5 x (full FT step on the support batch + full FT step on the query batch);
  first-order meta-step  <= 0.3 x the same; higher's second-order step >= 1.2 x ours;
  peak memory of a second-order meta-batch of --tasks tasks <= 1.1 x that of 1 task, judged twice:
  on the process peak (what torch.cuda.max_memory_allocated counts on a GPU: weights, optimizer
  state, everything) and, stricter, on the step's own peak delta.

`higher` is a benchmark-only dependency, NOT in requirements.txt: `pip install higher` (0.2.1,
the last release, 2020; it imports and runs with torch 2.13). Without it the higher section
reports the import error and the rest runs. Known limitation found here: higher.patch does not
copy a module's forward hooks to its patched copy ('_forward_hooks' is in its _internal_attrs),
and adapters.py injects adapters through forward hooks, so higher as is silently runs the model
WITHOUT adapters; the gradient check shows the consequence, and the timed higher step copies
the hooks onto the patched modules (`_copy_hooks`), after which the meta-gradients agree.
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root
import adapters  # noqa: E402
import episodes
import maml  # noqa: E402
import meta_pretrain  # noqa: E402
from plumbing.batches import bucketed_batches, collate, encode_sentences  # noqa: E402
from plumbing.cli import derive_seed  # noqa: E402
from plumbing.ner_data import load_wikiann  # noqa: E402
from plumbing.pretrained import PRECISIONS, load_token_classifier, load_tokenizer, pick_device, precision_context  # noqa: E402

MB = 2 ** 20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TARGET_SECOND_ORDER = 0.5   # x (full FT support + full FT query)
TARGET_FIRST_ORDER = 0.3
TARGET_HIGHER = 1.2         # higher's second-order step / ours (ours at least this much faster)
TARGET_META_BATCH_MEMORY = 1.10  # peak of --tasks tasks vs 1 task


def build_parser():
    p = argparse.ArgumentParser(description="Time and peak memory of MAML meta-steps vs PEFT and full fine-tuning "
                                            "steps.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="e5-small", help="e5-small (offline default), a folder, or a hub id")
    p.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                   help="attention implementation to load the model with; None: the model's own (sdpa)")
    p.add_argument("--data-dir", default=os.environ.get("WIKIANN_DIR"),
                   help="PAN-X folder <dir>/<lang>/train; the default is $WIKIANN_DIR")
    p.add_argument("--support-lang", default="en", help="language of the support batches")
    p.add_argument("--query-lang", default="de", help="language of the query batches")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per support / query batch")
    p.add_argument("--max-len", type=int, default=128, help="sub-word truncation length")
    p.add_argument("--max-sentences", type=int, default=800,
                   help="train sentences read per language; the batches are the length-bucketed ones closest to "
                        "the median width")
    p.add_argument("--inner-steps", type=int, default=1, help="SGD steps of the inner loop")
    p.add_argument("--inner-lr", type=float, default=1e-2, help="inner-loop SGD learning rate")
    p.add_argument("--outer-lr", type=float, default=2e-5, help="AdamW learning rate of every outer / plain step")
    p.add_argument("--tasks", type=int, default=8, help="meta-batch size of the memory test (1 task vs this many)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median and minimum reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16 autocast in every step")
    p.add_argument("--json", default=None, help="also write the medians (seconds) and memory figures here")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches, fresh phi draws and dropout")
    p.add_argument("--no-higher", action="store_true", help="skip the `higher` comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--verbose", action="store_true", help="print every configuration's time in every round")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    return p


# ----------------------------------------------------------------------------- setup

def load_tasks(args, tokenizer, device):
    """--tasks (support, query) batch pairs of similar widths, heaviest first (task 0)."""
    g = torch.Generator().manual_seed(args.seed)

    def batches(lang):
        examples = encode_sentences(load_wikiann(lang, "train", args.data_dir, args.max_sentences),
                                    tokenizer, args.max_len)
        lengths = [len(e["input_ids"]) for e in examples]
        index = bucketed_batches(lengths, args.batch_size, generator=g)
        index = [b for b in index if len(b) == args.batch_size]
        if len(index) < args.tasks:
            raise ValueError(f"{lang}: only {len(index)} full batches of {args.batch_size}; raise --max-sentences")
        widths = [max(lengths[i] for i in b) for b in index]
        median = statistics.median(widths)
        chosen = sorted(range(len(index)), key=lambda k: (abs(widths[k] - median), k))[:args.tasks]
        return [collate([examples[i] for i in index[k]], tokenizer.pad_token_id, device) for k in chosen]

    pairs = list(zip(batches(args.support_lang), batches(args.query_lang)))
    return sorted(pairs, key=lambda t: -(t[0]["input_ids"].numel() + t[1]["input_ids"].numel()))


def load_model(args, device):
    """(tokenizer, token classifier): --model, or with --model random-xlmr-base an XLM-R-base-sized
    BERT-family model with random weights (hub weights are unreachable on the GPU machines) and
    the default model's XLM-R vocabulary."""
    if args.model != "random-xlmr-base":
        return load_tokenizer(args.model), load_token_classifier(args.model, num_labels=7, device=device,
                                                                  attn_implementation=args.attn)
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification
    tokenizer = load_tokenizer("e5-small")
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                              pad_token_id=tokenizer.pad_token_id, num_labels=7)
    model = XLMRobertaForTokenClassification._from_config(config, attn_implementation=args.attn or "sdpa")
    return tokenizer, model.to(device)


def stage_args(args):
    """meta_pretrain's own default flags (so trainability and phi_0 follow the stage script)."""
    stage = meta_pretrain.build_parser().parse_args([])
    stage.inner_steps, stage.inner_lr = args.inner_steps, args.inner_lr
    return stage


class Bench:
    """The adapter model, the bare model (for full fine-tuning), optimizers, step functions."""

    def __init__(self, args, need_bare=True):
        self.args, self.device = args, pick_device(args.gpu)
        torch.manual_seed(args.seed)
        self.tokenizer, model = load_model(args, self.device)
        self.bare = None
        if need_bare:  # full fine-tuning: the model without adapters, every parameter trainable
            self.bare = copy.deepcopy(model).train()
            for p in self.bare.parameters():
                p.requires_grad_(True)
            self.opt_full = torch.optim.AdamW(self.bare.parameters(), lr=args.outer_lr)
        self.model = adapters.add_peft(model, adapters.PeftConfig("adapter", placement="houlsby"),
                                       seed=args.seed).train()
        self.stage = stage_args(args)
        self.peft = adapters.peft_parameters(self.model)
        meta_pretrain.set_trainable(self.model, "maml", outer_peft=False, inner_params="peft", freeze_embeddings=True)
        self.meta_flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.body = [p for n, p in self.model.named_parameters() if self.meta_flags[n]]
        self.opt_meta = torch.optim.AdamW(self.body, lr=args.outer_lr)
        self.opt_peft = torch.optim.AdamW(self.peft.values(), lr=args.outer_lr)
        self.phi_rng = torch.Generator().manual_seed(derive_seed(args.seed, "fresh phi"))
        self.init_fast = lambda i: episodes.peft_start(self.model, self.phi_rng, outer_peft=False)
        for name in ("peft_step", "full_step", "meta", "after_forward", "higher_step"):  # every step in --precision
            setattr(self, name, self._in_precision(getattr(self, name)))
        self.loss_fn = maml.functional_loss(self.model)
        self.tasks = load_tasks(args, self.tokenizer, self.device)
        self.inner_opt = None
        self.phases = {}  # (configuration part) -> seconds, recorded while self.recording
        self.recording = False

    def _in_precision(self, step):
        def run(*args, **kwargs):
            with precision_context(self.device, self.args.precision):
                return step(*args, **kwargs)
        return run

    def _phase(self, name, start):
        """Record the time since `start` under `name` (device synchronised); return the new start."""
        sync(self.device)
        now = time.perf_counter()
        if self.recording:
            self.phases.setdefault(name, []).append(now - start)
        return now

    def clear_grads(self):
        """Free every .grad (the resting state a step starts from: weights and optimizer state)."""
        for model in (self.model, self.bare):
            for p in model.parameters() if model is not None else ():
                p.grad = None

    # trainability differs between configurations that share self.model
    def _meta_mode(self, peft_trainable=False):
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.meta_flags[n] or (peft_trainable and n in self.peft))

    def peft_step(self, batch):
        adapters.freeze_body(self.model)
        self.opt_peft.zero_grad(set_to_none=True)
        self.model(**batch).loss.backward()
        self.opt_peft.step()

    def full_step(self, batch):
        start = time.perf_counter()
        self.opt_full.zero_grad(set_to_none=True)
        self.bare(**batch).loss.backward()
        start = self._phase("full FT: forward + backward", start)
        self.opt_full.step()
        self._phase("full FT: AdamW step (all parameters)", start)

    def meta(self, n_tasks, first_order, after_forward=True):
        """One priming step as meta_pretrain.main runs it (after_forward=False: meta_step's
        calls without its post-adaptation no-grad forward)."""
        self._meta_mode()
        tasks = self.tasks[:n_tasks]
        start = time.perf_counter()
        self.opt_meta.zero_grad(set_to_none=True)
        if after_forward:
            maml.meta_step(self.loss_fn, tasks, self.init_fast, self.args.inner_steps, self.args.inner_lr,
                           first_order=first_order, clip=self.stage.inner_clip)
        else:
            for i, (support, query) in enumerate(tasks):
                adapted = maml.inner_loop(self.loss_fn, self.init_fast(i), support, self.args.inner_steps,
                                          self.args.inner_lr, first_order=first_order, clip=self.stage.inner_clip,
                                          losses=[])
                (self.loss_fn(adapted, query) / len(tasks)).backward()
        order = "1st" if first_order else "2nd"
        part = "meta_step" if after_forward else "meta_step calls without the after forward"
        start = self._phase(f"{order} order: {part}", start)
        self.opt_meta.step()
        self._phase("meta: AdamW step (body)", start)

    def after_forward(self):
        """meta_step's extra cost per task: a no-grad forward of the support batch at phi'."""
        if getattr(self, "_after_phi", None) is None:  # drawn once: the draw is not part of that forward
            self._after_phi = {n: t.detach() for n, t in self.init_fast(0).items()}
        with torch.no_grad():
            self.loss_fn(self._after_phi, self.tasks[0][0])

    def higher_step(self, n_tasks=1, copy_hooks=True, fast=None):
        """The same second-order meta-step written with higher (phi_0 copied into the model's own
        PEFT Parameters, which then need requires_grad for higher's inner gradient)."""
        import higher
        self._meta_mode(peft_trainable=True)
        if self.inner_opt is None:
            self.inner_opt = torch.optim.SGD(self.peft.values(), lr=self.args.inner_lr)
        tasks = self.tasks[:n_tasks]
        self.opt_meta.zero_grad(set_to_none=True)
        for p in self.peft.values():
            p.grad = None
        for i, (support, query) in enumerate(tasks):
            phi = fast if fast is not None else self.init_fast(i)
            with torch.no_grad():
                for n, p in self.peft.items():
                    p.copy_(phi[n])
            with higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                if copy_hooks:
                    _copy_hooks(self.model, fmodel)
                with maml.double_backward_attention():
                    for _ in range(self.args.inner_steps):
                        diffopt.step(fmodel(**support).loss)
                (fmodel(**query).loss / len(tasks)).backward()
        self.opt_meta.step()
        self._meta_mode()


def _copy_hooks(model, fmodel):
    """Give higher's patched modules the forward (pre-)hooks of the originals (higher skips them)."""
    for original, patched in zip(model.modules(), fmodel.modules()):
        patched._forward_hooks.update(original._forward_hooks)
        patched._forward_pre_hooks.update(original._forward_pre_hooks)


# ----------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, costs=None):
    """Seconds of fn(); costs (a list): append (kernel seconds, MB of fresh pages touched) of the call,
    from getrusage: the operating system's share of the step (mostly zeroing newly mapped pages)."""
    sync(device)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if costs is not None:
        costs.append((after.ru_stime - before.ru_stime, (after.ru_minflt - before.ru_minflt) * PAGE / MB))
    return seconds


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn, device, prepare=None):
    """(peak delta MB, process peak MB, method) of one call of fn, after prepare(); see the module docstring."""
    if prepare is not None:
        prepare()
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - base) / MB, peak / MB, "torch.cuda.max_memory_allocated"
    reset = _reset_hwm()
    base_kb, maxrss_before = _status_kb("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    if reset:
        peak_kb, method = _status_kb("VmHWM"), "VmHWM after clear_refs reset"
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss (clear_refs not writable)" + (
            "" if peak_kb > maxrss_before else "; the step did not exceed an earlier peak: figure is a lower bound")
    return (peak_kb - base_kb) / 1024, peak_kb / 1024, method


def run_worker(args):
    """One fresh process: warm-up step, then the measured step(s); prints one JSON line."""
    name = args.worker
    bench = Bench(args, need_bare=(name == "full"))
    support = bench.tasks[0][0]
    steps = {"peft": lambda: bench.peft_step(support),
             "full": lambda: bench.full_step(support),
             "meta2": lambda: bench.meta(1, first_order=False),
             "meta1": lambda: bench.meta(1, first_order=True),
             "higher": lambda: bench.higher_step(1)}
    out = {}
    # Warm-up: optimizer state and one-time allocations. The first step on a new batch shape costs
    # extra one-time memory (measured: ~90 MB more for the first 8-task step after a 1-task warm-up
    # than for the next one), so the meta-batch worker warms up on every task's shapes.
    warm = (lambda: bench.meta(args.tasks, first_order=False)) if name == "meta2" else steps[name]
    warm()
    out[name] = peak_memory(steps[name], bench.device, prepare=bench.clear_grads)
    if name == "meta2":
        out[f"meta2x{args.tasks}"] = peak_memory(lambda: bench.meta(args.tasks, first_order=False), bench.device,
                                                 prepare=bench.clear_grads)
    if name == "higher":
        out["gradient_check"] = gradient_check(bench)
    print("RESULT " + json.dumps(out), flush=True)


def gradient_check(bench):
    """Body meta-gradients of maml.meta_step vs higher (as is, and with the hooks copied), same
    task 0 and the same phi_0, dropout off."""
    bench.model.eval()
    phi = adapters.fresh_peft_tensors(bench.model, torch.Generator().manual_seed(1234))
    names = [n for n, p in bench.model.named_parameters() if bench.meta_flags[n]]
    params = dict(bench.model.named_parameters())

    def grads():
        return {n: params[n].grad.detach().clone() if params[n].grad is not None else torch.zeros_like(params[n])
                for n in names}

    bench._meta_mode()
    bench.opt_meta.zero_grad(set_to_none=True)
    maml.meta_step(bench.loss_fn, bench.tasks[:1],
                   lambda i: {n: t.detach().clone().requires_grad_() for n, t in phi.items()},
                   bench.args.inner_steps, bench.args.inner_lr)
    ours = grads()
    result = {}
    for label, copy_hooks in (("higher as is", False), ("higher, hooks copied", True)):
        step = bench.opt_meta.step
        bench.opt_meta.step = lambda: None  # keep the body fixed between the two computations
        try:
            bench.higher_step(1, copy_hooks=copy_hooks, fast=phi)
        finally:
            bench.opt_meta.step = step
        result[label] = compare(ours, grads())
    bench.model.train()
    return result


def compare(ours, theirs):
    """Max |difference| / max |ours| over all body elements, the same with L2 norms, and the worst
    tensor by its own max relative difference (attention key biases excluded: their gradient is
    zero analytically, softmax being shift-invariant, so theirs is rounding noise)."""
    flat_diff = torch.cat([(ours[n] - theirs[n]).flatten().float() for n in ours])
    flat = torch.cat([ours[n].flatten().float() for n in ours])
    per = {n: ((ours[n] - theirs[n]).abs().max() / ours[n].abs().max().clamp_min(1e-30)).item()
           for n in ours if not n.endswith("attention.self.key.bias")}
    worst = max(per, key=per.get)
    return {"max_rel": (flat_diff.abs().max() / flat.abs().max()).item(),
            "norm_rel": (torch.linalg.vector_norm(flat_diff) / torch.linalg.vector_norm(flat)).item(),
            "worst_tensor": worst, "worst_tensor_rel": per[worst]}


def memory_workers(args, argv, with_higher):
    """Run every memory measurement in its own fresh process; name -> (delta, peak, method) or error."""
    names = ["peft", "full", "meta2", "meta1"] + (["higher"] if with_higher else [])
    results, errors = {}, {}
    for name in names:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            errors[name] = f"worker failed (exit {proc.returncode}): {tail}"
        else:
            results.update(json.loads(lines[-1][len("RESULT "):]))
        print(f"  memory worker {name:7s} done in {time.perf_counter() - t0:5.1f} s", flush=True)
    return results, errors


# ----------------------------------------------------------------------------- report

def fmt_s(ts):
    return f"{statistics.median(ts):8.3f} {min(ts):8.3f}" if ts else f"{'-':>8} {'-':>8}"


def verdict(ok):
    return "PASS" if ok else "MISS"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return run_worker(args)
    if args.inner_steps < 1 or args.tasks < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--inner-steps, --tasks and --repeats must be at least 1, --warmup at least 0")
    try:
        pick_device(args.gpu)
    except ValueError as e:
        raise SystemExit(str(e))
    t_start = time.perf_counter()
    print("load average at start (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg(), flush=True)

    higher_error = None
    if not args.no_higher:
        try:
            import higher  # noqa: F401
        except Exception as e:  # report exactly why, then run the rest
            higher_error = f"import higher failed: {type(e).__name__}: {e}"

    with_higher = not args.no_higher and higher_error is None
    memory, memory_errors = ({}, {}) if args.no_memory else memory_workers(args, argv, with_higher)

    bench = Bench(args)
    device = bench.device
    attn = bench.model.config._attn_implementation
    attn_note = "; the support forwards of second order run SDPA's math kernel" if attn == "sdpa" else ""
    print(f"model {args.model} ({attn} attention{attn_note}), Houlsby adapters, device {device}, threads "
          f"{torch.get_num_threads()}, inner steps {args.inner_steps} (lr {args.inner_lr}), batches of "
          f"{args.batch_size} ({args.support_lang} support, {args.query_lang} query)")
    widths = ", ".join(f"{s['input_ids'].shape[1]}/{q['input_ids'].shape[1]}" for s, q in bench.tasks)
    print(f"task widths (padded sub-words, support/query), task 0 timed: {widths}")
    n_body = sum(p.numel() for p in bench.body)
    n_all = sum(p.numel() for p in bench.bare.parameters())
    n_peft = sum(p.numel() for p in bench.peft.values())
    print(f"trainable: peft step {n_peft:,}  full FT {n_all:,}  meta-step body {n_body:,} (word embeddings frozen)")

    support, query = bench.tasks[0]
    configs = {
        "peft step (support)": lambda: bench.peft_step(support),
        "full FT step (support)": lambda: bench.full_step(support),
        "full FT step (query)": lambda: bench.full_step(query),
        "meta-step 2nd order (meta_step)": lambda: bench.meta(1, first_order=False),
        "  without the after-adaptation forward": lambda: bench.meta(1, first_order=False, after_forward=False),
        "meta-step 1st order (meta_step)": lambda: bench.meta(1, first_order=True),
        "  without the after-adaptation forward ": lambda: bench.meta(1, first_order=True, after_forward=False),
        "after-adaptation no-grad forward alone": bench.after_forward,
    }
    if not args.no_higher and higher_error is None:
        configs["higher 2nd order (hooks copied)"] = lambda: bench.higher_step(1)
    times = {k: [] for k in configs}
    costs = {k: [] for k in configs}  # (kernel s, fresh-page MB) per timed call
    for round_ in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        bench.recording = round_ >= args.warmup
        for name, fn in list(configs.items()):
            try:
                t = timed(fn, device, costs[name] if round_ >= args.warmup else None)
            except Exception as e:
                if not name.startswith("higher"):
                    raise
                higher_error = f"higher step failed: {type(e).__name__}: {e}"
                traceback.print_exc()
                del configs[name], times[name], costs[name]
                continue
            if round_ >= args.warmup:
                times[name].append(t)
            if args.verbose:
                print(f"    {name.strip():42s} {t:8.3f} s", flush=True)
        print(f"  round {round_ + 1}/{args.warmup + args.repeats} "
              f"({'warm-up' if round_ < args.warmup else 'timed'}) {time.perf_counter() - t0:6.1f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    mem_key = {"peft step (support)": "peft", "full FT step (support)": "full",
               "meta-step 2nd order (meta_step)": "meta2", "meta-step 1st order (meta_step)": "meta1",
               "higher 2nd order (hooks copied)": "higher"}
    print()
    print(f"timing: {args.warmup} warm-up + {args.repeats} timed rounds, configurations interleaved; "
          f"memory: fresh process per configuration")
    print(f"{'configuration':42s} {'median s':>8} {'min s':>8} {'max s':>8} {'kernel s':>8} {'new pages MB':>12} "
          f"{'peak delta MB':>14} {'process peak MB':>16}")
    kernel = {k: statistics.median(c[0] for c in v) for k, v in costs.items() if v}
    fresh = {k: statistics.median(c[1] for c in v) for k, v in costs.items() if v}
    for name in times:
        m = memory.get(mem_key.get(name, ""), None)
        mem = f"{m[0]:14.0f} {m[1]:16.0f}" if m else f"{'':14} {'':16}"
        print(f"{name:42s} {fmt_s(times[name])} {max(times[name]):8.3f} {kernel[name]:8.3f} {fresh[name]:12.0f} {mem}")
    print("(kernel s, new pages MB: medians of the operating system's time in the call and of the memory it had to "
          "map afresh, from getrusage; zeroing new pages is most of that kernel time)")
    key8 = f"meta2x{args.tasks}"
    if key8 in memory:
        m = memory[key8]
        print(f"{f'meta-step 2nd order, {args.tasks} tasks':42s} {'(memory only)':>26} {m[0]:14.0f} {m[1]:16.0f}")
    methods = sorted({v[2] for k, v in memory.items() if k != "gradient_check"})
    if methods:
        print(f"memory method: {'; '.join(methods)}")
    for name, err in memory_errors.items():
        print(f"memory worker {name}: {err}")

    full2 = med["full FT step (support)"] + med["full FT step (query)"]
    print()
    print("targets (on medians):")
    for label, key, limit in (("2nd-order meta-step", "meta-step 2nd order (meta_step)", TARGET_SECOND_ORDER),
                              ("1st-order meta-step", "meta-step 1st order (meta_step)", TARGET_FIRST_ORDER)):
        ratio = med[key] / full2
        print(f"  [{verdict(ratio <= limit)}] {label} {med[key]:.3f} s = {ratio:.2f} x (full FT support + query = "
              f"{full2:.3f} s); target <= {limit} x")
        lean = med["  without the after-adaptation forward" + ("" if key.startswith("meta-step 2nd") else " ")]
        print(f"  [{verdict(lean / full2 <= limit)}] {label} without the logging forward (meta_pretrain.py "
              f"--log-adaptation-every N > 1 on the other steps) {lean:.3f} s = {lean / full2:.3f} x")
    if "meta2" in memory and key8 in memory:
        for label, i in (("process peak (model, optimizer state and all)", 1),
                         ("peak delta (the step's own memory)", 0)):
            one, many = memory["meta2"][i], memory[key8][i]
            print(f"  [{verdict(many <= TARGET_META_BATCH_MEMORY * one)}] 2nd order, {label}: {args.tasks} tasks "
                  f"{many:.0f} MB = {many / one:.2f} x 1 task ({one:.0f} MB); "
                  f"target <= {TARGET_META_BATCH_MEMORY:.2f} x")
        print(f"    (the body's gradient buffers, {4 * n_body / MB:.0f} MB in float32, exist from task 2 on while "
              f"that task's graph is alive; with 1 task they are only filled during its backward)")
    else:
        print(f"  [NOT MEASURED] meta-batch memory ({memory_errors.get('meta2', '--no-memory')})")

    print()
    print("details:")
    after = med["after-adaptation no-grad forward alone"]
    for order, key, key_no in (("2nd", "meta-step 2nd order (meta_step)", "  without the after-adaptation forward"),
                               ("1st", "meta-step 1st order (meta_step)", "  without the after-adaptation forward ")):
        print(f"  {order} order: meta_step {med[key]:.3f} s, without its after-adaptation forward {med[key_no]:.3f} s "
              f"(difference {med[key] - med[key_no]:+.3f} s = {(med[key] - med[key_no]) / med[key]:+.1%}); "
              f"that forward alone {after:.3f} s = {after / med[key]:.1%} of the step; "
              f"without it the ratio to 2 full FT steps would be {med[key_no] / full2:.2f} x")
    for name, ts in bench.phases.items():
        print(f"  part {name:55s} median {statistics.median(ts):.3f} s  min {min(ts):.3f} s")
    fwd_bwd = bench.phases.get("full FT: forward + backward")
    if fwd_bwd:
        print(f"  against two full FT forward + backward passes without the AdamW step "
              f"(2 x {statistics.median(fwd_bwd):.3f} s): 2nd order "
              f"{med['meta-step 2nd order (meta_step)'] / (2 * statistics.median(fwd_bwd)):.2f} x, 1st order "
              f"{med['meta-step 1st order (meta_step)'] / (2 * statistics.median(fwd_bwd)):.2f} x "
              f"(full FT's AdamW runs over {n_all:,} parameters, the word embeddings included; "
              f"the meta-step's over {n_body:,})")
    print(f"  2nd / 1st order time: "
          f"{med['meta-step 2nd order (meta_step)'] / med['meta-step 1st order (meta_step)']:.2f} x;"
          f" peft step / full FT step (support): {med['peft step (support)'] / med['full FT step (support)']:.2f} x")

    print()
    if args.no_higher:
        print("higher: skipped (--no-higher)")
    elif higher_error:
        print(f"higher: {higher_error}")
    else:
        import higher
        h = med["higher 2nd order (hooks copied)"]
        for label, ours in (("as the stage runs it", med["meta-step 2nd order (meta_step)"]),
                            ("without the logging forward", med["  without the after-adaptation forward"])):
            print(f"  [{verdict(h / ours >= TARGET_HIGHER)}] higher / ours {label}: {h / ours:.2f} x; "
                  f"target >= {TARGET_HIGHER} x")
        print(f"higher {getattr(higher, '__version__', '0.2.1')}: 2nd-order meta-step {h:.3f} s = "
              f"{h / med['meta-step 2nd order (meta_step)']:.2f} x ours as the stage runs it, "
              f"{h / med['  without the after-adaptation forward']:.2f} x ours without the after-adaptation forward "
              f"(higher has none)")
        print("  note: higher's inner step differentiates the support loss with respect to EVERY parameter of the "
              "patched model that requires grad (the body too, create_graph=True), then updates only the PEFT ones")
    check = memory.get("gradient_check")
    if check:
        print("  meta-gradient check on the body (task 0, same phi_0, dropout off), higher vs maml.meta_step:")
        for label, c in check.items():
            print(f"    {label:22s} max rel diff {c['max_rel']:.2e}  norm rel diff {c['norm_rel']:.2e}  "
                  f"worst tensor {c['worst_tensor']} {c['worst_tensor_rel']:.2e}")
        print("    ('higher as is' disagrees because higher.patch does not copy forward hooks, so its patched "
              "model runs without the hook-injected adapters)")
    elif not args.no_higher and "higher" in memory_errors:
        print(f"  gradient check: {memory_errors['higher']}")
    if args.json:
        second = med["meta-step 2nd order (meta_step)"]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "device": str(device), "median_seconds": med,
            "median_kernel_seconds": kernel, "median_new_page_mb": fresh,
            "meta_steps_per_second_2nd_order": 1 / second, "ratio_2nd_order_to_two_full_ft_steps": second / full2,
            "ratio_1st_order_to_two_full_ft_steps": med["meta-step 1st order (meta_step)"] / full2,
            "memory_mb": {k: v[:2] for k, v in memory.items() if k != "gradient_check"}}, indent=1))
        print(f"figures written to {args.json}")
    print()
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at end (1, 5, 15 min): "
          "%.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
