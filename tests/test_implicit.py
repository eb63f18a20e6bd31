"""Tests for implicit.py (the implicit-MAML hypergradient) and `meta_pretrain.py --inner-loop implicit`.

The math on a tiny float64 model small enough for dense Hessians: theta = a tanh layer (15
numbers), phi = a residual tanh "adapter" and a linear head (21 numbers), cross-entropy on 3
classes. The inner problem is solved by implicit.inner_fine_tune to a gradient norm below 1e-10,
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

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    theta = {"w": randn(4, 3).requires_grad_(), "b": randn(3).requires_grad_()}
    phi_0 = OrderedDict(a=0.5 * randn(3, 3), head=randn(3, 3), bias=0.1 * randn(3))

    def batch(n):
        return randn(n, 4), torch.randint(0, 3, (n,), generator=g)
    return theta, phi_0, batch(20), batch(15)


def model_loss(theta, phi, batch):
    x, y = batch
    h = torch.tanh(x @ theta["w"] + theta["b"])
    h = h + torch.tanh(h @ phi["a"])  # an adapter-like residual block on top of the body
    return F.cross_entropy(h @ phi["head"] + phi["bias"], y)


def loss_fn_of(theta):
    return lambda phi, batch: model_loss(theta, phi, batch)


def solve(theta, phi_0, support, steps=1000, start=None, damping=DAMPING):
    """phi* by full-batch gradient descent on G (implicit.inner_fine_tune, sgd)."""
    phi, _ = implicit.inner_fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "sgd", steps, INNER_LR,
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
    undamped = solve(theta, phi_0, support, damping=0.0)   # the damping shapes phi*
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


def test_cg_damping_replaces_lambda_in_the_linear_system_only(solved):
    theta, phi_hat, phi_0, support, query = solved
    grad, _ = hyper(theta, phi_hat, phi_0, support, query, cg_steps=100, cg_tol=1e-12, cg_damping=2.0)
    assert relative_error(grad, dense_hypergradient(theta, phi_hat, phi_0, support, query, hessian_damping=2.0)) < 1e-6
    assert relative_error(grad, dense_hypergradient(theta, phi_hat, phi_0, support, query)) > 0.01


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
        phi_star = solve(moved, phi_0, support, steps=300, start=phi_hat)
        return model_loss(moved, phi_star, query).item()
    for i in range(0, len(base), 2):  # every other entry of w and b (time)
        e = torch.zeros_like(base)
        e[i] = eps
        fd = (F_at(base + e) - F_at(base - e)) / (2 * eps)
        assert abs(grad[i].item() - fd) <= 1e-6 * grad.abs().max().item(), (i, grad[i].item(), fd)


def test_unrolled_differentiation_converges_to_the_hypergradient(solved):
    theta, phi_hat, phi_0, support, query = solved
    exact, _ = hyper(theta, phi_hat, phi_0, support, query, cg_steps=100, cg_tol=1e-12)

    def g_fn(phi, batch):
        return implicit.proximal_loss(loss_fn_of(theta), phi, phi_0, batch, DAMPING)
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
    def solve_for(diagonal, b):
        A = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        return implicit.conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor(b, dtype=torch.float64)], 10)
    x, info = solve_for([2.0, -1.0], [1.0, 2.0])     # b^T A b < 0: no step, u = 0 (the first-order answer)
    assert (info["negative_curvature"], info["cg_iterations"], x[0].tolist()) == (1, 0, [0.0, 0.0])
    assert info["cg_min_curvature"] == pytest.approx((2 - 4) / 5)           # b^T A b / b^T b
    x, info = solve_for([2.0, -0.1], [1.0, 0.5])     # one step lowers the residual, then negative curvature
    alpha = 1.25 / 1.975                             # b^T b / b^T A b
    assert (info["negative_curvature"], info["cg_iterations"]) == (1, 1) and info["cg_residual"] < 1
    torch.testing.assert_close(x[0], alpha * torch.tensor([1.0, 0.5], dtype=torch.float64))
    x, info = solve_for([2.0, -1.0], [1.0, 1.0])     # one step that raises the residual (18 > 2): not kept
    assert (info["cg_iterations"], info["cg_residual"], x[0].tolist()) == (1, 1.0, [0.0, 0.0])


def test_fine_tune_keeps_no_graph_and_leaves_theta_alone(solved):
    theta, _, phi_0, support, _ = solved
    losses = []
    phi, state = implicit.inner_fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "adam", 30, 1e-2, 0.1,
                                    losses=losses)
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert all(not t.requires_grad and t.grad_fn is None for t in phi.values())
    assert all(t.grad is None for t in theta.values())
    # the state continues the same Adam run: 30 + 30 steps equal 60 in one go
    more, _ = implicit.inner_fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "adam", 30, 1e-2, 0.1,
                                 start=phi, state=state)
    whole, _ = implicit.inner_fine_tune(loss_fn_of(theta), phi_0, itertools.repeat(support), "adam", 60, 1e-2, 0.1)
    torch.testing.assert_close(flat(more), flat(whole))
    with pytest.raises(ValueError, match="ran out after 2 of 5"):
        implicit.inner_fine_tune(loss_fn_of(theta), phi_0, [support, support], "sgd", 5, 0.1)


# ----------------------------------------------------------------------------- meta_pretrain.py --inner-loop implicit

import implicit_priming  # noqa: E402  (the stage tests below)
import meta_pretrain  # noqa: E402
from plumbing import priming_run  # noqa: E402

# a tiny implicit run: 3 fine-tuning steps from a fresh phi_0, 2 per warm meta-step, fresh every 3 meta-steps
IMPLICIT_FLAGS = ["--inner-steps", str(meta_pretrain.INNER_STEPS), "--inner-loop", "implicit",
                  "--implicit-steps", "3", "--implicit-warm-steps", "2", "--fresh-every", "3",
                  "--implicit-batch-size", "4", "--damping", "0.01"]


def implicit_prime(model_dir, data_dir, out, *flags):
    meta_pretrain.main(prime_argv(model_dir, data_dir, out, *IMPLICIT_FLAGS, *flags))


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("first_order", [False, True])
def test_implicit_inner_loop_runs_end_to_end_and_logs(tiny_model_dir, data_dir, tmp_path, monkeypatch, first_order):
    from conftest import tune_argv
    from safetensors.torch import load_file

    import finetune_peft
    reference = tmp_path / "ft"                       # a tiny "downstream fine-tuning", for the strength
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, reference, "--steps", "3"))
    calls = []
    real = implicit.hypergradient
    monkeypatch.setattr(implicit, "hypergradient", lambda *a, **k: calls.append(k["first_order"]) or real(*a, **k))
    out = tmp_path / "primed"
    implicit_prime(tiny_model_dir, data_dir, out, "--steps", "4", "--reference-ft", str(reference),
                   *(["--first-order"] if first_order else ["--cg-steps", "3"]))
    assert calls == [first_order] * 8                  # 2 tasks x 4 meta-steps
    lines = metrics_of(out)
    assert [line["fine_tune_steps"] for line in lines] == [3, 2, 2, 3]   # fresh, warm, warm, fresh (--fresh-every 3)
    assert [line["phi_age"] for line in lines] == [1, 2, 3, 1]
    for line in lines:
        assert line["inner_grad_norm"] > 0 and 0 <= line["cg_residual"] <= 1   # never worse than u = 0
        assert line["cg_iterations"] == 0 if first_order else 0 < line["cg_iterations"] <= 3
        assert ("cg_min_curvature" in line) is not first_order
    assert ["inner_loop_strength" in line for line in lines] == [False, True, False, True]   # --eval-every 2
    assert lines[-1]["held_out_query_loss"] < lines[-1]["held_out_query_loss_fresh"]
    args = json.loads((out / "run.json").read_text())["args"]
    assert (args["inner_loop"], args["implicit_optimizer"], args["cg_tol"]) == \
        ("implicit", "adam", None if first_order else implicit_priming.IMPLICIT["cg_tol"])   # defaults filled, recorded
    primed, original = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(primed[k], original[k]) for k in primed if k in original)   # theta moved


def test_implicit_resume_equals_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """Interrupted in meta-step 3 (a warm one) after the checkpoint of step 2: the resumed run
    must continue the carried fine-tuning (phi, Adam state), not draw a fresh phi_0."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    implicit_prime(tiny_model_dir, data_dir, whole, "--steps", "4", "--cg-steps", "3")
    real, calls = implicit.hypergradient, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 5:                            # the first task of meta-step 3
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(implicit, "hypergradient", interrupted)
    with pytest.raises(KeyboardInterrupt):
        implicit_prime(tiny_model_dir, data_dir, cut, "--steps", "4", "--cg-steps", "3")
    monkeypatch.setattr(implicit, "hypergradient", real)
    implicit_prime(tiny_model_dir, data_dir, cut, "--steps", "4", "--cg-steps", "3", "--resume")
    from safetensors.torch import load_file
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(out):
        return [{k: v for k, v in line.items() if k != "seconds"} for line in metrics_of(out)]
    assert strip(whole) == strip(cut) and len(strip(cut)) == 4
    with pytest.raises(ValueError, match="--fresh-every is 4 here but 3"):   # the implicit flags shape the run
        implicit_prime(tiny_model_dir, data_dir, cut, "--steps", "5", "--cg-steps", "3", "--resume",
                       "--fresh-every", "4")


