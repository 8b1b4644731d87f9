"""Render the markdown tables of reference_runs/README.md from the sweeps' summary.csv files.

    python reference_runs/tables.py search/init [--keys init,n_pair,embed_scale] [--metrics m1,m2]

Prints one row per grid point: the grid values, the number of seeds, then mean ± std (over seeds,
ddof=1) of each metric. The README's tables are pasted from this output, never typed by hand.
"""

import argparse
import csv
import json
from pathlib import Path

METRICS = ["val_unseen_pair.lr_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.lr_acc",
           "val_seen_pair.i2t_acc", "val_single.i2t_acc", "train.lr_acc"]
SHORT = {"val_unseen_pair": "unseen", "val_seen_pair": "seen", "val_single": "single"}


def short(metric: str) -> str:
    split, m = metric.split(".", 1)
    return f"{SHORT.get(split, split)} {m}"


def table(sweep_dir: Path, keys=None, metrics=METRICS) -> str:
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    grid = json.loads((sweep_dir / "sweep.json").read_text()).get("grid", {})
    keys = keys or list(grid)
    metrics = [m for m in metrics if f"{m}.mean" in rows[0]]
    out = ["| " + " | ".join(keys + ["seeds"] + [short(m) for m in metrics]) + " |",
           "|" + "---|" * (len(keys) + 1 + len(metrics))]
    for r in rows:
        cells = [r[k] for k in keys] + [r.get("n_ok", "")]
        for m in metrics:
            mean, std = r.get(f"{m}.mean", ""), r.get(f"{m}.std", "")
            cells.append("–" if mean in ("", "nan") else f"{float(mean):.2f} ± {float(std):.2f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--keys", help="grid keys to show, in order (default: the sweep's grid)")
    p.add_argument("--metrics", help="comma-separated metrics (default: the key ones)")
    a = p.parse_args()
    print(table(a.sweep_dir, a.keys.split(",") if a.keys else None,
                a.metrics.split(",") if a.metrics else METRICS))
