"""`scalax launch`: a sweep's runs onto Cloud TPU, through queued resources and ssh (`tpu-vm`) or GKE (`xpk`),
with the sweep's ledger, runs, fits and plots on a bucket.

Placement: each run gets the smallest slice of the asked generation that its memory plan fits
(placement.py). Runs are sorted by slice (largest first), then by estimated hours, and dealt to `--max-slices`
slots, each to the slot with the fewest estimated hours so far; a slot trains its runs one after another on one
slice, kept while the next run wants the same type and replaced when it wants another. The assignment is fixed
before anything starts, so `--dry-run` prints exactly the commands that will run.

tpu-vm: a slot creates its queued resource, waits for ACTIVE, runs the setup on every worker, then `scalax train`
of each run on every worker (ssh --worker=all). When the resource leaves ACTIVE (PREEMPTED, SUSPENDED, FAILED)
or the run is stopped by SIGTERM, the slot deletes and recreates the resource (the same name) and runs the same
command again: the run resumes from its checkpoint on the bucket. At most --retries times per run; then the
run is recorded failed. xpk: one workload per run; restarts are xpk's own (--max-restarts); the launcher waits
for each and deletes it. Every slice and workload is deleted when its runs end, on an error, and after Ctrl-C
(the runs are first asked to checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from ml_collections import ConfigDict

from scalax import __version__, io
from scalax import config as config_lib
from scalax.errors import ConfigError, ScalaxError
from scalax.launch import commands, placement, tpus
from scalax.launch.commands import Options
from scalax.scaling import runner
from scalax.scaling import sweep as sweep_lib

ACTIVE = "ACTIVE"
LOST = ("PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED")  # the capacity is gone: delete and recreate it
TOOLS = {"gcloud": "install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install",
         "xpk": "pip install xpk (GKE, JobSet, Kueue; see https://github.com/AI-Hypercomputer/xpk)",
         "kubectl": "gcloud components install kubectl (xpk drives the cluster through it)"}
STOP_GRACE_SECONDS = 300  # after Ctrl-C, how long a run may take to save its checkpoint
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LaunchFailed(ScalaxError):
    """A cloud command failed (quota, permissions, a zone without the type): the command and its last line."""

    exit_code = 1


@dataclasses.dataclass
class Placed:
    run: sweep_lib.PlannedRun
    slice: tpus.Slice
    cost: tpus.RunCost
    name: str  # the workload's name (xpk), unique in the sweep


# ---------------------------------------------------------------------- checks, placement, cost
def check_options(o: Options, workdir: str, dry_run: bool) -> None:
    """Everything that can be checked before planning: the backend's tools, project and zone, a bucket."""
    if o.backend not in commands.BACKENDS:
        raise ConfigError("--backend", f"unknown backend {o.backend!r}; allowed: {', '.join(commands.BACKENDS)}")
    if not o.project:
        raise ConfigError("--project", "no Google Cloud project; pass --project=PROJECT (or set "
                          "CLOUDSDK_CORE_PROJECT)")
    if not o.zone:
        raise ConfigError("--zone", "no zone; pass --zone=ZONE, one that offers the TPU type (or set "
                          "CLOUDSDK_COMPUTE_ZONE)")
    if o.backend == "xpk" and not o.cluster:
        raise ConfigError("--cluster", "the xpk backend needs the GKE cluster: --cluster=NAME (xpk cluster create)")
    if o.retries < 0 or o.max_slices <= 0:
        raise ConfigError("--retries" if o.retries < 0 else "--max-slices", "must be a non-negative (--retries) "
                          "or positive (--max-slices) integer")
    if not o.poll_seconds > 0:
        raise ConfigError("--poll-seconds", f"must be a positive number of seconds, got {o.poll_seconds}")
    if not io.is_remote(workdir):
        raise ConfigError("--workdir", f"{workdir} is local; a {o.backend} launch runs on other machines, which "
                          "read and write the sweep on a bucket: allowed: gs://BUCKET/PATH")
    if dry_run:
        return
    for tool in ("gcloud",) if o.backend == "tpu-vm" else ("xpk", "kubectl", "gcloud"):
        if shutil.which(tool) is None:
            raise ConfigError("--backend", f"{o.backend} needs `{tool}`, which is not on PATH: {TOOLS[tool]}")
    io.make_output_dir(workdir, "--workdir")  # the bucket exists and can be written, before any capacity


