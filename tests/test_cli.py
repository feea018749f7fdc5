"""`scalax info` and config loading: counts from the module, overrides, one-line errors for bad configs."""

import json
import os
import subprocess
import sys

import pytest

from scalax import cli
from scalax import config as config_lib
from scalax.models import ModelConfig, flops, presets
from tests.conftest import REPO


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_json_for_405b(capsys):
    rc, out, _ = run_cli(capsys, "info", "--config=configs/llama.py:preset=llama3.1-405b", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["params_total"] == 405_853_388_800
    assert info["params_embedding"] + info["params_non_embedding"] == info["params_total"]
    cfg = ModelConfig.from_dict(presets.preset("llama3.1-405b"))
    assert info["flops_per_token"] == flops.all_flops_per_token(cfg, cfg.max_seq_len)
    assert set(info["flops_per_token"]) == set(flops.CONVENTIONS)


def test_info_text(capsys):
    rc, out, _ = run_cli(capsys, "info", "--config=configs/gpt.py:preset=gpt2-small")
    assert rc == 0
    assert "124,439,808" in out and "6n_head_attn" in out and "layernorm" in out


def test_arg_and_overrides(capsys):
    rc, out, _ = run_cli(capsys, "info", "--config=configs/llama.py:size=tiny,position=alibi",
                         "--config.model.n_kv_heads=1", "--config.model.rope_theta=5e5", "--config.train.seq_len=64",
                         "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["model"]["position"] == "alibi" and info["model"]["n_kv_heads"] == 1
    assert info["model"]["rope_theta"] == 500000.0 and info["seq_len"] == 64


def test_parametric_family_from_arg():
    cfg = config_lib.model_config(config_lib.load("configs/gpt.py:d_model=384,n_layers=6"))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (384, 6, 6, 1536)
    assert sorted(config_lib.load("configs/gpt.py").keys()) == ["data", "mesh", "model", "optim", "train"]


BAD = [
    # (arguments, the key the message must name, a word of what is allowed)
    (["--config=configs/gpt.py", "--config.model.n_heads=3"], "model.d_model", "n_heads"),
    (["--config=configs/llama.py", "--config.model.n_kv_heads=3"], "model.n_kv_heads", "divisor"),
    (["--config=configs/gpt.py:position=fourier"], "model.position", "alibi"),
    (["--config=configs/gpt.py", "--config.model.norm=batchnorm"], "model.norm", "rmsnorm"),
    (["--config=configs/gpt.py", "--config.model.mlp=tanh"], "model.mlp", "swiglu"),
    (["--config=configs/llama.py", "--config.model.head_dim=33"], "model.head_dim", "even"),
    (["--config=configs/gpt.py", "--config.train.seq_len=4096"], "train.seq_len", "at most 256"),
    (["--config=configs/gpt.py", "--config.model.n_layer=3"], "model.n_layer", "n_layers"),
    (["--config=configs/gpt.py", "--config.model.n_layers=two"], "model.n_layers", "integer"),
    (["--config=configs/gpt.py", "--config.model.scan_unroll=-1"], "model.scan_unroll", "positive integer"),
    (["--config=configs/gpt.py:preset=gpt5"], "preset", "gpt2-small"),
    (["--config=configs/gpt.py:size=huge"], "size", "tiny"),
    (["--config=configs/nope.py"], "--config", "no such config file"),
    (["--config=configs/gpt.py:d_model=100,n_layers=2"], "model.d_model", "multiple of 64"),
    (["--config=configs/llama.py", "--config.model.rope_scaling=xpos"], "model.rope_scaling", "yarn"),
    (["--config=configs/gpt.py", "--config.model.rope_scaling=linear"], "model.rope_scaling", "position='rope'"),
    (["--config=configs/llama.py", "--config.model.rope_scaling=yarn", "--config.model.rope_beta_fast=0.5"],
     "model.rope_beta_fast", "exceed rope_beta_slow"),
    (["--config=configs/llama.py", "--config.model.rope_scaling=ntk", "--config.model.rope_scaling_factor=0.5"],
     "model.rope_scaling_factor", ">= 1"),
]


@pytest.mark.parametrize("argv,key,allowed", BAD, ids=[b[1] + ":" + b[0][-1] for b in BAD])
def test_bad_config_one_line_error(capsys, argv, key, allowed):
    rc, out, err = run_cli(capsys, "info", *argv)
    assert rc == cli.EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert key in lines[0] and allowed in lines[0], lines[0]
    assert out == ""


def test_real_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "scalax", "info", "--config=configs/llama.py",
                           "--config.model.n_kv_heads=3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "scalax info: error: model.n_kv_heads: n_heads=2 is not divisible by n_kv_heads=3; "
        "allowed: a divisor of n_heads (n_heads for MHA, 1 for MQA)"]


def test_out_of_device_memory_is_one_line_with_what_fits(capsys, monkeypatch):
    # XLA's message as a GPU gave it (benchmarks/gpu_attention.py, einsum attention at batch 8 x 2048 on an H200)
    xla = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 154.24GiB with allocator GPU_0_bfc on device "
           "0. [executable_name='jit_train_step'] [tf-allocator-allocation-error='']\nCurrent allocation summary")

    def out_of_memory(args, overrides):
        import jax

        raise jax.errors.JaxRuntimeError(xla)

    monkeypatch.setattr(cli, "cmd_bench", out_of_memory)
    assert cli.main(["bench", "--config=configs/llama.py"]) == cli.EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalax bench: out of device memory: RESOURCE_EXHAUSTED: Out of "
                                                   "memory while trying to allocate 154.24GiB")
    assert "executable_name" not in lines[0] and "internal error" not in lines[0]
    for key in ("train.batch_size", "train.microbatches", "model.remat", "model.attention", "mesh.fsdp"):
        assert key in lines[0]


