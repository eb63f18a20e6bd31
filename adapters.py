"""Parameter-efficient fine-tuning (PEFT) methods written from scratch: adapters, prefixes, LoRA.

    from adapters import PeftConfig, add_peft, freeze_body, peft_parameters
    model = add_peft(BertForTokenClassification(BertConfig(num_labels=7)), PeftConfig("adapter"), seed=0)
    freeze_body(model)                           # theta frozen, phi = PEFT + head trainable
    optimizer = torch.optim.AdamW(peft_parameters(model).values(), lr=1e-3)   # (phi on disk: peft_checkpoint.py)

For the BERT and XLM-R token classifiers of transformers 5 (the head is `model.classifier`).
METHOD.md's notation: theta = the encoder's own parameters ("body"), phi = PEFT tensors + head.

Injection never renames a parameter: PEFT modules are new children (`...dropout.adapter` for Houlsby,
`...output.LayerNorm.adapter` for Pfeiffer, `...query.lora`, `<base>.encoder.peft_prefix`) acting through
forward hooks on their owner (copies of the module tree, as `higher` makes, see their own tensors) or, for
prefixes, a replacement self-attention forward. Hooks read their tensors as module attributes, so
`torch.func.functional_call(model, fast_tensors, ...)` sees swapped tensors, and all is plain autograd
(`autograd.grad(create_graph=True)` differentiates through it).

Bottleneck adapter (Houlsby et al. 2019), on a hidden state a of width d, bottleneck m:

    delta(a) = W_up f(W_down a + b_down) + b_up,    W_down: m x d,  W_up: d x m

Placements, as AdapterHub (the `adapters` library) defines them; in a BERT sub-layer
(attention output or feed-forward output) with input x, h = dropout(W_o z + b_o) is the
sub-layer's output before its residual and LayerNorm LN:
  houlsby  (AdapterHub DoubleSeqBnConfig: mh_adapter + output_adapter, original_ln_after,
           residual_before_ln): after both sub-layers' dropout,
               out = LN(h + delta(h) + x)
  pfeiffer (AdapterHub SeqBnConfig: output_adapter only, original_ln_before,
           original_ln_after, residual_before_ln): after the feed-forward sub-layer only, on
           its LayerNorm-ed output, then the same LayerNorm again,
               a = LN(h + x),    out = LN(delta(a) + h + x)
Non-linearity f: AdapterHub's defaults, swish (SiLU) for houlsby and relu for pfeiffer
(`adapter_non_linearity` to choose; Houlsby et al.'s own code used GELU).
Initialisation: "near-identity" (default), Houlsby et al.'s code: W_up ~ truncated N(0, 1e-3)
and zero biases, so the adapter starts within ~1e-3 of delta = 0 and fresh PEFT draws start
from the pretrained function (what priming's inner loop assumes of downstream fine-tuning);
W_down gets PyTorch's default Linear init so the bottleneck is active (a zero W_up would give
W_down a zero gradient at the first step; this tiny one does not). "bert" is AdapterHub's
default: every weight ~ N(0, 0.02), zero biases.

Prefix tuning (Li & Liang 2021): layer l attends over [P_k^l ; K] and [P_v^l ; V], P
trainable vectors of width d per layer, prepended to the keys and values only, so queries,
outputs and the position ids of the real tokens are those of the plain model. The attention
mask gets P leading "attend" columns; padding stays masked. With the reparameterisation
MLP, shared by all layers as in Li & Liang,

    [P_k^1 ; P_v^1 ; ... ; P_k^L ; P_v^L] = W_2 tanh(W_1 E + b_1) + b_2,   E: P x d

(E ~ N(0, 1) like nn.Embedding, W_1, W_2 PyTorch's default Linear init); each layer computes
only its own rows of W_2, so no state is carried between layers. Without the MLP the prefixes
are drawn from N(0, initializer_range): small keys and values, a mild attention sink.

LoRA (Hu et al. 2021) on the query and value projections: W x + (alpha / r) B A x, with A
from the Kaiming-uniform init of Hu et al.'s loralib and B = 0, so the model starts exactly
at the pretrained function. As in standard LoRA, B = 0 gives A a zero gradient at the first
step; B moves first, then A.
"""

import math
import sys
from collections import OrderedDict
from dataclasses import replace
from types import MethodType

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from peft_config import PeftConfig  # noqa: F401  (adapters.PeftConfig: the config of add_peft)

