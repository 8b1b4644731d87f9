"""Statistics of paired contrasts over seeds, from a sweep's results.csv.

    python -m minispatial.tools.contrast RESULTS.csv --metric val_unseen_pair.lr_acc \\
        --contrast n_pair=15,5 [--by unseen_mode,...] [--where key=value ...] [--markdown]
    python -m minispatial.tools.contrast RESULTS.csv --metric train.lr_acc \\
        --contrast text_layers=1 --vs_chance 0.5          # one level: one-sample summary

Paired mode (`--contrast KEY=A,B`): for every combination of the `--by` keys (default: every grid
column of the CSV, i.e. the columns between `error` and `seed`, other than KEY), the runs with
KEY=A and KEY=B are paired by seed. Only rows with status "ok" and a finite metric count; a seed
present at one level only is dropped (column `unpaired`); a cell with no value at either level
is left out. Per cell: n pairs, level A and level B
(mean ± sample std over the paired seeds), the paired difference A−B (mean and 95% t-interval over
the per-seed differences, `reporting.mean_ci`), how many seeds go each way (A>B / A<B / ties),
and the two-sided sign-flip permutation p-value of the mean difference: exact (all 2^n sign
assignments) for n <= 20, else Monte-Carlo with 2^16 draws from a fixed seed (said in the output).

One-sample mode (`--contrast KEY=A`): per cell, mean ± std, the 95% t-interval and, with
`--vs_chance C`, whether the interval excludes C ("above" / "below" / "includes") and the
sign-flip p-value of the mean of (value − C).

`--where key=value` (repeatable) keeps only the rows with that value (e.g. a grid column left out
of `--by`). Two ok runs of one level and one seed in one cell make the pairing ambiguous: an
error naming the columns that tell them apart (add them to `--by` or to `--where`).

Pure functions for import: paired_stats(a, b), sign_flip_p(diffs), one_sample(values, chance).
Bad input (unknown column, absent level, ...) -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

from minispatial.reporting import format_table, mean_ci, mean_std

PROG = "python -m minispatial.tools.contrast"
EXACT_MAX_N = 20            # enumerate all 2^n sign assignments up to this many pairs
MC_DRAWS = 2 ** 16          # Monte-Carlo draws beyond it
MC_SEED = 0


# --------------------------------------------------------------------------------------------
# statistics (pure)

def _floats(values) -> list[float]:
    return [float(v) for v in values]


def sign_flip_method(n: int) -> str:
    """"exact" for n <= EXACT_MAX_N pairs, else "monte_carlo"."""
    return "exact" if n <= EXACT_MAX_N else "monte_carlo"


def sign_flip_p(diffs) -> float:
    """Two-sided sign-flip permutation p-value of the mean of `diffs` (finite numbers) under the
    null that each difference is symmetric about 0: the fraction of sign assignments whose
    |mean| is >= the observed |mean| (with a relative tolerance of 1e-9 for float rounding).

    n <= 20: exact, over all 2^n assignments (the observed one included; zeros count as both
    signs). n > 20: Monte-Carlo, 2^16 random assignments from numpy's default_rng(0), p =
    (1 + hits) / (1 + 2^16). NaN for no differences."""
    d = np.asarray(_floats(diffs), dtype=np.float64)
    n = d.size
    if n == 0:
        return math.nan
    if not np.all(np.isfinite(d)):
        raise ValueError("sign_flip_p: differences must be finite")
    obs = abs(float(d.sum()))
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if n <= EXACT_MAX_N:
        sums = np.zeros(1)
        for x in d:                               # all 2^n signed sums, 2^n floats in the end
            sums = np.concatenate((sums + x, sums - x))
        return float(np.count_nonzero(np.abs(sums) >= obs - tol)) / sums.size
    rng = np.random.default_rng(MC_SEED)
    hits, left = 0, MC_DRAWS
    while left:
        k = min(left, 4096)
        signs = rng.integers(0, 2, size=(k, n)) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= obs - tol))
        left -= k
    return (1 + hits) / (1 + MC_DRAWS)


def paired_stats(a: list, b: list) -> dict:
    """Statistics of paired values a[i], b[i] (one pair per seed; equal lengths, all finite).

    -> {"n", "mean_a", "std_a", "mean_b", "std_b" (sample std, ddof=1),
        "diff_mean", "diff_std", "ci" (half-width of the 95% t-interval of the mean of a−b,
        reporting.mean_ci), "ci_lo", "ci_hi", "n_pos" (a>b), "n_neg" (a<b), "n_tie" (a==b),
        "p" (sign_flip_p of the differences), "p_method" ("exact" / "monte_carlo")}.
    NaN where undefined (std and CI below two pairs, everything with none)."""
    a, b = _floats(a), _floats(b)
    if len(a) != len(b):
        raise ValueError(f"paired_stats: {len(a)} values against {len(b)}; pairs need equal lengths")
    if not all(math.isfinite(x) for x in a + b):
        raise ValueError("paired_stats: values must be finite")
    diffs = [x - y for x, y in zip(a, b)]
    sa, sb, sd, cd = mean_std(a), mean_std(b), mean_std(diffs), mean_ci(diffs)
    return {"n": len(diffs), "mean_a": sa["mean"], "std_a": sa["std"], "mean_b": sb["mean"],
            "std_b": sb["std"], "diff_mean": cd["mean"], "diff_std": sd["std"], "ci": cd["ci"],
            "ci_lo": cd["mean"] - cd["ci"], "ci_hi": cd["mean"] + cd["ci"],
            "n_pos": sum(x > y for x, y in zip(a, b)), "n_neg": sum(x < y for x, y in zip(a, b)),
            "n_tie": sum(x == y for x, y in zip(a, b)),
            "p": sign_flip_p(diffs), "p_method": sign_flip_method(len(diffs))}


def one_sample(values, chance: float | None = None) -> dict:
    """Mean ± std and the 95% t-interval of `values` (finite numbers), and against `chance`.

    -> {"n", "mean", "std", "ci" (half-width), "ci_lo", "ci_hi"}, and when chance is given also
    "chance", "vs_chance" ("above" if ci_lo > chance, "below" if ci_hi < chance, else
    "includes"; "undefined" without an interval), "excludes" (bool) and "p" / "p_method" (the
    sign-flip p-value of the mean of value − chance)."""
    xs = _floats(values)
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("one_sample: values must be finite")
    s, c = mean_std(xs), mean_ci(xs)
    out = {"n": len(xs), "mean": s["mean"], "std": s["std"], "ci": c["ci"],
           "ci_lo": c["mean"] - c["ci"], "ci_hi": c["mean"] + c["ci"]}
    if chance is not None:
        lo, hi = out["ci_lo"], out["ci_hi"]
        side = ("undefined" if not math.isfinite(c["ci"]) else "above" if lo > chance
                else "below" if hi < chance else "includes")
        out.update(chance=float(chance), vs_chance=side, excludes=side in ("above", "below"),
                   p=sign_flip_p([x - chance for x in xs]), p_method=sign_flip_method(len(xs)))
    return out


# --------------------------------------------------------------------------------------------
# reading and pairing

def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """results.csv -> (its columns, its rows as dicts of strings). ValueError if unreadable."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} cannot be read: {e}") from None
    if not columns:
        raise ValueError(f"{path} is empty: no header row")
    return columns, rows


