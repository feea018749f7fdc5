"""The README stays true: every command in it parses and loads its config, its key list is the config's, and its
Parallelism example trains as written."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from scalax import cli
from scalax import config as config_lib
from tests.conftest import REPO

README = open(os.path.join(REPO, "README.md")).read()


def readme_commands() -> list[list[str]]:
    """Every `scalax ...` command of the README's bash blocks, as argv (continuations joined, comments and
    [optional parts] dropped, the install prefix and environment assignments stripped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split(" #")[0]).strip()
            line = line.split("&& ")[-1]
            words = shlex.split(line)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # XLA_FLAGS=...
            if words and words[0].endswith("scalax"):
                commands.append(words[1:])
    return commands


def test_every_readme_command_parses_and_loads_its_config():
    commands = readme_commands()
    assert len(commands) >= 15 and {c[0] for c in commands} >= {"sweep", "train", "fit", "plot", "info", "plan",
                                                                 "convert", "generate"}
    parser = cli.build_parser()
    for argv in commands:
        args_only, overrides = cli._split_overrides(argv)
        args = parser.parse_args([cli._hyphenate(a) for a in args_only])  # an unknown flag exits here
        for spec in ([args.config] if isinstance(getattr(args, "config", None), str) else
                     getattr(args, "config", None) or []):  # (bench takes several)
            config_lib.load(spec, overrides)


def test_readme_lists_every_key_and_only_real_ones():
    cfg = config_lib.load("configs/llama.py")
    paragraph = README[README.index("The keys (`--config.KEY=VALUE`)"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    mentioned = set(re.findall(r"`((?:train|optim|data)\.[a-z_0-9]+)`", paragraph))
    actual = {f"{section}.{key}" for section in ("train", "optim", "data") for key in cfg[section]}
    assert mentioned == actual, (actual - mentioned, mentioned - actual)
    keys = set(re.findall(r"`((?:train|optim|data|model|mesh|sweep)\.[a-z_0-9]+)(?:[`=])", README))
    for key in keys - {"model.safetensors"}:  # (a file name, not a key)
        section, name = key.split(".")
        if section == "sweep":
            assert name in config_lib.load("configs/sweeps/quickstart.py").sweep, key
        else:
            assert name in cfg[section], key


@pytest.mark.slow
def test_readme_parallelism_example_trains_as_written(tmp_path):
    block = README[README.index("## Parallelism"):]
    block = block[block.index("```bash\n") + 8: block.index("```", block.index("```bash\n") + 8)]
    line = next(ln for ln in block.replace("\\\n", " ").splitlines() if "scalax train" in ln)
    words = shlex.split(line)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words[0] == "scalax"
    argv = [a for a in words[1:] if not a.startswith("--workdir=")]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def f(x):\n    return x + 1\n" * 400)
    proc = subprocess.run([sys.executable, "-m", "scalax", *argv, f"--workdir={tmp_path / 'run'}",
                           "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.eval_windows=8",
                           "--config.optim.warmup_steps=1",
                           "--config.train.seq_len=64", f"--config.data.corpus={corpus}",
                           f"--config.data.cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sizes = dict(re.findall(r"(data|fsdp|tensor)=(\d+)", line))
    assert f"mesh data {sizes['data']} x fsdp {sizes['fsdp']} x tensor {sizes['tensor']}" in proc.stdout