HEAD = "classifier"  # name of the token-classification head in BERT / XLM-R models
WEIGHTS_FILE, CONFIG_FILE = "peft.safetensors", "peft_config.json"
_CONFIG_ATTR = "_scratch_peft_config"  # not `peft_config`, which transformers' peft integration owns
NON_LINEARITIES = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu}  # peft_config.NON_LINEARITY_NAMES


# ----------------------------------------------------------------------------- init helpers
# Every draw happens on the CPU in float32 from `generator` (None: torch's global RNG), then
# moves to the model's device and dtype, so a seed gives the same phi on every device.

def _uniform(shape, bound, g):
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def _normal(shape, std, g):
    return torch.empty(shape).normal_(0.0, std, generator=g)


def _linear_default(linear, g, bias_zero=False):
    """PyTorch's nn.Linear init (Kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(linear.in_features)
    bias = torch.zeros(linear.out_features) if bias_zero else _uniform(linear.out_features, bound, g)
    return {"weight": _uniform(linear.weight.shape, bound, g), "bias": bias}


class PeftModule(nn.Module):
    """Base of the injected modules; `fresh` returns newly drawn values for its parameters."""

    def fresh(self, generator=None) -> dict:
        raise NotImplementedError


class Adapter(PeftModule):
    """Bottleneck adapter: delta(a) = W_up f(W_down a + b_down) + b_up (Houlsby et al. 2019); the placement
    decides where delta is added (see the module docstring)."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str = "swish", init: str = "near-identity"):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden)
        self.non_linearity, self.init = non_linearity, init

    def delta(self, a):
        # BEGIN ASSIGNMENT adapter
        return self.up(NON_LINEARITIES[self.non_linearity](self.down(a)))
        # END ASSIGNMENT adapter

    def forward(self, h):
        # BEGIN ASSIGNMENT adapter
        return h + self.delta(h)
        # END ASSIGNMENT adapter

    def fresh(self, generator=None):
        zeros = {"down.bias": torch.zeros(self.down.out_features), "up.bias": torch.zeros(self.up.out_features)}
        if self.init == "bert":  # AdapterHub's init_bert_weights
            return {"down.weight": _normal(self.down.weight.shape, 0.02, generator),
                    "up.weight": _normal(self.up.weight.shape, 0.02, generator), **zeros}
        down = _linear_default(self.down, generator, bias_zero=True)
        up_w = nn.init.trunc_normal_(torch.empty(self.up.weight.shape), std=1e-3, a=-2e-3, b=2e-3,
                                     generator=generator)
        return {"down.weight": down["weight"], "up.weight": up_w, **zeros}


