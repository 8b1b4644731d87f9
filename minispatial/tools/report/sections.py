"""The parts of the report page, each an HTML string (html.py), from the loaded runs (`Run`):
the runs and their config, the training curves, the metric table, the ablation table and the
analysis figures. With several runs every number is the mean ± 95% t-interval over runs
(stats.py), and the curves of every run are overlaid."""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from minispatial.analysis.plots import save_aggregate_plots, save_plots
from minispatial.analysis.report import ABLATION_METRICS, fmt, format_aggregate, format_report
from minispatial.data import SPLIT_NAMES
from minispatial.evaluate import METRICS
from minispatial.reporting import pyplot
from minispatial.tools.report import html
from minispatial.tools.report.stats import fmt_ci, mean_ci

CURVES = (("loss", "loss", True), ("logit_scale", "logit scale exp(τ)", False),
          ("lr", "learning rate", False), ("grad_norm", "gradient norm", True))   # key, title, log y
# (log y: when the values span more than a factor 10)
HEADLINE = "val_unseen_pair.lr_acc"          # the paper's question (docs/metrics.md)
CONFIG_SECTIONS = ("data", "model", "train")


@dataclass
class Run:
    """One run directory, loaded: its config (config.json), checkpoint, summary.json, the records
    of metrics.jsonl, and the analysis of its checkpoint (measure.analyze)."""
    path: Path
    config: dict
    run_cfg: object
    params: dict
    step: int
    summary: dict
    log: list[dict]
    report: dict = field(default_factory=dict)
    label: str = ""


def run_labels(paths: list[Path]) -> list[str]:
    """Short names of the runs: the directory names, or the whole paths when names repeat."""
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def num(metric: str, v) -> str:
    # a summary.json value as the metric tables print it (evaluate.format_table): n and step as
    # integers, other numbers to 3 decimals, "-" when undefined
    if isinstance(v, str):
        return v
    if metric in ("n", "step") and v is not None and math.isfinite(v):
        return str(int(v))
    return fmt(v, ".3f")


def png_of(fig) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# the runs and their config

def runs_section(runs: list[Run]) -> str:
    rows = [[r.label, str(r.path), r.config.get("data", {}).get("seed", "-"),
             r.config.get("train", {}).get("seed", "-"), r.step, r.summary.get("backend", "-"),
             r.summary.get("dtype", "-"), num(HEADLINE, r.summary.get(HEADLINE))] for r in runs]
    return html.section("Runs", html.table(["run", "directory", "data.seed", "train.seed", "step", "backend",
                                            "dtype", HEADLINE], rows, id="runs",
                                           numeric=[False, False, True, True, True, False, False, True]))


def config_value(v) -> str:
    # as config.json writes it (true, null, 0.001), strings without quotes
    return v if isinstance(v, str) else json.dumps(v)


def config_section(runs: list[Run]) -> str:
    """One table per config section (data, model, train): field | value; a value that differs
    between runs lists every run's value, in run order, and is highlighted."""
    tables = []
    for sec in CONFIG_SECTIONS:
        keys = list(dict.fromkeys(k for r in runs for k in r.config.get(sec, {})))
        rows, differs = [], []
        for k in keys:
            vals = [config_value(r.config.get(sec, {}).get(k, "-")) for r in runs]
            same = len(set(vals)) == 1
            rows.append([k, vals[0] if same else " / ".join(vals)])
            differs.append(not same)
        tables.append(f"<h3>{html.esc(sec)}</h3>" + html.table(
            ["field", "value"], rows, id=f"config-{sec}", numeric=[False, False],
            cell_class=lambda r, c, d=differs: "diff" if d[r] and c == 1 else None))
    extra = [k for r in runs for k in r.config if k not in CONFIG_SECTIONS]
    text = "config.json of the run" if len(runs) == 1 else \
        "config.json of every run; highlighted: values that differ between runs (in run order)"
    return html.section("Config", html.note(text), html.row(*tables),
                        html.note(f"other keys: {', '.join(sorted(set(extra)))}") if extra else "")


# --------------------------------------------------------------------------------------------
# training curves

