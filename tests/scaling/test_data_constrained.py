"""The data-constrained law (Muennighoff et al. 2023): its closed forms against the paper's numbers, the fit's
recovery of known parameters from noise-free data, and the CLI's `fit --approach data_constrained`."""

import json

import numpy as np
import pytest

from scalax import cli
from scalax.scaling import analysis, data_constrained
from scalax.scaling import fit as fit_lib
from scalax.scaling.results import DataConstrainedLaw

# Muennighoff et al. 2023's fitted law (its Section 3 and code): E + A/N'^alpha + B/D'^beta.
PAPER = {"E": 1.87, "A": 521.0, "B": 1488.0, "alpha": 0.353, "beta": 0.353, "R_D_star": 15.4, "R_N_star": 5.3}
PAPER_UN_PER_UD = 0.051  # the paper's U_N = min(0.051 U_D, N): its law's compute-optimal N per unique token


def paper_loss(n, d, split, ratio):
    """The published formula, written out in float64 numpy, with U_N = ratio * U_D."""
    u = np.minimum(split, d)
    un = np.minimum(ratio * u, n)
    rd, rn = np.maximum(d / u - 1, 0), np.maximum(n / un - 1, 0)
    d_eff = u + u * PAPER["R_D_star"] * (1 - np.exp(-rd / PAPER["R_D_star"]))
    n_eff = un + un * PAPER["R_N_star"] * (1 - np.exp(-rn / PAPER["R_N_star"]))
    return PAPER["E"] + PAPER["A"] / n_eff ** PAPER["alpha"] + PAPER["B"] / d_eff ** PAPER["beta"]


def frontier_ratio() -> float:
    """N_opt / D_opt of the paper's law on Hoffmann et al.'s frontier: G² with G = (alpha A / (beta B))^(1/(alpha +
    beta)) (a constant because alpha = beta)."""
    return (PAPER["alpha"] * PAPER["A"] / (PAPER["beta"] * PAPER["B"])) ** (2 / (PAPER["alpha"] + PAPER["beta"]))


def paper_law() -> DataConstrainedLaw:
    return DataConstrainedLaw(**PAPER, objective=0.0, single_epoch_runs=0, repeated_runs=0)


def grid() -> fit_lib.Runs:
    """64 one-epoch runs (8 sizes x 8 token counts, plenty of unique data) and 108 that repeat: 3 unique-data
    sizes x 6 model sizes (many above U_N) x 2 to 64 epochs; losses from the published formula."""
    rows = [(n, d, 1e3 * d) for n in np.geomspace(1e7, 3e9, 8) for d in np.geomspace(1e9, 3e11, 8)]
    rows += [(n, u * epochs, u) for u in (1e8, 1e9, 1e10) for n in np.geomspace(1e7, 3e9, 6)
             for epochs in (2, 4, 8, 16, 32, 64)]
    n, d, split = (np.asarray(x) for x in zip(*rows, strict=True))
    return fit_lib.Runs.of(n, d, paper_loss(n, d, split, frontier_ratio()), unique_tokens=split)


def test_unique_params_and_loss_match_the_papers_constant():
    law = paper_law()
    u = np.geomspace(1e8, 1e12, 5)
    assert np.allclose(law.unique_params(u) / u, PAPER_UN_PER_UD, rtol=5e-3)  # 0.0512 rounds to the paper's 0.051
    n, d = np.geomspace(1e7, 1e10, 7)[:, None], np.geomspace(1e9, 1e12, 7)[None, :]
    split = np.full_like(n * d, 3e9)
    assert np.allclose(law.loss_repeated(n, d, split), paper_loss(n, d, split, PAPER_UN_PER_UD), rtol=1e-3)
    # one epoch of plenty of data and a small model: Hoffmann et al.'s law itself, exactly
    assert law.loss_repeated(1e7, 1e10, 1e12) == pytest.approx(law.loss(1e7, 1e10), rel=1e-15)
    # repeated data: worth less than fresh, and at most U (1 + R_D*) in the limit of many epochs
    assert law.effective_tokens(4e9, 1e9) == pytest.approx(1e9 * (1 + 15.4 * (1 - np.exp(-3 / 15.4))), rel=1e-12)
    assert law.effective_tokens(1e9 * 1e4, 1e9) == pytest.approx(1e9 * 16.4, rel=1e-9)


def test_fit_recovers_the_published_parameters_from_noise_free_data():
    law = data_constrained.fit_data_constrained(grid())
    for key, value in PAPER.items():
        assert getattr(law, key) == pytest.approx(value, rel=1e-3), key
    assert (law.single_epoch_runs, law.repeated_runs) == (64, 108)


def test_undetermined_decays_are_reported_not_invented():
    runs = grid()
    once = runs.take(np.flatnonzero(runs.tokens <= runs.unique_tokens))  # no run repeats its data
    result = analysis.analyse(once, "data_constrained")
    law = result.data_constrained
    assert law.R_D_star is None and not law.ok
    assert any("R_D*" in w and "not determined" in w for w in law.warnings)
    assert law.alpha == pytest.approx(PAPER["alpha"], rel=1e-3)
    # approach 3 on runs that repeat: flagged, pointing at this fit
    some = runs.take(np.arange(0, len(runs), 4))
    assert any("--approach data_constrained" in w for w in analysis.analyse(some, "3").approach3.warnings)


def test_cli_fits_a_csv_with_unique_tokens_and_refuses_one_without(capsys, tmp_path):
    runs = grid()
    path = tmp_path / "runs.csv"
    analysis.write_csv(str(path), runs, [f"r{i}" for i in range(len(runs))])
    rc = cli.main(["fit", "--csv", str(path), "--approach", "data_constrained", "--json", "--bootstrap", "3"])
    out, _ = capsys.readouterr()
    assert rc == 0
    law = json.loads(out)["data_constrained"]
    assert law["R_D_star"] == pytest.approx(PAPER["R_D_star"], rel=1e-3)
    for key, value in PAPER.items():  # noise-free: every resample refits the same law
        ci = law["ci"][key]
        assert ci["n"] == 3 and ci["low"] == pytest.approx(value, rel=1e-3) and ci["high"] == pytest.approx(
            value, rel=1e-3), key

    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join(",".join(line.split(",")[:5]) for line in path.read_text().splitlines()))
    assert cli.main(["fit", "--csv", str(bare), "--approach", "data_constrained"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unique_tokens" in err[0], err
