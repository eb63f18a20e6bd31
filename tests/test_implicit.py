"""Tests for implicit.py (the implicit-MAML hypergradient) and `meta_pretrain.py --inner-loop implicit`.

The math on a tiny float64 model small enough for dense Hessians: theta = a tanh layer (15
numbers), phi = a residual tanh "adapter" and a linear head (21 numbers), cross-entropy on 3
classes. The inner problem is solved by implicit.fine_tune to a gradient norm below 1e-10,
and the hypergradient is checked against the dense formula (torch.func.hessian +
torch.linalg.solve), central finite differences of F that re-solve the inner problem, and
maml.inner_loop unrolled from phi_0. The stage tests use the tiny transformer fixtures.
"""
import itertools
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from conftest import prime_argv

import implicit
import maml

DAMPING = 0.5     # keeps G strongly convex, so plain gradient descent reaches a gradient norm of 1e-12
INNER_LR = 0.5    # gradient descent on G: below 2 / (largest curvature)


def tiny_problem(seed=0):
    """(theta, phi_0, support, query): dicts of float64 leaf tensors and two (x, y) batches."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    theta = {"w": randn(4, 3).requires_grad_(), "b": randn(3).requires_grad_()}
    phi_0 = OrderedDict(a=0.5 * randn(3, 3), head=randn(3, 3), bias=0.1 * randn(3))
    batch = lambda n: (randn(n, 4), torch.randint(0, 3, (n,), generator=g))
    return theta, phi_0, batch(20), batch(15)


def model_loss(theta, phi, batch):
    x, y = batch
    h = torch.tanh(x @ theta["w"] + theta["b"])
    h = h + torch.tanh(h @ phi["a"])  # an adapter-like residual block on top of the body
    return F.cross_entropy(h @ phi["head"] + phi["bias"], y)


def loss_fn_of(theta):
    return lambda phi, batch: model_loss(theta, phi, batch)


def solve(theta, phi_0, support, steps=3000, start=None, damping=DAMPING):
    """phi* by full-batch gradient descent on G (implicit.fine_tune, sgd)."""
    phi, _ = implicit.fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "sgd", steps, INNER_LR,
                                damping, start=start)
    return phi


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def unflat(vector, like):
    out, i = OrderedDict(), 0
    for n, t in like.items():
        out[n] = vector[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


def dense_hypergradient(theta, phi_hat, phi_0, support, query, damping=DAMPING, mixed=True, hessian_damping=None):
    """dF/dtheta by the dense formula: d_theta L_Q - M^T (H + lambda I)^{-1} d_phi L_Q.
    mixed=False drops the M term; hessian_damping replaces lambda in the solve (to show it matters)."""
    t0, p0 = flat(theta).detach(), flat(phi_hat).detach()
    anchor = flat(phi_0)

    def G(t, p):
        return (model_loss(unflat(t, theta), unflat(p, phi_hat), support)
                + 0.5 * damping * ((p - anchor) ** 2).sum())

    def L_q(t, p):
        return model_loss(unflat(t, theta), unflat(p, phi_hat), query)

    lam = damping if hessian_damping is None else hessian_damping
    H = torch.func.hessian(G, argnums=1)(t0, p0) - (damping - lam) * torch.eye(len(p0), dtype=torch.float64)
    M = torch.func.jacrev(torch.func.grad(G, argnums=1), argnums=0)(t0, p0)     # d2G / dphi dtheta
    g_theta, g_phi = torch.func.grad(L_q, argnums=(0, 1))(t0, p0)
    u = torch.linalg.solve(H, g_phi)
    return g_theta - (M.T @ u if mixed else 0)


def hyper(theta, phi_hat, phi_0, support, query, **kw):
    grads, info = implicit.hypergradient(loss_fn_of(theta), list(theta.values()), phi_hat, phi_0, support, query,
                                         kw.pop("damping", DAMPING), **kw)
    return torch.cat([g.reshape(-1) for g in grads]), info


def relative_error(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.fixture(scope="module")
def solved():
    theta, phi_0, support, query = tiny_problem()
    return theta, solve(theta, phi_0, support), phi_0, support, query


def test_fine_tune_solves_the_inner_problem(solved):
    theta, phi_hat, phi_0, support, query = solved
    _, info = hyper(theta, phi_hat, phi_0, support, query, cg_steps=30, cg_tol=1e-12)
    assert info["inner_grad_norm"] < 1e-10
    undamped = solve(theta, phi_0, support, steps=3000, damping=0.0)   # the damping shapes phi*
    assert relative_error(flat(undamped), flat(phi_hat)) > 0.05


def test_hypergradient_equals_the_dense_formula(solved):
    theta, phi_hat, phi_0, support, query = solved
    grad, info = hyper(theta, phi_hat, phi_0, support, query, cg_steps=100, cg_tol=1e-12)
    exact = dense_hypergradient(theta, phi_hat, phi_0, support, query)
    assert relative_error(grad, exact) < 1e-6
    assert info["cg_residual"] < 1e-10 and info["negative_curvature"] == 0 and info["cg_iterations"] <= 21
    # The test bites: dropping the mixed term, or the damping in the Hessian, moves the answer far.
    assert relative_error(dense_hypergradient(theta, phi_hat, phi_0, support, query, mixed=False), exact) > 0.05
    assert relative_error(dense_hypergradient(theta, phi_hat, phi_0, support, query, hessian_damping=0.0),
                          exact) > 0.05


def test_first_order_is_the_direct_term_only(solved):
    theta, phi_hat, phi_0, support, query = solved
    grad, info = hyper(theta, phi_hat, phi_0, support, query, first_order=True)
    direct = dense_hypergradient(theta, phi_hat, phi_0, support, query, mixed=False)
    assert relative_error(grad, direct) < 1e-12 and info["cg_iterations"] == 0
    assert relative_error(grad, dense_hypergradient(theta, phi_hat, phi_0, support, query)) > 0.05


def test_hypergradient_agrees_with_finite_differences_of_the_resolved_problem(solved):
    theta, phi_hat, phi_0, support, query = solved
    grad, _ = hyper(theta, phi_hat, phi_0, support, query, cg_steps=100, cg_tol=1e-12)
    base, eps = flat(theta).detach(), 1e-5

    def F_at(vector):  # F(theta) = L_Q(phi*(theta), theta), the inner problem re-solved (warm started)
        moved = {n: t.detach() for n, t in unflat(vector, theta).items()}
        phi_star = solve(moved, phi_0, support, steps=1500, start=phi_hat)
        return model_loss(moved, phi_star, query).item()
    for i in range(len(base)):
        e = torch.zeros_like(base)
        e[i] = eps
        fd = (F_at(base + e) - F_at(base - e)) / (2 * eps)
        assert abs(grad[i].item() - fd) <= 1e-6 * grad.abs().max().item(), (i, grad[i].item(), fd)


def test_unrolled_differentiation_converges_to_the_hypergradient(solved):
    theta, phi_hat, phi_0, support, query = solved
    exact, _ = hyper(theta, phi_hat, phi_0, support, query, cg_steps=100, cg_tol=1e-12)
    g_fn = lambda phi, batch: implicit.proximal_loss(loss_fn_of(theta), phi, phi_0, batch, DAMPING)
    errors = []
    for steps in (5, 20, 80, 320):
        adapted = maml.inner_loop(g_fn, phi_0, support, steps, INNER_LR)   # second order, from phi_0
        unrolled = torch.autograd.grad(model_loss(theta, adapted, query), list(theta.values()))
        errors.append(relative_error(torch.cat([g.reshape(-1) for g in unrolled]), exact))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 and errors[0] > 1e-2, errors


def test_conjugate_gradient_error_falls_with_its_iterations(solved):
    theta, phi_hat, phi_0, support, query = solved
    exact = dense_hypergradient(theta, phi_hat, phi_0, support, query)
    errors = [relative_error(hyper(theta, phi_hat, phi_0, support, query, cg_steps=k, cg_tol=0.0)[0], exact)
              for k in (1, 3, 6, 12, 21)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 < 1e-3 < errors[0], errors
    # and its stopping rule: a loose tolerance stops early, reporting a residual below it
    _, info = hyper(theta, phi_hat, phi_0, support, query, cg_steps=100, cg_tol=1e-2)
    assert info["cg_residual"] <= 1e-2 and 0 < info["cg_iterations"] < 21


def test_conjugate_gradient_stops_on_negative_curvature():
    A = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    solve_for = lambda *b: implicit.conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor(b, dtype=torch.float64)], 10)
    x, info = solve_for(1.0, 2.0)             # b^T A b < 0: no step, u = 0 (the first-order answer)
    assert (info["negative_curvature"], info["cg_iterations"], x[0].tolist()) == (1, 0, [0.0, 0.0])
    x, info = solve_for(1.0, 1.0)             # one step, then a direction of negative curvature: kept
    assert (info["negative_curvature"], info["cg_iterations"], x[0].tolist()) == (1, 1, [2.0, 2.0])


def test_fine_tune_keeps_no_graph_and_leaves_theta_alone(solved):
    theta, _, phi_0, support, _ = solved
    losses = []
    phi, state = implicit.fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "adam", 30, 1e-2, 0.1,
                                    losses=losses)
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert all(not t.requires_grad and t.grad_fn is None for t in phi.values())
    assert all(t.grad is None for t in theta.values())
    # the state continues the same Adam run: 30 + 30 steps equal 60 in one go
    more, _ = implicit.fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "adam", 30, 1e-2, 0.1,
                                 start=phi, state=state)
    whole, _ = implicit.fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "adam", 60, 1e-2, 0.1)
    torch.testing.assert_close(flat(more), flat(whole))
    with pytest.raises(ValueError, match="ran out after 2 of 5"):
        implicit.fine_tune(loss_fn_of(theta), phi_0, [support, support], "sgd", 5, 0.1)