def prefix_of(workdir: str) -> str:
    """A name stem for the sweep's slices and workloads: letters of the workdir's last part and a hash of it
    (names of the sweep are distinct from any other sweep's; lowercase, digits, hyphens)."""
    slug = re.sub(r"[^a-z0-9]+", "-", workdir.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:12] or "sweep"
    return f"sx-{slug}-{hashlib.sha256(workdir.encode()).hexdigest()[:6]}"


def place(cfg: ConfigDict, workdir: str, o: Options, mfu: float | None, price: float | None,
          log=print) -> list[Placed]:
    """The sweep's runs with their slices and costs; one line naming a run that fits no slice."""
    planned = sweep_lib.plan(cfg)
    configs = {r.name: config_lib.plain(sweep_lib.run_config(cfg, r)) for r in planned}
    chosen = placement.choose_slices(configs, o.tpu, log)
    for run in planned:
        if isinstance(chosen[run.name], str):
            raise ConfigError("--tpu", f"run {run.name} fits no slice up to {o.tpu.name} ({chosen[run.name]}); "
                              "use a larger --tpu or another generation (a batch must divide among the chips: "
                              "sweep.batch_multiple)")
    prefix = prefix_of(workdir)
    return [Placed(r, chosen[r.name], tpus.run_cost(r.name, chosen[r.name], r.flops["flops_exact"],
                                                     r.counts["params_non_embedding"], o.spot, mfu, price),
                   f"{prefix}-r{i}") for i, r in enumerate(planned)]


def assign(placed: list[Placed], slots: int) -> list[list[Placed]]:
    """Runs dealt to slots (see the module's docstring)."""
    order = sorted(placed, key=lambda p: (-p.slice.size, -p.cost.hours))
    out: list[list[Placed]] = [[] for _ in range(max(1, slots))]
    hours = [0.0] * len(out)
    for p in order:
        i = hours.index(min(hours))
        out[i].append(p)
        hours[i] += p.cost.hours
    return [s for s in out if s]


# ---------------------------------------------------------------------- the dry run
def dry_run_commands(placed: list[Placed], workdir: str, o: Options) -> list[str]:
    """The commands a launch runs, shell-quoted, in order per slot (tpu-vm) or per run (xpk)."""
    lines = []
    if o.backend == "xpk":
        for p in sorted(placed, key=lambda p: (-p.slice.size, -p.cost.hours)):
            lines.append(f"# {p.run.name} on {p.slice.name}")
            for argv in (commands.xpk_create(o, p.name, p.slice, commands.train_command(workdir, p.run.name, p.slice),
                                             PROJECT_ROOT), commands.xpk_wait(o, p.name),
                         commands.xpk_delete(o, p.name)):
                lines.append(shlex.join(argv))
        return lines
    wheel = f"scalax_lm-{__version__}-py3-none-any.whl"
    for slot, runs in enumerate(assign(placed, o.max_slices)):
        node, current = f"{prefix_of(workdir)}-{slot}", None
        lines.append(f"# slot {slot}: {', '.join(p.run.name for p in runs)}")
        for p in runs:
            if p.slice != current:
                if current is not None:
                    lines.append(shlex.join(commands.qr_delete(o, node)))
                lines.append(shlex.join(commands.qr_create(o, node, p.slice)))
                lines.append(shlex.join(commands.qr_describe(o, node)) + "  # until ACTIVE")
                if not o.setup:
                    lines.append(shlex.join(commands.scp(o, node, wheel, wheel)))
                lines.append(shlex.join(commands.ssh(o, node, o.setup or commands.default_setup(wheel))))
                current = p.slice
            lines.append(shlex.join(commands.ssh(o, node, commands.train_command(workdir, p.run.name, p.slice,
                                                                                 _pid_file(node)))))
        lines.append(shlex.join(commands.qr_delete(o, node)))
    return lines


def _pid_file(node: str) -> str:
    return f"/tmp/{node}.train.pid"


