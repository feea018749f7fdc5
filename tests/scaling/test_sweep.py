"""Sweep grids, the ladder's rules, and the sweep runner with real processes (killed and restarted)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from scalax import config as config_lib
from scalax import io
from scalax.errors import ConfigError
from scalax.models import flops
from scalax.scaling import ladder
from scalax.scaling import sweep as sweep_lib
from tests.conftest import REPO


def quickstart(*overrides):
    return config_lib.load("configs/sweeps/quickstart.py", list(overrides))


@pytest.mark.parametrize("grid", [(), ("--config.sweep.d_model_step=64", "--config.sweep.head_dim=64",
                                        "--config.sweep.budget_min=1e13", "--config.sweep.budget_max=4e13",
                                        "--config.sweep.tokens_per_param=20", "--config.sweep.batch_multiple=8")],
                         ids=["quickstart", "64-wide"])
def test_isoflop_plan_follows_the_rules(grid):
    cfg = quickstart(*grid)
    runs = sweep_lib.plan(cfg)
    s = cfg.sweep
    assert len(runs) == s.n_budgets * s.sizes_per_budget
    budgets = sorted({r.budget for r in runs})
    assert len(budgets) == s.n_budgets >= 3
    for b in budgets:
        sizes = [r.counts["params_non_embedding"] for r in runs if r.budget == b]
        assert len(set(sizes)) == s.sizes_per_budget >= 5
    for r in runs:
        steps, batch = r.overrides["train.steps"], r.overrides["train.batch_size"]
        assert r.tokens == steps * batch * cfg.base.train.seq_len  # D is what is trained
        assert r.flops["flops_6n"] == pytest.approx(r.budget, rel=0.02)  # C within rounding of the budget
        assert r.overrides["optim.warmup_steps"] <= 0.05 * steps
        assert r.overrides["optim.lr"] == pytest.approx(0.3118 * r.budget**-0.125)
        m = s.batch_multiple
        assert batch % m == 0 and batch == m * max(1, round(0.2920 * r.budget**0.3271 / cfg.base.train.seq_len / m))
        d, layers = r.overrides["model.d_model"], r.overrides["model.n_layers"]
        assert d % s.d_model_step == 0 and d // r.overrides["model.n_heads"] == s.head_dim
        assert (layers == 1 or ladder.ASPECT_MIN <= d / layers) and d / layers <= ladder.ASPECT_MAX
        model = config_lib.model_config(sweep_lib.run_config(cfg, r))
        assert flops.params_non_embedding(model) == r.counts["params_non_embedding"]


def test_tokens_per_param_and_fixed_token_grids():
    per_param = sweep_lib.plan(quickstart("--config.sweep.kind=tokens_per_param", "--config.sweep.sizes=3"))
    assert len(per_param) == 3 * 3
    for r in per_param:
        ratio = r.tokens / r.counts["params_non_embedding"]
        assert min(abs(ratio / x - 1) for x in (5.0, 10.0, 20.0)) < 0.05
    fixed = sweep_lib.plan(quickstart("--config.sweep.kind=fixed_tokens", "--config.sweep.sizes=4"))
    assert len(fixed) == 4 and all(abs(r.tokens / 1e7 - 1) < 0.01 for r in fixed)


@pytest.mark.parametrize("overrides,key,words", [
    (["--config.sweep.n_budgets=0"], "sweep.n_budgets", "empty"),
    (["--config.sweep.sizes_per_budget=0"], "sweep.sizes_per_budget", "empty"),
    (["--config.sweep.budget_min=1e3", "--config.sweep.budget_max=1e3"], "sweep.budget_min", "too small"),
    (["--config.sweep.kind=random"], "sweep.kind", "isoflop"),
    (["--config.sweep.params=embedding"], "sweep.params", "non_embedding"),
])
def test_bad_sweep_configs(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        sweep_lib.plan(quickstart(*overrides))
    assert info.value.key == key and words in str(info.value)


def test_ladder_rules_are_deepseeks():
    assert ladder.learning_rate(1e20) == pytest.approx(0.3118 * 1e20**-0.125)
    assert ladder.batch_tokens(1e20) == pytest.approx(0.2920 * 1e20**0.3271)
    assert ladder.warmup_steps(1000) == 50 and ladder.warmup_steps(19) == 0
    shapes = ladder.candidates("gpt", 260, 256, 5e6, "non_embedding")
    counts = [s.params("non_embedding") for s in shapes]
    assert counts == sorted(counts) and max(counts) <= 5e6
    chosen = ladder.nearest_shapes([1e5, 4e5, 1.6e6], shapes, "non_embedding")
    assert len({s.name for s in chosen}) == 3
    for target, shape in zip([1e5, 4e5, 1.6e6], chosen, strict=True):
        assert abs(math.log(shape.params("non_embedding") / target)) < math.log(2)


# ---------------------------------------------------------------------- the runner, with real processes
SMALL = ["--config.sweep.budget_min=5e9", "--config.sweep.budget_max=1e10", "--config.sweep.n_budgets=2",
         "--config.sweep.sizes_per_budget=3", "--config.base.train.seq_len=64", "--config.sweep.bootstrap=10"]


ONE_DEVICE = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def sweep_command(workdir, corpus, cache):
    return [sys.executable, "-m", "scalax", "sweep", "--config=configs/sweeps/quickstart.py", f"--workdir={workdir}",
            *SMALL, f"--config.base.data.corpus={corpus}", f"--config.base.data.cache_dir={cache}"]


def ledger(workdir):
    path = io.join(str(workdir), "runs.jsonl")
    if not io.exists(path):
        return []
    return [json.loads(line) for line in io.read_text(path).splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_sweep_killed_and_restarted_records_each_run_once(tmp_path, capsys, where, request):
    """Also with the sweep's workdir on gs:// (the emulator): ledger, runs, fit, report and plots on the
    bucket, and `fit` and `plot` reading it from there."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import glob
    import sysconfig

    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]:
        (corpus / os.path.basename(path)).write_bytes(open(path, "rb").read())
    workdir = str(tmp_path / "sweep") if where == "local" else request.getfixturevalue("bucket") + "/sweep"
    cmd = sweep_command(workdir, corpus, tmp_path / "cache")
    env = {**os.environ, **ONE_DEVICE}  # (the emulator's variables, for gs://)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while sum(r["status"] == "finished" for r in ledger(workdir)) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its current child, at once
    proc.wait()
    first = {r["name"]: r for r in ledger(workdir) if r["status"] == "finished"}
    assert 2 <= len(first) < 6
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    records = ledger(workdir)
    assert len(records) == len({r["name"] for r in records}) == 6  # each run once
    assert all(r["status"] == "finished" and math.isfinite(r["eval_loss"]) for r in records)
    for name, record in first.items():  # finished runs were not trained again
        assert {k: v for k, v in ledger(workdir)[[r["name"] for r in records].index(name)].items()} == record
    assert f"{len(first)} already finished" in again.stdout
    for name in ("fit.json", "report.md", "plots/isoflop.png", "plots/isoflop.svg", "plots/loss_vs_compute.png",
                 f"runs/{records[0]['name']}/train.log"):
        assert io.exists(io.join(workdir, name)), name
    # every run's logged learning rate ends at its own final value, at its own last step
    for r in records:
        lines = io.read_text(io.join(workdir, "runs", r["name"], "metrics.jsonl")).splitlines()
        train = [json.loads(line) for line in lines if '"loss"' in line]
        assert train[-1]["step"] == r["overrides"]["train.steps"]
        assert train[-1]["lr"] == pytest.approx(r["overrides"]["optim.lr"] * 0.1, rel=1e-5)
    # One fit whichever command asks: the sweep's fit.json, `fit DIR`, `fit --csv` of its export, `plot`; here
    # for a sweep on the bucket (tests/scaling/test_analysis.py asks the same of a local sweep directory).
    if where == "local":
        return
    from scalax import cli

    def fit_numbers(path=None, *argv):
        if path is None:
            result = io.read_json(io.join(workdir, "fit.json"))
        else:
            assert cli.main(["fit", *map(str, argv), "--json"]) == 0
            result = json.loads(capsys.readouterr().out)
        return {k: v for k, v in result.items() if k != "conventions"}

    swept = fit_numbers()
    assert swept["approach3"]["ci"]["alpha"]["n"] > 1 and swept["n_runs"] == 6
    assert fit_numbers("dir", workdir) == swept
    assert fit_numbers("csv", "--csv", io.join(workdir, "fit_runs.csv"), "--bootstrap", 10, "--seed", 0) == swept
    io.remove(io.join(workdir, "plots"))
    assert cli.main(["plot", workdir]) == 0
    capsys.readouterr()
    assert fit_numbers() == swept
    assert {"isoflop.png", "isoflop.svg", "tensorboard"} <= set(io.listdir(io.join(workdir, "plots")))


