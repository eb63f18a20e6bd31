"""Assignment `inner_loop` (course/inner_loop.md): maml.inner_loop, k differentiable SGD steps on phi.

A toy task with a closed form: the loss 0.5 ||theta * phi - y||^2 (theta the body, phi the fast
tensor) has grad_phi = theta (theta phi - y), so one SGD step is phi - lr theta (theta phi - y) and
phi_k(theta) can be written out here and differentiated by torch.func. On a tiny BERT, the
second-order meta-gradient is compared with finite differences.
"""

import pytest
import torch
from torch.func import grad, jacrev

import maml
from tests.conftest import tiny_classifier

THETA = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
Y_SUPPORT = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
Y_QUERY = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
PHI_0 = torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64)


def toy_loss(fast, batch):
    return 0.5 * ((batch["theta"] * fast["phi"] - batch["y"]) ** 2).sum()


def closed_form(theta, phi, steps, lr):
    """phi_k of the toy task, step by step from the gradient's formula (no autograd)."""
    for _ in range(steps):
        phi = phi - lr * theta * (theta * phi - Y_SUPPORT)
    return phi


def batches(theta):
    return {"theta": theta, "y": Y_SUPPORT}, {"theta": theta, "y": Y_QUERY}


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_the_steps_are_sgd_on_the_support_loss(steps):
    support, _ = batches(THETA)
    adapted = maml.inner_loop(toy_loss, {"phi": PHI_0}, support, steps, 0.2)
    assert list(adapted) == ["phi"]
    assert torch.allclose(adapted["phi"], closed_form(THETA, PHI_0, steps, 0.2))


def test_second_order_phi_prime_is_a_differentiable_function_of_theta():
    theta = THETA.clone().requires_grad_(True)
    support, _ = batches(theta)
    adapted = maml.inner_loop(toy_loss, {"phi": PHI_0}, support, 3, 0.2)
    rows = [torch.autograd.grad(adapted["phi"][i], theta, retain_graph=True)[0] for i in range(3)]
    expected = jacrev(lambda t: closed_form(t, PHI_0, 3, 0.2))(THETA)    # d phi_3 / d theta
    assert torch.allclose(torch.stack(rows), expected)


def meta_gradient(first_order, steps=2, lr=0.3):
    theta = THETA.clone().requires_grad_(True)
    support, query = batches(theta)
    adapted = maml.inner_loop(toy_loss, {"phi": PHI_0}, support, steps, lr, first_order=first_order)
    return torch.autograd.grad(toy_loss(adapted, query), theta)[0], adapted["phi"].detach()


def test_the_meta_gradient_second_order_and_first_order():
    def query_loss(theta, phi):
        return 0.5 * ((theta * phi - Y_QUERY) ** 2).sum()
    full = grad(lambda t: query_loss(t, closed_form(t, PHI_0, 2, 0.3)))(THETA)     # both terms
    second, phi_prime = meta_gradient(first_order=False)
    assert torch.allclose(second, full)
    direct = grad(query_loss)(THETA, phi_prime)                                    # term (1) only
    first, phi_first = meta_gradient(first_order=True)
    assert torch.allclose(phi_first, phi_prime)           # the same phi', only the gradient differs
    assert torch.allclose(first, direct) and not torch.allclose(first, full)


def test_gradients_reach_a_leaf_phi_0_through_the_steps():
    """Plain MAML meta-learns phi_0: d phi_k / d phi_0 = (1 - lr theta^2)^k elementwise (first order: 1)."""
    for first_order, expected in [(False, (1 - 0.3 * THETA ** 2) ** 2), (True, torch.ones(3, dtype=torch.float64))]:
        phi_0 = PHI_0.clone().requires_grad_(True)
        adapted = maml.inner_loop(toy_loss, {"phi": phi_0}, batches(THETA)[0], 2, 0.3, first_order=first_order)
        adapted["phi"].sum().backward()
        assert torch.allclose(phi_0.grad, expected)


def test_losses_unused_tensors_and_the_inputs():
    fast = {"phi": PHI_0, "unused": torch.ones(2, dtype=torch.float64)}
    losses = []
    adapted = maml.inner_loop(toy_loss, fast, batches(THETA)[0], 3, 0.2, losses=losses)
    expected = [toy_loss({"phi": closed_form(THETA, PHI_0, j, 0.2)}, batches(THETA)[0]) for j in range(3)]
    assert len(losses) == 3 and all(not loss.requires_grad for loss in losses)
    assert torch.allclose(torch.stack(losses), torch.stack(expected))             # at phi_0 .. phi_2
    assert torch.equal(adapted["unused"], fast["unused"])
    assert fast["phi"] is PHI_0 and not PHI_0.requires_grad                           # the input untouched


def test_clip_scales_the_global_norm_of_the_gradient():
    fast = {"phi": PHI_0, "psi": torch.tensor([2.0], dtype=torch.float64)}

    def loss(fast, batch):
        return toy_loss(fast, batch) + 3.0 * fast["psi"].sum() ** 2
    g_phi = THETA * (THETA * PHI_0 - Y_SUPPORT)
    g_psi = 6.0 * fast["psi"]
    norm = torch.cat([g_phi, g_psi]).norm()
    adapted = maml.inner_loop(loss, fast, batches(THETA)[0], 1, 0.1, clip=1.0)
    assert torch.allclose(adapted["phi"], PHI_0 - 0.1 * g_phi / norm, rtol=1e-4)
    assert torch.allclose(adapted["psi"], fast["psi"] - 0.1 * g_psi / norm, rtol=1e-4)
    unclipped = maml.inner_loop(loss, fast, batches(THETA)[0], 1, 0.1, clip=1e6)
    assert torch.allclose(unclipped["phi"], PHI_0 - 0.1 * g_phi)