def grid_columns(columns: list[str]) -> list[str]:
    """The grid columns of a results.csv: those between `error` and `seed`."""
    if "error" not in columns or "seed" not in columns or columns.index("seed") < columns.index("error"):
        raise ValueError("the CSV has no `error` ... `seed` columns: not a sweep's results.csv "
                         "(give the grid keys with --by)")
    return columns[columns.index("error") + 1:columns.index("seed")]


def same_value(text: str, level: str) -> bool:
    """A CSV cell equals a level as typed, or as a number (0.001 == 1e-3)."""
    if text == level:
        return True
    try:
        return float(text) == float(level)
    except ValueError:
        return False


def metric_value(row: dict, metric: str) -> float:
    try:
        return float(row.get(metric) or "nan")
    except ValueError:
        return math.nan


def level_by_seed(rows: list[dict], key: str, level: str, metric: str, cell: str,
                  tell_apart: list[str]) -> tuple[dict[str, float], int]:
    """{seed: metric} over the ok rows of `rows` with key == level and a finite metric; and how
    many other rows of that level (failed, undefined metric) were left out. ValueError when one
    seed has two ok rows (ambiguous pairing), naming the columns in `tell_apart` that differ."""
    out: dict[str, float] = {}
    seen: dict[str, dict] = {}
    left_out = 0
    for row in rows:
        if not same_value(row.get(key, ""), level):
            continue
        x = metric_value(row, metric)
        if row.get("status", "ok") != "ok" or not math.isfinite(x):
            left_out += 1
            continue
        seed = row.get("seed", "")
        if seed in seen:
            differ = [c for c in tell_apart if seen[seed].get(c) != row.get(c)]
            raise ValueError(f"ambiguous pairing in cell ({cell}): two ok runs with {key}={level}, "
                             f"seed={seed} (they differ in {', '.join(differ) or 'no grid column'}); "
                             "add those keys to --by or select one with --where")
        seen[seed] = row
        out[seed] = x
    return out, left_out


