"""A sweep's results: aggregation over seeds (minispatial/tools/sweep/results.py)."""

import math

import numpy as np
import pytest

from minispatial.tools.sweep import results


def test_aggregate_mean_and_sample_std_ignoring_nan_and_failures():
    rows = [
        {"run": "a0", "status": "ok", "error": "", "n_pair": "5", "seed": 0, "m": 0.5, "k": "x"},
        {"run": "a1", "status": "ok", "error": "", "n_pair": "5", "seed": 1, "m": 0.7, "k": "x"},
        {"run": "a2", "status": "ok", "error": "", "n_pair": "5", "seed": 2, "m": "nan", "k": "x"},
        {"run": "a3", "status": "failed", "error": "boom", "n_pair": "5", "seed": 3, "m": 9.0, "k": "x"},
        {"run": "b0", "status": "ok", "error": "", "n_pair": "10", "seed": 0, "m": "0.9", "k": "x"},
        {"run": "b1", "status": "failed", "error": "boom", "n_pair": "10", "seed": 1, "k": ""},
    ]
    agg = results.aggregate(rows, ["n_pair"])
    assert [g["n_pair"] for g in agg] == ["5", "10"]
    a, b = agg
    assert (a["n_runs"], a["n_ok"], b["n_runs"], b["n_ok"]) == (4, 3, 2, 1)
    assert a["m.mean"] == pytest.approx(0.6)
    assert a["m.std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert b["m.mean"] == pytest.approx(0.9) and math.isnan(b["m.std"])   # one value: no std
    assert "k.mean" not in a and "seed.mean" not in a                     # non-numeric, seed
    assert results.aggregate(rows, [], ["m"])[0]["m.mean"] == pytest.approx(0.7)
