"""Fake `gcloud`, `xpk` and `kubectl` for the launch tests: each records its argv and plays states, and what a TPU
VM or a workload would run really runs here, against the local GCS emulator.

    python fake_cloud.py gcloud|xpk|kubectl ARGS...     (tests put small wrappers of these names on PATH)

State lives in $FAKE_CLOUD (argv.jsonl, one JSON list per call; resources/*.json; workloads/*.json) and
$FAKE_CLOUD/scenario.json:
- "states": what `queued-resources describe` answers, one per call, the last repeated (default
  WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE).
- "preempt": how many training commands (in order of start) are preempted: once the run has logged a loss
  (its metrics.jsonl on the bucket), its process group gets SIGTERM (the run saves a checkpoint and exits 143),
  the queued resource turns PREEMPTED and `ssh` exits 255; under xpk the workload's command exits and xpk
  restarts it (--max-restarts) as JobSet would. "preempt_at_start": true preempts before the run logs anything.
The names of the runs preempted are appended to $FAKE_CLOUD/preempted.txt.
- "pause": the training command with this number (1: the first started, restarts counted) is stopped (SIGSTOP)
  once its run logged a loss, as a slow machine would hold it, until a signal reaches it (or 120 s), and its run's
  name is appended to $FAKE_CLOUD/paused.txt: a test can then interrupt a launch while a run is surely in
  progress.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time

STATE = os.environ.get("FAKE_CLOUD", "")
STOPPED: list[int] = []  # signals this process got while it ran a command
XPK_CREATE_FLAGS = {  # `xpk workload create --help` of xpk 1.16 (the flags scalax may pass)
    "--cluster", "--workload", "--tpu-type", "--num-slices", "--command", "--max-restarts", "--docker-image",
    "--base-docker-image", "--script-dir", "--project", "--zone", "--spot", "--priority", "--env"}


def path(*parts: str) -> str:
    return os.path.join(STATE, *parts)


def scenario() -> dict:
    try:
        with open(path("scenario.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def locked_json(name: str, update=None, default=None):
    """Read (and with `update`, rewrite) a JSON file under an exclusive lock; returns the (new) value."""
    full = path(name)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(full) as f:
                value = json.load(f)
        except FileNotFoundError:
            value = default
        if update is not None:
            value = update(value)
            if value is None:
                if os.path.exists(full):
                    os.remove(full)
            else:
                with open(full + ".tmp", "w") as f:
                    json.dump(value, f)
                os.replace(full + ".tmp", full)
        return value


def number_training() -> int:
    """This training command's number, in order of start (1, 2, ...)."""
    return locked_json("trainings.json", lambda n: (n or 0) + 1, 0)


