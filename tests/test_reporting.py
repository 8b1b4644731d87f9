"""The reporting helpers every tool shares (minispatial/reporting.py): strict JSON, mean and
sample std over runs, plain-text tables, matplotlib."""

import json
import math
import random
import sys

import numpy as np
import pytest

from minispatial.reporting import clean_json, format_table, mean_std, pyplot

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------- clean_json

def test_clean_json_makes_strict_json_of_numpy_and_non_finite_values():
    obj = {"a": NAN, "b": -INF, "c": np.float32(1.5), "d": np.int64(3), "e": np.bool_(True),
           "f": (1, np.float64(NAN)), "g": np.arange(3), "h": {"i": [np.nan, "x", None, 2]},
           "j": np.array([[1.0, np.inf]], dtype=np.float32), "k": True, "l": 7}
    got = clean_json(obj)
    assert got == {"a": None, "b": None, "c": 1.5, "d": 3, "e": True, "f": [1, None], "g": [0, 1, 2],
                   "h": {"i": [None, "x", None, 2]}, "j": [[1.0, None]], "k": True, "l": 7}
    assert type(got["c"]) is float and type(got["d"]) is int and type(got["e"]) is bool
    json.dumps(got, allow_nan=False)                                  # strict: no NaN/Infinity
    assert obj["a"] is NAN and isinstance(obj["g"], np.ndarray)      # the input is not changed


def test_clean_json_of_a_summary_is_what_strict_json_wrote():
    # the trainer's summary (flat, Python floats, NaN for a metric undefined on an empty split)
    summary = {"step": 30, "train.lr_acc": 0.5, "val_unseen_pair.lr_acc_right": NAN, "backend": "numba",
               "logit_scale": 14.28}
    old = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    assert json.dumps(clean_json(summary), indent=2, sort_keys=True) == json.dumps(old, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------- mean_std

def test_mean_std_is_the_sample_std_over_the_defined_values():
    s = mean_std([0.5, 0.7, None, NAN, INF, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    one = mean_std([NAN, 2.0])
    assert (one["mean"], one["n"]) == (2.0, 1) and math.isnan(one["std"])      # below two: NaN
    none = mean_std([None, NAN])
    assert none["n"] == 0 and math.isnan(none["mean"]) and math.isnan(none["std"])
    empty = mean_std([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    assert mean_std([1, 2, True])["mean"] == pytest.approx(4 / 3)             # ints and bools count


def test_mean_std_of_vectors_per_entry_over_complete_runs():
    s = mean_std([[1.0, 2.0], [3.0, None], np.array([5.0, 6.0]), None])
    assert s["n"] == 2                                  # a run counts only when every entry is defined
    assert s["mean"] == [3.0, 4.0] and s["std"] == pytest.approx([2.0 * math.sqrt(2)] * 2)
    alone = mean_std([[1.0, 2.0], [NAN, 1.0]])
    assert alone["n"] == 1 and alone["mean"] == [1.0, 2.0] and all(math.isnan(x) for x in alone["std"])
    with pytest.raises(ValueError, match="different lengths"):
        mean_std([[1.0, 2.0], [1.0]])


def test_mean_std_arithmetic_is_the_sweeps_bit_for_bit():
    # summary.csv has always held: Python floats, sums left to right, sqrt(sum((x - m) ** 2) / (n - 1))
    rng = random.Random(0)
    for _ in range(2000):
        xs = [rng.random() * 10 ** rng.randint(-3, 3) for _ in range(rng.randint(2, 12))]
        m = sum(xs) / len(xs)
        want = (m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)))
        s = mean_std(xs)
        assert (s["mean"], s["std"]) == want
        v = mean_std([[x, 2 * x] for x in xs])
        assert v["mean"][0] == want[0] and v["std"][0] == want[1]


# ------------------------------------------------------------------------------- format_table

def test_format_table_default_right_aligned_with_a_rule():
    assert format_table(["a", "bb"], [["1", "22222"], [333, "4"]]) == \
        "  a     bb\n---  -----\n  1  22222\n333      4"
    assert format_table(["x", "y"], []) == "x  y\n-  -"


def test_format_table_alignment_widths_separator_and_no_rule():
    # metric names left, columns at least 7 wide (evaluate's table)
    assert format_table(["metric", "train"], [["n", "5"], ["i2t_acc", "0.500"]], align="lr", min_width=[0, 7]) == \
        "metric     train\n-------  -------\nn              5\ni2t_acc    0.500"
    # every column left, no rule, no trailing spaces (gradcheck's table: its last header is empty)
    assert format_table(["op", "err", ""], [["matmul", "1e-9", "PASS"]], align="l", rule=False) == \
        "op      err\nmatmul  1e-9  PASS"
    # fixed minimum widths, one space (the benchmark's table); a long cell widens its column
    assert format_table(["B", "ms"], [[64, "0.89"], [512, "12345.67"]], min_width=[5, 6], sep=" ", rule=False) == \
        "    B       ms\n   64     0.89\n  512 12345.67"
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        format_table(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="one entry per column"):
        format_table(["a", "b"], [], align="lrl")


# ------------------------------------------------------------------------------- pyplot

def test_pyplot_uses_agg_or_names_the_plot_extra(monkeypatch):
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        plt = pyplot()
        assert matplotlib.get_backend().lower() == "agg" and hasattr(plt, "subplots")
    monkeypatch.setitem(sys.modules, "matplotlib", None)                 # import fails
    with pytest.raises(ImportError, match=r"minispatial\[plot\]"):
        pyplot()
