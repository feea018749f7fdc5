"""Scaling-law fits: Chinchilla approaches 1-3 (Hoffmann et al. 2022), Kaplan-style power laws, bootstrap CIs.

Inputs are runs: parameters N, tokens D, final loss L, and compute C (6·N·D unless given). Which N and which
FLOPs convention a sweep used is recorded beside the fit (`fit.json`).

- Approach 1: the envelope of minimal loss per compute budget: the runs
  on it give N_opt ∝ C^a and D_opt ∝ C^b by least squares in log-log.
- Approach 2: per budget, a parabola of L in log N; its vertex N*, D* = C / (6 N*); power laws in C. A budget
  whose vertex falls outside its sampled sizes (or whose parabola opens downwards) is reported and dropped.
- Approach 3: L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. fit it: the Huber loss (delta 1e-3) of
  log L against LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, summed over runs,
  minimised by L-BFGS from each of their 4500 starts (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
  a, b in {0, 5, ..., 25}); the best is kept. The compute-optimal frontier is closed form:
  N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta),
  b = alpha/(alpha+beta).
- Approach 3 by VPNLS (a cross-check, `approach3.vpnls`): variable projection with non-negative least squares:
  for fixed (alpha, beta) the law is linear in E, A, B >= 0, solved exactly by NNLS, so only a 2-D search over
  the exponents remains (a grid over [0.05, 2], then Nelder-Mead from its best point). It minimises squared
  relative residuals of L (those of log L to first order), not the Huber loss of log L; its Huber objective
  is reported beside the L-BFGS one, so a lower value there means the L-BFGS search missed the optimum.
- Kaplan: L(N) = (N_c/N)^alpha_N over the best loss of each size, L(C) = (C_c/C)^alpha_C over the envelope.
- Bootstrap: resample runs with replacement, refit (approach 3 from the full-data optimum), percentile
  intervals and standard errors of every parameter.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from scalax import io
from scalax.errors import ConfigError
from scalax.scaling.results import (
    Approach1,
    Approach2,
    Approach3,
    ComputeLaw,
    DroppedBudget,
    Envelope,
    FitResult,
    Interval,
    Intervals,
    Kaplan,
    Law,
    NoPrediction,
    Parabola,
    PowerLaw,
    Prediction,
    Settings,
    SizeLaw,
    VPNLSLaw,
)

HUBER_DELTA = 1e-3
GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
APPROACHES = ("1", "2", "3", "all")


@dataclasses.dataclass(frozen=True)
class Runs:
    """Arrays of equal length: params N, tokens D, loss L, flops C, and (when known) the unique training tokens
    U_D each run drew its D from (D / U_D epochs) and each run's group: runs that share their noise (the
    branches of one wsd_branch trunk) have one label, and the bootstrap resamples whole groups."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    unique_tokens: np.ndarray | None = None
    groups: np.ndarray | None = None  # labels (str)

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, idx) -> Runs:
        return Runs(self.params[idx], self.tokens[idx], self.loss[idx], self.flops[idx],
                    None if self.unique_tokens is None else self.unique_tokens[idx],
                    None if self.groups is None else self.groups[idx])

    @classmethod
    def of(cls, params, tokens, loss, flops=None, unique_tokens=None, groups=None) -> Runs:
        params, tokens, loss = (np.asarray(x, np.float64) for x in (params, tokens, loss))
        flops = 6 * params * tokens if flops is None else np.asarray(flops, np.float64)
        return cls(params, tokens, loss, flops, None if unique_tokens is None else np.asarray(unique_tokens,
                                                                                               np.float64),
                   None if groups is None else np.asarray(groups, str))

    def resampled(self) -> str:
        """What `resample` draws, in words."""
        return "runs" if self.groups is None else f"groups of runs ({len(set(self.groups))} trunks)"

    def resample(self, rng: np.random.Generator) -> np.ndarray:
        """Indices of one bootstrap resample: as many runs, drawn with replacement; with groups, as many
        groups, each drawn whole."""
        if self.groups is None:
            return rng.integers(0, len(self), len(self))
        _, group_of = np.unique(self.groups, return_inverse=True)
        members = [np.flatnonzero(group_of == g) for g in range(group_of.max() + 1)]
        return np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def read_csv(path: str) -> Runs:
    """Runs from a CSV with columns params, tokens, loss (and optionally flops, unique_tokens, and group: runs
    that share their noise, resampled together)."""
    io.check_input(path, "--csv")
    if not io.isfile(path):
        raise ConfigError("--csv", f"no such file: {path}")
    rows = list(csv.DictReader(io.read_text(path).splitlines()))
    columns = set(rows[0]) if rows else set()
    missing = [c for c in ("params", "tokens", "loss") if c not in columns]
    if missing:
        raise ConfigError("--csv", f"{path} lacks the column(s) {', '.join(missing)}; needed: params, tokens, loss "
                          "(optional: flops, unique_tokens)")
    names = ["params", "tokens", "loss"] + [c for c in ("flops", "unique_tokens") if c in columns]
    values = {n: [] for n in names}
    for line_no, row in enumerate(rows, 2):
        for n in names:
            try:
                v = float(row[n])
            except (TypeError, ValueError):
                raise ConfigError("--csv", f"{path}:{line_no}: {n} = {row[n]!r} is not a number") from None
            if not (math.isfinite(v) and v > 0):
                raise ConfigError("--csv", f"{path}:{line_no}: {n} = {row[n]!r} must be a positive number")
            values[n].append(v)
    return Runs.of(values["params"], values["tokens"], values["loss"], values.get("flops"),
                   values.get("unique_tokens"), [row["group"] for row in rows] if "group" in columns else None)


