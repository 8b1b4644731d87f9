"""A sweep's figures: one PNG per key metric against the first grid key (matplotlib through
`reporting.pyplot`; without it there are no figures and the sweep says so)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from minispatial.reporting import mean_std, pyplot
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


def plot_figures(rows: list[dict], grid: dict[str, list[str]], fig_dir: Path,
                 metrics=KEY_METRICS) -> list[Path] | None:
    """One PNG per key metric present: the metric against the first grid key, one line per value
    of the other grid keys, mean +- std over seeds and each seed as a dot; chance 0.5 for lr_acc.
    -> the files written, or None when matplotlib is not installed."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    keys = list(grid)
    xkey = keys[0] if keys else None
    xvals = grid[xkey] if xkey else [""]
    numeric = xkey is not None and all(to_float(v) is not None for v in xvals)
    xpos = {v: (float(v) if numeric else float(i)) for i, v in enumerate(xvals)}
    logx = numeric and min(xpos.values()) > 0 and max(xpos.values()) / min(xpos.values()) > 50
    others = [dict(zip(keys[1:], vs)) for vs in itertools.product(*(grid[k] for k in keys[1:]))]
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
