"""train/host_memory.py: with the setting, memory a process frees stays resident for reuse; without it, glibc
returns a large freed block to the kernel. Measured from the kernel's own count of resident pages."""

import subprocess
import sys

import pytest

from scalax.train import host_memory

PROBE = """
import sys
import numpy as np
from scalax.train import host_memory
keep = sys.argv[1] == "keep"
if keep:
    assert host_memory.keep_freed_memory()
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
before = resident_mib()
block = np.ones(128 * 2**20, dtype=np.uint8)  # 128 MiB, every page touched
held = resident_mib()
del block
print(held - before, resident_mib() - before)
"""


def resident_after_free(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    held, after = map(float, out.stdout.split())
    return held, after


@pytest.mark.skipif(host_memory._mallopt() is None, reason="no mallopt in this C library")
def test_a_freed_block_stays_resident_only_with_the_setting():
    held, after = resident_after_free("default")
    assert held > 120  # the 128 MiB block was resident while held
    assert after < 16  # glibc unmapped it on free: the next step would fault its pages in again
    held, after = resident_after_free("keep")
    assert held > 120
    assert after > 120  # kept: the next allocation of that size reuses the same pages


def test_no_setting_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory._mallopt() is None
