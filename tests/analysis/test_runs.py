"""analysis/runs.py: mean ± sample std over runs of hand-made reports, and refusals of runs that
do not match."""

import json
import math

import pytest

from minispatial.analysis.report import format_aggregate
from minispatial.analysis.runs import aggregate_reports


def fake_report(name, lr_acc, ep_slopes, ep_curve, classes, text_classes, n_heads=2):
    """A hand-made `analyze` report: one vision layer (terms EP, PP), one text layer, two ablations."""
    def term(slope, curve):
        return {"slope": slope, "right_left": 2 * slope, "std_ratio": abs(slope), "var_share": None,
                "curve": curve}
    heads = [{"head": h, "class": c, "terms": {"EP": term(s, ep_curve), "PP": term(0.0, [0.0, 0.0, 0.0])}}
             for h, (s, c) in enumerate(zip(ep_slopes, classes))]
    return {"checkpoint": name, "step": 20,
            "model": {"n_heads": n_heads, "vision_layers": 1, "text_layers": 1, "vision_ctx": 4},
            "ablations": [{"name": n, "terms": t, "value_pos": False, "towers": ["vision"], "heads": None,
                           "metrics": {"val_unseen_pair.lr_acc": v, "val_single.lr_acc": None}}
                          for n, t, v in (("baseline", [], lr_acc), ("-EP", ["EP"], 0.5))],
            "vision": [{"layer": 0, "terms": ["EP", "PP"], "heads": heads}],
            "text": [{"layer": 0, "heads": [{"head": h, "class": c} for h, c in enumerate(text_classes)]}]}


def test_aggregate_reports_means_and_sample_stds():
    a = fake_report("a", 0.9, [0.3, -0.1], [0.0, 1.0, 2.0], ["relational", "relational"], ["relational", "x"])
    b = fake_report("b", 0.7, [0.1, 0.5], [2.0, 3.0, 4.0], ["label-specific"] * 2, ["x", "relational"])
    agg = aggregate_reports([a, b])
    json.dumps(agg, allow_nan=False)
    r2 = math.sqrt(2)
    assert agg["n_runs"] == 2 and [r["checkpoint"] for r in agg["runs"]] == ["a", "b"]
    base, ep = (ab["metrics"]["val_unseen_pair.lr_acc"] for ab in agg["ablations"])
    assert [ab["name"] for ab in agg["ablations"]] == ["baseline", "-EP"]
    assert base["mean"] == pytest.approx(0.8) and base["std"] == pytest.approx(0.1 * r2)   # ddof=1
    assert base["n"] == 2 and base["values"] == [0.9, 0.7]
    assert ep == {"mean": 0.5, "std": 0.0, "n": 2, "values": [0.5, 0.5]}
    undefined = agg["ablations"][0]["metrics"]["val_single.lr_acc"]
    assert undefined["mean"] is None and undefined["std"] is None and undefined["n"] == 0
    v = agg["vision"][0]
    h0, h1 = (h["terms"]["EP"] for h in v["heads"])
    assert h0["slope"]["mean"] == pytest.approx(0.2) and h0["slope"]["std"] == pytest.approx(0.1 * r2)
    assert h1["right_left"]["mean"] == pytest.approx(0.4) and h1["right_left"]["std"] == pytest.approx(0.6 * r2)
    assert h0["var_share"]["n"] == 0
    assert h0["curve"]["mean"] == pytest.approx([1.0, 2.0, 3.0]) and h0["curve"]["std"] == pytest.approx([r2] * 3)
    # over heads within each run first (a: mean 0.1, max 0.3; b: mean 0.3, max 0.5), then over runs
    assert v["head_mean"]["EP"]["slope"]["mean"] == pytest.approx(0.2)
    assert v["head_max"]["EP"]["slope"]["mean"] == pytest.approx(0.4)
    assert v["head_max"]["EP"]["slope"]["std"] == pytest.approx(0.1 * r2)
    assert v["head_max"]["EP"]["std_ratio"]["values"] == pytest.approx([0.3, 0.5])
    assert v["n_relational"]["values"] == [2, 0] and v["n_relational"]["std"] == pytest.approx(r2)
    assert agg["text"][0]["n_relational"] == {"mean": 1.0, "std": 0.0, "n": 2, "values": [1, 1]}
    # one run: means, no std
    one = aggregate_reports([a])["ablations"][0]["metrics"]["val_unseen_pair.lr_acc"]
    assert one["mean"] == 0.9 and one["std"] is None
    text = format_aggregate(agg)
    assert "2 runs" in text and "0.800±0.141" in text and "+0.400±0.141" in text
    assert ["vision", "0", "1.00±1.41", "2", "0"] in [ln.split() for ln in text.splitlines()]


def test_aggregate_reports_refuses_runs_that_do_not_match():
    a = fake_report("a", 0.9, [0.3, -0.1], [0.0, 1.0, 2.0], ["relational"] * 2, ["x"] * 2)
    b = fake_report("b", 0.7, [0.1], [2.0, 3.0, 4.0], ["relational"], ["x"], n_heads=1)
    with pytest.raises(ValueError, match="model.n_heads is 2 in a, 1 in b"):
        aggregate_reports([a, b])
    c = fake_report("c", 0.7, [0.1, 0.5], [2.0, 3.0, 4.0], ["relational"] * 2, ["x"] * 2)
    c["ablations"] = c["ablations"][:1]
    with pytest.raises(ValueError, match="different ablations"):
        aggregate_reports([a, c])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_reports([])
