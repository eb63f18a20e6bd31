"""Tests for adapters.py and peft_checkpoint.py on tiny random BERT and XLM-R token classifiers.

Prefix tuning is checked against an independent implementation written here (embeddings,
positions and attention by hand, prefixes concatenated to K and V), the other methods by
identity and by the rules phi / theta must follow (counts, freezing, second order).
"""

import copy
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_classifier  # noqa: E402

import adapters  # noqa: E402
from adapters import (  # noqa: E402  # noqa: E402
    PeftConfig,
    add_peft,
    body_parameters,
    freeze_body,
    fresh_peft_tensors,
    peft_config_of,
    peft_parameters,
)
from peft_checkpoint import load_peft, save_peft  # noqa: E402

# helpers of these tests only

def reset_peft(model, generator=None):
    """Re-draw the model's own phi in place (what a fresh downstream PEFT run starts from)."""
    fresh = fresh_peft_tensors(model, generator)
    with torch.no_grad():
        for name, p in peft_parameters(model).items():
            p.copy_(fresh[name])
    return model


def count_peft_parameters(config: PeftConfig, model_config, num_labels: int, include_head=True) -> int:
    """Closed-form size of phi for a model config (no model needed)."""
    d, layers = model_config.hidden_size, model_config.num_hidden_layers
    if config.method == "adapter":
        m = config.bottleneck_for(d)
        per_layer = 2 if config.placement == "houlsby" else 1
        n = layers * per_layer * (2 * d * m + m + d)
    elif config.method == "lora":
        n = layers * 2 * config.lora_rank * 2 * d  # A (r x d) and B (d x r) on query and value
    elif config.prefix_mlp:
        h, out = config.prefix_hidden, layers * 2 * d
        n = config.prefix_length * d + (d * h + h) + (h * out + out)
    else:
        n = layers * 2 * config.prefix_length * d
    return n + ((d * num_labels + num_labels) if include_head else 0)


FAMILIES = ["bert", "xlmr"]
ATTNS = ["eager", "sdpa"]
CONFIGS = {
    "houlsby": PeftConfig("adapter", placement="houlsby"),
    "pfeiffer": PeftConfig("adapter", placement="pfeiffer", bottleneck=4),
    "prefix_mlp": PeftConfig("prefix", prefix_length=3, prefix_hidden=8),
    "prefix": PeftConfig("prefix", prefix_length=3, prefix_mlp=False),
    "lora": PeftConfig("lora", lora_rank=2),
}


def tiny_model(family, attn="eager", num_labels=7, seed=0):
    return tiny_classifier(family, attn, seed=seed, num_labels=num_labels)


def batch(family, seed=0):
    """Two sentences, the second padded (pad id 0 for BERT, 1 for XLM-R)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[mask == 0] = 0 if family == "bert" else 1
    return ids, mask


def logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


def with_peft(family, name, attn="eager", seed=0):
    return add_peft(tiny_model(family, attn), CONFIGS[name], seed=seed)


# ----------------------------------------------------------------------------- identity

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "lora", "prefix_mlp", "prefix"])
def test_identity_at_neutral_phi(family, attn, name):
    """Zero up-projection, B = 0, or a prefix masked out: the base model's logits."""
    base = tiny_model(family, attn)
    model = add_peft(copy.deepcopy(base), CONFIGS[name], seed=1)
    base.classifier.load_state_dict(model.classifier.state_dict())  # add_peft redraws the head
    with torch.no_grad():
        for n, p in peft_parameters(model, include_head=False).items():
            if n.endswith(("up.weight", "up.bias", "lora.B")):
                p.zero_()
    if name.startswith("prefix"):
        model.base_model.encoder.peft_prefix.visible = False
    ids, mask = batch(family)
    for m in (mask, None):
        assert torch.allclose(logits(model, ids, m), logits(base, ids, m), atol=1e-6)


def test_default_init_is_near_but_not_exactly_identity_for_adapters():
    base = tiny_model("bert")
    model = add_peft(copy.deepcopy(base), CONFIGS["houlsby"], seed=0)
    base.classifier.load_state_dict(model.classifier.state_dict())
    ids, mask = batch("bert")
    diff = (logits(model, ids, mask) - logits(base, ids, mask)).abs().max()
    assert 0 < diff < 1e-2