def flags(argv: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    positional, named = [], {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            named[key] = value if eq else True
        else:
            positional.append(arg)
    return positional, named


def fail(message: str, code: int = 1) -> None:
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(code)


def run_name_of(command: str) -> str | None:
    for word in shlex.split(command):
        if word.startswith("--workdir="):
            return word.split("=", 1)[1]
    return None


def wait_for_loss(proc: subprocess.Popen, workdir: str) -> None:
    """Until the run has logged a loss (its metrics.jsonl on the bucket) or its command has exited."""
    sys.path.insert(0, os.environ["FAKE_CLOUD_REPO"])
    from scalax import io

    metrics = io.join(workdir, "metrics.jsonl")
    while proc.poll() is None:
        if io.exists(metrics) and '"loss"' in io.read_text(metrics, errors="replace"):
            return
        time.sleep(0.1)


def signal_pending(pid: int) -> bool:
    """Whether a signal waits for the (stopped) process: a `kill` from the launch's stop command."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [line.split()[1] for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    except OSError:
        return True
    return any(int(mask, 16) for mask in masks)


def run_command(command: str, cwd: str, is_training: bool, on_start=None) -> tuple[int, bool]:
    """Run a shell command as a TPU VM would; a training command may be preempted (SIGTERM to its process group)
    once its run logged a loss, or at once, or paused (the scenario says which). Returns (exit status,
    preempted)."""
    number = number_training() if is_training else 0
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, start_new_session=True)
    if on_start:
        on_start(proc.pid)

    def forward(signum, frame):  # the connection or the pod goes: the command gets the signal
        STOPPED.append(signum)
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    workdir, plan = run_name_of(command), scenario()
    if number and workdir and number <= plan.get("preempt", 0):
        if not plan.get("preempt_at_start"):
            wait_for_loss(proc, workdir)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with open(path("preempted.txt"), "a") as f:
                f.write(workdir.rstrip("/").rsplit("/", 1)[-1] + "\n")
            return proc.wait(), True
    if number and workdir and number == plan.get("pause"):
        wait_for_loss(proc, workdir)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGSTOP)
            with open(path("paused.txt"), "a") as f:
                f.write(workdir.rstrip("/").rsplit("/", 1)[-1] + "\n")
            deadline = time.time() + 120
            while not STOPPED and not signal_pending(proc.pid) and time.time() < deadline:
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGCONT)
    return proc.wait(), False


# ---------------------------------------------------------------------- gcloud
def gcloud(argv: list[str]) -> None:
    positional, named = flags(argv)
    if positional[:3] == ["compute", "tpus", "queued-resources"]:
        for key in ("--project", "--zone"):
            if not named.get(key):
                fail(f"(gcloud) {key} is required", 2)
        verb, name = positional[3], (positional[4] if len(positional) > 4 else None)
        if verb == "create":
            for key in ("--node-id", "--accelerator-type", "--runtime-version"):
                if not named.get(key):
                    fail(f"(gcloud.compute.tpus.queued-resources.create) argument {key}: required", 2)

            def create(value):
                if value is not None:
                    fail(f"queued resource {name} already exists")
                return {"name": name, "type": named["--accelerator-type"], "spot": "--spot" in named, "calls": 0,
                        "state": None}
            locked_json(f"resources/{name}.json", create)
        elif verb == "describe":
            def advance(value):
                if value is None:
                    fail(f"NOT_FOUND: queued resource {name}")
                if value["state"] not in ("PREEMPTED",):
                    states = scenario().get("states", ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
                    value["state"] = states[min(value["calls"], len(states) - 1)]
                    value["calls"] += 1
                return value
            print(locked_json(f"resources/{name}.json", advance)["state"])
        elif verb == "delete":
            value = locked_json(f"resources/{name}.json")
            if value is None:
                fail(f"NOT_FOUND: queued resource {name}")
            if value.get("pid"):  # the VM goes, and what ran on it
                try:
                    os.killpg(value["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            locked_json(f"resources/{name}.json", lambda v: None)
        elif verb == "list":
            for name in sorted(os.listdir(path("resources")) if os.path.isdir(path("resources")) else []):
                if name.endswith(".json"):
                    print(name[: -len(".json")])
        else:
            fail(f"unknown verb {verb}", 2)
    elif positional[:3] == ["compute", "tpus", "tpu-vm"]:
        verb = positional[3]
        if named.get("--worker") != "all":
            fail("the fake plays --worker=all only", 2)
        node = positional[4] if verb == "ssh" else positional[5].split(":", 1)[0]
        value = locked_json(f"resources/{node}.json")
        if value is None or value["state"] != "ACTIVE":
            fail(f"TPU {node} is not ready ({value and value['state']})", 255)
        home = path("home", node)
        os.makedirs(home, exist_ok=True)
        if verb == "scp":
            with open(positional[4], "rb") as src, open(os.path.join(home, os.path.basename(positional[4])),
                                                        "wb") as dst:
                dst.write(src.read())
            return
        command = named["--command"]
        is_training = "scalax train" in command and "exec" in command

        def record_pid(pid):
            locked_json(f"resources/{node}.json", lambda v: v and {**v, "pid": pid})
        rc, preempted = run_command(command, home, is_training, record_pid if is_training else None)
        if preempted:
            locked_json(f"resources/{node}.json", lambda v: v and {**v, "state": "PREEMPTED"})
            fail(f"Connection to {node} closed by remote host (preempted)", 255)
        sys.exit(rc)
    elif positional[:2] == ["config", "get-value"]:
        print("")
    else:
        fail(f"the fake gcloud does not play {' '.join(positional[:4])}", 2)


# ---------------------------------------------------------------------- xpk
def xpk(argv: list[str]) -> None:
    positional, named = flags(argv)
    if positional[:1] != ["workload"]:
        fail("the fake xpk plays `workload` only", 2)
    verb = positional[1]
    if not named.get("--cluster"):
        fail("xpk: error: the following arguments are required: --cluster", 2)
    if verb == "create":
        unknown = set(named) - XPK_CREATE_FLAGS
        if unknown:
            fail(f"xpk workload create: error: unrecognized arguments: {' '.join(sorted(unknown))}", 2)
        for key in ("--workload", "--command", "--tpu-type"):
            if not named.get(key):
                fail(f"xpk: error: the following arguments are required: {key}", 2)
        name = named["--workload"]

        def create(value):
            if value is not None:
                fail(f"Workload {name} already exists")
            return {"name": name, "status": "QUEUED", "restarts": 0, "command": named["--command"],
                    "max_restarts": int(named.get("--max-restarts", 0)), "tpu": named["--tpu-type"]}
        locked_json(f"workloads/{name}.json", create)
        daemon = subprocess.Popen([sys.executable, __file__, "xpk-daemon", name], start_new_session=True,
                                  stdout=open(path(f"workloads/{name}.log"), "a"), stderr=subprocess.STDOUT)
        locked_json(f"workloads/{name}.json", lambda v: {**v, "daemon": daemon.pid})
    elif verb == "list" and named.get("--wait-for-job-completion"):
        name = named["--wait-for-job-completion"]
        while True:
            value = locked_json(f"workloads/{name}.json")
            if value is None:
                fail(f"Workload named {name} does not exist.", 1)
            if value["status"] in ("COMPLETED", "FAILED"):
                sys.exit(0 if value["status"] == "COMPLETED" else 125)
            time.sleep(0.1)
    elif verb == "list":
        print("Jobset Name   Status")
        for name in sorted(os.listdir(path("workloads")) if os.path.isdir(path("workloads")) else []):
            if name.endswith(".json"):
                print(f"{name[:-5]}   {locked_json('workloads/' + name)['status']}")
    elif verb == "delete":
        name = named.get("--workload")
        value = locked_json(f"workloads/{name}.json")
        if value is None:
            fail(f"Workload {name} not found", 1)
        if value["status"] not in ("COMPLETED", "FAILED") and value.get("daemon"):
            os.kill(value["daemon"], signal.SIGTERM)  # the pods get SIGTERM and a grace period
            deadline = time.time() + 60
            while time.time() < deadline and locked_json(f"workloads/{name}.json")["status"] not in (
                    "COMPLETED", "FAILED"):
                time.sleep(0.1)
        locked_json(f"workloads/{name}.json", lambda v: None)
    else:
        fail(f"the fake xpk does not play workload {verb}", 2)


def xpk_daemon(name: str) -> None:
    """The workload: run its command; restart it on exit codes 42 and 127-255 up to --max-restarts (JobSet)."""
    value = locked_json(f"workloads/{name}.json")
    while True:
        locked_json(f"workloads/{name}.json", lambda v: v and {**v, "status": "RUNNING"})
        command = value["command"]
        rc, _ = run_command(command, os.environ.get("FAKE_CLOUD_REPO", "."), "scalax train" in command)
        restarts = locked_json(f"workloads/{name}.json")["restarts"]
        if rc == 0:
            status = "COMPLETED"
        elif not STOPPED and (rc == 42 or 127 <= rc <= 255 or rc < 0) and restarts < value["max_restarts"]:
            locked_json(f"workloads/{name}.json", lambda v: {**v, "restarts": v["restarts"] + 1})
            continue
        else:
            status = "FAILED"
        locked_json(f"workloads/{name}.json", lambda v, s=status, rc=rc: v and {**v, "status": s, "exit": rc})
        return


def main() -> None:
    tool, argv = sys.argv[1], sys.argv[2:]
    with open(path("argv.jsonl"), "a") as f:
        f.write(json.dumps([tool, *argv]) + "\n")
    if tool == "gcloud":
        gcloud(argv)
    elif tool == "xpk":
        xpk(argv)
    elif tool == "xpk-daemon":
        xpk_daemon(argv[0])
    elif tool == "kubectl":
        pass
    else:
        argparse.ArgumentParser().error(f"unknown tool {tool}")


if __name__ == "__main__":
    main()
