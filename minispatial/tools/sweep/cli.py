"""`minispatial sweep`: validate everything, lock DIR, train the runs, write the results.

    minispatial sweep --grid n_pair=5,10,15 [--grid KEY=V1,V2 ...] --seeds 0-4
                      [--key value ...] [--set key=value ...] [--preset NAME] --out DIR
                      [--workers N] [--quiet]
    minispatial sweep --out DIR --replot     (figures again from DIR/results.csv, no training)

What a sweep does and the files it writes: minispatial/tools/sweep/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minispatial import config as config_mod
from minispatial.reporting import PLOT_INSTALL
from minispatial.tools.sweep import figures, plan, results, runner
from minispatial.tools.sweep.runner import OutDirError

INTERRUPTED = "minispatial sweep: interrupted; run the same command again to resume"
# the sweep's own options (whether each takes a value); every other --word is a config field
OPTIONS = {"--grid": True, "--seeds": True, "--set": True, "--preset": True, "--out": True,
           "--workers": True, "--quiet": False, "--replot": False, "--help": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minispatial sweep", allow_abbrev=False,      # `--seed` is a config field, not --seeds
        usage="minispatial sweep --out DIR [--grid KEY=V1,V2,...] [--seeds S] [--key value ...] "
              "[--preset NAME] [--workers N] [--quiet] | minispatial sweep --out DIR --replot",
        description="Train one run per (grid point, seed) in subprocesses and collect results.csv, "
                    "summary.csv (mean/std over seeds) and figures. Any config field of "
                    "`minispatial train` is fixed for every run as there: --name value "
                    "(`minispatial train --help` lists them).",
        epilog="example: minispatial sweep --grid n_pair=5,10,15 --seeds 0-4 --steps 1500 "
               "--out sweeps/n_pair")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config field and its values (repeatable: the Cartesian product is run)")
    p.add_argument("--seeds", default="0", help="seeds: a range '0-4' or a list '0,2,5' (default 0); "
                                                "sets `seed` (testbed and training)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a config field fixed for every run (repeatable); the same as --KEY VALUE")
    p.add_argument("--preset", default="paper-left", choices=sorted(config_mod.PRESETS),
                   help="starting configuration of every run (default paper-left)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--quiet", action="store_true", help="no line per finished run")
    p.add_argument("--replot", action="store_true",
                   help="only rebuild DIR/figures from DIR/results.csv (no training; every other "
                        "option is ignored)")
    return p


def _error(parser, message: str, usage: bool = True) -> None:
    if usage:
        parser.print_usage(sys.stderr)
    print(f"minispatial sweep: error: {message}", file=sys.stderr)


def split_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """argv -> (the sweep's own options, for argparse; the fixed config fields in the order given,
    as (flag, text) pairs: ("--set", "steps=5") or ("--steps", "5")). Every `--word` that is not
    an option of the sweep is a config field, `--word value` or `--word=value` (value None when
    no value follows: the end of the line or another `--option`)."""
    own, fixed = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        flag, eq, value = a.partition("=")
        if not a.startswith("--") or a == "--" or flag in OPTIONS:
            takes_value = OPTIONS.get(flag, False) and not eq
            own += argv[i:i + 2] if takes_value else [a]
            if flag == "--set":
                fixed.append(("--set", value if eq else argv[i + 1] if i + 1 < len(argv) else ""))
            i += 2 if takes_value else 1
        elif eq:
            fixed.append((flag, value))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            fixed.append((a, argv[i + 1]))
            i += 2
        else:
            fixed.append((a, None))
            i += 1
    return own, fixed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    own, fixed = split_args(argv)
    try:
        args = parser.parse_args(own)
    except SystemExit as e:  # argparse printed the message (or the help)
        return e.code if isinstance(e.code, int) else 2
    if args.replot:
        return _replot(parser, Path(args.out))
    try:
        try:                              # everything is validated before anything runs
            if args.workers < 1:
                raise ValueError(f"--workers {args.workers} is invalid: must be >= 1")
            seeds = plan.parse_seeds(args.seeds)
            grid = plan.parse_grid(args.grid)
            sets = plan.fixed_settings(fixed)
            plan.check_no_overlap(grid, sets)
            runs = plan.plan_runs(grid, seeds, sets)
            cfgs = plan.validate(runs, args.preset)
            try:
                out = Path(args.out).resolve()
            except (OSError, RuntimeError) as e:          # a symlink loop
                raise OutDirError(f"--out {args.out} is invalid: {e}") from None
            runner.prepare_out_dir(out)
        except (ValueError, OutDirError) as e:
            _error(parser, str(e))
            return 2
        try:
            with runner.out_dir_lock(out) as lock_fd:
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
        plan.check_existing(runs, cfgs, out / "runs")
        history = results.read_history(out)
        earlier = results.earlier_runs(out, runs, history)
    except ValueError as e:
        _error(parser, str(e))
        return 2
    this = {"command": ["minispatial", "sweep", *argv], "preset": args.preset, "grid": grid,
            "seeds": seeds, "set": sets, "workers": args.workers, "runs": [r.name for r in runs]}
    started = {**this, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        results.write_atomic(out / "sweep.json",
                             json.dumps({**this, "invocations": [*history, started]}, indent=2) + "\n")
    except OSError as e:
        _error(parser, f"cannot write {e.filename}: {e.strerror}")
        return 2
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    records, interrupted = runner.run_all(runs, out, args.preset, args.workers, say, pass_fds)
    entries = [(r, cfgs[r.name]) for r in runs] + earlier
    union, extras = results.result_keys(grid, history, {r.name for r, _ in entries}, [c for _, c in entries])
    try:
        rows = results.write_tables(out, entries, union, extras, records)
        grid_values = figures.figure_grid(rows, [*union, *extras], union)
        try:
            written = figures.all_figures(rows, grid_values, out / "figures")
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), e.filename or str(out / "figures")) from None
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
    if written is None:
        print(f"matplotlib is not installed: no figures ({PLOT_INSTALL})")
    fig_note = f", {len(written)} figures in {out / 'figures'}" if written else ""
    int_note = f", {n_int} interrupted" if n_int else ""
    kept = f"; {len(earlier)} finished runs of earlier invocations kept" if earlier else ""
    print(f"sweep: {n_ok} ok, {len(failed)} failed{int_note}, {len(rows) - n_ok - len(failed) - n_int} "
          f"not run -> {out / 'results.csv'}, {out / 'summary.csv'}{fig_note}{kept}")
    if interrupted:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 1 if failed else 0


def _replot(parser, out: Path) -> int:
    """--replot: DIR/figures again from DIR/results.csv -> 0, 1 without matplotlib, 2 when
    results.csv cannot be read."""
    try:
        written = figures.replot(out)
    except OSError as e:
        _error(parser, f"--replot needs {out / 'results.csv'}: {e.strerror or e}", usage=False)
        return 2
    if written is None:
        print(f"matplotlib is not installed: no figures ({PLOT_INSTALL})", file=sys.stderr)
        return 1
    print(f"replot: {len(written)} figures in {out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