TRAIN_BAD = [
    # (overrides, the key the message must name, words of what is allowed)
    (["--config.data.corpus={tmp}/missing"], "data.corpus", "no such file or directory"),
    (["--config.data.corpus={tmp}/empty"], "data.corpus", "is empty"),
    (["--config.data.corpus={tmp}/short.txt"], "data.corpus", "one window needs train.seq_len + 1 = 257"),
    (["--config.optim.lr=0"], "optim.lr", "must be positive"),
    (["--config.optim.lr=-0.1"], "optim.lr", "must be positive"),
    (["--config.train.steps=0"], "train.steps", "positive integer"),
    (["--config.train.batch_size=-4"], "train.batch_size", "positive integer"),
    (["--config.optim.schedule=linear"], "optim.schedule", "cosine, wsd, constant"),
    (["--config.data.tokenizer=sentencepiece"], "data.tokenizer", "byte, bpe"),
    (["--config.train.microbatches=3"], "train.microbatches", "must divide train.batch_size=16"),
    (["--config.train.seq_len=512"], "train.seq_len", "at most 256"),
    # the mesh (8 fake devices here)
    (["--config.mesh.data=3"], "mesh", "product is the device count"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "mesh.fsdp", "at most one of them -1"),
    (["--config.mesh.data=1", "--config.mesh.tensor=8"], "model.n_heads", "divides both model.n_heads and model.d_ff"),
    (["--config.train.batch_size=12"], "train.batch_size", "multiple of 8"),
    (["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.microbatches=4"], "train.microbatches",
     "must divide over mesh.data x mesh.fsdp = 8"),
]


@pytest.mark.parametrize("overrides,key,allowed", TRAIN_BAD, ids=[b[1] + ":" + b[0][0] for b in TRAIN_BAD])
def test_train_user_errors_one_line(capsys, tmp_path, overrides, key, allowed):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("x = 1\n" * 10)
    argv = ["train", "--config=configs/gpt.py", f"--workdir={tmp_path}/run",
            f"--config.data.cache_dir={tmp_path}/cache"] + [o.format(tmp=tmp_path) for o in overrides]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == cli.EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert key in lines[0] and allowed in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


