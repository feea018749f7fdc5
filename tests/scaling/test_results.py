"""fit.json's format: the typed results as JSON, written out by hand here."""

import json
import math

import pytest

from scalax.scaling import report
from scalax.scaling.results import (
    Approach3,
    FitResult,
    Interval,
    Intervals,
    Law,
    NoPrediction,
    Settings,
    jsonable,
)


def test_a_result_as_json_leaves_out_what_does_not_apply():
    law = Approach3(E=1.5, A=400.0, B=2000.0, alpha=0.5, beta=0.25, objective=math.inf,
                    ci=Intervals(0.8, {"alpha": Interval(low=0.4, high=0.6, se=0.05, n=10)}))
    result = FitResult(n_runs=12, settings=Settings(approach="3", bootstrap=10, seed=1), approach3=law,
                       prediction=NoPrediction(reason="no frontier", fitted_on_budgets=2), warnings=["w"])
    assert jsonable(result) == {
        "n_runs": 12,
        "settings": {"approach": "3", "bootstrap": 10, "level": 0.8, "seed": 1, "drop_highest": 0,
                     "resampled": "runs"},
        "conventions": {"params": "params", "flops": "flops", "loss": "loss", "grouping": "the flops column"},
        "approach3": {"E": 1.5, "A": 400.0, "B": 2000.0, "alpha": 0.5, "beta": 0.25, "a": 0.25 / 0.75,
                      "b": 0.5 / 0.75, "objective": None, "warnings": [], "ok": True,
                      "ci": {"level": 0.8, "alpha": {"low": 0.4, "high": 0.6, "se": 0.05, "n": 10}}},
        "prediction": {"reason": "no frontier", "fitted_on_budgets": 2},
        "warnings": ["w"],
    }
    json.dumps(jsonable(result), allow_nan=False)  # strict JSON: no Infinity
    text = report.summary(result)
    assert "prediction at the largest budget: not made: no frontier" in text
    assert "alpha 0.5 [0.4, 0.6]" in text


def test_a_law_without_a_frontier_says_so():
    flat_in_data = Law(E=1.0, A=10.0, B=0.0, alpha=0.3, beta=0.3)
    assert not flat_in_data.has_frontier()
    n_opt, d_opt = flat_in_data.frontier([1e18, 1e19])
    assert all(math.isnan(x) for x in [*n_opt, *d_opt])
    law = Law(E=1.0, A=10.0, B=20.0, alpha=0.3, beta=0.2)
    n_opt, d_opt = law.frontier(6e20)
    assert n_opt * d_opt == pytest.approx(1e20, rel=1e-12)  # C = 6 N D
    assert law.a + law.b == pytest.approx(1.0)
