"""A user's mistakes, tried as a new user would: every one gets one line naming the key or file, a non-zero exit
and no traceback; nothing a user made is overwritten (md5 of the protected files unchanged); the CLI's
conveniences (--version, info --list, defaults in help, one flag style) hold."""

import glob
import hashlib
import json
import math
import os
import re
import sysconfig

import numpy as np
import pytest

from scalax import cli
from scalax import config as config_lib
from scalax.scaling import sweep as sweep_lib

TRAIN_ARGS = ["--config.train.steps=6", "--config.train.batch_size=8", "--config.train.seq_len=32",
              "--config.train.checkpoint_every=3", "--config.train.eval_every=3", "--config.train.log_every=1",
              "--config.train.eval_windows=8", "--config.optim.warmup_steps=1"]


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def md5s(root) -> dict[str, str]:
    """md5 of every file below root (the files a refusal must leave as they were)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.md5(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:20]:
        (root / os.path.basename(path)).write_bytes(open(path, "rb").read())
    return str(root), str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 6-step llama tiny run (checkpoints at 3 and 6) and its Hugging Face export."""
    root, cache = corpus
    base = tmp_path_factory.mktemp("trained")
    run = str(base / "run")
    assert cli.main(["train", "--config=configs/llama.py:size=tiny", f"--workdir={run}", *TRAIN_ARGS,
                     f"--config.data.corpus={root}", f"--config.data.cache_dir={cache}"]) == 0
    assert cli.main(["convert", f"--from={run}", f"--to-hf={base / 'hf'}"]) == 0
    return run, str(base / "hf")


