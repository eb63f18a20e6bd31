"""Assignment `adapter` (course/adapter.md): the bottleneck adapter and its two placements.

The expectations are METHOD.md's equations written out here with the modules' own weights:
delta(a) = W_up f(W_down a + b_down) + b_up; Houlsby LN(h + delta(h) + x) after both sub-layers;
Pfeiffer a = LN(h + x), LN(delta(a) + h + x) after the feed-forward sub-layer only.
"""

import copy
import math

import pytest
import torch

from adapters import Adapter, PeftConfig, add_peft
from tests.conftest import tiny_classifier

ACTIVATIONS = {  # written from their definitions, not taken from torch
    "swish": lambda z: z / (1 + torch.exp(-z)),
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
}


def hand_delta(adapter, a, f):
    return f(a @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias


def hand_layer_norm(s, norm):
    mean, var = s.mean(-1, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
    return (s - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def randomised(adapter):
    """Weights of the size a trained adapter has (a fresh one is near the identity on purpose)."""
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)
    return adapter


@pytest.mark.parametrize("non_linearity", list(ACTIVATIONS))
def test_delta_and_forward_are_the_bottleneck_equation(non_linearity):
    torch.manual_seed(0)
    adapter = randomised(Adapter(hidden=8, bottleneck=3, non_linearity=non_linearity))
    a = torch.randn(2, 5, 8)
    expected = hand_delta(adapter, a, ACTIVATIONS[non_linearity])
    assert torch.allclose(adapter.delta(a), expected, atol=1e-6)
    assert torch.allclose(adapter(a), a + expected, atol=1e-6)


def test_a_zero_up_projection_is_the_identity_and_gradients_reach_every_tensor():
    torch.manual_seed(0)
    adapter = randomised(Adapter(hidden=8, bottleneck=3))
    a = torch.randn(4, 8)
    adapter(a).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    with torch.no_grad():
        adapter.up.weight.zero_()
        adapter.up.bias.zero_()
    assert torch.equal(adapter(a), a)


def model_with_adapters(placement, seed=0):
    model = add_peft(tiny_classifier("bert", seed=seed), PeftConfig("adapter", placement=placement), seed=seed)
    for module in model.modules():
        if isinstance(module, Adapter):
            randomised(module)
    return model


def sub_layer(module, z, x, adapter=None, f=None, pfeiffer=False):
    """A BERT sub-layer by hand: h = W_o z + b_o (dropout off), then the residual and LayerNorm."""
    h = z @ module.dense.weight.T + module.dense.bias
    if adapter is None:
        return hand_layer_norm(h + x, module.LayerNorm)
    if pfeiffer:
        a = hand_layer_norm(h + x, module.LayerNorm)
        return hand_layer_norm(hand_delta(adapter, a, f) + h + x, module.LayerNorm)
    return hand_layer_norm(h + hand_delta(adapter, h, f) + x, module.LayerNorm)


def test_houlsby_adapts_both_sub_layers_before_their_residual_and_layer_norm():
    model = model_with_adapters("houlsby")
    torch.manual_seed(1)
    for layer in model.bert.encoder.layer:
        attention, ffn = layer.attention.output, layer.output
        x = torch.randn(2, 5, 32)
        z_attention, z_ffn = torch.randn(2, 5, 32), torch.randn(2, 5, 64)
        swish = ACTIVATIONS["swish"]
        assert torch.allclose(attention(z_attention, x),
                              sub_layer(attention, z_attention, x, attention.dropout.adapter, swish), atol=1e-5)
        assert torch.allclose(ffn(z_ffn, x), sub_layer(ffn, z_ffn, x, ffn.dropout.adapter, swish), atol=1e-5)


def test_pfeiffer_adapts_the_feed_forward_output_after_its_layer_norm_then_normalises_again():
    model = model_with_adapters("pfeiffer")
    torch.manual_seed(1)
    for layer in model.bert.encoder.layer:
        attention, ffn = layer.attention.output, layer.output
        x, z_attention, z_ffn = torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 64)
        assert torch.allclose(attention(z_attention, x), sub_layer(attention, z_attention, x), atol=1e-5)
        expected = sub_layer(ffn, z_ffn, x, ffn.LayerNorm.adapter, ACTIVATIONS["relu"], pfeiffer=True)
        assert torch.allclose(ffn(z_ffn, x), expected, atol=1e-5)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_the_whole_model_changes_with_the_adapters_and_not_without(placement):
    base = tiny_classifier("bert", seed=0)
    model = model_with_adapters(placement)
    base.classifier.load_state_dict(model.classifier.state_dict())   # add_peft draws a new head
    ids = torch.randint(5, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
    neutral = copy.deepcopy(model)
    with torch.no_grad():
        for module in neutral.modules():
            if isinstance(module, Adapter):
                module.up.weight.zero_()
                module.up.bias.zero_()
    assert torch.allclose(neutral(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


def test_pfeiffer_uses_the_layer_norms_own_weight_bias_and_eps():
    """A trained LayerNorm is not weight 1, bias 0, and a model's eps is its own (BERT's 1e-12, not 1e-5)."""
    model = model_with_adapters("pfeiffer")
    torch.manual_seed(2)
    ffn = model.bert.encoder.layer[0].output
    with torch.no_grad():
        ffn.LayerNorm.weight.normal_(1, 0.5)
        ffn.LayerNorm.bias.normal_(0, 0.5)
    ffn.LayerNorm.eps = 0.5   # large, so that an eps of its own choice shows
    x, z = torch.randn(2, 5, 32) * 0.3, torch.randn(2, 5, 64) * 0.3
    expected = sub_layer(ffn, z, x, ffn.LayerNorm.adapter, ACTIVATIONS["relu"], pfeiffer=True)
    assert torch.allclose(ffn(z, x), expected, atol=1e-5)


def test_houlsby_adapts_what_the_dropout_lets_through_in_training():
    """In training the sub-layer's dropout acts first and the adapter sees its output:
    LN(d + delta(d) + x) with d = dropout(W_o z + b_o) (eval mode alone cannot tell d from h)."""
    model = model_with_adapters("houlsby").train()
    ffn = model.bert.encoder.layer[0].output
    ffn.dropout.p = 0.5
    x, z = torch.randn(2, 5, 32), torch.randn(2, 5, 64)
    torch.manual_seed(3)
    out = ffn(z, x)
    torch.manual_seed(3)   # the same mask: nn.Dropout draws it with one F.dropout call
    d = torch.nn.functional.dropout(z @ ffn.dense.weight.T + ffn.dense.bias, 0.5, training=True)
    expected = hand_layer_norm(d + hand_delta(ffn.dropout.adapter, d, ACTIVATIONS["swish"]) + x, ffn.LayerNorm)
    assert torch.allclose(out, expected, atol=1e-5)
