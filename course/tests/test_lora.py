"""Assignment `lora` (course/lora.md): LoRA (Hu et al. 2021) on the query and value projections.

A projection W x + b becomes W x + b + (alpha / r) B A x; with B = 0 the model is exactly the
pretrained one. Expected values: the merged weight W + (alpha / r) B A, and finite differences.
"""

import copy

import pytest
import torch
from torch.func import functional_call

from adapters import LoRA, PeftConfig, add_peft
from tests.conftest import tiny_classifier


def random_lora(in_features=6, out_features=5, rank=2, alpha=8.0, seed=0):
    lora = LoRA(in_features, out_features, rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.A.copy_(torch.randn(lora.A.shape, generator=g))
        lora.B.copy_(torch.randn(lora.B.shape, generator=g))
    return lora


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (2, 8.0), (4, 16.0)])
def test_the_update_is_alpha_over_r_times_b_a_x(rank, alpha):
    lora = random_lora(rank=rank, alpha=alpha)
    x = torch.randn(3, 4, 6)
    expected = (alpha / rank) * x @ lora.A.T @ lora.B.T
    assert torch.allclose(lora(x), expected, atol=1e-5)


def test_gradients_match_finite_differences():
    lora = random_lora().double()
    x = torch.randn(4, 6, dtype=torch.float64)

    def out(A, B):
        return functional_call(lora, {"A": A, "B": B}, (x,))
    A, B = (lora.A.detach().clone().requires_grad_(), lora.B.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(out, (A, B))


def lora_model(seed=0):
    return add_peft(tiny_classifier("bert", seed=seed), PeftConfig("lora", lora_rank=2, lora_alpha=6.0), seed=seed)


def test_query_and_value_use_the_merged_weight_and_the_key_is_untouched():
    model = lora_model()
    torch.manual_seed(1)
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        for proj in (attention.query, attention.value):
            with torch.no_grad():
                proj.lora.B.normal_()
            merged = proj.weight + proj.lora.scaling * proj.lora.B @ proj.lora.A
            assert proj.lora.scaling == pytest.approx(6.0 / 2)
            x = torch.randn(2, 5, 32)
            assert torch.allclose(proj(x), x @ merged.T + proj.bias, atol=1e-5)
        x = torch.randn(2, 5, 32)
        assert torch.allclose(attention.key(x), x @ attention.key.weight.T + attention.key.bias, atol=1e-6)


def test_b_zero_is_the_pretrained_model_and_only_b_moves_at_the_first_step():
    base = tiny_classifier("bert", seed=0)
    model = lora_model()
    base.classifier.load_state_dict(model.classifier.state_dict())   # add_peft draws a new head
    ids = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    model(input_ids=ids).logits.square().sum().backward()
    for name, p in model.named_parameters():
        if name.endswith("lora.A"):
            assert torch.equal(p.grad, torch.zeros_like(p)), name      # dL/dA = B^T (...) = 0 while B = 0
        if name.endswith("lora.B"):
            assert p.grad.abs().sum() > 0, name


def test_a_trained_lora_changes_the_model():
    model = lora_model()
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0, 0.5)
    ids = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(trained(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)
