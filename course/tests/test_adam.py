"""Assignment `adam` (course/adam.md), an extension: maml.INNER_OPTIMIZERS["adam"], a differentiable
Adam step for the inner loop, which `meta_pretrain.py --inner-optimizer adam` then offers. It fails on
the reference until done (the solution: course/solutions/adam.patch); marked `assignment`, so `-m "not assignment"`
leaves it out.

Expected values come from torch.optim.Adam (first order: the same steps, taken in place), from
finite differences of the meta-loss (second order), and from a tensor whose first gradient is 0.
"""

import json

import pytest
import torch

import maml
import meta_pretrain
from tests.conftest import prime_argv, tiny_classifier

pytestmark = pytest.mark.assignment

THETA = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
Y_SUPPORT = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
Y_QUERY = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
PHI_0 = {"phi": torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64),
         "psi": torch.tensor([[2.0, -3.0]], dtype=torch.float64)}


def toy_loss(fast, batch):
    """Two fast tensors with gradients of very different sizes (Adam scales each to about lr)."""
    return (0.5 * ((batch["theta"] * fast["phi"] - batch["y"]) ** 2).sum()
            + 1e-3 * (batch["theta"][0] * fast["psi"] ** 2).sum())


def support(theta=THETA):
    return {"theta": theta, "y": Y_SUPPORT}


def torch_adam(steps, lr):
    """The same steps taken by torch.optim.Adam (betas 0.9, 0.999, eps 1e-8: its defaults)."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in PHI_0.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        toy_loss(params, support()).backward()
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_the_steps_are_adams(steps):
    adapted = maml.inner_loop(toy_loss, PHI_0, support(), steps, 0.05, first_order=True, optimizer="adam")
    expected = torch_adam(steps, 0.05)
    for name in PHI_0:
        assert torch.allclose(adapted[name], expected[name], rtol=0, atol=1e-9), name


def test_the_first_step_moves_each_element_by_the_learning_rate():
    """Bias correction: m_hat = g and v_hat = g^2 at step 1, so the step is lr * sign(g) (up to eps)."""
    adapted = maml.inner_loop(toy_loss, PHI_0, support(), 1, 0.01, optimizer="adam")
    g_phi = THETA * (THETA * PHI_0["phi"] - Y_SUPPORT)
    assert torch.allclose(adapted["phi"], PHI_0["phi"] - 0.01 * torch.sign(g_phi), atol=1e-8)
    assert torch.allclose(adapted["psi"], PHI_0["psi"] - 0.01 * torch.sign(PHI_0["psi"]), atol=1e-8)


def test_each_inner_loop_starts_with_fresh_moments_and_sgd_stays_the_default():
    once = maml.inner_loop(toy_loss, PHI_0, support(), 3, 0.05, optimizer="adam")
    again = maml.inner_loop(toy_loss, PHI_0, support(), 3, 0.05, optimizer="adam")
    assert all(torch.equal(once[n], again[n]) for n in PHI_0)
    sgd = maml.inner_loop(toy_loss, PHI_0, support(), 1, 0.05)
    g_phi = THETA * (THETA * PHI_0["phi"] - Y_SUPPORT)
    assert torch.allclose(sgd["phi"], PHI_0["phi"] - 0.05 * g_phi)
    assert meta_pretrain.build_parser().parse_args([]).inner_optimizer == "sgd"


def test_second_order_the_meta_gradient_matches_finite_differences():
    """phi' is a differentiable function of theta through every Adam step (moments included)."""
    def meta_loss(theta, first_order=False):
        adapted = maml.inner_loop(toy_loss, PHI_0, support(theta), 3, 0.05, first_order=first_order,
                                  optimizer="adam")
        return toy_loss(adapted, {"theta": theta, "y": Y_QUERY})
    theta = THETA.clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(meta_loss(theta), theta)
    eps, numeric = 1e-6, torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[i] = eps
        numeric[i] = (meta_loss(THETA + step, True).item() - meta_loss(THETA - step, True).item()) / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    (first,) = torch.autograd.grad(meta_loss(theta, first_order=True), theta)
    assert not torch.allclose(first, analytic)        # the steps' dependence on theta is a real term


def test_a_gradient_that_is_exactly_zero_gives_finite_second_order_gradients():
    """loss = 0.5 (theta a b - y)^2 with b = 0: a's first gradient is exactly 0 (as LoRA's A, with B = 0);
    after two second-order steps the meta-gradient into theta must be finite."""
    def loss(fast, batch):
        return 0.5 * ((batch["theta"] * fast["a"] * fast["b"] - batch["y"]) ** 2).sum()
    theta = THETA.clone().requires_grad_(True)
    fast = {"a": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    adapted = maml.inner_loop(loss, fast, {"theta": theta, "y": Y_SUPPORT}, 2, 0.1, optimizer="adam")
    assert not torch.equal(adapted["a"], fast["a"])    # a moved at the second step
    (meta,) = torch.autograd.grad(loss(adapted, {"theta": theta, "y": Y_QUERY}), theta)
    assert torch.isfinite(meta).all() and meta.abs().sum() > 0


def test_lora_on_a_tiny_bert_gives_finite_second_order_gradients():
    import adapters
    import peft_config
    model = tiny_classifier("bert", "eager", seed=0, dtype=torch.float64)
    adapters.add_peft(model, peft_config.PeftConfig("lora"), seed=0)
    g = torch.Generator().manual_seed(0)
    support_batch, query_batch = ({"input_ids": torch.randint(5, 120, (2, 6), generator=g),
                                   "labels": torch.randint(0, 7, (2, 6), generator=g)} for _ in range(2))
    phi_0 = adapters.fresh_peft_tensors(model, g)
    loss_fn = maml.functional_loss(model)
    a_names = [n for n in phi_0 if "lora" in n and phi_0[n].abs().sum() > 0]
    first = torch.autograd.grad(loss_fn(phi_0, support_batch), [phi_0[n] for n in a_names], allow_unused=True)
    assert a_names and all(g is None or not g.any() for g in first)    # the premise: A's first gradient is 0
    adapted = maml.inner_loop(loss_fn, phi_0, support_batch, 2, 1e-3, optimizer="adam")
    body = model.get_parameter("bert.encoder.layer.0.attention.self.query.weight")
    (meta,) = torch.autograd.grad(loss_fn(adapted, query_batch), body)
    assert torch.isfinite(meta).all() and meta.abs().sum() > 0


def test_the_command_line_reaches_adam(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """meta_pretrain.py --inner-optimizer adam, second order with LoRA: two meta-steps, finite losses."""
    calls = []
    adam = maml.INNER_OPTIMIZERS["adam"]

    def counted(tensor, grad, lr, state):
        calls.append(1)
        return adam(tensor, grad, lr, state)
    monkeypatch.setitem(maml.INNER_OPTIMIZERS, "adam", counted)
    out = tmp_path / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--steps", "2", "--inner-steps", "2",
                                  "--eval-every", "0", "--peft", "lora", "--inner-lr", "1e-3",
                                  "--inner-optimizer", "adam"))
    assert calls
    assert json.loads((out / "run.json").read_text())["args"]["inner_optimizer"] == "adam"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [v for line in lines for k, v in line.items() if "loss" in k]
    assert len(lines) == 2 and losses and all(v == v and abs(v) < float("inf") for v in losses)
