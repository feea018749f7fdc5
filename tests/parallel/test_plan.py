"""`scalax plan`: per-device memory from an ahead-of-time compile on fake devices."""

import json
import os
import subprocess
import sys

import pytest

from scalax.errors import ConfigError
from scalax.models import ModelConfig, flops, presets
from scalax.parallel import devices as plan_lib
from tests.conftest import REPO

GIB = 2**30


def run_plan(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "scalax", "plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_llama3_8b_on_64_devices():
    proc = run_plan("--config=configs/llama.py:preset=llama3-8b", "--devices=64", "--device=v5p", "--json",
                    "--config.mesh.data=1", "--config.mesh.fsdp=64", "--config.train.batch_size=64",
                    "--config.train.seq_len=1024", "--config.model.remat=full")
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    n = flops.params_total(ModelConfig.from_dict(presets.preset("llama3-8b")))
    assert abs(n - 8.03e9) < 0.01e9
    analytic = n * 4 / 64  # float32 parameters, every one sharded 64 ways over fsdp
    assert abs(report["params_per_device"] - analytic) <= 0.1 * analytic
    assert abs(report["optimizer_per_device"] - 2 * analytic) <= 0.1 * 2 * analytic  # Adam's mu and nu
    # The compiled step's arguments are the state and the batch: at least params + optimizer state.
    assert report["arguments"] >= report["params_per_device"] + report["optimizer_per_device"]
    assert report["fits"] == ("fits" if report["peak_per_device"] <= 95 * GIB else "does not fit")
    assert proc.returncode == (0 if report["fits"] == "fits" else 1)


def test_plan_text_table_and_verdict():
    proc = run_plan("--config=configs/llama.py:size=tiny", "--devices=8", "--device-memory=1MiB",
                    "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    assert proc.returncode == 1, proc.stderr[-3000:]  # a tiny model's step needs more than 1 MiB
    assert "mesh data 2 x fsdp 2 x tensor 2 (8 devices), 10 step(s) a call" in proc.stdout  # auto on this CPU
    for device in plan_lib.DEVICE_MEMORY:
        assert f"\n{device} " in proc.stdout
    assert "does not fit on 1.0 MiB per device" in proc.stdout


def test_plan_with_steps_per_call_holds_the_stack_of_batches():
    """With train.steps_per_call K > 1 the plan compiles what the run calls, K steps over a [K, B, T + 1] stack of
    int32 batches and a step count: its arguments exceed the one-step plan's by (K - 1) batches and 4 bytes. Auto
    (0) plans the platform's K: AUTO_STEPS_PER_CALL on CPU, one step on TPU."""
    from scalax.config import load
    from scalax.train.memory import memory_plan
    from scalax.train.setup import AUTO_STEPS_PER_CALL

    B, T, K = 4, 32, AUTO_STEPS_PER_CALL

    def plan(k: int, platform: str) -> dict:
        return memory_plan(load("configs/llama.py:size=tiny", [f"--config.train.batch_size={B}",
                                                               f"--config.train.seq_len={T}",
                                                               f"--config.train.steps_per_call={k}"]), 1, platform)

    one, auto_cpu, auto_tpu = plan(1, "cpu"), plan(0, "cpu"), plan(0, "tpu")
    assert auto_cpu["arguments"] - one["arguments"] == (K - 1) * B * (T + 1) * 4 + 4
    assert auto_cpu["params_per_device"] == one["params_per_device"] and auto_cpu["steps_per_call"] == K
    assert auto_tpu == one


def test_steps_per_call_auto_is_ten_on_cpu_one_elsewhere():
    from ml_collections import ConfigDict

    from scalax.train.setup import steps_per_call

    assert [steps_per_call(ConfigDict({"steps_per_call": 0}), p) for p in ("cpu", "gpu", "tpu")] == [10, 1, 1]
    assert [steps_per_call(ConfigDict({"steps_per_call": 3}), p) for p in ("cpu", "gpu", "tpu")] == [3, 3, 3]
    assert steps_per_call(ConfigDict({}), "cpu") == 1  # a resolved config written before the key existed


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * GIB), ("80GB", 80 * 10**9), ("1.5 TiB", int(1.5 * 2**40)),
                                           ("512mib", 512 * 2**20), ("1000", 1000)])
def test_parse_memory(text, expected):
    assert plan_lib.parse_memory(text) == expected


def test_plan_errors():
    with pytest.raises(ConfigError):
        plan_lib.parse_memory("lots")
    with pytest.raises(ConfigError) as e:
        plan_lib.device_memory("v9", None)
    assert "v5p" in str(e.value)
    proc = run_plan("--config=configs/llama.py:size=tiny", "--devices=8", "--config.mesh.data=3")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "mesh" in proc.stderr, proc.stderr