def pair_by_seed(a: dict[str, float], b: dict[str, float]) -> tuple[list[str], list[float], list[float], int]:
    """Two {seed: value} maps -> (the seeds in both, in a's order, their a and b values, and how
    many seeds are in only one of them)."""
    seeds = [s for s in a if s in b]
    return seeds, [a[s] for s in seeds], [b[s] for s in seeds], len(set(a) ^ set(b))


# --------------------------------------------------------------------------------------------
# the command

def fmt(x: float, spec: str = ".3f") -> str:
    return format(x, spec) if x is not None and math.isfinite(x) else "–"


def fmt_ms(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "–"
    return fmt(mean) if not math.isfinite(std) else f"{fmt(mean)} ± {fmt(std)}"


def fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return format(p, ".4f") if p >= 1e-4 else format(p, ".1e")


def fmt_interval(lo: float, hi: float, spec: str = "+.3f") -> str:
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{fmt(lo, spec)}, {fmt(hi, spec)}]"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line, exit 2 (argparse's default prints the usage too)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("results", help="a sweep's results.csv")
    p.add_argument("--metric", required=True, help="a metric column, e.g. val_unseen_pair.lr_acc")
    p.add_argument("--contrast", required=True, metavar="KEY=A,B",
                   help="the grid key and two levels to pair (A−B), or one level for a one-sample summary")
    p.add_argument("--by", action="append", default=None, metavar="K1,K2",
                   help="the keys of the cells (comma-separated or repeated; default: every other grid column)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep only rows with this value (repeatable)")
    p.add_argument("--vs_chance", type=float, default=None, metavar="C",
                   help="one-sample mode: test the mean against chance level C")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return p


def parse_assign(text: str, flag: str) -> tuple[str, list[str]]:
    key, eq, vals = text.partition("=")
    levels = [v.strip() for v in vals.split(",")] if eq else []
    if not key.strip() or not levels or any(not v for v in levels):
        raise ValueError(f"{flag} {text!r}: expected KEY=VALUE[,VALUE]")
    return key.strip(), levels


