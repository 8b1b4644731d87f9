"""Many runs: the mean ± std of `measure.analyze` reports over checkpoints (e.g. the seeds of a
sweep: `minispatial analyze SWEEP/runs/*`).

`aggregate_reports` takes the mean and sample standard deviation (ddof=1, reporting.py's
`mean_std`) over the runs of: every ablation's metrics; per vision layer, CLS-row term and head,
the slope, right_left, std_ratio, var_share and curve; the same four first reduced over the heads
of each run (`head_mean`, `head_max`: the signed maximum) and then averaged over runs; and the
number of relational heads per tower and layer. Heads are not matched across runs (head 0 of one
seed need not do what head 0 of another does), so the per-head rows are a record, and the head
mean and max are what compares between runs. Undefined values (NaN) are left out, `n` counts the
runs used, `values` keeps every run's value. All runs must share the model's shape (SHAPE_FIELDS)
and the list of ablations.
"""

from __future__ import annotations

import numpy as np

from minispatial.analysis.decompose import F64
from minispatial.reporting import clean_json, mean_std

CLS_STATS = ("slope", "right_left", "std_ratio", "var_share")     # per head and CLS-row term
SHAPE_FIELDS = ("n_heads", "vision_layers", "text_layers", "vision_ctx")


def check_same_shape(models: list[dict], names: list[str]) -> None:
    """ValueError unless the models (dataclasses.asdict of ModelConfig) agree on SHAPE_FIELDS."""
    for k in SHAPE_FIELDS:
        vals = [m[k] for m in models]
        if len(set(vals)) > 1:
            raise ValueError(f"cannot aggregate runs of different model shapes: model.{k} is "
                             + ", ".join(f"{v} in {n}" for v, n in zip(vals, names)))


def over_runs(values: list) -> dict:
    # per-run values (numbers, or equal-length lists; None = undefined) -> {"mean", "std", "n", "values"}
    """mean_std over the runs (NaN, i.e. null in the JSON, where undefined), and every run's
    value in run order."""
    return {**mean_std(values), "values": list(values)}


def over_heads(entry: dict, term: str, stat: str, reduce) -> float:
    # one run's vision layer entry -> reduce (np.mean, np.max) over heads of heads[h].terms[term][stat]
    return float(reduce(np.array([h["terms"][term][stat] for h in entry["heads"]], dtype=F64)))


def n_relational(entry: dict) -> int:
    # one run's layer entry (either tower) -> how many of its heads are classed relational
    return sum(h["class"] == "relational" for h in entry["heads"])


def aggregate_reports(reports: list[dict]) -> dict:
    """Mean ± std (ddof=1) over runs of `analyze` reports of models of one shape (module
    docstring): every ablation's metrics; per vision layer, for every CLS-row term, slope /
    right_left / std_ratio / var_share and the curve per head, and the per-run mean and max over
    heads of the four; the number of relational heads per tower and layer. JSON-serialisable.
    ValueError for no reports, different model shapes, or different lists of ablations."""
    if not reports:
        raise ValueError("aggregate_reports needs at least one report")
    names = [r.get("checkpoint", f"report {i}") for i, r in enumerate(reports)]
    check_same_shape([r["model"] for r in reports], names)
    keys = [[(a["name"], a["towers"], a["heads"]) for a in r["ablations"]] for r in reports]
    if any(k != keys[0] for k in keys):
        raise ValueError("cannot aggregate runs analysed with different ablations: "
                         + "; ".join(f"{n}: {[a[0] for a in k]}" for n, k in zip(names, keys)))
    agg = {"n_runs": len(reports),
           "runs": [{"checkpoint": n, "step": r.get("step")} for n, r in zip(names, reports)],
           "ablations": [], "vision": []}
    for i, first in enumerate(reports[0]["ablations"]):
        per_run = [r["ablations"][i]["metrics"] for r in reports]
        agg["ablations"].append({**{k: first[k] for k in ("name", "terms", "value_pos", "towers", "heads")},
                                 "metrics": {m: over_runs([run.get(m) for run in per_run])
                                             for m in first["metrics"]}})
    for l, first in enumerate(reports[0]["vision"]):
        per_run = [r["vision"][l] for r in reports]               # this layer, every run
        terms = first["terms"]
        heads = []
        for h in range(len(first["heads"])):
            stats = {t: {q: over_runs([e["heads"][h]["terms"][t][q] for e in per_run])
                         for q in (*CLS_STATS, "curve")} for t in terms}
            heads.append({"head": h, "terms": stats})
        agg["vision"].append({
            "layer": first["layer"], "terms": terms, "heads": heads,
            "head_mean": {t: {q: over_runs([over_heads(e, t, q, np.mean) for e in per_run]) for q in CLS_STATS}
                          for t in terms},
            "head_max": {t: {q: over_runs([over_heads(e, t, q, np.max) for e in per_run]) for q in CLS_STATS}
                         for t in terms},
            "n_relational": over_runs([n_relational(e) for e in per_run])})
    agg["text"] = [{"layer": first["layer"],
                    "n_relational": over_runs([n_relational(r["text"][l]) for r in reports])}
                   for l, first in enumerate(reports[0]["text"])]
    return clean_json(agg)