# ---------------------------------------------------------------------- the launch
def launch(cfg: ConfigDict, workdir: str, o: Options, dry_run: bool = False, force: bool = False,
           mfu: float | None = None, price: float | None = None, log=print) -> list[dict]:
    """Place, price, and (unless `dry_run`) train every unfinished run of the sweep, then fit and plot; returns
    the ledger's records of runs that did not finish."""
    runner.check_sweep_config(cfg)
    if cfg.sweep.kind == "wsd_branch":
        raise ConfigError("sweep.kind", "scalax launch does not place wsd_branch sweeps yet (a branch starts from "
                          "its trunk's checkpoint); allowed: isoflop, fixed_tokens, tokens_per_param, or run the "
                          "wsd_branch sweep with scalax sweep on one TPU VM")
    check_options(o, workdir, dry_run)
    placed = place(cfg, workdir, o, mfu, price, log)
    log(tpus.format_costs([p.cost for p in placed], o.max_slices, o.spot))
    if dry_run:
        log("launch: --dry-run; these commands would run (nothing was created):")
        for line in dry_run_commands(placed, workdir, o):
            log(line)
        return []
    ledger = runner.prepare_workdir(cfg, [p.run for p in placed], workdir, force, log)
    todo = [p for p in placed if ledger.records[p.run.name]["status"] != runner.FINISHED]
    for p in todo:
        runner.write_run_config(cfg, p.run, workdir)
        ledger.update(p.run.name, slice=p.slice.name, backend=o.backend, workload=p.name)
    log(f"launch: {len(placed)} runs, {len(placed) - len(todo)} already finished, {len(todo)} to train on "
        f"{o.backend} ({o.max_slices} slice(s) at a time); `scalax launch status --workdir={workdir}` shows them")
    driver = (TpuVm if o.backend == "tpu-vm" else Xpk)(o, workdir, ledger, log)
    driver.run(todo)
    runner.fit_and_plot(workdir, cfg, log)
    return runner.Ledger(workdir).unfinished()


