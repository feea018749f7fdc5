"""The training loop: everything with side effects (data files, checkpoints, logs, signals) lives here; the
step itself is the pure function from step.py.

A run on a workdir that holds a checkpoint resumes from it, bit for bit: the state, the data iterator's
position and the counters are restored, and metrics.jsonl is cut back to the restored step. SIGTERM (how
Cloud TPU preempts) saves at the next step boundary and exits with status 143. A NaN or inf loss stops the run
before anything non-finite is saved.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from scalax import config as config_lib
from scalax.data import corpora, pipeline
from scalax.errors import ConfigError, ScalaxError
from scalax.io import atomic_write_json, check_output_dir
from scalax.models import Decoder
from scalax.parallel import mesh as mesh_lib
from scalax.scaling import flops
from scalax.train import optim, program
from scalax.train.checkpoint import Checkpointer
from scalax.train.metrics import MetricsLog, peak_flops_per_device

MFU_CONVENTION = "6n_head_attn"  # model FLOPs per token for MFU: 6N + the unembedding + causal attention
# Keys of the model section that may differ from a checkpoint's: they change how, not what, is computed.
RESUMABLE_MODEL_KEYS = ("remat",)


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


def total_steps(train_cfg) -> int:
    """Run length in optimizer steps: train.steps, or ceil(train.tokens / tokens per step) when tokens > 0."""
    if train_cfg.tokens < 0:
        raise ConfigError("train.tokens", f"must be >= 0 (0: use train.steps), got {train_cfg.tokens}")
    if train_cfg.tokens > 0:
        return math.ceil(train_cfg.tokens / (train_cfg.batch_size * train_cfg.seq_len))
    return train_cfg.steps


def validate(cfg: ConfigDict) -> None:
    t = cfg.train
    for key in ("steps", "batch_size", "seq_len", "microbatches", "log_every", "eval_every", "eval_windows",
                "checkpoint_every", "keep_checkpoints"):
        if t[key] <= 0:
            raise ConfigError(f"train.{key}", f"must be a positive integer, got {t[key]}")
    if t.batch_size % t.microbatches:
        raise ConfigError("train.microbatches", f"must divide train.batch_size={t.batch_size}, got {t.microbatches}")
    if t.batch_size % jax.process_count():
        raise ConfigError("train.batch_size", f"{t.batch_size} is not divisible by the process count "
                          f"{jax.process_count()}")
    if t.z_loss < 0:
        raise ConfigError("train.z_loss", f"must be >= 0, got {t.z_loss}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {cfg.data.val_fraction}")


def resolved_config(cfg: ConfigDict) -> dict:
    """The config as run: the model section with its derived fields (vocab, head_dim, ...) filled in."""
    out = cfg.to_dict()
    out["model"] = config_lib.model_config(cfg).to_dict()
    return out


# Keys that decide which batches a run sees: a resume may never change them.
DATA_ORDER_KEYS = ("batch_size", "seq_len", "seed")


def check_same_run(saved: dict, current: dict, workdir: str, step: int, allow_changes: bool, log) -> None:
    """Refuse a resume that would silently train another run than the checkpoint's: a new length (train.steps,
    train.tokens) or optimizer (optim.*: the schedule is rebuilt from them) unless `allow_changes`; a new batch,
    sequence length or seed (the data order) always."""
    for key in DATA_ORDER_KEYS:
        if saved["train"].get(key) != current["train"].get(key):
            raise ConfigError(f"train.{key}", f"{workdir} holds a checkpoint trained with train.{key}="
                              f"{saved['train'].get(key)!r}, not {current['train'].get(key)!r}; the data order "
                              "depends on it. Use another --workdir, or the checkpoint's value")
    old_steps, new_steps = total_steps(ConfigDict(saved["train"])), total_steps(ConfigDict(current["train"]))
    changed = [f"train.{k} ({saved['train'].get(k)!r} in the checkpoint, {current['train'].get(k)!r} now)"
               for k in ("steps", "tokens") if saved["train"].get(k) != current["train"].get(k)]
    if old_steps == new_steps:
        changed = []  # e.g. train.tokens given instead of the same number of steps
    changed += [f"optim.{k} ({saved['optim'].get(k)!r} in the checkpoint, {current['optim'].get(k)!r} now)"
                for k in sorted(set(saved["optim"]) | set(current["optim"]))
                if saved["optim"].get(k) != current["optim"].get(k)]
    if not changed:
        return
    if not allow_changes:
        raise ConfigError(changed[0].split(" ")[0], f"{workdir} holds a checkpoint of a run with another length or "
                          f"optimizer: {'; '.join(changed)}. The learning-rate schedule would change mid-run. Use "
                          "another --workdir, the checkpoint's values, or --allow-changes to go on with the new ones")
    old_lr = float(optim.schedule(ConfigDict(saved["optim"]), old_steps)(step))  # the update of step + 1
    new_lr = float(optim.schedule(ConfigDict(current["optim"]), new_steps)(step))
    log(f"--allow-changes: {'; '.join(changed)}. After step {step} the run follows the new values: its "
        f"{current['optim']['schedule']} schedule is that of a {new_steps}-step run (the checkpoint's: {old_steps} "
        f"steps); lr of step {step + 1}: {new_lr:.4g} (it would have been {old_lr:.4g})")


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
    """Refuse to resume a checkpoint of another model or tokenizer, naming the keys that differ."""
    keys = sorted(k for k in set(saved["model"]) | set(current["model"])
                  if k not in RESUMABLE_MODEL_KEYS and saved["model"].get(k) != current["model"].get(k))
    differing = [f"model.{k} ({saved['model'].get(k)!r} in the checkpoint, {current['model'].get(k)!r} now)"
                 for k in keys]
    for key in ("tokenizer", "tokenizer_hash", "corpus"):
        if saved["data"].get(key) != current["data"].get(key):
            differing.append(f"data.{key} ({saved['data'].get(key)!r} in the checkpoint, "
                             f"{current['data'].get(key)!r} now)")
    if differing:
        raise ConfigError(differing[0].split(" ")[0], f"{workdir} holds a checkpoint of a different config: "
                          f"{'; '.join(differing)}. Use another --workdir, or the checkpoint's config.")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def train(cfg: ConfigDict, workdir: str, log=_log, allow_changes: bool = False) -> dict:
    """Train (or resume) the run that `cfg` describes in `workdir`; returns a summary of its end. A resume
    with another length or optimizer is refused unless `allow_changes` (see check_same_run)."""
    validate(cfg)
    check_output_dir(workdir, "--workdir")
    model_cfg = config_lib.model_config(cfg)
    t = cfg.train
    steps = total_steps(t)
    config_lib.check_seq_len(t.seq_len, model_cfg)
    layout = mesh_lib.layout(cfg.mesh, model_cfg, t.batch_size)
    if (t.batch_size // t.microbatches) % layout.batch_shards:
        raise ConfigError("train.microbatches", f"each microbatch of {t.batch_size // t.microbatches} sequences "
                          f"must divide over mesh.data x mesh.fsdp = {layout.batch_shards}")
    tx = optim.optimizer(cfg.optim, steps)
    schedule = optim.schedule(cfg.optim, steps)
    resolved = resolved_config(cfg)
    writer = jax.process_index() == 0

    data = corpora.load_splits(cfg.data, log)
    for split, tokens in (("train", data.train), ("val", data.val)):
        pipeline.check_tokens(tokens, t.seq_len, model_cfg.vocab_size, data.header["max_token_id"], split)
    resolved["data"]["tokenizer_hash"] = data.tokenizer.hash

    os.makedirs(workdir, exist_ok=True)
    model = Decoder(model_cfg)
    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    for step in reversed(checkpointer.steps()):
        try:
            saved = checkpointer.read_meta(step)["config"]
        except Exception:  # unreadable: restore_latest reports it and falls back
            continue
        check_compatible(saved, resolved, workdir)
        check_same_run(saved, resolved, workdir, step, allow_changes, log)
        break
    prog = program.build(model, tx, schedule, layout, t.seed, t.seq_len, t.microbatches, t.z_loss)
    # Restoring onto this mesh: the target carries the new shardings, whatever mesh wrote the checkpoint.
    restored = checkpointer.restore_latest(prog.abstract_state, warn=log)
    batches = pipeline.iterator(pipeline.train_dataset(data.train, t.seq_len, t.batch_size, t.seed,
                                                       jax.process_index(), jax.process_count()), cfg.data.prefetch)
    if restored is None:  # parameters are born sharded: no device ever holds the whole model
        state, counters, start = prog.init(), Counters(), 0
    else:
        start, state, data_state, meta = restored
        batches.set_state(data_state)
        counters = Counters(**meta["counters"])
        log(f"resuming {workdir} from step {start}")
    if writer:
        atomic_write_json(os.path.join(workdir, "config.json"), resolved)
    metrics_log = MetricsLog(workdir, enabled=writer)
    metrics_log.truncate_after(start)

    per_token = flops.all_flops_per_token(model_cfg, t.seq_len)
    peak, peak_source = peak_flops_per_device(model_cfg.dtype)
    devices_used = layout.mesh.size
    tokens_per_step = t.batch_size * t.seq_len
    bytes_per_token = data.bytes_per_token("val")
    eval_windows = pipeline.eval_windows(data.val, t.seq_len, t.eval_windows)
    train_step, eval_step = prog.train_step, prog.eval_step
    n_params = flops.params_total(model_cfg)
    sizes = " x ".join(f"{a} {n}" for a, n in layout.mesh.shape.items())
    log(f"training {n_params / 1e6:.2f}M parameters for {steps} steps of {tokens_per_step} tokens "
        f"({steps * tokens_per_step / 1e6:.1f}M tokens) on {data.header['counts']['train']['tokens'] / 1e6:.1f}M "
        f"training tokens; mesh {sizes} ({jax.process_count()} process(es)); MFU against "
        f"{peak / 1e12:.2f} TFLOP/s per device ({peak_source})")

    def global_batch(local_BxT1: np.ndarray) -> jax.Array:
        """This process's rows -> the global batch, sharded over data x fsdp."""
        return jax.make_array_from_process_local_data(layout.batch_sharding, local_BxT1,
                                                      (t.batch_size, *local_BxT1.shape[1:]))

    def eval_chunks():
        """The fixed windows in global batches of train.batch_size (the last one padded, its padding dropped)."""
        for i in range(0, len(eval_windows), t.batch_size):
            chunk = eval_windows[i : i + t.batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], t.batch_size - len(chunk), axis=0)])
            array = jax.make_array_from_callback(padded.shape, layout.batch_sharding, lambda idx, x=padded: x[idx])
            yield array, len(chunk)

    def evaluate(params) -> dict:
        losses = np.concatenate([np.asarray(eval_step(params, array))[:n] for array, n in eval_chunks()])
        loss = float(losses.mean())
        se = float(losses.std(ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else float("nan")
        return {"eval_loss": loss, "eval_loss_se": se, "eval_bpb": loss / math.log(2) / bytes_per_token,
                "eval_bpb_se": se / math.log(2) / bytes_per_token}

    preempt = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempt.update(requested=True))
    pending: list[tuple[int, dict]] = []  # metrics still on device, fetched at the next log or checkpoint
    last_saved = start if restored else None
    clock = {"time": time.perf_counter(), "tokens": counters.tokens}
    progress = ProgressBar(steps, start, writer)
    log = progress.wrap(log)  # eval lines on their own line, the bar redrawn below them

    def flush_metrics() -> dict | None:
        """Fetch pending metrics (one host sync), stop on a non-finite loss, write the logged steps."""
        if not pending:
            return None
        fetched = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, fetched, strict=True):
            if not np.isfinite(m["loss"]):
                where = f"step {last_saved} in {checkpointer.directory}" if last_saved else "none was saved"
                raise TrainingDiverged(f"loss is {m['loss']} at step {step}: training diverged; the last good "
                                       f"checkpoint is kept ({where}). Try a lower optim.lr or longer warmup.")
        step, m = pending[-1][0], fetched[-1]
        pending.clear()
        now = time.perf_counter()
        tokens_per_s = (counters.tokens - clock["tokens"]) / max(now - clock["time"], 1e-9)
        clock.update(time=now, tokens=counters.tokens)
        record = {"step": step, "loss": float(m["loss"]), "bpb": float(m["loss"]) / math.log(2) / bytes_per_token,
                  "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s,
                  "mfu": tokens_per_s * per_token[MFU_CONVENTION] / (peak * devices_used),
                  "tokens": counters.tokens, **counters.flops(per_token), "wall_seconds": counters.wall_seconds}
        return record

    def save(step: int) -> None:
        nonlocal last_saved
        meta = {"config": resolved, "counters": dataclasses.asdict(counters)}
        checkpointer.save(step, state, batches.get_state(), meta)
        last_saved = step

    summary: dict = {"status": "running"}
    if start >= steps:
        log(f"{workdir} already holds the run's final checkpoint (step {start})")
        summary.update(evaluate(state.params))
    wall_mark = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            batch = global_batch(next(batches))
            state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            counters.tokens += tokens_per_step
            is_last = step == steps
            if step % t.log_every == 0 or is_last or step % t.checkpoint_every == 0 or preempt["requested"]:
                record = flush_metrics()
                if record is not None and (step % t.log_every == 0 or is_last):
                    metrics_log.write(record)
                    progress.update(record)
            if step % t.eval_every == 0 or is_last:
                record = {"step": step, **evaluate(state.params)}
                metrics_log.write(record)
                log(f"step {step}/{steps}  eval {record['eval_loss']:.4f} nats/token "
                    f"({record['eval_bpb']:.4f} ± {record['eval_bpb_se']:.4f} bits/byte)")
                summary.update(record)
            now = time.perf_counter()
            counters.wall_seconds, wall_mark = counters.wall_seconds + now - wall_mark, now
            if step % t.checkpoint_every == 0 or is_last or preempt["requested"]:
                save(step)
            progress.advance()
            if preempt["requested"]:
                checkpointer.wait()
                raise Preempted(f"SIGTERM: saved a checkpoint at step {step} in {checkpointer.directory}; "
                                "run the same command again to resume")
        summary.update(status="finished", step=steps, tokens=counters.tokens, wall_seconds=counters.wall_seconds,
                       **counters.flops(per_token))
        if writer:
            atomic_write_json(os.path.join(workdir, "summary.json"), summary)
        return summary
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        progress.close()
        metrics_log.close()
        checkpointer.close()


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

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
