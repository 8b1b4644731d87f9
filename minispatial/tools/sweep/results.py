"""A sweep's results: the run directories and sweep.json's history read back, results.csv and
summary.csv written.

    read_summary(run_dir)      a run's summary.json, flattened ({"val_single.i2t_acc": ...})
    read_history(out)          every earlier invocation recorded in sweep.json
    earlier_runs(...)          the finished runs of earlier invocations (they stay in the CSVs)
    result_keys(...)           the CSV's grid columns: the union of every invocation's grid keys,
                               then any other config field that differs between runs
    write_tables(...)          results.csv (one row per run) and summary.csv (mean and sample std
                               over seeds per grid point, `reporting.mean_std`)
Every file is replaced atomically (a temporary file + rename): a failed write leaves the old one
whole, and the OSError names the file.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
from pathlib import Path

from minispatial import config as config_mod
from minispatial.data import SPLIT_NAMES
from minispatial.evaluate import METRICS
from minispatial.reporting import mean_std
from minispatial.tools.sweep.plan import Run, plan_runs

ROW_FIELDS = ("run", "status", "error")      # then the grid keys, "seed", "wall_s", the summary
INVOCATION_KEYS = ("command", "preset", "grid", "seeds", "set", "workers", "runs")


# --------------------------------------------------------------------------------------------
# values

def to_float(v) -> float | None:
    """A number (or numeric string; ''/None -> NaN) as float, or None if it is not numeric."""
    if v is None or v == "":
        return math.nan
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def is_finite(v) -> bool:
    x = to_float(v)
    return x is not None and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# reading: a run's files, the history of invocations

def read_summary(run_dir: Path) -> dict | None:
    """The scalars of run_dir/summary.json, nested dicts flattened with dots; None if absent."""
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    flat: dict[str, object] = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif v is None or isinstance(v, (int, float, str, bool)):
                flat[prefix + k] = math.nan if v is None else v
    walk("", data)
    return flat


def read_record(out: Path, name: str) -> dict:
    """A finished run's record from logs/<name>.json (status ok, no wall time if it is missing)."""
    try:
        return json.loads((out / "logs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {"status": "ok", "wall_s": math.nan, "error": ""}


def read_history(out: Path) -> list[dict]:
    """Every earlier invocation recorded in DIR/sweep.json, oldest first ([] if there is none).
    A sweep.json written before the history was kept is its only (last) invocation."""
    path = out / "sweep.json"
    if not path.exists():
        return []
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        history = info.get("invocations")
        if history is None:
            history = [{k: info[k] for k in INVOCATION_KEYS if k in info}]
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("'invocations' is not a list of objects")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); it records the earlier invocations of this "
                         "sweep: repair or remove it, or use another --out") from None
    return history


def earlier_runs(out: Path, runs: list[Run], history: list[dict]) -> list[tuple[Run, config_mod.RunConfig]]:
    """The finished runs in DIR/runs (a summary.json) that this invocation does not plan, with
    their config (from config.json): those of earlier invocations in the order they planned them
    (with their grid values as typed), then any other run directory by name. ValueError if one
    has no readable config.json (its settings, hence its row, are unknown)."""
    planned = {r.name for r in runs}
    known: dict[str, Run] = {}
    for inv in history:
        try:
            inv_runs = plan_runs(dict(inv.get("grid") or {}), [int(x) for x in inv.get("seeds") or []],
                                 dict(inv.get("set") or {}))
        except (TypeError, ValueError, AttributeError):
            continue                    # a hand-edited record: its runs are found by directory
        for r in inv_runs:
            known.setdefault(r.name, r)
    runs_dir = out / "runs"
    finished = {d.name for d in runs_dir.iterdir() if (d / "summary.json").is_file()} \
        if runs_dir.is_dir() else set()
    names = [n for n in known if n in finished and n not in planned]
    names += sorted(finished - planned - set(known))
    found = []
    for name in names:
        path = runs_dir / name / "config.json"
        try:
            cfg = config_mod.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} cannot be read ({e}): results.csv lists every finished run in "
                             f"{runs_dir} with its settings, which come from its config.json; "
                             f"remove {runs_dir / name} or use another --out") from None
        found.append((known.get(name) or Run(name, {}, cfg.train.seed, {}), cfg))
    return found


# --------------------------------------------------------------------------------------------
# rows and columns

def _summary_key_order(key: str):
    split, _, metric = key.partition(".")
    if key == "step":
        return (0, 0, 0, key)
    if split in SPLIT_NAMES and metric:
        m = METRICS.index(metric) if metric in METRICS else len(METRICS)
        return (1, SPLIT_NAMES.index(split), m, key)
    if key == "logit_scale":
        return (2, 0, 0, key)
    return (3, 0, 0, key)


def result_columns(grid_keys: list[str], rows: list[dict]) -> list[str]:
    """run, status, error, the grid keys, seed, wall_s, then every summary field (stable order)."""
    fixed = [*ROW_FIELDS, *grid_keys, "seed", "wall_s"]
    extra = {k for row in rows for k in row if k not in fixed}
    return fixed + sorted(extra, key=_summary_key_order)


def make_row(run: Run, record: dict | None, summary: dict | None) -> dict:
    """One results.csv row: the run's name, status, error, grid values, seed, wall time and
    (when it finished) its summary."""
    row = {"run": run.name, "status": "not_run", "error": "", **run.grid, "seed": run.seed,
           "wall_s": math.nan}
    if record is not None:
        row.update(status=record["status"], error=record.get("error", ""),
                   wall_s=record.get("wall_s", math.nan))
    if summary is not None:
        row["status"], row["error"] = "ok", ""
        row.update({k: v for k, v in summary.items() if k not in row})
    return row


