"""The sweep's fork server (scaling/forkserver.py) on real processes: a forked `scalax ARGV` against the same
command run as `python -m scalax`, and a forked training run's CPUs, environment, and SIGTERM when the server
dies."""

import glob
import os
import subprocess
import sys
import sysconfig
import time

import pytest

from scalax import io
from scalax.errors import ScalaxError
from scalax.scaling.forkserver import ForkServer
from tests.conftest import REPO


def test_a_forked_command_prints_and_exits_as_python_m_scalax(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    server = ForkServer()
    try:
        for i, argv in enumerate([["--version"], ["train", "--config=configs/nothing_here.py", "--workdir=x"],
                                  ["train", "--config=configs/gpt.py", f"--workdir={tmp_path / 'w'}",
                                   "--config.train.steps=0"]]):
            log = str(tmp_path / f"{i}.log")
            child = server.start_child(argv, log)
            direct = subprocess.run([sys.executable, "-m", "scalax", *argv], capture_output=True, text=True,
                                    timeout=120)
            assert child.wait() == direct.returncode
            assert open(log).read() == direct.stdout + direct.stderr, argv
            assert child.poll() == direct.returncode and child.returncode == direct.returncode
        assert direct.returncode == 2 and "train.steps" in direct.stderr  # (each exit status, not one for all)
    finally:
        server.close()


def test_wait_sleeps_until_a_child_ends(tmp_path, monkeypatch):
    """`ForkServer.wait` (the sweep's pause between polls) takes its whole time without news and returns as soon
    as a child's end arrives: a freed slot's next run starts then, not at the next poll."""
    monkeypatch.chdir(REPO)
    server = ForkServer()
    try:
        assert server.start_child(["--version"], str(tmp_path / "a.log")).wait() == 0  # (the server is up)
        start = time.monotonic()
        server.wait(0.3)
        assert time.monotonic() - start >= 0.29
        child, start = server.start_child(["--version"], str(tmp_path / "b.log")), time.monotonic()
        while child.poll() is None:
            server.wait(60)
        assert child.returncode == 0 and time.monotonic() - start < 30
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_a_forked_run_is_pinned_has_its_environment_and_saves_when_the_server_dies(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:20]:
        (corpus / os.path.basename(path)).write_bytes(open(path, "rb").read())
    workdir, cpu = tmp_path / "run", max(os.sched_getaffinity(0))
    server = ForkServer()
    try:
        assert server.start_child(["--version"], str(tmp_path / "v.log")).wait() == 0  # (the server is up)
        monkeypatch.setenv("SCALAX_CACHE", str(tmp_path / "cache"))  # set after the server started
        child = server.start_child(["train", "--config=configs/llama.py:size=tiny", f"--workdir={workdir}",
                                    "--config.train.steps=100000", "--config.train.log_every=1",
                                    "--config.train.seq_len=32", f"--config.data.corpus={corpus}",
                                    f"--config.data.cache_dir={tmp_path / 'tokens'}"], str(tmp_path / "t.log"),
                                   {cpu})
        deadline = time.time() + 240
        while not os.path.exists(workdir / "metrics.jsonl") or "loss" not in io.read_text(workdir / "metrics.jsonl"):
            assert child.poll() is None, open(tmp_path / "t.log").read()
            assert time.time() < deadline
            time.sleep(0.05)
        assert os.sched_getaffinity(child.pid) == {cpu}
        assert os.path.exists(tmp_path / "cache" / "peak_flops.json")  # the child read the new environment
        server._proc.kill()
        with pytest.raises(ScalaxError, match="fork server"):
            while child.poll() is None:
                time.sleep(0.05)
        child.wait()  # until it is gone
    finally:
        server.close()
    log = open(tmp_path / "t.log").read()
    assert "preempted (SIGTERM): saved a checkpoint at step" in log, log
    assert [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