def test_an_unrolled_run_does_not_resume_as_an_implicit_one(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "unrolled"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--steps", "2", "--eval-every", "0"))
    with pytest.raises(ValueError, match="--resume: --.* here but"):
        meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, *IMPLICIT_FLAGS, "--steps", "4", "--resume"))
    assert len(metrics_of(out)) == 2


@pytest.mark.parametrize("argv, message", [
    (["--inner-loop", "implicit", "--inner-steps", "3"], "--inner-steps is an --inner-loop unrolled option"),
    (["--inner-loop", "implicit", "--inner-lr", "0.1"], "--inner-lr is an --inner-loop unrolled option"),
    (["--inner-loop", "implicit", "--inner-clip", "1"], "--inner-clip is an --inner-loop unrolled option"),
    (["--inner-loop", "implicit", "--meta-sgd"], "--meta-sgd is an --inner-loop unrolled option"),
    (["--inner-loop", "implicit", "--outer-peft"], "--outer-peft is an --inner-loop unrolled option"),
    (["--inner-loop", "implicit", "--inner-params", "all"], "--inner-params all is an --inner-loop unrolled option"),
    (["--damping", "0.1"], "--damping is an --inner-loop implicit option"),
    (["--fresh-every", "2"], "--fresh-every is an --inner-loop implicit option"),
    (["--implicit-steps", "50"], "--implicit-steps is an --inner-loop implicit option"),
    (["--inner-loop", "implicit", "--damping", "0"], "--damping must be positive"),
    (["--inner-loop", "implicit", "--damping", "-1e-3"], "--damping must be positive"),
    (["--inner-loop", "implicit", "--first-order", "--damping", "-1"], "--damping must be positive"),
    (["--inner-loop", "implicit", "--first-order", "--cg-steps", "3"],
     "--cg-steps / --cg-tol / --cg-damping / --curvature have"),
    (["--inner-loop", "implicit", "--first-order", "--cg-damping", "1"],
     "--cg-steps / --cg-tol / --cg-damping / --curvature have"),
    (["--inner-loop", "implicit", "--cg-damping", "0"], "--cg-damping must be a positive"),
    (["--cg-damping", "0.1"], "--cg-damping is an --inner-loop implicit option"),
    (["--inner-loop", "implicit", "--cg-tol", "1"], "--cg-tol must be in"),
    (["--inner-loop", "implicit", "--cg-steps", "0"], "--cg-steps must be at least 1"),
    (["--inner-loop", "implicit", "--implicit-lr", "0"], "--implicit-lr must be a positive"),
    (["--inner-loop", "implicit", "--fresh-every", "1", "--implicit-warm-steps", "3"], "needs --fresh-every above 1"),
    (["--inner-loop", "implicit", "--method", "mtl"], "--inner-loop implicit is a MAML option"),
])
def test_incoherent_inner_loop_flags_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        meta_pretrain.check_args(meta_pretrain.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", [[], ["--inner-loop", "implicit"], ["--inner-loop", "implicit", "--first-order",
                                                                     "--damping", "0"]])
