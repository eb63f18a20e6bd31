"""Two extension assignments not yet in the course kit (course/README.md; the third, bootstrap, is
course/tests/test_bootstrap.py). Each changes one file; they fail on the project as it is (that is
the assignment) and are left out of the README's test command:

    python -m pytest tests/test_assignments.py -m assignment -k adam     # 1. maml.py
    python -m pytest tests/test_assignments.py -m assignment -k head     # 2. meta_pretrain.py

README.md, "Course assignments", says what each asks for.
"""
import pytest
import torch

import maml
import meta_pretrain

pytestmark = pytest.mark.assignment


def quadratic_loss(fast, batch):
    """0.5 * ||theta * phi - target||^2: theta is the body, phi the fast tensor."""
    return 0.5 * ((batch["theta"] * fast["phi"] - batch["target"]) ** 2).sum()


def test_1_adam_in_the_inner_loop():
    """maml.inner_loop(..., optimizer="adam"): differentiable Adam steps (beta1 0.9, beta2 0.999, eps 1e-8,
    bias-corrected) instead of SGD; optimizer="sgd" stays the default."""
    theta = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    batch = {"theta": theta, "target": torch.tensor([1.0, 3.0, -2.0])}
    phi = {"phi": torch.tensor([0.3, 0.2, -0.1])}
    one = maml.inner_loop(quadratic_loss, phi, batch, 1, 0.01, optimizer="adam")
    g = theta.detach() * (theta.detach() * phi["phi"] - batch["target"])
    assert torch.allclose(one["phi"], phi["phi"] - 0.01 * g / (g.abs() + 1e-8), atol=1e-6)  # Adam's first step
    two = maml.inner_loop(quadratic_loss, phi, batch, 2, 0.01, optimizer="adam")
    assert not torch.allclose(two["phi"], one["phi"])
    (grad,) = torch.autograd.grad(quadratic_loss(two, batch), theta)   # second order: phi' depends on theta
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    sgd = maml.inner_loop(quadratic_loss, phi, batch, 1, 0.01)
    assert torch.allclose(sgd["phi"], phi["phi"] - 0.01 * g, atol=1e-6)                  # the default is unchanged


def test_2_an_ablation_whose_inner_loop_adapts_the_head_only(tiny_model_dir):
    """meta_pretrain.py --inner-params head: the inner loop adapts the NER head only; the fresh PEFT
    tensors stay as drawn (is adapting the PEFT tensors what matters, or is a head enough?)."""
    import adapters
    import peft_config
    from plumbing.pretrained import load_token_classifier
    args = meta_pretrain.build_parser().parse_args(["--inner-params", "head"])
    assert args.inner_params == "head"
    model = load_token_classifier(str(tiny_model_dir), num_labels=7)
    adapters.add_peft(model, peft_config.PeftConfig("adapter"), seed=0)
    fast = meta_pretrain.phi_start(model, False, "head", torch.Generator().manual_seed(0))(0)
    heads = {n for n in adapters.peft_parameters(model) if "classifier" in n}
    assert set(fast) == heads and heads

