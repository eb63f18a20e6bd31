"""Implicit MAML: the meta-gradient of a (near-)converged inner fine-tuning, without unrolling it.

    phi_hat, state = fine_tune(loss_fn, phi_0, batches, "adam", steps=100, lr=3e-3, damping=1e-3)
    grads, info = hypergradient(loss_fn, theta, phi_hat, phi_0, support, query, damping=1e-3, cg_steps=5, cg_tol=1e-2)
    grads, info = hypergradient(..., first_order=True)     # only dL_Q/dtheta at phi_hat
    grads, info = hypergradient(..., cg_damping=0.1)       # a more damped linear system than the inner problem's

A sibling of maml.py with its notation (theta the body, phi the fast PEFT tensors and head,
loss_fn(fast, batch) the model's loss with `fast` in place of the parameters of those names,
see maml.functional_loss). It needs neither adapters.py nor a stage.

Inner problem (iMAML, Rajeswaran et al. 2019): the downstream fine-tuning itself, run to (near)
convergence, with a proximal term that keeps phi near where it started,

    phi*(theta) = argmin_phi G(phi, theta),     G = L_S(theta, phi) + (lambda/2) ||phi - phi_0||^2.

`fine_tune` minimises G with SGD or Adam on a stream of source-language batches and keeps no
graph between steps, so its memory does not grow with the number of steps.

Meta-objective F(theta) = L_Q(theta, phi*(theta)). At the minimum grad_phi G = 0 for every
theta; differentiating that identity (implicit function theorem) gives
d phi*/d theta = -(d2G/dphi2)^{-1} d2G/(dphi dtheta), so (Lorraine et al. 2020, eq. 5)

    dF/dtheta = dL_Q/dtheta |_{phi*}  -  (d2G/dtheta dphi) u,     (d2G/dphi2) u = dL_Q/dphi |_{phi*}.   (*)

d2G/dphi2 = H + lambda I, H the Hessian of L_S in phi: the damping lambda lifts every
eigenvalue by lambda (positive definite unless H is more negative than -lambda). The mixed
block is L_S's alone: the proximal term does not depend on theta.
u solves the linear system in the small phi space by conjugate gradient (`conjugate_gradient`),
one Hessian-vector product per iteration: autograd.grad of the inner gradient grad_phi G (taken
with create_graph=True) against a vector, a double backward through the model. CG stops when the
relative residual ||(H + lambda I) u - g|| / ||g|| falls to cg_tol, after cg_steps iterations, or
on a direction of negative curvature (p^T (H + lambda I) p <= 0); u is the iterate of smallest
residual (u = 0, the first-order answer, if no step lowered it). The second term of (*) is one
backward of the scalar <grad_phi G, u> (u held constant) into theta: autograd forms the
mixed-derivative product, never the matrix, as in maml.py's term (2).

A lambda small enough to leave the fine-tuning free can leave H + lambda I indefinite, and CG then
stops at once. cg_damping replaces lambda in the linear system only, (H + cg_damping I) u = g: a
damped inverse Hessian as in influence functions (Koh & Liang 2017) or Levenberg-Marquardt, a
biased but stable u (u -> g / cg_damping as it grows: a scaled first-order correction).

phi_hat from `fine_tune` is only near phi*: the error of (*) grows with ||grad_phi G(phi_hat)||,
which `hypergradient` reports (inner_grad_norm) beside the CG iterations and relative residual.

First order: u = 0, dF/dtheta ~ dL_Q/dtheta at phi_hat ("first-order MAML with a converged
inner loop"): the query backward only (and one support backward for inner_grad_norm).

Cost of one hypergradient: a support forward and backward with create_graph, cg_steps
Hessian-vector products (each about one more backward), a query forward and backward, and the
backward of the mixed term. Memory: one double-backward graph of the support batch and one
graph of the query batch, whatever the number of fine-tuning steps.

Dropout: CG needs one fixed linear operator, so call `hypergradient` with dropout off
(model.eval()); `fine_tune` runs in the model's mode (train mode, as downstream fine-tuning).
"""

from collections import OrderedDict
from itertools import islice
from typing import Callable

import torch
from torch import Tensor

from maml import double_backward_attention

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def proximal_term(phi: dict, phi_0: dict, damping: float) -> Tensor:
    """damping/2 ||phi - phi_0||^2, phi_0 held constant."""
    return 0.5 * damping * sum(((phi[n] - phi_0[n].detach()) ** 2).sum() for n in phi)


def proximal_loss(loss_fn, phi: dict, phi_0: dict, batch, damping: float) -> Tensor:
    """G(phi) = L(phi, batch) + damping/2 ||phi - phi_0||^2."""
    loss = loss_fn(phi, batch)
    return loss + proximal_term(phi, phi_0, damping) if damping else loss


def fine_tune(loss_fn, phi_0: dict, batches, optimizer: str = "adam", steps: int = 100, lr: float = 1e-3,
              damping: float = 0.0, start: dict | None = None, state: dict | None = None,
              losses: list | None = None) -> tuple:
    """Return (phi_hat, state): `steps` steps of `optimizer` ("sgd" or "adam") on G, one batch of
    the iterable `batches` per step, from `start` (a warm start) or else from phi_0.

    phi_hat: detached tensors. state: the optimizer's state afterwards; pass it back with
    start=phi_hat to continue the same fine-tuning (Adam's moments). Only phi is differentiated
    (autograd.grad, not backward), so theta's .grad is untouched and no graph outlives a step.
    losses: if a list, the detached G of every step is appended to it.
    """
    phi = OrderedDict((n, t.detach().clone().requires_grad_(True)) for n, t in (start or phi_0).items())
    anchor = {n: t.detach() for n, t in phi_0.items()}
    opt = OPTIMIZERS[optimizer](list(phi.values()), lr=lr)
    if state is not None:
        opt.load_state_dict(state)
    taken = 0
    for batch in islice(batches, steps):
        loss = proximal_loss(loss_fn, phi, anchor, batch, damping)
        grads = torch.autograd.grad(loss, list(phi.values()), allow_unused=True)
        for p, g in zip(phi.values(), grads):
            p.grad = g
        opt.step()
        taken += 1
        if losses is not None:
            losses.append(loss.detach())
    if taken < steps:
        raise ValueError(f"fine_tune: the batches ran out after {taken} of {steps} steps")
    return OrderedDict((n, t.detach()) for n, t in phi.items()), opt.state_dict()


