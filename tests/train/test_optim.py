"""Schedules end where they must; the weight-decay mask; the optimizer's validation."""

import math

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from scalax.config import load
from scalax.errors import ConfigError
from scalax.train import optim
from tests.conftest import init_params, small_config


def optim_config(**changes) -> ConfigDict:
    cfg = load("configs/gpt.py").optim
    cfg.update(changes)
    return cfg


def lrs(cfg, steps):
    fn = optim.schedule(cfg, steps)
    return np.asarray([float(fn(s)) for s in range(steps)])


@pytest.mark.parametrize("steps,warmup", [(100, 10), (37, 0), (5, 1), (1000, 999)])
def test_cosine_reaches_final_fraction_exactly_at_last_step(steps, warmup):
    cfg = optim_config(schedule="cosine", lr=2e-3, warmup_steps=warmup, final_lr_fraction=0.1)
    lr = lrs(cfg, steps)
    assert lr[-1] == pytest.approx(2e-4, rel=1e-6)
    assert lr.max() == pytest.approx(2e-3, rel=1e-6)
    peak = max(warmup - 1, 0)
    assert lr[peak] == pytest.approx(2e-3, rel=1e-6)
    # closed form on the decay part
    for s in range(peak, steps):
        p = (s - peak) / max(steps - 1 - peak, 1)
        assert lr[s] == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))), rel=1e-5)
    np.testing.assert_allclose(lr[:warmup], 2e-3 * np.arange(1, warmup + 1) / warmup, rtol=1e-6)


@pytest.mark.parametrize("steps,warmup,fraction", [(100, 10, 0.2), (50, 0, 0.5), (64, 4, 0.1)])
def test_wsd_cooldown_ends_at_last_step(steps, warmup, fraction):
    cfg = optim_config(schedule="wsd", lr=1e-3, warmup_steps=warmup, final_lr_fraction=0.0, wsd_decay_fraction=fraction)
    lr = lrs(cfg, steps)
    decay = round(fraction * steps)
    stable = lr[max(warmup, 1) - 1 : steps - decay]
    np.testing.assert_allclose(stable, 1e-3, rtol=1e-6)  # stable at the peak until the cooldown
    assert lr[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(lr[steps - decay - 1 :]) < 0)  # strictly cooling to the end
    np.testing.assert_allclose(np.diff(lr[steps - decay - 1 :]), -1e-3 / decay, rtol=1e-4)  # linearly


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("steps,warmup,fraction,final", [(100, 10, 0.2, 0.0), (60, 0, 0.5, 0.1), (33, 3, 0.3, 0.05)])
def test_wsd_cooldown_shapes_match_their_closed_forms(shape, steps, warmup, fraction, final):
    """Hägele et al. 2024's cooldowns at every step: with p the cooldown's progress (0 at its start, 1 at the
    last step), lr x (f + (1 - f) x shape(p)) where shape is 1 - p, (1 + cos(pi p)) / 2 or 1 - sqrt(p)."""
    cfg = optim_config(schedule="wsd", lr=1e-3, warmup_steps=warmup, final_lr_fraction=final,
                       wsd_decay_fraction=fraction, wsd_decay_shape=shape)
    lr = lrs(cfg, steps)
    start = steps - 1 - round(fraction * steps)  # the last step at the peak
    closed = {"linear": lambda p: 1 - p, "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
              "1-sqrt": lambda p: 1 - math.sqrt(p)}[shape]
    for s in range(steps):
        if s < warmup:
            want = 1e-3 * (s + 1) / warmup
        elif s <= start:
            want = 1e-3
        else:
            want = 1e-3 * (final + (1 - final) * closed((s - start) / (steps - 1 - start)))
        assert lr[s] == pytest.approx(want, rel=1e-5, abs=1e-12), s
    assert lr[-1] == pytest.approx(1e-3 * final, rel=1e-6, abs=1e-12)  # float32


def test_warmup_in_tokens_is_shared_by_runs_of_any_length():
    """warmup_tokens = 10 steps' tokens and a bit: 11 steps of warmup (rounded up) whatever the run's length, as
    warmup_steps=11 gives."""
    by_tokens = optim_config(schedule="wsd", lr=1e-3, warmup_steps=50, warmup_tokens=10 * 4096 + 1)
    by_steps = optim_config(schedule="wsd", lr=1e-3, warmup_steps=11)
    for steps in (40, 400):
        got = np.asarray([float(optim.schedule(by_tokens, steps, 4096)(s)) for s in range(steps)])
        np.testing.assert_array_equal(got, lrs(by_steps, steps))
        np.testing.assert_allclose(got[:11], 1e-3 * np.arange(1, 12) / 11, rtol=1e-6)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
