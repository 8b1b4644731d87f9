"""Grid sweeps: one training run per (grid point, seed), run as subprocesses, results in one CSV.

    minispatial sweep --grid n_pair=5,10,15 [--grid KEY=V1,V2 ...] --seeds 0-4
                      [--set key=value ...] [--preset NAME] --out DIR [--workers N] [--quiet]

Every combination is validated with `config.make_config`, and DIR is checked to be a writable
directory, before anything runs. Each run is
`python -m minispatial train --out DIR/runs/<name> --preset P --quiet --key=value ...`, at most
`--workers` at a time, each single-threaded (OMP/OpenBLAS/MKL/numba threads = 1) so results do not
depend on the machine's load. Run names are the grid values then the seed: `n_pair=5__seed=0`.

Resuming: a run whose summary.json exists is skipped (after checking its config.json is the
config this sweep asks for); a run directory without summary.json (interrupted or failed) is
trained again with --overwrite. A failed run (non-zero exit) is recorded with the last lines of its
stderr and does not stop the sweep.

Several invocations into one DIR add up: results.csv and summary.csv hold every finished run under
DIR/runs (of this or any earlier invocation), not only this invocation's grid. Their grid columns
are the union of every invocation's grid keys, then any other config field whose value differs
between runs (e.g. `steps` if two invocations used different --set steps=...); a run whose own grid
lacks such a key gets its value from its config.json, spelled as in a grid where the value is the
same (`1e-3`, not `0.001`), so rows stay comparable.

One sweep at a time per DIR: a sweep holds an exclusive lock (flock) on DIR, inherited by its
trainings, and a second sweep into DIR is refused. The trainings die with their sweep: on Linux
each is started with PR_SET_PDEATHSIG = SIGKILL, so `kill -9` of the sweep also kills them (their
run directories have no summary.json and are retrained by the next invocation). Where prctl does
not exist (macOS), trainings outlive a killed sweep and finish on their own; until they do they
hold DIR's lock, so a new sweep into DIR is refused rather than training the same runs twice.

Files in DIR:
    sweep.json        this invocation's command, preset, grid, seeds and fixed settings, and
                      "invocations": the same for every invocation into DIR, oldest first
    runs/<name>/      each run's directory (config.json, metrics.jsonl, checkpoint.npz, summary.json)
    logs/<name>.out|.err|.json   the run's stdout, stderr, and {status, returncode, wall_s, command}
    results.csv       one row per run: run, status, error, grid keys, seed, wall_s, every summary field
    summary.csv       mean and sample std (ddof=1) over seeds of every numeric column, per grid point
    figures/<metric>.png  key metrics against the first grid key (needs matplotlib: extra `plot`)
results.csv, summary.csv and sweep.json are replaced atomically (temporary file + rename): a
failed write (disk full) leaves the previous file whole.

Exit code: 0 if every run succeeded, 1 if some failed (or results.csv could not be written),
2 on bad arguments (including an --out that is not a writable directory or is in use by another
sweep), 130 if interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import itertools
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
from dataclasses import dataclass
from pathlib import Path

from minispatial import config as config_mod
from minispatial.data import SPLIT_NAMES
from minispatial.evaluate import METRICS
from minispatial.model import check_run_memory

KEY_METRICS = (
    "val_unseen_pair.lr_acc", "val_seen_pair.lr_acc", "val_unseen_pair.lr_acc_right",
    "val_seen_pair.lr_acc_right", "val_single.i2t_acc", "val_seen_pair.i2t_acc",
    "val_unseen_pair.i2t_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.labelset_acc",
    "train.i2t_acc", "train.loss", "val_unseen_pair.loss",
)
PROGRESS_METRIC = "val_unseen_pair.lr_acc"
SINGLE_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                      "NUMBA_NUM_THREADS")}
ROW_FIELDS = ("run", "status", "error")      # then the grid keys, "seed", "wall_s", the summary
ERROR_LINES = 3                              # stderr lines kept in the `error` column


@dataclass(frozen=True)
class Run:
    name: str
    grid: dict[str, str]          # grid key -> value (as typed)
    seed: int
    overrides: dict[str, str]     # everything passed to `minispatial train`: set, grid, seed


# --------------------------------------------------------------------------------------------
# parsing and planning

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
    """['steps=5', 'lr=1e-3'] -> {'steps': '5', 'lr': '1e-3'}."""
    sets: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or value.strip() == "":
            raise ValueError(f"--set {item!r} is invalid: use KEY=VALUE")
        key = _norm_key(key)
        if key in sets:
            raise ValueError(f"--set {key} is given twice")
        sets[key] = value.strip()
    return sets


def check_no_overlap(grid: dict, sets: dict) -> None:
    """No two of --grid, --set and --seeds may set the same config field."""
    keys = config_mod.all_keys()
    owner: dict[str, str] = {}
    for flag, key in [("--seeds", "seed")] + [("--grid", k) for k in grid] + [("--set", k) for k in sets]:
        for dotted in keys[key]:
            if dotted in owner:
                hint = "; seeds are given with --seeds" if dotted.endswith(".seed") else ""
                raise ValueError(f"{owner[dotted]} and {flag} {key} both set {dotted}{hint}")
            owner[dotted] = f"{flag} {key}" if flag != "--seeds" else "--seeds"


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


# --------------------------------------------------------------------------------------------
# running

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
# (macOS) the training is started directly and outlives a killed sweep (see the module docstring).
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
# the sweep directory: checked, locked, its history

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


INVOCATION_KEYS = ("command", "preset", "grid", "seeds", "set", "workers", "runs")


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


# --------------------------------------------------------------------------------------------
# results

def _to_float(v) -> float | None:
    """A number (or numeric string; ''/None -> NaN) as float, or None if it is not numeric."""
    if v is None or v == "":
        return math.nan
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _finite(v) -> bool:
    x = _to_float(v)
    return x is not None and math.isfinite(x)


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


def read_record(out: Path, name: str) -> dict:
    """A finished run's record from logs/<name>.json (status ok, no wall time if it is missing)."""
    try:
        return json.loads((out / "logs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {"status": "ok", "wall_s": math.nan, "error": ""}


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


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    # finite values only; std with ddof=1 (NaN below two values)
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


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
                if k not in skip and k not in metrics and _to_float(v) is not None:
                    metrics.append(k)
        metrics = [m for m in metrics if all(_to_float(r.get(m)) is not None for r in rows)]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if r.get("status", "ok") == "ok"]
        agg: dict[str, object] = dict(zip(by, key))
        agg["n_runs"], agg["n_ok"] = len(members), len(ok)
        for m in metrics:
            agg[f"{m}.mean"], agg[f"{m}.std"] = _mean_std([_to_float(r.get(m)) for r in ok])
        out.append(agg)
    return out


# --------------------------------------------------------------------------------------------
# figures

def plot_figures(rows: list[dict], grid: dict[str, list[str]], fig_dir: Path,
                 metrics=KEY_METRICS) -> list[Path] | None:
    """One PNG per key metric present: the metric against the first grid key, one line per value
    of the other grid keys, mean +- std over seeds and each seed as a dot; chance 0.5 for lr_acc.
    -> the files written, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = list(grid)
    xkey = keys[0] if keys else None
    xvals = grid[xkey] if xkey else [""]
    numeric = xkey is not None and all(_to_float(v) is not None for v in xvals)
    xpos = {v: (float(v) if numeric else float(i)) for i, v in enumerate(xvals)}
    logx = numeric and min(xpos.values()) > 0 and max(xpos.values()) / min(xpos.values()) > 50
    others = [dict(zip(keys[1:], vs)) for vs in itertools.product(*(grid[k] for k in keys[1:]))]
    # lines side by side: a small horizontal offset per line (linear axes only)
    span = (max(xpos.values()) - min(xpos.values())) or 1.0
    shift = [0.0 if logx else (i - (len(others) - 1) / 2) * 0.015 * span for i in range(len(others))]
    ok = [r for r in rows if r.get("status") == "ok"]
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        if not any(_finite(r.get(metric)) for r in ok):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for li, other in enumerate(others):
            sel = [r for r in ok if all(str(r.get(k)) == v for k, v in other.items())]
            label = ", ".join(f"{k}={v}" for k, v in other.items()) or None
            xs, means, stds = [], [], []
            for v in xvals:
                ys = [_to_float(r.get(metric)) for r in sel
                      if (xkey is None or str(r.get(xkey)) == v) and _finite(r.get(metric))]
                if not ys:
                    continue
                mean, std = _mean_std(ys)
                xs.append(xpos[v] + shift[li])
                means.append(mean)
                stds.append(0.0 if math.isnan(std) else std)
                ax.scatter([xs[-1]] * len(ys), ys, s=12, alpha=0.5, color=f"C{li}")
            if xs:
                ax.errorbar(xs, means, yerr=stds, color=f"C{li}", marker="o", capsize=3, label=label)
        if ".lr_acc" in metric:
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
        if metric.endswith("acc") or "_acc" in metric:
            ax.set_ylim(-0.02, 1.02)
        if logx:
            ax.set_xscale("log")
        if not numeric or (not logx and len(xvals) <= 12):
            ax.set_xticks(list(xpos.values()), xvals)
        ax.set_xlabel(xkey or "")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (mean ± std over seeds; dots = seeds)", fontsize=9)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minispatial sweep",
        description="Train one run per (grid point, seed) in subprocesses and collect results.csv, "
                    "summary.csv (mean/std over seeds) and figures.",
        epilog="example: minispatial sweep --grid n_pair=5,10,15 --seeds 0-4 --set steps=1500 "
               "--out sweeps/n_pair")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config field and its values (repeatable: the Cartesian product is run)")
    p.add_argument("--seeds", default="0", help="seeds: a range '0-4' or a list '0,2,5' (default 0); "
                                                "sets `seed` (testbed and training)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a config field fixed for every run (repeatable)")
    p.add_argument("--preset", default="paper-left", choices=sorted(config_mod.PRESETS),
                   help="starting configuration of every run (default paper-left)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--quiet", action="store_true", help="no line per finished run")
    return p


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _progress_line(i: int, total: int, run: Run, row: dict, note: str) -> str:
    label = " ".join([f"{k}={v}" for k, v in run.grid.items()] + [f"seed={run.seed}"])
    if row["status"] != "ok":
        return f"[{i}/{total}] {label} FAILED {row['wall_s']:.1f}s: {row['error']}"
    wall = "" if not isinstance(row["wall_s"], float) or math.isnan(row["wall_s"]) else f" {row['wall_s']:.1f}s"
    v = _to_float(row.get(PROGRESS_METRIC))
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
            say(_progress_line(done, total, run, row, "skipped (done)"))
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
                say(_progress_line(done, total, run, row, "ok"))
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


def write_results(out: Path, entries: list[tuple[Run, config_mod.RunConfig]], union: dict[str, list[str]],
                  extras: list[str], records: dict) -> tuple[list[dict], list | None]:
    """results.csv, summary.csv and the figures over `entries` (this invocation's runs, then the
    finished runs of earlier ones); -> (rows, figure paths or None). OSError names the file."""
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
               if all(_to_float(r.get(c)) is not None for r in rows)]
    summary = aggregate(rows, keys, metrics)
    write_csv(out / "results.csv", rows, columns)
    write_csv(out / "summary.csv", summary, list(summary[0]) if summary else [])
    plot_grid = {}                       # every value of each key, those typed in a grid first
    for k in keys:
        present = [str(r[k]) for r in rows]
        plot_grid[k] = [v for v in union.get(k, []) if v in present]
        plot_grid[k] += [v for v in dict.fromkeys(present) if v not in plot_grid[k]]
    try:
        figures = plot_figures(rows, plot_grid, out / "figures")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), e.filename or str(out / "figures")) from None
    return rows, figures


def _error(parser, message: str, usage: bool = True) -> None:
    if usage:
        parser.print_usage(sys.stderr)
    print(f"minispatial sweep: error: {message}", file=sys.stderr)


INTERRUPTED = "minispatial sweep: interrupted; run the same command again to resume"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the message (or the help)
        return e.code if isinstance(e.code, int) else 2
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:                              # everything is validated before anything runs
            if args.workers < 1:
                raise ValueError(f"--workers {args.workers} is invalid: must be >= 1")
            seeds = parse_seeds(args.seeds)
            grid = parse_grid(args.grid)
            sets = parse_sets(args.sets)
            check_no_overlap(grid, sets)
            runs = plan_runs(grid, seeds, sets)
            cfgs = validate(runs, args.preset)
            try:
                out = Path(args.out).resolve()
            except (OSError, RuntimeError) as e:          # a symlink loop
                raise OutDirError(f"--out {args.out} is invalid: {e}") from None
            prepare_out_dir(out)
        except (ValueError, OutDirError) as e:
            _error(parser, str(e))
            return 2
        try:
            with out_dir_lock(out) as lock_fd:
                return _sweep(args, argv, parser, out, grid, seeds, sets, runs, cfgs,
                              () if lock_fd is None else (lock_fd,))
        except OutDirError as e:
            _error(parser, str(e))
            return 2
    except KeyboardInterrupt:             # before or after the trainings (during them: run_all)
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130


def _sweep(args, argv, parser, out, grid, seeds, sets, runs, cfgs, pass_fds) -> int:
    """main, from the moment DIR is locked."""
    try:
        check_existing(runs, cfgs, out / "runs")
        history = read_history(out)
        earlier = earlier_runs(out, runs, history)
    except ValueError as e:
        _error(parser, str(e))
        return 2
    this = {"command": ["minispatial", "sweep", *argv], "preset": args.preset, "grid": grid,
            "seeds": seeds, "set": sets, "workers": args.workers, "runs": [r.name for r in runs]}
    started = {**this, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_atomic(out / "sweep.json",
                     json.dumps({**this, "invocations": [*history, started]}, indent=2) + "\n")
    except OSError as e:
        _error(parser, f"cannot write {e.filename}: {e.strerror}")
        return 2
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    records, interrupted = run_all(runs, out, args.preset, args.workers, say, pass_fds)
    entries = [(r, cfgs[r.name]) for r in runs] + earlier
    union, extras = result_keys(grid, history, {r.name for r, _ in entries}, [c for _, c in entries])
    try:
        rows, figures = write_results(out, entries, union, extras, records)
    except OSError as e:
        _error(parser, f"cannot write {e.filename}: {e.strerror} (any previous version of it is "
                       "left whole; run the same command again to retry: finished runs are skipped)",
               usage=False)
        return 130 if interrupted else 1

    rows = rows[:len(runs)]                  # this invocation's runs; then the earlier ones
    n_ok = sum(r["status"] == "ok" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    n_int = sum(r["status"] == "interrupted" for r in rows)
    for r in failed:
        print(f"minispatial sweep: run {r['run']} failed: {r['error']} "
              f"(log: {out / 'logs' / (r['run'] + '.err')})", file=sys.stderr)
    if figures is None:
        print("matplotlib is not installed: no figures (pip install 'minispatial[plot]')")
    fig_note = f", {len(figures)} figures in {out / 'figures'}" if figures else ""
    int_note = f", {n_int} interrupted" if n_int else ""
    kept = f"; {len(earlier)} finished runs of earlier invocations kept" if earlier else ""
    print(f"sweep: {n_ok} ok, {len(failed)} failed{int_note}, {len(rows) - n_ok - len(failed) - n_int} "
          f"not run -> {out / 'results.csv'}, {out / 'summary.csv'}{fig_note}{kept}")
    if interrupted:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
