"""Which PEFT method to inject and its sizes (adapters.add_peft), and the command-line flags
that priming and fine-tuning share to choose it.

    config = PeftConfig("adapter", placement="pfeiffer")       # or from the flags:
    add_peft_flags(parser); config = peft_config_from_flags(args, "adapter")

Every bad value is a ValueError that names the command-line flag.
"""

from dataclasses import asdict, dataclass, fields

METHODS = ("adapter", "prefix", "lora")  # the registry: the stages take their --peft choices from it
PLACEMENTS = ("houlsby", "pfeiffer")
NON_LINEARITY_NAMES = ("swish", "relu", "gelu")
DEFAULT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}  # AdapterHub's DoubleSeqBn / SeqBn defaults
ADAPTER_INITS = ("near-identity", "bert")


@dataclass
class PeftConfig:
    """Which PEFT method to inject and its sizes."""

    method: str                      # "adapter" | "prefix" | "lora"
    placement: str = "houlsby"       # adapter: "houlsby" (attention + FFN) | "pfeiffer" (FFN only)
    adapter_non_linearity: str | None = None  # None: the placement's AdapterHub default (DEFAULT_NON_LINEARITY)
    adapter_init: str = "near-identity"       # or "bert" (AdapterHub's default)
    bottleneck: int | None = None    # adapter width; None -> hidden_size // reduction_factor
    reduction_factor: int = 16
    prefix_length: int = 16
    prefix_mlp: bool = True          # reparameterisation MLP (Li & Liang 2021)
    prefix_hidden: int = 128         # MLP hidden width
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"PeftConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"PeftConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.adapter_non_linearity is None:
            self.adapter_non_linearity = DEFAULT_NON_LINEARITY[self.placement]
        if self.adapter_non_linearity not in NON_LINEARITY_NAMES:
            raise ValueError(f"--adapter-non-linearity must be one of {', '.join(NON_LINEARITY_NAMES)}, "
                             f"got {self.adapter_non_linearity!r}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"--adapter-init must be one of {', '.join(ADAPTER_INITS)}, got {self.adapter_init!r}")
        for flag, value in [("reduction_factor", self.reduction_factor), ("prefix_length", self.prefix_length),
                            ("lora_rank", self.lora_rank), ("bottleneck", self.bottleneck or 1)]:
            if value < 1:  # the error names the command-line flag
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "PeftConfig":
        """Inverse of to_dict; missing fields take their defaults, unknown ones are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"PeftConfig.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)

    def bottleneck_for(self, hidden_size: int) -> int:
        """Adapter width for a model of this hidden size."""
        return self.bottleneck or max(1, hidden_size // self.reduction_factor)


def add_peft_flags(parser):
    """The PEFT-shape flags that priming and fine-tuning share (same names, same meaning)."""
    parser.add_argument("--adapter-placement", choices=PLACEMENTS, default="houlsby",
                        help="houlsby: after attention and FFN (AdapterHub DoubleSeqBn); pfeiffer: FFN only, on its "
                             "LayerNorm-ed output (AdapterHub SeqBn)")
    parser.add_argument("--adapter-non-linearity", choices=NON_LINEARITY_NAMES, default=None,
                        help="adapter activation (default: AdapterHub's, swish for houlsby, relu for pfeiffer)")
    parser.add_argument("--adapter-init", choices=ADAPTER_INITS, default="near-identity",
                        help="near-identity: Houlsby et al.'s W_up ~ N(0, 1e-3); bert: AdapterHub's N(0, 0.02)")
    parser.add_argument("--reduction-factor", type=int, default=16, help="adapter width = hidden / this")
    parser.add_argument("--prefix-length", type=int, default=16, help="prefix tokens per layer")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")


def check_fits(config, model_config):
    """A LoRA rank above the layer width adds no expressiveness (B A is already full rank at the width)
    and only memory: --lora-rank 100000 ran out of memory inside the model. One line naming the flag."""
    width = getattr(model_config, "hidden_size", None)
    if config is not None and config.method == "lora" and width is not None and config.lora_rank > width:
        raise ValueError(f"--lora-rank {config.lora_rank} exceeds the layer width of the model ({width}): give "
                         f"--lora-rank {width} or less (LoRA is low-rank by design: 8 is the default)")


def peft_config_from_flags(args, method):
    """The PeftConfig of add_peft_flags' flags (checked: each bad value names its flag)."""
    return PeftConfig(method=method, placement=args.adapter_placement, adapter_non_linearity=args.adapter_non_linearity,
                      adapter_init=args.adapter_init, reduction_factor=args.reduction_factor,
                      prefix_length=args.prefix_length, lora_rank=args.lora_rank)
