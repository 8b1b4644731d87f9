"""The analysis as text: `format_report` for one model's report, `format_aggregate` for the
mean ± std over runs (the tables recorded in reference_runs/analysis/*.txt)."""

from __future__ import annotations

import math

from minispatial.analysis.decompose import TOWERS
from minispatial.analysis.runs import CLS_STATS
from minispatial.reporting import format_table

# The columns of the ablation tables: what an ablation moves (left/right and label-set accuracy,
# retrieval). Not the sweep's key metrics (tools/sweep): those follow training (losses, the right-
# form accuracies) and would change the recorded tables here; hence a name of their own.
ABLATION_METRICS = ("val_unseen_pair.lr_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.lr_acc",
                    "val_seen_pair.labelset_acc", "val_single.labelset_acc_single", "val_single.i2t_acc",
                    "val_unseen_pair.i2t_acc", "train.lr_acc")


def fmt(v, spec=".3f") -> str:
    """A number with format `spec`; "-" when undefined (None, NaN, inf)."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def plus_minus(stat: dict, spec: str = ".3f") -> str:
    """A mean_std dict -> "mean±std" ("-" when undefined; the mean alone below two runs)."""
    if stat["std"] is None:
        return fmt(stat["mean"], spec)
    return f"{fmt(stat['mean'], spec)}±{fmt(stat['std'], spec.lstrip('+'))}"


def ablation_table(ablations: list[dict], cell) -> str:
    # ablation entries (a report's or an aggregate's) -> the table of their ABLATION_METRICS;
    # cell(ablation, metric) -> str
    cols = [k for k in ABLATION_METRICS if any(k in ab["metrics"] for ab in ablations)]
    rows = [[ab["name"], ",".join(ab["towers"]), "all" if ab["heads"] is None else ",".join(map(str, ab["heads"]))]
            + [cell(ab, k) for k in cols] for ab in ablations]
    return format_table(["ablation", "towers", "heads"] + [k.replace("val_", "").replace("_pair", "")
                                                           for k in cols], rows)


ABLATIONS_TITLE = ("\nablations (metrics recomputed with the terms removed before softmax; VP: value "
                   "path without its position part)")


def format_report(res: dict) -> str:
    """One model's `analyze` report as text tables."""
    out = []
    if "checkpoint" in res:
        out.append(f"checkpoint {res['checkpoint']} (step {res['step']})")
    m = res["model"]
    out.append(f"model: D={m['d_model']} H={m['n_heads']} Dh={m['d_head']} vision_layers={m['vision_layers']} "
               f"text_layers={m['text_layers']} layernorm={m['layernorm']} mlp={m['mlp']}")
    for tower in TOWERS:
        for e in res[tower]:
            out.append(f"sum check {tower} layer {e['layer']}: max |sum of terms - hook_attn_scores| = "
                       f"{e['sum_max_abs_err']:.1e}")
    for e in res["vision"]:
        out.append(f"\nvision layer {e['layer']}: CLS-row terms. slope / right-left of the label-averaged "
                   f"curve over pixels; std_ratio, var_share over the pixel keys of {e['n_pair_images']} "
                   f"two-object images")
        rows = []
        for h in e["heads"]:
            for t in e["terms"]:
                s = h["terms"][t]
                rows.append([str(h["head"]), t, fmt(s["slope"], "+.3f"), fmt(s["right_left"], "+.3f"),
                             fmt(s["std_ratio"]), fmt(s["var_share"], "+.3f")])
        out.append(format_table(["head", "term", "slope", "right-left", "std_ratio", "var_share"], rows))
    out.append("\nhead classes (pos_var: score variance across positions, label fixed; label_var: "
               "across labels, position fixed)")
    rows = []
    for tower in TOWERS:
        for e in res[tower]:
            for h in e["heads"]:
                rows.append([tower, str(e["layer"]), str(h["head"]), fmt(h["pos_var"], ".4g"),
                             fmt(h["label_var"], ".4g"), fmt(h["pos_frac"]), h["class"]])
    out.append(format_table(["tower", "layer", "head", "pos_var", "label_var", "pos_frac", "class"], rows))
    out.append("\ntext: EOT attention to the first- vs second-mentioned label (two-object captions)")
    rows = []
    for e in res["text"]:
        for form, stats in e["eot_attention"].items():
            for s in stats:
                rows.append([str(e["layer"]), form, str(s["head"]), fmt(s["att_first"]), fmt(s["att_second"]),
                             fmt(s["first_wins"]), fmt(s.get("heldout_att_first")),
                             fmt(s.get("heldout_att_second"))])
    out.append(format_table(["layer", "form", "head", "att_first", "att_second", "first_wins",
                             "held_first", "held_second"], rows))
    a = res["alignment"]
    out.append(f"\nalignment: orthogonal Procrustes fitted on seen labels {a['seen_labels']}, "
               f"tested on held-out {a['heldout_labels']}")
    keys = ["fit_cos", "heldout_cos", "heldout_cos_identity", "heldout_cos_other", "heldout_top1",
            "heldout_top1_identity"]
    out.append(format_table(["source"] + keys, [[src] + [fmt(a[src][k]) for k in keys]
                                                for src in ("features", "embeddings")]))
    out.append(ABLATIONS_TITLE)
    out.append(ablation_table(res["ablations"], lambda ab, k: fmt(ab["metrics"].get(k))))
    return "\n".join(out)


def format_aggregate(agg: dict) -> str:
    """The aggregate_reports dict as text tables of mean±std over the runs."""
    out = [f"{agg['n_runs']} runs: mean±std over runs (sample std, ddof=1)",
           format_table(["run", "checkpoint", "step"],
                        [[str(i), r["checkpoint"], str(r["step"])] for i, r in enumerate(agg["runs"])])]
    out.append(ABLATIONS_TITLE)
    out.append(ablation_table(agg["ablations"],
                              lambda ab, k: plus_minus(ab["metrics"][k]) if k in ab["metrics"] else "-"))
    specs = dict(zip(CLS_STATS, ("+.3f", "+.3f", ".3f", "+.3f")))
    for e in agg["vision"]:
        out.append(f"\nvision layer {e['layer']}: CLS-row terms per head, then the mean and the max over "
                   "the heads of each run (heads are not matched across runs)")
        rows = []
        for t in e["terms"]:
            per_head = [(str(h["head"]), h["terms"][t]) for h in e["heads"]]
            for label, stats in per_head + [("mean", e["head_mean"][t]), ("max", e["head_max"][t])]:
                rows.append([t, label] + [plus_minus(stats[q], specs[q]) for q in CLS_STATS])
        out.append(format_table(["term", "head", "slope", "right-left", "std_ratio", "var_share"], rows))
    out.append("\nrelational heads per run (head classes as in a single report)")
    rows = [[tower, str(e["layer"]), plus_minus(e["n_relational"], ".2f"),
             " ".join(str(v) for v in e["n_relational"]["values"])]
            for tower in TOWERS for e in agg[tower]]
    out.append(format_table(["tower", "layer", "relational", "per run"], rows))
    return "\n".join(out)
