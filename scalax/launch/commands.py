"""Every external command `scalax launch` runs, as argv lists (never a shell string built from user values);
the one shell string each backend needs (the command a TPU VM or a container runs) is built with shlex.join.

tpu-vm: `gcloud compute tpus queued-resources create|describe|delete|list` and `gcloud compute tpus tpu-vm
ssh|scp --worker=all`. xpk (1.16): `xpk workload create|list|delete`; flags as `xpk workload create --help`
lists them.
"""

from __future__ import annotations

import dataclasses
import shlex

from scalax import io
from scalax.launch.tpus import Slice

BACKENDS = ("tpu-vm", "xpk")


@dataclasses.dataclass(frozen=True)
class Options:
    backend: str
    tpu: Slice  # the largest slice a run may get; each run gets the smallest that fits it
    project: str
    zone: str
    spot: bool = False
    retries: int = 3
    max_slices: int = 1
    runtime_version: str = ""  # tpu-vm: the TPU VM image (default: the generation's)
    setup: str = ""  # tpu-vm: run once on every worker of a new slice (default: install the wheel copied over)
    cluster: str = ""  # xpk: the GKE cluster
    image: str = ""  # xpk: --docker-image (scalax installed in it)
    base_image: str = "python:3.11"  # xpk: --base-docker-image (this checkout is added and installed)
    poll_seconds: float = 30.0


def _where(o: Options) -> list[str]:
    return [f"--project={o.project}", f"--zone={o.zone}"]


def train_command(workdir: str, run_name: str, slice_: Slice, pid_file: str | None = None) -> str:
    """The command every host of a slice runs: `scalax train` of the run's config on the bucket; multi-host slices
    join with jax.distributed (the TPU runtime tells each host its peers). With `pid_file`, the shell records
    its pid first (`exec` keeps it), so that an interrupted launch can ask the run to checkpoint and stop."""
    run_dir = io.join(workdir, "runs", run_name)
    argv = ["python3", "-m", "scalax", "train", f"--config={io.join(run_dir, 'run_config.json')}",
            f"--workdir={run_dir}"]
    if slice_.hosts > 1:
        argv.append("--distributed")
    command = shlex.join(argv)
    return f"echo $$ > {shlex.quote(pid_file)} && exec {command}" if pid_file else command


# ---------------------------------------------------------------------- tpu-vm: queued resources and ssh
def qr_create(o: Options, name: str, slice_: Slice) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "create", name, f"--node-id={name}", *_where(o),
            f"--accelerator-type={slice_.name}",
            f"--runtime-version={o.runtime_version or slice_.generation.runtime_version}",
            *(["--spot"] if o.spot else [])]


def qr_describe(o: Options, name: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", name, *_where(o),
            "--format=value(state.state)"]


def qr_delete(o: Options, name: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", name, *_where(o), "--force", "--quiet"]


def qr_list(o: Options) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "list", *_where(o), "--format=value(name.basename())"]


def ssh(o: Options, node: str, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(o), "--worker=all", f"--command={command}"]


def scp(o: Options, node: str, local: str, remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}", *_where(o), "--worker=all"]


def default_setup(wheel_name: str) -> str:
    """Installs JAX for TPU and the scalax wheel that `scp` copied to the worker's home."""
    return shlex.join(["python3", "-m", "pip", "install", "--quiet", "jax[tpu]", f"{wheel_name}[gcs]"])


def stop_command(pid_file: str) -> str:
    """SIGTERM to the run on every worker: it saves a checkpoint and exits (as on a preemption)."""
    return f"test -f {shlex.quote(pid_file)} && kill -TERM $(cat {shlex.quote(pid_file)}) || true"


# ---------------------------------------------------------------------- xpk: one workload per run
def xpk_create(o: Options, workload: str, slice_: Slice, command: str, project_root: str) -> list[str]:
    """One workload per run: the same command on every host; xpk restarts it up to --retries times on a
    failure whose exit code is 42 or 127-255 (a preempted `scalax train` exits 143), and Kueue queues it."""
    if o.image:
        image = [f"--docker-image={o.image}"]
    else:  # xpk adds --script-dir to the base image; the command installs it first
        image = [f"--base-docker-image={o.base_image}", f"--script-dir={project_root}"]
        command = f"python3 -m pip install --quiet '.[gcs]' 'jax[tpu]' && {command}"
    return ["xpk", "workload", "create", f"--cluster={o.cluster}", f"--workload={workload}",
            f"--tpu-type={slice_.name}", "--num-slices=1", f"--command={command}", f"--max-restarts={o.retries}",
            *image, *_where(o), *(["--spot"] if o.spot else [])]


def xpk_wait(o: Options, workload: str) -> list[str]:
    """Blocks until the workload finishes: exit 0 when it completed, 125 when it failed (xpk's codes)."""
    return ["xpk", "workload", "list", f"--cluster={o.cluster}", f"--wait-for-job-completion={workload}",
            *_where(o)]


def xpk_delete(o: Options, workload: str) -> list[str]:
    return ["xpk", "workload", "delete", f"--cluster={o.cluster}", f"--workload={workload}", *_where(o), "--force"]


def xpk_list(o: Options) -> list[str]:
    return ["xpk", "workload", "list", f"--cluster={o.cluster}", *_where(o)]
