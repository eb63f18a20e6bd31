"""Implicit MAML: the meta-gradient of a (near-)converged inner fine-tuning, without unrolling it.

    phi_hat, state = inner_fine_tune(loss_fn, phi_0, batches, "adam", steps=100, lr=3e-3, damping=1e-3)
    grads, info = hypergradient(loss_fn, theta, phi_hat, phi_0, support, query, damping=1e-3, cg_steps=5, cg_tol=1e-2)
    grads, info = hypergradient(..., first_order=True)     # only dL_Q/dtheta at phi_hat
    grads, info = hypergradient(..., cg_damping=0.1)       # a more damped linear system than the inner problem's
    grads, info = hypergradient(..., curvature="ggn", logits_fn=logits_fn)   # Gauss-Newton curvature (PSD)

A sibling of maml.py with its notation (theta the body, phi the fast PEFT tensors and head,
loss_fn(fast, batch) the model's loss with `fast` in place of the parameters of those names,
see maml.functional_loss). It needs neither adapters.py nor a stage.

Inner problem (iMAML, Rajeswaran et al. 2019): the downstream fine-tuning itself, run to (near)
convergence, with a proximal term that keeps phi near where it started,

    phi*(theta) = argmin_phi G(phi, theta),     G = L_S(theta, phi) + (lambda/2) ||phi - phi_0||^2.

`inner_fine_tune` minimises G with SGD or Adam on a stream of source-language batches and keeps no
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

Curvature (`curvature`). The exact H of L_S in phi is strongly indefinite on a real encoder at
phi_hat (measured on e5-small: smallest eigenvalue about -5 per batch, RESULTS.md): CG then meets
negative curvature at once, keeps u = 0, and the "second-order" hypergradient is the first-order
one. curvature="ggn" replaces H by the generalized Gauss-Newton matrix (Schraudolph 2002;
Martens 2010), positive semi-definite by construction:

    H = J^T H_out J  +  sum_k (dL/dz_k) d2z_k/dphi2,      GGN = J^T H_out J,

z the logits, J = dz/dphi, H_out the Hessian of the cross-entropy in the logits (per token
(diag(p) - p p^T) / N_tokens, PSD). It is the exact Hessian of L_S with the network linearised in
phi around phi_hat. The mixed block is taken the same way, J_phi^T H_out J_theta, so (*) becomes
the implicit derivative of that linearised inner problem (both blocks drop the same residual term):

    dF/dtheta = dL_Q/dtheta - J_theta^T H_out J_phi u,      (GGN + lambda I) u = dL_Q/dphi.

Products, never the matrices: J v by the double-vjp trick (J^T w is linear in w, so the gradient
of <J^T w, v> in w is J v), H_out by its closed form, J^T y by one backward of z. Needs
logits_fn(fast, batch) -> (logits, labels) with L = the mean cross-entropy over labels != -100.
curvature="hessian" keeps the exact formula (*) (and its negative-curvature stop).

phi_hat from `inner_fine_tune` is only near phi*: the error of (*) grows with ||grad_phi G(phi_hat)||,
which `hypergradient` reports (inner_grad_norm) beside the CG iterations and relative residual.

First order: u = 0, dF/dtheta ~ dL_Q/dtheta at phi_hat ("first-order MAML with a converged
inner loop"): the query backward only (and one support backward for inner_grad_norm).

Cost of one hypergradient: a support forward and backward with create_graph, cg_steps
Hessian-vector products (each about one more backward), a query forward and backward, and the
backward of the mixed term. Memory: one double-backward graph of the support batch and one
graph of the query batch, whatever the number of fine-tuning steps.

Dropout: CG needs one fixed linear operator, so call `hypergradient` with dropout off
(model.eval()); `inner_fine_tune` runs in the model's mode (train mode, as downstream fine-tuning).
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


def inner_fine_tune(loss_fn, phi_0: dict, batches, optimizer: str = "adam", steps: int = 100, lr: float = 1e-3,
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
        raise ValueError(f"inner_fine_tune: the batches ran out after {taken} of {steps} steps")
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
    # BEGIN ASSIGNMENT conjugate_gradient
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
    # END ASSIGNMENT conjugate_gradient


CURVATURES = ("ggn", "hessian")   # the linear system's matrix: generalized Gauss-Newton (PSD) or the exact Hessian
IGNORE = -100                     # the label of tokens the loss leaves out (the first piece of a word carries it)


def hypergradient(loss_fn, theta: list, phi_hat: dict, phi_0: dict, support, query, damping: float,
                  cg_steps: int = 10, cg_tol: float = 1e-3, first_order: bool = False,
                  cg_damping: float | None = None, curvature: str = "hessian", logits_fn=None) -> tuple:
    """Return (grads, info): dF/dtheta of (*) in the module docstring, one entry per tensor of
    `theta` (None where the losses do not reach it), and the diagnostics

      query_loss       L_Q at phi_hat
      support_loss     L_S at phi_hat (without the proximal term)
      inner_grad_norm  ||grad_phi G(phi_hat)|| on `support`: 0 at the exact phi*
      cg_iterations, cg_residual, negative_curvature, cg_min_curvature   (conjugate_gradient)
      cg_converged     1 if CG reached cg_tol, else 0
      direct_norm, correction_norm   ||dL_Q/dtheta|| and ||the second-order term||
      cosine_to_first_order          cos(dF/dtheta, dL_Q/dtheta): 1 when the correction adds nothing
    (first order: the CG and correction entries are absent.)

    support is the batch G (its curvature and mixed block) is taken on; damping the lambda that
    `inner_fine_tune` used; cg_damping (default: damping) the lambda of the linear system; curvature
    "hessian" (the exact H) or "ggn" (J^T H_out J, with logits_fn; module docstring). Nothing is
    written to .grad. Call with dropout off (module docstring).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {', '.join(CURVATURES)} (got {curvature!r})")
    if curvature == "ggn" and logits_fn is None and not first_order:
        raise ValueError("curvature='ggn' needs logits_fn(fast, batch) -> (logits, labels)")
    theta = list(theta)
    phi = OrderedDict((n, t.detach().requires_grad_(True)) for n, t in phi_hat.items())
    fast = list(phi.values())
    exact = curvature == "hessian" and not first_order
    with double_backward_attention():  # the curvature products differentiate attention's backward
        if curvature == "ggn" and not first_order:
            logits, labels = logits_fn(phi, support)
            support_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                             ignore_index=IGNORE)
        else:
            support_loss = loss_fn(phi, support)
        g_loss = support_loss + proximal_term(phi, phi_0, damping) if damping else support_loss
        inner = torch.autograd.grad(g_loss, fast, create_graph=exact, retain_graph=not first_order, allow_unused=True)
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
    lam = damping if cg_damping is None else cg_damping
    matvec, mixed_product = (hessian_products(inner, fast, theta, lam - damping) if exact
                             else ggn_products(logits, labels, fast, theta, lam))
    u, cg = conjugate_gradient(matvec, g_query, cg_steps, cg_tol)
    mixed = mixed_product(u)                                  # (d2G/dtheta dphi) u; frees the graph
    full = [d if m is None else (-m if d is None else d - m) for d, m in zip(grads, mixed)]
    return tuple(full), info | cg | correction_info(grads, full, cg, cg_tol)


