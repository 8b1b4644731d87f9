"""The trainer, top to bottom: config -> testbed -> params -> (batch, loss, grads, AdamW)* -> eval.

    minispatial train [--preset paper-left] [--config FILE.json] [--key value ...] --out DIR
    minispatial train --resume DIR     (continues DIR in place; a finished run is not retrained)

Files in DIR:
    config.json      the fully resolved RunConfig
    metrics.jsonl    one line per log step: step, loss, lr, logit_scale (exp), grad_norm, samples_per_s
    checkpoint.npz   params, AdamW state, step, config (written atomically: tmp file + rename)
    summary.json     final evaluation metrics (minispatial.evaluate.evaluate_all)
    .minispatial.lock  exists while a trainer writes to DIR: it holds an exclusive flock on it, so a
                     second trainer into DIR is refused (the kernel drops the lock if the process dies)

Exit codes of `main`: 0 done, 2 bad arguments or input files (--config, a checkpoint or metrics.jsonl
to resume), 1 a failed run (NaN, an output that cannot be written, DIR busy), 130 Ctrl-C; every
error is one line `minispatial train: error: ...` on stderr.

Determinism: the batch of step s is drawn from np.random.default_rng([train.seed, s]), so a run
resumed from its checkpoint at step s continues exactly as if it had never stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:          # not POSIX: run directories are not locked
    fcntl = None

from minispatial import config as config_mod
from minispatial import ops
from minispatial.data import make_testbed, sample_batch
from minispatial.model import check_params, check_run_memory, init_params, loss_and_grads
from minispatial.optim import adamw_init, adamw_step, clamp_logit_scale, clip_grads, flatten, lr_at

CHECKPOINT = "checkpoint.npz"
LOCK_FILE = ".minispatial.lock"
FORMAT_VERSION = 1
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, "summary.json")


class TrainingError(RuntimeError):
    """Training stopped (a NaN loss, a bad run directory, a file that cannot be written): the
    message says why. `exit_code`: 1 for a failed run, 2 for a bad input (a checkpoint or
    metrics.jsonl to resume)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------
# checkpoints: one .npz holding params, optimizer moments, step and the config as JSON

def save_checkpoint(path: Path, cfg, params: dict, opt: dict, step: int) -> None:
    """Write atomically: a temporary file in the same directory, fsynced, then renamed over."""
    arrays = {"meta/format": np.array(FORMAT_VERSION), "meta/step": np.array(step),
              "meta/t": np.array(opt["t"]), "meta/config": np.array(config_mod.to_json(cfg))}
    for n, p in params.items():
        arrays[f"param/{n}"] = p
        arrays[f"adam_m/{n}"] = opt["m"][n]
        arrays[f"adam_v/{n}"] = opt["v"][n]
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:                    # a failed write (disk full, Ctrl-C): no torn .tmp left
        tmp.unlink(missing_ok=True)
        raise


ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")     # an .npz is a zip archive
META = ("meta/format", "meta/step", "meta/t", "meta/config")
MOMENTS = ("adam_m", "adam_v")


