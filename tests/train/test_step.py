"""The train step: its loss against a float64 reference, gradient accumulation, z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scalax.config import load
from scalax.models import Decoder
from scalax.train import optim
from scalax.train.state import TrainState
from scalax.train.step import make_eval_step, make_train_step, make_train_steps
from tests.conftest import init_params, random_tokens, small_config


def setup(microbatches=1, z_loss=0.0, family="llama", sgd=False):
    """A small model's state and jitted step; `sgd`: plain SGD (lr 1), whose update is minus the gradient."""
    cfg = small_config(family)
    model = Decoder(cfg)
    ocfg = load("configs/gpt.py").optim
    ocfg.update(warmup_steps=0, lr=1e-2)
    tx = optax.sgd(1.0) if sgd else optim.optimizer(ocfg, 10)
    step = jax.jit(make_train_step(model, tx, optim.schedule(ocfg, 10), microbatches, z_loss))
    params = init_params(cfg, 8)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    return cfg, model, step, state


def test_loss_is_mean_cross_entropy_in_nats():
    cfg, model, step, state = setup()
    batch = random_tokens(cfg, 4, 9)
    _, metrics = step(state, batch)
    logits = np.asarray(model.apply({"params": state.params}, batch[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, np.asarray(batch[:, 1:, None]), -1).mean()
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    per_window = make_eval_step(model)(state.params, batch)
    assert float(per_window.mean()) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_microbatches_equal_one_big_batch(k):
    """The update (with SGD: minus the gradient, so no Adam normalisation amplifies rounding) is the same."""
    cfg, _, step1, state = setup(1, sgd=True)
    _, _, stepk, _ = setup(k, sgd=True)
    batch = random_tokens(cfg, 8, 9, seed=3)
    s1, m1 = step1(state, batch)
    sk, mk = stepk(state, batch)
    assert float(mk["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(mk["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), sk.params, s1.params)
    assert int(sk.step) == int(s1.step) == 1


@pytest.mark.parametrize("n", [1, 3, 4])
def test_train_steps_equal_as_many_single_steps(n):
    """Up to K = 4 steps in one call (one program for every n): the state and metrics of n calls of the step,
    the metrics past n zero."""
    cfg, _, step, state = setup()
    steps = jax.jit(make_train_steps(step, 4))
    batches = jnp.stack([random_tokens(cfg, 4, 9, seed=s) for s in range(4)])
    expected, losses, lrs = state, [], []
    for i in range(n):
        expected, m = step(expected, batches[i])
        losses.append(float(m["loss"]))
        lrs.append(float(m["lr"]))
    got, metrics = steps(state, batches, jnp.int32(n))
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses + [0.0] * (4 - n), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["lr"]), lrs + [0.0] * (4 - n), rtol=1e-6)
    assert int(got.step) == n
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got.params, expected.params)


def test_z_loss_changes_the_update_not_the_logged_loss():
    cfg, _, plain, state = setup(z_loss=0.0)
    _, _, with_z, _ = setup(z_loss=1e-2)
    batch = random_tokens(cfg, 4, 9)
    s0, m0 = plain(state, batch)
    s1, m1 = with_z(state, batch)
    assert float(m0["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-7)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params),
                                                             strict=True))
    assert diff > 1e-6


def test_training_steps_reduce_loss_on_a_fixed_batch():
    cfg, _, step, state = setup()
    batch = random_tokens(cfg, 4, 9)
    first = None
    for _ in range(10):
        state, m = step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < first - 0.5


def test_log_lines_never_share_the_progress_bar_line(monkeypatch):
    """A terminal shows stdout and stderr as one stream: a message written while the bar is drawn must start
    at the beginning of a line (the bar cleared first), not be glued after the bar's text."""
    import io

    from scalax.train.loop import ProgressBar

    screen = io.StringIO()
    monkeypatch.setattr("sys.stdout", screen)  # the terminal: stdout (messages) and the bar's stream are one
    bar = ProgressBar(total=10, initial=0, enabled=True, file=screen)
    for _ in range(3):
        bar.advance()
    bar.bar.refresh()
    message = "step 3/10  eval 2.5000 nats/token"
    bar.wrap(lambda m: screen.write(m + "\n"))(message)
    bar.advance()
    bar.close()
    lines = screen.getvalue().split("\n")
    shown = [line.split("\r")[-1] for line in lines if message in line]
    assert shown == [message], repr(screen.getvalue())
    # without the wrap, the same write lands after the bar's text
    glued = io.StringIO()
    bare = ProgressBar(total=10, initial=0, enabled=True, file=glued)
    bare.advance()
    bare.bar.refresh()
    glued.write(message + "\n")
    bare.close()
    assert [line.split("\r")[-1] for line in glued.getvalue().split("\n") if message in line] != [message]


