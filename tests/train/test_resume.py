"""Exact resume with real processes: SIGKILL, SIGTERM, a truncated latest checkpoint, a changed config."""

import glob
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import pytest

from scalax import io
from tests.conftest import REPO

pytestmark = pytest.mark.slow
STEPS = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus (80 stdlib modules) and a token cache shared by the module's runs."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:80]:
        with open(path, "rb") as f:
            (root / os.path.basename(path)).write_bytes(f.read())
    return str(root), str(tmp_path_factory.mktemp("cache"))


def command(corpus, workdir, *extra):
    root, cache = corpus
    return [sys.executable, "-m", "scalax", "train", "--config=configs/gpt.py:size=tiny", f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=10", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.train.batch_size=16", "--config.train.seq_len=128",
            "--config.optim.warmup_steps=5", f"--config.data.corpus={root}", f"--config.data.cache_dir={cache}",
            *extra]


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def losses(workdir) -> dict[int, float]:
    """Every logged training loss of a workdir (local or gs://), each step once."""
    out = {}
    for line in io.read_text(io.join(workdir, "metrics.jsonl")).splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out


def last_step(workdir) -> int:
    path = io.join(workdir, "metrics.jsonl")
    if not io.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in io.read_text(path).splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    proc = run(command(corpus, workdir))
    assert proc.returncode == 0, proc.stderr
    result = losses(workdir)
    assert sorted(result) == list(range(1, STEPS + 1))
    # The compiled train steps (train.steps_per_call auto: ten a call on CPU) went into the persistent compilation
    # cache (cli.use_compilation_cache): the runs below load it, and must still match this run's losses bit for bit.
    assert glob.glob(os.path.join(io.cache_root(), "jax", "jit_train_steps-*"))
    return workdir, result


def interrupt_after(cmd, step, sig):
    """Start a run, send `sig` once it has logged `step`; returns the finished process."""
    workdir = cmd[5].split("=", 1)[1]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.time() + 240
    while last_step(workdir) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05 if io.is_remote(workdir) else 0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_bit_for_bit(corpus, reference, tmp_path, sig):
    cmd = command(corpus, str(tmp_path / "run"))
    proc, err = interrupt_after(cmd, 35, sig)
    killed_at = last_step(str(tmp_path / "run"))
    assert killed_at < STEPS, "the run finished before it could be interrupted"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert "preempted (SIGTERM): saved a checkpoint at step" in err and "Traceback" not in err
        saved = int(err.split("at step ")[1].split()[0])
        assert os.path.isdir(tmp_path / "run" / "checkpoints" / str(saved))
    else:
        assert proc.returncode == -signal.SIGKILL
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    assert losses(str(tmp_path / "run")) == reference[1]  # every step, bit for bit


def test_steps_per_call_trains_the_same_steps_and_resumes(corpus, reference, tmp_path):
    """Four steps per compiled call, the calls cut short at logs and saves (steps 1-4, 5, 6-8, 9-10, ...): the
    one-step reference's losses, bit for bit; a SIGTERM saves at a call's end, and the resume goes on the same."""
    workdir = str(tmp_path / "run")
    cmd = command(corpus, workdir, "--config.train.steps_per_call=4", "--config.train.log_every=5")
    proc, err = interrupt_after(cmd, 30, signal.SIGTERM)
    assert proc.returncode == 143, err
    again = run(cmd)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr
    got = losses(workdir)
    assert sorted(got) == list(range(5, STEPS + 1, 5))
    assert got == {step: reference[1][step] for step in got}


def test_truncated_latest_checkpoint_falls_back(corpus, reference, tmp_path):
    workdir = str(tmp_path / "run")
    assert run(command(corpus, workdir, "--config.train.steps=30")).returncode == 0
    first = losses(workdir)
    # Truncate every array file of the latest checkpoint (step 30), as a disk-full or killed copy would.
    files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", "30", "state", "**", "*"), recursive=True)
             if os.path.isfile(p) and "/d/" in p]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    proc = run(command(corpus, workdir, "--config.train.steps=30"))
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint step 30 is unreadable" in proc.stdout + proc.stderr
    assert "resuming" in proc.stdout and "from step 20" in proc.stdout
    # steps 21..30 were trained again from checkpoint 20: logged once each, equal to the first attempt's
    assert sorted(first) == list(range(1, 31))
    assert losses(workdir) == first
    assert os.listdir(os.path.join(workdir, "checkpoints_unreadable"))  # the damaged step is kept aside


def test_run_on_a_bucket_resumes_bit_for_bit_and_falls_back(corpus, reference, bucket):
    """A workdir on gs:// (the emulator): killed mid-run, the run resumes from the bucket, every loss equal to
    the uninterrupted local run's; then a damaged final checkpoint on the bucket falls back to the one before."""
    workdir = f"{bucket}/runs/a"
    cmd = command(corpus, workdir)
    proc, err = interrupt_after(cmd, 35, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and last_step(workdir) < STEPS, err
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing written locally under the URL's name
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    assert losses(workdir) == reference[1]
    assert {"config.json", "summary.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= set(io.listdir(workdir))
    # TensorBoard's own reader reads the scalars back from the bucket's event files (downloaded as they lie)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = os.path.join(os.path.dirname(corpus[1]), f"tb-{os.path.basename(bucket)}")
    os.makedirs(local, exist_ok=True)
    for name in io.listdir(f"{workdir}/tensorboard"):
        with open(os.path.join(local, name), "wb") as f:
            f.write(io.read_bytes(f"{workdir}/tensorboard/{name}"))
    acc = EventAccumulator(local)
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert set(tb) == set(range(1, STEPS + 1))
    assert all(abs(tb[s] - loss) <= 1e-6 * abs(loss) for s, loss in reference[1].items())  # float32 in events
    # Damage every array file of the final checkpoint on the bucket, as an interrupted upload would.
    fs = io._fs(workdir)
    files = [f"gs://{p}" for p in fs.find(f"{workdir}/checkpoints/{STEPS}/state") if "/d/" in p]
    assert files
    for path in files:
        data = io.read_bytes(path)
        io.atomic_write_bytes(path, data[: len(data) // 2])
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint step {STEPS} is unreadable" in proc.stdout + proc.stderr
    assert f"from step {STEPS - 10}" in proc.stdout
    assert losses(workdir) == reference[1]  # the last 10 steps trained again, equal
    assert io.listdir(f"{workdir}/checkpoints_unreadable")


def test_changed_model_config_is_refused(corpus, reference):
    workdir, _ = reference
    proc = run(command(corpus, workdir, "--config.model.n_layers=3", "--config.model.position=rope"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "model.n_layers (2 in the checkpoint, 3 now)" in lines[0]
    assert "model.position ('learned' in the checkpoint, 'rope' now)" in lines[0]


def test_finished_run_is_not_trained_again(corpus, reference):
    workdir, expected = reference
    proc = run(command(corpus, workdir))
    assert proc.returncode == 0, proc.stderr
    assert "already holds the run's final checkpoint" in proc.stdout
    assert losses(workdir) == expected