def load_checkpoint(path):
    """-> (cfg: RunConfig, params, opt_state, step). ValueError naming the file and the entry on a
    missing, corrupt or inconsistent file: every entry is validated (`validate_checkpoint`) before
    any of it is used."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    if head not in ZIP_SIGNATURES:
        raise ValueError(f"{path} is not a minispatial checkpoint: not an .npz (zip) archive, as "
                         f"`minispatial train` writes")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ValueError ...
        why = ("it holds pickled Python objects, which a minispatial checkpoint never does"
               if "pickle" in str(e) else f"{type(e).__name__}: {e}")
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({why})") from None
    try:
        cfg, step = validate_checkpoint(data)
    except ValueError as e:
        raise ValueError(f"checkpoint {path} is not a valid minispatial checkpoint: {e}") from None
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    opt = {"t": int(data["meta/t"]),
           "m": {n: data[f"adam_m/{n}"] for n in params},
           "v": {n: data[f"adam_v/{n}"] for n in params}}
    return cfg, params, opt, step


def _describe(a: np.ndarray) -> str:
    return f"{a.dtype} {'scalar' if a.shape == () else f'of shape {a.shape}'}"


def _int_entry(data: dict, key: str) -> int:
    a = data.get(key)
    if a is None:
        raise ValueError(f"{key} is missing")
    if a.shape != () or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{key} is {_describe(a)} {a.ravel()[:3].tolist()}: expected an integer scalar")
    return int(a)


def validate_checkpoint(data: dict) -> tuple:
    """The arrays of a checkpoint file {name: array} -> (cfg, step); ValueError naming the entry:
    meta/format, meta/config (a JSON object, a valid config), meta/step in [0, train.steps],
    meta/t == meta/step (AdamW counts one update per step), exactly param/X, adam_m/X, adam_v/X for
    each parameter X of the config's model, each of the parameter's shape and dtype, all finite,
    adam_v >= 0, and nothing else."""
    unknown = sorted(k for k in data if k not in META and k.split("/", 1)[0] not in ("param", *MOMENTS))
    if unknown:
        raise ValueError(f"unexpected entries {unknown[:5]}")
    fmt = _int_entry(data, "meta/format")
    if fmt != FORMAT_VERSION:
        raise ValueError(f"meta/format is {fmt}: this version reads format {FORMAT_VERSION}")
    c = data.get("meta/config")
    if c is None:
        raise ValueError("meta/config is missing")
    if c.shape != () or c.dtype.kind != "U":
        raise ValueError(f"meta/config is {_describe(c)}: expected a JSON string")
    try:
        d = json.loads(str(c))
    except ValueError as e:
        raise ValueError(f"meta/config is not JSON ({e})") from None
    try:
        cfg = config_mod.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"meta/config: {e}") from None
    step, t = _int_entry(data, "meta/step"), _int_entry(data, "meta/t")
    if not 0 <= step <= cfg.train.steps:
        raise ValueError(f"meta/step is {step}: must be in [0, {cfg.train.steps}] (train.steps of its config)")
    if t != step:
        raise ValueError(f"meta/t (the AdamW step count) is {t}: must equal meta/step = {step} "
                         f"(one AdamW update per training step)")
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    check_params(params, cfg.model)
    for kind in MOMENTS:
        names = {k[len(kind) + 1:] for k in data if k.startswith(kind + "/")}
        missing, extra = [n for n in params if n not in names], sorted(names - set(params))
        if missing or extra:
            raise ValueError(f"the {kind} entries do not match the params: missing "
                             f"{[f'{kind}/{n}' for n in missing][:5]}, unexpected {[f'{kind}/{n}' for n in extra][:5]}")
        for n, p in params.items():
            a = data[f"{kind}/{n}"]
            if a.shape != p.shape or a.dtype != p.dtype:
                raise ValueError(f"{kind}/{n} is {_describe(a)}: expected its param's {_describe(p)}")
    for kind in ("param", *MOMENTS):
        for n in params:
            a = data[f"{kind}/{n}"]
            finite = np.isfinite(a)
            if not finite.all():
                bad = a[~finite]
                raise ValueError(f"{kind}/{n} holds {int(np.isnan(bad).sum())} nan and "
                                 f"{int(np.isinf(bad).sum())} inf values")
            if kind == "adam_v" and (a < 0).any():
                raise ValueError(f"adam_v/{n} holds negative values (a second moment is >= 0)")
    return cfg, step


# --------------------------------------------------------------------------------------------
# progress: an in-place line on a terminal, plain lines otherwise

class Progress:
    """The ETA's clock starts after the first step of this invocation: that step also compiles
    (or loads from their cache) the numba kernels, seconds that no later step takes."""

    def __init__(self, total: int, verbose: bool):
        self.total, self.verbose = total, verbose
        self.tty = verbose and sys.stderr.isatty()
        self.t0: float | None = None           # the time when the first step of this invocation ended
        self.done0 = 0                         # ... and its step count

    def update(self, step: int, loss: float, sps: float, force: bool = False):
        if not self.verbose:
            return
        done = step + 1
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.done0 = now, done
        eta = ("    ?" if done == self.done0 else
               f"{(now - self.t0) / (done - self.done0) * (self.total - done):5.0f}")
        line = f"step {done:>5}/{self.total}  loss {loss:.4f}  {sps:8.0f} samples/s  eta {eta}s"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif force:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


# --------------------------------------------------------------------------------------------
# the run directory: one writer at a time, outputs written whole

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


def _locked_by_another(out: Path) -> bool:
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
        if _locked_by_another(out):
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


def write_atomic(path: Path, text: str) -> None:
    """path.write_text(text), but through a temporary file renamed over it: never half written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _cannot_write(path: Path, e: OSError, out: Path) -> TrainingError:
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


