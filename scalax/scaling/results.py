"""What a fit returns, typed: scaling/fit.py builds it, scaling/analysis.py checks it, report.py, plots.py,
runner.py and the CLI read it; `jsonable` turns it into fit.json's object.

fit.json keeps the keys of these fields (an `Intervals` flattens to {"level", "<parameter>": {low, high, se, n}};
a `Law` also writes its frontier exponents `a` and `b`); a field that does not apply (None) is left out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass
class Interval:
    """A percentile bootstrap interval [low, high] of one parameter, its standard error over n resamples."""

    low: float
    high: float
    se: float
    n: int


@dataclasses.dataclass
class Intervals:
    """Bootstrap intervals at `level` (e.g. 0.8), by parameter name ("alpha", "a", ...)."""

    level: float
    of: dict[str, Interval]

    def get(self, key: str) -> Interval | None:
        return self.of.get(key)


@dataclasses.dataclass(kw_only=True)
class Checked:
    """What every approach carries: its bootstrap intervals, and analysis.check's verdict."""

    ci: Intervals | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    ok: bool = True

    def interval(self, key: str) -> Interval | None:
        return self.ci.get(key) if self.ci else None


@dataclasses.dataclass
class PowerLaw:
    """y = coefficient · x^exponent, fitted by least squares in log-log; r2 is R² there (NaN if undefined)."""

    exponent: float
    coefficient: float
    r2: float


# ---------------------------------------------------------------------- approach 1
@dataclasses.dataclass
class Envelope:
    """The run of lowest loss per compute budget, smallest budget first."""

    flops: list[float]
    params: list[float]
    tokens: list[float]
    loss: list[float]


@dataclasses.dataclass
class Approach1(Checked):
    """N_opt ∝ C^a.exponent and D_opt ∝ C^b.exponent over the envelope."""

    a: PowerLaw
    b: PowerLaw
    envelope: Envelope


# ---------------------------------------------------------------------- approach 2
@dataclasses.dataclass
class Parabola:
    """One budget's parabola L = k2 (log N)² + k1 log N + k0 (`coefficients` = [k2, k1, k0]) and its vertex."""

    flops: float
    n_star: float
    d_star: float
    points: int
    loss_star: float
    r2: float
    coefficients: list[float]


@dataclasses.dataclass
class DroppedBudget:
    """A budget without a usable vertex, and why."""

    flops: float
    reason: str
    r2: float | None = None
    n_star: float | None = None


@dataclasses.dataclass
class Approach2(Checked):
    """The parabolas' vertices; N* ∝ C^a.exponent, D* ∝ C^b.exponent when two or more budgets are kept."""

    budgets: list[Parabola]
    dropped: list[DroppedBudget]
    a: PowerLaw | None = None
    b: PowerLaw | None = None


