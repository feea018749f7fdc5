"""ModelConfig: the frozen, validated description of one decoder.

Behaviour is chosen by feature keys (`norm`, `mlp`, `position`, `n_kv_heads`, `tie_embeddings`, ...),
never by a model's name: a family (GPT, LLaMA) is a preset of these keys, a size is a preset of shapes.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from scalax.errors import ConfigError
from scalax.models import positions

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "swiglu", "geglu", "relu")
POSITIONS = tuple(positions.SCHEMES)  # the registry in models/positions.py
DTYPES = ("float32", "bfloat16", "float16")
# Each remat name maps to one jax checkpoint policy (see decoder.REMAT_POLICIES).
REMATS = ("none", "full", "dots", "dots_no_batch")
# How attention is computed (models/attention.py); `auto` picks per device.
ATTENTIONS = ("auto", "einsum", "dot_product", "chunked", "splash")
# How initialisation, learning rates and multipliers scale with width (models/mup.py).
PARAMETERIZATIONS = ("sp", "mup")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and feature keys of a decoder-only language model.

    Shapes: `vocab_size` V, `d_model` D, `n_layers` L, `n_heads` H, `n_kv_heads` (H for MHA, 1 for MQA,
    a divisor of H for GQA), `head_dim` K (0 means D // H), `d_ff` F, `max_seq_len` (context; the size of
    the learned position table, and the default cache length).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = 0  # 0 means n_heads (multi-head attention)
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 0  # 0 means 4 * d_model
    max_seq_len: int = 1024

    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    mlp: str = "gelu"
    use_bias: bool = True  # biases on every projection (GPT); LLaMA has none
    qk_norm: bool = False  # normalise queries and keys per head before the dot product

    position: str = "learned"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # fraction of head_dim that is rotated (GPT-NeoX uses 0.25)
    # Context extension (models/positions.py ROPE_SCALINGS): none, linear, ntk, yarn, llama3; `factor` s and the
    # original context stretched s times; llama3's frequency bands; YaRN's ramp (beta_fast, beta_slow rotations)
    # and attention factor (0: 0.1 ln s + 1).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_original_context: int = 8192
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 0.0
    t5_num_buckets: int = 32
    t5_max_distance: int = 128

    tie_embeddings: bool = True
    parallel_block: bool = False  # attention and MLP side by side on one normalised input (GPT-J, PaLM)
    share_layers: bool = False  # one block's weights used by every layer

    init_std: float = 0.02  # normal init of every kernel and embedding; output projections / sqrt(2 L) (sp)
    # sp: the standard parameterization; mup: muP (models/mup.py) relative to a model of width mup_base_width
    parameterization: str = "sp"
    mup_base_width: int = 0
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"
    scan_layers: bool = True
    # layers per step of the scanned loop (nn.scan's unroll); 0: auto, all of them (straight-line code: faster
    # on CPU, no stacked residual buffers to fill) up to decoder.STRAIGHT_LINE_LAYERS layers, else one, so that
    # compile time stays flat in depth (docs/benchmarks.md)
    scan_unroll: int = 0
    remat: str = "none"
    attention: str = "auto"  # auto | einsum | dot_product | chunked | splash (models/attention.py)
    attention_block: int = 512  # chunked and splash: queries and keys per block

    def __post_init__(self):
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim == 0 and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError (one line, naming the key and what is allowed) on the first bad value."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be a positive integer, got {getattr(self, name)}")
        if self.head_dim == 0:
            raise ConfigError(
                "model.d_model",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads dividing d_model or set model.head_dim explicitly",
            )
        if self.head_dim < 0:
            raise ConfigError("model.head_dim", f"must be positive (or 0 for d_model // n_heads), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "model.n_kv_heads",
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "allowed: a divisor of n_heads (n_heads for MHA, 1 for MQA)",
            )
        for name, allowed in (
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
            ("mlp", MLPS),
            ("position", POSITIONS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("remat", REMATS),
            ("attention", ATTENTIONS),
            ("parameterization", PARAMETERIZATIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"model.{name}", f"unknown value {value!r}; allowed: {', '.join(allowed)}")
        if self.norm_eps <= 0:
            raise ConfigError("model.norm_eps", f"must be positive, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ConfigError("model.init_std", f"must be positive, got {self.init_std}")
        if self.parameterization == "mup" and self.mup_base_width <= 0:
            raise ConfigError("model.mup_base_width", f"muP needs the width its hyperparameters were tuned at (a "
                              f"positive d_model), got {self.mup_base_width}")
        positions.scheme_of(self).validate(self)  # its keys (RoPE's rotation and scaling, T5's buckets)
        if self.attention_block <= 0:
            raise ConfigError("model.attention_block", f"must be a positive integer, got {self.attention_block}")
        if self.scan_unroll < 0:
            raise ConfigError("model.scan_unroll",
                              f"must be a positive integer (or 0 for auto), got {self.scan_unroll}")
        if self.attention == "splash" and positions.scheme_of(self).has_bias:
            raise ConfigError("model.attention", f"splash adds no attention bias, which position={self.position!r} "
                              "needs; allowed with it: auto, einsum, dot_product, chunked")
        if self.parallel_block and self.norm_position == "post":
            raise ConfigError("model.parallel_block", "is only defined with norm_position='pre'")

    # ------------------------------------------------------------------ derived shapes
    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones, as in GPT-NeoX)."""
        return int(self.head_dim * self.rope_fraction)

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def width_multiplier(self) -> float:
        """m = d_model / mup_base_width under muP; 1 under sp."""
        return self.d_model / self.mup_base_width if self.parameterization == "mup" else 1.0

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. a config's `model` section); unknown keys are refused by name."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"model.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(fields))}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
        if missing:
            raise ConfigError(f"model.{missing[0]}", "is required")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            kwargs[name] = _coerce(name, value, hints[name])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Check a value's type (ints may stand for floats); bool is not accepted for int."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"model.{name}", f"must be of type {kind.__name__}, got {value!r}")
    return value
