"""A sweep's figures (minispatial/tools/sweep/figures.py)."""

import sys

import pytest

from minispatial.tools.sweep import figures


def test_plot_figures_from_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"status": "ok", "n_pair": str(p), "n_layout": str(l), "seed": s,
             "val_unseen_pair.lr_acc": 0.5 + 0.02 * p + 0.01 * s, "val_single.i2t_acc": "nan"}
            for p in (5, 10) for l in (5, 20) for s in (0, 1)]
    files = figures.plot_figures(rows, {"n_pair": ["5", "10"], "n_layout": ["5", "20"]}, tmp_path / "fig")
    assert [f.name for f in files] == ["val_unseen_pair.lr_acc.png"]      # NaN-only metrics skipped
    assert files[0].stat().st_size > 1000
    # categorical first key, no grid at all
    assert figures.plot_figures(rows, {"caption_mode": ["left", "left+right"]}, tmp_path / "f2")
    assert figures.plot_figures(rows, {}, tmp_path / "f3")


def test_plot_figures_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)                 # import fails
    assert figures.plot_figures([], {"n_pair": ["5"]}, tmp_path / "fig") is None