# ---------------------------------------------------------------------- config files and overrides
def test_broken_config_files_are_one_line(capsys, tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(arg:\n    return 1\n")
    (tmp_path / "raises.py").write_text("def get_config(arg=None):\n    raise ValueError('boom ' + str(arg))\n")
    (tmp_path / "imports.py").write_text("import no_such_module_here\n")
    (tmp_path / "returns.py").write_text("def get_config(arg=None):\n    return 5\n")
    for name, words in (("syntax.py", "syntax.py:1: syntax error"), ("raises.py:x", "raised ValueError: boom x"),
                        ("imports.py", "raised ModuleNotFoundError"), ("returns.py", "returned a int")):
        rc, _, err = run_cli(capsys, "info", f"--config={tmp_path / name}")
        assert rc == cli.EXIT_USER_ERROR
        line = one_line(err)
        assert "--config" in line and words in line, line
    rc, _, err = run_cli(capsys, "info", f"--config={tmp_path / 'raises.py'}", "--verbose")
    assert rc == cli.EXIT_USER_ERROR and "Traceback" in err and "boom" in err  # --verbose: the whole story


@pytest.mark.parametrize("argv,key,words", [
    (["info", "--config=configs/llama.py", "--config.model=5"], "model", "is a section"),
    (["info", "--config=configs/llama.py", "--config.train=x"], "train", "steps"),
    (["info", "--config=configs/llama.py:size=tiny", "--config.train.seq_len=512"], "train.seq_len",
     "the model's context"),  # rope has no table, but the model declares a context of 256
    (["info"], "scalax info", "--list"),
    (["info", "--config=configs/llama.py", "--nope"], "--nope", "--help"),
    (["generate", "--checkpoint=x", "--prompt=a", "--max-tokens=two"], "--max-tokens", "invalid int"),
    (["sweep", "--config=configs/llama.py", "--workdir={tmp}/s"], "--config", "not a sweep config"),
    (["plot", "{tmp}/notasweep"], "sweep.json", "not a sweep config"),
    (["train", "--config=configs/sweeps/quickstart.py", "--workdir={tmp}/run"], "--config",
     "a sweep config (it has `sweep` and `base` sections: run it with `scalax sweep`)"),
    (["bench", "--config=configs/sweeps/quickstart.py"], "--config", "not a run config: a sweep config"),
    (["info", "--config=configs/sweeps/quickstart.py"], "--config", "not a run config: a sweep config"),
    (["info", "--config={tmp}/partial.json"], "--config", "it has no train, optim, data, mesh section"),
    (["plot", "{tmp}"], "scalax plot", "not a sweep directory"),
    (["prepare", "--config=configs/llama.py", "--workers=-2"], "--workers", "one per core"),
    (["train", "--config=configs/llama.py:size=tiny", "--workdir={tmp}/run", "--config.train.steps_per_call=-1"],
     "train.steps_per_call", "positive integer or 0"),
    (["train", "--config=configs/llama.py:size=tiny", "--workdir={tmp}/run", "--config.train.eval_batch_size=-1"],
     "train.eval_batch_size", "must be >= 0"),
    (["train", "--config=configs/llama.py:size=tiny", "--workdir={tmp}/run", "--config.train.eval_batch_size=3"],
     "train.eval_batch_size", "must divide over mesh.data x mesh.fsdp = 8"),
    (["prepare", "--config=configs/llama.py", "--config.data.shard_tokens=0", "--config.data.corpus={tmp}/one.txt",
      "--config.data.cache_dir={tmp}/cache"], "data.shard_tokens", "positive integer"),
])
def test_cli_mistakes_one_line(capsys, tmp_path, argv, key, words):
    (tmp_path / "one.txt").write_text("a document")
    (tmp_path / "partial.json").write_text(json.dumps({"model": config_lib.load("configs/llama.py").model.to_dict()}))
    (tmp_path / "notasweep").mkdir()
    (tmp_path / "notasweep" / "sweep.json").write_text(json.dumps(config_lib.load("configs/llama.py").to_dict()))
    rc, _, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == cli.EXIT_USER_ERROR
    line = one_line(err)
    assert key in line and words in line, line


# ---------------------------------------------------------------------- workdirs and corpora
def test_workdirs_that_cannot_hold_a_run(capsys, tmp_path, corpus):
    root, cache = corpus
    (tmp_path / "file").write_text("mine")
    if os.geteuid() == 0:  # root writes through permission bits: /sys is a read-only file system
        readonly = "/sys/scalax-cannot-write-here"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        readonly = str(tmp_path / "ro" / "run")
    for workdir, words in ((tmp_path / "file", "is a file"), (readonly, "cannot write to"),
                           ("s3://bucket/run", "unknown URL scheme s3://")):
        rc, _, err = run_cli(capsys, "train", "--config=configs/llama.py", f"--workdir={workdir}", *TRAIN_ARGS,
                             f"--config.data.corpus={root}", f"--config.data.cache_dir={cache}")
        assert rc == cli.EXIT_USER_ERROR
        line = one_line(err)
        assert "--workdir" in line and words in line, line
    assert (tmp_path / "file").read_text() == "mine"
    assert not os.path.exists("gs:")  # no local folder named after the URL


def test_corpora_that_are_not_text(capsys, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "random.dat").write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    np.arange(100_000, dtype=np.uint16).tofile(tmp_path / "train.bin")  # a nanoGPT token file
    (tmp_path / "mixed").mkdir()
    for i in range(3):
        (tmp_path / "mixed" / f"{i}.txt").write_text("print('hello')\n" * 2000)
    (tmp_path / "mixed" / "latin1.txt").write_bytes("café\n".encode("latin-1") * 20)  # a little: allowed
    # a token file is read as one only with its dtype stated (#13): without it, the line asks for data.token_dtype
    for corpus, key, words in ((tmp_path / "random.dat", "data.corpus", "is not text"),
                               (tmp_path / "train.bin", "data.token_dtype", "holds token ids")):
        rc, _, err = run_cli(capsys, "prepare", "--config=configs/llama.py", f"--config.data.corpus={corpus}",
                             f"--config.data.cache_dir={tmp_path / 'cache'}")
        assert rc == cli.EXIT_USER_ERROR
        line = one_line(err)
        assert key in line and str(corpus) in line and words in line, line
    rc, _, err = run_cli(capsys, "prepare", "--config=configs/llama.py", f"--config.data.corpus={tmp_path / 'mixed'}",
                         f"--config.data.cache_dir={tmp_path / 'cache'}")
    assert rc == 0, err


# ---------------------------------------------------------------------- resume, convert, generate
def test_resume_with_another_length_is_refused_unless_allowed(capsys, tmp_path, corpus):
    root, cache = corpus
    run = tmp_path / "run"
    common = ["train", "--config=configs/llama.py:size=tiny", f"--workdir={run}", *TRAIN_ARGS,
              f"--config.data.corpus={root}", f"--config.data.cache_dir={cache}"]
    assert run_cli(capsys, *common)[0] == 0
    before = md5s(run)
    for change, key in (("--config.train.steps=10", "train.steps"), ("--config.train.tokens=4096", "train.tokens"),
                        ("--config.optim.lr=0.01", "optim.lr"), ("--config.train.batch_size=16", "train.batch_size")):
        rc, _, err = run_cli(capsys, *common, change)
        assert rc == cli.EXIT_USER_ERROR
        line = one_line(err)
        assert key in line and str(run) in line, line
    assert md5s(run) == before
    rc, out, err = run_cli(capsys, *common, "--config.train.steps=10", "--allow-changes")
    assert rc == 0, err
    assert "schedule is that of a 10-step run" in out
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(lr) == list(range(1, 11))
    peak, final = 3e-3, 0.1  # configs' defaults; warmup 1: the cosine starts at the peak at update 0
    for step in range(7, 11):  # the new run's cosine over 10 steps, in closed form
        expected = peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (step - 1) / 9)))
        assert lr[step] == pytest.approx(expected, rel=1e-5), step


