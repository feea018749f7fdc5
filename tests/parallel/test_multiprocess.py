"""Two processes x 4 CPU devices (jax.distributed, gloo on 127.0.0.1) train exactly like one process with 8
devices, each process reading only its half of every batch; a preemption stops every process at the same step;
a checkpoint saved by 2 processes resumes on 1 and on 4, and one saved on one mesh restores on others."""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import pytest

from scalax import io
from tests.conftest import REPO

pytestmark = pytest.mark.slow
STEPS = 24  # long enough for the preemption sync point to arrive after the signal
TIMEOUT = 240  # seconds: a process whose peer never comes up aborts instead of hanging the suite


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:40]:
        with open(path, "rb") as f:
            (root / os.path.basename(path)).write_bytes(f.read())
    return str(root), str(tmp_path_factory.mktemp("cache"))


def command(corpus, workdir, steps=STEPS, *extra):
    root, cache = corpus
    return [os.path.join(REPO, "tests", "parallel", "record_reads.py"), "train",
            "--config=configs/llama.py:size=tiny", f"--workdir={workdir}", f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=3", "--config.train.log_every=1", "--config.train.eval_every=1000",
            "--config.train.batch_size=16", "--config.train.seq_len=64", "--config.optim.warmup_steps=0",
            "--config.optim.schedule=constant", "--config.model.dtype=float32", "--config.data.prefetch=1",
            f"--config.data.corpus={root}", f"--config.data.cache_dir={cache}", *extra]


def env(devices: int, reads: str) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "SCALAX_TEST_READS": reads, "PYTHONPATH": REPO}


def start(cmd, devices, reads):
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env(devices, reads), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, expect: int = 0) -> tuple[str, str]:
    """(stdout, stderr) of a process that exited with status `expect`."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process timed out after {TIMEOUT} s: {err[-2000:]}")
    assert proc.returncode == expect, err[-3000:]
    return out, err


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def consumed(path) -> list[list[int]]:
    """Per step, the training windows a process consumed (record_reads.py)."""
    with open(path) as f:
        return json.load(f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    workdir, reads = str(root / "run"), str(root / "reads.json")
    finish(start(command(corpus, workdir), 8, reads))
    return workdir, losses(workdir), consumed(reads)


def start_processes(corpus, workdir, count, devices, reads_prefix):
    port = free_port()
    # (a wall-clock interval that never falls due: process 0's decision is still broadcast at every log step)
    return [start(command(corpus, workdir, STEPS, f"--coordinator=127.0.0.1:{port}", f"--num_processes={count}",
                          f"--process_id={i}", "--config.train.checkpoint_minutes=1000"), devices,
                  f"{reads_prefix}{i}.json") for i in range(count)]


def global_batches(per_process: list[list[list[int]]]) -> list[list[int]]:
    """Per step, the sorted union of every process's rows."""
    return [sorted(i for process_rows in rows for i in process_rows) for rows in zip(*per_process, strict=True)]


def test_preempted_two_processes_resume_on_one_and_on_four(corpus, one_process, tmp_path):
    """Two processes x 4 devices train like one process x 8, each consuming its half of every batch; SIGTERM to
    one of them stops both at the same step (JAX's preemption sync point: JAX's own notifier catches the signal
    on CPU too), saved; that checkpoint resumes on one process and on four, which go on with the uninterrupted
    run's global batches and losses: every window consumed once, none skipped."""
    _, ref_losses, ref_consumed = one_process
    ref_batches = [sorted(rows) for rows in ref_consumed]
    workdir = str(tmp_path / "two")
    procs = start_processes(corpus, workdir, 2, 4, str(tmp_path / "two"))
    deadline = time.time() + TIMEOUT
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not os.path.exists(metrics) or max(losses(workdir), default=0) < 2:  # JAX's notifier is up by then
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("the two processes did not reach step 2: " + procs[1].communicate()[1][-3000:])
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [finish(p, expect=143) for p in procs]
    saved = {int(re.search(r"preempted \(SIGTERM\): saved a checkpoint at step (\d+)", err)[1]) for _, err in outs}
    assert len(saved) == 1, outs  # both processes saved the same step
    stop = saved.pop()
    assert 2 < stop < STEPS
    assert ("mesh data 8 x fsdp 1 x tensor 1 (2 process(es)); attention einsum (auto on cpu); up to 10 step(s) a "
            "call") in outs[0][0]
    got = losses(workdir)
    assert sorted(got) == list(range(1, stop + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref_losses[s] for s in sorted(got)], rtol=1e-5)
    halves = [consumed(str(tmp_path / f"two{i}.json"))[:stop] for i in range(2)]
    for a, b in zip(*halves, strict=True):  # disjoint halves of each global batch
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    assert global_batches(halves) == ref_batches[:stop]
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl.1"))  # only process 0 wrote the logs

    for count, devices in ((1, 8), (4, 2)):
        resumed = str(tmp_path / f"resumed{count}")
        shutil.copytree(workdir, resumed)
        outs = [finish(p) for p in start_processes(corpus, resumed, count, devices, str(tmp_path / f"r{count}-"))]
        assert f"resuming {resumed} from step {stop}" in outs[0][0]
        assert f"({count} process(es))" in outs[0][0]
        got = losses(resumed)
        assert sorted(got) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([got[s] for s in range(stop + 1, STEPS + 1)],
                                   [ref_losses[s] for s in range(stop + 1, STEPS + 1)], rtol=1e-5)
        after = [consumed(str(tmp_path / f"r{count}-{i}.json")) for i in range(count)]
        assert all(len(rows) == 16 // count for per in after for rows in per)
        batches = global_batches(halves) + global_batches(after)
        assert batches == ref_batches
        every = [i for batch in batches for i in batch]
        assert len(every) == len(set(every))  # less than an epoch: no window twice (tests/data: over epochs)


def test_restore_on_other_meshes(corpus, one_process, tmp_path):
    """Save on (2, 2, 2) after 3 steps; resume on (8, 1, 1) and on one device: the same next losses as the
    uninterrupted 8-device run (the schedule is constant, so a run of 3 steps extended to 6 is the same run)."""
    _, ref_losses, _ = one_process
    first = str(tmp_path / "first")
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    finish(start(command(corpus, first, 3, *mesh), 8, str(tmp_path / "r.json")))
    np.testing.assert_allclose([losses(first)[s] for s in (1, 2, 3)], [ref_losses[s] for s in (1, 2, 3)], rtol=1e-5)
    for name, devices in (("eight", 8), ("single", 1)):
        resumed = str(tmp_path / name)
        shutil.copytree(first, resumed)
        out, _ = finish(start(command(corpus, resumed, 6), devices, str(tmp_path / "r.json")))
        assert f"resuming {resumed} from step 3" in out
        assert f"mesh data {devices} x fsdp 1 x tensor 1" in out
        got = losses(resumed)
        np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [ref_losses[s] for s in (4, 5, 6)], rtol=1e-5)
    # The parameters restored onto each mesh are the saved ones, bit for bit.
    restored = {sizes: restore(corpus, first, sizes) for sizes in ((2, 2, 2), (8, 1, 1), (1, 1, 1))}
    reference = restored[(2, 2, 2)]
    for sizes, params in restored.items():
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=str(sizes))
    assert len(restored[(8, 1, 1)]["embed"]["embedding"].sharding.device_set) == 8  # on the new mesh


