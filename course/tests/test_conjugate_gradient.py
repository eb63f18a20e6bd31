"""Assignment `conjugate_gradient` (course/conjugate_gradient.md): implicit.conjugate_gradient, the
linear solve (d2G/dphi2) u = dL_Q/dphi of the implicit hypergradient (METHOD.md, "The implicit
inner loop"). Expected values from torch.linalg on small explicit matrices; vectors are lists of
tensors of several shapes, as phi is.
"""

import pytest
import torch

from implicit import conjugate_gradient

SHAPES = [(3,), (2, 2)]   # 7 numbers in all


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector):
    out, at = [], 0
    for shape in SHAPES:
        size = torch.Size(shape).numel()
        out.append(vector[at:at + size].reshape(shape))
        at += size
    return out


def operator(matrix):
    return lambda tensors: unflat(matrix @ flat(tensors))


def spd(eigenvalues, seed=0):
    """A symmetric matrix with these eigenvalues (a random orthogonal basis)."""
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


B = unflat(torch.linspace(-1.0, 2.0, 7, dtype=torch.float64))


def residual(matrix, x, b=B):
    return ((flat(b) - matrix @ flat(x)).norm() / flat(b).norm()).item()


def test_solves_a_positive_definite_system():
    matrix = spd([0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 9.0])
    x, info = conjugate_gradient(operator(matrix), B, steps=50, tol=1e-10)
    assert [t.shape for t in x] == [t.shape for t in B]
    assert torch.allclose(flat(x), torch.linalg.solve(matrix, flat(B)), atol=1e-8)
    assert info["cg_iterations"] <= 7 and info["negative_curvature"] == 0
    assert info["cg_residual"] == pytest.approx(residual(matrix, x), abs=1e-9)


def test_three_distinct_eigenvalues_take_three_iterations():
    """CG is exact after as many iterations as A has distinct eigenvalues (gradient descent is not)."""
    matrix = spd([1.0, 1.0, 1.0, 5.0, 5.0, 20.0, 20.0])
    x, info = conjugate_gradient(operator(matrix), B, steps=50, tol=1e-10)
    assert info["cg_iterations"] == 3
    assert torch.allclose(flat(x), torch.linalg.solve(matrix, flat(B)), atol=1e-8)


def galerkin(matrix, steps):
    """The k-th CG iterate in exact arithmetic: x in the Krylov space K_k with K^T (b - A x) = 0."""
    b = flat(B)
    krylov = torch.stack([torch.linalg.matrix_power(matrix, j) @ b for j in range(steps)], dim=1)
    return krylov @ torch.linalg.solve(krylov.T @ matrix @ krylov, krylov.T @ b)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_k_iterations_minimise_the_a_norm_error_over_the_krylov_space(steps):
    matrix = spd([0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 9.0], seed=1)
    x, info = conjugate_gradient(operator(matrix), B, steps=steps)
    assert info["cg_iterations"] == steps
    assert torch.allclose(flat(x), galerkin(matrix, steps), atol=1e-8)


def test_stops_at_the_tolerance_and_reports_the_true_residual():
    matrix = spd([0.1, 0.5, 1.0, 3.0, 7.0, 20.0, 50.0], seed=2)
    x, info = conjugate_gradient(operator(matrix), B, steps=50, tol=1e-2)
    assert info["cg_residual"] <= 1e-2 and info["cg_residual"] == pytest.approx(residual(matrix, x), rel=1e-6)
    _, exact = conjugate_gradient(operator(matrix), B, steps=50, tol=1e-12)
    assert info["cg_iterations"] < exact["cg_iterations"]


def test_negative_curvature_stops_with_u_zero():
    x, info = conjugate_gradient(operator(-torch.eye(7, dtype=torch.float64)), B, steps=10)
    assert all((t == 0).all() for t in x)
    assert info["negative_curvature"] == 1 and info["cg_iterations"] == 0
    assert info["cg_residual"] == pytest.approx(1.0) and info["cg_min_curvature"] == pytest.approx(-1.0)


@pytest.mark.parametrize("seed, iterations", [(1, 1), (3, 4)])
def test_an_indefinite_system_stops_and_keeps_the_iterate_of_smallest_residual(seed, iterations):
    """After `iterations` steps the next direction has p^T A p <= 0; of x_0 = 0, x_1 .. x_k the one
    with the smallest residual is returned (seed 1: x_1's residual is above 1, so x = 0)."""
    matrix = spd([-3.0, 1.0, 2.0, 3.0, 4.0, 6.0, 9.0], seed=seed)
    x, info = conjugate_gradient(operator(matrix), B, steps=50, tol=1e-10)
    assert info["negative_curvature"] == 1 and info["cg_iterations"] == iterations
    assert info["cg_min_curvature"] <= 0
    candidates = [torch.zeros(7, dtype=torch.float64)] + [galerkin(matrix, k) for k in range(1, iterations + 1)]
    best = min(candidates, key=lambda c: residual(matrix, unflat(c)))
    assert torch.allclose(flat(x), best, atol=1e-8)
    assert info["cg_residual"] == pytest.approx(residual(matrix, x), abs=1e-9)


def test_the_smallest_curvature_seen_and_a_zero_right_hand_side():
    _, info = conjugate_gradient(operator(2.5 * torch.eye(7, dtype=torch.float64)), B, steps=10)
    assert info["cg_min_curvature"] == pytest.approx(2.5) and info["cg_iterations"] == 1
    zero = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    x, info = conjugate_gradient(operator(torch.eye(7, dtype=torch.float64)), zero, steps=10)
    assert all((t == 0).all() for t in x) and info["cg_iterations"] == 0 and info["cg_residual"] == 0.0


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_the_tolerance_is_relative_to_b_at_every_scale(scale):
    """Stop when ||r|| <= tol ||b||: the same iterations, the same relative residual and a scaled x for
    b scaled by 1e-6 or 1e6 (an absolute tolerance stops at once on a tiny b, late on a large one). The
    spectrum is narrow, so CG stops at the tolerance (4 iterations), well before round-off."""
    matrix = spd([1.0, 1.0, 1.0, 1.2, 1.5, 2.0, 3.0], seed=2)
    b = [t * scale for t in B]
    x, info = conjugate_gradient(operator(matrix), b, steps=50, tol=1e-2)
    _, unscaled = conjugate_gradient(operator(matrix), B, steps=50, tol=1e-2)
    assert 0 < info["cg_iterations"] == unscaled["cg_iterations"]
    assert info["cg_residual"] <= 1e-2 and info["cg_residual"] == pytest.approx(unscaled["cg_residual"], rel=1e-6)
    assert info["cg_residual"] == pytest.approx(residual(matrix, x, b), rel=1e-6)


def test_zero_curvature_of_a_singular_operator_stops_like_negative_curvature():
    """A singular A with b in its null space: p^T A p = 0 at the first direction. CG must stop there
    (u = 0, negative_curvature 1), not divide by it."""
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    b = unflat(torch.tensor([0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 1.0], dtype=torch.float64))
    x, info = conjugate_gradient(operator(matrix), b, steps=10)
    assert all((t == 0).all() for t in x)
    assert info["negative_curvature"] == 1 and info["cg_iterations"] == 0 and info["cg_min_curvature"] == 0.0