def test_report_and_plots_from_a_known_law(tmp_path):
    """finish-stage outputs on runs drawn from a known law: tables with R², the prediction, every figure."""
    from scalax.scaling import fit, plots, report
    from scalax.scaling.results import Conventions
    from tests.scaling.test_fit import isoflop_grid

    runs = isoflop_grid(budgets=4, sizes=5, lo=1 / 4, hi=4)
    noisy = fit.Runs.of(runs.params, runs.tokens, runs.loss * (1 + 0.002 * np.sin(np.arange(len(runs)))),
                        runs.flops)
    result = fit.fit(noisy, "all", bootstrap=20)
    result.prediction = fit.predict_largest_budget(noisy)
    result.conventions = Conventions(params="params_non_embedding", flops="flops_6n", loss="eval nats/token")
    paths = plots.plot_all(result, noisy, str(tmp_path / "plots"))
    assert len(paths) == 4
    for path in paths:
        assert os.path.getsize(path) > 10_000 and os.path.exists(path.replace(".png", ".svg"))
    assert os.listdir(tmp_path / "plots" / "tensorboard")
    records = [{"name": f"r{i}", "status": "finished", "params_non_embedding": float(n), "tokens": float(d),
                "flops_6n": float(c), "eval_loss": float(loss), "eval_bpb": 1.0, "wall_seconds": 1.0}
               for i, (n, d, loss, c) in enumerate(zip(noisy.params, noisy.tokens, noisy.loss, noisy.flops,
                                                       strict=True))]
    text = report.render(result, records, paths, str(tmp_path))
    assert text.count("R² of the parabola") == 1 and "R² of log N* against log C" in text
    assert "predicts a best loss of" in text
    pred = result.prediction
    assert abs(pred.relative_error) < 0.01  # a smooth law extrapolates well
    assert pred.observed_best_loss == pytest.approx(min(noisy.loss[noisy.flops == noisy.flops.max()]))


