"""The analysis as figures (PNG; matplotlib, the `plot` extra): `save_plots` for one model's
report, `save_aggregate_plots` for the ablation table over runs (the paper's figures:
figures.py `save_paper_figures`). Both raise reporting.py's
ImportError (naming the extra) when matplotlib is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minispatial.analysis.decompose import F64, TOWERS
from minispatial.reporting import pyplot

PLOT_METRICS = ("val_unseen_pair.lr_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.lr_acc",
                "val_seen_pair.labelset_acc")


def save_plots(res: dict, out_dir) -> list[str]:
    """Heat maps (query x key) of every term per head and the CLS-row curves per term, as PNGs
    in out_dir -> the files written."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for tower in TOWERS:
        for e in res[tower]:
            if "mean_terms" not in e:
                continue
            terms = e["terms"] + ["total"]
            maps = {t: np.asarray(e["mean_terms"][t]) for t in e["terms"]}
            maps["total"] = sum(maps.values())
            H = maps["total"].shape[0]
            fig, axes = plt.subplots(H, len(terms), figsize=(1.8 * len(terms), 1.8 * H), squeeze=False)
            for h in range(H):
                for i, t in enumerate(terms):
                    ax = axes[h, i]
                    m = maps[t][h]
                    lim = float(np.abs(m).max()) or 1.0
                    ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if h == 0:
                        ax.set_title(t, fontsize=8)
                    if i == 0:
                        ax.set_ylabel(f"head {h}", fontsize=8)
            fig.suptitle(f"{tower} layer {e['layer']}: mean score terms (query x key)", fontsize=9)
            path = out_dir / f"{tower}_layer{e['layer']}_terms.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(str(path))
    for e in res["vision"]:
        H = len(e["heads"])
        fig, axes = plt.subplots(1, H, figsize=(3.2 * H, 3.0), squeeze=False)
        for h, head in enumerate(e["heads"]):
            ax = axes[0, h]
            for t in e["terms"]:
                if t != "const":
                    ax.plot(head["terms"][t]["curve"], label=t, marker=".")
            ax.set_title(f"head {h} ({head['class']})", fontsize=8)
            ax.set_xlabel("key pixel")
        axes[0, 0].set_ylabel("CLS-row term (label-averaged)")
        axes[0, -1].legend(fontsize=7)
        path = out_dir / f"vision_layer{e['layer']}_cls_curves.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))
    return written


def save_aggregate_plots(agg: dict, out_dir) -> list[str]:
    """For an aggregate_reports dict, as a PNG in out_dir: a bar chart of the ablation table (mean,
    std as error bars) -> the files written. (The CLS-row EP curves over runs, sign-aligned, are
    analysis/figures.py's; the old mean of curves of opposite signs is gone.)"""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    abls = agg["ablations"]
    metrics = [m for m in PLOT_METRICS if m in abls[0]["metrics"]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(abls), 3.2))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        mean = np.array([ab["metrics"][m]["mean"] for ab in abls], dtype=F64)
        std = np.array([ab["metrics"][m]["std"] for ab in abls], dtype=F64)
        ax.bar(np.arange(len(abls)) + (i - (len(metrics) - 1) / 2) * width, mean, width,
               yerr=np.nan_to_num(std), capsize=2, label=m.replace("val_", "").replace("_pair", ""))
    ax.axhline(0.5, color="0.5", ls="--", lw=0.8)                   # chance level of lr_acc
    ax.set_xticks(np.arange(len(abls)), [ab["name"] for ab in abls], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"ablations: mean ± std over {agg['n_runs']} runs (dashed: lr_acc chance)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path = out_dir / "ablations_runs.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(str(path))
    return written
