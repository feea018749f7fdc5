"""The data-constrained scaling law of Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models"):
repeated tokens and excess parameters are worth less than fresh ones, decaying with the repetitions.

    L(N, D, U_D) = E + A / N'^alpha + B / D'^beta
    D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*)),   R_D = D / U_D - 1   (epochs beyond the first)
    N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)),   R_N = N / U_N - 1,  U_N = min(N_opt(U_D), N)

U_D: the unique tokens a run saw, min(D, the training split's unique tokens); N_opt(U_D): the parameters
compute-optimal for U_D tokens on the law's own frontier (Law.frontier; for the paper's fitted values, where
alpha = beta, N_opt(U) = 0.051 U). With one epoch and N <= U_N this is Hoffmann et al.'s law; as R* grows,
repetition costs nothing.

The fit, in three steps: (1) approach 3 (fit.fit_approach3, Hoffmann et al.'s grid of starts) on the runs of at
most one epoch; (2) with those terms fixed, R_D* and R_N* by L-BFGS-B in log space from a grid of starts; (3) all
seven parameters together by L-BFGS-B from there, kept where it lowers the objective. The objective is approach
3's: the Huber loss (delta 1e-3) of log L. R_D* is fitted only when some run repeats its data, R_N* only when
some run is larger than U_N; otherwise it stays None (infinite: no decay) and the check says so.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import tqdm
from scipy import optimize

from scalax.errors import ConfigError
from scalax.scaling import fit as fit_lib
from scalax.scaling.results import DataConstrainedLaw, FitResult, Intervals, Settings

ONE_EPOCH = 1 + 1e-9  # a run of at most this many epochs has seen each token once
R_STAR_GRID = np.log(np.geomspace(0.1, 1000.0, 13))  # stage 2's starts for log R_D*, log R_N*
LOG_R_BOUNDS = (math.log(1e-3), math.log(1e6))


def _log_unique_params(theta5: np.ndarray, log_u: np.ndarray) -> np.ndarray:
    """log N_opt(U_D) on the frontier of theta = (a, b, e, alpha, beta): N_opt = G (G U)^(beta/alpha)."""
    a, b, _, alpha, beta = theta5
    log_g = (math.log(alpha) + a - math.log(beta) - b) / (alpha + beta)
    return log_g + beta / alpha * (log_g + log_u)


def _log_effective(log_x: np.ndarray, log_base: np.ndarray, log_r_star: float | None) -> np.ndarray:
    """log of base + base R* (1 - exp(-R / R*)), R = x / base - 1 >= 0 (x itself when R* is None: no decay)."""
    if log_r_star is None:
        return log_x
    r_star = math.exp(log_r_star)
    repeats = np.maximum(np.exp(log_x - log_base) - 1, 0)
    return log_base + np.log1p(r_star * -np.expm1(-repeats / r_star))


def _predict_log_loss(theta7: np.ndarray, data: dict, fit_d: bool, fit_n: bool) -> np.ndarray:
    """log L of every run under theta = (a, b, e, alpha, beta, log R_D*, log R_N*)."""
    a, b, e, alpha, beta = theta7[:5]
    log_un = np.minimum(_log_unique_params(theta7[:5], data["log_u"]), data["log_n"])
    log_n_eff = _log_effective(data["log_n"], log_un, theta7[6] if fit_n else None)
    log_d_eff = _log_effective(data["log_d"], data["log_u"], theta7[5] if fit_d else None)
    terms = np.stack([a - alpha * log_n_eff, b - beta * log_d_eff, np.full_like(log_n_eff, e)])
    m = terms.max(0)
    return m + np.log(np.exp(terms - m).sum(0))


def _huber(theta7: np.ndarray, data: dict, fit_d: bool, fit_n: bool) -> float:
    if theta7[3] <= 0 or theta7[4] <= 0:
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.abs(_predict_log_loss(theta7, data, fit_d, fit_n) - data["log_l"])
    if not np.all(np.isfinite(r)):
        return math.inf
    return float(fit_lib.huber_loss(r).sum())


def _minimise(fun, x0: np.ndarray, bounds) -> tuple[np.ndarray, float]:
    res = optimize.minimize(fun, x0, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 5000, "gtol": 1e-14, "ftol": 1e-16, "maxfun": 100_000})
    return res.x, float(res.fun)


def fit_data_constrained(runs: fit_lib.Runs, start: DataConstrainedLaw | None = None) -> DataConstrainedLaw:
    """The law above fitted to runs that carry their unique tokens (module doc); `start`: a fit to begin
    from instead of the grids (the bootstrap's refits)."""
    if runs.unique_tokens is None:
        raise ConfigError("--approach", "data_constrained needs every run's unique training tokens: a sweep's "
                          "ledger (unique_train_tokens) or a CSV column unique_tokens")
    epochs = runs.tokens / runs.unique_tokens
    single = np.flatnonzero(epochs <= ONE_EPOCH)
    if len(single) < 5:
        raise ConfigError("--approach", f"data_constrained fits the Chinchilla terms on runs of at most one epoch: "
                          f"{len(single)} of {len(runs)} runs are; at least 5 are needed")
    data = {"log_n": np.log(runs.params), "log_d": np.log(runs.tokens),
            "log_u": np.log(np.minimum(runs.unique_tokens, runs.tokens)), "log_l": np.log(runs.loss)}
    if start is None:
        _, theta5 = fit_lib.fit_approach3(runs.take(single))
    else:
        theta5 = np.asarray([math.log(start.A), math.log(start.B), math.log(start.E), start.alpha, start.beta])
    fit_d = bool(np.any(epochs > ONE_EPOCH))
    fit_n = bool(np.any(data["log_n"] > _log_unique_params(theta5, data["log_u"]) + 1e-9))

    def stage2(log_r: np.ndarray) -> float:
        return _huber(np.concatenate([theta5, log_r]), data, fit_d, fit_n)

    if start is None:
        grid = [np.asarray([d, n]) for d in R_STAR_GRID for n in R_STAR_GRID]
        log_r = min(grid, key=stage2)
    else:
        log_r = np.log([start.R_D_star or 1e3, start.R_N_star or 1e3])
    log_r, _ = _minimise(stage2, log_r, [LOG_R_BOUNDS] * 2)
    theta7 = np.concatenate([theta5, log_r])
    joint = [(None, None)] * 3 + [(1e-6, None)] * 2 + [LOG_R_BOUNDS] * 2
    polished, value = _minimise(lambda t: _huber(t, data, fit_d, fit_n), theta7, joint)
    objective = _huber(theta7, data, fit_d, fit_n)
    if value <= objective:
        theta7, objective = polished, value
    law = fit_lib.law_of(theta7[:5])
    return DataConstrainedLaw(**dataclasses.asdict(law),
                              R_D_star=float(math.exp(theta7[5])) if fit_d else None,
                              R_N_star=float(math.exp(theta7[6])) if fit_n else None,
                              objective=objective,
                              single_epoch_runs=len(single), repeated_runs=int(np.sum(epochs > ONE_EPOCH)))


PARAMETERS = ("E", "A", "B", "alpha", "beta", "R_D_star", "R_N_star")


def fit(runs: fit_lib.Runs, bootstrap: int = 0, level: float = 0.8, seed: int = 0) -> FitResult:
    """The law as a FitResult (its `data_constrained`), with percentile intervals from `bootstrap` resamples
    over runs, each refitted from the full fit (a resample with under 5 one-epoch runs is skipped)."""
    if len(runs) < 5:
        raise ConfigError("runs", f"{len(runs)} runs are too few to fit; at least 5 are needed")
    law = fit_data_constrained(runs)
    result = FitResult(n_runs=len(runs), settings=Settings("data_constrained", bootstrap, level, seed,
                                                                 resampled=runs.resampled()),
                       data_constrained=law)
    if bootstrap <= 0:
        return result
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in PARAMETERS if getattr(law, k) is not None}
    for _ in tqdm.tqdm(range(bootstrap), desc="bootstrap", unit="fit", leave=False,
                       disable=not sys.stderr.isatty()):
        try:
            refit = fit_data_constrained(runs.take(runs.resample(rng)), start=law)
        except ConfigError:
            continue
        for k, v in samples.items():
            if (x := getattr(refit, k)) is not None and math.isfinite(x):
                v.append(x)
    law.ci = Intervals(level, fit_lib.percentile_intervals(samples, level))
    return result