class LoRA(PeftModule):
    """Low-rank update (alpha / r) B A x added to a frozen projection (Hu et al. 2021)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x):
        # BEGIN ASSIGNMENT lora
        return F.linear(F.linear(x, self.A), self.B * self.scaling)  # scale the small factor
        # END ASSIGNMENT lora

    def fresh(self, generator=None):
        return {"A": _uniform(self.A.shape, 1.0 / math.sqrt(self.A.shape[1]), generator),
                "B": torch.zeros(self.B.shape)}


class Prefix(PeftModule):
    """Key/value prefixes of every layer, directly or through the MLP of Li & Liang (2021)."""

    def __init__(self, length, num_layers, hidden, mlp_hidden=None, init_std=0.02):
        super().__init__()
        self.length, self.num_layers, self.hidden, self.init_std = length, num_layers, hidden, init_std
        self.visible = True  # False masks the prefix out: a check that injection is otherwise exact
        if mlp_hidden:
            self.embedding = nn.Parameter(torch.empty(length, hidden))
            self.mlp_in = nn.Linear(hidden, mlp_hidden)
            self.mlp_out = nn.Linear(mlp_hidden, num_layers * 2 * hidden)
        else:
            self.key_values = nn.Parameter(torch.empty(num_layers, 2, length, hidden))

    @property
    def has_mlp(self) -> bool:
        return "embedding" in self._parameters

    def key_value(self, layer: int):
        """The (P x d) key and value prefixes of one layer."""
        if not self.has_mlp:
            return self.key_values[layer, 0], self.key_values[layer, 1]
        z = torch.tanh(self.mlp_in(self.embedding))
        rows = slice(layer * 2 * self.hidden, (layer + 1) * 2 * self.hidden)
        kv = F.linear(z, self.mlp_out.weight[rows], self.mlp_out.bias[rows]).view(self.length, 2, self.hidden)
        return kv[:, 0], kv[:, 1]

    def fresh(self, generator=None):
        if not self.has_mlp:
            return {"key_values": _normal(self.key_values.shape, self.init_std, generator)}
        out = {"embedding": _normal(self.embedding.shape, 1.0, generator)}
        for name in ("mlp_in", "mlp_out"):
            out.update({f"{name}.{k}": v for k, v in _linear_default(getattr(self, name), generator).items()})
        return out


# ----------------------------------------------------------------------------- injection

def _houlsby_hook(dropout, args, output):
    """Forward hook on a sub-layer's dropout (which owns the adapter): h -> h + delta(h), before
    the sub-layer's residual and LayerNorm (Houlsby et al. 2019, Fig. 2; AdapterHub's DoubleSeqBnConfig)."""
    # BEGIN ASSIGNMENT adapter
    return dropout.adapter(output)
    # END ASSIGNMENT adapter


def _pfeiffer_hook(norm, args, output):
    """Forward hook on the feed-forward sub-layer's LayerNorm (which owns the adapter), whose input
    is s = h + x and output a = LN(s): returns LN(delta(a) + s), the same LayerNorm again
    (AdapterHub's SeqBnConfig: original_ln_before, residual_before_ln, original_ln_after)."""
    # BEGIN ASSIGNMENT adapter
    return F.layer_norm(norm.adapter.delta(output) + args[0], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    # END ASSIGNMENT adapter


def _lora_hook(linear, args, output):
    """Forward hook: W x + (alpha / r) B A x."""
    # BEGIN ASSIGNMENT lora
    return output + linear.lora(args[0])
    # END ASSIGNMENT lora


def _extend_mask(mask, length, visible, batch, queries, dtype, device):
    """Prepend `length` key columns to a 4-D attention mask (None, boolean, or additive float)."""
    # BEGIN ASSIGNMENT prefix
    if mask is None and visible:
        return None  # no padding: every query sees every key, prefix included
    if mask is None:
        mask = torch.zeros(batch, 1, queries, queries, dtype=dtype, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"prefix tuning supports tensor attention masks (eager, sdpa), got {type(mask)}")
    if mask.dtype == torch.bool:
        cols = torch.full((*mask.shape[:-1], length), visible, dtype=torch.bool, device=mask.device)
    else:
        cols = torch.full((*mask.shape[:-1], length), 0.0 if visible else torch.finfo(mask.dtype).min,
                          dtype=mask.dtype, device=mask.device)
    return torch.cat([cols, mask], dim=-1)
    # END ASSIGNMENT prefix


def _prefix_self_attention(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
    """BertSelfAttention.forward with this layer's prefix prepended to keys and values.

    Bound onto each self-attention module in place of its forward. Queries and positions of
    the real tokens are untouched; no key/value cache is involved (transformers 5 would
    mutate a DynamicCache in place, and encoders have none).
    """
    if past_key_values is not None:
        raise ValueError("prefix tuning here is for encoders; a key/value cache is not supported")
    if self.config._attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"prefix tuning supports eager and sdpa attention, not {self.config._attn_implementation}")
    # BEGIN ASSIGNMENT prefix
    prefix = self.__dict__["_peft_prefix"]  # a plain reference, so it is registered only once
    batch, length = hidden_states.shape[:2]
    keys, values = self.key(hidden_states), self.value(hidden_states)
    pk, pv = (p.to(keys.dtype).expand(batch, -1, -1) for p in prefix.key_value(self._peft_layer))
    keys, values = torch.cat([pk, keys], dim=1), torch.cat([pv, values], dim=1)

    def heads(x):
        return x.view(batch, x.shape[1], -1, self.attention_head_size).transpose(1, 2)

    mask = _extend_mask(attention_mask, prefix.length, prefix.visible, batch, length, keys.dtype, keys.device)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    out, weights = attention(self, heads(self.query(hidden_states)), heads(keys), heads(values), mask,
                             dropout=self.dropout.p if self.training else 0.0, scaling=self.scaling, **kwargs)
    return out.reshape(batch, length, -1).contiguous(), weights
    # END ASSIGNMENT prefix


def _layers(model):
    base = model.base_model
    if not hasattr(base, "encoder") or not hasattr(model, HEAD):
        raise ValueError(f"add_peft supports BERT / XLM-R token classifiers, got {type(model).__name__}")
    return base.encoder, list(base.encoder.layer)


def add_peft(model, config: PeftConfig, seed: int | None = None):
    """Inject the PEFT method of `config` in place and draw phi (PEFT tensors + head); returns model.

    `seed` makes phi reproducible (None: torch's global RNG). The body is left as it is; call
    freeze_body to freeze it.
    """
    if peft_config_of(model) is not None:
        raise ValueError(f"model already has PEFT ({peft_config_of(model).method}); add it once")
    encoder, layers = _layers(model)
    cfg = model.config
    hidden = cfg.hidden_size
    ref = model.get_input_embeddings().weight
    if config.method == "adapter":
        # sub-layers (BertSelfOutput, BertOutput, XLM-R's alike): dense -> dropout -> LayerNorm(. + x)
        if config.placement == "houlsby":
            owners = [sub.dropout for layer in layers for sub in (layer.attention.output, layer.output)]
        else:
            owners = [layer.output.LayerNorm for layer in layers]
        for owner in owners:
            owner.adapter = Adapter(hidden, config.bottleneck_for(hidden), config.adapter_non_linearity,
                                    config.adapter_init).to(ref.device, ref.dtype)
            owner.register_forward_hook(_houlsby_hook if config.placement == "houlsby" else _pfeiffer_hook)
    elif config.method == "lora":
        for layer in layers:
            for proj in (layer.attention.self.query, layer.attention.self.value):
                proj.lora = LoRA(proj.in_features, proj.out_features, config.lora_rank,
                                 config.lora_alpha).to(ref.device, ref.dtype)
                proj.register_forward_hook(_lora_hook)
    else:
        encoder.peft_prefix = Prefix(config.prefix_length, len(layers), hidden,
                                     config.prefix_hidden if config.prefix_mlp else None,
                                     cfg.initializer_range).to(ref.device, ref.dtype)
        for index, layer in enumerate(layers):
            attention = layer.attention.self
            attention.__dict__["_peft_prefix"] = encoder.peft_prefix
            attention._peft_layer = index
            attention.forward = MethodType(_prefix_self_attention, attention)
    setattr(model, _CONFIG_ATTR, replace(config))  # a copy: the caller may reuse theirs
    _load_drawn(model, torch.Generator().manual_seed(seed) if seed is not None else None)
    return model


def peft_config_of(model) -> PeftConfig | None:
    """The PeftConfig injected by add_peft, or None."""
    return getattr(model, _CONFIG_ATTR, None)


# ------------------------------------------------ theta and phi: phi = add_peft's tensors + HEAD, theta = the rest

def _peft_names(model, include_head):
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, PeftModule) or (include_head and prefix == HEAD):
            names |= {f"{prefix}.{name}" for name, _ in module.named_parameters()}
    return names


def peft_parameters(model, include_head: bool = True) -> "OrderedDict[str, nn.Parameter]":
    """phi: the PEFT tensors (and the head), named and ordered as in model.named_parameters()."""
    names = _peft_names(model, include_head)
    return OrderedDict((n, p) for n, p in model.named_parameters() if n in names)


def body_parameters(model) -> "OrderedDict[str, nn.Parameter]":
    """theta: every parameter that is neither PEFT nor head."""
    names = _peft_names(model, include_head=True)
    return OrderedDict((n, p) for n, p in model.named_parameters() if n not in names)


def freeze_body(model):
    """Freeze theta, make phi trainable (downstream PEFT trains the head too)."""
    names = _peft_names(model, include_head=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return model


def fresh_peft_tensors(model, generator: torch.Generator | None = None) -> "OrderedDict[str, torch.Tensor]":
    """A newly drawn phi (leaf tensors on the model's device, requires_grad) like add_peft draws
    it (adapters.draw_phi); the model is untouched."""
    drawn = draw_phi(model, generator)
    return OrderedDict((n, drawn[n].to(p.device, p.dtype).requires_grad_())
                       for n, p in peft_parameters(model).items())


# ----------------------------------------------------------------------------- drawing phi

def draw_phi(model, generator: torch.Generator | None = None) -> dict:
    """Newly drawn values of phi, {name: CPU float32 tensor}: every PEFT module's own init
    (`fresh`), then the head with BERT's init (weight ~ N(0, initializer_range), bias 0). The
    order of the draws is fixed, so a seed gives the same phi on every device and every body."""
    drawn = {}
    for prefix, module in model.named_modules():
        if isinstance(module, PeftModule):
            drawn.update({f"{prefix}.{k}": v for k, v in module.fresh(generator).items()})
    head = getattr(model, HEAD)
    drawn[f"{HEAD}.weight"] = _normal(head.weight.shape, model.config.initializer_range, generator)
    drawn[f"{HEAD}.bias"] = torch.zeros(head.bias.shape)
    return drawn


def _load_drawn(model, generator):
    """Copy a fresh draw into the model's own phi (add_peft's initial values)."""
    with torch.no_grad():
        for name, value in draw_phi(model, generator).items():
            model.get_parameter(name).copy_(value)