class _Driver:
    """What both backends share: the ledger under a lock, external commands, the stop flag, the slots."""

    def __init__(self, o: Options, workdir: str, ledger: runner.Ledger, log):
        self.o, self.workdir, self.ledger, self.log = o, workdir, ledger, log
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def update(self, run_name: str, **fields) -> None:
        with self.lock:
            self.ledger.update(run_name, **fields)

    def call(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if check and proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise LaunchFailed(f"{shlex.join(argv[:6])} ... failed (exit {proc.returncode}): "
                               f"{lines[-1] if lines else ''}")
        return proc

    def watch(self, argv: list[str], run_name: str) -> int:
        """Run a long command (the training) with its output in the run's log; print the run's eval lines."""
        tail = runner.log_tail(self.workdir, run_name)
        with open(runner.log_path(self.workdir, run_name), "a") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        stopping_since = None
        while proc.poll() is None:
            time.sleep(0.2)
            for line in tail():
                self.log(f"[{run_name}] {line}")
            if self.stop.is_set():  # the run was asked to checkpoint and stop; give up on it after STOP_GRACE
                stopping_since = stopping_since or time.time()
                if time.time() - stopping_since > STOP_GRACE_SECONDS:
                    proc.terminate()
        for line in tail():
            self.log(f"[{run_name}] {line}")
        runner.upload_log(self.workdir, run_name)
        return proc.returncode

    def finished(self, run_name: str, seconds: float) -> bool:
        """Record a run whose command exited 0: finished, with its summary's numbers (from the bucket)."""
        record = runner.run_result(self.workdir, run_name, 0, seconds)
        self.update(run_name, **record)
        if record["status"] == runner.FINISHED:
            self.log(f"[{run_name}] finished, eval {record['eval_loss']:.4f} nats/token")
            return True
        self.log(f"[{run_name}] {record['status']}: {record.get('error')}")
        return False

    def run(self, todo: list[Placed]) -> None:
        """The slots in threads; the main thread waits, and on Ctrl-C (or SIGTERM) stops them and cleans up.
        It waits on events, not Thread.join: a KeyboardInterrupt inside join() can leave a live thread looking
        finished (a CPython quirk)."""
        slots = self.slots(todo)
        done = [threading.Event() for _ in slots]
        threads = [threading.Thread(target=self._guarded, args=(i, runs, event), daemon=True)
                   for (i, runs), event in zip(slots, done, strict=True)]
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            for t in threads:
                t.start()
            while not all(event.is_set() for event in done):
                time.sleep(0.2)
                if self.errors and not self.stop.is_set():  # a slot failed: the others checkpoint and stop
                    self.stop.set()
                    self.interrupt()
        except KeyboardInterrupt:
            self.log("launch: interrupted; asking the runs to checkpoint, then deleting the capacity")
            self.stop.set()
            self.interrupt()
            while not all(event.is_set() for event in done):
                time.sleep(0.2)
            self.after()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.after()
        if self.errors:
            raise self.errors[0]

    def _guarded(self, slot: int, runs: list[Placed], done: threading.Event) -> None:
        try:
            self.slot(slot, runs)
        except BaseException as e:  # reported by the main thread, after every slot cleaned up
            self.errors.append(e)
        finally:
            done.set()

    def wait(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def slots(self, todo: list[Placed]) -> list[tuple[int, list[Placed]]]:
        raise NotImplementedError

    def slot(self, slot: int, runs: list[Placed]) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        raise NotImplementedError

    def after(self) -> None:
        """Check that nothing of this sweep is left running (and billing)."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class TpuVm(_Driver):
    """Queued resources, one per slot, named PREFIX-SLOT."""

    def __init__(self, *args):
        super().__init__(*args)
        self.prefix = prefix_of(self.workdir)
        self.live: set[str] = set()  # resources this launch created and has not deleted
        self.wheel: str | None = None

    def slots(self, todo):
        if not self.o.setup:
            self.wheel = _build_wheel()
        return list(enumerate(assign(todo, self.o.max_slices)))

    def slot(self, slot: int, runs: list[Placed]) -> None:
        node, current = f"{self.prefix}-{slot}", None
        if self.state(node) != "GONE":  # left by an earlier launch of this sweep that was killed
            self.log(f"launch: {node}: left by an earlier launch; deleting it first")
            self.delete(node)
        try:
            for p in runs:
                if self.stop.is_set():
                    return
                current = self.train(node, p, current)
        finally:
            if node in self.live:
                self.delete(node)

    def create(self, node: str, p: Placed) -> None:
        """Create the slice and wait until it is ACTIVE (recreating it if it fails first), then set it up."""
        for attempt in range(self.o.retries + 2):
            if self.stop.is_set():
                return
            if attempt > self.o.retries:
                raise LaunchFailed(f"{node} ({p.slice.name}) failed before it was ready {attempt} times "
                                   f"(--retries={self.o.retries}); see `gcloud compute tpus queued-resources "
                                   f"describe {node}`")
            self.call(commands.qr_create(self.o, node, p.slice))
            self.live.add(node)
            self.log(f"launch: {node}: {p.slice.name} requested" + (" (spot)" if self.o.spot else ""))
            state, last = self.state(node), None
            while state != ACTIVE and state not in LOST and not self.stop.is_set():
                if state != last:
                    self.log(f"launch: {node}: {state}")
                    last = state
                self.wait(self.o.poll_seconds)
                state = self.state(node)
            if state == ACTIVE:
                self.log(f"launch: {node}: ACTIVE; setting up its workers")
                if self.wheel:
                    self.call(commands.scp(self.o, node, self.wheel, os.path.basename(self.wheel)))
                self.call(commands.ssh(self.o, node, self.o.setup or commands.default_setup(
                    os.path.basename(self.wheel or ""))))
                return
            if self.stop.is_set():
                return
            self.log(f"launch: {node}: {state} before it was ready; recreating it")
            self.delete(node)

    def state(self, node: str) -> str:
        proc = self.call(commands.qr_describe(self.o, node), check=False)
        return (proc.stdout.strip() or "UNKNOWN") if proc.returncode == 0 else "GONE"

    def delete(self, node: str) -> None:
        self.call(commands.qr_delete(self.o, node), check=False)
        self.live.discard(node)
        self.log(f"launch: {node}: deleted")

    def train(self, node: str, p: Placed, current: tpus.Slice | None) -> tpus.Slice | None:
        """Train one run on the slot's slice until it finishes, fails, or runs out of retries; returns the slice
        the slot holds afterwards."""
        name = p.run.name
        while not self.stop.is_set():
            if current != p.slice or node not in self.live:
                if node in self.live:
                    self.delete(node)
                self.create(node, p)
                current = p.slice if node in self.live else None
                if self.stop.is_set():
                    return current
            self.update(name, status=runner.RUNNING)
            self.log(f"[{name}] training on {node} ({p.slice.name})")
            started = time.time()
            rc = self.watch(commands.ssh(self.o, node, commands.train_command(self.workdir, name, p.slice,
                                                                              _pid_file(node))), name)
            if rc == 0:
                self.finished(name, time.time() - started)
                return current
            if self.stop.is_set():
                self.update(name, status=runner.PENDING, error="interrupted (checkpointed)")
                return current
            state = self.state(node)
            if state == ACTIVE and rc != 143:  # the run itself failed: a config, data or code error
                self.update(name, **runner.run_result(self.workdir, name, rc, time.time() - started))
                self.log(f"[{name}] failed: {self.ledger.records[name].get('error')}")
                return current
            preemptions = self.ledger.records[name].get("preemptions", 0) + 1
            self.update(name, preemptions=preemptions)
            if state != ACTIVE:  # the capacity is lost: delete it (the next attempt or run makes it anew)
                self.delete(node)
            if preemptions > self.o.retries:
                self.update(name, status=runner.FAILED, error=f"preempted {preemptions} times; --retries="
                            f"{self.o.retries} allows {self.o.retries} retries")
                self.log(f"[{name}] failed: preempted {preemptions} times (--retries={self.o.retries})")
                return current
            self.log(f"[{name}] {'preempted' if state != ACTIVE else 'stopped by SIGTERM'} ({node}: {state}); "
                     f"retry {preemptions} of {self.o.retries}: resuming from its checkpoint")
        return current

    def interrupt(self) -> None:
        for node in list(self.live):
            self.call(commands.ssh(self.o, node, commands.stop_command(_pid_file(node))), check=False)

    def after(self) -> None:
        listed = self.call(commands.qr_list(self.o), check=False).stdout.split()
        left = [name for name in listed if name.startswith(self.prefix + "-")]
        if left:
            raise LaunchFailed(f"queued resources still listed after the launch: {', '.join(left)}; delete them: "
                               + shlex.join(commands.qr_delete(self.o, left[0])))


class Xpk(_Driver):
    """One workload per run; `--max-slices` workloads in flight at once (Kueue queues them onto the cluster)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.live: set[str] = set()

    def slots(self, todo):
        order = sorted(todo, key=lambda p: (-p.slice.size, -p.cost.hours))
        return [(i, order[i:: self.o.max_slices]) for i in range(min(self.o.max_slices, len(order)))]

    def slot(self, slot: int, runs: list[Placed]) -> None:
        for p in runs:
            if self.stop.is_set():
                return
            name, started = p.run.name, time.time()
            command = commands.train_command(self.workdir, name, p.slice)
            if self.ledger.records[name].get("status") == runner.RUNNING:  # an earlier launch was killed
                self.call(commands.xpk_delete(self.o, p.name), check=False)
            self.call(commands.xpk_create(self.o, p.name, p.slice, command, PROJECT_ROOT))
            self.live.add(p.name)
            self.update(name, status=runner.RUNNING)
            self.log(f"[{name}] workload {p.name} created ({p.slice.name}, up to {self.o.retries} restarts)")
            try:
                rc = self.call(commands.xpk_wait(self.o, p.name), check=False).returncode
                if self.stop.is_set():
                    self.update(name, status=runner.PENDING, error="interrupted (checkpointed)")
                elif rc == 0:
                    self.finished(name, time.time() - started)
                else:
                    self.update(name, status=runner.FAILED, returncode=rc, error=f"workload {p.name} did not "
                                f"complete (xpk exit {rc}); its logs: kubectl logs jobset/{p.name}")
                    self.log(f"[{name}] failed: workload {p.name} did not complete")
            finally:
                self.call(commands.xpk_delete(self.o, p.name), check=False)
                self.live.discard(p.name)

    def interrupt(self) -> None:
        """Deleting a workload stops its pods with SIGTERM: each run saves a checkpoint in its grace period."""
        for name in list(self.live):
            self.call(commands.xpk_delete(self.o, name), check=False)

    def after(self) -> None:
        listed = self.call(commands.xpk_list(self.o), check=False).stdout
        left = sorted(set(re.findall(re.escape(prefix_of(self.workdir)) + r"-r\d+", listed)))
        if left:
            raise LaunchFailed(f"workloads still listed after the launch: {', '.join(left)}; delete them: "
                               + shlex.join(commands.xpk_delete(self.o, left[0])))


def _build_wheel() -> str:
    """This checkout as a wheel, for the workers' default setup (pip install on each)."""
    if not os.path.exists(os.path.join(PROJECT_ROOT, "pyproject.toml")):
        raise ConfigError("--setup", "scalax is not installed from a checkout, so there is no wheel to copy to the "
                          "workers; pass --setup='COMMAND' that installs scalax-lm on a TPU VM")
    out = tempfile.mkdtemp(prefix="scalax-wheel-")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, PROJECT_ROOT],
                          capture_output=True, text=True)
    wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        raise LaunchFailed(f"building the wheel of {PROJECT_ROOT} failed: {proc.stderr.strip()[-300:]}")
    return os.path.join(out, wheels[0])
