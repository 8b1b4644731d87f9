"""The `minispatial` console script: a thin dispatcher to each module's own `main(argv)`.

Every subcommand lives in the module that implements it and builds its own argparse parser,
so `minispatial <cmd> --help` documents every option of <cmd>. Modules are imported lazily,
so `minispatial data` does not pay for compiling numba kernels.

Before any command runs, the environment (MINISPATIAL_BACKEND, MINISPATIAL_MEMORY_LIMIT) is
checked (`check_environment`: a bad value is a one-line error, exit 2). `check_output_dir` and
`check_output_file` let a command check its output paths before its work. A command whose stdout
reader goes away (`minispatial data | head -1`) stops quietly with exit status 141, as SIGPIPE
would.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import select
import sys
from pathlib import Path

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
    trims the heap after large frees, so each step pays page faults on fresh memory again (measured
    ~2 us per 4 KB page, 0.5 ms per 1 MB array: benchmarks/README.md, "Under load"). Fixing the
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
    "sweep": ("minispatial.tools.sweep.cli", "main", "run a grid of trainings over seeds and collect results.csv"),
    "analyze": ("minispatial.analysis.cli", "main", "attention-logit decomposition, horizontal gradient, ablations"),
    "report": ("minispatial.tools.report.cli", "main", "one self-contained HTML page of runs: metrics, curves, analysis"),
    "gradcheck": ("minispatial.gradcheck", "main", "finite-difference check of every op and parameter"),
    "bench": ("minispatial.tools.bench", "main", "time a training step (both steps, optionally PyTorch)"),
}


def check_environment() -> None:
    """ValueError naming the variable, its value and what is allowed, for an invalid
    MINISPATIAL_MEMORY_LIMIT, or a MINISPATIAL_BACKEND (no longer read: the step is a flag):
    checked before any command starts."""
    from minispatial import memory

    if os.environ.get("MINISPATIAL_BACKEND"):
        raise ValueError(f"MINISPATIAL_BACKEND={os.environ['MINISPATIAL_BACKEND']!r} is no longer read: "
                         "choose the training step with --step fast (default) or --step reference; "
                         "unset the variable")
    memory.memory_limit_bytes()


def _nearest_existing(path: Path) -> Path:
    # the path itself or its closest ancestor that exists (lexically, like mkdir -p walks it)
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, option: str, directory: Path | None = None) -> None:
    # ValueError unless the missing directories of `directory` (default `path`) could be created:
    # its nearest existing ancestor must be a writable directory (os.access also sees read-only
    # mounts, which stop root too)
    base = _nearest_existing(path if directory is None else directory)
    if not base.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} cannot be created: {base} is not writable")


def check_output_dir(path, option: str) -> None:
    """Before the work of a command: ValueError naming `option` and `path` unless `path` is a
    writable directory or could be created as one. Creates nothing."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ValueError(f"{option} {path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path} is not writable")
        return
    _check_creatable(path, option)


def check_output_file(path, option: str) -> None:
    """Before the work of a command: ValueError naming `option` and `path` unless a file could be
    written at `path` (an existing writable file, or a new one in a writable or creatable
    directory). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory, not a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {path} is not writable")
        return
    _check_creatable(path, option, directory=path.parent)


SIGPIPE_EXIT = 128 + 13                        # the exit status of a command killed by SIGPIPE


def _stdout_closed() -> bool:
    # True when stdout's reader is gone (so a BrokenPipeError came from stdout, not another pipe):
    # the write end of a pipe without a reader polls as an error (assumed where poll is missing)
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


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
    try:
        check_environment()                    # (imports NumPy: after the thread settings)
    except ValueError as e:
        print(f"minispatial {cmd}: error: {e}", file=sys.stderr)
        return 2
    keep_freed_memory()
    module, func, _ = COMMANDS[cmd]
    try:
        fn = getattr(importlib.import_module(module), func)
        return int(fn(rest) or 0)
    except KeyboardInterrupt:               # Ctrl-C while importing (each command handles its own)
        print(f"\nminispatial {cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # the reader of stdout went away (`minispatial data | head -1`): stop quietly, as a command
        # killed by SIGPIPE does; stdout to /dev/null so that the interpreter's last flush succeeds
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return SIGPIPE_EXIT


if __name__ == "__main__":
    sys.exit(main())
