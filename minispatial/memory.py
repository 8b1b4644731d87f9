"""The memory a configuration may use: sizes that cannot fit are refused before anything is built.

The estimates live with what they measure (`data.estimate_testbed_bytes`,
`model.estimate_model_bytes`, `model.estimate_run_bytes`); this module holds the limit they are
compared with and the message that names the estimate, the limit and where the limit comes from.
"""

from __future__ import annotations

import os
import re

MEMORY_VAR = "MINISPATIAL_MEMORY_LIMIT"  # bytes, or with a suffix K, M, G, T (powers of 1024)
MEMORY_FRACTION = 0.5                    # default limit: this fraction of physical memory
MEMORY_FALLBACK = 4 << 30                # default limit where physical memory cannot be read
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def physical_memory_bytes() -> int | None:
    """Physical memory (sysconf page size x pages), or None where sysconf cannot tell."""
    try:
        n = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return n if n > 0 else None


def memory_limit_bytes() -> int:
    """The memory a config may need: MINISPATIAL_MEMORY_LIMIT if set (e.g. 8G), else
    MEMORY_FRACTION of physical memory, else MEMORY_FALLBACK. ValueError on a bad variable."""
    text = os.environ.get(MEMORY_VAR, "").strip()
    if text:
        m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?", text, flags=re.IGNORECASE)
        value = float(m.group(1)) * _UNITS[m.group(2).upper()] if m else 0.0
        if value < 1:
            raise ValueError(f"{MEMORY_VAR}={text!r} is invalid: must be a number of bytes >= 1, "
                             f"optionally with a suffix K, M, G or T (powers of 1024), e.g. 8G")
        return int(value)
    phys = physical_memory_bytes()
    return int(phys * MEMORY_FRACTION) if phys else MEMORY_FALLBACK


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_memory(subject: str, need: int, what: str) -> None:
    """ValueError "{subject} is too large: {what} would need an estimated X, over the memory
    limit of Y (where Y comes from)" when need > memory_limit_bytes()."""
    limit = memory_limit_bytes()
    if need <= limit:
        return
    if os.environ.get(MEMORY_VAR, "").strip():
        source = f"set by {MEMORY_VAR}"
    else:
        phys = physical_memory_bytes()
        source = (f"{MEMORY_FRACTION:g} of the {format_bytes(phys)} of physical memory" if phys
                  else "a fixed default: physical memory is unknown") + f"; {MEMORY_VAR} overrides it"
    raise ValueError(f"{subject} is too large: {what} would need an estimated {format_bytes(need)}, "
                     f"over the memory limit of {format_bytes(limit)} ({source})")
