"""MAML for priming: a hand-written differentiable inner loop and the meta-step.

This file is METHOD.md steps 3 (inner loop) and 4 (meta-gradient). It adapts any dict of
tensors and imports nothing else from the project, so it can be read and reused alone.

Example (runs as it is; tests/test_maml.py runs it):

    import torch, maml
    w = torch.randn(3, requires_grad=True)                 # theta: what the outer loop trains
    def loss_fn(fast, batch):                              # any loss of (fast tensors, batch)
        x, y = batch
        return ((x @ (w + fast["b"]) - y) ** 2).mean()
    support, query = (torch.randn(8, 3), torch.randn(8)), (torch.randn(8, 3), torch.randn(8))
    adapted = maml.inner_loop(loss_fn, {"b": torch.zeros(3)}, support, steps=5, lr=0.1)   # phi'
    loss_fn(adapted, query).backward()                     # w.grad: the second-order meta-gradient
    losses = maml.meta_step(loss_fn, [(support, query)], lambda i: {"b": torch.zeros(3)}, steps=5, lr=0.1)

Notation
--------
theta  the body: the pretrained encoder's own parameters.
phi    the "fast" tensors, the ones the inner loop adapts. By default the PEFT tensors
       (adapter, prefix or LoRA) plus the NER head; in the standard-MAML ablation, every
       trainable tensor (then theta and phi overlap, and nothing special happens).
L_S, L_Q  the loss on a task's support batch (source language) and query batch
       (a priming language).

Inner loop (Finn et al. 2017, eq. 1): k plain SGD steps on phi only, theta held fixed,

    phi_0     = phi
    phi_{j+1} = phi_j - alpha * grad_phi L_S(theta, phi_j)            j = 0 .. k-1
    phi'      = phi_k

This is what a user's downstream PEFT fine-tuning does, so phi' is "the PEFT model that
theta would give". With Meta-SGD (Li et al. 2017) alpha is a learned tensor per phi tensor.
The step itself is one entry of INNER_OPTIMIZERS (`sgd`, the paper's); another update rule is
another entry, which --inner-optimizer then offers.

Outer loop (Finn et al. 2017, eq. 2): move theta so that the adapted model does well on
the query,

    theta <- theta - beta * grad_theta L_Q(theta, phi'(theta)).

phi' depends on theta (every inner gradient was taken at theta), so by the chain rule

    d L_Q / d theta = dL_Q/dtheta |_{phi'}                          (1) direct term
                    + (d phi'/d theta)^T  dL_Q/dphi |_{phi'}         (2) through adaptation

and for one step d phi_1/d theta = -alpha * d^2 L_S / (d phi d theta): a mixed second
derivative. Autograd never forms that matrix; it computes the product (2) as a
Hessian-vector product when we back-propagate through the inner gradients, which is
possible because they were taken with `create_graph=True`.

First-order MAML (Finn et al. 2017, sec. 5.2; Nichol et al. 2018) drops term (2): it
treats phi' as a constant with respect to theta, i.e. it detaches the inner gradients.
Then theta's meta-gradient is simply grad_theta L_Q evaluated at phi', and each inner step
costs one ordinary backward. phi_0 still reaches phi' through the identity path
phi' = phi_0 - alpha * sum_j g_j, so an outer update of the initial phi (plain MAML) gets
grad_phi L_Q at phi' in first-order mode, the usual FOMAML update.

Memory: second order keeps all k support graphs alive until the query backward, so it grows
linearly in k (Antoniou et al. 2019 discuss this cost). `meta_step` back-propagates task by
task so only one task's graph is alive at a time.

Attention: second order differentiates through the backward of every op, attention
included. The fused scaled-dot-product kernels have no double backward (on CPU
`_scaled_dot_product_flash_attention_for_cpu_backward`, measured with torch 2.13 in eval
and train mode, as soon as some phi tensor lies below an attention layer; the GPU fused
kernels are not relied on either). `double_backward_attention` selects SDPA's plain "math"
kernel, which is built from differentiable ops; `inner_loop` enters it itself when second
order, so a model loaded with attn_implementation="sdpa" or "eager" works alike.
"""