def test_convert_never_overwrites_without_force(capsys, tmp_path, trained):
    run, hf_dir = trained
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "afile").write_text("keep me too")
    protected = {p: md5s(p) for p in (run, str(tmp_path / "mine"))}
    cases = [(["--from", run, "--to-hf", tmp_path / "mine"], "--to-hf", "not empty"),
             (["--from", run, "--to-hf", run], "--to-hf", "a training workdir"),
             (["--from", run, "--to-hf", tmp_path / "afile"], "--to-hf", "is a file"),
             (["--from-hf", hf_dir, "--to", run], "--to", "a training workdir"),
             (["--from-hf", hf_dir, "--to", tmp_path / "mine"], "--to", "not empty"),
             (["--from-hf", hf_dir, "--to", tmp_path / "afile"], "--to", "is a file")]
    for argv, key, words in cases:
        rc, _, err = run_cli(capsys, "convert", *argv)
        assert rc == cli.EXIT_USER_ERROR
        line = one_line(err)
        assert key in line and words in line, line
    assert {p: md5s(p) for p in protected} == protected
    assert (tmp_path / "afile").read_text() == "keep me too"
    rc, _, err = run_cli(capsys, "convert", "--from", run, "--to-hf", tmp_path / "mine", "--force")
    assert rc == 0, err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"  # --force writes its files, deletes none
    assert os.path.isfile(tmp_path / "mine" / "model.safetensors")
    # a converted checkpoint's config.json is not the HF one it came from, and export files are group-readable
    assert os.stat(tmp_path / "mine" / "config.json").st_mode & 0o044 == 0o044
    assert os.stat(os.path.join(run, "config.json")).st_mode & 0o044 == 0o044


