"""`minispatial sweep` end to end: validation before launch, and small real sweeps (each run a
real `minispatial train` subprocess of a few steps of the `tiny` preset)
(minispatial/tools/sweep/cli.py)."""

import csv
import json
import sys

import pytest

from minispatial.tools.sweep import cli, runner

FAST = ["--preset", "tiny", "--steps", "3", "--workers", "1", "--quiet"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("args, msg", [
    (["--grid", "n_pair=5,99"], "run n_pair=99__seed=0: TestbedConfig.n_pair=99"),
    (["--grid", "n_pairs=5"], "unknown config field 'n_pairs'"),
    (["--set", "lr=fast"], "lr='fast' is invalid"),
    (["--grid", "seed=1,2"], "--seeds"),
    (["--seeds", "2-1"], "--seeds"),
    (["--workers", "0"], "--workers"),
    (["--workrs", "2"], "unknown option or config field --workrs"),
    (["--seed", "3"], "--seeds and --seed both set data.seed"),
    (["--steps", "3", "--set", "steps=4"], "steps is given twice"),
    (["--grid", "n_pair=5", "--lr"], "--lr needs a value"),
])
def test_bad_settings_are_rejected_before_anything_runs(tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.setattr(runner.subprocess, "Popen", None)        # any launch would crash
    out = tmp_path / "sw"
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "minispatial sweep: error:" in err and msg in err
    assert not out.exists()


def test_split_args_sweep_options_and_config_fields():
    argv = ["--grid", "n_pair=5,6", "--lr", "0.003", "--set", "steps=3", "--out", "d", "--quiet",
            "--n_layout=4", "--min_lr_frac", "-0.5", "--set=batch_size=8", "--seeds", "0-1"]
    own, fixed = cli.split_args(argv)
    assert own == ["--grid", "n_pair=5,6", "--set", "steps=3", "--out", "d", "--quiet",
                   "--set=batch_size=8", "--seeds", "0-1"]
    assert fixed == [("--lr", "0.003"), ("--set", "steps=3"), ("--n_layout", "4"),
                     ("--min_lr_frac", "-0.5"), ("--set", "batch_size=8")]
    assert cli.split_args(["--out", "d", "--lr"]) == (["--out", "d"], [("--lr", None)])
    assert cli.split_args(["--lr", "--out", "d"]) == (["--out", "d"], [("--lr", None)])


# ------------------------------------------------------------------------------- real sweeps

def test_tiny_sweep_runs_writes_results_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    assert cli.main(["--grid", "n_pair=5,6", "--seeds", "0", *FAST, "--out", str(out)]) == 0
    rows = read_rows(out / "results.csv")
    assert [r["run"] for r in rows] == ["n_pair=5__seed=0", "n_pair=6__seed=0"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    cols = list(rows[0])
    assert cols[:6] == ["run", "status", "error", "n_pair", "seed", "wall_s"]
    for r in rows:
        assert 0.0 <= float(r["val_unseen_pair.lr_acc"]) <= 1.0
        assert float(r["wall_s"]) > 0 and r["step"] == "3"
        assert (out / "runs" / r["run"] / "summary.json").is_file()
    info = json.loads((out / "sweep.json").read_text())
    assert info["grid"] == {"n_pair": ["5", "6"]} and info["seeds"] == [0]
    assert info["set"] == {"steps": "3"} and info["preset"] == "tiny"
    summ = read_rows(out / "summary.csv")
    assert [s["n_pair"] for s in summ] == ["5", "6"]
    assert "val_unseen_pair.lr_acc.mean" in summ[0] and summ[0]["n_ok"] == "1"
    try:
        import matplotlib  # noqa: F401
        assert (out / "figures" / "val_unseen_pair.lr_acc.png").is_file()
    except ImportError:
        pass
    capsys.readouterr()

    # again: everything is skipped and nothing is launched
    monkeypatch.setattr(runner.subprocess, "Popen", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["--grid", "n_pair=5,6", "--seeds", "0", "--preset", "tiny", "--set", "steps=3", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (done)") == 2 and "matplotlib is not installed" in printed
    assert "[2/2] n_pair=6 seed=0 skipped (done)" in printed
    assert [r["status"] for r in read_rows(out / "results.csv")] == ["ok", "ok"]

    # a different fixed setting into the same directory is refused
    assert cli.main(["--grid", "n_pair=5", "--preset", "tiny", "--set", "steps=4", "--out", str(out)]) == 2
    assert "another config" in capsys.readouterr().err


def test_failed_run_is_recorded_and_retried(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["--grid", "lr=1e30", "--seeds", "0", *FAST, "--out", str(out)]
    assert cli.main(args) == 1                                 # the sweep finishes, reports failure
    (row,) = read_rows(out / "results.csv")
    assert row["status"] == "failed" and "loss is nan" in row["error"]
    assert all(v == "" for k, v in row.items() if "." in k)      # no metrics
    assert "failed" in capsys.readouterr().err
    # the run directory exists without summary.json: the next invocation retries with --overwrite
    assert (out / "runs" / "lr=1e30__seed=0").is_dir()
    assert cli.main(args) == 1
    record = json.loads((out / "logs" / "lr=1e30__seed=0.json").read_text())
    assert "--overwrite" in record["command"] and record["status"] == "failed"


def _rows_by_run(path):
    return {r["run"]: r for r in read_rows(path)}


def test_rerun_with_a_narrower_grid_keeps_every_finished_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)             # no figures: faster
    out = tmp_path / "sw"
    assert cli.main(["--grid", "n_pair=5,7", "--seeds", "0-1", *FAST, "--workers", "2",
                       "--out", str(out)]) == 0
    first = _rows_by_run(out / "results.csv")
    first_summary = read_rows(out / "summary.csv")
    assert len(first) == 4 and len(first_summary) == 2

    # the same directory, only n_pair=5: nothing runs, the n_pair=7 rows stay, values unchanged
    assert cli.main(["--grid", "n_pair=5", "--seeds", "0-1", *FAST, "--out", str(out)]) == 0
    rows = read_rows(out / "results.csv")
    assert [r["run"] for r in rows] == ["n_pair=5__seed=0", "n_pair=5__seed=1",
                                        "n_pair=7__seed=0", "n_pair=7__seed=1"]
    assert {r["run"]: r for r in rows} == first                 # every value, wall_s included
    assert read_rows(out / "summary.csv") == first_summary
    info = json.loads((out / "sweep.json").read_text())
    assert info["grid"] == {"n_pair": ["5"]}                   # the last invocation, as before
    assert [inv["grid"] for inv in info["invocations"]] == [{"n_pair": ["5", "7"]}, {"n_pair": ["5"]}]

    # another grid key and another fixed setting: columns of the union, filled from config.json
    assert cli.main(["--grid", "lr=1e-3,3e-4", "--seeds", "0", "--preset", "tiny",
                       "--set", "steps=4", "--workers", "2", "--quiet", "--out", str(out)]) == 0
    rows = read_rows(out / "results.csv")
    cols = list(rows[0])
    assert cols[:8] == ["run", "status", "error", "lr", "n_pair", "steps", "seed", "wall_s"]
    by = {r["run"]: r for r in rows}
    assert [r["run"] for r in rows][:2] == ["lr=1e-3__seed=0", "lr=3e-4__seed=0"]
    assert (by["lr=3e-4__seed=0"]["n_pair"], by["lr=3e-4__seed=0"]["steps"]) == ("15", "4")
    old = by["n_pair=7__seed=1"]
    assert (old["lr"], old["n_pair"], old["steps"]) == ("1e-3", "7", "3")   # spelled as in the grid
    assert {k: v for k, v in old.items() if k not in ("lr", "steps")} == first["n_pair=7__seed=1"]
    groups = [(s["lr"], s["n_pair"], s["steps"], s["n_runs"]) for s in read_rows(out / "summary.csv")]
    assert groups == [("1e-3", "15", "4", "1"), ("3e-4", "15", "4", "1"),
                      ("1e-3", "5", "3", "2"), ("1e-3", "7", "3", "2")]
    assert len(json.loads((out / "sweep.json").read_text())["invocations"]) == 3


def test_finished_run_with_unreadable_config_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    stray = out / "runs" / "n_pair=9__seed=0"
    stray.mkdir(parents=True)
    (stray / "summary.json").write_text('{"step": 3}\n')
    (stray / "config.json").write_text("{not json")
    monkeypatch.setattr(runner.subprocess, "Popen", None)        # any launch would crash
    assert cli.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "minispatial sweep: error:" in err and str(stray / "config.json") in err
    assert "results.csv" in err                                 # says why it matters


def test_old_sweep_json_without_history_is_kept_as_the_first_invocation(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "sw"
    assert cli.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 0
    info = json.loads((out / "sweep.json").read_text())
    old = {k: v for k, v in info.items() if k != "invocations"}          # as written before
    (out / "sweep.json").write_text(json.dumps(old))
    assert cli.main(["--grid", "n_pair=6", *FAST, "--out", str(out)]) == 0
    invs = json.loads((out / "sweep.json").read_text())["invocations"]
    assert [i["grid"] for i in invs] == [{"n_pair": ["5"]}, {"n_pair": ["6"]}]
    assert [r["run"] for r in read_rows(out / "results.csv")] == ["n_pair=6__seed=0", "n_pair=5__seed=0"]
