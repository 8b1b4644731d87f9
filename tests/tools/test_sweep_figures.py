"""A sweep's figures (minispatial/tools/sweep/figures.py)."""

import math
import struct
import sys

import pytest

from minispatial import reporting
from minispatial.tools.sweep import cli, figures


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


def png_size(path) -> tuple[int, int]:
    # (width, height) from the PNG header: bytes 16-24, big-endian
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_t_quantile_and_ci_on_known_numbers():
    assert reporting.t975(1) == 12.7062 and reporting.t975(4) == 2.7764 and reporting.t975(30) == 2.0423
    assert reporting.t975(31) == 2.0423 and reporting.t975(2000) == 1.96
    with pytest.raises(ValueError):
        reporting.t975(0)
    # 1..5: mean 3, sample std sqrt(2.5), n 5 -> half-width 2.776 * sqrt(2.5) / sqrt(5)
    mean, half, n = figures.mean_ci95([1, 2, 3, 4, 5, float("nan")])
    assert (mean, n) == (3.0, 5) and half == pytest.approx(2.7764 * math.sqrt(0.5))
    mean, half, n = figures.mean_ci95([0.9])
    assert mean == 0.9 and math.isnan(half) and n == 1


def generalisation_rows():
    return [{"run": f"n_pair={p}__seed={s}", "status": "ok", "error": "", "n_pair": str(p), "seed": str(s),
             "val_single.i2t_acc": "1.0", "val_seen_pair.lr_acc": str(0.9 + 0.01 * s),
             "val_unseen_pair.lr_acc": str(0.5 + 0.03 * p + 0.01 * s)} for p in (5, 15) for s in range(3)]


def test_generalisation_figure_size(tmp_path):
    pytest.importorskip("matplotlib")
    path = figures.plot_generalisation(generalisation_rows(), {"n_pair": ["5", "15"]}, tmp_path)
    assert path.name == "generalisation.png"
    assert png_size(path) == (round(5.2 * 110), 4 * 110)
    assert figures.plot_generalisation([], {"n_pair": ["5"]}, tmp_path / "none") is None


def test_replot_rebuilds_figures_from_results_csv_without_training(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = generalisation_rows()
    cols = list(rows[0])
    (tmp_path / "results.csv").write_text(
        "\n".join([",".join(cols)] + [",".join(r[c] for c in cols) for r in rows]) + "\n")
    assert cli.main(["--out", str(tmp_path), "--replot"]) == 0
    assert not (tmp_path / "runs").exists()
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert names == ["generalisation.png", "val_seen_pair.lr_acc.png", "val_single.i2t_acc.png",
                     "val_unseen_pair.lr_acc.png"]
    assert "4 figures" in capsys.readouterr().out
    assert cli.main(["--out", str(tmp_path / "missing"), "--replot"]) == 2


def test_map_of_two_grid_keys(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"run": f"a={a}__n_pair={p}__seed={s}", "status": "ok", "a": str(a), "n_pair": str(p), "seed": str(s),
             "val_unseen_pair.lr_acc": str(0.6 + 0.02 * p - 0.1 * a + 0.01 * s)}
            for a in (0, 1) for p in (5, 15) for s in range(3)]
    grid = {"a": ["0", "1"], "n_pair": ["5", "15"]}
    path = figures.plot_map(rows, grid, tmp_path)
    assert path.name == "map_val_unseen_pair.lr_acc.png"
    w, h = png_size(path)
    assert (w, h) == (round((1.3 * 2 + 2.5) * 110), round((0.8 * 2 + 1.8) * 110))
    assert figures.plot_map(rows, {"a": ["0", "1"]}, tmp_path / "one_key") is None   # one key: no map
    assert figures.plot_map([], grid, tmp_path / "no_rows") is None
