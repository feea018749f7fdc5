"""Sweep grids: each run is the base training config plus overrides, with its name, N (each count), D and C.

Kinds (`sweep.kind`):
- `isoflop`: `n_budgets` compute budgets log-spaced from `budget_min` to `budget_max`; per budget
  `sizes_per_budget` shapes spaced evenly in log N over [N_opt / span, N_opt · span] around the expected
  optimum N_opt = sqrt(C / (6 · tokens_per_param)); D = C / FLOPs-per-token(N) under `sweep.flops`.
- `fixed_tokens` (L(N)): `sizes` shapes log-spaced over [n_min, n_max], each trained on `tokens` tokens.
- `tokens_per_param`: the same sizes, each trained on r · N tokens for each r in `ratios`.
- `wsd_branch` (Hägele et al. 2024): the points of the grid `branch_grid` (one of the kinds above), each shape's
  trained as cooldowns branched from one constant-LR trunk. The trunk (`NAME-trunk`) runs to the last branch point
  and keeps a checkpoint at each; each branch (the grid's run name) is the `wsd` run of its length (the base's
  `optim.wsd_decay_fraction` and `wsd_decay_shape`), started from the trunk's checkpoint where its cooldown
  begins (optim.branch_point), so it equals that run trained alone, bit for bit. A shape's branches share its
  trunk's batch, learning rate and warmup: the ladder's for its largest budget and longest branch (5% of its
  steps: a warmup of 5% of the shortest branch cost up to 0.13 nats on the quickstart's longest ones).
  The trunk is not a point of the fits; `branch_costs` says what the sweep saves against independent runs.

Steps are whole, so each run's D and C are recomputed from its steps: they are what was trained.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from ml_collections import ConfigDict

from scalax import config as config_lib
from scalax.errors import ConfigError
from scalax.models import flops
from scalax.scaling import ladder
from scalax.train import optim

GRIDS = ("isoflop", "fixed_tokens", "tokens_per_param")
KINDS = (*GRIDS, "wsd_branch")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    name: str
    overrides: dict  # dotted config key -> value, applied to the base config
    counts: dict  # params_total, params_embedding, params_non_embedding
    tokens: int  # D
    flops: dict  # C under each convention: flops_6n, flops_6n_head, ...
    budget: float  # the nominal budget of an IsoFLOP run (its intended C), else the run's C
    shape: ladder.Shape | None = dataclasses.field(default=None, compare=False)
    role: str = "run"  # run | trunk | branch (wsd_branch)
    parent: str | None = None  # a branch: its trunk's name ...
    branch_step: int = 0  # ... and the trunk's step it starts from

    def record(self) -> dict:
        branch = {"role": self.role, "parent": self.parent, "branch_step": self.branch_step} if self.role != "run" \
            else {}
        return {"name": self.name, "overrides": self.overrides, **self.counts, "tokens": self.tokens,
                **self.flops, "budget": self.budget, **branch}


def plan(cfg: ConfigDict) -> list[PlannedRun]:
    """The runs of a sweep config (sections `sweep` and `base`)."""
    sweep_cfg = cfg.sweep
    if sweep_cfg.kind not in KINDS:
        raise ConfigError("sweep.kind", f"unknown sweep kind {sweep_cfg.kind!r}; allowed: {', '.join(KINDS)}")
    ladder.check_params_key(sweep_cfg.params)
    if sweep_cfg.flops not in flops.CONVENTIONS:
        raise ConfigError("sweep.flops", f"unknown convention {sweep_cfg.flops!r}; allowed: "
                          f"{', '.join(flops.CONVENTIONS)}")
    grid = grid_kind(sweep_cfg)
    runs = _isoflop_runs(cfg) if grid == "isoflop" else _size_runs(cfg, grid)
    return _branched(cfg, runs) if sweep_cfg.kind == "wsd_branch" else runs


def grid_kind(sweep) -> str:
    """The grid whose points a sweep trains: its kind, or a wsd_branch sweep's `branch_grid`."""
    if sweep.get("kind") != "wsd_branch":
        return sweep.get("kind", "")
    grid = sweep.get("branch_grid", "isoflop")
    if grid not in GRIDS:
        raise ConfigError("sweep.branch_grid", f"unknown grid {grid!r}; allowed: {', '.join(GRIDS)}")
    return grid


def _shapes(cfg: ConfigDict, max_n: float) -> list[ladder.Shape]:
    """The ladder's shapes of the sweep's family up to max_n parameters, with the base model's vocabulary,
    context and positional scheme."""
    base_model, sweep_cfg = config_lib.model_config(cfg.base), cfg.sweep
    return ladder.candidates(sweep_cfg.family, base_model.vocab_size, base_model.max_seq_len, max_n,
                             sweep_cfg.params, base_model.position, sweep_cfg.get("d_model_step", 64),
                             sweep_cfg.get("head_dim", 64))