def test_positional_sweep_is_the_quickstart_grid_per_scheme():
    reference = sweep_lib.plan(quickstart())
    for position in ("learned", "alibi", "t5", "none"):
        cfg = config_lib.load(f"configs/sweeps/positional.py:position={position}")
        runs = sweep_lib.plan(cfg)
        assert [r.name for r in runs] == [r.name for r in reference]
        for run in runs:
            model = config_lib.model_config(sweep_lib.run_config(cfg, run))
            assert model.position == position
            assert run.counts["params_total"] == flops.params_total(model)  # counted with its own scheme
    with pytest.raises(ConfigError, match="allowed: learned"):
        config_lib.load("configs/sweeps/positional.py:position=fourier")


@pytest.mark.slow
def test_runs_that_would_not_fit_are_skipped(tmp_path):
    """sweep.fit_device: each run is planned first; here no run's step fits in 1 MiB, so none trains."""
    workdir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "scalax", "sweep", "--config=configs/sweeps/quickstart.py", f"--workdir={workdir}",
           *SMALL, "--config.sweep.fit_device=1MiB", "--config.sweep.n_budgets=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = ledger(workdir)
    assert len(records) == 3 and all(r["status"] == "skipped" for r in records)
    assert all("per device; 1.0 MiB per device" in r["error"] for r in records)
    assert not any(os.path.exists(workdir / "runs" / r["name"] / "metrics.jsonl") for r in records)
    assert "not fitting" in proc.stdout


def test_parallel_children_get_equal_disjoint_cpu_sets(monkeypatch):
    from scalax.scaling import runner

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6})
    sets = runner.cpu_sets(3)
    assert sets == [{0, 1}, {2, 3}, {4, 5}]
    assert runner.cpu_sets(1) == [None] and runner.cpu_sets(8) == [None] * 8  # one run, or too few CPUs


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_a_child_runs_on_its_cpu_set_only():
    """The set-up that `scalax sweep --parallel K` starts each run with, on a real child process."""
    from scalax.scaling import forkserver

    cpu = max(os.sched_getaffinity(0))
    show = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    pinned = subprocess.run(show, preexec_fn=forkserver.child_setup({cpu}), capture_output=True, text=True, check=True)
    free = subprocess.run(show, preexec_fn=forkserver.child_setup(None), capture_output=True, text=True, check=True)
    assert json.loads(pinned.stdout) == [cpu]
    assert json.loads(free.stdout) == sorted(os.sched_getaffinity(0))


def test_parallel_sweeps_start_the_most_expensive_runs_first(tmp_path, monkeypatch):
    """With sweep.parallel 2 the runs start in decreasing expected time (one at a time: planned order); each
    start gets a free slot's CPUs. The expected time counts steps too: the quickstart's 11,020-step d16 run
    (65 s on this machine) starts before the 471-step d128 one with more FLOPs (47 s)."""
    from scalax.scaling import runner

    started = []

    class Done:
        returncode = 0

        def poll(self):
            return 0

    def fake_start(cfg, run, workdir, cpus, server):
        started.append((run, cpus))
        return Done(), time.time()

    monkeypatch.setattr(runner, "_start", fake_start)
    monkeypatch.setattr(runner, "run_result", lambda *a: {"status": "failed", "error": "fake"})
    monkeypatch.setattr(runner, "fit_and_plot", lambda *a: None)
    monkeypatch.setattr(runner, "cpu_sets", lambda k: [{i} for i in range(k)])
    cfg = quickstart()
    for parallel in (2, 1):
        started.clear()
        runner.run_sweep(cfg, str(tmp_path / f"p{parallel}"), parallel, log=lambda m: None)
        costs = [runner.expected_seconds(r) for r, _ in started]
        planned = [runner.expected_seconds(r) for r in sweep_lib.plan(cfg)]
        assert costs == (sorted(planned, reverse=True) if parallel == 2 else planned)
        if parallel == 2:
            names, by_name = [r.name for r, _ in started], {r.name: r for r, _ in started}
            assert names.index("C4.00e+11-d16-l1") < names.index("C1.60e+12-d128-l1")
            assert (by_name["C4.00e+11-d16-l1"].flops["flops_exact"]
                    < by_name["C1.60e+12-d128-l1"].flops["flops_exact"])
        assert {frozenset(c) for _, c in started} == ({frozenset({0}), frozenset({1})} if parallel == 2 else
                                                      {frozenset({0})})
