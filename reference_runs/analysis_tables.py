"""Tables of the mechanistic analysis (reference_runs/README.md) from `minispatial analyze --out` files.

    python reference_runs/analysis_tables.py            # reads analysis/full/*.json
                                                       # writes analysis/<group>.summary.json, prints markdown

Each full JSON holds one report per checkpoint (5 seeds). Derived here, per run, then mean ± std
over the runs (ddof=1):
  ablations     every ablation's metrics (unseen/seen left-right accuracy, label-set recognition);
  gradient      the vision CLS row's EP curve over the pixel keys, per head: |slope| (least squares,
                logit per pixel), |right - left|, and R² of the straight-line fit (1 = a steady
                gradient); reported for the steepest head of each run and as the mean over heads;
                `sign` counts heads whose EP falls (-) or rises (+) from left to right;
  std shares    std_ratio of each term on the CLS row (its std over the pixel keys, pooled over
                two-object images, as a fraction of the total score's), mean over heads;
  text          the EOT query's attention on the first- and second-mentioned label, mean over heads
                and for the head that prefers the first most;
  alignment     Procrustes on the seen labels' embeddings (W_E rows) and features, cosine reached
                on held-out labels, against no rotation.
"""

import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "analysis"
GROUPS = [("n_pair15", "clip init, n_pair 15"), ("n_pair5", "clip init, n_pair 5"),
          ("torch_init_n_pair15", "torch init, n_pair 15"), ("torch_init_n_pair5", "torch init, n_pair 5")]
TERMS = ("EE", "EP", "PE", "PP", "BE", "BP")


def ms(xs) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "–"
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return f"{np.mean(xs):.2f} ± {sd:.2f}"


def r2(curve) -> float:
    y = np.asarray(curve, float)
    x = np.arange(len(y), dtype=float)
    if np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1] ** 2)


def per_run(report: dict) -> dict:
    out = {"checkpoint": report["checkpoint"]}
    out["ablations"] = {a["name"]: {k: a["metrics"].get(k) for k in (
        "val_unseen_pair.lr_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.lr_acc",
        "val_seen_pair.labelset_acc", "train.lr_acc")} for a in report["ablations"]}
    heads = report["vision"][0]["heads"]
    ep = [h["terms"]["EP"] for h in heads]
    steep = max(range(len(ep)), key=lambda i: abs(ep[i]["slope"]))
    out["gradient"] = {
        "steepest_abs_slope": abs(ep[steep]["slope"]), "steepest_abs_right_left": abs(ep[steep]["right_left"]),
        "steepest_r2": r2(ep[steep]["curve"]),
        "mean_abs_slope": float(np.mean([abs(e["slope"]) for e in ep])),
        "mean_r2": float(np.nanmean([r2(e["curve"]) for e in ep])),
        "heads_falling": sum(e["slope"] < 0 for e in ep), "heads_rising": sum(e["slope"] > 0 for e in ep)}
    out["std_ratio"] = {t: float(np.mean([h["terms"][t]["std_ratio"] for h in heads])) for t in TERMS}
    out["relational_heads"] = sum(h["class"] == "relational" for h in heads)
    eot = report["text"][0]["eot_attention"]["left"]
    best = max(eot, key=lambda e: e["att_first"] - e["att_second"])
    out["text"] = {"att_first": float(np.mean([e["att_first"] for e in eot])),
                   "att_second": float(np.mean([e["att_second"] for e in eot])),
                   "best_att_first": best["att_first"], "best_att_second": best["att_second"],
                   "heads_first_wins": sum(e["first_wins"] > 0.5 for e in eot)}
    out["alignment"] = {src: {k: report["alignment"][src][k] for k in (
        "fit_cos", "heldout_cos", "heldout_cos_identity", "heldout_top1", "heldout_top1_identity")}
        for src in ("embeddings", "features")}
    return out


def main() -> None:
    groups = {}
    for name, label in GROUPS:
        full = json.loads((HERE / "full" / f"{name}.json").read_text())
        runs = [per_run(r) for r in full["runs"]]
        groups[name] = runs
        (HERE / f"{name}.summary.json").write_text(json.dumps({"label": label, "runs": runs}, indent=1) + "\n")
    names = [n for n, _ in GROUPS]
    labels = dict(GROUPS)

    def col(fn):
        return [ms([fn(r) for r in groups[n]]) for n in names]

    def row(title, cells):
        return f"| {title} | " + " | ".join(cells) + " |"

    head = "| | " + " | ".join(labels[n] for n in names) + " |\n|---|" + "---|" * len(names)
    abl = list(groups[names[0]][0]["ablations"])
    for metric, title in (("val_unseen_pair.lr_acc", "Unseen-pair left–right accuracy"),
                          ("val_unseen_pair.labelset_acc", "Unseen-pair label-set recognition"),
                          ("val_seen_pair.lr_acc", "Seen-pair left–right accuracy")):
        print(f"**{title}** under each ablation (vision tower, all heads):\n\n{head}")
        for a in abl:
            print(row(a, col(lambda r, a=a: r["ablations"][a][metric])))
        print()
    print(f"**Horizontal gradient**: EP on the vision CLS row over the 10 pixel keys:\n\n{head}")
    g = lambda k: (lambda r: r["gradient"][k])
    print(row("steepest head: abs slope (logit/pixel)", col(g("steepest_abs_slope"))))
    print(row("steepest head: abs(right − left)", col(g("steepest_abs_right_left"))))
    print(row("steepest head: R² of a straight line", col(g("steepest_r2"))))
    print(row("mean over heads: abs slope", col(g("mean_abs_slope"))))
    print(row("heads falling / rising (of 4)", [
        " ".join(f"{r['gradient']['heads_falling']}/{r['gradient']['heads_rising']}" for r in groups[n]) for n in names]))
    print(row("relational heads (of 4)", col(lambda r: r["relational_heads"])))
    print()
    print(f"**Share of the CLS-row logit std** (std_ratio, mean over heads):\n\n{head}")
    for t in TERMS:
        print(row(t, col(lambda r, t=t: r["std_ratio"][t])))
    print()
    print(f"**Text EOT attention** to the first- vs second-mentioned label (left-form two-object captions):\n\n{head}")
    for k, t in (("att_first", "mean over heads: first"), ("att_second", "mean over heads: second"),
                 ("best_att_first", "most first-preferring head: first"),
                 ("best_att_second", "most first-preferring head: second"),
                 ("heads_first_wins", "heads preferring the first (of 4)")):
        print(row(t, col(lambda r, k=k: r["text"][k])))
    print()
    print(f"**Alignment**: Procrustes rotation fitted on the 15 seen labels, cosine on the 5 held-out labels:\n\n{head}")
    for src in ("embeddings", "features"):
        for k, t in (("fit_cos", "fit (seen)"), ("heldout_cos", "held-out, rotated"),
                     ("heldout_cos_identity", "held-out, no rotation"),
                     ("heldout_top1", "held-out nearest-label accuracy, rotated"),
                     ("heldout_top1_identity", "held-out nearest-label accuracy, no rotation")):
            print(row(f"{src}: {t}", col(lambda r, s=src, k=k: r["alignment"][s][k])))


if __name__ == "__main__":
    main()