def drop_outliers(runs: Runs, drop_highest: int = 0) -> Runs:
    """Drop non-finite losses and the `drop_highest` highest losses (ties at the cut dropped too)."""
    keep = np.isfinite(runs.loss)
    if drop_highest > 0:
        cut = np.sort(runs.loss[keep])[-drop_highest]
        keep &= runs.loss < cut
    return runs.take(np.flatnonzero(keep))


# ---------------------------------------------------------------------- approach 3
def huber_loss(r: np.ndarray) -> np.ndarray:
    """Hoffmann et al.'s Huber loss (delta HUBER_DELTA) of residuals r, elementwise."""
    abs_r = np.abs(r)
    return np.where(abs_r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (abs_r - 0.5 * HUBER_DELTA))


def percentile_intervals(samples: dict[str, list[float]], level: float) -> dict[str, Interval]:
    """Percentile intervals at `level` (and standard errors) of every parameter with two or more resampled values."""
    lo, hi = (1 - level) / 2, (1 + level) / 2
    with np.errstate(over="ignore"):  # (spreads of huge resampled coefficients may overflow)
        return {k: Interval(low=float(np.quantile(v, lo)), high=float(np.quantile(v, hi)),
                            se=float(np.std(v, ddof=1)), n=len(v)) for k, v in samples.items() if len(v) > 1}


def _objective(theta_Sx5: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               weights_SxR: np.ndarray | None = None):
    """Summed Huber loss and its gradient, for S parameter vectors (a, b, e, alpha, beta) at once; with
    `weights_SxR`, problem s weighs run r by weights[s, r] (a bootstrap resample's counts)."""
    a, b, e, alpha, beta = (theta_Sx5[:, i : i + 1] for i in range(5))
    t1, t2, t3 = a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(a), len(log_n)))
    m = np.maximum(np.maximum(t1, t2), t3)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    z = w1 + w2 + w3
    r = m + np.log(z) - log_l
    huber = huber_loss(r)
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    if weights_SxR is not None:
        huber, dr = huber * weights_SxR, dr * weights_SxR
    g1, g2, g3 = dr * w1 / z, dr * w2 / z, dr * w3 / z
    grad = np.stack([g1.sum(1), g2.sum(1), g3.sum(1), -(g1 * log_n).sum(1), -(g2 * log_d).sum(1)], axis=1)
    return huber.sum(1), grad


