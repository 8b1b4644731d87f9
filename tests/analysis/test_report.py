"""analysis/report.py: number formats and the text report of one model."""

import math

from minispatial.analysis.measure import analyze
from minispatial.analysis.report import ABLATION_METRICS, fmt, format_report, plus_minus


def test_number_formats():
    assert fmt(None) == fmt(math.nan) == fmt(math.inf) == "-"
    assert fmt(0.12345) == "0.123" and fmt(-0.5, "+.3f") == "-0.500" and fmt(1234.0, ".4g") == "1234"
    assert plus_minus({"mean": 0.8, "std": 0.14142}) == "0.800±0.141"
    assert plus_minus({"mean": 0.25, "std": 0.5}, "+.3f") == "+0.250±0.500"   # no sign on the std
    assert plus_minus({"mean": 0.9, "std": None}) == "0.900"                  # one run: the mean alone
    assert plus_minus({"mean": None, "std": None}) == "-"


def test_format_report_has_every_table(an_model):
    run, params, tb = an_model(vision_layers=2)
    res = analyze(params, run, ablations=["EP", "PP,VP"], heads=[1], n_images=16, testbed=tb)
    text = format_report({"checkpoint": "ckpt", "step": 3, **res})
    lines = text.splitlines()
    assert lines[0] == "checkpoint ckpt (step 3)"
    for want in ("sum check vision layer 1", "sum check text layer 0", "vision layer 0: CLS-row terms",
                 "vision layer 1: CLS-row terms", "head classes", "text: EOT attention", "alignment:",
                 "ablations (metrics"):
        assert any(ln.startswith(want) for ln in lines), want
    header = lines[lines.index(next(ln for ln in lines if ln.startswith("ablations (metrics"))) + 1].split()
    assert header[:3] == ["ablation", "towers", "heads"]
    assert header[3:] == [k.replace("val_", "").replace("_pair", "") for k in ABLATION_METRICS]
    rows = [ln.split() for ln in lines[-3:]]
    assert [r[0] for r in rows] == ["baseline", "-EP", "-PP-VP"] and rows[1][2] == "1"