from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def functional_loss(model: torch.nn.Module) -> Callable[[dict, dict], Tensor]:
    """Return loss_fn(fast, batch): the model's loss with the tensors in `fast` in place of
    the parameters of the same names.

    Other parameters are the model's own Parameters, so a backward reaches them (this is
    how theta gets its meta-gradient). The model itself is never written to.
    """
    known = tensor_names(model)

    def loss_fn(fast: dict, batch: dict) -> Tensor:
        return functional_outputs(model, known, fast, batch).loss

    return loss_fn


def functional_logits(model: torch.nn.Module) -> Callable[[dict, dict], tuple]:
    """Return logits_fn(fast, batch) -> (logits, labels): as functional_loss, the model's logits and
    the batch's labels, for curvature in the logits (implicit.py's Gauss-Newton products)."""
    known = tensor_names(model)
    return lambda fast, batch: (functional_outputs(model, known, fast, batch).logits, batch["labels"])


def tensor_names(model):
    return ({name for name, _ in model.named_parameters(remove_duplicate=False)}
            | {name for name, _ in model.named_buffers(remove_duplicate=False)})


def functional_outputs(model, known, fast, batch):
    unknown = fast.keys() - known
    if unknown:  # functional_call would silently ignore a misspelled name
        raise KeyError(f"fast tensors not in the model: {sorted(unknown)}")
    return functional_call(model, dict(fast), args=(), kwargs=batch, strict=False)


@contextmanager
def double_backward_attention():
    """Run attention with SDPA's math kernel, the one that supports a double backward.

    Needed for second-order MAML with attn_implementation="sdpa" (CPU and GPU); harmless
    with "eager". It acts on the forward passes: enter it around the inner loop, the
    later query backward needs nothing. Models loaded with "flash_attention_2" are not
    covered; switch them with `model.set_attn_implementation("eager")`.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _clip_by_global_norm(grads: list, max_norm: float) -> list:
    """Scale all gradients by min(1, max_norm / ||g||), differentiably (unlike
    torch.nn.utils.clip_grad_norm_, which writes into .grad)."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [None if g is None else g * scale for g in grads]


def _as_differentiable(fast: dict) -> "OrderedDict[str, Tensor]":
    """Make every fast tensor one we can differentiate with respect to.

    A tensor that already requires grad (a leaf Parameter, or a result of an earlier step)
    is kept as is, so gradients flow back to it; a plain tensor becomes a fresh leaf.
    """
    return OrderedDict((name, t if t.requires_grad else t.detach().requires_grad_(True))
                       for name, t in fast.items())


def sgd(tensor: Tensor, grad: Tensor, lr, state: dict) -> Tensor:
    """One plain SGD step, phi_{j+1} = phi_j - alpha * g (Finn et al. 2017, eq. 1)."""
    return tensor - lr * grad


# The inner loop's update rules (--inner-optimizer): name -> update(tensor, grad, lr, state) -> the
# new tensor, built from differentiable ops so that second order differentiates through it. `state`
# is a dict per fast tensor that lives for one inner loop (an optimizer's moments, its step count).
INNER_OPTIMIZERS = {"sgd": sgd}


