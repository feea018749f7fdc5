"""Validation loss at evaluation lengths other than the training length: how a positional scheme extrapolates.

At each length L, two measurements over the validation split (nats per token):
- non-overlapping windows: `train.eval_windows` windows of L + 1 tokens evenly spaced over the split, as the
  training run evaluates (at L = train.seq_len the same windows, so the same number as the run's own eval
  loss), and the loss at each position 0..L-1 averaged over them;
- strided sliding windows (Press et al. 2022's evaluation): over the first tokens of the split, windows of L
  tokens every `stride` tokens, each scoring only the tokens that no earlier window scored, so every token but
  those of the first window is predicted with at least L - stride tokens of context.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from scalax.data import pipeline
from scalax.errors import ConfigError
from scalax.models import Decoder, ModelConfig, positions
from scalax.parallel import mesh as mesh_lib
from scalax.parallel import shardings
from scalax.train import step
from scalax.train.program import step_compiler_options


@dataclasses.dataclass
class Strided:
    """Strided evaluation at one length: windows of `length` every `stride` tokens; `tokens` scored."""

    stride: int
    tokens: int
    loss: float


@dataclasses.dataclass
class AtLength:
    """The losses at one evaluation length L."""

    length: int
    windows: int
    loss: float
    loss_se: float
    per_position: list[float]  # [L]: mean loss at each position over the windows
    strided: Strided | None = None


def check_lengths(lengths: list[int], model: ModelConfig) -> None:
    """Positive lengths within the scheme's limit (a learned table's size), one clear line otherwise."""
    for length in lengths:
        if length <= 0:
            raise ConfigError("--lengths", f"got {length}; allowed: positive integers, e.g. 128,256,512")
    limit = positions.scheme_of(model).length_limit(model)
    too_long = [length for length in lengths if limit is not None and length > limit]
    if too_long:
        raise ConfigError("--lengths", f"{too_long[0]} exceeds {positions.scheme_of(model).context_name} "
                          f"({limit} positions, position={model.position!r}); allowed: at most {limit}")


def token_losses_fn(model: ModelConfig, layout: mesh_lib.Layout | None = None, params_sharding=None):
    """A compiled (params, windows [N, L + 1]) -> per-token losses [N, L] float32 (nats), with the training
    steps' compiler options. With the run's layout it runs as the run's eval step does (the windows split over
    data x fsdp, the vocab-parallel loss), so that at the training length it gives the run's own eval loss to
    the last bit; the parameters must then lie in `params_sharding` (default: the layout's, computed here)."""
    decoder = Decoder(model)
    if layout is None:
        return jax.jit(lambda params, windows_NxT1: step.token_losses(decoder, params, windows_NxT1)[0],
                       compiler_options=step_compiler_options())
    if params_sharding is None:
        params_sharding = shardings.param_shardings(decoder, layout)
    return layout.traced_in(jax.jit(
        lambda params, windows_NxT1: step.token_losses(decoder, params, windows_NxT1, layout)[0],
        in_shardings=(params_sharding, layout.batch_sharding), out_shardings=layout.replicated,
        compiler_options=step_compiler_options()))


def run_layout(cfg, model: ModelConfig, log=print) -> mesh_lib.Layout:
    """The mesh the run's config asks for (cfg.mesh, which `--config.mesh.*` overrides) on this machine's devices,
    or one device where it does not fit them (said in one line). On other devices than the run's, the last float
    bits may differ from the run's own eval."""
    try:
        return mesh_lib.layout(cfg.mesh, model, cfg.train.batch_size)
    except ConfigError as e:
        log(f"eval: the run's mesh does not fit here ({e}); evaluating on one device")
        return mesh_lib.layout({"data": 1, "fsdp": 1, "tensor": 1}, model, devices=jax.devices()[:1])


def _losses(fn, params, windows: np.ndarray, batch: int) -> np.ndarray:
    """Per-token losses [N, L] of N windows, `batch` at a time (the last batch padded: one program)."""
    return np.concatenate([np.asarray(fn(params, jnp.asarray(padded)))[:n]
                           for padded, n in pipeline.eval_batches(windows, batch)])


def strided_windows(n_inputs: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position within the window) of each window over n_inputs input positions: starts
    0, stride, 2·stride, ..., the last one moved back to end at n_inputs; each scores from where the one before
    ended."""
    starts = list(range(0, max(n_inputs - length, 0) + 1, stride))
    if starts[-1] + length < n_inputs:
        starts.append(n_inputs - length)
    out, scored_to = [], 0
    for start in starts:
        out.append((start, scored_to - start if scored_to > start else 0))
        scored_to = start + length
    return out


def strided_loss(fn, params, tokens: np.ndarray, length: int, stride: int, batch: int) -> Strided:
    """Mean loss of every target in tokens[1:], each scored once, by windows of `length` every `stride`."""
    n_inputs = len(tokens) - 1
    plan = strided_windows(n_inputs, length, stride)
    windows = np.stack([np.asarray(tokens[s : s + length + 1], np.int32) for s, _ in plan])
    losses = _losses(fn, params, windows, batch)
    scored = np.concatenate([row[first:] for row, (_, first) in zip(losses, plan, strict=True)])
    assert len(scored) == n_inputs  # every target once
    return Strided(stride=stride, tokens=len(scored), loss=float(scored.mean()))


def evaluate_lengths(model: ModelConfig, params, val, max_token_id: int, lengths: list[int], windows: int,
                     tokens_per_batch: int, stride_fraction: float = 0.5, log=print,
                     layout: mesh_lib.Layout | None = None) -> list[AtLength]:
    """The losses at each length (module doc) on the validation tokens `val` (an array or a TokenStream) whose
    largest id is `max_token_id`; batches of about `tokens_per_batch` tokens (on `layout`'s mesh, a multiple
    of its data x fsdp), on `layout` (run_layout) or on the default device."""
    check_lengths(lengths, model)
    if layout is None:
        fn, shards = token_losses_fn(model), 1
    else:  # the parameters in the layout's shardings, computed once for the placement and the compiled fn
        params_sharding = shardings.param_shardings(Decoder(model), layout)
        params = jax.device_put(params, params_sharding)
        fn, shards = token_losses_fn(model, layout, params_sharding), layout.batch_shards
    out = []
    for length in lengths:
        pipeline.check_tokens(val, length, model.vocab_size, max_token_id, "val")
        batch = -(-max(1, tokens_per_batch // length) // shards) * shards
        losses = _losses(fn, params, pipeline.eval_windows(val, length, windows), batch)
        per_window = losses.mean(axis=1)
        se = float(per_window.std(ddof=1) / math.sqrt(len(per_window))) if len(per_window) > 1 else float("nan")
        span = np.asarray(val[: min(len(val), windows * length + 1)])
        stride = max(1, int(length * stride_fraction))
        result = AtLength(length, len(per_window), float(per_window.mean()), se, losses.mean(axis=0).tolist(),
                          strided_loss(fn, params, span, length, stride, batch))
        log(f"eval: length {length}: {result.loss:.4f} nats/token over {result.windows} windows; strided "
            f"(stride {stride}) {result.strided.loss:.4f} over {result.strided.tokens} tokens")
        out.append(result)
    return out