# --------------------------------------------------------------------------------------------
# the training run

def _stopped(out: Path, last_saved: int, tc) -> str:
    """The end of a NaN/inf error message: what is kept on disk and what to try."""
    kept = (f"The last good checkpoint (step {last_saved}) is kept in {out / CHECKPOINT}."
            if (out / CHECKPOINT).is_file() else
            f"No checkpoint was written (checkpoint_every = {tc.checkpoint_every}).")
    return f"stopped. {kept} Try a lower --lr (now {tc.lr}) or --grad_clip."


def _check_finite(params: dict, step: int, out: Path, last_saved: int, tc) -> None:
    """TrainingError if an update left a parameter NaN/inf (the loss of the next step would be
    NaN, but a checkpoint written now would already hold the broken state)."""
    bad = [n for n, p in params.items() if not np.isfinite(p).all()]
    if bad:
        raise TrainingError(f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are "
                            f"nan/inf after step {step}; " + _stopped(out, last_saved, tc))


def check_batch(cfg, testbed) -> None:
    """TrainingError (exit 2) before training if the effective batch, batch_size capped at the
    number of distinct training scenes (`sample_batch`), is < 2: a batch of 1 learns nothing."""
    n_scenes = testbed.splits["train"].n_scenes
    n = min(cfg.train.batch_size, n_scenes)
    if n < 2:
        raise TrainingError(f"the effective batch size is {n} (batch_size = {cfg.train.batch_size} capped "
                            f"at the {n_scenes} distinct scenes of the training split): it must be >= 2"
                            + config_mod.BATCH_WHY, exit_code=2)


def train(cfg, out, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          verbose: bool = True) -> dict:
    """Train one dual encoder; return the summary (also written to out/summary.json).

    `stop_after=k` stops (with a checkpoint) after k steps of this invocation, to test resuming.
    Resuming a run that is already complete trains nothing: it returns the run's summary (read
    from summary.json, or evaluated and written if it is missing) with "already_complete": True
    (or "evaluated" when it was evaluated now).
    The run directory is locked (`lock_run_dir`) from the start to the end, evaluation included.
    KeyboardInterrupt is re-raised with `on_disk(out)` as its message."""
    out = Path(out)
    if stop_after is not None and (not isinstance(stop_after, int) or isinstance(stop_after, bool)
                                   or stop_after < 1):
        raise ValueError(f"stop_after={stop_after!r} is invalid: must be an int >= 1")
    testbed = None
    if not resume:                  # a config that cannot train is refused before anything is written
        check_run_memory(cfg.data, cfg.model, cfg.train.batch_size)
        testbed = make_testbed(cfg.data)
        check_batch(cfg, testbed)
    lock = prepare_out_dir(out, resume, overwrite)
    try:
        return _train(cfg, out, testbed, resume, stop_after, verbose)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(on_disk(out)) from None
    except SystemError as e:
        # Ctrl-C inside a numba kernel surfaces as "returned a result with an exception set"
        if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt(on_disk(out)) from None
        raise
    finally:
        unlock_run_dir(out, lock)


