"""The tiny configs learn the default corpus; the logged learning rate ends where the schedule says."""

import json
import math
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from scalax import config as config_lib
from scalax.data import corpora
from scalax.train import loop

pytestmark = pytest.mark.slow


def unigram_entropy_bits(documents) -> float:
    counts = np.zeros(256)
    for doc in documents:
        counts += np.bincount(np.frombuffer(doc.data, np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_tiny_learns_the_default_corpus(family, tmp_path):
    """Under a minute here (200 steps of 16 x 128 tokens): eval bits/byte at least 1 below the validation split's
    unigram entropy (2026-12-02: GPT 3.50, LLaMA 3.23 against a bar of 3.70; the entropy is 4.70)."""
    cfg = config_lib.load(f"configs/{family}.py:size=tiny")
    cfg.train.update(steps=200, eval_every=1000, log_every=10, checkpoint_every=1000, seq_len=128)
    cfg.optim.update(warmup_steps=20)
    cfg.data.cache_dir = str(tmp_path.parent.parent / "scalax-test-token-cache")  # shared by both families
    summary = loop.train(cfg, str(tmp_path / "run"), log=lambda m: None)
    val_docs = corpora.split_documents("stdlib", "text", cfg.data.val_fraction)["val"]
    entropy = unigram_entropy_bits(val_docs)
    assert 4.0 < entropy < 6.0  # Python source: a sanity bound on the reference itself
    assert summary["eval_bpb"] <= entropy - 1.0, (summary["eval_bpb"], entropy)

    records = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
    train = [r for r in records if "loss" in r]
    assert train[-1]["step"] == 200
    assert train[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.final_lr_fraction, rel=1e-5)
    assert train[-1]["tokens"] == 200 * cfg.train.batch_size * cfg.train.seq_len
    # TensorBoard holds the same numbers as metrics.jsonl
    # (as classic scalar summaries: EventAccumulator.Scalars, which most readers use, finds them)
    accumulator = EventAccumulator(os.path.join(tmp_path, "run", "tensorboard"), size_guidance={SCALARS: 0})
    accumulator.Reload()
    tb_loss = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    assert tb_loss == pytest.approx({r["step"]: r["loss"] for r in train}, rel=1e-6)
    assert {"eval/bpb", "train/lr", "throughput/mfu", "compute/flops_6n"} <= set(accumulator.Tags()["scalars"])
    evals = [r for r in records if "eval_loss" in r]
    assert evals[-1]["eval_bpb"] == pytest.approx(
        evals[-1]["eval_loss"] / math.log(2) * 1 / (summary["eval_loss"] / summary["eval_bpb"] / math.log(2)),
        rel=1e-9)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """The first non-finite step is named, nothing from it on is saved; with four steps per call (the metrics of
    a call come back together) the same step is named and the same checkpoints stay."""
    outcomes = []
    for steps_per_call in (1, 4):
        cfg = config_lib.load("configs/gpt.py:size=tiny")
        cfg.train.update(steps=40, eval_every=1000, log_every=5, checkpoint_every=5, batch_size=8, seq_len=64,
                         steps_per_call=steps_per_call)
        cfg.optim.update(warmup_steps=0, lr=1e9, grad_clip=0.0, schedule="constant", eps=1e-30)
        cfg.model.norm_eps = 1e-30
        cfg.data.cache_dir = str(tmp_path.parent.parent / "scalax-test-token-cache")
        workdir = tmp_path / f"run{steps_per_call}"
        with pytest.raises(loop.TrainingDiverged, match="training diverged") as info:
            loop.train(cfg, str(workdir), log=lambda m: None)
        steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
        bad_step = int(str(info.value).split("at step ")[1].split(":")[0])
        outcomes.append((steps, bad_step))
    assert outcomes[0] == outcomes[1]
    assert all(s < bad_step for s in steps)  # nothing at or after the first non-finite loss was saved


def test_wall_clock_saves_fall_due_on_time_and_replace_each_other(tmp_path, monkeypatch):
    """A fake clock in which every step takes one minute. With train.checkpoint_minutes=3.5 a save falls due
    at the first log step 3.5 minutes after the last save of any kind: steps 4 and 8, the step save at 10, then
    14; the run ends at 16. What stays: the newest step save (keep_checkpoints=1) and the newest save."""
    cfg = config_lib.load("configs/gpt.py:size=tiny")
    cfg.train.update(steps=16, eval_every=1000, log_every=1, checkpoint_every=10, keep_checkpoints=1,
                     checkpoint_minutes=3.5, batch_size=8, seq_len=64)
    cfg.optim.warmup_steps = 2
    cfg.data.cache_dir = str(tmp_path.parent.parent / "scalax-test-token-cache")
    clock = {"seconds": 0.0}
    monkeypatch.setattr(loop, "clock", lambda: clock["seconds"])
    steps = loop.Trainer._steps

    def one_minute_steps(self, first, last, *args):
        clock["seconds"] += 60.0 * (last - first + 1)
        return steps(self, first, last, *args)

    monkeypatch.setattr(loop.Trainer, "_steps", one_minute_steps)
    saves = []
    save = loop.Trainer.save
    monkeypatch.setattr(loop.Trainer, "save", lambda self, s: (saves.append((s, clock["seconds"])), save(self, s)))
    loop.train(cfg, str(tmp_path / "run"), log=lambda m: None)
    assert saves == [(4, 240.0), (8, 480.0), (10, 600.0), (14, 840.0), (16, 960.0)]
    assert sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints")) == [10, 16]


def test_summary_is_written_once_the_final_checkpoint_is_complete(tmp_path, monkeypatch):
    """summary.json marks a finished run (the sweep runner reads it): when it is written, the final step's
    checkpoint has been committed, not merely started (orbax saves in the background)."""
    cfg = config_lib.load("configs/gpt.py:size=tiny")
    cfg.train.update(steps=12, eval_every=1000, log_every=4, checkpoint_every=1000, batch_size=8, seq_len=64)
    cfg.optim.warmup_steps = 2
    cfg.data.cache_dir = str(tmp_path.parent.parent / "scalax-test-token-cache")
    workdir = tmp_path / "run"
    events = []
    wait = loop.Checkpointer.wait
    monkeypatch.setattr(loop.Checkpointer, "wait", lambda self: (wait(self), events.append("wait")))
    write_json = loop.io.atomic_write_json

    def record_summary(path, obj):
        if path.endswith("summary.json"):
            committed = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
            events.append(("summary", committed))
        write_json(path, obj)

    monkeypatch.setattr(loop.io, "atomic_write_json", record_summary)
    loop.train(cfg, str(workdir), log=lambda m: None)
    assert events[-2:] == ["wait", ("summary", [12])]