def test_coherent_inner_loop_flags_pass(argv):
    args = meta_pretrain.build_parser().parse_args(argv)
    meta_pretrain.check_args(args)
    implicit_run, first_order = "implicit" in argv, "--first-order" in argv
    for flag in implicit_priming.IMPLICIT:          # filled in for an implicit run, the CG ones unless first order
        cg_flag = flag.startswith("cg_") or flag == "curvature"
        assert (getattr(args, flag) is not None) is (implicit_run and not (first_order and cg_flag))
    assert args.cg_damping == (implicit_priming.CG_DAMPING if implicit_run and not first_order else None)
    assert args.curvature == ("ggn" if implicit_run and not first_order else None)


def test_the_exact_hessian_keeps_the_inner_problems_damping_in_its_system():
    args = meta_pretrain.build_parser().parse_args(["--inner-loop", "implicit", "--curvature", "hessian"])
    meta_pretrain.check_args(args)
    assert args.cg_damping == args.damping == implicit_priming.IMPLICIT["damping"]
    assert args.cg_steps == implicit_priming.HESSIAN_CG_STEPS == 5          # as its committed rows ran
    args = meta_pretrain.build_parser().parse_args(["--inner-loop", "implicit", "--curvature", "hessian",
                                                    "--cg-damping", "2"])
    meta_pretrain.check_args(args)
    assert args.cg_damping == 2.0
    args = meta_pretrain.build_parser().parse_args(["--inner-loop", "implicit"])
    meta_pretrain.check_args(args)
    assert (args.cg_damping, args.cg_steps) == (implicit_priming.CG_DAMPING, implicit_priming.CG_STEPS) == (1.0, 10)


