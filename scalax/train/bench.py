"""`scalax bench`: the real train step of each config (its mesh, optimizer, donation, compiler options), timed on
random tokens: tokens/s, achieved FLOP/s, MFU, compile time and peak memory per device.

With `train.steps_per_call` K > 1 the steps go K to a compiled call, as a run calls them (a round's steps rounded
up to whole calls). The configs are compiled first, then timed in `rounds` rounds of `steps` steps that alternate
between them, and the median round is reported (a machine's speed drifts between minutes; alternating spreads the
drift over every config). FLOPs count the `6n_head_attn` convention, as MFU does in training logs; the peak is the
data sheet's on TPU and GPU, and on CPU a matmul measured once per machine (train/metrics.py), named in the output.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from scalax.models import flops
from scalax.train import memory
from scalax.train.loop import MFU_CONVENTION
from scalax.train.metrics import peak_flops_per_device
from scalax.train.setup import setup_run


class Bench:
    """One config's compiled step, state and batch, and its timed rounds."""

    def __init__(self, name: str, cfg: ConfigDict):
        self.name, self.cfg = name, cfg
        run = setup_run(cfg)
        prog, train_cfg = run.program, cfg.train
        self.run, self.tokens = run, train_cfg.batch_size * train_cfg.seq_len
        start = time.perf_counter()
        self.step = prog.lower_call(train_cfg.batch_size, train_cfg.seq_len).compile()
        self.compile_seconds = time.perf_counter() - start
        ma = self.step.memory_analysis()
        self.peak_bytes = memory.peak_bytes(ma) if ma is not None else None
        k, shape = self.steps_per_call, (train_cfg.batch_size, train_cfg.seq_len + 1)
        tokens = np.random.default_rng(0).integers(0, run.model.vocab_size, shape if k == 1 else (k, *shape),
                                                   dtype=np.int32)
        # one batch, or a stack of K batches and the count of steps to take from it
        self.args: tuple = ((jax.device_put(tokens, run.layout.batch_sharding),) if k == 1 else
                            (jax.device_put(tokens, run.layout.stacked_batch_sharding),
                             jax.device_put(np.int32(k), run.layout.replicated)))
        self.state = prog.init()
        self.time_steps(1)  # the first call allocates and warms caches
        self.rates: list[float] = []

    @property
    def steps_per_call(self) -> int:
        """K: the steps of one compiled call, as the run calls them."""
        return self.run.program.steps_per_call

    def time_steps(self, steps: int) -> float:
        """Tokens/s over at least `steps` steps, whole calls of K (the last one waited for)."""
        calls = -(-steps // self.steps_per_call)
        start, state = time.perf_counter(), self.state
        for _ in range(calls):
            state, metrics = self.step(state, *self.args)
        jax.block_until_ready(metrics)
        self.state = state
        return calls * self.steps_per_call * self.tokens / (time.perf_counter() - start)

    def result(self) -> dict:
        model, devices = self.run.model, self.run.layout.mesh.size
        tokens_per_s = statistics.median(self.rates)
        per_token = flops.flops_per_token(model, self.cfg.train.seq_len, MFU_CONVENTION)
        peak, source = peak_flops_per_device(model.dtype)
        return {"name": self.name, "params": flops.params_total(model), "dtype": model.dtype,
                "batch_size": self.cfg.train.batch_size, "seq_len": self.cfg.train.seq_len,
                "steps_per_call": self.steps_per_call,
                "devices": devices, "tokens_per_s": tokens_per_s, "tokens_per_s_rounds": self.rates,
                "flops_per_token": per_token, "flops_per_s": tokens_per_s * per_token,
                "mfu": tokens_per_s * per_token / (peak * devices), "peak_flops_per_device": peak,
                "peak_source": source, "compile_seconds": self.compile_seconds,
                "peak_bytes_per_device": self.peak_bytes}


def bench(configs: dict[str, ConfigDict], steps: int = 10, rounds: int = 3, log=print) -> list[dict]:
    """Each named config's throughput, MFU, compile time and memory (see the module docstring)."""
    benches = []
    for name, cfg in configs.items():
        log(f"compiling {name}")
        benches.append(Bench(name, cfg))
    for r in range(rounds):
        for b in benches:
            b.rates.append(b.time_steps(steps))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{b.name} {b.rates[-1]:,.0f} tokens/s" for b in benches))
    return [b.result() for b in benches]


def format_table(results: list[dict]) -> str:
    rows = ["| config | params | dtype | batch x seq | tokens/s (median) | min .. max | TFLOP/s | MFU | compile s "
            "| peak MiB/device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        memory = f"{r['peak_bytes_per_device'] / 2**20:,.1f}" if r["peak_bytes_per_device"] is not None else "?"
        rows.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['dtype']} | {r['batch_size']} x {r['seq_len']} "
                    f"| {r['tokens_per_s']:,.0f} | {min(r['tokens_per_s_rounds']):,.0f} .. "
                    f"{max(r['tokens_per_s_rounds']):,.0f} | {r['flops_per_s'] / 1e12:.3f} | {r['mfu']:.1%} | "
                    f"{r['compile_seconds']:.1f} | {memory} |")
    for peak, source in dict.fromkeys((r["peak_flops_per_device"], r["peak_source"]) for r in results):
        rows.append(f"MFU against {peak / 1e12:.3f} TFLOP/s per device ({source})")
    return "\n".join(rows)
