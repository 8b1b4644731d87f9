"""Grid sweeps: one training run per (grid point, seed), run as subprocesses, results in one CSV.

    minispatial sweep --grid n_pair=5,10,15 [--grid KEY=V1,V2 ...] --seeds 0-4
                      [--key value ...] [--preset NAME] --out DIR [--workers N] [--quiet]

Every combination is validated with `config.make_config`, and DIR is checked to be a writable
directory, before anything runs. Each run is
`python -m minispatial train --out DIR/runs/<name> --preset P --quiet --key=value ...`, at most
`--workers` at a time, each single-threaded (OMP/OpenBLAS/MKL/numba threads = 1) so results do not
depend on the machine's load. Run names are the grid values then the seed: `n_pair=5__seed=0`.
A config field fixed for every run is given as for `minispatial train`, `--steps 1500` (or, as
before, `--set steps=1500`).

Resuming: a run whose summary.json exists is skipped (after checking its config.json is the
config this sweep asks for); a run directory without summary.json (interrupted or failed) is
trained again with --overwrite. A failed run (non-zero exit) is recorded with the last lines of its
stderr and does not stop the sweep.

Several invocations into one DIR add up: results.csv and summary.csv hold every finished run under
DIR/runs (of this or any earlier invocation), not only this invocation's grid. Their grid columns
are the union of every invocation's grid keys, then any other config field whose value differs
between runs (e.g. `steps` if two invocations used different --steps); a run whose own grid
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
    figures/generalisation.png  single-object, seen- and unseen-pair accuracy, mean and 95%
                      t-interval over seeds; `minispatial sweep --out DIR --replot` rebuilds the
                      figures from results.csv without training
results.csv, summary.csv and sweep.json are replaced atomically (temporary file + rename): a
failed write (disk full) leaves the previous file whole.

Exit code: 0 if every run succeeded, 1 if some failed (or results.csv could not be written),
2 on bad arguments (including an --out that is not a writable directory or is in use by another
sweep), 130 if interrupted.

The modules, in the order a sweep uses them (each imports only those before it):
    plan.py      the command line's grid, seeds and fixed settings -> the runs and their configs
    results.py   reading run directories and the history in sweep.json; results.csv, summary.csv
    figures.py   the PNGs of key metrics (matplotlib through reporting.pyplot)
    runner.py    the sweep directory (checked, locked) and the training subprocesses (Ctrl-C, kill -9)
    cli.py       `minispatial sweep`: main
"""
