"""wsd_branch sweeps: the plan (trunks, branch points, compute), fits over branches (trunks resampled whole), and
a branch trained by the runner against the same WSD run trained alone, with real processes."""

import glob
import json
import os
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from scalax import config as config_lib
from scalax import io
from scalax.errors import ConfigError
from scalax.scaling import analysis, report
from scalax.scaling import fit as fit_lib
from scalax.scaling import sweep as sweep_lib
from scalax.train import optim
from scalax.train.checkpoint import load_params
from tests.conftest import REPO
from tests.scaling.test_sweep import ONE_DEVICE, ledger

# One size, token counts {1, 2, 4, 8} x D whose steps (40, 80, 160, 320) are whole multiples of 5, so that a 20%
# cooldown is exactly 20% of each branch.
DOUBLINGS = ["--config.sweep.kind=wsd_branch", "--config.sweep.branch_grid=tokens_per_param",
             "--config.sweep.sizes=1", "--config.sweep.n_min=3000", "--config.sweep.n_max=3000",
             "--config.sweep.ratios=(4.55,9.1,18.2,36.4)", "--config.base.optim.wsd_decay_fraction=0.2"]


def plan(*overrides):
    cfg = config_lib.load("configs/sweeps/quickstart.py", list(overrides))
    return cfg, sweep_lib.plan(cfg)


def test_branch_accounting_of_token_counts_1_2_4_8_with_a_20_percent_cooldown():
    """Trunk to 0.8 x 8 D, then cooldowns of 0.2 x (1 + 2 + 4 + 8) D: 9.4 D against 15 D for separate runs."""
    _, runs = plan(*DOUBLINGS)
    trunk, *branches = runs
    assert [b.overrides["train.steps"] for b in branches] == [40, 80, 160, 320]
    assert trunk.role == "trunk" and trunk.overrides["train.steps"] == 256 == 0.8 * 320
    costs = sweep_lib.branch_costs([r.record() for r in runs], "flops_6n")
    assert len(costs) == 1 and costs[0]["branches"] == 4
    assert costs[0]["spent"] / costs[0]["smallest"] == pytest.approx(9.4, rel=1e-12)
    assert costs[0]["independent"] / costs[0]["smallest"] == pytest.approx(15.0, rel=1e-12)
    section = "\n".join(report._branch_cost_section([r.record() for r in runs], "flops_6n"))
    assert "| d16-l1-trunk | 4 | 9.40 | 15.00 | 37% |" in section


@pytest.mark.parametrize("grid", ["isoflop", "tokens_per_param"])
def test_every_point_of_the_grid_is_a_branch_of_its_shapes_trunk(grid):
    cfg, runs = plan("--config.sweep.kind=wsd_branch", f"--config.sweep.branch_grid={grid}",
                     "--config.base.optim.wsd_decay_shape=1-sqrt")
    _, plain = plan(f"--config.sweep.kind={grid}")
    branches = [r for r in runs if r.role == "branch"]
    trunks = {r.name: r for r in runs if r.role == "trunk"}
    assert sorted(r.name for r in branches) == sorted(r.name for r in plain)  # the same points, by name
    assert len(runs) == len(branches) + len(trunks)
    seq_len, plain = cfg.base.train.seq_len, {r.name: r for r in plain}
    for b in branches:
        p, trunk = plain[b.name], trunks[b.parent]
        assert b.counts == p.counts and b.shape.name == p.shape.name and trunk.name == f"{p.shape.name}-trunk"
        if grid == "isoflop":
            assert b.budget == p.budget
        shared = ("train.batch_size", "optim.lr", "optim.warmup_steps", "train.seed", "model.d_model")
        assert all(b.overrides[k] == trunk.overrides[k] for k in shared)
        assert b.overrides["optim.schedule"] == "wsd" and trunk.overrides["optim.schedule"] == "constant"
        steps = b.overrides["train.steps"]
        assert b.tokens == steps * b.overrides["train.batch_size"] * seq_len
        assert abs(b.tokens / p.tokens - 1) < 0.5 / min(steps, p.overrides["train.steps"]) + 1e-9
        run_cfg = sweep_lib.run_config(cfg, b)
        assert b.branch_step == optim.branch_point(run_cfg.optim, steps) in trunk.overrides["train.checkpoint_steps"]
    for trunk in trunks.values():
        points = [b.branch_step for b in branches if b.parent == trunk.name]
        assert trunk.overrides["train.checkpoint_steps"] == tuple(sorted(set(points)))
        assert trunk.overrides["train.steps"] == max(points)


def test_bad_wsd_branch_configs():
    with pytest.raises(ConfigError) as info:
        plan("--config.sweep.kind=wsd_branch", "--config.sweep.branch_grid=wsd_branch")
    assert info.value.key == "sweep.branch_grid" and "tokens_per_param" in str(info.value)
    with pytest.raises(ConfigError) as info:  # a branch of 1 step has no cooldown to branch
        plan(*DOUBLINGS, "--config.sweep.ratios=(0.1,40.0)")
    assert info.value.key == "sweep.kind" and "at least 2" in str(info.value)
    from scalax.launch import launcher  # one slice per run: a branch cannot start from its trunk's checkpoint

    with pytest.raises(ConfigError) as info:
        launcher.launch(plan(*DOUBLINGS)[0], "gs://bucket/sweep", None, dry_run=True)
    assert info.value.key == "sweep.kind" and "scalax sweep" in str(info.value)


