"""`scalax launch` before anything is created: TPU types, the cost estimate, placement, `--dry-run` (golden), and
the user's mistakes (one line, non-zero exit, nothing created)."""

import json
import os
import shlex
import sys

import pytest

from scalax import cli
from scalax.launch import launcher, tpus
from scalax.launch.commands import Options
from tests.test_user_errors import one_line, run_cli

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
SMALL = ["--config=configs/sweeps/quickstart.py", "--config.sweep.budget_min=1e10", "--config.sweep.budget_max=1e10",
         "--config.sweep.n_budgets=1", "--config.sweep.sizes_per_budget=3", "--config.base.train.seq_len=64"]
WHERE = ["--project=my-project", "--zone=us-west4-a"]


@pytest.mark.parametrize("name, chips, hosts", [
    # Google's published shapes: v4 and v5p count TensorCores (2 per chip, 4 chips per host); v5e and v6e count
    # chips, up to 8 on one host, 4 per host beyond.
    ("v4-8", 4, 1), ("v4-16", 8, 2), ("v4-128", 64, 16), ("v5p-8", 4, 1), ("v5p-32", 16, 4),
    ("v5litepod-1", 1, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v5litepod-256", 256, 64),
    ("v6e-4", 4, 1), ("v6e-8", 8, 1), ("v6e-64", 64, 16)])
def test_slice_shapes(name, chips, hosts):
    s = tpus.parse(name)
    assert (s.name, s.chips, s.hosts) == (name, chips, hosts)


def test_cost_equals_a_hand_computation():
    """chip-hours = FLOPs / (peak x MFU) / 3600, dollars = chip-hours x price, hours = chip-hours / chips: for
    each generation, on demand and spot, and with the MFU from the size table."""
    flops = 3.7e19
    for name, peak, price, spot_price in (("v4-16", 275e12, 3.22, 1.45), ("v5litepod-8", 197e12, 1.20, 0.48),
                                          ("v5p-32", 459e12, 4.20, 1.89), ("v6e-4", 918e12, 2.70, 1.08)):
        s = tpus.parse(name)
        for spot, usd in ((False, price), (True, spot_price)):
            c = tpus.run_cost("r", s, flops, params_non_embedding=5e8, spot=spot)
            hand = flops / (peak * 0.30) / 3600  # 5e8 non-embedding parameters: the table's 30%
            assert c.mfu == 0.30
            assert c.chip_hours == pytest.approx(hand, rel=1e-12)
            assert c.dollars == pytest.approx(hand * usd, rel=1e-12)
            assert c.hours == pytest.approx(hand / s.chips, rel=1e-12)
    c = tpus.run_cost("r", tpus.parse("v5p-8"), 1e18, 1e6, spot=False, mfu=0.5, price=2.0)
    assert c.dollars == pytest.approx(1e18 / (459e12 * 0.5) / 3600 * 2.0, rel=1e-12)
    assert [tpus.assumed_mfu(n) for n in (1e6, 5e7, 1e9, 7e10)] == [0.05, 0.15, 0.30, 0.45]
    # two slices at once: the longest chain of runs dealt to the less loaded slot
    assert tpus.makespan([5.0, 4.0, 3.0, 2.0], 2) == 7.0 and tpus.makespan([1.0, 1.0], 1) == 2.0


def test_assignment_keeps_slice_types_together_and_balances_hours():
    big, small = tpus.parse("v5litepod-8"), tpus.parse("v5litepod-1")

    def placed(name, slice_, hours):
        return launcher.Placed(None, slice_, tpus.RunCost(name, slice_.name, slice_.chips, 0, 0, 0, 0, hours), name)

    runs = [placed("a", small, 1.0), placed("b", big, 2.0), placed("c", small, 3.0), placed("d", big, 1.0)]
    slots = launcher.assign(runs, 2)
    # by hand: b (big, 2 h) -> 0; d (big, 1 h) -> 1; c (small, 3 h) -> 1 (1 h < 2 h); a (small, 1 h) -> 0 (2 h < 4 h)
    assert [[p.name for p in slot] for slot in slots] == [["b", "a"], ["d", "c"]]
    assert [[p.name for p in slot] for slot in launcher.assign(runs, 1)] == [["b", "d", "c", "a"]]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu-vm", "xpk"])
def test_dry_run_of_the_quickstart_is_golden(backend, capsys, monkeypatch):
    """The exact cost table and commands, shell-quoted; nothing is run (no gcloud or xpk on PATH at all).
    SCALAX_UPDATE_GOLDEN=1 rewrites the files after a deliberate change."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    extra = ["--cluster=research-v5e", "--image=us-docker.pkg.dev/p/scalax:1"] if backend == "xpk" else []
    rc, out, err = run_cli(capsys, "launch", "--config=configs/sweeps/quickstart.py", f"--backend={backend}",
                           "--workdir=gs://scalax-sweeps/quickstart", "--tpu=v5litepod-8", *WHERE, "--spot",
                           "--dry-run", *extra)
    assert rc == 0, err
    golden = os.path.join(GOLDEN, f"quickstart-{backend}.txt")
    if os.environ.get("SCALAX_UPDATE_GOLDEN"):
        os.makedirs(GOLDEN, exist_ok=True)
        with open(golden, "w") as f:
            f.write(out)
    with open(golden) as f:
        assert out == f.read()
    commands = [line for line in out.splitlines() if line.startswith(("gcloud ", "xpk "))]
    assert len(commands) >= 15  # every run's training command at least
    for line in commands:  # each line is a valid shell command whose words are the argv
        argv = shlex.split(line.split("  #")[0])
        assert argv[0] in ("gcloud", "xpk") and f"--zone={WHERE[1].split('=')[1]}" in argv
    trains = [line for line in commands if "scalax train" in line]
    assert len(trains) == 15 and all("--spot" not in t or backend == "xpk" for t in trains)


def test_user_mistakes_are_one_line_and_create_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud, xpk or kubectl
    common = ["launch", *SMALL, "--workdir=gs://some-bucket/sweep"]
    cases = [
        (["--tpu=v5x-8", *WHERE], "--tpu", "v5litepod"),
        (["--tpu=v5litepod-3", *WHERE], "--tpu", "sizes 1, 4, 8"),
        (["--zone=us-west4-a"], "--project", "CLOUDSDK_CORE_PROJECT"),
        (["--project=p"], "--zone", "CLOUDSDK_COMPUTE_ZONE"),
        ([*WHERE, "--backend=slurm"], "--backend", "tpu-vm, xpk"),
        ([*WHERE], "--backend", "https://cloud.google.com/sdk"),  # gcloud not installed
        ([*WHERE, "--backend=xpk"], "--cluster", "xpk cluster create"),
        ([*WHERE, "--backend=xpk", "--cluster=c"], "--backend", "pip install xpk"),
        ([*WHERE, "--retries=-1"], "--retries", "non-negative"),
        ([*WHERE, "--max-slices=0"], "--max-slices", "positive"),
        ([*WHERE, "--poll-seconds=0"], "--poll-seconds", "positive number of seconds"),
    ]
    for flags, key, hint in cases:
        rc, _, err = run_cli(capsys, *common, *flags)
        line = one_line(err)
        assert rc == cli.EXIT_USER_ERROR and key in line and hint in line, line
    (tmp_path / "xpk").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "xpk").chmod(0o755)
    rc, _, err = run_cli(capsys, *common, *WHERE, "--backend=xpk", "--cluster=c")
    assert rc == cli.EXIT_USER_ERROR and "kubectl" in one_line(err) and "gcloud components install" in err
    rc, _, err = run_cli(capsys, "launch", *SMALL, f"--workdir={tmp_path / 'sweep'}", *WHERE, "--dry-run")
    assert rc == cli.EXIT_USER_ERROR and "--workdir" in one_line(err) and "gs://" in err
    assert not (tmp_path / "sweep").exists()


def test_a_bucket_that_cannot_be_written_is_refused_before_any_capacity(capsys, monkeypatch, tmp_path, gcs_emulator):
    from tests.launch.test_launch_e2e import fake_cloud_env

    env, state = fake_cloud_env(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_CLOUD", env["FAKE_CLOUD"])
    rc, _, err = run_cli(capsys, "launch", *SMALL, "--workdir=gs://no-such-bucket-here/sweep", *WHERE)
    line = one_line(err)
    assert rc == cli.EXIT_USER_ERROR and "--workdir" in line and "does not exist" in line, line
    assert not os.path.exists(state / "argv.jsonl")  # not one cloud command ran


def test_a_run_that_fits_no_slice_is_named(capsys):
    """v5p-8 has 4 chips, and the runs' batch of 9 sequences does not divide among them: the refusal names the
    first run and says why, before anything is created."""
    rc, _, err = run_cli(capsys, "launch", *SMALL, "--workdir=gs://b/sweep", *WHERE, "--tpu=v5p-8", "--dry-run")
    line = one_line(err)
    assert rc == cli.EXIT_USER_ERROR and "--tpu" in line and "C1.00e+10-d" in line and "divisible" in line, line


def test_launch_status_of_a_directory_without_a_sweep(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "launch", "status", f"--workdir={tmp_path}")
    assert rc == cli.EXIT_USER_ERROR and "runs.jsonl" in one_line(err)


def test_options_reach_the_commands_as_one_argument_each():
    """Values with spaces and quotes stay one argv element; the remote command is shell-quoted."""
    from scalax.launch import commands

    o = Options("tpu-vm", tpus.parse("v5litepod-16"), "my project", "zone 'a'", spot=True,
                setup="pip install 'x y' && echo \"done\"")
    argv = commands.ssh(o, "node", o.setup)
    assert argv[-1] == "--command=pip install 'x y' && echo \"done\"" and "--project=my project" in argv
    command = commands.train_command("gs://b/a dir/it's", "run 1", tpus.parse("v5litepod-16"))
    words = shlex.split(command)
    assert words[:4] == ["python3", "-m", "scalax", "train"] and words[5] == "--workdir=gs://b/a dir/it's/runs/run 1"
    assert words[-1] == "--distributed"  # 4 hosts
    assert "--distributed" not in commands.train_command("gs://b/x", "r", tpus.parse("v5litepod-8"))
    assert json.dumps(commands.qr_create(o, "n", tpus.parse("v5litepod-16"))).count("--spot") == 1
