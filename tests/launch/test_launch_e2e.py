"""`scalax launch` end to end without a cloud: fake `gcloud`, `xpk` and `kubectl` on PATH (fake_cloud.py) that
record their argv, play queued-resource and workload states, run the training on this machine against the GCS
emulator, and preempt it once. A 3-run sweep on each backend finishes, the preempted run resumes (its losses
equal an uninterrupted run's, bit for bit), retries are bounded, and nothing is left listed, also after Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalax import io
from tests.conftest import REPO

FAKE = os.path.join(os.path.dirname(__file__), "fake_cloud.py")
ONE_DEVICE = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
SETUP = "echo \"it's set up\" > setup.txt"  # spaces and both quotes: must reach the worker as one command
pytestmark = pytest.mark.slow


def fake_cloud_env(tmp_path):
    """PATH with the fakes (and this venv's `scalax`), and the fakes' state directory."""
    bin_dir, state = tmp_path / "fake-bin", tmp_path / "fake-cloud"
    bin_dir.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    for tool in ("gcloud", "xpk", "kubectl"):
        (bin_dir / tool).write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} {tool} \"$@\"\n")
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, **ONE_DEVICE, "FAKE_CLOUD": str(state), "FAKE_CLOUD_REPO": REPO,
           "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return env, state


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import glob
    import sysconfig

    root = tmp_path_factory.mktemp("corpus")
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]:
        shutil.copy(path, root / os.path.basename(path))
    return root


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted local runs, trained once per run config: name -> workdir."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def reference(name: str, config_path: str) -> str:
        if name not in done:
            workdir = str(root / name)
            proc = subprocess.run([sys.executable, "-m", "scalax", "train", f"--config={config_path}",
                                   f"--workdir={workdir}"], cwd=REPO, env={**os.environ, **ONE_DEVICE},
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            done[name] = workdir
        return done[name]

    return reference


def sweep_flags(corpus, tmp_path):
    return ["--config=configs/sweeps/quickstart.py", "--config.sweep.budget_min=1e10",
            "--config.sweep.budget_max=1e10", "--config.sweep.n_budgets=1", "--config.sweep.sizes_per_budget=3",
            "--config.base.train.seq_len=64", "--config.base.train.log_every=20", "--config.sweep.bootstrap=10",
            f"--config.base.data.corpus={corpus}", f"--config.base.data.cache_dir={tmp_path / 'cache'}"]


def ledger(workdir) -> dict[str, dict]:
    path = io.join(workdir, "runs.jsonl")
    if not io.exists(path):
        return {}
    return {r["name"]: r for r in map(json.loads, io.read_text(path).splitlines())}


def argvs(state) -> list[list[str]]:
    with open(state / "argv.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    records = map(json.loads, io.read_text(io.join(workdir, "metrics.jsonl")).splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def check_resumed_like_uninterrupted(workdir, state, references):
    """The preempted run resumed (a `resumed` record) and its losses and eval equal an uninterrupted run's."""
    preempted = (state / "preempted.txt").read_text().split()
    assert len(preempted) == 1
    name = preempted[0]
    run_dir = io.join(workdir, "runs", name)
    records = [json.loads(line) for line in io.read_text(io.join(run_dir, "metrics.jsonl")).splitlines()]
    assert sum("resumed" in r for r in records) == 1
    reference = references(name, io.join(run_dir, "run_config.json"))
    assert losses(run_dir) == losses(reference)
    assert io.read_json(io.join(run_dir, "summary.json"))["eval_loss"] == \
        io.read_json(os.path.join(reference, "summary.json"))["eval_loss"]
    return name


def launch(env, *argv, **kw):
    return subprocess.run([sys.executable, "-m", "scalax", "launch", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def launch_and_interrupt(env, argv, workdir, list_argv):
    """Start a launch; Ctrl-C once a run has finished and another has logged (the fake holds that one, the third
    training command, as a slow machine would: scenario "pause"); check that it exits 130 with nothing left
    listed, and that the run it stopped saved a checkpoint. Returns the finished records."""
    # A shell starts background jobs with SIGINT ignored, the child would inherit that, and Python then installs
    # no KeyboardInterrupt handler: with a handler here instead, the child starts with the default action.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "scalax", "launch", *argv], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline, paused = time.time() + 400, Path(env["FAKE_CLOUD"]) / "paused.txt"
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        records = ledger(workdir)
        running = [n for n, r in records.items() if r["status"] == "running"
                   and io.exists(io.join(workdir, "runs", n, "metrics.jsonl"))]
        if sum(r["status"] == "finished" for r in records.values()) >= 1 and running and paused.exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err.splitlines()[-1]
    listed = subprocess.run(list_argv, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "sx-" not in listed.stdout  # nothing of the sweep left billing
    finished = {n: r for n, r in ledger(workdir).items() if r["status"] == "finished"}
    held = paused.read_text().split()
    assert running == held
    stopped = ledger(workdir)[held[0]]
    assert len(finished) == 1
    # it was asked to checkpoint and stop, and did
    assert stopped["status"] == "pending" and "interrupted" in stopped["error"]
    assert io.exists(io.join(workdir, "runs", held[0], "checkpoints"))
    return finished


def test_tpu_vm_preemption_interrupt_and_resume(tmp_path, bucket, corpus, references):
    env, state = fake_cloud_env(tmp_path)
    (state / "scenario.json").write_text(json.dumps({"preempt": 1, "pause": 3}))
    workdir = bucket + "/sweep"
    argv = [*sweep_flags(corpus, tmp_path), f"--workdir={workdir}", "--backend=tpu-vm", "--tpu=v5litepod-4",
            "--project=my-project", "--zone=us-west4-a", "--retries=1", "--poll-seconds=0.05", f"--setup={SETUP}"]
    first = launch_and_interrupt(env, argv, workdir, ["gcloud", "compute", "tpus", "queued-resources", "list",
                                                      "--project=my-project", "--zone=us-west4-a"])
    again = launch(env, *argv, "--max-slices=2")  # what is left, on two slices at once
    assert again.returncode == 0, again.stderr[-3000:]
    records = ledger(workdir)
    assert len(records) == 3 and all(r["status"] == "finished" for r in records.values())
    for name, record in first.items():  # not trained again
        assert records[name] == record
    preempted = check_resumed_like_uninterrupted(workdir, state, references)
    assert records[preempted]["preemptions"] == 1
    # the commands: created again with the same name after the preemption, set up with the user's command as
    # one argument, deleted at the end; every create has its delete
    calls = argvs(state)
    creates = [a[5] for a in calls if a[1:5] == ["compute", "tpus", "queued-resources", "create"]]
    deletes = [a[5] for a in calls if a[1:5] == ["compute", "tpus", "queued-resources", "delete"]]
    assert creates[0] == creates[1] and sorted(creates) == sorted(deletes)
    assert len(set(creates[2:])) == len(ledger(workdir)) - len(first)  # one slice per slot for the rest
    setups = [a for a in calls if a[-1] == f"--command={SETUP}"]
    assert len(setups) == len(creates)
    assert (state / "home" / creates[0] / "setup.txt").read_text() == "it's set up\n"
    status = subprocess.run([sys.executable, "-m", "scalax", "launch", "status", f"--workdir={workdir}", "--json"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    report = json.loads(status.stdout)
    assert report["counts"]["finished"] == 3 and report["counts"]["retried"] >= 1
    row = next(r for r in report["runs"] if r["name"] == preempted)
    assert row["retries"] >= 1 and row["tokens_done"] == row["tokens"] == records[preempted]["tokens"]


def test_tpu_vm_retries_are_bounded(tmp_path, bucket, corpus):
    """Every training preempted at once: each run is tried 1 + --retries times, then recorded failed; the launch
    exits 1 and deletes everything."""
    env, state = fake_cloud_env(tmp_path)
    (state / "scenario.json").write_text(json.dumps({"preempt": 100, "preempt_at_start": True}))
    workdir = bucket + "/sweep"
    proc = launch(env, *sweep_flags(corpus, tmp_path), f"--workdir={workdir}", "--tpu=v5litepod-1",
                  "--project=p", "--zone=z", "--retries=1", "--poll-seconds=0.01", "--setup=true")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 runs did not finish" in proc.stderr.splitlines()[-1]
    records = ledger(workdir)
    assert all(r["status"] == "failed" and r["preemptions"] == 2 and "--retries=1" in r["error"]
               for r in records.values())
    assert len((state / "preempted.txt").read_text().split()) == 6
    trainings = [a for a in argvs(state) if a[1:5] == ["compute", "tpus", "tpu-vm", "ssh"] and "scalax train" in a[-1]]
    assert len(trainings) == 6
    assert not os.listdir(state / "resources") or all(not f.endswith(".json") for f in os.listdir(state / "resources"))


def test_xpk_workloads_restart_after_preemption(tmp_path, bucket, corpus, references):
    env, state = fake_cloud_env(tmp_path)
    (state / "scenario.json").write_text(json.dumps({"preempt": 1, "pause": 3}))
    workdir = bucket + "/sweep"
    argv = [*sweep_flags(corpus, tmp_path), f"--workdir={workdir}", "--backend=xpk", "--cluster=research",
            "--image=us-docker.pkg.dev/p/scalax:1", "--tpu=v5litepod-4", "--project=my-project",
            "--zone=us-west4-a", "--retries=2", "--spot"]
    first = launch_and_interrupt(env, argv, workdir, ["xpk", "workload", "list", "--cluster=research"])
    proc = launch(env, *argv, "--max-slices=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = ledger(workdir)
    assert len(records) == 3 and all(r["status"] == "finished" for r in records.values())
    for name, record in first.items():  # not trained again
        assert records[name] == record
    check_resumed_like_uninterrupted(workdir, state, references)
    calls = argvs(state)
    creates = [a for a in calls if a[1:3] == ["workload", "create"]]
    assert 3 <= len(creates) <= 4  # one per run, and the one interrupted once more
    for a in creates:
        assert "--max-restarts=2" in a and "--spot" in a and "--docker-image=us-docker.pkg.dev/p/scalax:1" in a
        assert "--tpu-type=v5litepod-1" in a  # the smallest slice that the memory plan fits
    names = [a[4].split("=", 1)[1] for a in creates]
    deleted = [a[4].split("=", 1)[1] for a in calls if a[1:3] == ["workload", "delete"]]
    assert set(names) <= set(deleted) and not [f for f in os.listdir(state / "workloads") if f.endswith(".json")]
