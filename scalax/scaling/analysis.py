"""The analysis of a set of runs as every command reports it: `scalax sweep`, `scalax fit DIR`, `scalax fit --csv`
and `scalax plot` all call `analyse`, so the same runs give the same numbers whichever command asks.

Which compute C a run has: in an IsoFLOP sweep, its nominal budget. The runs of one budget differ in their
realised FLOPs by the rounding of their step counts (under 2%), and approach 2 must group them as they were
planned; grouped by realised FLOPs, runs of one budget fall apart and the parabolas are fitted to the wrong
points. The realised FLOPs stay in the ledger (`flops_<convention>`). Other sweep kinds, and a CSV without a
`flops` column, use the realised C (a CSV's `flops` column, or 6·N·D).

A fit that is not one says so: `check` puts a list of `warnings` on every approach whose numbers should not be
read as a result (a minimum at the edge of the sizes sampled, an exponent outside its plausible range, a point
estimate at or outside its own bootstrap interval, too few points for R² to mean anything), and sets `ok`
False there; the plots draw no fitted line for such an approach.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from scalax.errors import ConfigError
from scalax.io import atomic_write_text
from scalax.scaling import data_constrained
from scalax.scaling import fit as fit_lib
from scalax.scaling import sweep as sweep_lib
from scalax.scaling.results import (
    APPROACH_CHOICES,
    Approach1,
    Approach2,
    Approach3,
    Checked,
    Conventions,
    DataConstrainedLaw,
    FitResult,
    Kaplan,
    PowerLaw,
)

APPROACH_NAMES = {"approach1": "approach 1 (envelope)", "approach2": "approach 2 (IsoFLOP parabolas)",
                  "approach3": "approach 3 (parametric law)", "kaplan": "Kaplan power laws",
                  "data_constrained": "data-constrained law (Muennighoff et al.)"}
APPROACHES = APPROACH_CHOICES  # (results.py)
EXPONENT_RANGE = (0.0, 1.0)  # N_opt ∝ C^a, D_opt ∝ C^b: both grow with compute, a + b = 1 under C = 6 N D
LAW_EXPONENT_RANGE = (0.0, 2.0)  # alpha, beta of L(N, D): Hoffmann et al.'s starting grid spans [0, 2]
GRID_BIAS = 0.1  # approach 2's vertex may sit at most 10% from the optimum of approach 3's law on the same grid
FRONTIER_GAP = 0.03  # the law's best loss at a budget may sit at most 3% below the best run there
MIN_PARABOLA_POINTS = 4  # a parabola (3 coefficients) through 3 points fits exactly: R² = 1 says nothing
CSV_COLUMNS = ("name", "params", "tokens", "loss", "flops")


def runs_of_ledger(records: Sequence[dict], sweep: dict) -> fit_lib.Runs:
    """The finished runs of a sweep ledger as the fit sees them: N under `sweep.params`, C the nominal budget
    for an IsoFLOP sweep and the realised FLOPs under `sweep.flops` otherwise."""
    params_key, flops_key = conventions(sweep).params, conventions(sweep).flops
    return fit_lib.runs_from_records(records, params_key, "budget" if _isoflop(sweep) else flops_key)


def _isoflop(sweep: dict) -> bool:
    """An IsoFLOP grid: an isoflop sweep, or a wsd_branch sweep's branches of one."""
    return sweep_lib.grid_kind(sweep) == "isoflop"


def conventions(sweep: dict) -> Conventions:
    """The ledger keys of N and C under a sweep's conventions."""
    return Conventions(params=f"params_{sweep.get('params', 'non_embedding')}",
                       flops=f"flops_{sweep.get('flops', '6n')}", loss="eval nats/token",
                       grouping="nominal budget" if _isoflop(sweep) else "realised FLOPs")


def finished_names(records: Sequence[dict]) -> list[str]:
    """Names of the runs `runs_from_records` keeps, in its order (the CSV export's `name` column)."""
    return [r["name"] for r in records if fit_lib.is_point(r)]