def branched_records(seed=0):
    """Ledger records of three trunks with three branches each, and the trunks themselves (finished)."""
    rng = np.random.default_rng(seed)
    records = []
    for n in (1e4, 3e4, 1e5):
        records.append({"name": f"t{n:g}", "role": "trunk", "status": "finished", "eval_loss": 9.0,
                        "params_non_embedding": n, "tokens": 1.0, "flops_6n": 1.0, "budget": 1.0})
        for d in (1e6, 3e6, 1e7):
            loss = 1.5 + 400 / n**0.4 + 600 / d**0.35 + rng.normal(0, 0.01)
            records.append({"name": f"b{n:g}-{d:g}", "role": "branch", "parent": f"t{n:g}", "branch_step": 1,
                            "overrides": {"train.steps": 2}, "status": "finished", "eval_loss": loss,
                            "params_non_embedding": n, "tokens": d, "flops_6n": 6 * n * d, "budget": 6 * n * d})
    return records


def test_fits_use_branches_and_the_bootstrap_resamples_whole_trunks(tmp_path):
    records = branched_records()
    sweep = {"kind": "wsd_branch", "branch_grid": "tokens_per_param"}
    runs = analysis.runs_of_ledger(records, sweep)
    assert len(runs) == 9 and 9.0 not in runs.loss  # trunks are not points
    assert list(runs.groups) == [f"t{n:g}" for n in (1e4, 3e4, 1e5) for _ in range(3)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = runs.resample(rng)
        drawn = [set(idx[i : i + 3]) for i in range(0, len(idx), 3)]
        assert len(idx) == 9 and all(group in ({0, 1, 2}, {3, 4, 5}, {6, 7, 8}) for group in drawn)
    result = analysis.analyse(runs, bootstrap=20, seed=0)
    assert result.settings.resampled == "groups of runs (3 trunks)"
    result.conventions = analysis.conventions(sweep)
    assert "9 finished runs of 9 (and 3 trunks);" in report.render(result, records, [], str(tmp_path))
    assert "bootstrap over groups of runs (3 trunks)" in report.intervals_line(result)
    # `fit --csv` of the export: the same groups, the same fit
    analysis.write_csv(str(tmp_path / "runs.csv"), runs, analysis.finished_names(records))
    again = fit_lib.read_csv(str(tmp_path / "runs.csv"))
    assert list(again.groups) == list(runs.groups)
    np.testing.assert_array_equal(again.loss, runs.loss)
    refit = analysis.analyse(again, bootstrap=20, seed=0)
    assert refit.approach3.ci.of == result.approach3.ci.of


@pytest.mark.slow
def test_a_branched_cooldown_equals_the_wsd_run_trained_alone(tmp_path):
    """The runner trains a trunk and two branches (real processes); the longer branch, trained again alone from
    step 0 as a plain WSD run of its config, ends with the same parameters and the same losses, bit for bit. The
    trunk's checkpoints (one per branch point) are all there, and nothing under them changed once branches began."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:30]:
        (corpus / os.path.basename(path)).write_bytes(open(path, "rb").read())
    workdir, cache = tmp_path / "sweep", tmp_path / "cache"
    overrides = [*DOUBLINGS[:5], "--config.sweep.ratios=(2.0,4.0)", "--config.base.train.seq_len=64",
                 "--config.base.optim.wsd_decay_shape=1-sqrt", f"--config.base.data.corpus={corpus}",
                 f"--config.base.data.cache_dir={cache}", "--config.sweep.parallel=1"]
    env = {**os.environ, **ONE_DEVICE}
    swept = subprocess.run([sys.executable, "-m", "scalax", "sweep", "--config=configs/sweeps/quickstart.py",
                            f"--workdir={workdir}", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert swept.returncode == 0, swept.stderr[-2000:]
    assert "saved)" in swept.stdout
    records = {r["name"]: r for r in ledger(workdir)}
    trunk = next(r for r in records.values() if r.get("role") == "trunk")
    branches = [r for r in records.values() if r.get("role") == "branch"]
    assert len(branches) == 2 and all(r["status"] == "finished" for r in records.values())
    steps = trunk["overrides"]["train.checkpoint_steps"]
    trunk_dir = workdir / "runs" / trunk["name"]
    assert sorted(int(s) for s in os.listdir(trunk_dir / "checkpoints") if s.isdigit()) == steps
    first_branch = min(os.path.getmtime(workdir / "runs" / r["name"] / "run_config.json") for r in branches)
    for path in glob.glob(str(trunk_dir / "checkpoints" / "**"), recursive=True):
        assert os.path.getmtime(path) < first_branch, path  # nothing written there once the branches began
    branch = max(branches, key=lambda r: r["tokens"])
    branch_dir = workdir / "runs" / branch["name"]
    assert f"from step {branch['branch_step']}" in (branch_dir / "train.log").read_text()
    alone = tmp_path / "alone"
    trained = subprocess.run([sys.executable, "-m", "scalax", "train", f"--config={branch_dir / 'run_config.json'}",
                              f"--workdir={alone}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    (_, ours, _), (_, theirs, _) = load_params(str(branch_dir)), load_params(str(alone))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def metrics(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {(r["step"], k): r[k] for r in map(json.loads, lines) for k in ("loss", "lr", "eval_loss") if k in r}

    branched, dedicated = metrics(branch_dir), metrics(alone)
    assert branched and all(dedicated[key] == value for key, value in branched.items())
    assert {s for s, _ in branched} == {s for s, _ in dedicated if s > branch["branch_step"]}
    assert io.read_json(str(branch_dir / "summary.json"))["eval_loss"] == branch["eval_loss"]
