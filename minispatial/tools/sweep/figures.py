"""A sweep's figures: one PNG per key metric against the first grid key (matplotlib through
`reporting.pyplot`; without it there are no figures and the sweep says so)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from minispatial.reporting import mean_ci, mean_std, pyplot
from minispatial.tools.sweep.results import is_finite, to_float

KEY_METRICS = (
    "val_unseen_pair.lr_acc", "val_seen_pair.lr_acc", "val_unseen_pair.lr_acc_right",
    "val_seen_pair.lr_acc_right", "val_single.i2t_acc", "val_seen_pair.i2t_acc",
    "val_unseen_pair.i2t_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.labelset_acc",
    "train.i2t_acc", "train.loss", "val_unseen_pair.loss",
)


def figure_grid(rows: list[dict], keys: list[str], typed: dict[str, list[str]]) -> dict[str, list[str]]:
    """The axes of the figures: every value of each column in `keys` present in the rows, the
    values typed in a grid (`typed`) first, in their order, then the others as they come."""
    grid = {}
    for k in keys:
        present = [str(r[k]) for r in rows]
        grid[k] = [v for v in typed.get(k, []) if v in present]
        grid[k] += [v for v in dict.fromkeys(present) if v not in grid[k]]
    return grid


def x_axis(grid: dict[str, list[str]]) -> tuple:
    """-> (the first grid key or None, its values, their x positions (the numbers, or 0, 1, ...),
    whether they are numbers, one dict per combination of the other grid keys' values)."""
    keys = list(grid)
    xkey = keys[0] if keys else None
    xvals = grid[xkey] if xkey else [""]
    numeric = xkey is not None and all(to_float(v) is not None for v in xvals)
    xpos = {v: (float(v) if numeric else float(i)) for i, v in enumerate(xvals)}
    others = [dict(zip(keys[1:], vs)) for vs in itertools.product(*(grid[k] for k in keys[1:]))]
    return xkey, xvals, xpos, numeric, others


def plot_figures(rows: list[dict], grid: dict[str, list[str]], fig_dir: Path,
                 metrics=KEY_METRICS) -> list[Path] | None:
    """One PNG per key metric present: the metric against the first grid key, one line per value
    of the other grid keys, mean +- std over seeds and each seed as a dot; chance 0.5 for lr_acc.
    -> the files written, or None when matplotlib is not installed."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    xkey, xvals, xpos, numeric, others = x_axis(grid)
    logx = numeric and min(xpos.values()) > 0 and max(xpos.values()) / min(xpos.values()) > 50
    # lines side by side: a small horizontal offset per line (linear axes only)
    span = (max(xpos.values()) - min(xpos.values())) or 1.0
    shift = [0.0 if logx else (i - (len(others) - 1) / 2) * 0.015 * span for i in range(len(others))]
    ok = [r for r in rows if r.get("status") == "ok"]
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        if not any(is_finite(r.get(metric)) for r in ok):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for li, other in enumerate(others):
            sel = [r for r in ok if all(str(r.get(k)) == v for k, v in other.items())]
            label = ", ".join(f"{k}={v}" for k, v in other.items()) or None
            xs, means, stds = [], [], []
            for v in xvals:
                ys = [to_float(r.get(metric)) for r in sel
                      if (xkey is None or str(r.get(xkey)) == v) and is_finite(r.get(metric))]
                if not ys:
                    continue
                stat = mean_std(ys)
                xs.append(xpos[v] + shift[li])
                means.append(stat["mean"])
                stds.append(0.0 if math.isnan(stat["std"]) else stat["std"])
                ax.scatter([xs[-1]] * len(ys), ys, s=12, alpha=0.5, color=f"C{li}")
            if xs:
                ax.errorbar(xs, means, yerr=stds, color=f"C{li}", marker="o", capsize=3, label=label)
        if ".lr_acc" in metric:
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
        if metric.endswith("acc") or "_acc" in metric:
            ax.set_ylim(-0.02, 1.02)
        if logx:
            ax.set_xscale("log")
        if not numeric or (not logx and len(xvals) <= 12):
            ax.set_xticks(list(xpos.values()), xvals)
        ax.set_xlabel(xkey or "")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (mean ± std over seeds; dots = seeds)", fontsize=9)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# the paper's generalisation figure: three accuracies, mean with a 95% t-interval over seeds

GENERALISATION = (("val_single.i2t_acc", "single-object"), ("val_seen_pair.lr_acc", "seen-pair"),
                  ("val_unseen_pair.lr_acc", "unseen-pair"))
# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the normal 1.96 is used
def mean_ci95(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n) over the defined values (reporting.mean_ci)."""
    s = mean_ci(values)
    return s["mean"], s["ci"], s["n"]


def plot_generalisation(rows: list[dict], grid: dict[str, list[str]], fig_dir: Path) -> Path | None:
    """generalisation.png: single-object (val_single.i2t_acc), seen-pair (val_seen_pair.lr_acc)
    and unseen-pair (val_unseen_pair.lr_acc) accuracy against the first grid key, one panel per
    value of the other grid keys; each seed a dot, the mean with its 95% t-interval over seeds,
    chance 0.5 dashed. -> the file, or None without matplotlib or without any of the metrics."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status") == "ok"]
    if not any(is_finite(r.get(m)) for r in ok for m, _ in GENERALISATION):
        return None
    xkey, xvals, xpos, numeric, others = x_axis(grid)
    span = (max(xpos.values()) - min(xpos.values())) or 1.0
    fig, axes = plt.subplots(1, len(others), figsize=(5.2 * len(others), 4), squeeze=False, sharey=True)
    for ax, other in zip(axes[0], others):
        sel = [r for r in ok if all(str(r.get(k)) == v for k, v in other.items())]
        for mi, (metric, name) in enumerate(GENERALISATION):
            dx = (mi - 1) * 0.02 * span
            xs, means, halves = [], [], []
            for v in xvals:
                ys = [to_float(r.get(metric)) for r in sel
                      if (xkey is None or str(r.get(xkey)) == v) and is_finite(r.get(metric))]
                if not ys:
                    continue
                mean, half, _ = mean_ci95(ys)
                xs.append(xpos[v] + dx)
                means.append(mean)
                halves.append(0.0 if math.isnan(half) else half)
                ax.scatter([xs[-1]] * len(ys), ys, s=10, alpha=0.45, color=f"C{mi}", linewidths=0)
            if xs:
                ax.errorbar(xs, means, yerr=halves, color=f"C{mi}", marker="o", capsize=3, label=name)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (lr_acc)")
        ax.set_ylim(-0.02, 1.02)
        if not numeric or len(xvals) <= 12:
            ax.set_xticks(list(xpos.values()), xvals)
        ax.set_xlabel(xkey or "")
        ax.set_title(", ".join(f"{k}={v}" for k, v in other.items()) or "all runs", fontsize=9)
    axes[0, 0].set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle("generalisation: single-object i2t_acc, seen- and unseen-pair lr_acc\n"
                 "(mean with 95% t-interval over seeds; dots = seeds)", fontsize=9)
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "generalisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MAP_METRIC = "val_unseen_pair.lr_acc"


def plot_map(rows: list[dict], grid: dict[str, list[str]], fig_dir: Path,
             metric: str = MAP_METRIC) -> Path | None:
    """With two or more grid keys: `metric` over the first two (x: the first, y: the second) as a
    heat map of the mean over seeds (and over any further keys' values, which the title names),
    each cell annotated with mean ± 95% t-interval and n -> map_<metric>.png, or None (matplotlib
    missing, fewer than two keys, or no value)."""
    keys = list(grid)
    ok = [r for r in rows if r.get("status") == "ok" and is_finite(r.get(metric))]
    if len(keys) < 2 or not ok:
        return None
    try:
        plt = pyplot()
    except ImportError:
        return None
    xk, yk = keys[0], keys[1]
    xs, ys = grid[xk], grid[yk]
    cells = {}
    for y in ys:
        for x in xs:
            vals = [to_float(r[metric]) for r in ok if str(r.get(xk)) == x and str(r.get(yk)) == y]
            cells[(x, y)] = mean_ci(vals)
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 0.8 * len(ys) + 1.8))
    img = [[cells[(x, y)]["mean"] for x in xs] for y in ys]
    im = ax.imshow(img, cmap="viridis", vmin=0.5, vmax=1.0, origin="lower", aspect="auto")
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            c = cells[(x, y)]
            if c["n"]:
                ci = "" if math.isnan(c["ci"]) else f" ± {c['ci']:.2f}"
                ax.text(j, i, f"{c['mean']:.2f}{ci}\nn={c['n']}", ha="center", va="center", fontsize=7,
                        color="white" if c["mean"] < 0.75 else "black")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(xk)
    ax.set_ylabel(yk)
    rest = [k for k in keys[2:]]
    ax.set_title(f"{metric}: mean ± 95% t-interval over seeds (chance 0.5)"
                 + (f"\npooled over {', '.join(rest)}" if rest else ""), fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / f"map_{metric}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_figures(rows: list[dict], grid: dict[str, list[str]], fig_dir: Path) -> list[Path] | None:
    """Every figure of a sweep: plot_figures' per-metric PNGs, generalisation.png and, with two or
    more grid keys, the map of unseen-pair left-right accuracy (plot_map) -> the files written,
    or None without matplotlib."""
    written = plot_figures(rows, grid, fig_dir)
    if written is None:
        return None
    extra = [plot_generalisation(rows, grid, fig_dir), plot_map(rows, grid, fig_dir)]
    return written + [p for p in extra if p]


def replot(out: Path) -> list[Path] | None:
    """Rebuild DIR/figures from DIR/results.csv (and the grid order of DIR/sweep.json when
    present) without training: the grid keys are results.csv's columns between `error` and
    `seed`. -> the files written, or None without matplotlib. OSError when results.csv is missing."""
    import csv
    import json

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        cols = reader.fieldnames or []
    keys = cols[cols.index("error") + 1:cols.index("seed")] if {"error", "seed"} <= set(cols) else []
    typed: dict[str, list[str]] = {}
    try:
        doc = json.loads((out / "sweep.json").read_text())
        for inv in [*doc.get("invocations", []), doc]:
            for k, vs in (inv.get("grid") or {}).items():
                typed.setdefault(k, [])
                typed[k] += [str(v) for v in vs if str(v) not in typed[k]]
    except (OSError, ValueError, AttributeError):
        pass
    return all_figures(rows, figure_grid(rows, keys, typed), out / "figures")