# ----------------------------------------------------------------------------- phi and theta

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", list(CONFIGS.values()) + [
    PeftConfig("adapter", reduction_factor=8), PeftConfig("adapter", placement="pfeiffer"),
    PeftConfig("prefix"), PeftConfig("prefix", prefix_length=16, prefix_mlp=False),
    PeftConfig("lora"), PeftConfig("lora", lora_rank=1, lora_alpha=2.0)])
def test_counts_and_names(family, config):
    base = tiny_model(family)
    names = [n for n, _ in base.named_parameters()]
    model = add_peft(base, config)
    phi = peft_parameters(model)
    assert sum(p.numel() for p in phi.values()) == count_peft_parameters(config, model.config, 7)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert sum(p.numel() for p in peft_parameters(model, False).values()) == \
        count_peft_parameters(config, model.config, 7, include_head=False) == \
        count_peft_parameters(config, model.config, 7) - head
    assert list(body_parameters(model)) == [n for n in names if not n.startswith("classifier.")]
    assert set(names) <= set(dict(model.named_parameters()))  # the model's own names unchanged
    assert peft_config_of(model) == config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_freeze_body_and_adamw_step_touch_only_phi(name):
    model = freeze_body(with_peft("xlmr", name))
    body_before = {n: p.detach().clone() for n, p in body_parameters(model).items()}
    phi_before = {n: p.detach().clone() for n, p in peft_parameters(model).items()}
    assert all(not p.requires_grad for p in body_parameters(model).values())
    assert all(p.requires_grad for p in peft_parameters(model).values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch("xlmr")
    logits(model, ids, mask).square().mean().backward()
    opt.step()
    for n, p in body_parameters(model).items():
        assert p.grad is None and torch.equal(p, body_before[n]), n
    for n, p in peft_parameters(model).items():
        assert not torch.equal(p, phi_before[n]), n


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "prefix_mlp", "prefix"])
def test_every_phi_tensor_gets_a_gradient_at_the_first_step(name):
    """The near-identity adapter init must not block any gradient (unlike a zero up-projection)."""
    model = freeze_body(with_peft("bert", name))
    ids, mask = batch("bert")
    logits(model, ids, mask).square().mean().backward()
    for n, p in peft_parameters(model).items():
        if not n.endswith("bias"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_tensors_functional_call_and_reset(name):
    model = with_peft("bert", name)
    stored = {n: p.detach().clone() for n, p in peft_parameters(model).items()}
    fresh = fresh_peft_tensors(model, torch.Generator().manual_seed(5))
    assert list(fresh) == list(stored)
    for n, t in fresh.items():
        assert t.requires_grad and t.is_leaf and t.shape == stored[n].shape and t.dtype == stored[n].dtype
    ids, mask = batch("bert")
    own = logits(model, ids, mask)
    swapped = functional_call(model, dict(fresh), args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
    assert not torch.allclose(own, swapped)
    assert all(torch.equal(p, stored[n]) for n, p in peft_parameters(model).items())
    assert torch.equal(logits(model, ids, mask), own)
    again = fresh_peft_tensors(model, torch.Generator().manual_seed(5))  # a seed fixes phi
    assert all(torch.equal(again[n], t) for n, t in fresh.items())
    reset_peft(model, torch.Generator().manual_seed(5))
    assert torch.allclose(logits(model, ids, mask), swapped)


def test_add_peft_seed_is_reproducible_and_twice_is_an_error():
    a, b = with_peft("bert", "houlsby", seed=3), with_peft("bert", "houlsby", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(peft_parameters(a).values(), peft_parameters(b).values()))
    with pytest.raises(ValueError, match="already has PEFT"):
        add_peft(a, CONFIGS["lora"])


@pytest.mark.parametrize("name", ["houlsby", "prefix_mlp", "lora"])
def test_deepcopy_is_independent(name):
    model = with_peft("bert", name)
    ids, mask = batch("bert")
    before = logits(model, ids, mask)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in peft_parameters(twin, include_head=False).values():
            p.add_(0.5)
    assert torch.equal(logits(model, ids, mask), before)
    assert not torch.allclose(logits(twin, ids, mask), before)


# ----------------------------------------------------------------------------- prefix tuning

def reference_embeddings(w, ids, cfg, family, base):
    """The embedding layer written out. Positions are computed from the input alone (BERT:
    0..T-1; XLM-R: pad + 1 + index of the real tokens), so a model that shifted them differs."""
    if family == "bert":
        pos = torch.arange(ids.shape[1]).expand_as(ids)
    else:
        real = (ids != cfg.pad_token_id).long()
        pos = torch.cumsum(real, dim=1) * real + cfg.pad_token_id
    e = f"{base}.embeddings"
    x = w[f"{e}.word_embeddings.weight"][ids] + w[f"{e}.position_embeddings.weight"][pos] \
        + w[f"{e}.token_type_embeddings.weight"][0]
    return F.layer_norm(x, (cfg.hidden_size,), w[f"{e}.LayerNorm.weight"], w[f"{e}.LayerNorm.bias"], cfg.layer_norm_eps)


def reference_prefix_logits(model, ids, mask, family, mlp):
    """Independent forward of the whole tiny model with prefixes concatenated to K and V.

    Positions are computed here from the input alone (BERT: 0..T-1; XLM-R: pad + 1 + index
    of the real tokens), so matching outputs also means the prefix did not shift them.
    """
    w = {n: p.detach() for n, p in model.named_parameters()}
    cfg, base = model.config, ("bert" if family == "bert" else "roberta")
    d, heads, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    prefix_name = f"{base}.encoder.peft_prefix"
    if mlp:  # Li & Liang's reparameterisation, written out
        z = torch.tanh(w[f"{prefix_name}.embedding"] @ w[f"{prefix_name}.mlp_in.weight"].T
                       + w[f"{prefix_name}.mlp_in.bias"])
        out = z @ w[f"{prefix_name}.mlp_out.weight"].T + w[f"{prefix_name}.mlp_out.bias"]
        kv = out.view(-1, layers, 2, d).permute(1, 2, 0, 3)
    else:
        kv = w[f"{prefix_name}.key_values"]
    P = kv.shape[2]
    x = reference_embeddings(w, ids, cfg, family, base)
    B, T = ids.shape
    bias = torch.zeros(B, 1, 1, P + T)
    bias[:, :, :, P:] = torch.where(mask[:, None, None, :] > 0, 0.0, -math.inf)

    def lin(name, h):
        return h @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def split(t):
        return t.view(B, -1, heads, d // heads).transpose(1, 2)

    for i in range(layers):
        L = f"{base}.encoder.layer.{i}"
        q = split(lin(f"{L}.attention.self.query", x))
        k = split(torch.cat([kv[i, 0].expand(B, P, d), lin(f"{L}.attention.self.key", x)], 1))
        v = split(torch.cat([kv[i, 1].expand(B, P, d), lin(f"{L}.attention.self.value", x)], 1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + bias, dim=-1) @ v
        att = lin(f"{L}.attention.output.dense", att.transpose(1, 2).reshape(B, T, d))
        x = F.layer_norm(att + x, (d,), w[f"{L}.attention.output.LayerNorm.weight"],
                         w[f"{L}.attention.output.LayerNorm.bias"], cfg.layer_norm_eps)
        ff = lin(f"{L}.output.dense", F.gelu(lin(f"{L}.intermediate.dense", x)))
        x = F.layer_norm(ff + x, (d,), w[f"{L}.output.LayerNorm.weight"],
                         w[f"{L}.output.LayerNorm.bias"], cfg.layer_norm_eps)
    return lin("classifier", x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", ["prefix_mlp", "prefix"])
def test_prefix_matches_independent_implementation_and_keeps_positions(family, attn, name):
    model = with_peft(family, name, attn)
    ids, mask = batch(family)
    expected = reference_prefix_logits(model, ids, mask, family, mlp=name == "prefix_mlp")
    real = mask.bool()
    assert torch.allclose(logits(model, ids, mask)[real], expected[real], atol=1e-5)
    full = torch.ones_like(mask)  # no padding: also the mask=None path
    assert torch.allclose(logits(model, ids, None), reference_prefix_logits(model, ids, full, family,
                                                                            mlp=name == "prefix_mlp"), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_never_changes_real_tokens(family, attn, name):
    model = with_peft(family, name, attn)
    ids, _ = batch(family)
    alone = logits(model, ids[:1, :5])  # one sentence, no padding, no mask
    pad = 0 if family == "bert" else 1
    padded = torch.cat([ids[:1, :5], torch.full((1, 4), pad)], dim=1)
    two = torch.cat([padded, ids[1:]])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0
    assert torch.allclose(logits(model, two, mask)[0, :5], alone[0], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_equals_sdpa(family, name):
    eager, sdpa = with_peft(family, name, "eager"), with_peft(family, name, "sdpa")
    ids, mask = batch(family)
    real = mask.bool()
    assert torch.allclose(logits(eager, ids, mask)[real], logits(sdpa, ids, mask)[real], atol=1e-5)
    assert torch.allclose(logits(eager, ids), logits(sdpa, ids), atol=1e-5)



# ----------------------------------------------------------------------------- second order

def meta_problem(model, family):
    """w -> L_Q(w, phi - lr grad_phi L_S(w, phi)) for one body tensor w (one MAML inner step)."""
    base = "bert" if family == "bert" else "roberta"
    body_name = f"{base}.encoder.layer.0.attention.output.LayerNorm.weight"
    g = torch.Generator().manual_seed(0)
    phi0 = {n: (t.detach() + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))  # B != 0 too
            for n, t in fresh_peft_tensors(model, torch.Generator().manual_seed(1)).items()}
    ids, mask = batch(family)
    labels = torch.randint(0, 7, ids.shape, generator=g)

    def loss(tensors):
        out = functional_call(model, tensors, args=(), kwargs={"input_ids": ids, "attention_mask": mask})
        return F.cross_entropy(out.logits.view(-1, 7), labels.view(-1))

    def meta_loss(w, first_order=False):
        phi = {n: t.clone().requires_grad_() for n, t in phi0.items()}
        grads = torch.autograd.grad(loss({body_name: w, **phi}), list(phi.values()),
                                    create_graph=not first_order)
        return loss({body_name: w, **{n: t - 0.5 * gr for (n, t), gr in zip(phi.items(), grads)}})

    w = dict(model.named_parameters())[body_name].detach().clone().requires_grad_()
    return meta_loss, w


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["houlsby", "prefix_mlp", "prefix", "lora"])
def test_second_order_gradients_reach_the_body(family, name):
    """float64 gradcheck of the one-step MAML query loss as a function of a body tensor."""
    meta_loss, w = meta_problem(with_peft(family, name, "eager").double(), family)
    assert torch.autograd.gradcheck(meta_loss, (w,), eps=1e-6, atol=1e-5)
    second = torch.autograd.grad(meta_loss(w), w)[0]
    first = torch.autograd.grad(meta_loss(w, first_order=True), w)[0]
    assert not torch.allclose(second, first)  # the term through the inner step is there


@pytest.mark.parametrize("name", ["prefix_mlp", "lora"])
def test_second_order_under_sdpa_math_kernel_equals_eager(name):
    """What maml.inner_loop does with an sdpa model: the math kernel has a double backward."""
    grads = {}
    for attn in ATTNS:
        meta_loss, w = meta_problem(with_peft("xlmr", name, attn).double(), "xlmr")
        with sdpa_kernel(SDPBackend.MATH):
            grads[attn] = torch.autograd.grad(meta_loss(w), w)[0]
    assert torch.allclose(grads["eager"], grads["sdpa"], atol=1e-10)


@pytest.mark.parametrize("name", ["houlsby", "prefix_mlp", "lora"])
def test_gradgradcheck_through_each_method(name):
    """Second derivatives of the logits w.r.t. a body tensor below the PEFT path are exact."""
    model = with_peft("bert", name, "eager").double()
    with torch.no_grad():
        for p in peft_parameters(model, include_head=False).values():
            p.add_(0.05 * torch.randn_like(p))
    body_name = "bert.encoder.layer.0.attention.output.LayerNorm.bias"
    ids, mask = batch("bert")

    def f(b):
        out = functional_call(model, {body_name: b}, args=(), kwargs={"input_ids": ids, "attention_mask": mask})
        return out.logits[:, :3, :2]

    b = dict(model.named_parameters())[body_name].detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(f, (b,), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip(name, tmp_path):
    model = with_peft("xlmr", name, seed=4)
    with torch.no_grad():  # phi away from its init, so loading has something to do
        for p in peft_parameters(model).values():
            p.add_(0.01 * torch.randn_like(p))
    save_peft(model, tmp_path / "ckpt", extra={"step": 7})
    saved = load_file(str(tmp_path / "ckpt" / adapters.WEIGHTS_FILE))
    assert set(saved) == set(peft_parameters(model))
    assert not set(saved) & set(body_parameters(model))
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted([adapters.CONFIG_FILE, adapters.WEIGHTS_FILE])
    fresh = tiny_model("xlmr")  # same body (same seed), no PEFT yet
    record = load_peft(fresh, tmp_path / "ckpt")
    assert record["extra"] == {"step": 7} and record["num_labels"] == 7
    ids, mask = batch("xlmr")
    assert torch.equal(logits(fresh, ids, mask), logits(model, ids, mask))
    load_peft(fresh, tmp_path / "ckpt")  # loading into a model that already has it works too


def test_load_errors(tmp_path):
    model = with_peft("bert", "lora")
    save_peft(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="9 labels|7 labels"):
        load_peft(tiny_model("bert", num_labels=9), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="holds lora but the model has adapter"):
        load_peft(with_peft("bert", "houlsby"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="no such folder"):
        load_peft(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no peft"):
        load_peft(model, tmp_path / "empty")
    with pytest.raises(ValueError, match="no PEFT"):
        save_peft(tiny_model("bert"), tmp_path / "x")
    unchanged = tiny_model("bert", num_labels=9)
    with pytest.raises(ValueError):
        load_peft(unchanged, tmp_path / "ckpt")
    assert peft_config_of(unchanged) is None  # a failed load leaves the model alone


def test_config_round_trip():
    for config in CONFIGS.values():
        assert PeftConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        PeftConfig("ia3")
    with pytest.raises(ValueError, match="unknown"):
        PeftConfig.from_dict({"method": "lora", "rank": 3})


# ----------------------------------------------------------------------------- AdapterHub placements

def reference_adapter_logits(model, ids, mask, family, placement):
    """Independent eval-mode forward of the whole tiny model with bottleneck adapters written out
    as AdapterHub defines them (h: a sub-layer's output before its residual x and LayerNorm LN):
      houlsby  (DoubleSeqBnConfig):  LN(h + up(swish(down(h))) + x) after attention and FFN
      pfeiffer (SeqBnConfig):        a = LN(h + x); LN(up(relu(down(a))) + h + x) after the FFN only"""
    w = {n: p.detach() for n, p in model.named_parameters()}
    cfg, base = model.config, ("bert" if family == "bert" else "roberta")
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    x = reference_embeddings(w, ids, cfg, family, base)
    B, T = ids.shape
    bias = torch.where(mask[:, None, None, :] > 0, 0.0, -math.inf)

    def lin(name, h):
        return h @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def ln(name, h):
        return F.layer_norm(h, (d,), w[f"{name}.weight"], w[f"{name}.bias"], cfg.layer_norm_eps)

    def delta(name, a, f):
        return lin(f"{name}.up", f(lin(f"{name}.down", a)))

    def split(t):
        return t.view(B, -1, heads, d // heads).transpose(1, 2)

    for i in range(cfg.num_hidden_layers):
        L = f"{base}.encoder.layer.{i}"
        q, k, v = (split(lin(f"{L}.attention.self.{n}", x)) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + bias, dim=-1) @ v
        h = lin(f"{L}.attention.output.dense", att.transpose(1, 2).reshape(B, T, d))
        if placement == "houlsby":
            h = h + delta(f"{L}.attention.output.dropout.adapter", h, F.silu)
        x = ln(f"{L}.attention.output.LayerNorm", h + x)
        h = lin(f"{L}.output.dense", F.gelu(lin(f"{L}.intermediate.dense", x)))
        if placement == "houlsby":
            x = ln(f"{L}.output.LayerNorm", h + delta(f"{L}.output.dropout.adapter", h, F.silu) + x)
        else:
            a = ln(f"{L}.output.LayerNorm", h + x)
            x = ln(f"{L}.output.LayerNorm", delta(f"{L}.output.LayerNorm.adapter", a, F.relu) + h + x)
    return lin("classifier", x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapters_match_adapterhubs_definition(family, placement):
    model = add_peft(tiny_model(family), PeftConfig("adapter", placement=placement, adapter_init="bert"), seed=3)
    ids, mask = batch(family)
    expected = reference_adapter_logits(model, ids, mask, family, placement)
    real = mask.bool()
    assert torch.allclose(logits(model, ids, mask)[real], expected[real], atol=1e-5)


def test_pfeiffer_differs_from_houlsby_without_the_attention_adapter():
    """The old 'Pfeiffer' (FFN adapter before the residual and LayerNorm) is not AdapterHub's."""
    model = add_peft(tiny_model("bert"), PeftConfig("adapter", placement="pfeiffer", adapter_init="bert",
                                                    bottleneck=16), seed=3)
    with torch.no_grad():  # adapters that have learned something: deltas of the size of the hidden states
        for n, p in peft_parameters(model, include_head=False).items():
            p.mul_(30)
    ids, mask = batch("bert")
    pfeiffer = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    for layer in model.bert.encoder.layer:  # rewire as "houlsby, FFN only": h + delta(h) before LN(. + x)
        norm = layer.output.LayerNorm
        norm._forward_hooks.clear()
        layer.output.dropout.register_forward_hook(lambda m, a, out, adapter=norm.adapter: adapter(out))
    assert (model.bert(input_ids=ids, attention_mask=mask).last_hidden_state - pfeiffer).abs().max() > 0.5


def test_houlsby_adapters_sit_after_the_sublayer_dropout():
    model = tiny_model("bert")
    model.config.hidden_dropout_prob = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    add_peft(model, PeftConfig("adapter", placement="houlsby"), seed=0)
    model.train()
    dropped, adapter_inputs = {}, {}
    for name, module in model.named_modules():
        if name.endswith("output.dropout"):
            module.register_forward_hook(lambda m, a, out, name=name: dropped.__setitem__(name, out.clone()),
                                         prepend=True)  # the dropout's own output, before the adapter hook
        if name.endswith("adapter.down"):
            module.register_forward_pre_hook(lambda m, a, name=name: adapter_inputs.__setitem__(name, a[0]))
    ids, mask = batch("bert")
    torch.manual_seed(0)
    logits(model, ids, mask)
    sites = [n for n in dropped if n + ".adapter.down" in adapter_inputs]
    assert len(sites) == 4                                # 2 layers x (attention output, FFN output)
    for site in sites:
        seen = adapter_inputs[site + ".adapter.down"]
        assert torch.equal(seen, dropped[site]) and (seen == 0).float().mean() > 0.3


@pytest.mark.parametrize("placement, expected", [("houlsby", "swish"), ("pfeiffer", "relu")])
def test_non_linearity_defaults_are_adapterhubs_and_a_flag_chooses(placement, expected):
    assert PeftConfig("adapter", placement=placement).adapter_non_linearity == expected
    model = add_peft(tiny_model("bert"), PeftConfig("adapter", placement=placement, adapter_non_linearity="gelu"))
    layer = model.bert.encoder.layer[0]
    adapter = layer.output.dropout.adapter if placement == "houlsby" else layer.output.LayerNorm.adapter
    a = torch.randn(3, 32)
    assert torch.allclose(adapter.delta(a), adapter.up(F.gelu(adapter.down(a))))
    with pytest.raises(ValueError, match="--adapter-non-linearity must be one of"):
        PeftConfig("adapter", adapter_non_linearity="tanh")


def test_bert_init_is_adapterhubs_default_and_near_identity_is_houlsbys():
    near = add_peft(tiny_model("bert"), PeftConfig("adapter"), seed=0).bert.encoder.layer[0].output.dropout.adapter
    bert = add_peft(tiny_model("bert"), PeftConfig("adapter", adapter_init="bert", bottleneck=16),
                    seed=0).bert.encoder.layer[0].output.dropout.adapter
    assert near.up.weight.abs().max() <= 2e-3 and near.down.weight.std() > 0.05
    assert 0.015 < bert.up.weight.std() < 0.025 and 0.015 < bert.down.weight.std() < 0.025
    assert not bert.down.bias.any() and not bert.up.bias.any()


def test_the_stages_take_their_peft_choices_from_the_registry(monkeypatch):
    import finetune_peft
    import meta_pretrain
    import peft_config
    from experiments import search_inner
    monkeypatch.setattr(peft_config, "METHODS", (*peft_config.METHODS, "bitfit"))  # a new method: one place
    for build in (meta_pretrain.build_parser, finetune_peft.build_parser, search_inner.build_parser):
        assert build().parse_args(["--peft", "bitfit"]).peft == "bitfit"