def write_csv(path: str, runs: fit_lib.Runs, names: Sequence[str]) -> None:
    """The points a fit used, one per line, exactly (repr floats): `scalax fit --csv` of it gives the same fit
    (with a column unique_tokens when the runs carry theirs, and group when they are grouped)."""
    columns = [runs.params, runs.tokens, runs.loss, runs.flops]
    if runs.unique_tokens is not None:
        columns.append(runs.unique_tokens)
    lines = [",".join(CSV_COLUMNS + ("unique_tokens",) * (runs.unique_tokens is not None)
                      + ("group",) * (runs.groups is not None))]
    for i, name in enumerate(names):
        group = [str(runs.groups[i])] if runs.groups is not None else []
        lines.append(",".join([name] + [repr(float(column[i])) for column in columns] + group))
    atomic_write_text(path, "\n".join(lines) + "\n")


def analyse(runs: fit_lib.Runs, approach: str = "all", bootstrap: int = 0, level: float = 0.8, seed: int = 0,
            conventions_used: Conventions | None = None, drop_highest: int = 0) -> FitResult:
    """Fit every requested approach (with bootstrap intervals), predict the largest budget from the others,
    and check each approach; what `fit.json` holds."""
    if approach not in APPROACHES:
        raise ConfigError("--approach", f"unknown approach {approach!r}; allowed: {', '.join(APPROACHES)}")
    if bootstrap < 0:
        raise ConfigError("--bootstrap", f"must be >= 0 (0: no intervals), got {bootstrap}")
    if not 0 < level < 1:
        raise ConfigError("--level", f"must be in (0, 1), e.g. 0.8 for 80% intervals, got {level}")
    if not 0 <= drop_highest < max(len(runs) - 4, 1):
        raise ConfigError("--drop-highest", f"got {drop_highest}; allowed: 0 to {max(len(runs) - 5, 0)} "
                          f"(the fit needs 5 of the {len(runs)} runs)")
    runs = fit_lib.drop_outliers(runs, drop_highest)
    if len(np.unique(runs.params)) < 2:
        raise ConfigError("runs", f"all {len(runs)} runs have the same size N = {runs.params[0]:.6g}; a scaling law "
                          "needs runs of at least two sizes")
    if approach == "data_constrained":
        result = data_constrained.fit(runs, bootstrap=bootstrap, level=level, seed=seed)
    else:
        result = fit_lib.fit(runs, approach, bootstrap=bootstrap, level=level, seed=seed)
    if approach == "all":
        result.prediction = fit_lib.predict_largest_budget(runs)
    result.conventions = conventions_used or Conventions()
    result.settings.drop_highest = drop_highest
    check(result, runs)
    return result


# ---------------------------------------------------------------------- checks
def check(result: FitResult, runs: fit_lib.Runs) -> None:
    """Set `warnings` (a list of sentences) and `ok` on every approach of `result`, and all warnings, prefixed
    with the approach, in `result.warnings`."""
    groups = fit_lib.budgets(runs)
    checkers = {"approach1": _check_approach1, "approach2": _check_approach2, "approach3": _check_approach3,
                "kaplan": _check_kaplan, "data_constrained": _check_data_constrained}
    everything = []
    for name, approach in result.approaches().items():
        approach.warnings = checkers[name](approach, runs, groups) + _check_intervals(approach)
        if name == "approach2" and result.approach3 is not None:
            approach.warnings += _grid_bias(approach, result.approach3, runs, groups)
        approach.ok = not approach.warnings
        everything += [f"{APPROACH_NAMES[name]}: {w}" for w in approach.warnings]
    result.warnings = everything


def _edge(runs: fit_lib.Runs, g: np.ndarray, n: float) -> str | None:
    """'smallest' / 'largest' when size n is at that edge of budget group g's sizes (or beyond it)."""
    lo, hi = runs.params[g].min(), runs.params[g].max()
    if n <= lo * (1 + 1e-9):
        return "smallest"
    if n >= hi * (1 - 1e-9):
        return "largest"
    return None


def _exponent_warnings(law: PowerLaw | None, what: str, points: int) -> list[str]:
    if law is None:
        return []
    out = []
    lo, hi = EXPONENT_RANGE
    if not lo < law.exponent < hi:
        out.append(f"{what} ∝ C^{law.exponent:.3f}: outside ({lo:g}, {hi:g}), where both N and D grow with "
                   "compute")
    if points < 3:
        out.append(f"{what}'s exponent is a line through {points} points: its R² and interval say nothing")
    return out