def test_cpu_peak_is_measured_once_per_machine_and_dtype(tmp_path, monkeypatch):
    """MFU's denominator on a CPU: measured on the first run of a machine and dtype, then the cached number
    (a stand-in measurement that answers 100, 200, ... GFLOP/s shows which call measured)."""
    import json

    from scalax.train import metrics

    monkeypatch.setenv("SCALAX_CACHE", str(tmp_path))
    measured = []

    def measure(dtype, n, repeats):
        measured.append(jnp.dtype(dtype).name)
        return 1e11 * len(measured)

    monkeypatch.setattr(metrics, "measure_matmul_flops", measure)
    first, first_source = metrics.peak_flops_per_device("float32")
    again, again_source = metrics.peak_flops_per_device("float32")
    bf16, _ = metrics.peak_flops_per_device("bfloat16")
    assert measured == ["float32", "bfloat16"]
    assert (first, again, bf16) == (1e11, 1e11, 2e11)
    assert again_source == first_source and f"cached in {tmp_path}" in again_source
    table = json.load(open(tmp_path / "peak_flops.json"))
    assert sorted(v["flops"] for v in table.values()) == [1e11, 2e11]
    assert all(jax.__version__ in key and ("float32" in key or "bfloat16" in key) for key in table)


def test_cpu_steps_compile_without_ynn_fusions_and_train_the_same():
    """program.step_compiler_options: on this CPU the steps are compiled without XLA's YNNPACK fusions (the
    option took effect), and three steps give the same parameters as the default compile to float rounding."""
    from scalax.train.program import step_compiler_options

    options = step_compiler_options()
    if options is None:
        pytest.skip(f"no such option in this XLA ({jax.__version__}) or not a CPU")
    cfg, _, step, state = setup()
    tuned = jax.jit(step.__wrapped__, compiler_options=options)
    batch = random_tokens(cfg, 4, 9)
    assert "__ynn_fusion" not in tuned.lower(state, batch).compile().as_text()
    a, b = state, state
    for _ in range(3):
        a, _ = step(a, batch)
        b, _ = tuned(b, batch)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_a_plan_compiles_unoptimised_to_the_same_bytes():
    """The memory plan's options (train/memory.py: run_once_compiler_options, LLVM -O0 on CPU) give the same
    memory analysis as the steps' own (-O2): XLA assigns the buffers before LLVM runs."""
    from scalax.train.program import run_once_compiler_options, step_compiler_options

    options = step_compiler_options()
    if options is None:
        pytest.skip(f"no such option in this XLA ({jax.__version__}) or not a CPU")
    cfg, _, step, state = setup()
    lowered = step.lower(state, random_tokens(cfg, 4, 9))
    ma = [lowered.compile({**options, **extra}).memory_analysis() for extra in ({}, run_once_compiler_options())]
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    assert [getattr(ma[0], f) for f in fields] == [getattr(ma[1], f) for f in fields]
    assert ma[0].temp_size_in_bytes > 0


def test_eval_batches_hold_every_window_once_in_order():
    """The evaluation's batches (data/pipeline.py: the loop's and `scalax eval`'s) against the windows
    themselves: full batches of the given size, the last one padded, and the real rows of all of them, in order,
    the windows exactly."""
    from scalax.data.pipeline import eval_batches

    windows = np.random.default_rng(0).integers(0, 256, (50, 9), dtype=np.int32)
    for batch_size in (1, 7, 16, 50, 64):
        batches = list(eval_batches(windows, batch_size))
        assert len(batches) == -(-50 // batch_size)
        assert all(b.shape == (batch_size, 9) for b, _ in batches)
        np.testing.assert_array_equal(np.concatenate([b[:n] for b, n in batches]), windows)