def _dot(xs, ys) -> Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys))


def conjugate_gradient(matvec: Callable[[list], list], b: list, steps: int, tol: float = 0.0) -> tuple:
    """Solve A x = b for a symmetric A given as matvec (lists of tensors in, lists out), from x = 0.

    Returns (x, info): x the iterate of smallest residual seen (CG lowers the A-norm error at
    every iteration, but its residual may rise on an ill-conditioned A, and x = 0 has residual
    1); info = {"cg_iterations", "cg_residual" (||b - A x|| / ||b|| of that x, from CG's own
    recursion), "negative_curvature" (1 if it stopped on p^T A p <= 0, else 0), "cg_min_curvature"
    (the smallest p^T A p / p^T p over CG's directions: with A = H + lambda I, a damping below
    lambda minus this figure leaves A indefinite along that direction)}.
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = _dot(r, r).item()
    b_norm = rr ** 0.5
    best, best_rr = x, rr
    iterations, negative, lowest = 0, 0, float("inf")
    while iterations < steps and b_norm > 0 and rr ** 0.5 > tol * b_norm:
        ap = matvec(p)
        curvature = _dot(p, ap).item()
        lowest = min(lowest, curvature / _dot(p, p).item())
        if curvature <= 0:
            negative = 1
            break
        alpha = rr / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rr_next = _dot(r, r).item()
        p = [ri + (rr_next / rr) * pi for ri, pi in zip(r, p)]
        rr, iterations = rr_next, iterations + 1
        if rr < best_rr:
            best, best_rr = x, rr
    residual = best_rr ** 0.5 / b_norm if b_norm > 0 else 0.0
    return best, {"cg_iterations": iterations, "cg_residual": residual, "negative_curvature": negative,
                  "cg_min_curvature": lowest}


def hypergradient(loss_fn, theta: list, phi_hat: dict, phi_0: dict, support, query, damping: float,
                  cg_steps: int = 10, cg_tol: float = 1e-3, first_order: bool = False,
                  cg_damping: float | None = None) -> tuple:
    """Return (grads, info): dF/dtheta of (*) in the module docstring, one entry per tensor of
    `theta` (None where the losses do not reach it), and the diagnostics

      query_loss       L_Q at phi_hat
      support_loss     L_S at phi_hat (without the proximal term)
      inner_grad_norm  ||grad_phi G(phi_hat)|| on `support`: 0 at the exact phi*
      cg_iterations, cg_residual, negative_curvature, cg_min_curvature   (conjugate_gradient;
                       0, 1.0, 0, inf if first order)

    support is the batch G (its Hessian and mixed block) is taken on; damping the lambda that
    `fine_tune` used; cg_damping (default: damping) the lambda of the linear system. Nothing is
    written to .grad. Call with dropout off (module docstring).
    """
    theta = list(theta)
    phi = OrderedDict((n, t.detach().requires_grad_(True)) for n, t in phi_hat.items())
    fast = list(phi.values())
    with double_backward_attention():  # the Hessian-vector products differentiate attention's backward
        support_loss = loss_fn(phi, support)
        g_loss = support_loss + proximal_term(phi, phi_0, damping) if damping else support_loss
        inner = torch.autograd.grad(g_loss, fast, create_graph=not first_order, allow_unused=True)
    inner = [torch.zeros_like(t) if g is None else g for g, t in zip(inner, fast)]
    query_loss = loss_fn(phi, query)
    direct = torch.autograd.grad(query_loss, fast + theta, allow_unused=True)
    g_query = [torch.zeros_like(t) if g is None else g for g, t in zip(direct[:len(fast)], fast)]
    grads = list(direct[len(fast):])
    info = {"query_loss": query_loss.item(), "support_loss": support_loss.item(),
            "inner_grad_norm": _dot(inner, inner).sqrt().item()}
    if first_order:
        return tuple(grads), info | {"cg_iterations": 0, "cg_residual": 1.0, "negative_curvature": 0,
                                     "cg_min_curvature": float("inf")}

    extra = 0.0 if cg_damping is None else cg_damping - damping

    def hessian_vector_product(v):  # (H + lambda I) v: the graph of `inner` is kept for every product
        outputs = [(g, vi) for g, vi in zip(inner, v) if g.requires_grad]
        hv = torch.autograd.grad([g for g, _ in outputs], fast, grad_outputs=[vi for _, vi in outputs],
                                 retain_graph=True, allow_unused=True)
        return [(torch.zeros_like(t) if h is None else h) + extra * vi for h, t, vi in zip(hv, fast, v)]

    u, cg = conjugate_gradient(hessian_vector_product, g_query, cg_steps, cg_tol)
    mixed_outputs = _dot([g for g in inner if g.requires_grad], [ui for g, ui in zip(inner, u) if g.requires_grad])
    mixed = torch.autograd.grad(mixed_outputs, theta, allow_unused=True)  # (d2G/dtheta dphi) u; frees the graph
    grads = [d if m is None else (-m if d is None else d - m) for d, m in zip(grads, mixed)]
    return tuple(grads), info | cg
