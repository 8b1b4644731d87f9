"""The trainer, top to bottom: config -> testbed -> params -> (batch, loss, grads, AdamW)* -> eval.

    minispatial train [--preset paper-left] [--config FILE.json] [--key value ...] --out DIR
                      [--step fast|reference]
    minispatial train --resume DIR     (continues DIR in place; a finished run is not retrained)

One step, read top to bottom in `_train`: draw the batch of (seed, step), `loss_and_grads` (the
model's forward and hand-written backward), the global gradient norm (and clipping), the learning
rate of the schedule, one AdamW update, the logit-scale clamp. Which implementation of the step
runs is chosen once, in `train` (minispatial/step.py: the NumPy reference or the fast one).

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
import sys
import time
from pathlib import Path

import numpy as np

from minispatial import config as config_mod
from minispatial.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, write_atomic
from minispatial.data import make_testbed, sample_batch, sampler_cap
from minispatial.evaluate import evaluate_all
from minispatial.model import check_run_memory, init_params
from minispatial.optim import AdamW, clamp_logit_scale, clip_grads, lr_at
from minispatial.reporting import clean_json
from minispatial.rundir import (TrainingError, cannot_write, on_disk, prepare_out_dir, read_metrics,
                                unlock_run_dir)
from minispatial.step import STEPS, Step, choose


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
    sampler's cap on the training split (`data.sampler_cap`: its distinct scenes, or its examples
    with sampler "uniform"), is < 2: a batch of 1 learns nothing."""
    cap = sampler_cap(testbed.splits["train"], cfg.train.sampler)
    n = min(cfg.train.batch_size, cap)
    if n < 2:
        what = "distinct scenes" if cfg.train.sampler == "distinct" else "examples"
        raise TrainingError(f"the effective batch size is {n} (batch_size = {cfg.train.batch_size} capped "
                            f"at the {cap} {what} of the training split): it must be >= 2"
                            + config_mod.BATCH_WHY, exit_code=2)


