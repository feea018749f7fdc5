"""`scalax eval`: the loss at other lengths. Sliding windows against a brute-force per-token loop; the loss at
the training length against the training run's own; figures; one-line errors."""

import json
import os

import numpy as np
import pytest

from scalax import cli
from scalax import config as config_lib
from scalax.evaluate import lengths
from scalax.scaling import runner
from tests import reference
from tests.conftest import init_params, small_config


def brute_force_strided(cfg, params, tokens, length, stride) -> float:
    """Each target predicted one at a time, by the float64 reference decoder, from its own context: the tokens
    since the start of the earliest window (starts 0, stride, 2·stride, ..., and n - length last) that reaches
    past it."""
    n = len(tokens) - 1
    starts = [*range(0, n - length + 1, stride), n - length]
    losses = []
    for j in range(n):
        start = min(s for s in starts if s + length > j)
        logits = reference.forward(cfg, params, tokens[start : j + 1])[-1]  # float64 numpy, its own code
        losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[tokens[j + 1]])
    return float(np.mean(losses))


@pytest.mark.parametrize("position,stride", [("alibi", 5), ("rope", 16), ("learned", 3)])
def test_sliding_windows_equal_a_per_token_loop(position, stride):
    cfg = small_config("llama", position=position)
    params = init_params(cfg, 16)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 58).astype(np.int32)
    fn = lengths.token_losses_fn(cfg)
    got = lengths.strided_loss(fn, params, tokens, 16, stride, batch=3)
    assert got.tokens == len(tokens) - 1
    assert got.loss == pytest.approx(brute_force_strided(cfg, params, tokens, 16, stride), abs=1e-5)


def test_window_plan_scores_every_target_once():
    for n, length, stride in ((100, 16, 5), (64, 16, 16), (17, 16, 4), (16, 16, 8)):
        plan = lengths.strided_windows(n, length, stride)
        scored = [s + k for s, first in plan for k in range(first, length)]
        assert scored == list(range(n)), (n, length, stride)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny LLaMA runs trained at 32 for 12 steps, by position scheme (one per module)."""
    runs = {}

    def run_of(position):
        if position not in runs:
            run = tmp_path_factory.mktemp(position) / "runs" / "r"  # as a sweep lays its runs out
            assert cli.main(["train", f"--config=configs/llama.py:size=tiny,position={position}", f"--workdir={run}",
                             "--config.train.steps=12", "--config.optim.warmup_steps=2",
                             "--config.train.eval_every=12", "--config.train.batch_size=8",
                             "--config.train.seq_len=32", "--config.train.eval_windows=8"]) == 0
            runs[position] = run
        return runs[position]

    return run_of


def test_eval_at_the_training_length_is_the_runs_eval_loss(capsys, trained):
    run = trained("alibi")
    capsys.readouterr()
    rc = cli.main(["eval", f"--checkpoint={run}", "--lengths=32,64,256", "--stride=0.25"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    written = json.loads((run / "eval" / "lengths.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    at = {r["length"]: r for r in written["lengths"]}
    assert at[32]["loss"] == pytest.approx(summary["eval_loss"], abs=1e-5)  # the same windows, the same loss
    assert at[32]["windows"] == 8 and len(at[256]["per_position"]) == 256
    assert at[64]["loss"] == pytest.approx(np.mean(at[64]["per_position"]), rel=1e-6)
    assert at[256]["strided"]["stride"] == 64 and at[256]["strided"]["tokens"] == 8 * 256
    assert written["train_seq_len"] == 32 and written["position"] == "alibi"
    for name in ("loss_vs_length", "loss_vs_position"):
        assert os.path.getsize(run / "eval" / f"{name}.png") > 10_000
    assert "x training length" in out


def test_eval_where_the_runs_mesh_does_not_fit_runs_on_one_device(capsys, tmp_path, trained):
    """The run's mesh (8 devices over data) asked as fsdp 3, which 8 devices cannot tile: one line says so, and
    the loss is the run's to bfloat16 rounding (its eval ran on 8 devices, this one on one)."""
    run = trained("alibi")
    capsys.readouterr()
    rc = cli.main(["eval", f"--checkpoint={run}", "--lengths=32", f"--out={tmp_path / 'eval'}",
                   "--config.mesh.fsdp=3"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "the run's mesh does not fit here (mesh" in err and "evaluating on one device" in err
    written = json.loads((tmp_path / "eval" / "lengths.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert written["lengths"][0]["loss"] == pytest.approx(summary["eval_loss"], abs=2e-3)


@pytest.mark.parametrize("argv,words", [
    (["--lengths=32,0"], "--lengths: got 0; allowed: positive integers"),
    (["--lengths=32,x"], "--lengths: got '32,x'"),
    (["--lengths=32,512"], "--lengths: 512 exceeds the learned position table (256 positions"),
    (["--stride=0"], "--stride: got 0.0; allowed: a fraction"),
])
def test_eval_mistakes_are_one_line(capsys, trained, argv, words):
    run = trained("learned")  # a table of 256 positions, trained at 32
    capsys.readouterr()
    rc = cli.main(["eval", f"--checkpoint={run}", *argv])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USER_ERROR and words in err and len(err.strip().splitlines()) == 1, err


def test_eval_of_a_missing_checkpoint_is_one_line(capsys, tmp_path):
    rc = cli.main(["eval", f"--checkpoint={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USER_ERROR and "nothing" in err and len(err.strip().splitlines()) == 1, err


def test_a_sweep_records_the_loss_at_multiples_of_the_training_length(trained):
    """configs/sweeps/positional.py sets sweep.eval_lengths: each finished run gets eval_loss_1x, _2x, ...;
    none past a learned table (256 positions: 16 x 32 is past it)."""
    run = trained("learned")
    logged = []
    fields = runner.evaluate_lengths(str(run.parent.parent), "r", (1, 2, 16), log=logged.append)
    summary = json.loads((run / "summary.json").read_text())
    assert fields["eval_loss_1x"] == pytest.approx(summary["eval_loss"], abs=1e-5)
    assert fields["eval_loss_2x"] > 0 and fields["eval_loss_16x"] is None
    assert "loss by length: 32:" in logged[-1]
    assert config_lib.load("configs/sweeps/positional.py:position=alibi").sweep.eval_lengths == (1, 2, 4, 8)


def test_a_run_that_cannot_be_evaluated_is_recorded_so(trained):
    """Its ledger fields name the error (scalax sweep then exits 1, asking to run it again)."""
    run = trained("alibi")
    broken = run.parent / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((run / "config.json").read_text())  # a config, no checkpoint
    logged = []
    fields = runner.evaluate_lengths(str(run.parent.parent), "broken", (1, 2), log=logged.append)
    assert "no readable checkpoint" in fields["eval_lengths_error"] and "eval_loss_1x" not in fields
    assert "scalax eval failed" in logged[-1]