def restore(corpus, workdir, sizes):
    """The checkpoint's parameters restored in this process onto a (data, fsdp, tensor) mesh."""
    from scalax import config as config_lib
    from scalax.models import Decoder
    from scalax.parallel import mesh as mesh_lib
    from scalax.train import optim, program
    from scalax.train.checkpoint import Checkpointer

    cfg = config_lib.load(os.path.join(workdir, "config.json"))
    cfg.mesh.update(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])
    model_cfg = config_lib.model_config(cfg)
    devices = jax.devices()[: int(np.prod(sizes))]
    layout = mesh_lib.layout(cfg.mesh, model_cfg, cfg.train.batch_size, devices=devices)
    steps = cfg.train.steps
    prog = program.compile_program(Decoder(model_cfg), optim.optimizer(cfg.optim, steps),
                                   optim.schedule(cfg.optim, steps), layout, cfg.train.seed, cfg.train.seq_len)
    checkpointer = Checkpointer(workdir, 3)
    try:
        step, state, _, _ = checkpointer.restore_latest(prog.abstract_state)
    finally:
        checkpointer.close()
    assert step == 3
    return state.params


def test_training_from_shards_on_a_bucket_equals_training_from_local_disk(corpus, one_process, bucket, tmp_path):
    """`scalax prepare` writes the token shards to gs:// (the emulator); `scalax train` on machines without a copy
    reads them there by window: the same losses, bit for bit, as from the same shards on local disk, with one
    process and with two, whose windows are disjoint halves of the one process's batches. No shard is downloaded
    whole."""
    steps, cache = 6, f"{bucket}/tokens"
    _, ref_losses, ref_consumed = one_process

    def run(workdir, count, devices, *extra):
        port, home = free_port(), tmp_path / f"home-{os.path.basename(workdir)}"  # a machine of its own
        multi = [f"--coordinator=127.0.0.1:{port}", f"--num_processes={count}"] if count > 1 else []
        procs = [subprocess.Popen([sys.executable, *command(corpus, workdir, steps, *multi, *extra,
                                                            *([f"--process_id={i}"] if count > 1 else []))],
                                  cwd=REPO, env={**env(devices, f"{workdir}-{i}.json"), "SCALAX_CACHE": str(home)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
        for p in procs:
            finish(p)
        assert not glob.glob(f"{home}/**/*.bin", recursive=True)  # read by window, never fetched whole
        return losses(workdir), [consumed(f"{workdir}-{i}.json") for i in range(count)]

    prepared = subprocess.run([sys.executable, "-m", "scalax", "prepare", "--config=configs/llama.py:size=tiny",
                               f"--config.data.corpus={corpus[0]}", f"--config.data.cache_dir={cache}"],
                              cwd=REPO, env={**env(1, ""), "SCALAX_CACHE": str(tmp_path / "home-prepare")},
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    [written] = io.listdir(cache)
    assert {"header.json", "train-00000.bin", "val-00000.bin"} <= set(io.listdir(f"{cache}/{written}"))

    one, [reads] = run(str(tmp_path / "gcs1"), 1, 8, f"--config.data.cache_dir={cache}")
    assert one == {s: ref_losses[s] for s in range(1, steps + 1)}  # bit for bit
    assert reads == ref_consumed[:steps]
    local_two, _ = run(str(tmp_path / "local2"), 2, 4)
    two, halves = run(str(tmp_path / "gcs2"), 2, 4, f"--config.data.cache_dir={cache}")
    assert two == local_two
    for a, b in zip(*halves, strict=True):
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    assert global_batches(halves) == [sorted(rows) for rows in ref_consumed[:steps]]
