"""The sweep runner: trains each planned run in its own process (one after another, or K at a time), keeps a
ledger, and fits and plots at the end. The processes are forked from a server that has imported the training
code once (forkserver.py), which saves each run the interpreter's start and some 2 s of imports.

K at a time (`--parallel K`, or `sweep.parallel`): the runner's CPUs are split into K equal sets and each child
is pinned to one, so that K runs on K cores do not fight over each other's XLA thread pools (unpinned, two runs
on 2 cores each took 2.7-3.4x their time alone); the longest runs (by `expected_seconds`) start first, so
that no core idles at the end waiting for one long run.

`DIR/runs.jsonl` holds one record per run (name, status, overrides, N, D, C, final eval loss and bits/byte,
wall seconds, the training split's unique tokens and the epochs over it, the error), rewritten atomically on
every change, so a killed sweep never doubles or loses a record. Started again, the runner skips finished runs
and restarts the others, which resume from their own checkpoints (`DIR/runs/NAME`). A failed or diverged run
is recorded and the sweep goes on. Each child gets SIGTERM when the runner dies (Linux: through the fork
server), so it checkpoints instead of running on unsupervised.

With `sweep.fit_device` set (v4, v5e, v5p, v6e, h100, h200, or a size such as 16GiB) and `sweep.fit_devices`
(the slice's device count), each run is first planned (`scalax plan`: an ahead-of-time compile on that many
fake devices); a run whose step would not fit that device's memory is recorded as skipped, with the reason,
and not trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from ml_collections import ConfigDict
from tqdm.auto import tqdm

from scalax import config as config_lib
from scalax import io
from scalax.errors import ConfigError
from scalax.models import positions
from scalax.parallel.devices import DEVICE_MEMORY
from scalax.scaling import analysis
from scalax.scaling import sweep as sweep_lib
from scalax.scaling.forkserver import ForkedChild, ForkServer
from scalax.scaling.results import FitResult, jsonable

FINISHED, FAILED, DIVERGED, PENDING, RUNNING, SKIPPED = ("finished", "failed", "diverged", "pending", "running",
                                                         "skipped")


class Ledger:
    """DIR/runs.jsonl, read once and replaced whole on every change; on GCS under a generation precondition,
    so a second runner on the same sweep fails in one line instead of undoing the first one's records."""

    def __init__(self, workdir: str):
        self.path = io.join(workdir, "runs.jsonl")
        self.records: dict[str, dict] = {}
        data, self._version = io.read_versioned(self.path)
        for line_no, line in enumerate((data or b"").decode().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    self.records[record["name"]] = record
                except (ValueError, KeyError, TypeError):
                    raise ConfigError("runs.jsonl", f"{self.path}:{line_no} is not a run record (a JSON "
                                      "object with a name); the ledger was edited or damaged") from None

    def _write(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records.values())
        self._version = io.write_versioned(self.path, text.encode(), self._version)

    def update(self, run_name: str, **fields) -> None:
        self.records.setdefault(run_name, {"name": run_name}).update(fields)
        self._write()

    def remove(self, run_name: str) -> None:
        self.records.pop(run_name, None)
        self._write()

    def unfinished(self) -> list[dict]:
        """Records that did not finish and were not skipped on purpose: failed, diverged, stopped, pending."""
        return [r for r in self.records.values() if r.get("status") not in (FINISHED, SKIPPED)]


def cpu_sets(parallel: int) -> list[set[int] | None]:
    """The CPUs of each of `parallel` child slots: this process's CPUs split into equal contiguous sets, or no
    pinning (None) for one slot, or where there are fewer CPUs than slots (or no affinity on this OS)."""
    if parallel <= 1 or not hasattr(os, "sched_getaffinity"):
        return [None] * parallel
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < parallel:
        return [None] * parallel
    per = len(cpus) // parallel
    return [set(cpus[i * per : (i + 1) * per]) for i in range(parallel)]


@dataclasses.dataclass
class Child:
    proc: ForkedChild
    started: float
    tail: object  # log_tail's function
    slot: int


def check_sweep_config(cfg: ConfigDict, key: str = "--config") -> None:
    if "sweep" not in cfg or "base" not in cfg:
        raise ConfigError(key, "not a sweep config (it has no `sweep` and `base` sections; a training config?); "
                          "allowed: a sweep config such as configs/sweeps/quickstart.py")


def run_sweep(cfg: ConfigDict, workdir: str, parallel: int | None = None, log=print, force: bool = False,
              server: ForkServer | None = None) -> FitResult | None:
    """Train every run of the sweep that has not finished, `parallel` at a time (default `sweep.parallel`, else
    1), each forked by `server` (default: a new one), which is closed at the end; then fit and plot; returns the
    fit. A workdir that holds a sweep of another config is refused, naming
    what changed, unless `force`: then the runs whose config changed (or that left the grid) are moved to
    DIR/replaced/ and trained again."""
    check_sweep_config(cfg)
    parallel = parallel or cfg.sweep.get("parallel", 1)
    if parallel <= 0:
        raise ConfigError("sweep.parallel", f"must be a positive integer, got {parallel}")
    planned = sweep_lib.plan(cfg)
    ledger = prepare_workdir(cfg, planned, workdir, force, log)
    todo = [r for r in planned if ledger.records[r.name]["status"] != FINISHED]
    if parallel > 1:  # the longest first: the last runs to start are short ones (branches wait for trunks)
        todo.sort(key=lambda r: -expected_seconds(r))
    log(f"sweep: {len(planned)} runs, {len(planned) - len(todo)} already finished, {len(todo)} to train "
        f"({parallel} at a time) in {workdir}")
    if cfg.sweep.kind == "wsd_branch":
        flops_key = analysis.conventions(cfg.sweep).flops
        log(f"sweep: {sweep_lib.branch_cost_line([r.record() for r in planned], flops_key)}")
    bar = tqdm(total=len(planned), initial=len(planned) - len(todo), unit="run", disable=None, file=sys.stderr)
    active: dict[str, Child] = {}
    queue, cpus, server = list(todo), cpu_sets(parallel), server or ForkServer()
    try:
        while queue or active:
            while len(active) < parallel and (run := _next_ready(queue, ledger, active, bar, log)):
                unfit = _does_not_fit(cfg, run, workdir)
                status, error = (SKIPPED, unfit) if unfit else (FAILED, seed_branch(workdir, run))
                if error:
                    ledger.update(run.name, status=status, error=error)
                    log(f"[{run.name}] {status}: {error}")
                    bar.update(1)
                    continue
                tail = log_tail(workdir, run.name)  # from the log's current end: a resumed run's old lines stay
                slot = min(set(range(parallel)) - {c.slot for c in active.values()})
                active[run.name] = Child(*_start(cfg, run, workdir, cpus[slot], server), tail, slot)
                ledger.update(run.name, status=RUNNING)
            server.wait(0.2)
            _collect(active, workdir, ledger, bar, log)
    finally:
        bar.close()
        for child in active.values():  # interrupted: children checkpoint and stop
            child.proc.send_signal(signal.SIGTERM)
        for child in active.values():
            child.proc.wait()
        server.close()
    multiples = cfg.sweep.get("eval_lengths", ())
    for name, record in list(ledger.records.items()):  # (runs finished by an earlier sweep command too)
        if multiples and record["status"] == FINISHED and f"eval_loss_{multiples[-1]:g}x" not in record:
            ledger.update(name, **evaluate_lengths(workdir, name, multiples, log))
    return fit_and_plot(workdir, cfg, log)


def _collect(active: dict, workdir: str, ledger: Ledger, bar, log) -> None:
    """Pass on the children's new log lines; record each child that ended (and drop it from `active`)."""
    for name, child in list(active.items()):
        for line in child.tail():
            log(f"[{name}] {line}")
        if child.proc.poll() is None:
            continue
        del active[name]
        for line in child.tail():
            log(f"[{name}] {line}")
        upload_log(workdir, name)
        ledger.update(name, **run_result(workdir, name, child.proc.returncode, time.time() - child.started))
        status = ledger.records[name]["status"]
        log(f"[{name}] {status}" + (f": {ledger.records[name].get('error', '')}" if status != FINISHED
                                     else f", eval {ledger.records[name]['eval_loss']:.4f} nats/token"))
        bar.update(1)


def _next_ready(queue: list, ledger: Ledger, active: dict, bar, log):
    """Take the first queued run that may start: any but a wsd_branch branch whose trunk has not finished yet.
    A branch whose trunk ended otherwise (failed, diverged, stopped, skipped) is recorded as failed, naming it."""
    for i, run in enumerate(queue):
        parent = ledger.records.get(run.parent, {}) if run.parent else {}
        if not run.parent or parent.get("status") == FINISHED:
            return queue.pop(i)
        if run.parent in active or any(r.name == run.parent for r in queue):
            continue
        queue.pop(i)
        error = f"its trunk {run.parent} did not finish ({parent.get('status')}: {parent.get('error')})"
        ledger.update(run.name, status=FAILED, error=error)
        log(f"[{run.name}] failed: {error}")
        bar.update(1)
        return _next_ready(queue, ledger, active, bar, log)
    return None


def seed_branch(workdir: str, run) -> str | None:
    """A wsd_branch branch's first start: copy its trunk's checkpoint at the branch point into the branch's own
    DIR/runs/NAME/checkpoints (the trunk's is only read), so the branch resumes from it as from its own; a branch
    that holds a checkpoint already resumes from that. Returns why it could not (None: seeded, or no branch)."""
    if not run.parent:
        return None
    target = io.join(workdir, "runs", run.name, "checkpoints")
    if any(name.isdigit() for name in io.listdir(target)):
        return None
    source = io.join(workdir, "runs", run.parent, "checkpoints", str(run.branch_step))
    if not io.isdir(source):
        return f"its trunk {run.parent} has no checkpoint at the branch point ({source})"
    io.copytree(source, io.join(target, str(run.branch_step)))
    return None


def prepare_workdir(cfg: ConfigDict, planned: list, workdir: str, force: bool, log=print) -> Ledger:
    """Make the sweep's directory (or check the one there: `_replace_changed_runs`), write sweep.json and record
    every run that has not finished as pending, before anything runs; finished records keep their results."""
    io.make_output_dir(io.join(workdir, "runs"), "--workdir")
    ledger = Ledger(workdir)
    _replace_changed_runs(cfg, planned, workdir, ledger, force, log)
    io.atomic_write_json(io.join(workdir, "sweep.json"), cfg.to_dict())
    for run in planned:
        if ledger.records.get(run.name, {}).get("status") != FINISHED:
            ledger.update(run.name, **run.record(), status=PENDING)
    return ledger


def _replace_changed_runs(cfg: ConfigDict, planned: list, workdir: str, ledger: Ledger, force: bool, log) -> None:
    """Compare the planned grid with the one in the workdir: runs added, removed, or whose config changed."""
    path = io.join(workdir, "sweep.json")
    if not io.exists(path):
        return
    changed = config_lib.diff(io.read_json(path), config_lib.plain(cfg))
    if not changed:
        return
    wanted = {run.name: config_lib.plain(sweep_lib.run_config(cfg, run)) for run in planned}
    stale = []  # recorded runs that are not in the new grid, or whose run config differs
    for name in ledger.records:
        config_path = io.join(workdir, "runs", name, "run_config.json")
        if name not in wanted:
            stale.append(name)
        elif io.exists(config_path) and io.read_json(config_path) != wanted[name]:
            stale.append(name)
    added = [name for name in wanted if name not in ledger.records]
    what = "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "")
    if not stale and not added:
        log(f"sweep: the config changed ({what}); the grid of runs is the same")
        return
    if not force:
        raise ConfigError(changed[0].split(":")[0], f"{workdir} holds a sweep with another grid ({what}: "
                          f"{len(added)} run(s) added, {len(stale)} removed or changed). Use another --workdir, or "
                          "--force to move the runs that changed to DIR/replaced/ and train the new grid there")
    aside = io.join(workdir, "replaced", time.strftime("%Y%m%d-%H%M%S"))
    for name in stale:
        run_dir = io.join(workdir, "runs", name)
        if io.isdir(run_dir):
            io.move(run_dir, io.join(aside, name))
        ledger.remove(name)
    log(f"sweep: the grid changed ({what}); --force: {len(stale)} run(s) removed or changed (moved to {aside}), "
        f"{len(added)} added")


def log_path(workdir: str, name: str) -> str:
    """Where a run's train.log is written: DIR/runs/NAME/train.log, or its local mirror for a gs:// DIR (the
    child's output must go to a local file; a restart on another machine first fetches what the bucket holds);
    uploaded to DIR/runs/NAME when the run ends."""
    run_dir = io.join(workdir, "runs", name)
    local = os.path.join(io.local_mirror(run_dir), "train.log")
    if io.is_remote(run_dir) and not os.path.exists(local) and io.exists(io.join(run_dir, "train.log")):
        io.atomic_write_bytes(local, io.read_bytes(io.join(run_dir, "train.log")))
    return local


def upload_log(workdir: str, name: str) -> None:
    run_dir = io.join(workdir, "runs", name)
    if io.is_remote(run_dir) and os.path.exists(log_path(workdir, name)):
        io.upload(log_path(workdir, name), io.join(run_dir, "train.log"))


def _start(cfg: ConfigDict, run, workdir: str, cpus: set[int] | None,
           server: ForkServer) -> tuple[ForkedChild, float]:
    """`scalax train` of the run in a child process forked by `server` (pinned to `cpus`, when given)."""
    config_path = write_run_config(cfg, run, workdir)
    run_dir = io.join(workdir, "runs", run.name)
    child = server.start_child(["train", f"--config={config_path}", f"--workdir={run_dir}"],
                               log_path(workdir, run.name), cpus)
    return child, time.time()


# A run's time on one CPU core, for the order of a parallel sweep: fitted to the quickstart's 15 runs on 2 cores
# (2026-12-04), within 4.6 s of each run's clock (20-108 s). The steps' own cost matters for small models: by
# exact FLOPs alone the 11,020-step d16 run (65 s) started seventh and one core idled 14 s at the end.
SECONDS_PER_EXACT_FLOP = 18.7e-12
SECONDS_PER_STEP = 2.55e-3  # dispatch, the optimizer and the fixed cost of each of a step's ~200 fusions


def expected_seconds(run) -> float:
    """The run's expected training time on one CPU core (from its branch point, for a branch)."""
    steps = run.overrides["train.steps"]
    left = 1 - run.branch_step / steps
    return (run.flops["flops_exact"] * SECONDS_PER_EXACT_FLOP + steps * SECONDS_PER_STEP) * left


def _does_not_fit(cfg: ConfigDict, run, workdir: str) -> str | None:
    """Why the run would not fit `sweep.fit_device` (None: it fits, or no device is set)."""
    device = cfg.sweep.get("fit_device", "")
    if not device:
        return None
    config_path = write_run_config(cfg, run, workdir)
    target = f"--device={device}" if device.lower() in DEVICE_MEMORY else f"--device-memory={device}"
    proc = subprocess.run([sys.executable, "-m", "scalax", "plan", f"--config={config_path}",
                           f"--devices={cfg.sweep.get('fit_devices', 1)}", target, "--json"],
                          capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        lines = proc.stderr.strip().splitlines()
        return f"scalax plan failed: {lines[-1] if lines else proc.returncode}"
    report = json.loads(proc.stdout)
    if report["fits"] == "fits":
        return None
    return f"needs {report['peak_per_device'] / 2**30:.2f} GiB per device; {report['device']}"


def write_run_config(cfg: ConfigDict, run, workdir: str) -> str:
    """DIR/runs/NAME/run_config.json: the base config with the run's overrides; returns its path."""
    config_path = io.join(workdir, "runs", run.name, "run_config.json")
    io.atomic_write_json(config_path, sweep_lib.run_config(cfg, run).to_dict())
    return config_path


def log_tail(workdir: str, name: str):
    """A function returning the run's new log lines (the eval lines and errors) since it was last called."""
    path = log_path(workdir, name)
    state = {"offset": os.path.getsize(path) if os.path.exists(path) else 0}

    def new_lines() -> list[str]:
        if not os.path.exists(path):
            return []
        with open(path, errors="replace") as f:
            f.seek(state["offset"])
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        state["offset"] += len(complete.encode())
        return [line for line in complete.splitlines() if line.startswith(("step ", "scalax train:", "resuming"))]

    return new_lines


def evaluate_lengths(workdir: str, name: str, multiples, log=print) -> dict:
    """A finished run's loss at `multiples` of its training length (`scalax eval` into DIR/runs/NAME/eval), as
    ledger fields eval_loss_1x, eval_loss_2x, ... (None past what its positional scheme can encode)."""
    run_dir = io.join(workdir, "runs", name)
    run_cfg = config_lib.load(io.join(run_dir, "config.json"))
    seq_len, model = run_cfg.train.seq_len, config_lib.model_config(run_cfg)
    limit = positions.scheme_of(model).length_limit(model)
    lengths = [int(k * seq_len) for k in multiples if limit is None or k * seq_len <= limit]
    proc = subprocess.run([sys.executable, "-m", "scalax", "eval", f"--checkpoint={run_dir}",
                           f"--lengths={','.join(map(str, lengths))}", f"--out={io.join(run_dir, 'eval')}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        log(f"[{name}] scalax eval failed: {lines[-1] if lines else proc.returncode}")
        return {"eval_lengths_error": lines[-1] if lines else f"exit status {proc.returncode}"}
    losses = {r["length"]: r["loss"] for r in io.read_json(io.join(run_dir, "eval", "lengths.json"))["lengths"]}
    log(f"[{name}] loss by length: " + ", ".join(f"{n}: {loss:.4f}" for n, loss in losses.items()))
    return {"eval_lengths_error": None, **{f"eval_loss_{k:g}x": losses.get(int(k * seq_len)) for k in multiples}}


def run_result(workdir: str, name: str, returncode: int, seconds: float) -> dict:
    summary_path = io.join(workdir, "runs", name, "summary.json")
    if returncode == 0 and io.exists(summary_path):
        s = io.read_json(summary_path)
        return {"status": FINISHED, "eval_loss": s["eval_loss"], "eval_loss_se": s["eval_loss_se"],
                "eval_bpb": s["eval_bpb"], "wall_seconds": s["wall_seconds"], "error": None,
                "unique_train_tokens": s.get("unique_train_tokens"), "epochs": s.get("epochs")}
    with open(log_path(workdir, name), errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    error = lines[-1] if lines else f"exit status {returncode}"
    status = DIVERGED if returncode == 3 else (PENDING if returncode == 143 else FAILED)
    return {"status": status, "error": error, "returncode": returncode, "wall_seconds": seconds}


def fit_and_plot(workdir: str, cfg: ConfigDict, log=print) -> FitResult | None:
    """Fit the finished runs (analysis.analyse, as `scalax fit DIR` does) and write fit.json, fit_runs.csv (the
    points fitted: `scalax fit --csv` of it gives the same fit), report.md and plots/; None: too few runs."""
    from scalax.scaling import plots, report  # matplotlib, imported only when there is something to plot

    records = list(Ledger(workdir).records.values())
    sweep = cfg.sweep.to_dict()
    runs_for_fit = analysis.runs_of_ledger(records, sweep)
    if len(runs_for_fit) < 5:
        log(f"sweep: only {len(runs_for_fit)} finished runs; not fitting")
        return None
    result = analysis.analyse(runs_for_fit, bootstrap=sweep["bootstrap"], seed=sweep["seed"],
                              conventions_used=analysis.conventions(sweep))
    io.atomic_write_json(io.join(workdir, "fit.json"), jsonable(result))
    analysis.write_csv(io.join(workdir, "fit_runs.csv"), runs_for_fit, analysis.finished_names(records))
    paths = plots.plot_all(result, runs_for_fit, io.join(workdir, "plots"))
    io.atomic_write_text(io.join(workdir, "report.md"), report.render(result, records, paths, workdir))
    log(report.summary(result))
    log(f"sweep: fitted {len(runs_for_fit)} runs; wrote {workdir}/fit.json, fit_runs.csv, report.md and plots/")
    return result

