"""A run directory's files: one writer at a time, what is on disk after a stop, the metrics log.

    DIR/config.json      the fully resolved RunConfig
    DIR/metrics.jsonl    one line per log step
    DIR/checkpoint.npz   minispatial.checkpoint
    DIR/summary.json     the final evaluation
    DIR/.minispatial.lock  held (flock) by the process writing to DIR: a second writer is refused
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:          # not POSIX: run directories are not locked
    fcntl = None

from minispatial.checkpoint import CHECKPOINT

LOCK_FILE = ".minispatial.lock"
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, "summary.json")


class TrainingError(RuntimeError):
    """Training stopped (a NaN loss, a bad run directory, a file that cannot be written): the
    message says why. `exit_code`: 1 for a failed run, 2 for a bad input (a checkpoint or
    metrics.jsonl to resume)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _busy(out: Path) -> str:
    return (f"another process is writing to {out} (it holds the lock {out / LOCK_FILE}): wait for it "
            f"to finish or stop it first")


def lock_run_dir(out: Path) -> int:
    """Take the exclusive flock on out/LOCK_FILE (created if needed) without waiting; -> its file
    descriptor, for `unlock_run_dir`. TrainingError if another process holds it. The kernel
    releases the lock when the process ends in any way (kill -9 too); a lock file left behind by a
    dead process is simply locked again. Where the file system has no locks (ENOLCK on some
    network file systems) or the OS no flock, the run goes on unlocked, as `minispatial sweep` does."""
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainingError(f"cannot create the lock file {path}: {e.strerror}") from None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingError(_busy(out)) from None
        except OSError:
            return fd                          # no locks here: go on without
        try:                                   # the holder before us may have removed the file
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def unlock_run_dir(out: Path, fd: int) -> None:
    """Remove the lock file (while still holding it), then release the lock."""
    try:
        (out / LOCK_FILE).unlink()
    except OSError:
        pass
    os.close(fd)


def locked_by_another(out: Path) -> bool:
    # probe without creating anything: is out/LOCK_FILE there and held?
    if fcntl is None:
        return False
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> int:
    """Check `out`, create and lock it (`lock_run_dir`), and for --overwrite remove the files of
    the run it held; -> the lock's file descriptor. TrainingError, with nothing touched, if `out`
    cannot be used."""
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise TrainingError(f"--resume {out}: no {CHECKPOINT} there to resume from", exit_code=2)
        return lock_run_dir(out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} exists and is not a directory")
    try:
        used = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    except OSError as e:
        raise TrainingError(f"--out {out} cannot be read ({e.strerror})") from None
    if used:
        if locked_by_another(out):
            raise TrainingError(_busy(out))
        if not overwrite:
            raise TrainingError(f"--out {out} exists and is not empty: pass --overwrite to replace "
                                f"it or --resume to continue it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"--out {out}: cannot create the run directory ({e.strerror})") from None
    fd = lock_run_dir(out)
    try:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        unlock_run_dir(out, fd)
        raise TrainingError(f"--overwrite {out}: cannot remove {e.filename} ({e.strerror})") from None
    return fd


def on_disk(out: Path) -> str:
    """What a stopped run has kept in `out` and how to go on, read from the disk (so it is true
    whenever the run stopped: before its first checkpoint, between two, or after its last)."""
    ckpt = out / CHECKPOINT
    try:
        with np.load(ckpt, allow_pickle=False) as z:
            step = int(z["meta/step"])
            steps = int(json.loads(str(z["meta/config"]))["train"]["steps"])
    except Exception:      # no checkpoint (or none we can read: then there is nothing to resume)
        step = steps = None
    q = shlex.quote
    if step is None:
        again = (f"minispatial train --config {q(str(out / 'config.json'))} --out {q(str(out))} --overwrite"
                 if (out / "config.json").is_file() else "the same command and --overwrite")
        return f"no checkpoint has been written yet, so there is nothing to resume; start again with: {again}"
    if step < steps:
        return (f"the checkpoint of step {step} is kept in {ckpt}; continue with: "
                f"minispatial train --resume {q(str(out))}")
    if (out / "summary.json").is_file():
        return f"the run is complete (step {step}): its checkpoint and summary.json are in {out}"
    return (f"training is complete: the final checkpoint (step {step}) is saved in {ckpt}, but the final "
            f"evaluation did not finish (no summary.json); `minispatial eval {q(str(out))}` prints its "
            f"metrics, `minispatial train --resume {q(str(out))}` evaluates it and writes summary.json")


def cannot_write(path: Path, e: OSError, out: Path) -> TrainingError:
    return TrainingError(f"cannot write {path}: {e.strerror or e}; {on_disk(out)}")


def read_metrics(mpath: Path, upto: int) -> list[str]:
    """The lines of metrics.jsonl to keep on resuming from the checkpoint of step `upto`: those
    with step <= upto. A torn tail (a last line without its newline, as a crash or a full disk
    leaves it) and blank lines are dropped; any other unreadable line is a TrainingError (exit 2)
    naming the file and the line."""
    if not mpath.exists():
        return []
    try:
        text = mpath.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise TrainingError(f"cannot read {mpath}: {e.strerror}", exit_code=2) from None
    lines = text.split("\n")
    lines.pop()                  # "" after the last newline, or a torn last line

    def bad(i, why):
        return TrainingError(f"{mpath} line {i}: {why}; fix or delete that line (the checkpoint does "
                             f"not depend on it) and resume again", exit_code=2)

    keep = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip(" \t\r\x00"):
            continue
        try:
            rec = json.loads(ln)
        except ValueError as e:
            raise bad(i, f"not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise bad(i, f"not a JSON object but {ln[:40]!r}")
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise bad(i, f"its step is {step!r}, not an integer")
        if step <= upto:
            keep.append(ln)
    return keep