def _train(cfg, out: Path, testbed, resume: bool, stop_after: int | None, verbose: bool) -> dict:
    # train() with `out` prepared and locked
    # 1. state: fresh, or from the checkpoint (whose config wins)
    if resume:
        try:
            cfg, params, opt, start = load_checkpoint(out / CHECKPOINT)
        except ValueError as e:
            raise TrainingError(str(e), exit_code=2) from None
        testbed = make_testbed(cfg.data)
        if start == cfg.train.steps:
            return _already_complete(cfg, out, params, testbed)
        check_batch(cfg, testbed)
        flatten(params, opt)                                     # as adamw_init does
    else:
        params = init_params(cfg.model, cfg.train.seed)
        opt = adamw_init(params)
        start = 0
        try:
            write_atomic(out / "config.json", config_mod.to_json(cfg) + "\n")
        except OSError as e:
            raise _cannot_write(out / "config.json", e, out) from None
    tc, mc = cfg.train, cfg.model

    # 2. data
    split = testbed.splits["train"]
    dt = np.dtype(mc.dtype)

    # 3. metrics log (on resume, drop lines past the checkpoint so the log matches a clean run)
    mpath = out / "metrics.jsonl"
    lines = read_metrics(mpath, start) if resume else []
    try:
        write_atomic(mpath, "".join(ln + "\n" for ln in lines))
        mlog = open(mpath, "a")
    except OSError as e:
        raise _cannot_write(mpath, e, out) from None

    # 4. the loop
    progress = Progress(tc.steps, verbose)
    last_saved = start
    t_last, n_last = time.perf_counter(), 0
    stop = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    step = start
    try:
        for step in range(start, stop):
            rng = np.random.default_rng([tc.seed, step])            # batch from (seed, step)
            idx = sample_batch(split, tc.batch_size, rng)
            loss, grads = loss_and_grads(params, split.images[idx], split.tokens[idx],
                                         split.eot[idx], mc)
            gnorm = clip_grads(grads, tc.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                raise TrainingError(f"loss is {loss} (gradient norm {gnorm}) at step {step + 1}; "
                                    + _stopped(out, last_saved, tc))
            lr = lr_at(step, tc.lr, tc.warmup, tc.steps, tc.schedule, tc.min_lr_frac)
            adamw_step(params, grads, opt, lr, tc.beta1, tc.beta2, tc.eps, tc.weight_decay,
                       tc.decay_embeddings)
            clamp_logit_scale(params)
            n_last += len(idx)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                now = time.perf_counter()
                sps = n_last / max(now - t_last, 1e-9)
                rec = {"step": done, "loss": round(loss, 6), "lr": lr,
                       "logit_scale": float(np.exp(params["logit_scale"])),
                       "grad_norm": round(gnorm, 6), "batch": int(len(idx)), "samples_per_s": round(sps, 1)}
                try:
                    mlog.write(json.dumps(rec) + "\n")
                    mlog.flush()
                except OSError as e:
                    raise _cannot_write(mpath, e, out) from None
                progress.update(step, loss, sps, force=True)
                t_last, n_last = now, 0
            else:
                progress.update(step, loss, n_last / max(time.perf_counter() - t_last, 1e-9))
            if done % tc.checkpoint_every == 0 and done < stop:
                _check_finite(params, done, out, last_saved, tc)       # never save a NaN state
                _save(out, cfg, params, opt, done)
                last_saved = done
    except KeyboardInterrupt:
        # an interrupt may land inside an update: keep the last checkpoint, never a torn state
        progress.close()
        raise
    finally:
        try:
            mlog.close()
        except OSError:          # the failed write is reported already; every complete line was flushed
            pass
    progress.close()
    _check_finite(params, stop, out, last_saved, tc)
    _save(out, cfg, params, opt, stop)
    if stop < tc.steps:
        return {"step": stop, "stopped_early": True}

    # 5. evaluation -> summary.json
    return _evaluate(cfg, out, params, testbed)


def _save(out: Path, cfg, params: dict, opt: dict, step: int) -> None:
    # save_checkpoint, a failed write (disk full) a TrainingError: the previous checkpoint is intact
    try:
        save_checkpoint(out / CHECKPOINT, cfg, params, opt, step)
    except OSError as e:
        raise _cannot_write(out / CHECKPOINT, e, out) from None


def _evaluate(cfg, out: Path, params: dict, testbed) -> dict:
    # the final evaluation -> summary, written to out/summary.json
    from minispatial.evaluate import evaluate_all

    summary = {"step": cfg.train.steps, "backend": ops.get_backend(), "dtype": cfg.model.dtype}
    summary.update(evaluate_all(params, testbed, cfg.model))
    try:
        write_atomic(out / "summary.json", json.dumps(strict_json(summary), indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise _cannot_write(out / "summary.json", e, out) from None
    return summary


def _already_complete(cfg, out: Path, params: dict, testbed) -> dict:
    # resuming a finished run: its summary.json, or (if missing or unreadable) a new evaluation
    try:
        summary = json.loads((out / "summary.json").read_text())
        if not isinstance(summary, dict) or summary.get("step") != cfg.train.steps:
            raise ValueError("not this run's summary")
        summary = {k: (math.nan if v is None else v) for k, v in summary.items()}
        evaluated = False
    except (OSError, ValueError):
        summary, evaluated = _evaluate(cfg, out, params, testbed), True
    return {**summary, "already_complete": "evaluated" if evaluated else True}


def strict_json(summary: dict) -> dict:
    """NaN (a metric undefined on an empty split) -> None, so the JSON is strict (null)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


# --------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minispatial train",
        description="Train a CLIP-style dual encoder on the 1D left/right testbed and print its metrics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=fields_epilog())
    p.add_argument("--out", help="run directory (required unless --resume)")
    p.add_argument("--preset", default="paper-left", choices=sorted(config_mod.PRESETS),
                   help="starting configuration (default paper-left)")
    p.add_argument("--config", help="a config.json (as written by a run) to start from")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, in place "
                                                   "(no --out); a finished run is not retrained")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="stop (with a checkpoint) after K >= 1 steps of this invocation")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    return p


def fields_epilog() -> str:
    lines = ["config fields (set any with --name value; 'seed' sets both data.seed and train.seed):"]
    for name, sec, default in config_mod.field_help():
        lines.append(f"  --{name:<18} [{sec}] default {default!r}")
    return "\n".join(lines)


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """['--n_pair', '5', '--lr=1e-3'] -> {'n_pair': '5', 'lr': '1e-3'}; ValueError on junk."""
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        a = rest[i]
        if not a.startswith("--") or a == "--":
            raise ValueError(f"unexpected argument {a!r}: config fields are given as --name value")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ValueError(f"{a} needs a value")
            k, v = a[2:], rest[i + 1]
            i += 2
        out[k] = v
    return out


def read_config_file(path: str) -> dict:
    """The JSON object of a --config file; ValueError naming the file (unreadable, not JSON, not
    an object)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {p}: not a JSON file (not UTF-8 text: byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--config {p}: cannot read it ({e.strerror})") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--config {p}: invalid JSON ({e})") from None
    try:
        config_mod.check_object(d)
    except ValueError as e:
        raise ValueError(f"--config {p}: {e}") from None
    return d


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    out = Path(args.resume or args.out or ".")
    try:
        return _main(parser, args, rest)
    except KeyboardInterrupt as e:
        what = e.args[0] if e.args and isinstance(e.args[0], str) else on_disk(out)
        print(f"\nminispatial train: interrupted; {what}", file=sys.stderr)
        return 130


def _main(parser, args, rest) -> int:
    try:
        overrides = parse_overrides(rest)
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after {args.stop_after} is invalid: must be an int >= 1 "
                             f"(the number of steps to train before stopping)")
        if args.resume:
            if overrides or args.config:
                raise ValueError("--resume takes the configuration from the checkpoint; "
                                 "do not pass config fields with it")
            if args.out is not None:
                raise ValueError(f"--resume {args.resume} continues that run in place (it writes to "
                                 f"{args.resume}): --out {args.out} cannot be given with it; to keep "
                                 f"{args.resume} as it is, copy it and resume the copy")
            out, cfg = Path(args.resume), None
        else:
            if not args.out:
                raise ValueError("--out DIR is required (or --resume DIR)")
            base = read_config_file(args.config) if args.config else None
            cfg = config_mod.make_config(overrides, preset=args.preset, base=base)
            check_run_memory(cfg.data, cfg.model, cfg.train.batch_size)
            out = Path(args.out)
    except (ValueError, OSError) as e:
        parser.print_usage(sys.stderr)
        print(f"minispatial train: error: {e}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        summary = train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite,
                        stop_after=args.stop_after, verbose=not args.quiet)
    except TrainingError as e:
        print(f"\nminispatial train: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, OSError) as e:
        print(f"\nminispatial train: error: {e}", file=sys.stderr)
        return 1
    if summary.get("stopped_early"):
        print(f"stopped after step {summary['step']}; continue with: minispatial train --resume {out}")
        return 0
    complete = summary.pop("already_complete", False)
    if complete:
        note = (f"the run in {out} is already complete (step {summary['step']}): nothing to train; "
                + ("its final checkpoint is evaluated now -> summary.json" if complete == "evaluated"
                   else "its metrics (summary.json):"))
        print(note, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(strict_json(summary), indent=2, sort_keys=True))
    else:
        from minispatial.evaluate import format_table

        if not complete:
            print(f"trained {summary['step']} steps in {time.perf_counter() - t0:.1f}s -> {out}")
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