def train(cfg, out, *, step: str = "fast", resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, verbose: bool = True) -> dict:
    """Train one dual encoder; return the summary (also written to out/summary.json).

    `step` "fast" (default) or "reference": which implementation of the same training step runs
    (minispatial/step.py); both give the same sums up to float rounding.
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
        check_run_memory(cfg.data, cfg.model, cfg.train.batch_size, cfg.train.sampler)
        testbed = make_testbed(cfg.data)
        check_batch(cfg, testbed)
    # The step: the reference (model.py + optim.py, plain NumPy) or the fast one (minispatial/fast/:
    # the same sums, less work). Everything below calls it through `step`.
    impl = choose(step) if isinstance(step, str) else step
    lock = prepare_out_dir(out, resume, overwrite)
    try:
        return _train(cfg, out, impl, testbed, resume, stop_after, verbose)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(on_disk(out)) from None
    except SystemError as e:
        # Ctrl-C inside a numba kernel surfaces as "returned a result with an exception set"
        if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt(on_disk(out)) from None
        raise
    finally:
        unlock_run_dir(out, lock)


def _train(cfg, out: Path, impl: Step, testbed, resume: bool, stop_after: int | None,
           verbose: bool) -> dict:
    # train() with `out` prepared and locked
    # 1. state: fresh, or from the checkpoint (whose config wins)
    if resume:
        try:
            cfg, params, saved, start = load_checkpoint(out / CHECKPOINT)
        except ValueError as e:
            raise TrainingError(str(e), exit_code=2) from None
        testbed = make_testbed(cfg.data)
        if start == cfg.train.steps:
            return _already_complete(cfg, out, impl, params, testbed)
        check_batch(cfg, testbed)
    else:
        params = init_params(cfg.model, cfg.train.seed)
        start = 0
        try:
            write_atomic(out / "config.json", config_mod.to_json(cfg) + "\n")
        except OSError as e:
            raise cannot_write(out / "config.json", e, out) from None
    tc, mc = cfg.train, cfg.model
    opt = AdamW(params, beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay,
                decay_embeddings=tc.decay_embeddings, update=impl.adamw_update)
    if resume:
        opt.load(saved["m"], saved["v"], saved["t"])
    params = opt.params                      # views into the optimizer's flat buffer

    # 2. data
    split = testbed.splits["train"]

    # 3. metrics log (on resume, drop lines past the checkpoint so the log matches a clean run)
    mpath = out / "metrics.jsonl"
    lines = read_metrics(mpath, start) if resume else []
    try:
        write_atomic(mpath, "".join(ln + "\n" for ln in lines))
        mlog = open(mpath, "a")
    except OSError as e:
        raise cannot_write(mpath, e, out) from None

    # 4. the loop
    progress = Progress(tc.steps, verbose)
    last_saved = start
    t_last, n_last = time.perf_counter(), 0
    stop = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    step = start
    try:
        for step in range(start, stop):
            rng = np.random.default_rng([tc.seed, step])            # batch from (seed, step)
            idx = sample_batch(split, tc.batch_size, rng, tc.sampler)
            loss, grads = impl.loss_and_grads(params, split.images[idx], split.tokens[idx],
                                              split.eot[idx], mc)
            gnorm = impl.global_norm(grads)
            clip_grads(grads, tc.grad_clip, gnorm)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                raise TrainingError(f"loss is {loss} (gradient norm {gnorm}) at step {step + 1}; "
                                    + _stopped(out, last_saved, tc))
            lr = lr_at(step, tc.lr, tc.warmup, tc.steps, tc.schedule, tc.min_lr_frac)
            opt.step(grads, lr)
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
                    raise cannot_write(mpath, e, out) from None
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
    return _evaluate(cfg, out, impl, params, testbed)


def _save(out: Path, cfg, params: dict, opt: AdamW, step: int) -> None:
    # save_checkpoint, a failed write (disk full) a TrainingError: the previous checkpoint is intact
    try:
        save_checkpoint(out / CHECKPOINT, cfg, params, {"t": opt.t, "m": opt.m, "v": opt.v}, step)
    except OSError as e:
        raise cannot_write(out / CHECKPOINT, e, out) from None


def _evaluate(cfg, out: Path, impl: Step, params: dict, testbed) -> dict:
    # the final evaluation -> summary, written to out/summary.json
    summary = {"step": cfg.train.steps, "backend": impl.backend, "dtype": cfg.model.dtype}
    summary.update(evaluate_all(params, testbed, cfg.model, impl.encoders))
    try:
        write_atomic(out / "summary.json", json.dumps(clean_json(summary), indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise cannot_write(out / "summary.json", e, out) from None
    return summary


def _already_complete(cfg, out: Path, impl: Step, params: dict, testbed) -> dict:
    # resuming a finished run: its summary.json, or (if missing or unreadable) a new evaluation
    try:
        summary = json.loads((out / "summary.json").read_text())
        if not isinstance(summary, dict) or summary.get("step") != cfg.train.steps:
            raise ValueError("not this run's summary")
        summary = {k: (math.nan if v is None else v) for k, v in summary.items()}
        evaluated = False
    except (OSError, ValueError):
        summary, evaluated = _evaluate(cfg, out, impl, params, testbed), True
    return {**summary, "already_complete": "evaluated" if evaluated else True}


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
    p.add_argument("--step", default="fast", choices=STEPS,
                   help="the training step: fast (default, minispatial/fast/) or reference (plain NumPy)")
    p.add_argument("--stop_after", "--stop-after", type=int, default=None, metavar="K",
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
            check_run_memory(cfg.data, cfg.model, cfg.train.batch_size, cfg.train.sampler)
            out = Path(args.out)
    except (ValueError, OSError) as e:
        parser.print_usage(sys.stderr)
        print(f"minispatial train: error: {e}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        summary = train(cfg, out, step=args.step, resume=bool(args.resume), overwrite=args.overwrite,
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
        print(json.dumps(clean_json(summary), indent=2, sort_keys=True))
    else:
        from minispatial.evaluate import format_table

        if not complete:
            print(f"trained {summary['step']} steps in {time.perf_counter() - t0:.1f}s -> {out}")
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
