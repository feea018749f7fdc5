"""`scalax bench`: the real train step timed; its numbers checked against each other and against what the
model holds."""

import json
import statistics

import pytest

from scalax import cli
from scalax import config as config_lib
from scalax.models import flops
from scalax.train.loop import MFU_CONVENTION

SMALL = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
         "--config.model.n_kv_heads=2", "--config.model.d_ff=64", "--config.model.max_seq_len=32",
         "--config.train.seq_len=32", "--config.train.batch_size=8"]


def test_bench_reports_consistent_numbers_for_each_config(capsys):
    specs = ["configs/llama.py:size=tiny", "configs/gpt.py:size=tiny"]
    rc = cli.main(["bench", *(f"--config={s}" for s in specs), *SMALL, "--steps=3", "--rounds=3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    results = json.loads(out)
    assert [r["name"] for r in results] == specs
    assert err.count("round ") == 3  # progress on stderr, the JSON alone on stdout
    for r in results:
        model = config_lib.model_config(config_lib.load(r["name"], SMALL))
        assert r["params"] == flops.params_total(model)
        assert len(r["tokens_per_s_rounds"]) == 3 and r["tokens_per_s"] == statistics.median(r["tokens_per_s_rounds"])
        assert r["flops_per_token"] == flops.flops_per_token(model, 32, MFU_CONVENTION)
        assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"])
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / (r["peak_flops_per_device"] * r["devices"]))
        assert 0 < r["mfu"] < 1 and r["compile_seconds"] > 0
        # the step holds at least the float32 parameters and both Adam moments, and the batch
        state_bytes = 3 * 4 * r["params"] / r["devices"]
        assert state_bytes < r["peak_bytes_per_device"] < 1000 * state_bytes


def test_bench_table_names_the_peak(capsys):
    assert cli.main(["bench", "--config=configs/llama.py:size=tiny", *SMALL, "--steps=1", "--rounds=1"]) == 0
    out = capsys.readouterr().out
    assert "| configs/llama.py:size=tiny |" in out and "MFU against" in out


@pytest.mark.parametrize("flag", ["--steps=0", "--rounds=-1"])
def test_bench_refuses_non_positive_counts_in_one_line(capsys, flag):
    rc = cli.main(["bench", "--config=configs/llama.py:size=tiny", flag])
    err = capsys.readouterr().err
    assert rc != 0 and flag.split("=")[0] in err and len(err.strip().splitlines()) == 1


def test_bench_times_the_steps_k_to_a_call_as_the_run_calls_them():
    from scalax.train.bench import Bench

    cfg = config_lib.load("configs/llama.py:size=tiny", [*SMALL, "--config.train.steps_per_call=4"])
    b = Bench("k4", cfg)
    assert b.steps_per_call == 4 and b.args[0].shape == (4, 8, 33)
    before = int(b.state.step)
    b.rates.append(b.time_steps(5))  # rounded up to two calls of 4
    assert int(b.state.step) - before == 8
    assert b.result()["steps_per_call"] == 4
