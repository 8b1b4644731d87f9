"""The reporting helpers every tool shares: strict JSON, mean ± std over runs, plain-text tables,
and matplotlib for figures.

    clean_json(obj)              NaN/inf -> None, numpy scalars and arrays -> Python, recursively
    mean_std(values)             {"mean", "std", "n"}: mean and sample std (ddof=1) over the defined values
    t975(df), mean_ci(values)    Student's t quantile (a table, no scipy) and mean ± 95% t-interval
    format_table(header, rows)   one aligned plain-text table
    pyplot()                     matplotlib.pyplot on the file-only Agg backend (ImportError naming
                                 the `plot` extra when matplotlib is missing)

No numerics here may change a recorded file: `mean_std` computes exactly as the sweep's summary.csv
always has (Python floats, left-to-right sums, see its docstring), so a rewritten summary.csv is
byte-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PLOT_INSTALL = "pip install 'minispatial[plot]'"


def clean_json(obj):
    """A copy of `obj` that `json.dumps(..., allow_nan=False)` accepts: NaN and ±inf -> None,
    numpy scalars -> int/float/bool, numpy arrays and tuples -> lists, recursively through dicts
    and lists (keys kept). Anything else is returned as it is."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _as_row(v) -> list[float] | float:
    # one run's value -> float, or a list of floats for a vector value; None (undefined) -> NaN
    if v is None:
        return math.nan
    if isinstance(v, (list, tuple, np.ndarray)):
        return [math.nan if x is None else float(x) for x in np.asarray(v, dtype=object).ravel().tolist()]
    return float(v)


def mean_std(values) -> dict:
    """Mean and sample standard deviation (ddof=1) over the runs whose value is defined.

    values: one value per run, each a number (None, NaN or ±inf = undefined, skipped) or a
    sequence of numbers of one common length (a vector, e.g. a curve: a run counts only when all
    of its entries are finite). -> {"mean", "std", "n"}: floats for numbers, lists for vectors;
    n is how many runs counted; mean is NaN when none does, std NaN below two.

    Arithmetic (what summary.csv has always held, bit for bit): Python floats, the sum left to
    right, mean = sum / n, std = sqrt(sum((x - mean) ** 2) / (n - 1)).
    """
    rows = [_as_row(v) for v in values]
    vector = [r for r in rows if isinstance(r, list)]
    if vector:
        width = len(vector[0])
        if any(len(r) != width for r in vector):
            raise ValueError(f"mean_std: vectors of different lengths {sorted({len(r) for r in vector})}")
        rows = [r if isinstance(r, list) else [math.nan] * width for r in rows]
        ok = [r for r in rows if all(math.isfinite(x) for x in r)]
        cols = [_column_mean_std([r[i] for r in ok]) for i in range(width)]
        return {"mean": [c[0] for c in cols], "std": [c[1] for c in cols], "n": len(ok)}
    ok = [x for x in rows if math.isfinite(x)]
    mean, std = _column_mean_std(ok)
    return {"mean": mean, "std": std, "n": len(ok)}


def _column_mean_std(xs: list[float]) -> tuple[float, float]:
    # finite Python floats -> (mean, sample std); NaN mean for none, NaN std below two
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


# Mean ± 95% confidence interval over runs: mean ± t(0.975, n-1) · s/√n with s the sample std
# (ddof=1, mean_std). The t quantiles come from a table: exact to 4 decimals for 1..30 degrees
# of freedom; above 30 the next lower entry (40, 60, 120: slightly wider, conservative), 1.96
# beyond 1000.
# t(0.975, df) for df = 1..30
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
T975_LARGE = ((120, 1.9799), (60, 2.0003), (40, 2.0211), (30, 2.0423))   # df >= key


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` >= 1 degrees of freedom (module docstring)."""
    if df < 1:
        raise ValueError(f"t975: df={df} must be >= 1")
    if df <= len(T975):
        return T975[df - 1]
    if df > 1000:
        return 1.9600
    return next(t for k, t in T975_LARGE if df >= k)


def mean_ci(values) -> dict:
    """Over the runs' values (None/NaN/inf = undefined, left out): {"mean", "ci", "n"}, ci the
    half-width of the 95% t-interval (NaN below two defined values; mean NaN with none)."""
    s = mean_std(values)
    n = s["n"]
    ci = t975(n - 1) * s["std"] / math.sqrt(n) if n >= 2 else math.nan
    return {"mean": s["mean"], "ci": ci, "n": n}


def format_table(header: Sequence[str], rows: Sequence[Sequence], *, align: str | Sequence[str] = "r",
                 min_width: int | Sequence[int] = 0, sep: str = "  ", rule: bool = True) -> str:
    """A plain-text table: the header, a rule of dashes (unless rule=False), one line per row.

    Cells are str()-ed. A column is as wide as its longest cell or header, and at least its
    `min_width` (one number for every column, or one per column). `align` is "l" or "r" for every
    column, or one letter per column (a string "lrr" or a list). Columns are joined with `sep`;
    trailing spaces are stripped from every line.
    """
    header = [str(h) for h in header]
    rows = [[str(c) for c in r] for r in rows]
    n = len(header)
    if any(len(r) != n for r in rows):
        raise ValueError(f"format_table: every row needs {n} cells")
    aligns = list(align) if len(align) != 1 else list(align) * n
    mins = [min_width] * n if isinstance(min_width, int) else list(min_width)
    if len(aligns) != n or len(mins) != n or any(a not in "lr" for a in aligns):
        raise ValueError(f"format_table: align / min_width need one entry per column ({n})")
    widths = [max(mins[i], len(header[i]), *(len(r[i]) for r in rows)) for i in range(n)]

    def line(cells) -> str:
        return sep.join(c.ljust(w) if a == "l" else c.rjust(w)
                        for c, w, a in zip(cells, widths, aligns)).rstrip()

    lines = [line(header)]
    if rule:
        lines.append(sep.join("-" * w for w in widths))
    lines += [line(r) for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed). ImportError saying to
    install the `plot` extra when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"matplotlib is not installed ({PLOT_INSTALL}): {e}") from e
    return plt
