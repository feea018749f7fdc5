"""The compiled pieces of a run on a mesh: the sharded initialiser and the jitted train and eval steps.

One code path for 1 device, 8 fake CPU devices and a TPU pod: the loop, `scalax plan` and the tests all build
their steps here. Parameters are initialised straight into their shardings (`jax.jit(init, out_shardings)`
from the eval_shape of init); the train step is jitted with in/out shardings and donates the old state; the
optimizer state is sharded like the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from scalax.models import Decoder
from scalax.parallel import shardings
from scalax.parallel.mesh import Layout
from scalax.train.state import init_state
from scalax.train.step import make_eval_step, make_train_step, make_train_steps


def run_once_compiler_options() -> dict[str, Any] | None:
    """XLA options for a program that runs once or never: an initialiser, or a step compiled only for its memory
    analysis (`scalax plan`). On CPU the backend's (LLVM's) optimisation passes take 5 s for even a tiny model's
    init and buy nothing (1.3 s without them; the same random bits, only some normal draws' last float32 bit may
    differ); a quickstart step's plan compiles 1.3-1.6x sooner with the same bytes (XLA assigns buffers before
    LLVM runs). Elsewhere the defaults."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


@functools.cache
def step_compiler_options() -> dict[str, Any] | None:
    """XLA options for the train and eval steps. On CPU, XLA's YNNPACK fusions off (jax 0.10 turns them on): at
    quickstart shapes a softmax-gradient reduction took 2.2 ms of a 14 ms step inside one, and without them the
    step ran 1.06-1.37x faster for models of d_model 16-128 (benchmarks/cpu_step_options.py). And LLVM's O2
    instead of XLA's default O3 (`xla_backend_optimization_level`): the quickstart's steps compile 0.03-1.1 s
    sooner of 3.5-5 s and run as fast or faster (d16 x 1: 5.3 -> 4.7 ms); issue #14's d256 GPT step the same
    within noise. And XLA's tree-reduction rewrite off (it splits every reduction over an axis longer than 32
    into reduce-windows of 32, run an output element at a time): with the sums of models/reductions.py (the
    parameter gradients as matmuls against ones) the quickstart's steps ran 1.02-1.18x faster without it and
    issue #14's float32 GPT step (d_model 256) as fast (docs/benchmarks.md). The same numerics up to float
    rounding order. Where this XLA has no such option, and elsewhere, the defaults."""
    if jax.default_backend() != "cpu":
        return None
    options = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_backend_optimization_level": 2,
               "xla_disable_hlo_passes": "tree_reduction_rewriter"}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(0.0).compile()
    except Exception:  # an XLA without the option: "No such compile option"
        return None
    return options


@dataclasses.dataclass(frozen=True)
class Program:
    layout: Layout
    abstract_state: Any  # ShapeDtypeStructs of the TrainState, carrying their shardings
    state_sharding: Any
    params_sharding: Any
    init: Callable[[], Any]  # () -> TrainState, born sharded
    train_step: Callable  # (state, batch_BxT1) -> (state, metrics)
    train_steps: Callable | None  # (state, batches_KxBxT1, n) -> (state, metrics [K]); None when K = 1
    eval_step: Callable  # (params, windows_NxT1) -> per-window mean loss [N], replicated
    steps_per_call: int = 1  # K: the steps of one call of train_steps

    def batch_shape(self, batch_size: int, seq_len: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch_size, seq_len + 1), jax.numpy.int32, sharding=self.layout.batch_sharding)

    def lower_call(self, batch_size: int, seq_len: int):
        """What a run calls, lowered for abstract inputs: `train_steps` on a [K, B, T + 1] stack of batches when
        the program has it (K > 1), else `train_step` on one [B, T + 1] batch."""
        if self.train_steps is None:
            return self.train_step.lower(self.abstract_state, self.batch_shape(batch_size, seq_len))
        batches = jax.ShapeDtypeStruct((self.steps_per_call, batch_size, seq_len + 1), jax.numpy.int32,
                                       sharding=self.layout.stacked_batch_sharding)
        return self.train_steps.lower(self.abstract_state, batches, jax.ShapeDtypeStruct((), jax.numpy.int32))


def compile_program(model: Decoder, tx: optax.GradientTransformation, schedule: optax.Schedule, layout: Layout,
                    seed: int, seq_len: int, microbatches: int = 1, z_loss: float = 0.0, steps_per_call: int = 1
                    ) -> Program:
    """The run's compiled pieces; with steps_per_call = K > 1 also `train_steps`, up to K steps in one call."""
    abstract = jax.eval_shape(lambda: init_state(model, tx, seed, seq_len))
    params_sharding = shardings.param_shardings(model, layout)
    state_sharding = shardings.state_shardings(abstract, params_sharding, layout)
    init = jax.jit(lambda: init_state(model, tx, seed, seq_len), out_shardings=state_sharding,
                   compiler_options=run_once_compiler_options())
    step_fn = make_train_step(model, tx, schedule, microbatches, z_loss, layout)
    train_step = layout.traced_in(jax.jit(
        step_fn, in_shardings=(state_sharding, layout.batch_sharding), donate_argnums=0,
        out_shardings=(state_sharding, layout.replicated), compiler_options=step_compiler_options()))
    train_steps = None if steps_per_call == 1 else layout.traced_in(jax.jit(
        make_train_steps(step_fn, steps_per_call), donate_argnums=0, compiler_options=step_compiler_options(),
        in_shardings=(state_sharding, layout.stacked_batch_sharding, layout.replicated),
        out_shardings=(state_sharding, layout.replicated)))
    eval_step = layout.traced_in(jax.jit(make_eval_step(model, layout), out_shardings=layout.replicated,
                                         in_shardings=(params_sharding, layout.batch_sharding),
                                         compiler_options=step_compiler_options()))
    return Program(layout, shardings.with_shardings(abstract, state_sharding), state_sharding, params_sharding, init,
                   train_step, train_steps, eval_step, steps_per_call)
