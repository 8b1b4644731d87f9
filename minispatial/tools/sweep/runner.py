"""Running a sweep: its directory checked and locked, the training subprocesses started, waited
for, and stopped on Ctrl-C, SIGTERM or the sweep's own death.

    prepare_out_dir(out)    DIR, DIR/runs, DIR/logs created and checked writable (OutDirError)
    out_dir_lock(out)       an exclusive flock on DIR, inherited by the trainings (one sweep per DIR)
    run_all(runs, ...)      skip finished runs, train the others `workers` at a time
    Runner                  one training subprocess per run; stop(): SIGINT, SIGTERM, SIGKILL
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from minispatial.tools.sweep.plan import Run
from minispatial.tools.sweep.results import make_row, read_record, read_summary, to_float, write_atomic

PROGRESS_METRIC = "val_unseen_pair.lr_acc"
SINGLE_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                      "NUMBA_NUM_THREADS")}
ERROR_LINES = 3                              # stderr lines kept in the `error` column


# --------------------------------------------------------------------------------------------
# the sweep directory: checked and locked

class OutDirError(Exception):
    """--out cannot be used (not a directory, not writable, in use): the message says why."""


def prepare_out_dir(out: Path) -> None:
    """Create DIR, DIR/runs and DIR/logs and check each can be written, before anything runs;
    OutDirError naming the path and the reason otherwise."""
    for d in (out, out / "runs", out / "logs"):
        if d.exists() and not d.is_dir():
            where = "" if d == out else f": {d}"
            raise OutDirError(f"--out {out} is invalid{where}: it exists and is not a directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutDirError(f"--out {out} is not a writable directory: cannot create "
                              f"{e.filename or d}: {e.strerror or e}") from None
        try:
            with tempfile.TemporaryFile(dir=d, prefix=".write-test-"):
                pass
        except OSError as e:
            raise OutDirError(f"--out {out} is not a writable directory: cannot write in {d}: "
                              f"{e.strerror or e}") from None


LOCK_WAIT_S = 1.0    # a sweep killed a moment ago: its trainings may still be dying, holding the lock


@contextlib.contextmanager
def out_dir_lock(out: Path, wait_s: float | None = None):
    """Hold an exclusive flock on the directory DIR; -> the locked file descriptor (None where the
    file system has no locks). OutDirError if another sweep (or a training of one) holds it."""
    try:
        import fcntl
    except ImportError:                   # not POSIX: no lock
        yield None
        return
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)        # no locks on this file system (e.g. ENOLCK): go on without
                    fd = None
                    break
                if time.monotonic() >= deadline:
                    raise OutDirError(f"--out {out} is in use: another sweep is writing to it (the "
                                      "sweep or one of its trainings still runs); wait for it to "
                                      "finish or use another --out") from None
                time.sleep(0.05)
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# one training subprocess

# Trainings die with their sweep (Linux). A parent-death signal must be set in the child between
# fork and exec. Not with Popen(preexec_fn=...): the sweep forks from ThreadPoolExecutor threads,
# and Python code run in the child of a multi-threaded process can deadlock on a lock another
# thread held at the fork (the subprocess docs warn against preexec_fn with threads; it also
# disables the vfork fast path). Instead the child execs this tiny launcher (`python -c`, ~30 ms,
# imports nothing but ctypes), which sets PR_SET_PDEATHSIG = SIGKILL, checks it was not orphaned
# before that (the sweep died between fork and prctl: then its parent pid is no longer the
# sweep's), and execs the training, which keeps the same pid and the death signal (it is cleared
# only for set-user-ID binaries). Linux sends the signal when the *thread* that forked the child
# exits: here a pool thread that waits for that same child, so it outlives it. Without prctl
# (macOS) the training is started directly and outlives a killed sweep (see the package docstring).
PDEATHSIG = sys.platform.startswith("linux")
_LAUNCHER = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    prctl = None
PR_SET_PDEATHSIG = 1
if prctl is not None and prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(signal.SIGKILL)), ctypes.c_ulong(0),
                               ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
    sys.stderr.write("minispatial sweep: prctl(PR_SET_PDEATHSIG) failed: %s\\n"
                     % os.strerror(ctypes.get_errno()))
if os.getppid() != parent:
    sys.stderr.write("minispatial sweep: error: the sweep (parent pid %d) exited before this training "
                     "started; not training\\n" % parent)
    os._exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def die_with_parent_command(cmd: list[str], parent_pid: int | None = None) -> list[str]:
    """`cmd` started through the launcher that ties its life to `parent_pid` (default: this
    process); `cmd` unchanged where PR_SET_PDEATHSIG does not exist."""
    if not PDEATHSIG:
        return list(cmd)
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-c", _LAUNCHER, str(parent), *cmd]


def error_message(stderr_path: Path) -> str:
    """The error of a failed run from its stderr: from the last line that reads like an error
    ("... error: ..." or a traceback's "XxxError: ...") to the end, else the last ERROR_LINES
    lines; lines joined with " | "."""
    try:
        lines = [ln.strip() for ln in stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    hits = [i for i, ln in enumerate(lines) if re.search(r"\berror:|^\w+(Error|Exception)\b", ln)]
    return " | ".join(lines[hits[-1]:] if hits else lines[-ERROR_LINES:])


class Runner:
    """Starts training subprocesses and can stop them all (on Ctrl-C)."""

    def __init__(self, out: Path, preset: str, pass_fds: tuple[int, ...] = ()):
        self.out, self.preset = out, preset
        self.pass_fds = tuple(pass_fds)     # the lock on DIR: held by every training too
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def command(self, run: Run, overwrite: bool) -> list[str]:
        cmd = [sys.executable, "-m", "minispatial", "train", "--out", str(self.out / "runs" / run.name),
               "--preset", self.preset, "--quiet"]
        cmd += [f"--{k}={v}" for k, v in run.overrides.items()]
        return cmd + (["--overwrite"] if overwrite else [])

    def run(self, run: Run) -> dict:
        """Train one run; -> its record {status, returncode, wall_s, error, command}. Never raises
        on an I/O error: a log that cannot be written or a process that cannot be started is a
        failed run whose error says why."""
        run_dir = self.out / "runs" / run.name
        cmd = self.command(run, overwrite=run_dir.exists())
        logs = self.out / "logs"
        env = {**os.environ, **SINGLE_THREAD_ENV}
        t0 = time.perf_counter()

        def failed(error: str) -> dict:
            return {"status": "interrupted" if self.stopping else "failed", "returncode": None,
                    "wall_s": round(time.perf_counter() - t0, 2), "error": error, "command": cmd}

        with contextlib.ExitStack() as stack:
            try:
                fo = stack.enter_context(open(logs / f"{run.name}.out", "w"))
                fe = stack.enter_context(open(logs / f"{run.name}.err", "w"))
            except OSError as e:
                return failed(f"cannot write the run's log {e.filename}: {e.strerror or e}")
            with self.lock:
                if self.stopping:
                    return {"status": "not_run", "returncode": None, "wall_s": math.nan, "error": "",
                            "command": cmd}
                try:
                    proc = subprocess.Popen(die_with_parent_command(cmd), stdout=fo, stderr=fe, env=env,
                                            pass_fds=self.pass_fds)
                except OSError as e:
                    return failed(f"cannot start the training: {e.strerror or e}")
                self.procs[run.name] = proc
            try:
                rc = proc.wait()
            finally:
                with self.lock:
                    del self.procs[run.name]
        wall = time.perf_counter() - t0
        error = ""
        if rc != 0:
            error = error_message(logs / f"{run.name}.err") or f"exit code {rc}"
        elif not (run_dir / "summary.json").is_file():
            error = "exit code 0 but no summary.json was written"
        status = "interrupted" if self.stopping else "failed" if error else "ok"
        record = {"status": status, "returncode": rc, "wall_s": round(wall, 2),
                  "error": error, "command": cmd}
        if not self.stopping:
            try:
                write_atomic(logs / f"{run.name}.json", json.dumps(record, indent=2) + "\n")
            except OSError as e:          # the run itself is unaffected: only its wall_s is lost
                print(f"minispatial sweep: warning: cannot write {e.filename}: {e.strerror or e}",
                      file=sys.stderr)
        return record

    def stop(self, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGKILL)) -> None:
        """Ctrl-C: ask running trainings to stop (SIGINT: the trainer keeps its last checkpoint),
        then SIGTERM, then SIGKILL, 5 s apart (checkpoints are written atomically)."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs.values())
        for sig in signals:                       # a background job may ignore SIGINT
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(OSError):
                        p.send_signal(sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.05)
            if all(p.poll() is not None for p in procs):
                break


# --------------------------------------------------------------------------------------------
# every run of the sweep

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def progress_line(i: int, total: int, run: Run, row: dict, note: str) -> str:
    """'[i/total] n_pair=5 seed=0 ok 3.0s val_unseen_pair.lr_acc=0.500', or FAILED and the error."""
    label = " ".join([f"{k}={v}" for k, v in run.grid.items()] + [f"seed={run.seed}"])
    if row["status"] != "ok":
        return f"[{i}/{total}] {label} FAILED {row['wall_s']:.1f}s: {row['error']}"
    wall = "" if not isinstance(row["wall_s"], float) or math.isnan(row["wall_s"]) else f" {row['wall_s']:.1f}s"
    v = to_float(row.get(PROGRESS_METRIC))
    metric = f" {PROGRESS_METRIC}={v:.3f}" if v is not None and not math.isnan(v) else ""
    return f"[{i}/{total}] {label} {note}{wall}{metric}"


def run_all(runs: list[Run], out: Path, preset: str, workers: int, say,
            pass_fds: tuple[int, ...] = ()) -> tuple[dict, bool]:
    """Skip finished runs, train the others `workers` at a time; -> ({name: record}, interrupted).
    An interrupt (Ctrl-C, SIGTERM) at any point stops every running training before returning."""
    total, done = len(runs), 0
    records: dict[str, dict] = {}
    todo = []
    for run in runs:                      # finished runs first: they are skipped
        run_dir = out / "runs" / run.name
        if (run_dir / "summary.json").is_file():
            records[run.name] = read_record(out, run.name)
            done += 1
            row = make_row(run, records[run.name], read_summary(run_dir))
            say(progress_line(done, total, run, row, "skipped (done)"))
        else:
            todo.append(run)

    runner = Runner(out, preset, pass_fds)
    interrupted = False
    old_term = None
    if threading.current_thread() is threading.main_thread():   # SIGTERM stops the sweep like Ctrl-C
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    pool = ThreadPoolExecutor(max_workers=workers)
    futures: dict = {}
    try:
        try:
            for run in todo:
                futures[pool.submit(runner.run, run)] = run
            for fut in as_completed(futures):
                run = futures[fut]
                records[run.name] = fut.result()
                done += 1
                row = make_row(run, records[run.name], read_summary(out / "runs" / run.name))
                say(progress_line(done, total, run, row, "ok"))
        except KeyboardInterrupt:
            interrupted = True
            pool.shutdown(wait=False, cancel_futures=True)      # nothing new starts
            try:
                runner.stop()
            except KeyboardInterrupt:                           # pressed again: no more waiting
                runner.stop(signals=(signal.SIGKILL,))
        except BaseException:                                   # a bug: no training outlives it
            pool.shutdown(wait=False, cancel_futures=True)
            runner.stop()
            raise
        while True:            # the pool threads only wait for trainings that were stopped above
            try:
                pool.shutdown(wait=True)
                break
            except KeyboardInterrupt:
                interrupted = True
                runner.stop(signals=(signal.SIGKILL,))
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    for fut, run in futures.items():          # runs stopped by the interrupt
        if run.name not in records and fut.done() and not fut.cancelled():
            records[run.name] = fut.result()
    if interrupted:        # a training that got the terminal's SIGINT before the sweep noticed it
        for rec in records.values():
            if rec.get("status") == "failed" and rec.get("returncode") in (130, -signal.SIGINT):
                rec["status"] = "interrupted"
    return records, interrupted