def _lbfgs(theta0: np.ndarray, data) -> tuple[np.ndarray, float]:
    def fun(theta):
        f, g = _objective(theta[None], *data)
        return f[0], g[0]

    res = optimize.minimize(fun, theta0, jac=True, method="L-BFGS-B",
                            options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15})
    return res.x, float(res.fun)


def _backtrack(objective, x_Sx5, f_S, g_Sx5, d_Sx5, slope_S, rows, halvings: int = 30):
    """Armijo backtracking along d from x for S problems at once (rows: their rows of the weights): the new
    (x, f, g) where a step was found, else the old, and which moved."""
    step = np.ones(len(x_Sx5))
    x_new, f_new, g_new = x_Sx5.copy(), f_S.copy(), g_Sx5.copy()
    pending = np.ones(len(x_Sx5), bool)
    for _ in range(halvings):
        p_idx = np.flatnonzero(pending)
        if not len(p_idx):
            break
        trial = x_Sx5[p_idx] + step[p_idx, None] * d_Sx5[p_idx]
        ft, gt = objective(trial, rows[p_idx])
        ok = np.isfinite(ft) & (ft <= f_S[p_idx] + 1e-4 * step[p_idx] * slope_S[p_idx])
        x_new[p_idx[ok]], f_new[p_idx[ok]], g_new[p_idx[ok]] = trial[ok], ft[ok], gt[ok]
        pending[p_idx[ok]] = False
        step[p_idx[~ok]] *= 0.5
    return x_new, f_new, g_new, ~pending


