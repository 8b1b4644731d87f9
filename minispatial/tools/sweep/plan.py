"""A sweep's plan: the command line's grid, seeds and fixed settings -> the runs, each validated.

    --grid n_pair=5,10 --grid lr=1e-3,3e-4   parse_grid   -> {"n_pair": ["5", "10"], "lr": [...]}
    --seeds 0-4                              parse_seeds  -> [0, 1, 2, 3, 4]
    --steps 1500  (or --set steps=1500)      fixed_settings -> {"steps": "1500"}
    plan_runs: the Cartesian product of the grid values times the seeds; validate: each run's
    RunConfig (config.make_config) and memory check; check_existing: finished runs match.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from minispatial import config as config_mod
from minispatial.model import check_run_memory


@dataclass(frozen=True)
class Run:
    name: str
    grid: dict[str, str]          # grid key -> value (as typed)
    seed: int
    overrides: dict[str, str]     # everything passed to `minispatial train`: fixed, grid, seed


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]; '0-2,7' -> [0, 1, 2, 7]."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--seeds {text!r} is invalid: use a range '0-4' or a list '0,2,5' "
                             "of integers >= 0")
        lo, hi = int(m[1]), int(m[2]) if m[2] is not None else int(m[1])
        if hi < lo:
            raise ValueError(f"--seeds {text!r} is invalid: the range {part} is empty")
        seeds.extend(range(lo, hi + 1))
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"--seeds {text!r} repeats seed(s) {dup}")
    return seeds


def _norm_key(key: str) -> str:
    key = key.strip().replace("-", "_")
    if key not in config_mod.all_keys():
        raise ValueError(f"unknown config field {key!r}; run `minispatial train --help` for the list")
    return key


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['n_pair=5,10', 'lr=1e-3,3e-4'] -> {'n_pair': ['5', '10'], 'lr': ['1e-3', '3e-4']}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, vals = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--grid {item!r} is invalid: use KEY=V1,V2,...")
        key = _norm_key(key)
        values = [v.strip() for v in vals.split(",")]
        if any(v == "" for v in values):
            raise ValueError(f"--grid {item!r} has an empty value")
        if len(set(values)) != len(values):
            raise ValueError(f"--grid {item!r} repeats a value")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice")
        grid[key] = values
    return grid


def parse_sets(items: list[str]) -> dict[str, str]:
    """['steps=5', 'lr=1e-3'] -> {'steps': '5', 'lr': '1e-3'} (the `--set KEY=VALUE` spelling)."""
    return fixed_settings([("--set", item) for item in items])


def fixed_settings(items: list[tuple[str, str | None]]) -> dict[str, str]:
    """The config fields fixed for every run, in the order given, from (flag, text) pairs in
    either spelling: ("--set", "steps=5") or ("--steps", "5"). ValueError for an unknown field,
    an empty value, or a field given twice."""
    sets: dict[str, str] = {}
    for flag, text in items:
        if flag == "--set":
            key, sep, value = text.partition("=")
            if not sep or not key.strip() or value.strip() == "":
                raise ValueError(f"--set {text!r} is invalid: use KEY=VALUE")
            key = _norm_key(key)
        else:
            try:
                key = _norm_key(flag[2:])
            except ValueError:
                raise ValueError(f"unknown option or config field {flag}; see `minispatial sweep "
                                 "--help` for the sweep's options and `minispatial train --help` "
                                 "for the config fields") from None
            if text is None:
                raise ValueError(f"{flag} needs a value")
            value = text
            if value.strip() == "":
                raise ValueError(f"{flag} has an empty value")
        if key in sets:
            raise ValueError(f"config field {key} is given twice")
        sets[key] = value.strip()
    return sets


def check_no_overlap(grid: dict, sets: dict) -> None:
    """No two of --grid, the fixed settings and --seeds may set the same config field."""
    keys = config_mod.all_keys()
    owner: dict[str, str] = {}
    given = [("--seeds", "seed")] + [(f"--grid {k}", k) for k in grid] + [(f"--{k}", k) for k in sets]
    for flag, key in given:
        for dotted in keys[key]:
            if dotted in owner:
                hint = "; seeds are given with --seeds" if dotted.endswith(".seed") else ""
                raise ValueError(f"{owner[dotted]} and {flag} both set {dotted}{hint}")
            owner[dotted] = flag


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def run_name(grid_values: dict[str, str], seed: int) -> str:
    """{'n_pair': '5'}, 0 -> 'n_pair=5__seed=0'."""
    return "__".join([_safe(f"{k}={v}") for k, v in grid_values.items()] + [f"seed={seed}"])


def plan_runs(grid: dict[str, list[str]], seeds: list[int], sets: dict[str, str]) -> list[Run]:
    """The Cartesian product of the grid values (in the order given) times the seeds (innermost)."""
    runs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        for seed in seeds:
            runs.append(Run(run_name(point, seed), point, seed, {**sets, **point, "seed": str(seed)}))
    return runs


def validate(runs: list[Run], preset: str) -> dict[str, config_mod.RunConfig]:
    """Build every run's RunConfig; ValueError naming the first bad run."""
    cfgs = {}
    for run in runs:
        try:
            cfg = config_mod.make_config(run.overrides, preset=preset)
            check_run_memory(cfg.data, cfg.model, cfg.train.batch_size)
            cfgs[run.name] = cfg
        except ValueError as e:
            raise ValueError(f"run {run.name}: {e}") from None
    return cfgs


def check_existing(runs: list[Run], cfgs: dict, runs_dir: Path) -> None:
    """A finished run that will be skipped must have been trained with the config asked for."""
    for run in runs:
        d = runs_dir / run.name
        if not (d / "summary.json").is_file():
            continue
        try:
            got = config_mod.from_dict(json.loads((d / "config.json").read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"run {run.name} is finished but its config.json cannot be read ({e}); "
                             f"remove {d} or use another --out") from None
        if got != cfgs[run.name]:
            want, have = config_mod.to_dict(cfgs[run.name]), config_mod.to_dict(got)
            diff = [f"{s}.{k}: {have[s][k]!r} (want {want[s][k]!r})"
                    for s in want for k in want[s] if have[s].get(k) != want[s][k]]
            raise ValueError(f"{d} was trained with another config ({'; '.join(diff[:3])}); "
                             f"use another --out for a different sweep")
