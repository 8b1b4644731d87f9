"""The trainer, top to bottom: config -> testbed -> params -> (batch, loss, grads, AdamW)* -> eval.

    minispatial train [--preset paper-left] [--config FILE.json] [--key value ...] --out DIR
    minispatial train --resume DIR

Files in DIR:
    config.json      the fully resolved RunConfig
    metrics.jsonl    one line per log step: step, loss, lr, logit_scale (exp), grad_norm, samples_per_s
    checkpoint.npz   params, AdamW state, step, config (written atomically: tmp file + rename)
    summary.json     final evaluation metrics (minispatial.evaluate.evaluate_all)

Determinism: the batch of step s is drawn from np.random.default_rng([train.seed, s]), so a run
resumed from its checkpoint at step s continues exactly as if it had never stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from minispatial import config as config_mod
from minispatial import ops
from minispatial.data import make_testbed, sample_batch
from minispatial.model import check_params, init_params, loss_and_grads
from minispatial.optim import adamw_init, adamw_step, clamp_logit_scale, clip_grads, flatten, lr_at

CHECKPOINT = "checkpoint.npz"
FORMAT_VERSION = 1


class TrainingError(RuntimeError):
    """Training stopped (a NaN loss, a bad run directory): the message says why."""


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


def load_checkpoint(path):
    """-> (cfg: RunConfig, params, opt_state, step). ValueError on a missing or corrupt file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ValueError ...
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    try:
        if int(data["meta/format"]) != FORMAT_VERSION:
            raise ValueError(f"format {int(data['meta/format'])}, expected {FORMAT_VERSION}")
        cfg = config_mod.from_dict(json.loads(str(data["meta/config"])))
        params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
        opt = {"t": int(data["meta/t"]),
               "m": {n: data[f"adam_m/{n}"] for n in params},
               "v": {n: data[f"adam_v/{n}"] for n in params}}
        step = int(data["meta/step"])
        check_params(params, cfg.model)
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is not a valid minispatial checkpoint: {e}") from None
    return cfg, params, opt, step


# --------------------------------------------------------------------------------------------
# progress: an in-place line on a terminal, plain lines otherwise

class Progress:
    def __init__(self, total: int, verbose: bool):
        self.total, self.verbose = total, verbose
        self.tty = verbose and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, sps: float, force: bool = False):
        if not self.verbose:
            return
        done = step + 1
        eta = (time.perf_counter() - self.t0) / max(1, done) * (self.total - done)
        line = f"step {done:>5}/{self.total}  loss {loss:.4f}  {sps:8.0f} samples/s  eta {eta:5.0f}s"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif force:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


# --------------------------------------------------------------------------------------------
# the training run

def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise TrainingError(f"--resume {out}: no {CHECKPOINT} there to resume from")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TrainingError(f"--out {out} exists and is not empty: pass --overwrite to replace "
                                f"it or --resume to continue it")
        for name in ("config.json", "metrics.jsonl", CHECKPOINT, "summary.json"):
            if (out / name).exists():
                (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


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


def train(cfg, out, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          verbose: bool = True) -> dict:
    """Train one dual encoder; return the summary (also written to out/summary.json).

    `stop_after=k` stops (with a checkpoint) after k steps of this invocation, to test resuming."""
    out = Path(out)
    prepare_out_dir(out, resume, overwrite)

    # 1. state: fresh, or from the checkpoint (whose config wins)
    if resume:
        cfg, params, opt, start = load_checkpoint(out / CHECKPOINT)
        flatten(params, opt)                                     # as adamw_init does
    else:
        params = init_params(cfg.model, cfg.train.seed)
        opt = adamw_init(params)
        start = 0
        (out / "config.json").write_text(config_mod.to_json(cfg) + "\n")
    tc, mc = cfg.train, cfg.model

    # 2. data
    testbed = make_testbed(cfg.data)
    split = testbed.splits["train"]
    dt = np.dtype(mc.dtype)

    # 3. metrics log (on resume, drop lines past the checkpoint so the log matches a clean run)
    mpath = out / "metrics.jsonl"
    lines = mpath.read_text().splitlines() if (resume and mpath.exists()) else []
    lines = [ln for ln in lines if json.loads(ln)["step"] <= start]
    mpath.write_text("".join(ln + "\n" for ln in lines))
    mlog = open(mpath, "a")

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
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                progress.update(step, loss, sps, force=True)
                t_last, n_last = now, 0
            else:
                progress.update(step, loss, n_last / max(time.perf_counter() - t_last, 1e-9))
            if done % tc.checkpoint_every == 0 and done < stop:
                _check_finite(params, done, out, last_saved, tc)       # never save a NaN state
                save_checkpoint(out / CHECKPOINT, cfg, params, opt, done)
                last_saved = done
    except KeyboardInterrupt:
        # an interrupt may land inside an update: keep the last checkpoint, never a torn state
        progress.close()
        raise KeyboardInterrupt(last_saved) from None
    finally:
        mlog.close()
    progress.close()
    _check_finite(params, stop, out, last_saved, tc)
    save_checkpoint(out / CHECKPOINT, cfg, params, opt, stop)
    if stop < tc.steps:
        return {"step": stop, "stopped_early": True}

    # 5. evaluation -> summary.json
    from minispatial.evaluate import evaluate_all

    summary = {"step": tc.steps, "backend": ops.get_backend(), "dtype": mc.dtype}
    summary.update(evaluate_all(params, testbed, mc))
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(strict_json(summary), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary


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
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="stop (with a checkpoint) after K steps of this invocation")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.resume:
            if overrides or args.config:
                raise ValueError("--resume takes the configuration from the checkpoint; "
                                 "do not pass config fields with it")
            out, cfg = Path(args.resume), None
        else:
            if not args.out:
                raise ValueError("--out DIR is required (or --resume DIR)")
            base = json.loads(Path(args.config).read_text()) if args.config else None
            cfg = config_mod.make_config(overrides, preset=args.preset, base=base)
            out = Path(args.out)
    except (ValueError, OSError) as e:
        parser.print_usage(sys.stderr)
        print(f"minispatial train: error: {e}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        summary = train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite,
                        stop_after=args.stop_after, verbose=not args.quiet)
    except (TrainingError, ValueError) as e:
        print(f"\nminispatial train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        step = e.args[0] if e.args else "?"
        print(f"\nminispatial train: interrupted; the checkpoint of step {step} is kept, "
              f"continue with --resume {out}", file=sys.stderr)
        return 130
    if summary.get("stopped_early"):
        print(f"stopped after step {summary['step']}; continue with: minispatial train --resume {out}")
        return 0
    if args.json:
        print(json.dumps(strict_json(summary), indent=2, sort_keys=True))
    else:
        from minispatial.evaluate import format_table

        print(f"trained {summary['step']} steps in {time.perf_counter() - t0:.1f}s -> {out}")
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
