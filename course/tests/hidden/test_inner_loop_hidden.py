"""Hidden tests of `inner_loop` (left out of the student copy; `python -m course grade` runs them)."""

import pytest
import torch

import maml
from course.tests.test_inner_loop import PHI_0, THETA, batches, closed_form, toy_loss


@pytest.mark.points(2)
def test_no_step_returns_phi_0_itself_and_a_leaf_keeps_its_gradient():
    """steps=0: phi' = phi_0, no loss evaluated; a phi_0 that requires grad is returned as is (the same tensor)."""
    calls = []

    def counted(fast, batch):
        calls.append(1)
        return toy_loss(fast, batch)
    leaf = PHI_0.clone().requires_grad_(True)
    adapted = maml.inner_loop(counted, {"phi": leaf}, batches(THETA)[0], 0, 0.2, losses=[])
    assert adapted["phi"] is leaf and not calls
    plain = maml.inner_loop(counted, {"phi": PHI_0}, batches(THETA)[0], 0, 0.2)
    assert torch.equal(plain["phi"], PHI_0) and plain["phi"].requires_grad and not PHI_0.requires_grad


def test_clip_and_meta_sgd_rates_together_over_several_steps():
    """Each step clips the gradient at the current phi_j, then takes the tensor's own rate."""
    rate = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    adapted = maml.inner_loop(toy_loss, {"phi": PHI_0}, batches(THETA)[0], 3, 0.1, clip=0.5, rates={"phi": rate})
    phi = PHI_0
    for _ in range(3):
        g = THETA * (THETA * phi - batches(THETA)[0]["y"])
        phi = phi - 0.3 * g * min(1.0, 0.5 / (g.norm().item() + 1e-6))
    assert torch.allclose(adapted["phi"], phi, rtol=1e-5)
    assert not torch.allclose(adapted["phi"], closed_form(THETA, PHI_0, 3, 0.3))   # the clip acted
    (d_rate,) = torch.autograd.grad(adapted["phi"].sum(), rate)
    assert d_rate.abs() > 0