def _field_default(dotted: str):
    sec, name = dotted.split(".")
    return next(f.default for f in dataclasses.fields(config_mod.SECTIONS[sec]) if f.name == name)


def config_text(cfg: config_mod.RunConfig, key: str, spellings=()) -> str:
    """The value of config field `key` (flat or dotted) in cfg as text: the first of `spellings`
    (values typed in a grid) that means the same value, else a canonical spelling."""
    dotted = config_mod.all_keys()[key][0]
    sec, name = dotted.split(".")
    value = getattr(getattr(cfg, sec), name)
    for text in spellings:
        try:
            if config_mod.parse_value(dotted, text, _field_default(dotted)) == value:
                return text
        except ValueError:
            pass
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def result_keys(grid: dict[str, list[str]], history: list[dict], names: set[str],
                cfgs: list[config_mod.RunConfig]) -> tuple[dict[str, list[str]], list[str]]:
    """-> (the union of the grid keys of this invocation and of every earlier one that planned a
    run among `names` (the rows), each key with the values typed for it; the other config fields
    whose value differs between the runs of `cfgs`). For a single invocation: (its grid, []).
    Seeds are the `seed` column."""
    keys = config_mod.all_keys()
    union = {k: list(v) for k, v in grid.items()}
    for inv in history:
        planned = inv.get("runs")
        if not isinstance(planned, list) or not names.intersection(map(str, planned)):
            continue
        g = inv.get("grid")
        for k, vals in (g.items() if isinstance(g, dict) else ()):
            if k in keys and isinstance(vals, list):
                spelled = union.setdefault(k, [])
                spelled.extend(str(v) for v in vals if str(v) not in spelled)
    covered = {d for k in union for d in keys[k]} | {"train.seed"}
    dicts = [config_mod.to_dict(c) for c in cfgs]
    if all(d["data"]["seed"] == d["train"]["seed"] for d in dicts):
        covered.add("data.seed")
    extras = []
    for sec in config_mod.SECTIONS:
        for name in (dicts[0][sec] if dicts else ()):
            dotted = f"{sec}.{name}"
            if dotted in covered or (sec == "model" and name in config_mod.DERIVED_MODEL_FIELDS):
                continue
            if len({json.dumps(d[sec][name]) for d in dicts}) > 1:
                extras.append(name if keys.get(name) == [dotted] else dotted)
    return union, extras


def aggregate(rows: list[dict], by: list[str], metrics: list[str] | None = None) -> list[dict]:
    """Group rows by the values of `by` (first-seen order); per group: the `by` values, n_runs,
    n_ok and, for each metric, "{metric}.mean" and "{metric}.std" (ddof=1) over the rows with
    status "ok" (all rows if there is no status), ignoring NaN. `metrics` defaults to every column
    that is numeric in some row, except run/status/error/seed and the `by` keys."""
    skip = set(ROW_FIELDS) | {"seed"} | set(by)
    if metrics is None:
        metrics = []
        for row in rows:
            for k, v in row.items():
                if k not in skip and k not in metrics and to_float(v) is not None:
                    metrics.append(k)
        metrics = [m for m in metrics if all(to_float(r.get(m)) is not None for r in rows)]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if r.get("status", "ok") == "ok"]
        agg: dict[str, object] = dict(zip(by, key))
        agg["n_runs"], agg["n_ok"] = len(members), len(ok)
        for m in metrics:
            stat = mean_std([to_float(r.get(m)) for r in ok])
            agg[f"{m}.mean"], agg[f"{m}.std"] = stat["mean"], stat["std"]
        out.append(agg)
    return out


# --------------------------------------------------------------------------------------------
# writing

def write_atomic(path: Path, text: str) -> None:
    """Replace path with text: a temporary file in the same directory, then renamed over (a failed
    write leaves the old file whole and no temporary file); OSError names `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Replace path atomically (temporary file + rename): a failed write (disk full) leaves the
    previous file whole and no temporary file; the OSError then names `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: row.get(k, "") for k in columns})
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def write_tables(out: Path, entries: list[tuple[Run, config_mod.RunConfig]], union: dict[str, list[str]],
                 extras: list[str], records: dict) -> list[dict]:
    """results.csv and summary.csv over `entries` (this invocation's runs, then the finished runs
    of earlier ones), grid columns `union` then `extras`; -> the rows. OSError names the file."""
    rows = []
    for run, cfg in entries:
        values = {k: run.grid[k] if k in run.grid else config_text(cfg, k, union[k]) for k in union}
        values.update({c: config_text(cfg, c) for c in extras})
        record = records.get(run.name)
        if record is None and (out / "runs" / run.name / "summary.json").is_file():
            record = read_record(out, run.name)
        rows.append(make_row(dataclasses.replace(run, grid=values), record,
                             read_summary(out / "runs" / run.name)))
    keys = [*union, *extras]
    columns = result_columns(keys, rows)
    metrics = [c for c in columns[len(ROW_FIELDS) + len(keys) + 1:]     # wall_s and the summary
               if all(to_float(r.get(c)) is not None for r in rows)]
    summary = aggregate(rows, keys, metrics)
    write_csv(out / "results.csv", rows, columns)
    write_csv(out / "summary.csv", summary, list(summary[0]) if summary else [])
    return rows