def test_meta_sgd_rates_per_tensor_get_gradients():
    rate = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    fast = {"phi": PHI_0, "psi": torch.tensor([2.0], dtype=torch.float64)}

    def loss(fast, batch):
        return toy_loss(fast, batch) + fast["psi"].sum() ** 2
    adapted = maml.inner_loop(loss, fast, batches(THETA)[0], 1, 0.1, rates={"phi": rate})
    g_phi = THETA * (THETA * PHI_0 - Y_SUPPORT)
    assert torch.allclose(adapted["phi"], PHI_0 - 0.05 * g_phi)
    assert torch.allclose(adapted["psi"], fast["psi"] - 0.1 * 2 * fast["psi"])     # no rate: lr
    (d_rate,) = torch.autograd.grad(adapted["phi"].sum(), rate)
    assert torch.allclose(d_rate, -g_phi.sum())


def test_the_step_is_the_chosen_rule_of_inner_optimizers(monkeypatch):
    """optimizer="NAME" takes each step with maml.INNER_OPTIMIZERS[NAME](tensor, grad, lr, state): one state
    dict per fast tensor, kept across the steps of one inner loop, fresh for the next. Here a rule whose
    j-th step is j times an SGD step: phi_{j+1} = phi_j - (j + 1) lr g_j."""
    calls = []

    def growing(tensor, grad, lr, state):
        state["steps"] = state.get("steps", 0) + 1
        calls.append((tensor.shape, state, lr))
        return tensor - state["steps"] * lr * grad
    monkeypatch.setitem(maml.INNER_OPTIMIZERS, "growing", growing)

    def loss(fast, batch):
        return toy_loss(fast, batch) + fast["psi"].sum() ** 2
    rate = torch.tensor(0.05, dtype=torch.float64)
    fast = {"phi": PHI_0, "psi": torch.tensor([2.0], dtype=torch.float64), "unused": torch.ones(2)}
    adapted = maml.inner_loop(loss, fast, batches(THETA)[0], 3, 0.2, optimizer="growing", rates={"phi": rate})
    phi, psi = PHI_0, fast["psi"]
    for j in range(3):
        phi, psi = phi - (j + 1) * 0.05 * THETA * (THETA * phi - Y_SUPPORT), psi - (j + 1) * 0.2 * 2 * psi
    assert torch.allclose(adapted["phi"], phi) and torch.allclose(adapted["psi"], psi)
    assert torch.equal(adapted["unused"], fast["unused"])                    # no gradient: no step
    phi_calls = [c for c in calls if c[0] == PHI_0.shape]
    psi_calls = [c for c in calls if c[0] == fast["psi"].shape]
    assert len(phi_calls) == len(psi_calls) == 3 and len(calls) == 6
    assert all(c[1] is phi_calls[0][1] for c in phi_calls) and all(c[1] is psi_calls[0][1] for c in psi_calls)
    assert phi_calls[0][1] is not psi_calls[0][1]                            # one state per tensor
    assert all(c[2] is rate for c in phi_calls) and all(c[2] == 0.2 for c in psi_calls)   # Meta-SGD's rate is lr
    again = maml.inner_loop(loss, fast, batches(THETA)[0], 3, 0.2, optimizer="growing", rates={"phi": rate})
    assert torch.allclose(again["phi"], phi)                                 # a new inner loop: new states
    sgd = maml.inner_loop(toy_loss, {"phi": PHI_0}, batches(THETA)[0], 2, 0.2)
    assert len(calls) == 12 and torch.allclose(sgd["phi"], closed_form(THETA, PHI_0, 2, 0.2))   # default: sgd


# ----------------------------------------------------------------------------- a real encoder

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_meta_gradient_of_a_tiny_bert_matches_finite_differences(attn):
    """phi: the head and a feed-forward weight of layer 0 (no PEFT needed: the inner loop adapts any
    tensors), so second order differentiates through layer 1's attention backward (with sdpa that
    needs maml.double_backward_attention); theta: a query weight of layer 0."""
    model = tiny_classifier("bert", attn, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    support, query = ({"input_ids": torch.randint(5, 120, (2, 6), generator=g),
                       "labels": torch.randint(0, 7, (2, 6), generator=g)} for _ in range(2))
    names = ("classifier.weight", "classifier.bias", "bert.encoder.layer.0.output.dense.weight")
    phi_0 = {n: model.get_parameter(n).detach().clone() for n in names}
    loss_fn = maml.functional_loss(model)
    weight = model.get_parameter("bert.encoder.layer.0.attention.self.query.weight")
    before = weight.detach().clone()

    def meta_loss():
        return loss_fn(maml.inner_loop(loss_fn, phi_0, support, 2, 0.5), query)
    (analytic,) = torch.autograd.grad(meta_loss(), weight)
    assert torch.equal(weight, before)                               # the model itself is never written to
    direction = torch.randn(weight.shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        weight.add_(eps * direction)
    plus = meta_loss().item()
    with torch.no_grad():
        weight.sub_(2 * eps * direction)
    minus = meta_loss().item()
    with torch.no_grad():
        weight.copy_(before)
    assert (analytic * direction).sum().item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-5)