def _check_approach1(a1: Approach1, runs: fit_lib.Runs, groups: list[np.ndarray]) -> list[str]:
    out = []
    for g in groups:
        best = g[np.argmin(runs.loss[g])]
        edge = _edge(runs, g, runs.params[best])
        if edge and len(np.unique(runs.params[g])) > 1:
            out.append(f"the best run of C = {runs.flops[g].mean():.3g} is the {edge} size sampled there: the "
                       "optimum lies outside the grid")
    out += _exponent_warnings(a1.a, "N_opt", len(groups))
    return out


def _check_approach2(a2: Approach2, runs: fit_lib.Runs, groups: list[np.ndarray]) -> list[str]:
    out = [f"C = {d.flops:.3g} dropped: {d.reason}" for d in a2.dropped]
    for b in a2.budgets:
        if b.points < MIN_PARABOLA_POINTS:
            out.append(f"C = {b.flops:.3g}: a parabola through {b.points} sizes fits them exactly; its R² "
                       f"says nothing (at least {MIN_PARABOLA_POINTS} sizes per budget)")
    if len(a2.budgets) < 2:
        out.append(f"{len(a2.budgets)} budget(s) with an interior minimum: no exponent")
    out += _exponent_warnings(a2.a, "N*", len(a2.budgets))
    return out


def _repeats(runs: fit_lib.Runs) -> list[str]:
    """A warning when runs saw their tokens more than once (a law of unique tokens then reads them wrongly)."""
    if runs.unique_tokens is None:
        return []
    epochs = runs.tokens / runs.unique_tokens
    repeated = int(np.sum(epochs > data_constrained.ONE_EPOCH))
    if not repeated:
        return []
    return [f"{repeated} of {len(runs)} runs repeat their data (up to {epochs.max():.3g} epochs): this law assumes "
            "each token seen once; fit them with --approach data_constrained"]


def _law_exponents(p) -> list[str]:
    """A law's alpha and beta outside their plausible range."""
    lo, hi = LAW_EXPONENT_RANGE
    return [f"{key} = {getattr(p, key):.4g}: outside ({lo:g}, {hi:g}); the fit ran off" for key in ("alpha", "beta")
            if not lo < getattr(p, key) < hi]


def _check_data_constrained(p: DataConstrainedLaw, runs: fit_lib.Runs, groups: list[np.ndarray]) -> list[str]:
    out = _law_exponents(p)
    if p.R_D_star is None:
        out.append("no run repeats its data: R_D* (the decay of repeated tokens) is not determined")
    if p.R_N_star is None:
        out.append("no run is larger than U_N, the size compute-optimal for its unique tokens: R_N* (the decay of "
                   "excess parameters) is not determined")
    bounds = [math.exp(b) for b in data_constrained.LOG_R_BOUNDS]
    for key in ("R_D_star", "R_N_star"):
        value = getattr(p, key)
        if value is not None and not bounds[0] * 1.01 < value < bounds[1] / 1.01:
            out.append(f"{key} = {value:.4g} sits at the bound of its search [{bounds[0]:g}, {bounds[1]:g}]")
    return out


def _grid_bias(a2: Approach2, p: Approach3, runs: fit_lib.Runs, groups: list[np.ndarray]) -> list[str]:
    """Approach 2's grid bias as approach 3's law sees it: the law's own losses at each kept budget's sizes (on its
    IsoFLOP curve N·D = const), fitted by the same parabola, put the vertex where relative to the law's optimum?
    A wide grid, an off-centre one and alpha far from beta (an asymmetric valley) all move it."""
    if not p.has_frontier() or _check_law(p, runs, groups):
        return []
    kept = {round(b.flops, 6) for b in a2.budgets}
    out = []
    for g in groups:
        n = runs.params[g]
        if round(float(runs.flops[g].mean()), 6) not in kept or len(np.unique(n)) < 3:
            continue
        nd = float(np.exp(np.mean(np.log(n * runs.tokens[g]))))
        x = np.log(n)
        k2, k1, _ = np.polyfit(x - x.mean(), p.loss(n, nd / n), 2)
        if k2 <= 0:
            continue
        bias = math.exp(x.mean() - k1 / (2 * k2)) / float(p.frontier(6 * nd)[0]) - 1
        if abs(bias) > GRID_BIAS:
            out.append(f"C = {runs.flops[g].mean():.3g}: on these sizes a parabola through approach 3's law (alpha "
                       f"{p.alpha:.2f}, beta {p.beta:.2f}) puts N* {abs(bias):.0%} "
                       f"{'below' if bias < 0 else 'above'} the law's optimum: the grid biases the vertex (too wide, "
                       "off-centre, or alpha far from beta); centre a narrower grid on N*")
    return out


