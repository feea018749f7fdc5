"""Size ladders: model shapes spanning a range of parameter counts, and the hyperparameters each run gets.

Shapes (the aspect rule): d_model a multiple of 64, heads of 64 dims (n_heads = d_model / 64), and
n_layers such that the aspect ratio d_model / n_layers lies in [ASPECT_MIN, ASPECT_MAX] (Kaplan et al. 2020
found the loss flat across a wide band of aspect ratios; our named sizes sit at 64), at least one layer. The
rest of the shape follows the family's rules (presets.family). Counts are exact, from flops.py. Sweeps sized
for a CPU may take a finer grid (`d_model_step` and `head_dim` of 16 or 32: models of 3k-50k parameters,
which a 64-wide grid cannot reach).

Hyperparameters (stated rule, tested): DeepSeek LLM 2024's fits of the compute-optimal learning rate and
batch, eta_opt = 0.3118 · C^-0.125 and B_opt = 0.2920 · C^0.3271 tokens, with C the run's compute (FLOPs,
under the sweep's convention); the batch in sequences is B_opt / seq_len rounded, at least 1. Warmup is
5% of the run's steps (rounded down); every schedule ends at its own run's last step.
"""

from __future__ import annotations

import dataclasses
import math

from scalax.errors import ConfigError
from scalax.models import ModelConfig, flops, presets

ASPECT_MIN, ASPECT_MAX = 32, 128
MAX_D_MODEL = 8192
WARMUP_FRACTION = 0.05
PARAMS_KEYS = ("non_embedding", "total")


@dataclasses.dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    model: ModelConfig

    @property
    def name(self) -> str:
        return f"d{self.d_model}-l{self.n_layers}"

    def params(self, key: str) -> int:
        return flops.params_total(self.model) if key == "total" else flops.params_non_embedding(self.model)


def candidates(family: str, vocab_size: int, max_seq_len: int, max_params: float, params_key: str,
               position: str | None = None, d_model_step: int = 64, head_dim: int = 64) -> list[Shape]:
    """Every shape of the family under the aspect rule, up to max_params, sorted by parameter count
    (`position`: another positional scheme than the family's, which can change the counts; d_model runs over
    multiples of `d_model_step`, itself a multiple of `head_dim`)."""
    if d_model_step <= 0 or head_dim <= 0 or d_model_step % head_dim:
        raise ConfigError("sweep.d_model_step", f"must be a positive multiple of sweep.head_dim={head_dim}, got "
                          f"{d_model_step}")
    shapes = []
    for d_model in range(d_model_step, MAX_D_MODEL + 1, d_model_step):
        layers = range(max(1, math.ceil(d_model / ASPECT_MAX)), max(1, d_model // ASPECT_MIN) + 1)
        row = []
        for n in layers:
            fields = presets.family(family, d_model, n, vocab_size=vocab_size, max_seq_len=max_seq_len,
                                    head_dim=head_dim)
            row.append(Shape(d_model, n, ModelConfig.from_dict({**fields, "position": position or fields["position"]})))
        if row[0].params(params_key) > max_params:
            break  # the shallowest shape of this width is already too big, and wider ones are bigger still
        shapes += [s for s in row if s.params(params_key) <= max_params]
    return sorted(shapes, key=lambda s: (s.params(params_key), s.d_model))


def nearest_shapes(targets: list[float], shapes: list[Shape], params_key: str) -> list[Shape]:
    """For each target count (ascending), the shape nearest in log N not already taken."""
    taken: set[str] = set()
    out = []
    for target in targets:
        free = [s for s in shapes if s.name not in taken]
        if not free:
            break
        best = min(free, key=lambda s: abs(math.log(s.params(params_key) / target)))
        taken.add(best.name)
        out.append(best)
    return out


def learning_rate(compute: float) -> float:
    """DeepSeek LLM 2024: eta_opt = 0.3118 · C^-0.125."""
    return 0.3118 * compute**-0.125


def batch_tokens(compute: float) -> float:
    """DeepSeek LLM 2024: B_opt = 0.2920 · C^0.3271 tokens."""
    return 0.2920 * compute**0.3271


def batch_sequences(compute: float, seq_len: int, multiple: int = 1) -> int:
    """B_opt in sequences, rounded to a multiple of `multiple` (data x fsdp devices), at least one multiple."""
    return multiple * max(1, round(batch_tokens(compute) / seq_len / multiple))


def warmup_steps(steps: int) -> int:
    return int(WARMUP_FRACTION * steps)


def check_params_key(key: str) -> None:
    if key not in PARAMS_KEYS:
        raise ConfigError("sweep.params", f"unknown parameter count {key!r}; allowed: {', '.join(PARAMS_KEYS)}")
