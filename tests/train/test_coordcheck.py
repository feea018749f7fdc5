"""`scalax coordcheck`: the same check tells muP from sp (Yang et al. 2022's coordinate check, at small widths)."""

import json

import pytest

from scalax import cli
from scalax import config as config_lib
from scalax.train import coordcheck

WIDTHS = "128,256,512,1024"  # the acceptance's widths, one seed
SHRINK = ["--config.model.n_layers=1", "--config.model.n_heads=4", "--config.model.dtype=float32",
          "--config.train.batch_size=8", "--config.train.seq_len=64", "--config.optim.lr=1e-2"]


def test_mup_activations_stay_flat_and_sp_logits_grow(capsys, tmp_path):
    out = tmp_path / "check"
    rc = cli.main(["coordcheck", "--config=configs/gpt.py:size=tiny", "--config.model.parameterization=mup",
                   "--config.model.mup_base_width=32", *SHRINK, f"--widths={WIDTHS}", "--seeds=1", "--steps=4",
                   f"--out={out}", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0 and json.loads((out / "coordcheck.json").read_text()) == printed
    assert (out / "coordcheck.png").read_bytes()[:4] == b"\x89PNG"
    mup = printed["activations"]
    assert {"embed", "layer_0/attn/q", "layer_0/mlp/wo", "final_norm", "logits"} <= set(mup)
    assert "layer_0/attn" not in mup and "layer_0/mlp" not in mup  # the same arrays as attn/o and mlp/wo
    assert "layer_0" in mup  # a block's output is its own (the residual sum), kept
    for name, a in mup.items():
        assert abs(a["slope"]) < 0.1, (name, a)
        assert a["slope"] == pytest.approx(coordcheck.slope(printed["widths"], a["mean_abs"]))

    sp = coordcheck.coordcheck(config_lib.load("configs/gpt.py:size=tiny", SHRINK), [128, 256], seeds=1,
                               steps=4, log=lambda msg: None)
    assert sp["parameterization"] == "sp" and sp["activations"]["logits"]["slope"] > 0.3

    # a second run into the same directory is refused without --force
    assert cli.main(["coordcheck", "--config=configs/gpt.py:size=tiny", f"--out={out}"]) == cli.EXIT_USER_ERROR
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [(["--widths=128,x"], "--widths"), (["--widths=128"], "at least two"),
                                        (["--widths=100,200"], "not a multiple of head_dim"),
                                        (["--seeds=0"], "--seeds")])
def test_user_errors_one_line(capsys, argv, words):
    assert cli.main(["coordcheck", "--config=configs/gpt.py:size=tiny", *argv]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