def test_fit_csv_json(capsys, tmp_path):
    from tests.scaling.test_fit import isoflop_grid

    runs = isoflop_grid(budgets=4, sizes=5, lo=1 / 4, hi=4)
    path = tmp_path / "runs.csv"
    path.write_text("params,tokens,loss\n" + "".join(
        f"{float(n)!r},{float(d)!r},{float(loss)!r}\n" for n, d, loss in zip(runs.params, runs.tokens, runs.loss,
                                                                              strict=True)))
    rc, out, _ = run_cli(capsys, "fit", "--csv", str(path), "--json", "--bootstrap", "10")
    assert rc == 0
    result = json.loads(out)
    assert {"approach1", "approach2", "approach3"} <= set(result)
    p = result["approach3"]
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "ci"} <= set(p)
    assert p["alpha"] == pytest.approx(0.348, rel=1e-3) and p["E"] == pytest.approx(1.82, rel=1e-3)


@pytest.mark.parametrize("argv,words", [
    (["fit", "--csv", "{tmp}/nope.csv"], "no such file"),
    (["fit", "--csv", "{tmp}/bad.csv"], "lacks the column(s) loss"),
    (["fit", "--csv", "{tmp}/text.csv"], "is not a number"),
    (["fit", "--csv", "{tmp}/negative.csv"], "must be a positive number"),
    (["fit"], "give a sweep directory or --csv FILE"),
    (["fit", "--csv", "{tmp}/bad.csv", "--flops=6nd"], "--flops: unknown FLOPs convention '6nd'; allowed: 6n,"),
    (["fit", "--csv", "{tmp}/bad.csv", "--approach", "4"], "lacks the column"),
    (["sweep", "--config=configs/sweeps/quickstart.py", "--workdir={tmp}/s", "--config.sweep.n_budgets=0"],
     "sweep.n_budgets"),
    (["sweep", "--config=configs/sweeps/quickstart.py", "--workdir={tmp}/s", "--config.sweep.budget_max=1e3",
      "--config.sweep.budget_min=1e3"], "too small for any llama model"),
    (["plot", "{tmp}"], "not a sweep directory"),
])
def test_fit_sweep_plot_user_errors_one_line(capsys, tmp_path, argv, words):
    (tmp_path / "bad.csv").write_text("params,tokens\n1,2\n")
    (tmp_path / "text.csv").write_text("params,tokens,loss\n1e6,2e7,low\n")
    (tmp_path / "negative.csv").write_text("params,tokens,loss\n1e6,2e7,-3\n")
    rc, _, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == cli.EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err


def test_parser_imports_no_scipy_nor_jax_and_offers_every_approach():
    """Every `scalax` command builds the whole parser: it must not import scipy (the fits' 0.3 s) nor JAX (1-1.5 s:
    `scalax sweep` starts its fork server first, to import while the runner plans), and `fit --approach` offers
    exactly what analysis.analyse accepts, `fit --flops` the FLOPs conventions."""
    code = ("import sys; from scalax import cli; p = cli.build_parser(); print('scipy' in sys.modules, 'jax' in "
            "sys.modules); fit = p._subparsers._group_actions[0].choices['fit']._actions; "
            "print([x for x in fit if x.dest == 'approach'][0].help); print([x for x in fit if x.dest == 'flops'][0]"
            ".help)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    imported, help_text, flops_help = out.stdout.strip().splitlines()
    assert imported == "False False"
    from scalax.models import flops
    from scalax.scaling import analysis, fit

    assert set(analysis.APPROACHES) == {*fit.APPROACHES, "data_constrained"}
    assert help_text.startswith("one of " + ", ".join(analysis.APPROACHES))
    assert flops_help.startswith(f"C of a sweep: {', '.join(flops.CONVENTIONS[:-1])} or {flops.CONVENTIONS[-1]} ")