def _check_approach3(p: Approach3, runs: fit_lib.Runs, groups: list[np.ndarray]) -> list[str]:
    return _repeats(runs) + _check_law(p, runs, groups)


def _check_law(p: Approach3, runs: fit_lib.Runs, groups: list[np.ndarray]) -> list[str]:
    out = _law_exponents(p)
    if p.E > runs.loss.min():
        out.append(f"E = {p.E:.4g} is above the lowest loss measured ({runs.loss.min():.4g}): an irreducible loss "
                   "cannot exceed a measured one")
    if out or not p.has_frontier():
        return out or ["no compute-optimal frontier (a non-positive exponent or coefficient)"]
    for g in groups:
        c = float(runs.flops[g].mean())
        n_opt, d_opt = p.frontier(c)
        edge = _edge(runs, g, float(n_opt))
        best, frontier_loss = float(runs.loss[g].min()), float(p.loss(n_opt, d_opt))
        if edge and len(np.unique(runs.params[g])) > 1:
            out.append(f"the law's optimum at C = {c:.3g} (N = {float(n_opt):.3g}) lies at or beyond the {edge} size "
                       "sampled there: extrapolated, not measured")
        elif (best - frontier_loss) / best > FRONTIER_GAP:
            out.append(f"at C = {c:.3g} the law's best loss {frontier_loss:.4g} sits "
                       f"{(best - frontier_loss) / best:.1%} below the best run ({best:.4g}): the law does not "
                       "describe these runs")
    return out


def _check_kaplan(k: Kaplan, runs: fit_lib.Runs, groups: list[np.ndarray]) -> list[str]:
    out = []
    for name, law, key, points, what in (("L_N", k.L_N, "alpha_N", len(np.unique(runs.params)), "size"),
                                         ("L_C", k.L_C, "alpha_C", len(groups), "budget")):
        if law is None:
            continue
        if not getattr(law, key) > 0:
            why = (" (in an IsoFLOP grid a size's best loss is not its converged loss: fit L(N) to runs trained to "
                   "convergence)" if name == "L_N" else "")
            out.append(f"{key} = {getattr(law, key):.4g}: the best loss per {what} does not fall with scale{why}")
        if points < 3:
            out.append(f"{name} is a line through {points} points: its R² says nothing")
    return out


def estimate(approach: Checked, key: str) -> float | None:
    """The point estimate that the interval `approach.ci.get(key)` is about (a law's exponent for a, b of
    approaches 1 and 2)."""
    value = getattr(approach, key, None)
    if isinstance(value, PowerLaw):
        value = value.exponent
    return value if isinstance(value, (int, float)) else None


def _check_intervals(approach: Checked) -> list[str]:
    out = []
    for key, ci in (approach.ci.of.items() if approach.ci else ()):
        value = estimate(approach, key)
        if value is None:
            continue
        tol = 1e-9 * (1 + abs(value))
        if ci.high - ci.low <= tol:  # a zero-width interval (noise-free data): nothing to compare
            continue
        if value < ci.low - tol or value > ci.high + tol:
            out.append(f"{key} = {value:.4g} lies outside its own {ci.n}-resample interval "
                       f"[{ci.low:.4g}, {ci.high:.4g}]: the estimate is not stable")
        elif value <= ci.low + tol or value >= ci.high - tol:
            out.append(f"{key} = {value:.4g} lies at the edge of its own interval [{ci.low:.4g}, "
                       f"{ci.high:.4g}]: the resamples fall on one side of it; the estimate is not stable")
    return out
