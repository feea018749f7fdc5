"""Two processes x 4 CPU devices (jax.distributed, gloo on 127.0.0.1) train exactly like one process with 8
devices, each process reading only its half of every batch; a checkpoint saved on one mesh restores on others."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
STEPS = 6
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


def finish(proc) -> str:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process timed out after {TIMEOUT} s: {err[-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def train_windows(path) -> list[int]:
    with open(path) as f:
        reads = json.load(f)
    longest = max(n for n, _ in reads)  # the training split; validation windows are read by every process
    return [i for n, i in reads if n == longest]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    workdir, reads = str(root / "run"), str(root / "reads.json")
    finish(start(command(corpus, workdir), 8, reads))
    return workdir, losses(workdir), train_windows(reads)


def test_two_processes_equal_one(corpus, one_process, tmp_path):
    _, ref_losses, ref_reads = one_process
    workdir = str(tmp_path / "run")
    port = free_port()
    procs = [start(command(corpus, workdir, STEPS, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                           f"--process_id={i}"), 4, str(tmp_path / f"reads{i}.json")) for i in range(2)]
    outs = [finish(p) for p in procs]
    assert "mesh data 8 x fsdp 1 x tensor 1 (2 process(es))" in outs[0]
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref_losses[s] for s in sorted(ref_losses)],
                               rtol=1e-5)
    reads = [train_windows(str(tmp_path / f"reads{i}.json")) for i in range(2)]
    # Each process read only its half of each batch: disjoint halves whose union is what one process read.
    assert not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == sorted(ref_reads)
    assert abs(len(reads[0]) - len(reads[1])) <= 16  # up to one batch of read-ahead apart
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl.1"))  # only process 0 wrote the logs


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
        out = finish(start(command(corpus, resumed, STEPS), devices, str(tmp_path / "r.json")))
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