def _batched_lbfgs(theta_Sx5: np.ndarray, data, iterations: int = 200, memory: int = 8,
                   gtol: float = 1e-7, ftol: float = 1e-11,
                   weights_SxR: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS (two-loop recursion, backtracking Armijo line search) on S independent problems at once, in
    numpy: each iteration evaluates all still-active starts in one vectorised call. The problems share `data`,
    weighted per problem by `weights_SxR` when given."""

    def objective(theta, rows):
        return _objective(theta, *data, None if weights_SxR is None else weights_SxR[rows])

    x = theta_Sx5.astype(np.float64).copy()
    f, g = objective(x, slice(None))
    S = len(x)
    s_hist, y_hist, rho = np.zeros((memory, S, 5)), np.zeros((memory, S, 5)), np.zeros((memory, S))
    active = np.ones(S, bool)
    for it in range(iterations):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        q = g[idx].copy()
        alphas = np.zeros((memory, len(idx)))
        newest = [(it - 1 - k) % memory for k in range(min(it, memory))]
        for k in newest:
            alphas[k] = rho[k, idx] * np.einsum("sj,sj->s", s_hist[k, idx], q)
            q -= alphas[k][:, None] * y_hist[k, idx]
        if newest:
            k = newest[0]
            yy = np.einsum("sj,sj->s", y_hist[k, idx], y_hist[k, idx])
            gamma = np.where(yy > 0, 1.0 / np.maximum(rho[k, idx] * yy, 1e-300), 1.0)
            q *= np.where(rho[k, idx] > 0, gamma, 1.0)[:, None]
        for k in reversed(newest):
            beta = rho[k, idx] * np.einsum("sj,sj->s", y_hist[k, idx], q)
            q += s_hist[k, idx] * (alphas[k] - beta)[:, None]
        d = -q
        slope = np.einsum("sj,sj->s", d, g[idx])
        bad = ~(slope < 0)
        d[bad], slope[bad] = -g[idx][bad], -np.einsum("sj,sj->s", g[idx][bad], g[idx][bad])
        x_new, f_new, g_new, moved = _backtrack(objective, x[idx], f[idx], g[idx], d, slope, idx)
        sv, yv = x_new - x[idx], g_new - g[idx]
        sy = np.einsum("sj,sj->s", sv, yv)
        slot = it % memory
        good = moved & (sy > 1e-12)
        s_hist[slot, idx], y_hist[slot, idx] = np.where(good[:, None], sv, 0), np.where(good[:, None], yv, 0)
        rho[slot, idx] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        converged = (~moved) | (np.abs(g_new).max(1) < gtol) | (np.abs(f[idx] - f_new) <= ftol * np.maximum(
            np.abs(f_new), 1e-30))
        x[idx], f[idx], g[idx] = x_new, f_new, g_new
        active[idx[converged]] = False
    return x, f


def grid_starts() -> np.ndarray:
    """Hoffmann et al.'s 4500 initialisations, as rows (a, b, e, alpha, beta)."""
    return np.asarray([(a, b, e, al, be) for al, be, e, a, b in itertools.product(
        GRID["alpha"], GRID["beta"], GRID["e"], GRID["a"], GRID["b"])])


def law_of(theta: np.ndarray) -> Law:
    """(a, b, e, alpha, beta) -> the law (inf where a bootstrap resample ran off to a huge log-coefficient)."""
    a, b, e, alpha, beta = (float(x) for x in theta)
    with np.errstate(over="ignore"):
        E, A, B = (float(np.exp(x)) for x in (e, a, b))
    return Law(E=E, A=A, B=B, alpha=alpha, beta=beta)


def fit_approach3(runs: Runs, starts: np.ndarray | None = None) -> tuple[Approach3, np.ndarray]:
    """L-BFGS from every start (all at once, vectorised), the best polished by scipy's L-BFGS-B to full
    precision; returns (the law, theta = (a, b, e, alpha, beta))."""
    data = (np.log(runs.params), np.log(runs.tokens), np.log(runs.loss))
    starts = grid_starts() if starts is None else np.atleast_2d(starts)
    if len(starts) > 1:
        thetas, values = _batched_lbfgs(starts, data)
        values = np.where(np.all(np.isfinite(thetas), axis=1), values, np.inf)
        starts = thetas[int(np.argmin(values))]
    best_theta, best_f = _lbfgs(np.ravel(starts), data)
    return Approach3(**dataclasses.asdict(law_of(best_theta)), objective=best_f), best_theta


VPNLS_GRID = np.linspace(0.05, 2.0, 40)


def _nnls(alpha: float, beta: float, runs: Runs) -> tuple[np.ndarray, float]:
    """(E, A, B) >= 0 minimising the relative squared residuals sum ((E + A/N^alpha + B/D^beta - L) / L)^2 at
    fixed exponents (log L's residuals to first order); that sum."""
    X = np.stack([np.ones(len(runs)), runs.params ** -alpha, runs.tokens ** -beta], axis=1) / runs.loss[:, None]
    scale = X.max(axis=0)  # the columns on one scale (N^-alpha can be 1e-4)
    coef, rnorm = optimize.nnls(X / scale, np.ones(len(runs)))
    return coef / scale, float(rnorm) ** 2


def fit_approach3_vpnls(runs: Runs, grid: np.ndarray = VPNLS_GRID) -> VPNLSLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta by least squares with the coefficients projected out (module doc)."""
    def profile(x: np.ndarray) -> float:
        return _nnls(x[0], x[1], runs)[1] if x.min() > 0 else np.inf

    values = np.asarray([[profile(np.asarray([a, b])) for b in grid] for a in grid])
    i, j = np.unravel_index(int(np.argmin(values)), values.shape)
    res = optimize.minimize(profile, np.asarray([grid[i], grid[j]]), method="Nelder-Mead",
                            options={"xatol": 1e-13, "fatol": 1e-30, "maxiter": 10_000, "maxfev": 20_000})
    alpha, beta = (float(x) for x in res.x)
    (E, A, B), sse = _nnls(alpha, beta, runs)
    with np.errstate(divide="ignore"):  # a zero coefficient: its log is -inf, its term 0
        theta = np.asarray([[np.log(A), np.log(B), np.log(E), alpha, beta]])
    huber = float(_objective(theta, np.log(runs.params), np.log(runs.tokens), np.log(runs.loss))[0][0])
    return VPNLSLaw(**dataclasses.asdict(law_of(theta[0])), sse=sse, objective=huber)


# ---------------------------------------------------------------------- approaches 1 and 2, Kaplan
def _power_law(x, y) -> PowerLaw:
    """y = k x^slope by least squares in log-log, with R²."""
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return PowerLaw(exponent=float(slope), coefficient=float(math.exp(intercept)),
                    r2=1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan"))


def budgets(runs: Runs, rtol: float = 1e-3) -> list[np.ndarray]:
    """Indices of runs grouped by compute budget (equal within rtol), smallest budget first."""
    order = np.argsort(runs.flops)
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(runs.flops[i] / runs.flops[groups[-1][0]] - 1) <= rtol:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [np.asarray(g) for g in groups]


def fit_approach1(runs: Runs) -> Approach1:
    """Envelope: the lowest loss per compute budget."""
    groups = budgets(runs)
    best = np.asarray([g[np.argmin(runs.loss[g])] for g in groups])
    if len(best) < 2:
        raise ConfigError("runs", "approach 1 needs at least two compute budgets")
    env = runs.take(best)
    return Approach1(a=_power_law(env.flops, env.params), b=_power_law(env.flops, env.tokens),
                     envelope=Envelope(env.flops.tolist(), env.params.tolist(), env.tokens.tolist(),
                                       env.loss.tolist()))


def fit_approach2(runs: Runs) -> Approach2:
    """A parabola per budget; vertices at the edge (or of downward parabolas) are reported and dropped."""
    kept: list[Parabola] = []
    dropped: list[DroppedBudget] = []
    for g in budgets(runs):
        c = float(runs.flops[g].mean())
        if len(np.unique(runs.params[g])) < 3:
            dropped.append(DroppedBudget(c, f"{len(np.unique(runs.params[g]))} sizes; a parabola needs 3"))
            continue
        x, y = np.log(runs.params[g]), runs.loss[g]
        x0 = float(x.mean())  # centred for a well-conditioned fit; coefficients reported in log N itself
        k2, k1c, k0c = np.polyfit(x - x0, y, 2)
        k1, k0 = k1c - 2 * k2 * x0, k0c - k1c * x0 + k2 * x0**2
        resid = y - np.polyval([k2, k1, k0], x)
        r2 = 1 - float((resid**2).sum()) / float(((y - y.mean()) ** 2).sum() or np.nan)
        if k2 <= 0:
            dropped.append(DroppedBudget(c, "the parabola opens downwards", r2=r2))
            continue
        x_star = -k1 / (2 * k2)
        if not x.min() < x_star < x.max():
            dropped.append(DroppedBudget(c, "the minimum sits at the edge of the sampled sizes", r2=r2,
                                         n_star=math.exp(x_star)))
            continue
        n_star = math.exp(x_star)
        kept.append(Parabola(flops=c, n_star=n_star, d_star=c / (6 * n_star), points=len(np.unique(x)),
                             loss_star=float(np.polyval([k2, k1, k0], x_star)), r2=r2,
                             coefficients=[float(k2), float(k1), float(k0)]))
    out = Approach2(budgets=kept, dropped=dropped)
    if len(kept) >= 2:
        c = np.asarray([k.flops for k in kept])
        out.a = _power_law(c, np.asarray([k.n_star for k in kept]))
        out.b = _power_law(c, np.asarray([k.d_star for k in kept]))
    return out


def fit_kaplan(runs: Runs) -> Kaplan:
    """L(N) = (N_c/N)^alpha_N over each size's best loss; L(C) = (C_c/C)^alpha_C over the envelope."""
    def scale(law: PowerLaw) -> float:  # y = k x^s = (x_c / x)^-s: x_c = k^(1/-s)
        return law.coefficient ** (1 / -law.exponent) if law.exponent else float("nan")

    sizes = np.unique(runs.params)
    best_per_size = np.asarray([runs.loss[runs.params == n].min() for n in sizes])
    out = Kaplan()
    if len(sizes) >= 2:
        ln = _power_law(sizes, best_per_size)
        out.L_N = SizeLaw(alpha_N=-ln.exponent, N_c=scale(ln), r2=ln.r2)
    if len(budgets(runs)) >= 2:
        env = fit_approach1(runs).envelope
        lc = _power_law(np.asarray(env.flops), np.asarray(env.loss))
        out.L_C = ComputeLaw(alpha_C=-lc.exponent, C_c=scale(lc), r2=lc.r2)
    return out


# ---------------------------------------------------------------------- bootstrap and the whole fit
def _flat(result: FitResult) -> dict[str, float]:
    """The scalar parameters a bootstrap reports on, as "approach.parameter"."""
    out = {}
    if result.approach3 is not None:
        out.update({f"approach3.{k}": getattr(result.approach3, k) for k in ("E", "A", "B", "alpha", "beta", "a", "b")})
    for name, approach in (("approach1", result.approach1), ("approach2", result.approach2)):
        if approach is not None and approach.a is not None:
            out[f"{name}.a"], out[f"{name}.b"] = approach.a.exponent, approach.b.exponent
    return out


def fit(runs: Runs, approach: str = "all", bootstrap: int = 0, level: float = 0.8, seed: int = 0,
        starts: np.ndarray | None = None) -> FitResult:
    """All requested approaches, each with its parameters; `ci` from `bootstrap` resamples over runs."""
    if approach not in APPROACHES:
        raise ConfigError("--approach", f"unknown approach {approach!r}; allowed: {', '.join(APPROACHES)}")
    if len(runs) < 5:
        raise ConfigError("runs", f"{len(runs)} runs are too few to fit; at least 5 are needed")
    result = FitResult(n_runs=len(runs), settings=Settings(approach, bootstrap, level, seed,
                                                                 resampled=runs.resampled()))
    if approach in ("1", "all"):
        result.approach1 = fit_approach1(runs)
    if approach in ("2", "all"):
        result.approach2 = fit_approach2(runs)
    theta = None
    if approach in ("3", "all"):
        result.approach3, theta = fit_approach3(runs, starts)
        result.approach3.vpnls = fit_approach3_vpnls(runs)
    if approach == "all":
        result.kaplan = fit_kaplan(runs)
    if bootstrap > 0:
        _bootstrap(result, runs, theta, bootstrap, level, seed)
    return result


def _bootstrap(result: FitResult, runs: Runs, theta: np.ndarray | None, resamples: int, level: float,
               seed: int) -> None:
    """Percentile intervals at `level` on every approach of `result`, from refits on resampled runs."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in _flat(result)}
    indices = [runs.resample(rng) for _ in range(resamples)]
    laws = _bootstrap_approach3(runs, theta, indices) if theta is not None else [None] * resamples
    for idx, law in zip(indices, laws, strict=True):
        sample = runs.take(idx)
        res = FitResult(n_runs=len(sample), settings=result.settings, approach3=law)
        try:
            if result.approach1 is not None:
                res.approach1 = fit_approach1(sample)
            if result.approach2 is not None:
                res.approach2 = fit_approach2(sample)
        except (ConfigError, np.linalg.LinAlgError, ValueError):
            pass
        for k, v in _flat(res).items():
            # Only what the full fit reports (a resample may find exponents the full data does not), and
            # not a resample whose fit ran off to infinity: it says nothing about the spread.
            if k in samples and math.isfinite(v):
                samples[k].append(v)
    for name, approach_result in result.approaches().items():
        prefix = f"{name}."
        ci = percentile_intervals({k[len(prefix):]: v for k, v in samples.items() if k.startswith(prefix)}, level)
        if ci:
            approach_result.ci = Intervals(level, ci)


def _bootstrap_approach3(runs: Runs, theta: np.ndarray, indices: list[np.ndarray]) -> list[Approach3]:
    """Approach 3 refitted on every resample, each started from the full fit's theta: one batched L-BFGS run over
    all resamples at once (each resample as counts of the runs: weights on the Huber terms, the same objective as
    the resampled rows'), then scipy's L-BFGS-B from where each stopped, to full precision. The batched run alone
    stopped short on the quickstart's runs (its iteration cap or its relative-progress test in the long flat
    valleys of these laws): 29-52 of 200 resamples a scipy run could still lower, by up to 56% of the objective,
    and the intervals moved (E's 10% bound 0.42 -> 0.27 on one sweep); the polish costs 0.5-1.4 s there."""
    data = (np.log(runs.params), np.log(runs.tokens), np.log(runs.loss))
    counts_SxR = np.stack([np.bincount(idx, minlength=len(runs)) for idx in indices]).astype(np.float64)
    starts = np.repeat(np.asarray(theta, np.float64)[None], len(indices), axis=0)
    thetas, values = _batched_lbfgs(starts, data, weights_SxR=counts_SxR)
    laws = []
    for t, v, idx in zip(thetas, values, indices, strict=True):
        if np.all(np.isfinite(t)):
            t, v = _lbfgs(t, tuple(x[idx] for x in data))
        laws.append(Approach3(**dataclasses.asdict(law_of(t)), objective=float(v)))
    return laws


def predict_largest_budget(runs: Runs, starts: np.ndarray | None = None) -> Prediction | NoPrediction | None:
    """Fit approach 3 on all budgets but the largest; predict the best loss there and compare (None: fewer
    than three budgets)."""
    groups = budgets(runs)
    if len(groups) < 3:
        return None
    train = runs.take(np.concatenate(groups[:-1]))
    held = runs.take(groups[-1])
    p, _ = fit_approach3(train, starts)
    if not p.has_frontier():
        return NoPrediction(reason="the law fitted on the smaller budgets has no compute-optimal frontier "
                            f"(alpha {p.alpha:.3g}, beta {p.beta:.3g})", fitted_on_budgets=len(groups) - 1)
    c = float(held.flops.mean())
    n_opt, d_opt = p.frontier(c)
    predicted = float(p.loss(n_opt, d_opt))
    observed = float(held.loss.min())
    return Prediction(flops=c, predicted_best_loss=predicted, observed_best_loss=observed,
                      error=predicted - observed, relative_error=(predicted - observed) / observed,
                      n_opt=float(n_opt), fitted_on_budgets=len(groups) - 1)


def runs_from_records(records: Sequence[dict], params_key: str, flops_key: str) -> Runs:
    """Runs from sweep ledger records that are points (`is_point`), with their unique training tokens when every
    one has them, grouped by trunk in a wsd_branch sweep."""
    ok = [r for r in records if is_point(r)]
    unique = [r.get("unique_train_tokens") for r in ok]
    return Runs.of([r[params_key] for r in ok], [r["tokens"] for r in ok], [r["eval_loss"] for r in ok],
                   [r[flops_key] for r in ok], unique if ok and None not in unique else None,
                   [r["parent"] for r in ok] if any(r.get("parent") for r in ok) else None)


def is_point(record: dict) -> bool:
    """Whether a ledger record is a point of the fits: a finished run with a finite eval loss, not a wsd_branch
    trunk (its loss is at a constant learning rate, not at the end of a schedule)."""
    return (record.get("status") == "finished" and math.isfinite(record.get("eval_loss", math.nan))
            and record.get("role") != "trunk")