def _isoflop_runs(cfg: ConfigDict) -> list[PlannedRun]:
    sweep_cfg, seq_len = cfg.sweep, cfg.base.train.seq_len
    if sweep_cfg.n_budgets <= 0 or sweep_cfg.sizes_per_budget <= 0:
        raise ConfigError("sweep.n_budgets" if sweep_cfg.n_budgets <= 0 else "sweep.sizes_per_budget",
                          "the grid is empty; allowed: positive integers")
    if not 0 < sweep_cfg.budget_min <= sweep_cfg.budget_max:
        raise ConfigError("sweep.budget_min", f"need 0 < budget_min <= budget_max, got {sweep_cfg.budget_min} and "
                          f"{sweep_cfg.budget_max}")
    budgets = np.geomspace(sweep_cfg.budget_min, sweep_cfg.budget_max, sweep_cfg.n_budgets)
    shapes = _shapes(cfg, math.sqrt(budgets[-1] / (6 * sweep_cfg.tokens_per_param)) * sweep_cfg.span * 4)
    runs = []
    for c in budgets:
        n_opt = math.sqrt(c / (6 * sweep_cfg.tokens_per_param))
        targets = list(n_opt * sweep_cfg.span ** np.linspace(-1, 1, sweep_cfg.sizes_per_budget))
        for shape in ladder.nearest_shapes(targets, shapes, sweep_cfg.params):
            tokens = c / flops.flops_per_token(shape.model, seq_len, sweep_cfg.flops)
            run = _planned_run(cfg, shape, tokens, c, f"C{c:.2e}-{shape.name}")
            if run is not None:
                runs.append(run)
        if not any(r.budget == c for r in runs):
            batch = ladder.batch_sequences(c, seq_len, _multiple(cfg))
            raise ConfigError("sweep.budget_min", f"the budget {c:.3g} FLOPs is too small for any "
                              f"{sweep_cfg.family} model: the smallest ({shapes[0].name if shapes else 'd64-l1'}) "
                              f"needs at least one step of {batch} x {seq_len} tokens")
    return runs


def _size_runs(cfg: ConfigDict, kind: str) -> list[PlannedRun]:
    """fixed_tokens and tokens_per_param: sizes log-spaced over [n_min, n_max], each at its token counts."""
    sweep_cfg, seq_len = cfg.sweep, cfg.base.train.seq_len
    if sweep_cfg.sizes <= 0:
        raise ConfigError("sweep.sizes", "the grid is empty; allowed: a positive integer")
    targets = list(np.geomspace(sweep_cfg.n_min, sweep_cfg.n_max, sweep_cfg.sizes))
    runs = []
    for shape in ladder.nearest_shapes(targets, _shapes(cfg, sweep_cfg.n_max * 2), sweep_cfg.params):
        n = shape.params(sweep_cfg.params)
        token_counts = [sweep_cfg.tokens] if kind == "fixed_tokens" else [r * n for r in sweep_cfg.ratios]
        for tokens in token_counts:
            c = tokens * flops.flops_per_token(shape.model, seq_len, sweep_cfg.flops)
            run = _planned_run(cfg, shape, tokens, c, f"{shape.name}-D{tokens:.2e}")
            if run is None:
                raise ConfigError("sweep.tokens", f"{tokens:.3g} tokens is less than one step for {shape.name}")
            runs.append(run)
    return runs


def _planned_run(cfg: ConfigDict, shape: ladder.Shape, tokens: float, budget: float, name: str) -> PlannedRun | None:
    """One run: shape, batch and lr by the ladder's rules, steps from the token count (None if < 1 step)."""
    seq_len = cfg.base.train.seq_len
    batch = ladder.batch_sequences(budget, seq_len, _multiple(cfg))
    steps = round(tokens / (batch * seq_len))
    if steps < 1:
        return None
    overrides = {"train.steps": steps, "train.tokens": 0, "train.batch_size": batch,
                 "optim.lr": ladder.learning_rate(budget), "optim.warmup_steps": ladder.warmup_steps(steps),
                 "train.seed": cfg.sweep.seed}
    return _run(cfg, shape, name, overrides, budget)


