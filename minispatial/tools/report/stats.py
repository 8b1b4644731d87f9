"""Printing a mean ± 95% confidence interval (reporting.mean_ci) in the report's tables."""

from __future__ import annotations

import math

from minispatial.reporting import mean_ci, t975  # noqa: F401  (used by sections.py and the tests)


def fmt_ci(stat: dict, spec: str = ".3f") -> str:
    """{"mean", "ci", "n"} -> "mean ± ci"; the mean alone when there is no interval, "-" when
    undefined."""
    mean, ci = stat["mean"], stat["ci"]
    if mean is None or not math.isfinite(mean):
        return "-"
    if ci is None or not math.isfinite(ci):
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(ci, spec.lstrip('+'))}"