@pytest.mark.parametrize("steps,warmup,fraction,final", [(100, 10, 0.2, 0.0), (57, 5, 0.2, 0.1), (20, 19, 0.2, 0.1),
                                                         (9, 0, 0.5, 0.3)])
def test_a_wsd_run_equals_a_constant_run_bit_for_bit_until_its_branch_point(shape, steps, warmup, fraction, final):
    """A cooldown branched from a constant-LR trunk at `branch_point` steps is the WSD run: the same learning rate
    (as float32 bits) at every earlier step, below the peak from there on; the branch point is where the closed
    form's cooldown starts (the last peak step, steps - 1 - round(fraction x steps), or warmup's end, plus one)."""
    cfg = optim_config(schedule="wsd", lr=3e-3, warmup_steps=warmup, final_lr_fraction=final,
                       wsd_decay_fraction=fraction, wsd_decay_shape=shape)
    wsd, constant = lrs(cfg, steps), lrs(optim_config(schedule="constant", lr=3e-3, warmup_steps=warmup), 2 * steps)
    b = optim.branch_point(cfg, steps)
    assert b == max(steps - 1 - round(fraction * steps), warmup - 1, 0) + 1 and 1 <= b < steps
    np.testing.assert_array_equal(wsd[:b], constant[:b])  # exactly: float32s, compared as float64
    assert wsd[b - 1] == np.float32(3e-3) and np.all(wsd[b:] < np.float32(3e-3))


def test_constant_schedule():
    lr = lrs(optim_config(schedule="constant", lr=1e-3, warmup_steps=4), 20)
    np.testing.assert_allclose(lr, [2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 17, rtol=1e-6)


@pytest.mark.parametrize("changes,key", [
    (dict(schedule="linear"), "optim.schedule"),
    (dict(lr=0.0), "optim.lr"),
    (dict(lr=-1e-3), "optim.lr"),
    (dict(warmup_steps=100), "optim.warmup_steps"),
    (dict(final_lr_fraction=1.5), "optim.final_lr_fraction"),
    (dict(schedule="wsd", wsd_decay_shape="sqrt"), "optim.wsd_decay_shape"),
    (dict(warmup_tokens=-1), "optim.warmup_tokens"),
    (dict(warmup_tokens=100 * 4096), "optim.warmup_tokens"),
])
def test_bad_optimizer_config(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        optim.optimizer(optim_config(**changes), 100, 4096)


@pytest.mark.parametrize("changes", [dict(), dict(position="t5", tie_embeddings=False, scan_layers=False)])
def test_weight_decay_mask_excludes_norms_biases_embeddings(changes):
    params = init_params(small_config("gpt", **changes), 8)
    mask = optim.decay_mask(params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    for name, decays in flat.items():
        leaf = name.split("/")[-1]
        if leaf in ("bias", "scale", "embedding", "pos_embed", "relpos_bias"):
            assert decays is False, name
        else:
            assert leaf == "kernel" and decays is True, name
    assert any(flat.values()) and not all(flat.values())
    with_embeddings = optim.decay_mask(params, decay_embeddings=True)
    assert with_embeddings["embed"]["embedding"] is True


def test_weight_decay_really_skips_masked_leaves():
    """One AdamW step with zero gradients: kernels shrink by lr·wd·w, everything else is unchanged."""
    params = init_params(small_config("gpt"), 8)
    tx = optim.optimizer(optim_config(lr=0.1, warmup_steps=0, weight_decay=0.5, schedule="constant"), 10)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    mask = optim.decay_mask(params)
    for u, p, m in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        np.testing.assert_allclose(u, -0.1 * 0.5 * p if m else 0.0, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tokens,steps,want", [(0, 37, 37), (1_000_000, 37, 245), (4096 * 10, 5, 10)])
def test_run_length_in_steps_or_tokens(tokens, steps, want):
    from scalax.train.setup import total_steps

    train = ConfigDict(dict(tokens=tokens, steps=steps, batch_size=16, seq_len=256))
    assert total_steps(train) == want  # ceil(tokens / (16 * 256)) when tokens > 0