# ---------------------------------------------------------------------- approach 3
@dataclasses.dataclass
class Law:
    """L(N, D) = E + A/N^alpha + B/D^beta (nats/token; N parameters, D tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @property
    def a(self) -> float:
        """N_opt ∝ C^a on the compute-optimal frontier."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b on the compute-optimal frontier."""
        return self.alpha / (self.alpha + self.beta)

    def loss(self, params, tokens) -> np.ndarray:
        return self.E + self.A / np.asarray(params, np.float64) ** self.alpha + self.B / np.asarray(
            tokens, np.float64) ** self.beta

    def has_frontier(self) -> bool:
        """A compute-optimal frontier exists only when both terms fall with scale (alpha, beta, A, B > 0)."""
        return self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0

    def frontier(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """Closed-form compute-optimal N_opt(C), D_opt(C) under C = 6 N D (NaN when no frontier exists)."""
        if not self.has_frontier():
            nan = np.full(np.shape(flops), np.nan)
            return nan, nan
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        c6 = np.asarray(flops, np.float64) / 6
        return g * c6**self.a, c6**self.b / g


@dataclasses.dataclass
class VPNLSLaw(Law):
    """The law by variable projection: `sse` its summed squared relative residuals, `objective` its Huber loss."""

    sse: float
    objective: float


@dataclasses.dataclass
class Approach3(Law, Checked):
    """The law as Hoffmann et al. fit it; `objective` the Huber loss it reached, `vpnls` the cross-check."""

    objective: float
    vpnls: VPNLSLaw | None = None


@dataclasses.dataclass
class DataConstrainedLaw(Law, Checked):
    """Muennighoff et al.'s law (scaling/data_constrained.py): the Chinchilla terms with effective data D' and
    parameters N'; R_D_star / R_N_star None where the runs do not pin them down (infinite: no decay)."""

    R_D_star: float | None
    R_N_star: float | None
    objective: float
    single_epoch_runs: int
    repeated_runs: int

    def unique_params(self, unique_tokens) -> np.ndarray:
        """N_opt(U_D): the parameters compute-optimal for U_D tokens, on this law's frontier (U_D: the unique
        tokens a run saw, min(D, the split's))."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (g * np.asarray(unique_tokens, np.float64)) ** (self.beta / self.alpha)

    @staticmethod
    def _effective(x, base, r_star: float | None) -> np.ndarray:
        x, base = np.asarray(x, np.float64), np.asarray(base, np.float64)
        if r_star is None:
            return x
        return base + base * r_star * (1 - np.exp(-np.maximum(x / base - 1, 0) / r_star))

    def effective_tokens(self, tokens, unique_tokens) -> np.ndarray:
        """D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*)), R_D = D / U_D - 1 (U_D: the unique tokens seen)."""
        return self._effective(tokens, unique_tokens, self.R_D_star)

    def effective_params(self, params, unique_tokens) -> np.ndarray:
        """N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)), U_N = min(N_opt(U_D), N), R_N = N / U_N - 1."""
        base = np.minimum(self.unique_params(unique_tokens), params)
        return self._effective(params, base, self.R_N_star)

    def loss_repeated(self, params, tokens, split_tokens) -> np.ndarray:
        """L(N, D, U_D) in nats/token for runs of D tokens drawn from a training split of `split_tokens` unique
        tokens (U_D = min(D, split_tokens))."""
        unique = np.minimum(np.asarray(split_tokens, np.float64), tokens)
        return self.loss(self.effective_params(params, unique), self.effective_tokens(tokens, unique))


# ---------------------------------------------------------------------- Kaplan
@dataclasses.dataclass
class SizeLaw:
    """L(N) = (N_c / N)^alpha_N."""

    alpha_N: float
    N_c: float
    r2: float


@dataclasses.dataclass
class ComputeLaw:
    """L(C) = (C_c / C)^alpha_C."""

    alpha_C: float
    C_c: float
    r2: float


@dataclasses.dataclass
class Kaplan(Checked):
    """Kaplan et al.'s power laws: over each size's best loss (needs 2 sizes), over the envelope (2 budgets)."""

    L_N: SizeLaw | None = None
    L_C: ComputeLaw | None = None


# ---------------------------------------------------------------------- the whole analysis
@dataclasses.dataclass
class Prediction:
    """Approach 3 fitted on all budgets but the largest, against the best run at the largest."""

    flops: float
    predicted_best_loss: float
    observed_best_loss: float
    error: float
    relative_error: float
    n_opt: float
    fitted_on_budgets: int


@dataclasses.dataclass
class NoPrediction:
    """Why the held-out prediction was not made."""

    reason: str
    fitted_on_budgets: int


@dataclasses.dataclass
class Conventions:
    """Which N and C the runs carry (ledger keys or CSV columns), the loss's unit, how budgets are grouped."""

    params: str = "params"
    flops: str = "flops"
    loss: str = "loss"
    grouping: str = "the flops column"


@dataclasses.dataclass
class Settings:
    approach: str = "all"
    bootstrap: int = 0
    level: float = 0.8
    seed: int = 0
    drop_highest: int = 0
    resampled: str = "runs"  # what the bootstrap draws: runs, or whole groups (a wsd_branch sweep's trunks)


APPROACHES = ("approach1", "approach2", "approach3", "kaplan", "data_constrained")
# `scalax fit --approach` (analysis.analyse): 1, 2, 3, all (1, 2, 3 and Kaplan's: they assume unique tokens) and
# data_constrained; here, not in analysis.py, so that the CLI's parser does not import scipy.
APPROACH_CHOICES = ("1", "2", "3", "all", "data_constrained")


@dataclasses.dataclass
class FitResult:
    """Every requested approach (None: not requested), the prediction, and the analysis's settings."""

    n_runs: int
    settings: Settings
    conventions: Conventions = dataclasses.field(default_factory=Conventions)
    approach1: Approach1 | None = None
    approach2: Approach2 | None = None
    approach3: Approach3 | None = None
    kaplan: Kaplan | None = None
    data_constrained: DataConstrainedLaw | None = None
    prediction: Prediction | NoPrediction | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    def approaches(self) -> dict[str, Checked]:
        """The approaches fitted, by name, in APPROACHES' order."""
        return {name: a for name in APPROACHES if (a := getattr(self, name)) is not None}


def jsonable(x: Any) -> Any:
    """fit.json's object of a result (or any part of one): dataclasses as dicts without their None fields,
    non-finite floats as null, numpy scalars as Python numbers."""
    if isinstance(x, Intervals):
        return {"level": x.level, **{k: jsonable(v) for k, v in x.of.items()}}
    if dataclasses.is_dataclass(x):
        out = {f.name: jsonable(v) for f in dataclasses.fields(x) if (v := getattr(x, f.name)) is not None}
        if isinstance(x, Law):
            out.update(a=jsonable(x.a), b=jsonable(x.b))
        return out
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