def hessian_products(inner, fast, theta, extra):
    """(matvec, mixed) of the exact formula: (H + lambda I) v by autograd.grad of the inner gradient
    (taken with create_graph=True; its graph is kept for every product, and `extra` is the part of
    the system's lambda beyond the proximal term's, already in `inner`); mixed(u) = (d2G/dtheta dphi) u
    by one backward of <grad_phi G, u> (u held constant) into theta."""
    def matvec(v):
        outputs = [(g, vi) for g, vi in zip(inner, v) if g.requires_grad]
        hv = torch.autograd.grad([g for g, _ in outputs], fast, grad_outputs=[vi for _, vi in outputs],
                                 retain_graph=True, allow_unused=True)
        return [(torch.zeros_like(t) if h is None else h) + extra * vi for h, t, vi in zip(hv, fast, v)]

    def mixed(u):
        both = _dot([g for g in inner if g.requires_grad], [ui for g, ui in zip(inner, u) if g.requires_grad])
        return torch.autograd.grad(both, theta, allow_unused=True)
    return matvec, mixed


def cross_entropy_hessian_product(logits, labels, y):
    """H_out y, H_out the Hessian in the logits of the mean cross-entropy over the tokens whose label
    is not IGNORE: per token (diag(p) - p p^T) y_t / N (p the softmax), 0 for ignored tokens."""
    p = torch.softmax(logits.detach(), dim=-1)
    keep = (labels != IGNORE).unsqueeze(-1).to(p.dtype)
    return keep * (p * y - p * (p * y).sum(-1, keepdim=True)) / keep.sum().clamp_min(1)


def ggn_products(logits, labels, fast, theta, lam):
    """(matvec, mixed) of the Gauss-Newton formula: (J^T H_out J + lambda I) v and J_theta^T H_out J_phi u.
    J v by the double-vjp trick: w a dummy cotangent, J^T w taken with create_graph (linear in w),
    then the gradient of <J^T w, v> in w is J v. Each product: that backward and one backward of the logits."""
    w = torch.zeros_like(logits, requires_grad=True)
    jt_w = torch.autograd.grad(logits, fast, grad_outputs=w, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(jt_w) if g is not None]

    def h_out_j(v):
        jv, = torch.autograd.grad([jt_w[i] for i in used], w, grad_outputs=[v[i] for i in used], retain_graph=True)
        return cross_entropy_hessian_product(logits, labels, jv)

    def matvec(v):
        jt = torch.autograd.grad(logits, fast, grad_outputs=h_out_j(v), retain_graph=True, allow_unused=True)
        return [(torch.zeros_like(t) if g is None else g) + lam * vi for g, t, vi in zip(jt, fast, v)]

    def mixed(u):
        return torch.autograd.grad(logits, theta, grad_outputs=h_out_j(u), allow_unused=True)
    return matvec, mixed


def correction_info(direct, full, cg, cg_tol):
    """How much the second-order term changed the hypergradient, and whether CG converged."""
    pairs = [(d, f) for d, f in zip(direct, full) if f is not None]
    d = [torch.zeros_like(f) if d is None else d for d, f in pairs]
    f = [f for _, f in pairs]
    d_norm, f_norm = _dot(d, d).sqrt().item(), _dot(f, f).sqrt().item()
    correction = [fi - di for fi, di in zip(f, d)]
    cosine = _dot(f, d).item() / (d_norm * f_norm) if d_norm > 0 and f_norm > 0 else 1.0
    return {"cg_converged": int(cg["cg_residual"] <= cg_tol), "direct_norm": d_norm,
            "correction_norm": _dot(correction, correction).sqrt().item(), "cosine_to_first_order": cosine}