def test_refusal_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(meta_pretrain.__file__)
    run = subprocess.run([sys.executable, str(script), "--inner-loop", "implicit", "--damping", "0"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert run.stderr.startswith("error: --damping must be positive")


def test_a_non_finite_loss_names_the_implicit_flags():
    with pytest.raises(ValueError, match="fine_tune_loss_last at meta-step 3 is nan: lower --implicit-lr"):
        priming_run.check_losses({"fine_tune_loss_last": float("nan")}, 3, "implicit")
    with pytest.raises(ValueError, match="lower --inner-lr / --outer-lr or set --inner-clip"):
        priming_run.check_losses({"query_loss": float("inf")}, 3)


# ---------------------------------------------------------------- the Gauss-Newton curvature (curvature="ggn")

def model_logits(theta, phi, batch):
    x, _ = batch
    h = torch.tanh(x @ theta["w"] + theta["b"])
    h = h + torch.tanh(h @ phi["a"])
    return h @ phi["head"] + phi["bias"]


def logits_fn_of(theta):
    return lambda phi, batch: (model_logits(theta, phi, batch), batch[1])


def dense_ggn(theta, phi, batch):
    """(GGN in phi, its mixed block in phi x theta) of the mean cross-entropy, dense: J^T H_out J
    with J by torch.func.jacrev and H_out the softmax's Hessian per example."""
    t0, p0 = flat(theta).detach(), flat(phi).detach()

    def z(t, p):
        return model_logits(unflat(t, theta), unflat(p, phi), batch)
    j_phi, j_theta = torch.func.jacrev(z, argnums=(1, 0))(t0, p0)        # [n, C, P], [n, C, T]
    prob = torch.softmax(z(t0, p0), dim=-1)
    h_out = (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) / len(prob)
    return (torch.einsum("ncp,ncd,ndq->pq", j_phi, h_out, j_phi),
            torch.einsum("ncp,ncd,ndt->pt", j_phi, h_out, j_theta))


def dense_ggn_hypergradient(theta, phi_hat, support, query, lam):
    """dF/dtheta of the linearised inner problem: d_theta L_Q - M_GN^T (GGN + lambda I)^{-1} d_phi L_Q."""
    ggn, mixed = dense_ggn(theta, phi_hat, support)

    def L_q(t, p):
        return model_loss(unflat(t, theta), unflat(p, phi_hat), query)
    g_theta, g_phi = torch.func.grad(L_q, argnums=(0, 1))(flat(theta).detach(), flat(phi_hat).detach())
    u = torch.linalg.solve(ggn + lam * torch.eye(len(g_phi), dtype=torch.float64), g_phi)
    return g_theta - mixed.T @ u


def test_cross_entropy_hessian_product_is_the_hessian_in_the_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = implicit.IGNORE                # the loss leaves these tokens out

    def ce(z):
        return F.cross_entropy(z.reshape(-1, 7), labels.reshape(-1), ignore_index=implicit.IGNORE)
    hessian = torch.func.hessian(ce)(logits).reshape(70, 70)
    y = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    product = implicit.cross_entropy_hessian_product(logits, labels, y)
    assert torch.allclose(product.reshape(-1), hessian @ y.reshape(-1), atol=1e-12)


def test_ggn_vector_products_equal_the_dense_ggn(solved):
    theta, phi_hat, _, support, _ = solved
    ggn, mixed = dense_ggn(theta, phi_hat, support)
    phi = OrderedDict((n, t.detach().requires_grad_(True)) for n, t in phi_hat.items())
    logits, labels = logits_fn_of(theta)(phi, support)
    matvec, mixed_product = implicit.ggn_products(logits, labels, list(phi.values()), list(theta.values()), 0.25)
    v = unflat(torch.randn(len(flat(phi_hat)), generator=torch.Generator().manual_seed(0), dtype=torch.float64), phi)
    got = torch.cat([t.reshape(-1) for t in matvec(list(v.values()))])
    assert torch.allclose(got, (ggn + 0.25 * torch.eye(len(got), dtype=torch.float64)) @ flat(v), rtol=1e-6, atol=1e-12)
    got_mixed = torch.cat([t.reshape(-1) for t in mixed_product(list(v.values()))])
    assert torch.allclose(got_mixed, mixed.T @ flat(v), rtol=1e-6, atol=1e-12)
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12                              # PSD by construction


def test_ggn_hypergradient_equals_the_dense_linearised_formula(solved):
    theta, phi_hat, phi_0, support, query = solved
    grad, info = hyper(theta, phi_hat, phi_0, support, query, cg_steps=100, cg_tol=1e-12, cg_damping=0.1,
                       curvature="ggn", logits_fn=logits_fn_of(theta))
    assert relative_error(grad, dense_ggn_hypergradient(theta, phi_hat, support, query, 0.1)) < 1e-6
    assert info["cg_converged"] == 1 and info["negative_curvature"] == 0
    first, _ = hyper(theta, phi_hat, phi_0, support, query, first_order=True)
    assert info["correction_norm"] == pytest.approx(torch.linalg.vector_norm(grad - first).item(), rel=1e-9)
    assert info["direct_norm"] == pytest.approx(torch.linalg.vector_norm(first).item(), rel=1e-12)
    cosine = (grad @ first / (torch.linalg.vector_norm(grad) * torch.linalg.vector_norm(first))).item()
    assert info["cosine_to_first_order"] == pytest.approx(cosine, rel=1e-9) and cosine < 0.999


def test_where_the_hessian_is_indefinite_ggn_cg_still_converges():
    """The failure on the real model, in miniature: at a phi where the support loss's Hessian has a
    negative eigenvalue, CG on the exact system stops at u = 0 (first order); on the GGN it converges."""
    theta, phi_0, support, query = tiny_problem(seed=4)
    phi = OrderedDict((n, 3 * t) for n, t in phi_0.items())      # far from a minimum

    def G(p):
        return model_loss(theta, unflat(p, phi), support)
    assert torch.linalg.eigvalsh(torch.func.hessian(G)(flat(phi).detach())).min() < -1e-3   # the premise
    _, exact = hyper(theta, phi, phi_0, support, query, damping=1e-4, cg_steps=50, cg_tol=1e-8)
    _, ggn = hyper(theta, phi, phi_0, support, query, damping=1e-4, cg_steps=50, cg_tol=1e-8, cg_damping=1e-2,
                   curvature="ggn", logits_fn=logits_fn_of(theta))
    assert exact["negative_curvature"] == 1 and exact["cg_converged"] == 0
    assert ggn["negative_curvature"] == 0 and ggn["cg_converged"] == 1 and ggn["correction_norm"] > 0


# ---------------------------------------------------------------- implicit_priming.meta_gradient's wiring

def wiring_setup(dropout=0.1):
    """A tiny BERT with adapters (dropout on), two tasks of distinct support and query batches, a
    fine-tuning stream, and the implicit settings with an exactly solved CG system."""
    import types

    from conftest import tiny_classifier

    import adapters
    from adapters import add_peft
    from peft_config import PeftConfig
    torch.manual_seed(0)
    model = add_peft(tiny_classifier(dropout=dropout, hidden=16, heads=2), PeftConfig("adapter", reduction_factor=8),
                     seed=0).double()
    for p in adapters.body_parameters(model).values():
        p.requires_grad_(True)                                            # theta: the meta-gradient's target
    g = torch.Generator().manual_seed(1)

    def batch(n=3, length=6):
        labels = torch.randint(0, 7, (n, length), generator=g)
        labels[:, 0] = implicit.IGNORE
        return {"input_ids": torch.randint(5, 120, (n, length), generator=g),
                "attention_mask": torch.ones(n, length, dtype=torch.long), "labels": labels}
    tasks = [(batch(), batch()), (batch(), batch())]
    stream = [batch() for _ in range(4)]
    source = types.SimpleNamespace(fine_tune_batches=lambda: iter(stream))
    args = types.SimpleNamespace(fresh_every=1, implicit_steps=4, implicit_warm_steps=1, implicit_optimizer="sgd",
                                 implicit_lr=0.05, damping=0.01, cg_steps=200, cg_tol=1e-10, first_order=False,
                                 cg_damping=0.3, curvature="ggn")
    return model, tasks, source, args


def expected_meta_gradient(model, tasks, phi_hat, phi_0, args, theta):
    """By hand: dropout off, each task's GGN hypergradient on ITS support (curvature, mixed block) and
    query, the proximal term anchored at phi_0, averaged over the tasks; and the mean inner gradient norm."""
    model.eval()
    loss_fn, logits_fn = maml.functional_loss(model), maml.functional_logits(model)
    total, norms = None, []
    for support, query in tasks:
        phi = OrderedDict((n, t.detach().requires_grad_(True)) for n, t in phi_hat.items())
        logits, labels = logits_fn(phi, support)
        fast = list(phi.values())
        s_loss = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=implicit.IGNORE)
        prox = 0.5 * args.damping * sum(((phi[n] - phi_0[n]) ** 2).sum() for n in phi)
        inner = torch.autograd.grad(s_loss + prox, fast, retain_graph=True)
        norms.append(torch.sqrt(sum((g ** 2).sum() for g in inner)).item())
        q = loss_fn(phi, query)
        g_all = torch.autograd.grad(q, fast + theta, allow_unused=True)
        g_phi = torch.cat([g.reshape(-1) for g in g_all[:len(fast)]])
        # the dense GGN over phi (a tiny phi), solved exactly
        jac = torch.autograd.functional.jacobian(lambda *p: logits_fn(OrderedDict(zip(phi, p)), support)[0],
                                                 tuple(fast))
        J = torch.cat([j.reshape(logits.numel(), -1) for j in jac], dim=1)          # [tokens * C, P]
        prob = torch.softmax(logits.detach(), -1).reshape(-1, 7)
        keep = (labels.reshape(-1) != implicit.IGNORE).double()
        h_out = torch.block_diag(*[(torch.diag(p) - torch.outer(p, p)) * k for p, k in zip(prob, keep)]) / keep.sum()
        ggn = J.T @ h_out @ J
        u = torch.linalg.solve(ggn + args.cg_damping * torch.eye(len(g_phi), dtype=ggn.dtype), g_phi)
        ju = J @ u
        mixed = torch.autograd.grad(logits.reshape(-1), theta, grad_outputs=h_out @ ju, allow_unused=True)
        grads = [(d if d is not None else torch.zeros_like(t)) - (m if m is not None else torch.zeros_like(t))
                 for d, m, t in zip(g_all[len(fast):], mixed, theta)]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    model.train()
    return [t / len(tasks) for t in total], sum(norms) / len(norms)


def test_meta_gradient_wiring_equals_the_hand_computed_meta_gradient():
    """Catches: support and query swapped, no averaging over the tasks, dropout left on during the
    hypergradient, the proximal anchor at phi_hat instead of phi_0 (seen in inner_grad_norm)."""
    import adapters
    import implicit_priming
    model, tasks, source, args = wiring_setup()
    model.train()
    theta = [p for p in adapters.body_parameters(model).values() if p.requires_grad]
    carried = {}
    metrics = implicit_priming.meta_gradient(model, maml.functional_loss(model), tasks, source, carried,
                                             torch.Generator().manual_seed(2), args)
    got = [p.grad for p in theta]
    for p in theta:
        p.grad = None
    want, norm = expected_meta_gradient(model, tasks, carried["phi"], carried["phi_0"], args, theta)
    flat_got = torch.cat([g.reshape(-1) for g in got])
    flat_want = torch.cat([w.reshape(-1) for w in want])
    assert relative_error(flat_got, flat_want) < 1e-6
    assert metrics["inner_grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert model.training                                                  # its mode restored
    assert metrics["cg_converged_share"] == 1.0 and 0 < metrics["correction_ratio"]
    assert -1 <= metrics["cosine_to_first_order"] < 1