def curves_png(runs: list[Run]) -> bytes:
    """Loss, logit scale, learning rate and gradient norm against the step (metrics.jsonl), every
    run overlaid -> PNG bytes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.6 * len(CURVES), 3.0))
    for ax, (key, title, logy) in zip(axes, CURVES):
        every = []
        for i, r in enumerate(runs):
            pts = [(rec["step"], rec[key]) for rec in r.log
                   if isinstance(rec.get(key), (int, float)) and math.isfinite(rec[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, lw=1.2, color=f"C{i % 10}", label=r.label)
                every += ys
        if logy and every and min(every) > 0 and max(every) > 10 * min(every):   # a wide range only
            ax.set_yscale("log")
            title += " (log scale)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    if 1 < len(runs) <= 12:
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return png_of(fig)


def curves_section(runs: list[Run]) -> str:
    if not any(r.log for r in runs):
        return html.section("Training curves", html.note("no metrics.jsonl records"))
    missing = [r.label for r in runs if not r.log]
    what = "metrics.jsonl" + ("" if len(runs) == 1 else ", every run overlaid")
    return html.section("Training curves",
                        html.figure(curves_png(runs), f"loss, logit scale, lr and gradient norm against the "
                                                      f"step ({what})"),
                        html.note(f"no metrics.jsonl records: {', '.join(missing)}") if missing else "")


# --------------------------------------------------------------------------------------------
# metric table (summary.json)

def split_metrics(summary: dict) -> tuple[dict, dict]:
    """summary.json -> ({metric: {split: value}}, {other key: value}) (evaluate.format_table)."""
    per, other = {}, {}
    for k, v in summary.items():
        split, _, metric = k.partition(".")
        if split in SPLIT_NAMES and metric:
            per.setdefault(metric, {})[split] = v
        else:
            other[k] = v
    return per, other


def metrics_section(runs: list[Run]) -> str:
    """summary.json as a table, one row per metric and one column per split; with several runs
    mean ± 95% CI over runs. The other keys (step, backend, dtype, logit_scale) below it."""
    pers = [split_metrics(r.summary) for r in runs]
    metrics = list(dict.fromkeys(m for per, _ in pers for m in per))
    metrics = [m for m in METRICS if m in metrics] + sorted(m for m in metrics if m not in METRICS)
    splits = [s for s in SPLIT_NAMES if any(s in per.get(m, {}) for per, _ in pers for m in metrics)]
    many = len(runs) > 1

    def cell(m, s):
        vals = [per.get(m, {}).get(s) for per, _ in pers]
        if not many:
            return num(m, vals[0])
        if m == "n":                                   # a count: every run's (one value when equal)
            return " / ".join(dict.fromkeys(num(m, v) for v in vals))
        return fmt_ci(mean_ci(vals))

    rows = [[m] + [cell(m, s) for s in splits] for m in metrics]
    table = html.table(["metric", *splits], rows, id="metrics",
                       cell_class=lambda r, c: "headline" if metrics[r] == "lr_acc" and
                       c and splits[c - 1] == "val_unseen_pair" else None)
    others = list(dict.fromkeys(k for _, o in pers for k in o))
    orows = []
    for k in others:
        vals = [o.get(k) for _, o in pers]
        if many and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and k != "step":
            orows.append([k, fmt_ci(mean_ci(vals))])
        else:
            distinct = list(dict.fromkeys(num(k, v) for v in vals))
            orows.append([k, " / ".join(distinct)])
    text = ("summary.json: every evaluation metric per split (docs/metrics.md); headline: "
            "val_unseen_pair.lr_acc, left-right discrimination on held-out pairs (chance 0.5)")
    if many:
        text += (f". Mean ± 95% confidence interval over {len(runs)} runs (Student t, "
                 f"t(0.975, {len(runs) - 1}) · s/√n)")
    return html.section("Metrics", html.note(text), table,
                        html.table(["key", "value"], orows, id="summary-other", numeric=[False, True]))


# --------------------------------------------------------------------------------------------
# the analysis: ablation table and figures

def ablation_section(runs: list[Run], agg: dict | None) -> str:
    """The ablation table (analysis/report.py's columns): metrics recomputed with score terms
    removed; several runs: mean ± 95% CI over runs."""
    abls = runs[0].report["ablations"] if agg is None else agg["ablations"]
    cols = [k for k in ABLATION_METRICS if any(k in ab["metrics"] for ab in abls)]
    rows = []
    for ab in abls:
        where = [",".join(ab["towers"]), "all" if ab["heads"] is None else ",".join(map(str, ab["heads"]))]
        if agg is None:
            cells = [num(k, ab["metrics"].get(k)) for k in cols]
        else:
            cells = [fmt_ci(mean_ci(ab["metrics"][k]["values"])) if k in ab["metrics"] else "-" for k in cols]
        rows.append([ab["name"], *where, *cells])
    header = ["ablation", "towers", "heads"] + [k.replace("val_", "").replace("_pair", "") for k in cols]
    text = ("Metrics recomputed with the named score terms removed before the softmax (no retraining; "
            "VP: the value path without its position part; docs/analysis.md)")
    if agg is not None:
        text += f". Mean ± 95% confidence interval over {agg['n_runs']} runs"
    return html.section("Ablations", html.note(text),
                        html.table(header, rows, id="ablations", numeric=[False] * 3 + [True] * len(cols)))


def paper_figures(runs: list[Run], out_dir: Path) -> list[Path]:
    """analysis/figures.py's `save_paper_figures`, when that module exists (it is optional)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("minispatial.analysis.figures") is None:
        return []
    mod = importlib.import_module("minispatial.analysis.figures")
    if not hasattr(mod, "save_paper_figures"):
        return []
    return [Path(p) for p in mod.save_paper_figures([(r.run_cfg, r.params, r.report) for r in runs], out_dir)]


def figures_section(runs: list[Run], agg: dict | None) -> str:
    """The analysis figures as embedded PNGs: one run's (plots.save_plots), or the aggregate ones
    (plots.save_aggregate_plots), then the paper figures (analysis/figures.py) when available;
    and the analysis text tables, collapsed."""
    with tempfile.TemporaryDirectory(prefix="minispatial-report-") as tmp:
        tmp = Path(tmp)
        files = [Path(p) for p in (save_plots(runs[0].report, tmp / "analysis") if agg is None
                                   else save_aggregate_plots(agg, tmp / "analysis"))]
        paper = paper_figures(runs, tmp / "paper")
        figs = [html.figure(p.read_bytes(), p.stem.replace("_", " ")) for p in files if p.suffix == ".png"]
        pfigs = [html.figure(p.read_bytes(), p.stem.replace("_", " ")) for p in paper if p.suffix == ".png"]
    text = format_report(runs[0].report) if agg is None else format_aggregate(agg)
    what = ("plots.save_plots: the mean score terms per head (query x key) and the vision CLS-row "
            "curves" if agg is None else
            f"plots.save_aggregate_plots: mean ± std over {agg['n_runs']} runs")
    parts = [html.note(f"measure.analyze of the checkpoint{'s' if agg else ''}; {what}"), *figs]
    if pfigs:
        parts += ["<h3>Paper figures</h3>", *pfigs]
    parts.append(html.details("the analysis as text tables (minispatial analyze)", text))
    return html.section("Analysis", *parts)
