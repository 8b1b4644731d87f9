"""The `minispatial` console script: a thin dispatcher to each module's own `main(argv)`.

Every subcommand lives in the module that implements it and builds its own argparse parser,
so `minispatial <cmd> --help` documents every option of <cmd>. Modules are imported lazily,
so `minispatial data` does not pay for compiling numba kernels.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys

# The model's matrices are small (128 x 128): a multi-threaded BLAS gains nothing on them and, on
# a loaded machine, can make a step many times slower. One BLAS thread per process is also what
# makes float32 results bit-identical from run to run. Set before NumPy is imported; an explicit
# setting in the environment wins. `minispatial bench` keeps the machine's default (it measures
# the sgemm peak), `minispatial sweep` runs its trainings in parallel processes instead.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same few-hundred-KB to 1-MB NumPy temporaries every
    step. By default glibc serves blocks over its (dynamic) mmap threshold with fresh mmaps and
    trims the heap after large frees, so each step pays page faults on fresh memory again: on this
    project's VMs ~2 us per 4 KB page, 0.5 ms per 1 MB array (benchmarks/README.md). Fixing the
    thresholds (mmap above 32 MB, trim above 256 MB) keeps them in the heap. No effect on any
    result; a no-op (returns False) where `mallopt` does not exist (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3            # <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


# subcommand -> (module, function, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("minispatial.data", "main", "build the 1D image-text testbed and print a summary"),
    "train": ("minispatial.train", "main", "train a dual encoder (presets: paper-left, paper-leftright)"),
    "eval": ("minispatial.evaluate", "main", "recompute every evaluation metric from a checkpoint"),
    "sweep": ("minispatial.sweep", "main", "run a grid of trainings over seeds and collect results.csv"),
    "analyze": ("minispatial.analysis", "main", "attention-logit decomposition, horizontal gradient, ablations"),
    "gradcheck": ("minispatial.gradcheck", "main", "finite-difference check of every op and parameter"),
    "bench": ("minispatial.bench", "main", "time a training step (both backends, optionally PyTorch)"),
}


def usage() -> str:
    lines = ["usage: minispatial <command> [options]   (minispatial <command> --help for details)", "", "commands:"]
    for name, (_, _, desc) in COMMANDS.items():
        lines.append(f"  {name:<10} {desc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"minispatial: unknown command {cmd!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    if cmd != "bench":
        for var in THREAD_VARS:
            os.environ.setdefault(var, "1")
    keep_freed_memory()
    module, func, _ = COMMANDS[cmd]
    fn = getattr(importlib.import_module(module), func)
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