def _run(cfg: ConfigDict, shape: ladder.Shape, name: str, overrides: dict, budget: float | None,
         **branch) -> PlannedRun:
    """The run of `shape` with `overrides` (train.steps and train.batch_size among them): its counts, tokens
    and FLOPs as trained; `budget` None: its own C under `sweep.flops`."""
    seq_len = cfg.base.train.seq_len
    trained = overrides["train.steps"] * overrides["train.batch_size"] * seq_len
    overrides = {"model.d_model": shape.d_model, "model.n_layers": shape.n_layers,
                 "model.n_heads": shape.model.n_heads, "model.n_kv_heads": shape.model.n_kv_heads,
                 "model.d_ff": shape.model.d_ff, **overrides}
    counts = {"params_total": flops.params_total(shape.model), "params_embedding": flops.params_embedding(shape.model),
              "params_non_embedding": flops.params_non_embedding(shape.model)}
    per_token = flops.all_flops_per_token(shape.model, seq_len)
    run_flops = {f"flops_{k}": v * trained for k, v in per_token.items()}
    budget = run_flops[f"flops_{cfg.sweep.flops}"] if budget is None else budget
    return PlannedRun(name, overrides, counts, trained, run_flops, float(budget), shape, **branch)


def _branched(cfg: ConfigDict, runs: list[PlannedRun]) -> list[PlannedRun]:
    """wsd_branch: each shape's runs of the grid as cooldowns from one trunk (the module docstring)."""
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(run.shape.name, []).append(run)
    return [r for name, group in groups.items() for r in _trunk_and_branches(cfg, name, group)]


def _trunk_and_branches(cfg: ConfigDict, name: str, group: list[PlannedRun]) -> list[PlannedRun]:
    seq_len, shape, top = cfg.base.train.seq_len, group[0].shape, max(r.budget for r in group)
    batch = ladder.batch_sequences(top, seq_len, _multiple(cfg))
    steps = [round(r.tokens / (batch * seq_len)) for r in group]
    if min(steps) < 2:
        short = group[steps.index(min(steps))]
        raise ConfigError("sweep.kind", f"wsd_branch: {short.name} ({short.tokens:.3g} tokens) is {min(steps)} "
                          f"step(s) of its trunk's batch ({batch} x {seq_len} tokens); a branch needs at least 2")
    common = {"train.tokens": 0, "train.batch_size": batch, "optim.lr": ladder.learning_rate(top),
              "optim.warmup_steps": ladder.warmup_steps(max(steps)), "optim.warmup_tokens": 0,
              "train.seed": cfg.sweep.seed}
    optim_cfg = ConfigDict({**cfg.base.optim.to_dict(), "warmup_steps": common["optim.warmup_steps"],
                            "warmup_tokens": 0})
    points = [optim.branch_point(optim_cfg, n) for n in steps]
    trunk = _run(cfg, shape, f"{name}-trunk", {**common, "train.steps": max(points), "optim.schedule": "constant",
                                               "train.checkpoint_steps": tuple(sorted(set(points)))}, None,
                 role="trunk")
    isoflop = grid_kind(cfg.sweep) == "isoflop"
    return [trunk] + [_run(cfg, shape, r.name, {**common, "train.steps": n, "optim.schedule": "wsd"},
                           r.budget if isoflop else None, role="branch", parent=trunk.name, branch_step=b)
                      for r, n, b in zip(group, steps, points, strict=True)]


def branch_costs(records: list[dict], flops_key: str) -> list[dict]:
    """Per trunk of a wsd_branch sweep's ledger records: the compute spent (the trunk, and each branch from its
    branch point on) against independent runs of every branch (each from step 0), under `flops_key`."""
    out = []
    for trunk in (r for r in records if r.get("role") == "trunk"):
        branches = [r for r in records if r.get("parent") == trunk["name"]]
        tail = sum(r[flops_key] * (1 - r["branch_step"] / r["overrides"]["train.steps"]) for r in branches)
        independent = sum(r[flops_key] for r in branches)
        out.append({"trunk": trunk["name"], "branches": len(branches), "spent": trunk[flops_key] + tail,
                    "independent": independent, "smallest": min((r[flops_key] for r in branches), default=0.0)})
    return out


def _multiple(cfg: ConfigDict) -> int:
    """Batches are whole multiples of `sweep.batch_multiple` (set it to data x fsdp on a multi-device host)."""
    multiple = cfg.sweep.get("batch_multiple", 1)
    if multiple <= 0:
        raise ConfigError("sweep.batch_multiple", f"must be a positive integer, got {multiple}")
    return multiple


def run_config(cfg: ConfigDict, run: PlannedRun) -> ConfigDict:
    """The base training config with a run's overrides applied."""
    out = ConfigDict(cfg.base.to_dict())
    for key, value in run.overrides.items():
        section, field = key.split(".")
        out[section][field] = type(out[section][field])(value)
    return out


def branch_cost_line(records: list[dict], flops_key: str) -> str:
    """What a wsd_branch sweep costs against the same points trained as independent runs."""
    costs = branch_costs(records, flops_key)
    spent, independent = sum(c["spent"] for c in costs), sum(c["independent"] for c in costs)
    return (f"{len(costs)} trunks and their branches cost {spent:.3g} FLOPs ({flops_key}), against "
            f"{independent:.3g} for independent runs ({1 - spent / independent:.0%} saved)")