def inner_loop(loss_fn, fast: dict, support_batch: dict, steps: int, lr: float,
               first_order: bool = False, clip: float | None = None, rates: dict | None = None,
               losses: list | None = None, optimizer: str = "sgd") -> "OrderedDict[str, Tensor]":
    """Return phi' = phi_k after `steps` steps of `optimizer` (INNER_OPTIMIZERS; SGD by default)
    on the support loss, updating `fast` only.

    Second order (default): the inner gradients keep their graph (create_graph=True), so
    phi' is a differentiable function of theta and of the initial `fast`. first_order:
    the inner gradients are detached (term (2) of the module docstring is dropped).
    clip: clip the inner gradient by global norm before the step (differentiably).
    rates: Meta-SGD (Li et al. 2017) learned inner learning rates, name -> tensor (a scalar
    or broadcastable to the tensor); names it lacks use `lr`. Gradients reach them.
    losses: if a list is given, the detached support loss at phi_0 .. phi_{k-1} is
    appended to it (as tensors, to avoid a device sync per step).
    Tensors in `fast` that the loss does not use are returned unchanged.
    steps=0: phi' = phi_0, loss_fn never called; a tensor that requires grad is returned itself, any
    other as a new leaf that requires grad (as at every step's start).
    Never writes into the model's parameters: each step builds new tensors.
    """
    # BEGIN ASSIGNMENT inner_loop
    fast, update = _as_differentiable(fast), INNER_OPTIMIZERS[optimizer]
    states = {name: {} for name in fast}
    context = nullcontext() if first_order else double_backward_attention()
    with context:
        for _ in range(steps):
            loss = loss_fn(fast, support_batch)
            if losses is not None:
                losses.append(loss.detach())
            grads = torch.autograd.grad(loss, list(fast.values()),
                                        create_graph=not first_order, allow_unused=True)
            if clip is not None:
                grads = _clip_by_global_norm(grads, clip)
            fast = OrderedDict(
                (name, t if g is None else update(t, g, rates.get(name, lr) if rates else lr, states[name]))
                for (name, t), g in zip(fast.items(), grads)
            )
    return fast
    # END ASSIGNMENT inner_loop


def meta_step(loss_fn, tasks: list, init_fast: Callable[[int], dict], steps: int, lr: float,
              first_order: bool = False, clip: float | None = None,
              rates: dict | None = None, measure_after: bool = True, optimizer: str = "sgd") -> dict:
    """Accumulate the average meta-gradient of a meta-batch of tasks into .grad.

    tasks: list of (support_batch, query_batch). For task i, phi_0 = init_fast(i): fresh
    tensors drawn the way downstream PEFT draws them (default priming), or the model's own
    PEFT Parameters (outer update of the initial phi, plain MAML). Each task's query loss
    at phi' is divided by n_tasks and back-propagated right away, so memory holds one task's
    graph at a time; the body's Parameters (and phi_0 if it is a leaf that requires grad,
    and Meta-SGD `rates`) accumulate .grad. Zeroing .grad before and calling
    optimizer.step() after are the caller's job.
    Returns the mean support loss before and after adaptation (the latter costs one extra
    no-grad forward per task, about 11% of a step: measure_after=False skips it and reports
    no support_loss_after) and the mean query loss.
    """
    # BEGIN ASSIGNMENT meta_gradient
    n_tasks = len(tasks)
    before, after, query = [], [], []
    for i, (support_batch, query_batch) in enumerate(tasks):
        support_losses = []
        adapted = inner_loop(loss_fn, init_fast(i), support_batch, steps, lr, first_order=first_order,  # 3.
                             clip=clip, rates=rates, losses=support_losses, optimizer=optimizer)
        query_loss = loss_fn(adapted, query_batch)                                                  # 4.
        (query_loss / n_tasks).backward()  # frees this task's graph before the next task
        if measure_after or not support_losses:  # (with no inner step, "before" is this loss too)
            with torch.no_grad():
                adapted_loss = loss_fn({n: t.detach() for n, t in adapted.items()}, support_batch)
            after += [adapted_loss] if measure_after else []
        before.append(support_losses[0] if support_losses else adapted_loss)
        query.append(query_loss.detach())
    losses = {"support_loss_before": _mean(before), "query_loss": _mean(query)}
    return losses | ({"support_loss_after": _mean(after)} if measure_after else {})
    # END ASSIGNMENT meta_gradient


def _mean(losses: list) -> float:
    """Mean of detached loss tensors, read back once per meta-step (one device sync)."""
    return torch.stack(losses).mean().item()
