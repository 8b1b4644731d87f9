"""The paper's analysis figures (PNG; matplotlib, the `plot` extra) from `measure.analyze`
reports: `save_paper_figures(runs, out_dir)` writes every one that applies.

Sign alignment. A model and its mirror image (every position reflected, left <-> right) are equally
good solutions, and different seeds land on either: the EP term on the CLS row rises to the right
in some heads and falls in others. Averaging such curves over seeds gives a nearly flat mean while
every run is a steep line. So, over seeds,
  * each run's vision heads are ordered by |EP slope| (rank 1 = the steepest head), since head
    indices are arbitrary across seeds, and statistics are taken rank-wise;
  * each (run, head) is multiplied by `sign_align` of its EP slope: +1 when the slope is >= 0
    (left untouched), -1 when it is negative (flipped). Exactly the negative-slope ones flip; a
    zero slope counts as positive. After it every EP curve rises left to right.
The text tower has no left-right mirror (word order is fixed), so its heads are not flipped; over
seeds they are ordered by the norm of their mean EP map (rank 1 = largest) and averaged rank-wise.

Figures (layer 0 of each tower; `l` the layer):
    heatmaps_vision_layer{l}.png, heatmaps_text_layer{l}.png   one model (runs[0]): the mean term
        maps EE, EP, PE, PP, BE, BP per head, query x key (measure.py's `mean_terms`)
    heatmaps_vision_layer{l}_aligned_runs.png, heatmaps_text_layer{l}_ranked_runs.png   over seeds,
        rank-wise means as above (two runs or more)
    vision_layer{l}_EP_curve_aligned.png   the CLS-row EP curve of every run, sign-aligned and
        centred, one panel per head rank, mean |slope| and R² of a straight-line fit per rank.
        It replaces plots.py's old `vision_layer0_EP_curve_runs.png` (a mean of opposite signs).
    attention_examples.png   runs[0]: for a few unseen-pair images, the CLS attention over the pixels
        per head (`vision.blocks.0.attn.hook_pattern`), the image under it, and the cosine of the
        true caption vs the swapped one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minispatial import model
from minispatial.analysis.decompose import F64
from minispatial.data import make_testbed
from minispatial.reporting import pyplot
from minispatial.text import left_caption

MAP_TERMS = ("EE", "EP", "PE", "PP", "BE", "BP")
DPI = 110
ALIGN_NOTE = "each run's heads ordered by |EP slope| and oriented so EP rises left to right"


# --------------------------------------------------------------------------------------------
# numbers

def sign_align(slopes) -> np.ndarray:
    """slopes (any shape: one per run, or [runs, heads]) -> +1.0 / -1.0 of the same shape: -1
    exactly where the slope is negative (those are flipped), +1 elsewhere (zero and positive
    slopes are left untouched). NaN counts as positive."""
    s = np.asarray(slopes, dtype=F64)
    return np.where(s < 0, -1.0, 1.0)


def line_r2(curve) -> float:
    """R² of the least-squares straight line through curve [L] against 0..L-1 (NaN if constant)."""
    y = np.asarray(curve, dtype=F64)
    x = np.arange(len(y), dtype=F64)
    slope, icpt = np.polyfit(x, y, 1)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return float(1 - ((y - (slope * x + icpt)) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")


def ep_slopes(report: dict, layer: int = 0) -> np.ndarray:
    """One report -> the CLS-row EP slope of every vision head of `layer` [H]."""
    return np.array([h["terms"]["EP"]["slope"] for h in report["vision"][layer]["heads"]], dtype=F64)


def rank_order(slopes: np.ndarray) -> np.ndarray:
    """[H] slopes -> head indices by decreasing |slope| (rank 1 = steepest first; ties by index)."""
    return np.argsort(-np.abs(slopes), kind="stable")


def aligned_curves(reports: list[dict], layer: int = 0) -> dict:
    """The CLS-row EP curves of every run, heads ordered by |EP slope| and sign-aligned ->
    {"curves" [R, H, L] (aligned, centred), "slopes" [R, H] (aligned, so >= 0), "r2" [R, H],
    "heads" [R, H] (original head index at each rank), "signs" [R, H]}."""
    curves, slopes, r2, heads, signs = [], [], [], [], []
    for rep in reports:
        sl = ep_slopes(rep, layer)
        order = rank_order(sl)
        sg = sign_align(sl[order])
        cv = np.array([rep["vision"][layer]["heads"][h]["terms"]["EP"]["curve"] for h in order], dtype=F64)
        cv = sg[:, None] * (cv - cv.mean(axis=1, keepdims=True))
        curves.append(cv)
        slopes.append(sg * sl[order])
        r2.append([line_r2(c) for c in cv])
        heads.append(order)
        signs.append(sg)
    return {"curves": np.array(curves), "slopes": np.array(slopes), "r2": np.array(r2, dtype=F64),
            "heads": np.array(heads), "signs": np.array(signs)}


def term_maps(report: dict, tower: str, layer: int = 0) -> dict[str, np.ndarray]:
    """One report -> {term: mean map [H, Tq, Tk]} of MAP_TERMS present (empty without maps)."""
    e = report[tower][layer] if len(report[tower]) > layer else {}
    return {t: np.asarray(e["mean_terms"][t], dtype=F64) for t in MAP_TERMS if t in e.get("mean_terms", {})}


def ranked_maps(reports: list[dict], tower: str, layer: int = 0) -> dict[str, np.ndarray]:
    """Rank-wise mean over runs of the term maps -> {term: [H, Tq, Tk]}. Vision: heads by |EP
    slope|, each (run, head) times the sign of its EP slope. Text: heads by the norm of the
    mean EP map, not flipped (module docstring)."""
    acc: dict[str, list] = {}
    for rep in reports:
        maps = term_maps(rep, tower, layer)
        if tower == "vision":
            sl = ep_slopes(rep, layer)
            order = rank_order(sl)
            sg = sign_align(sl[order])
        else:
            order = np.argsort(-np.linalg.norm(maps["EP"], axis=(1, 2)), kind="stable")
            sg = np.ones(len(order))
        for t, m in maps.items():
            acc.setdefault(t, []).append(sg[:, None, None] * m[order])
    return {t: np.mean(v, axis=0) for t, v in acc.items()}


# --------------------------------------------------------------------------------------------
# figures

def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)            # constrained layout: the PNG is exactly figsize * DPI
    plt.close(fig)
    return path


def plot_heatmaps(maps: dict[str, np.ndarray], title: str, path: Path, row_name: str = "head") -> Path:
    """Maps {term: [H, Tq, Tk]} -> one PNG, a row per head, a column per term, each on its own
    symmetric colour scale (query x key; red > 0 > blue), its limit ±max|value| above it."""
    plt = pyplot()
    terms = [t for t in MAP_TERMS if t in maps]
    H = maps[terms[0]].shape[0]
    fig, axes = plt.subplots(H, len(terms), figsize=(1.9 * len(terms), 1.9 * H + 0.6), squeeze=False,
                             layout="constrained")
    for h in range(H):
        for i, t in enumerate(terms):
            ax, m = axes[h, i], maps[t][h]
            lim = float(np.nanmax(np.abs(m))) or 1.0
            ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{t}  ±{lim:.2g}" if h == 0 else f"±{lim:.2g}", fontsize=8 if h == 0 else 6)
            if i == 0:
                ax.set_ylabel(f"{row_name} {h + (row_name == 'rank')}\nquery", fontsize=7)
            if h == H - 1:
                ax.set_xlabel("key", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def plot_ep_curves(reports: list[dict], path: Path, layer: int = 0) -> Path:
    """The sign-aligned, centred CLS-row EP curve of every run (a line each), one panel per head
    rank, the rank's mean |slope| and mean R² in its title."""
    plt = pyplot()
    a = aligned_curves(reports, layer)
    R, H, L = a["curves"].shape
    fig, axes = plt.subplots(1, H, figsize=(3.4 * H, 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    x = np.arange(L)
    for r in range(H):
        ax = axes[0, r]
        for i in range(R):
            flip = " (flipped)" if a["signs"][i, r] < 0 else ""
            ax.plot(x, a["curves"][i, r], marker=".", lw=1, alpha=0.8,
                    label=f"run {i} head {a['heads'][i, r]}{flip}")
        if R > 1:
            ax.plot(x, a["curves"][:, r].mean(axis=0), color="k", lw=2, label="mean")
        sl, r2 = a["slopes"][:, r], a["r2"][:, r]
        ax.set_title(f"rank {r + 1}: |slope| {sl.mean():.3f}" + (f" ± {sl.std(ddof=1):.3f}" if R > 1 else "")
                     + f"/px\nR² {np.nanmean(r2):.3f}" + (f" (min {np.nanmin(r2):.3f})" if R > 1 else ""),
                     fontsize=8)
        ax.set_xlabel("key pixel")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("CLS-row EP, centred (logit)")
    fig.suptitle(f"vision layer {layer}: EP on the CLS row, {R} run{'s' * (R > 1)}\n{ALIGN_NOTE}",
                 fontsize=9)
    return _save(plt, fig, path)


def attention_examples(run_cfg, params: dict, n_examples: int = 4, testbed=None) -> dict:
    """The first n_examples left-form unseen-pair images of the model's testbed -> {"images" [k, L],
    "labels" [k, 2] (left, right), "pattern" [k, H, T] (CLS row of vision layer 0, key 0 = CLS),
    "true" [k], "swapped" [k]: cos(image, "a is on the left of b") and with a, b swapped}."""
    cfg = run_cfg.model
    tb = make_testbed(run_cfg.data) if testbed is None else testbed
    sp = tb.splits["val_unseen_pair"]
    idx = np.flatnonzero(np.asarray(sp.form) == 1)[:n_examples]
    images, labels = np.asarray(sp.images[idx]), np.asarray(sp.labels[idx])
    caps = [left_caption(a, b) for a, b in labels] + [left_caption(b, a) for a, b in labels]
    tokens, eot = tb.tokenizer.encode_batch(caps)
    record: dict = {}
    img = model.encode_images(params, images, cfg, record=record)
    txt = model.encode_texts(params, tokens, eot, cfg)
    cos = np.einsum("be,be->b", np.tile(np.asarray(img, F64), (2, 1)), np.asarray(txt, F64))
    k = len(idx)
    return {"images": images, "labels": labels, "true": cos[:k], "swapped": cos[k:],
            "pattern": np.asarray(record["vision.blocks.0.attn.hook_pattern"], F64)[:, :, 0, :]}


def plot_attention_examples(ex: dict, path: Path) -> Path:
    """attention_examples' dict -> one PNG: per example, the CLS attention over the pixels per head
    (lines), the image under it (pixel labels), the caption scores beside it."""
    plt = pyplot()
    k, H, T = ex["pattern"].shape
    L = T - 1
    fig = plt.figure(figsize=(8.5, 2.3 * k + 0.4), layout="constrained")
    gs = fig.add_gridspec(2 * k, 2, height_ratios=[4, 1] * k, width_ratios=[4, 1.5])
    for i in range(k):
        ax = fig.add_subplot(gs[2 * i, 0])
        for h in range(H):
            ax.plot(np.arange(L), ex["pattern"][i, h, 1:], marker=".",
                    label=f"head {h} (CLS self {ex['pattern'][i, h, 0]:.2f})")
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_xticks([])
        ax.set_ylabel("CLS attn", fontsize=7)
        ax.legend(fontsize=6, loc="upper right")
        axi = fig.add_subplot(gs[2 * i + 1, 0], sharex=ax)
        im = ex["images"][i]
        axi.imshow((im > 0)[None, :], cmap="Greys", vmin=0, vmax=1.6, aspect="auto",
                   extent=(-0.5, L - 0.5, 0, 1))
        for j in np.flatnonzero(im):
            axi.text(j, 0.5, str(im[j]), ha="center", va="center", color="w", fontsize=8, weight="bold")
        axi.set_yticks([])
        axi.set_xticks(np.arange(L))
        axi.tick_params(labelsize=6)
        axs = fig.add_subplot(gs[2 * i:2 * i + 2, 1])
        axs.axis("off")
        a, b = ex["labels"][i]
        ok = "correct" if ex["true"][i] > ex["swapped"][i] else "WRONG"
        axs.text(0, 0.5, f"true  '{a} left of {b}':\n  cos {ex['true'][i]:+.3f}\n"
                         f"swapped '{b} left of {a}':\n  cos {ex['swapped'][i]:+.3f}\n-> {ok}",
                 fontsize=8, va="center", family="monospace")
    axi.set_xlabel("pixel (image: label numbers)", fontsize=7)
    fig.suptitle("unseen-pair images: CLS attention per head (vision layer 0) and caption scores",
                 fontsize=9)
    return _save(plt, fig, path)


def save_paper_figures(runs: list[tuple], out_dir, layer: int = 0) -> list[Path]:
    """runs: [(run_cfg: RunConfig, params, report from measure.analyze)] -> the PNGs written in
    out_dir (module docstring): one-model figures of runs[0], over-seed figures when there are two
    runs or more. ImportError (naming the `plot` extra) without matplotlib."""
    pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = [r for _, _, r in runs]
    written = []
    for tower in ("vision", "text"):
        maps = term_maps(reports[0], tower, layer)
        if maps:
            written.append(plot_heatmaps(maps, f"{tower} layer {layer}: mean score terms per head "
                                               f"(query x key; colour limits ±max per panel), one model", out / f"heatmaps_{tower}_layer{layer}.png"))
    if len(runs) > 1:
        written.append(plot_heatmaps(ranked_maps(reports, "vision", layer),
                                     f"vision layer {layer}: mean score terms over {len(runs)} runs by head "
                                     f"rank\n{ALIGN_NOTE} (every term multiplied by that sign)",
                                     out / f"heatmaps_vision_layer{layer}_aligned_runs.png", "rank"))
        if term_maps(reports[0], "text", layer):
            written.append(plot_heatmaps(ranked_maps(reports, "text", layer),
                                         f"text layer {layer}: mean score terms over {len(runs)} runs by head "
                                         "rank\n(heads ordered by the norm of their EP map; not flipped)",
                                         out / f"heatmaps_text_layer{layer}_ranked_runs.png", "rank"))
    written.append(plot_ep_curves(reports, out / f"vision_layer{layer}_EP_curve_aligned.png", layer))
    if layer == 0:
        run_cfg, params, _ = runs[0]
        written.append(plot_attention_examples(attention_examples(run_cfg, params),
                                               out / "attention_examples.png"))
    return written
