"""The training loop: everything with side effects (data files, checkpoints, logs, signals) lives here; the
step itself is the pure function from step.py, compiled by the run's setup (setup.py). With
`train.steps_per_call` = K > 1 the steps go K to a compiled call (step.make_train_steps), a call cut short where a
log, evaluation or save falls due, so that everything below happens at the same steps as with K = 1.

A run on a workdir that holds a checkpoint resumes from it, bit for bit: the state, the data iterator's
position and the counters are restored, and metrics.jsonl is cut back to the restored step (what may change
on a resume: resume.py). A NaN or inf loss stops the run before anything non-finite is saved.

Saves: every `train.checkpoint_every` steps (the newest `train.keep_checkpoints` stay), at each step of
`train.checkpoint_steps` (all kept: a wsd_branch trunk's branch points), at the last step, every
`train.checkpoint_minutes` of wall time (checked at each log step; each such save replaces the previous one),
and on preemption. SIGTERM (how Cloud TPU and GKE preempt) saves at the end of the call under way and exits with
status 143: in a multi-process run through JAX's preemption sync point, so that every host saves the same step.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from scalax import config as config_lib
from scalax import io
from scalax.data import corpora, pipeline
from scalax.errors import ScalaxError
from scalax.models import attention, flops
from scalax.train import resume
from scalax.train.checkpoint import Checkpointer
from scalax.train.metrics import MetricsLog, peak_flops_per_device
from scalax.train.setup import RunSetup, setup_run

MFU_CONVENTION = "6n_head_attn"  # model FLOPs per token for MFU: 6N + the unembedding + causal attention
clock = time.monotonic  # the clock of wall-clock saves (tests replace it)


class TrainingDiverged(ScalaxError):
    """The loss became NaN or inf."""

    exit_code = 3
    label = "diverged"


class Preempted(ScalaxError):
    """SIGTERM arrived; a checkpoint was saved."""

    exit_code = 143  # 128 + SIGTERM, as if the signal had ended the process
    label = "stopped"


@dataclasses.dataclass
class Counters:
    """Compute seen so far, carried in every checkpoint."""

    tokens: int = 0
    wall_seconds: float = 0.0

    def flops(self, per_token: dict[str, float]) -> dict[str, float]:
        return {f"flops_{k}": self.tokens * v for k, v in per_token.items()}


def resolved_config(cfg: ConfigDict) -> dict:
    """The config as run: the model section with its derived fields (vocab, head_dim, ...) filled in."""
    out = cfg.to_dict()
    out["model"] = config_lib.model_config(cfg).to_dict()
    return out


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def load_data(cfg: ConfigDict, run: RunSetup, log) -> corpora.TokenSplits:
    """Both splits, tokenized (from the cache when it is current), checked against the model."""
    data = corpora.load_splits(cfg.data, log)
    for split, tokens in (("train", data.train), ("val", data.val)):
        pipeline.check_tokens(tokens, cfg.train.seq_len, run.model.vocab_size, data.header["max_token_id"], split)
    return data


def train(cfg: ConfigDict, workdir: str, log=_log, allow_changes: bool = False) -> dict:
    """Train (or resume) the run that `cfg` describes in `workdir`; returns a summary of its end. A resume
    with another length or optimizer is refused unless `allow_changes` (resume.check_same_run)."""
    io.check_output_dir(workdir, "--workdir")
    run = setup_run(cfg)
    data = load_data(cfg, run, log)
    resolved = resolved_config(cfg)
    resolved["data"]["tokenizer_hash"] = data.tokenizer.hash
    unique = data.header["counts"]["train"]["tokens"]  # what the run will see, and how often
    resolved["data"]["unique_train_tokens"] = unique
    resolved["data"]["epochs"] = corpora.epochs(data.header, run.steps * cfg.train.batch_size * cfg.train.seq_len)
    io.make_output_dir(workdir, "--workdir")
    checkpointer = Checkpointer(workdir, cfg.train.keep_checkpoints, every=cfg.train.checkpoint_every,
                                pinned=cfg.train.get("checkpoint_steps", ()))
    try:
        _check_resumable(checkpointer, resolved, workdir, allow_changes, log)
        return Trainer(cfg, run, data, resolved, workdir, checkpointer, log).run()
    finally:
        checkpointer.close()


def _check_resumable(checkpointer: Checkpointer, resolved: dict, workdir: str, allow_changes: bool, log) -> None:
    """Compare the newest checkpoint whose config can be read with the config asked for."""
    for step in reversed(checkpointer.steps()):
        try:
            saved = checkpointer.read_meta(step)["config"]
        except Exception:  # unreadable: restore_latest reports it and falls back
            continue
        resume.check_compatible(saved, resolved, workdir)
        resume.check_same_run(saved, resolved, workdir, step, allow_changes, log)
        return


class PreemptionWatch:
    """Whether a preemption asks the run to save and stop at this step.

    A multi-process run with JAX's preemption service (on by default with jax.distributed) asks its sync point at
    every step: JAX's notifier catches SIGTERM on any host, and every host gets True at the same step, so all of
    them save that step. (A Python SIGTERM handler would take the signal from JAX's notifier, so none is set.)
    A single process catches SIGTERM itself and stops at the next step boundary.
    """

    def __init__(self):
        self.sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionWatch:
        if not self.sync:
            self._previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def due(self, step: int) -> bool:
        """Called once per step, by every process, in step order."""
        if self.sync:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def eval_batch_size(train_cfg: ConfigDict) -> int:
    """train.eval_batch_size, or train.batch_size where it is 0 (or absent: configs written before it existed)."""
    return train_cfg.get("eval_batch_size", 0) or train_cfg.batch_size


class Trainer:
    """One run's loop: its state, data iterator, counters and logs, and the steps from its start to its end."""

    def __init__(self, cfg: ConfigDict, run: RunSetup, data: corpora.TokenSplits, resolved: dict, workdir: str,
                 checkpointer: Checkpointer, log):
        self.train_cfg, self.run_setup, self.data = cfg.train, run, data
        self.resolved, self.workdir, self.checkpointer, self.log = resolved, workdir, checkpointer, log
        self.writer = jax.process_index() == 0
        train_cfg = cfg.train
        self.batches = pipeline.iterator(pipeline.train_dataset(data.train, train_cfg.seq_len, train_cfg.batch_size,
                                                                train_cfg.seed, jax.process_index(),
                                                                jax.process_count()), cfg.data.prefetch)
        self.state, self.counters, self.start = self._restore()
        self.last_saved = self.start if self.start else None
        if self.writer:
            io.atomic_write_json(io.join(workdir, "config.json"), resolved)
        self.metrics_log = MetricsLog(workdir, enabled=self.writer)
        self.metrics_log.truncate_after(self.start)
        if self.start:  # a resume: `scalax launch status` counts these (a preempted run is resumed)
            self.metrics_log.write({"step": self.start, "resumed": 1})
        self.per_token = flops.all_flops_per_token(run.model, train_cfg.seq_len)
        self.peak, peak_source = peak_flops_per_device(run.model.dtype)
        self.tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
        self.bytes_per_token = data.bytes_per_token("val")
        self.eval_windows = pipeline.eval_windows(data.val, train_cfg.seq_len, train_cfg.eval_windows)
        # (last step, steps, metrics) of each call whose metrics are still on device, fetched at the next log or save
        self.pending: list[tuple[int, int, dict]] = []
        sizes = " x ".join(f"{a} {n}" for a, n in run.layout.mesh.shape.items())
        log(f"training {flops.params_total(run.model) / 1e6:.2f}M parameters for {run.steps} steps of "
            f"{self.tokens_per_step} tokens ({run.steps * self.tokens_per_step / 1e6:.1f}M tokens) on "
            f"{data.header['counts']['train']['tokens'] / 1e6:.1f}M training tokens "
            f"({corpora.epochs(data.header, run.steps * self.tokens_per_step):.2f} epochs); mesh {sizes} "
            f"({jax.process_count()} process(es)); attention {attention.describe(run.model)}; "
            f"up to {run.program.steps_per_call} step(s) a call; "
            f"MFU against {self.peak / 1e12:.2f} TFLOP/s per device "
            f"({peak_source})")

    def _restore(self):
        """(state, counters, start step): the newest readable checkpoint's, onto this mesh (the restore target
        carries the new shardings, whatever mesh wrote it), or a new state born sharded."""
        prog = self.run_setup.program
        restored = self.checkpointer.restore_latest(prog.abstract_state, warn=self.log)
        if restored is None:
            return prog.init(), Counters(), 0
        start, state, data_state, meta = restored
        self.batches.set_state(data_state)
        self.log(f"resuming {self.workdir} from step {start}")
        return state, Counters(**meta["counters"]), start

    # ------------------------------------------------------------------ evaluation
    def _eval_chunks(self):
        """The fixed windows as global arrays of train.eval_batch_size (0: train.batch_size) windows each."""
        sharding = self.run_setup.layout.batch_sharding
        for padded, n in pipeline.eval_batches(self.eval_windows, eval_batch_size(self.train_cfg)):
            yield jax.make_array_from_callback(padded.shape, sharding, lambda idx, x=padded: x[idx]), n

    def evaluate(self, params) -> dict:
        eval_step = self.run_setup.program.eval_step
        losses = np.concatenate([np.asarray(eval_step(params, array))[:n] for array, n in self._eval_chunks()])
        loss = float(losses.mean())
        se = float(losses.std(ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else float("nan")
        return {"eval_loss": loss, "eval_loss_se": se, "eval_bpb": loss / math.log(2) / self.bytes_per_token,
                "eval_bpb_se": se / math.log(2) / self.bytes_per_token}

    # ------------------------------------------------------------------ metrics and checkpoints
    def flush_metrics(self, clock: dict) -> dict | None:
        """Fetch pending metrics (one host sync), stop on a non-finite loss; the record of the newest step."""
        if not self.pending:
            return None
        fetched = jax.device_get([m for _, _, m in self.pending])
        for (last, n, _), m in zip(self.pending, fetched, strict=True):
            losses = np.atleast_1d(m["loss"])[:n]  # a call of n steps: [K] metrics, the first n filled
            if not np.isfinite(losses).all():
                bad = int(np.flatnonzero(~np.isfinite(losses))[0])
                where = f"step {self.last_saved} in {self.checkpointer.directory}" if self.last_saved else \
                    "none was saved"
                raise TrainingDiverged(f"loss is {losses[bad]} at step {last - n + 1 + bad}: training diverged; the "
                                       f"last good checkpoint is kept ({where}). Try a lower optim.lr or longer "
                                       "warmup.")
        step, n, _ = self.pending[-1]
        m = {k: np.atleast_1d(v)[n - 1] for k, v in fetched[-1].items()}
        self.pending.clear()
        now, counters = time.perf_counter(), self.counters
        tokens_per_s = (counters.tokens - clock["tokens"]) / max(now - clock["time"], 1e-9)
        clock.update(time=now, tokens=counters.tokens)
        loss = float(m["loss"])
        return {"step": step, "loss": loss, "bpb": loss / math.log(2) / self.bytes_per_token, "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * self.per_token[MFU_CONVENTION] / (self.peak * self.run_setup.layout.mesh.size),
                "tokens": counters.tokens, **counters.flops(self.per_token), "wall_seconds": counters.wall_seconds}

    def save(self, step: int) -> None:
        meta = {"config": self.resolved, "counters": dataclasses.asdict(self.counters)}
        self.checkpointer.save(step, self.state, self.batches.get_state(), meta)
        self.metrics_log.flush()  # TensorBoard's events up to the checkpoint (uploaded, on a gs:// workdir)
        self.last_saved = step

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        steps = self.run_setup.steps
        progress = ProgressBar(steps, self.start, self.writer)
        self.log = progress.wrap(self.log)  # eval lines on their own line, the bar redrawn below them
        summary: dict = {"status": "running"}
        if self.start >= steps:
            self.log(f"{self.workdir} already holds the run's final checkpoint (step {self.start})")
            summary.update(self.evaluate(self.state.params))
        self._clock = {"time": time.perf_counter(), "tokens": self.counters.tokens}  # for tokens/s
        self._wall_mark = time.perf_counter()  # for the counters' wall seconds
        self._last_save_time = clock()  # for wall-clock saves
        try:
            with PreemptionWatch() as preemption:
                step = self.start + 1
                while step <= steps:
                    last = self._call_end(step)
                    if self._steps(step, last, preemption, progress, summary):
                        self.checkpointer.wait()
                        raise Preempted(f"preempted (SIGTERM): saved a checkpoint at step {last} in "
                                        f"{self.checkpointer.directory}; run the same command again to resume")
                    step = last + 1
            summary.update(status="finished", step=steps, tokens=self.counters.tokens,
                           unique_train_tokens=self.data.header["counts"]["train"]["tokens"],
                           epochs=corpora.epochs(self.data.header, self.counters.tokens),
                           wall_seconds=self.counters.wall_seconds, **self.counters.flops(self.per_token))
            self.checkpointer.wait()  # summary.json marks the run done: written once the final save is committed
            if self.writer:
                io.atomic_write_json(io.join(self.workdir, "summary.json"), summary)
            return summary
        finally:
            progress.close()
            self.metrics_log.close()

    def _due(self, step: int) -> tuple[bool, bool, bool]:
        """(log, save, evaluation): what the step counts make due at `step` (at the last step, all three)."""
        train_cfg, is_last = self.train_cfg, step == self.run_setup.steps
        return (step % train_cfg.log_every == 0 or is_last,
                step % train_cfg.checkpoint_every == 0 or step in train_cfg.get("checkpoint_steps", ()) or is_last,
                step % train_cfg.eval_every == 0 or is_last)

    def _call_end(self, first: int) -> int:
        """The last step of the call that starts at `first`: the next multiple of the program's steps a call (calls
        aligned the same in a run and its resumes), the run's last step, or the first step before either at
        which a log, evaluation or save falls due."""
        k = self.run_setup.program.steps_per_call
        end = min(-(-first // k) * k, self.run_setup.steps)
        return next((step for step in range(first, end) if any(self._due(step))), end)

    def _train(self, first: int, last: int) -> None:
        """Steps first..last in one compiled call; their metrics join the pending ones."""
        train_cfg, prog, layout = self.train_cfg, self.run_setup.program, self.run_setup.layout
        n = last - first + 1
        local = [next(self.batches) for _ in range(n)]  # this process's rows of each step's global batch
        global_shape = (train_cfg.batch_size, *local[0].shape[1:])  # sharded over data x fsdp
        if prog.train_steps is None:
            batch_BxT1 = jax.make_array_from_process_local_data(layout.batch_sharding, local[0], global_shape)
            self.state, metrics = prog.train_step(self.state, batch_BxT1)
        else:  # a stack of K batches, the unused ones zeros
            k = prog.steps_per_call
            local_KxBxT1 = np.stack(local + [np.zeros_like(local[0])] * (k - n))
            batches = jax.make_array_from_process_local_data(layout.stacked_batch_sharding, local_KxBxT1,
                                                             (k, *global_shape))
            self.state, metrics = prog.train_steps(self.state, batches, np.int32(n))
        self.pending.append((last, n, metrics))
        self.counters.tokens += n * self.tokens_per_step

    def _steps(self, first: int, step: int, preemption: PreemptionWatch, progress: ProgressBar, summary: dict
               ) -> bool:
        """Optimizer steps first..step, and whatever falls due at `step`: a log record, an evaluation, a
        checkpoint. True when a preemption saved it and the run must stop."""
        is_last = step == self.run_setup.steps
        self._train(first, step)
        logs, saves, evaluates = self._due(step)
        preempted = preemption.due(step)
        saves = saves or preempted or (logs and self._time_save_due())
        if logs or saves:
            record = self.flush_metrics(self._clock)
            if record is not None and logs:
                self.metrics_log.write(record)
                progress.update(record)
        if evaluates:
            record = {"step": step, **self.evaluate(self.state.params)}
            self.metrics_log.write(record)
            self.log(f"step {step}/{self.run_setup.steps}  eval {record['eval_loss']:.4f} nats/token "
                     f"({record['eval_bpb']:.4f} ± {record['eval_bpb_se']:.4f} bits/byte)")
            summary.update(record)
        now = time.perf_counter()
        self.counters.wall_seconds, self._wall_mark = self.counters.wall_seconds + now - self._wall_mark, now
        if saves:
            self.save(step)
            self._last_save_time = clock()
        progress.advance(step - first + 1)
        return preempted and not is_last  # a preemption at the last step: the run is done anyway

    def _time_save_due(self) -> bool:
        """Whether train.checkpoint_minutes have passed since the last save; process 0's clock decides for all."""
        minutes = self.train_cfg.get("checkpoint_minutes", 0)  # absent from configs resolved before it existed
        if minutes <= 0:  # the same config on every process: no need to ask process 0
            return False
        due = clock() - self._last_save_time >= 60 * minutes
        if jax.process_count() > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due


class ProgressBar:
    """tqdm over steps with loss, tokens/s and ETA (on a terminal; plain eval lines go to stdout anyway)."""

    def __init__(self, total: int, initial: int, enabled: bool, file=None):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            disable=None if file is None else False, file=file or sys.stderr)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                 mfu=f"{record['mfu']:.1%}", refresh=False)

    def wrap(self, log):
        """`log` that clears the bar first and redraws it after, so a message never shares the bar's line."""
        if self.bar is None:
            return log

        def write(msg: str) -> None:
            with self.bar.external_write_mode():
                log(msg)

        return write

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