def run(args) -> str:
    """The report text for parsed arguments; ValueError on bad input."""
    path = Path(args.results)
    columns, rows = read_rows(path)
    key, levels = parse_assign(args.contrast, "--contrast")
    if len(levels) > 2 or (len(levels) == 2 and levels[0] == levels[1]):
        raise ValueError(f"--contrast {args.contrast!r}: give two different levels (paired) or one (one-sample)")
    if args.vs_chance is not None and len(levels) != 1:
        raise ValueError("--vs_chance needs the one-sample mode: one level in --contrast")
    if args.metric not in columns:
        near = [c for c in columns if args.metric.split(".")[-1] in c][:6]
        raise ValueError(f"--metric {args.metric!r} is not a column of {path}"
                         + (f" (similar: {', '.join(near)})" if near else ""))
    if key not in columns:
        raise ValueError(f"--contrast key {key!r} is not a column of {path}")
    grid = grid_columns(columns) if "error" in columns and "seed" in columns else []
    if "seed" not in columns:
        raise ValueError(f"{path} has no `seed` column: nothing to pair by")
    if args.by is not None:
        by = [k.strip() for item in args.by for k in item.split(",") if k.strip()]
        bad = [k for k in by if k not in columns]
        if bad:
            raise ValueError(f"--by {', '.join(bad)}: not a column of {path}")
        if key in by or "seed" in by:
            raise ValueError("--by must not contain the contrast key or seed")
    else:
        by = [k for k in grid_columns(columns) if k != key]
    wheres = []
    for w in args.where:
        wk, wv = parse_assign(w, "--where")
        if wk not in columns or len(wv) != 1:
            raise ValueError(f"--where {w!r}: expected KEY=VALUE with KEY a column of {path}")
        wheres.append((wk, wv[0]))
    rows = [r for r in rows if all(same_value(r.get(wk, ""), wv) for wk, wv in wheres)]
    for lv in levels:
        if not any(same_value(r.get(key, ""), lv) for r in rows):
            present = list(dict.fromkeys(r.get(key, "") for r in rows))
            raise ValueError(f"--contrast level {key}={lv} is absent from {path}"
                             + (" (after --where)" if wheres else "")
                             + f"; its levels: {', '.join(present) or 'none'}")

    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(r.get(k, "") for k in by), []).append(r)
    tell_apart = [c for c in grid if c not in by and c != key]
    where_txt = "".join(f"; rows with {wk}={wv}" for wk, wv in wheres)
    cells_txt = f"within each ({', '.join(by)})" if by else "over all rows"

    out_rows, methods = [], set()
    if len(levels) == 2:
        la, lb = levels
        header = [*by, "n", f"A: {key}={la}", f"B: {key}={lb}", "A−B", "95% CI of A−B",
                  "A>B/A<B/=", "p", "unpaired"]
        for cell, members in cells.items():
            name = ", ".join(f"{k}={v}" for k, v in zip(by, cell))
            a, _ = level_by_seed(members, key, la, args.metric, name, tell_apart)
            b, _ = level_by_seed(members, key, lb, args.metric, name, tell_apart)
            if not a and not b:
                continue                  # no defined value at either level (e.g. a metric of another mode)
            seeds, va, vb, unpaired = pair_by_seed(a, b)
            s = paired_stats(va, vb)
            if s["n"]:
                methods.add(s["p_method"])
            out_rows.append([*cell, s["n"], fmt_ms(s["mean_a"], s["std_a"]), fmt_ms(s["mean_b"], s["std_b"]),
                             fmt(s["diff_mean"], "+.3f"), fmt_interval(s["ci_lo"], s["ci_hi"]),
                             f"{s['n_pos']}/{s['n_neg']}/{s['n_tie']}", fmt_p(s["p"]), unpaired])
        head = (f"metric {args.metric}; contrast A−B with A = {key}={la}, B = {key}={lb}; "
                f"paired by seed {cells_txt}; status ok only, seeds at one level only dropped "
                f"(unpaired){where_txt}. Levels: mean ± std over the paired seeds; A−B: mean and "
                "95% t-interval of the per-seed differences")
    else:
        (lv,) = levels
        chance = args.vs_chance
        header = [*by, "n", "mean ± std", "95% CI"]
        if chance is not None:
            header += [f"vs {chance:g}", "p"]
        for cell, members in cells.items():
            name = ", ".join(f"{k}={v}" for k, v in zip(by, cell))
            vals, _ = level_by_seed(members, key, lv, args.metric, name, tell_apart)
            if not vals:
                continue
            s = one_sample(list(vals.values()), chance)
            row = [*cell, s["n"], fmt_ms(s["mean"], s["std"]), fmt_interval(s["ci_lo"], s["ci_hi"], ".3f")]
            if chance is not None:
                methods.add(s["p_method"])
                row += [s["vs_chance"], fmt_p(s["p"])]
            out_rows.append(row)
        head = (f"metric {args.metric}; one level {key}={lv}, one value per seed {cells_txt}; "
                f"status ok only{where_txt}. mean ± std and 95% t-interval over seeds"
                + (f"; vs {chance:g}: whether the interval lies above, below or includes "
                   f"{chance:g}" if chance is not None else ""))
    if methods:
        head += ("; p: two-sided sign-flip permutation test of the mean "
                 + ("difference" if len(levels) == 2 else f"of value − {args.vs_chance:g}") + ", "
                 + " / ".join(["exact (all 2^n sign assignments)" if m == "exact" else
                               f"Monte-Carlo ({MC_DRAWS} draws, seed {MC_SEED}; n > {EXACT_MAX_N})"
                               for m in sorted(methods)]))
    head += "."
    if args.markdown:
        return f"{head}\n\n{markdown_table(header, out_rows)}\n"
    return f"{head}\n{format_table(header, out_rows, align=['l'] * len(by) + ['r'] * (len(header) - len(by)))}\n"


def main(argv: list[str] | None = None) -> int:
    """-> 0; 2 on bad input (one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        text = run(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
