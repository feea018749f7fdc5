"""A fork server for a sweep's runs: one process that has imported scalax's training code (jax, flax, optax,
orbax, grain, tensorboard: about 2 s of a CPU) and forks a child for each run, which then runs `scalax ARGV`
as `python -m scalax ARGV` would. A quickstart run of 20 s saves the 2 s of imports and the interpreter's start.

`scalax sweep` starts the server before it plans (`ForkServer.start`; else the first `start_child` does), so
that it imports on another core meanwhile; it then answers requests on its stdin, one JSON line each:
{"argv": [...], "log": PATH, "cpus": [...] | null, "env": {...}, "cwd": DIR} -> {"pid": PID}; when a child ends
it writes {"pid": PID, "returncode": CODE} (Popen's convention: -N for a child ended by signal N). Imports start
no backend: JAX starts its devices in each child, after the fork. A child gets SIGTERM when the server exits, and
the server when the runner exits (Linux), so a killed sweep's runs checkpoint and stop as before; the server
ignores Ctrl-C, which the runs handle themselves.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

from scalax.errors import ScalaxError

# What the server imports before it forks (by name: the server runs `python -m scalax` and imports nothing of it):
PRELOAD = ("scalax.cli", "scalax.train.loop", "scalax.train.metrics", "tensorboard.summary.writer.event_file_writer",
           "tensorboard.compat.proto.summary_pb2", "tqdm.auto")


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent exits."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_setup(cpus: set[int] | None = None):
    """A child's set-up: die with its parent and, given `cpus`, run only on them (XLA then sizes its thread pool by
    the CPUs it may use)."""

    def setup() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class ForkServer:
    """The runner's end: `start` starts the server (else the first `start_child`), `start_child` forks a run,
    `close` ends the server."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self.returncodes: dict[int, int] = {}
        self.dead = False
        self._forked = False

    def start(self) -> ForkServer:
        """Start the server (if it is not running yet): it imports while this process goes on."""
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, "-m", "scalax.scaling.forkserver"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, preexec_fn=_die_with_parent)
        return self

    def start_child(self, argv: list[str], log_path: str, cpus: set[int] | None = None) -> ForkedChild:
        """Fork `scalax ARGV` with stdout and stderr appended to `log_path`, pinned to `cpus` (None: not pinned),
        in this process's current environment and directory."""
        self.start()
        request = {"argv": argv, "log": log_path, "cpus": sorted(cpus) if cpus else None, "env": dict(os.environ),
                   "cwd": os.getcwd()}
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._pump(block=False)  # (says how it ended)
        while "returncode" in (reply := self._read_line(block=True)):  # (another child's end came first)
            self._record(reply)
        self._forked = True
        return ForkedChild(self, reply["pid"])

    def _read_line(self, block: bool) -> dict | None:
        """The server's next reply, or None when none has arrived (block=False)."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            if not block and not select.select([fd], [], [], 0)[0]:
                return None
            data = os.read(fd, 65536)
            if not data:
                self.dead = True
                raise ScalaxError(f"the sweep's fork server (pid {self._proc.pid}) ended with status "
                                  f"{self._proc.wait()}; its runs were sent SIGTERM and stop at a checkpoint: run "
                                  "the same sweep command again to resume them")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _record(self, reply: dict) -> None:
        self.returncodes[reply["pid"]] = reply["returncode"]

    def _pump(self, block: bool) -> None:
        """Read the replies that have arrived (block: wait for at least one)."""
        while (reply := self._read_line(block)) is not None:
            self._record(reply)
            block = False

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, less when the server has news (a child ended): the runner starts the next run
        the moment a slot frees instead of at its next poll."""
        if self._proc is None or self.dead:
            time.sleep(seconds)
        elif b"\n" not in self._buffer:  # (else the news is already read)
            select.select([self._proc.stdout.fileno()], [], [], seconds)

    def close(self) -> None:
        """End the server (its children get SIGTERM: call this once they have ended); one that never forked is
        killed (it may still be importing)."""
        if self._proc is not None:
            if not self._forked:
                self._proc.kill()
            try:
                self._proc.stdin.close()
            except BrokenPipeError:  # (it had ended)
                pass
            self._proc.wait()


class ForkedChild:
    """A forked run, with the part of subprocess.Popen's interface the runner uses."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid

    @property
    def returncode(self) -> int | None:
        return self.server.returncodes.get(self.pid)

    def poll(self) -> int | None:
        if self.returncode is None and not self.server.dead:
            self.server._pump(block=False)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self) -> int | None:
        """The exit status; with the server gone, the moment the (orphaned) child is gone, and None."""
        while self.returncode is None:
            if self.server.dead:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    return None
                time.sleep(0.1)
            else:
                self.server._pump(block=True)
        return self.returncode


# ---------------------------------------------------------------------------------------------- the server's side
def _run_child(request: dict) -> None:
    """In the forked child: become the run (pinned, logging to its file, with the runner's environment), run
    `scalax ARGV` and exit with its status; never returns. Threads are joined, the exit handlers run and the
    output is flushed as at any exit, but the interpreter is not torn down (`os._exit`): tearing down JAX's
    objects and the modules took 0.45 s of each run's end, and everything a run writes is closed and synced
    before its command returns."""
    code = 1
    try:
        child_setup(set(request["cpus"]) if request["cpus"] else None)()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["scalax", *request["argv"]]
        runpy.run_module("scalax", run_name="__main__", alter_sys=True)  # as `python -m scalax` (which exits)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    try:
        for thread in threading.enumerate():  # as the interpreter's exit does: wait for non-daemon threads
            if not thread.daemon and thread is not threading.current_thread():
                thread.join()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The server: preload, then fork a child per request line on stdin and report each child's end on stdout,
    until stdin closes."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in PRELOAD:
        importlib.import_module(module)
    out, buffer = sys.stdout.buffer, b""
    while True:
        if select.select([0], [], [], 0.05)[0]:
            data = os.read(0, 65536)
            if not data:
                return  # the runner closed its end, or died: exiting sends the children SIGTERM
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                out.flush()
                pid = os.fork()
                if pid == 0:
                    _run_child(json.loads(line))
                out.write(json.dumps({"pid": pid}).encode() + b"\n")
                out.flush()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            out.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            out.flush()


if __name__ == "__main__":
    serve()
