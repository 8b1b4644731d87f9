"""The paper's analysis figures (minispatial/analysis/figures.py)."""

import struct

import numpy as np
import pytest

from minispatial.analysis import figures, measure


def png_size(path) -> tuple[int, int]:
    # (width, height) from the PNG header: bytes 16-24, big-endian
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def fake_report(slopes, L=6):
    # a minimal analyze report: per vision head an exact straight EP curve of the given slope
    x = np.arange(L, dtype=float)
    heads = [{"terms": {"EP": {"slope": s, "curve": (s * x + 3.0).tolist()}}} for s in slopes]
    return {"vision": [{"heads": heads}]}


def test_sign_align_flips_exactly_the_negative_slopes():
    slopes = np.array([[0.4, -0.2, 0.0], [-1e-9, 2.0, -3.0]])
    assert figures.sign_align(slopes).tolist() == [[1, -1, 1], [-1, 1, -1]]
    assert figures.sign_align(0.7) == 1.0 and figures.sign_align(-0.7) == -1.0


def test_aligned_curves_order_by_abs_slope_and_all_rise():
    reports = [fake_report([0.1, -0.5]), fake_report([0.3, 0.2]), fake_report([-0.05, -0.4])]
    a = figures.aligned_curves(reports)
    assert a["heads"].tolist() == [[1, 0], [0, 1], [1, 0]]              # rank 1 = steepest
    assert a["signs"].tolist() == [[-1, 1], [1, 1], [-1, -1]]            # exactly the negative ones
    assert np.allclose(a["slopes"], [[0.5, 0.1], [0.3, 0.2], [0.4, 0.05]])
    assert (np.diff(a["curves"], axis=-1) > 0).all()                     # every aligned curve rises
    assert np.allclose(a["r2"], 1.0)
    # the all-positive run is untouched (only centred)
    x = np.arange(6.0)
    assert np.allclose(a["curves"][1, 0], 0.3 * (x - x.mean()))
    assert np.allclose(measure.slope_of(a["curves"]), a["slopes"])


def test_line_r2():
    assert figures.line_r2([0, 1, 2, 3]) == pytest.approx(1.0)
    assert figures.line_r2([0, 1, 0, 1]) == pytest.approx(0.2)
    assert np.isnan(figures.line_r2([2, 2, 2]))


def test_ranked_maps_sign_aligns_vision_maps():
    reps = []
    for slopes in ([0.1, -0.5], [0.3, 0.2]):
        rep = fake_report(slopes)
        rep["vision"][0]["mean_terms"] = {"EP": [np.full((2, 2), s) for s in slopes]}
        reps.append(rep)
    m = figures.ranked_maps(reps, "vision")["EP"]
    assert np.allclose(m[:, 0, 0], [(0.5 + 0.3) / 2, (0.1 + 0.2) / 2])


def test_save_paper_figures_on_two_tiny_runs(an_model, tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for seed in (0, 1):
        run, params, tb = an_model(seed=seed)
        runs.append((run, params, measure.analyze(params, run, ablations=[], n_images=16, testbed=tb)))
    files = figures.save_paper_figures(runs, tmp_path / "figs")
    assert [f.name for f in files] == [
        "heatmaps_vision_layer0.png", "heatmaps_text_layer0.png", "heatmaps_vision_layer0_aligned_runs.png",
        "heatmaps_text_layer0_ranked_runs.png", "vision_layer0_EP_curve_aligned.png", "attention_examples.png"]
    H, dpi = runs[0][0].model.n_heads, figures.DPI
    sizes = {f.name: png_size(f) for f in files}
    assert sizes["heatmaps_vision_layer0.png"] == (round(1.9 * 6 * dpi), round((1.9 * H + 0.6) * dpi))
    assert sizes["vision_layer0_EP_curve_aligned.png"] == (round(3.4 * H * dpi), round(3.6 * dpi))
    assert sizes["attention_examples.png"] == (round(8.5 * dpi), round((2.3 * 4 + 0.4) * dpi))


def test_attention_examples_scores(an_model):
    run, params, tb = an_model()
    ex = figures.attention_examples(run, params, n_examples=3, testbed=tb)
    assert ex["pattern"].shape == (3, run.model.n_heads, tb.config.image_len + 1)
    assert np.allclose(ex["pattern"].sum(axis=-1), 1.0)
    assert np.all(np.abs(ex["true"]) <= 1 + 1e-9) and ex["swapped"].shape == (3,)
