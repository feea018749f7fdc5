"""Shared pieces of the parallelism tests: a small float32 model whose shapes divide by 8, and a run of k
steps on a layout."""

from __future__ import annotations

import jax
import numpy as np
from ml_collections import ConfigDict

from scalax.models import Decoder
from scalax.parallel import mesh as mesh_lib
from scalax.train import optim, program
from tests.conftest import small_config

SEQ_LEN = 16
BATCH = 8


def model_config(family: str):
    """V 64, D 32, L 2, H 8 (K 4), F 64; LLaMA with 2 kv heads (GQA), so tensor 4 and 8 replicate them."""
    return small_config(family, vocab_size=64, n_heads=8, d_ff=64, init_std=0.02)


def optim_config() -> ConfigDict:
    return ConfigDict({"lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "final_lr_fraction": 1.0,
                       "wsd_decay_fraction": 0.2, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                       "decay_embeddings": False, "grad_clip": 1.0})


def mesh_cfg(data: int, fsdp: int, tensor: int) -> ConfigDict:
    return ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def batches(cfg, n: int, seed: int = 0) -> list[np.ndarray]:
    """Two random batches, alternating (n in all): repeated batches give a loss that visibly falls in 6 steps."""
    rng = np.random.default_rng(seed)
    pair = [rng.integers(0, cfg.vocab_size, (BATCH, SEQ_LEN + 1), dtype=np.int32) for _ in range(2)]
    return [pair[i % 2] for i in range(n)]


def run_steps(cfg, mesh: ConfigDict, data: list[np.ndarray], devices=None):
    """(losses, final params as float64 numpy) after len(data) steps on the layout."""
    layout = mesh_lib.layout(mesh, cfg, BATCH, devices=devices)
    steps = 100
    oc = optim_config()
    prog = program.compile_program(Decoder(cfg), optim.optimizer(oc, steps), optim.schedule(oc, steps), layout, 0,
                                   SEQ_LEN)
    state = prog.init()
    losses = []
    for batch in data:
        state, metrics = prog.train_step(state, jax.device_put(batch, layout.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(lambda x: np.asarray(x, np.float64), state.params), state, prog