def test_broken_hf_directories(capsys, tmp_path):
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{not json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    for name, words in (("garbled", "is not valid JSON"), ("list", "not a JSON object"), ("short", "lacks the key")):
        rc, _, err = run_cli(capsys, "convert", "--from-hf", tmp_path / name, "--to", tmp_path / f"out-{name}")
        assert rc == cli.EXIT_USER_ERROR
        line = one_line(err)
        assert "config.json" in line and words in line, line


def test_generate_refuses_tokens_the_model_cannot_have(capsys, trained):
    run, _ = trained
    for argv, key, words in ((["--eos-id=260"], "--eos-id", "0 to 259"), (["--eos-id=-2"], "--eos-id", "0 to 259"),
                             (["--max-tokens=300"], "--max-tokens", "exceeds the model's context")):
        rc, _, err = run_cli(capsys, "generate", f"--checkpoint={run}", "--prompt=def ", *argv)
        assert rc == cli.EXIT_USER_ERROR
        line = one_line(err)
        assert key in line and words in line, line


def test_damaged_checkpoint_is_reported_in_one_line_and_the_one_before_used(capsys, tmp_path, trained):
    import shutil

    run, _ = trained
    damaged = str(tmp_path / "damaged")
    shutil.copytree(run, damaged)
    for path in glob.glob(os.path.join(damaged, "checkpoints", "6", "state", "**", "*"), recursive=True):
        if os.path.isfile(path) and "/d/" in path:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    before = md5s(damaged)
    rc, out, err = run_cli(capsys, "generate", f"--checkpoint={damaged}", "--prompt=def ", "--max-tokens=4",
                           "--json")
    assert rc == 0, err
    line = one_line(err)
    assert "checkpoint step 6" in line and "unreadable" in line and "the one before" in line
    from scalax.train import checkpoint

    _, _, where = checkpoint.load_params(damaged, warn=lambda m: None)
    assert where.endswith("step 3")  # what generate used
    rc, out, err = run_cli(capsys, "convert", f"--from={damaged}", f"--to-hf={tmp_path / 'hf'}")
    assert rc == 0 and "step 3" in out
    assert "checkpoint step 6" in one_line(err)
    assert md5s(damaged) == before  # reading never moves or changes a workdir


# ---------------------------------------------------------------------- fit
@pytest.mark.parametrize("argv,key,words", [
    (["--csv", "{tmp}/same.csv"], "runs", "same size"),
    (["--csv", "{tmp}/ok.csv", "--level", "1.5", "--bootstrap", "10"], "--level", "in (0, 1)"),
    (["--csv", "{tmp}/ok.csv", "--bootstrap", "-1"], "--bootstrap", ">= 0"),
    (["--csv", "{tmp}/ok.csv", "--params", "foo"], "--params", "invalid choice"),
    (["--csv", "{tmp}/ok.csv", "--drop-highest", "100"], "--drop-highest", "allowed: 0 to"),
    (["{tmp}/nodir"], "scalax fit", "no such directory"),
    (["{tmp}/badledger"], "runs.jsonl", ":1 is not a run record"),
])
def test_fit_mistakes_one_line(capsys, tmp_path, argv, key, words):
    from tests.scaling.test_fit import isoflop_grid

    runs = isoflop_grid(budgets=3, sizes=5, lo=1 / 4, hi=4)
    (tmp_path / "ok.csv").write_text("params,tokens,loss\n" + "".join(
        f"{float(n)!r},{float(d)!r},{float(loss)!r}\n" for n, d, loss in zip(runs.params, runs.tokens, runs.loss,
                                                                            strict=True)))
    (tmp_path / "same.csv").write_text("params,tokens,loss\n" + "".join(
        f"1e6,{float(d)!r},{float(loss)!r}\n" for d, loss in zip(runs.tokens, runs.loss, strict=True)))
    (tmp_path / "badledger").mkdir()
    (tmp_path / "badledger" / "runs.jsonl").write_text("{half a record\n")
    rc, _, err = run_cli(capsys, "fit", *[a.format(tmp=tmp_path) for a in argv])
    assert rc == cli.EXIT_USER_ERROR
    line = one_line(err)
    assert key in line and words in line, line


# ---------------------------------------------------------------------- sweeps
SMALL = ["--config.sweep.budget_min=2e10", "--config.sweep.budget_max=4e10", "--config.sweep.n_budgets=2",
         "--config.sweep.sizes_per_budget=3", "--config.base.train.seq_len=64", "--config.sweep.bootstrap=10"]


def test_a_sweep_folder_with_another_grid_is_refused(capsys, tmp_path):
    """The grid recorded, then asked for again with another one: refused, naming the key; nothing changed."""
    workdir = tmp_path / "sweep"
    cfg = config_lib.load("configs/sweeps/quickstart.py", SMALL)
    (workdir / "runs").mkdir(parents=True)
    (workdir / "sweep.json").write_text(json.dumps(cfg.to_dict()))
    (workdir / "runs.jsonl").write_text("".join(json.dumps({"name": r.name, **r.record(), "status": "finished",
                                                            "eval_loss": 3.0}) + "\n" for r in sweep_lib.plan(cfg)))
    before = md5s(workdir)
    rc, _, err = run_cli(capsys, "sweep", "--config=configs/sweeps/quickstart.py", f"--workdir={workdir}", *SMALL,
                         "--config.sweep.sizes_per_budget=4")
    assert rc == cli.EXIT_USER_ERROR
    line = one_line(err)
    assert "sweep.sizes_per_budget" in line and "3 -> 4" in line and "--force" in line, line
    assert md5s(workdir) == before


def test_a_sweep_whose_runs_fail_exits_non_zero_and_lists_them(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the runs' processes
    workdir = tmp_path / "sweep"
    rc, _, err = run_cli(capsys, "sweep", "--config=configs/sweeps/quickstart.py", f"--workdir={workdir}", *SMALL,
                         "--config.sweep.n_budgets=1", "--config.sweep.budget_max=2e10",
                         f"--config.base.data.corpus={tmp_path / 'missing'}")
    assert rc == cli.EXIT_FAILED
    ledger = [json.loads(line) for line in open(workdir / "runs.jsonl")]
    assert len(ledger) == 3 and all(r["status"] == "failed" for r in ledger)
    for r in ledger:
        assert re.search(rf"{re.escape(r['name'])} failed: .*data.corpus", err), err
    assert "3 of 3 runs did not finish" in err.strip().splitlines()[-1]


# ---------------------------------------------------------------------- conveniences
def test_version_list_help_and_flag_spelling(capsys):
    from scalax import __version__
    from scalax.models import presets

    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"scalax {__version__}"
    rc, out, _ = run_cli(capsys, "info", "--list")
    assert rc == 0 and all(name in out for name in [*presets.PRESETS, *presets.SIZES])
    assert cli.main(["generate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-tokens MAX_TOKENS new tokens per prompt at most (default: 64)" in help_text
    assert "--top-p TOP_P 1: no nucleus filter (default: 1.0)" in help_text
    parser = cli.build_parser()
    spelled = [cli._hyphenate(a) for a in ["generate", "--checkpoint=x", "--max_tokens=3", "--top_k", "2"]]
    args = parser.parse_args(spelled)
    assert (args.max_tokens, args.top_k) == (3, 2)
    flags = [opt for action in parser._subparsers._group_actions[0].choices.values() for a in action._actions
             for opt in a.option_strings]
    assert flags and not [f for f in flags if "_" in f]  # one style: hyphens
