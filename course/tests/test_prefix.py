"""Assignment `prefix` (course/prefix.md): prefix tuning's attention (Li & Liang 2021).

Layer l attends over [P_k ; K] and [P_v ; V]: the prefixes are prepended to the keys and values
only, the mask gets P leading "attend" columns (padding stays masked), queries and the positions
of the real tokens do not move. Expected values are softmax attention written out here.
"""

import copy
import math

import pytest
import torch

from adapters import PeftConfig, _extend_mask, add_peft
from tests.conftest import tiny_classifier

MIN = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------- the mask

def test_no_mask_stays_none_when_the_prefix_is_visible():
    assert _extend_mask(None, 3, True, 2, 4, torch.float32, "cpu") is None


def test_no_mask_and_a_hidden_prefix_masks_only_the_prefix_columns():
    mask = _extend_mask(None, 2, False, 3, 4, torch.float32, "cpu")
    assert mask.shape == (3, 1, 4, 6) and mask.dtype == torch.float32
    assert (mask[..., :2] == MIN).all() and (mask[..., 2:] == 0).all()


@pytest.mark.parametrize("visible", [True, False])
def test_an_additive_mask_gets_leading_columns(visible):
    mask = torch.zeros(2, 1, 3, 3)
    mask[1, ..., 2] = MIN                                       # sentence 2: its last token is padding
    out = _extend_mask(mask, 2, visible, 2, 3, torch.float32, "cpu")
    assert out.shape == (2, 1, 3, 5) and out.dtype == torch.float32
    assert (out[..., :2] == (0.0 if visible else MIN)).all()
    assert torch.equal(out[..., 2:], mask)                      # the real keys' columns as they were


@pytest.mark.parametrize("visible", [True, False])
def test_a_boolean_mask_gets_leading_columns(visible):
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    mask[1, ..., 2] = False
    out = _extend_mask(mask, 4, visible, 2, 3, torch.float32, "cpu")
    assert out.shape == (2, 1, 3, 7) and out.dtype == torch.bool
    assert (out[..., :4] == visible).all() and torch.equal(out[..., 4:], mask)


def test_a_mask_that_is_not_a_tensor_is_a_type_error():
    with pytest.raises(TypeError):
        _extend_mask([[1, 1]], 2, True, 1, 2, torch.float32, "cpu")


# ----------------------------------------------------------------------------- the attention

def prefixed(attn, mlp, seed=0):
    model = add_peft(tiny_classifier("bert", attn, seed=seed),
                     PeftConfig("prefix", prefix_length=3, prefix_mlp=mlp, prefix_hidden=8), seed=seed)
    if not mlp:
        with torch.no_grad():
            model.bert.encoder.peft_prefix.key_values.normal_(0, 1.0)   # prefixes that matter
    return model


def hand_attention(module, x, prefix_keys, prefix_values, mask):
    """softmax(q [P_k ; K]^T / sqrt(d_head) + [0 ; mask]) [P_v ; V], head by head."""
    batch, length, hidden = x.shape
    heads = module.num_attention_heads
    head = hidden // heads

    def split(t):
        return t.view(batch, t.shape[1], heads, head).transpose(1, 2)

    q = split(module.query(x))
    k = split(torch.cat([prefix_keys.expand(batch, -1, -1), module.key(x)], dim=1))
    v = split(torch.cat([prefix_values.expand(batch, -1, -1), module.value(x)], dim=1))
    columns = torch.zeros(batch, 1, length, prefix_keys.shape[0])
    scores = q @ k.transpose(-1, -2) / math.sqrt(head) + torch.cat([columns, mask], dim=-1)
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, hidden)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mlp", [False, True])
def test_self_attention_attends_over_the_prefix_then_the_tokens(attn, mlp):
    model = prefixed(attn, mlp)
    prefix = model.bert.encoder.peft_prefix
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, ..., 3:] = MIN                                      # sentence 2 has 3 real tokens
    for index, layer in enumerate(model.bert.encoder.layer):
        keys, values = prefix.key_value(index)
        expected = hand_attention(layer.attention.self, x, keys, values, mask)
        out = layer.attention.self(x, attention_mask=mask)[0]
        assert out.shape == x.shape
        assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(layer.attention.self(x)[0], hand_attention(layer.attention.self, x, keys, values,
                                                                          torch.zeros(2, 1, 5, 5)), atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_hidden_prefix_gives_the_plain_model_so_positions_did_not_shift(attn):
    model = prefixed(attn, mlp=True)
    model.bert.encoder.peft_prefix.visible = False
    base = tiny_classifier("bert", attn, seed=0)
    base.classifier.load_state_dict(model.classifier.state_dict())   # add_peft draws a new head
    ids = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    for m in (None, mask):
        assert torch.allclose(model(input_ids=ids, attention_mask=m).logits,
                              base(input_ids=ids, attention_mask=m).logits, atol=1e-5)
    model.bert.encoder.peft_prefix.visible = True
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_never_changes_the_real_tokens(attn):
    model = prefixed(attn, mlp=True)
    ids = torch.randint(5, 120, (1, 4), generator=torch.Generator().manual_seed(0))
    alone = model(input_ids=ids).logits
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    other = torch.randint(5, 120, (1, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7])
    together = model(input_ids=torch.cat([padded, other]), attention_mask=mask).logits
    assert torch.allclose(together[0, :4], alone[0], atol=1e-5)


def test_gradients_reach_the_prefix_mlp_and_a_deep_copy_is_independent():
    model = prefixed("eager", mlp=True)
    ids = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.square().sum().backward()
    prefix = model.bert.encoder.peft_prefix
    for name, p in prefix.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.bert.encoder.peft_prefix.embedding.add_(1.0)
    assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_dropout_acts_on_the_prefixed_attention_in_training_only(attn):
    """Only the attention probabilities' dropout is on (p = 0.5, every other dropout 0): two training
    forwards differ, as the plain model's do; two eval forwards are equal (eval mode alone cannot see it)."""
    model = prefixed(attn, mlp=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in model.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.5
    ids = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
