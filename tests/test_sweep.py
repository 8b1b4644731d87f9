"""The sweep driver: parsing, planning, validation before launch, aggregation, and small real sweeps
(each run a real `minispatial train` subprocess of a few steps of the `tiny` preset)."""

import csv
import json
import math
import sys

import numpy as np
import pytest

from minispatial import sweep

FAST = ["--preset", "tiny", "--set", "steps=3", "--workers", "1", "--quiet"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, want", [("0-4", [0, 1, 2, 3, 4]), ("0,2,5", [0, 2, 5]),
                                        ("3", [3]), ("0-2,7", [0, 1, 2, 7]), (" 1 , 4 ", [1, 4])])
def test_parse_seeds(text, want):
    assert sweep.parse_seeds(text) == want


@pytest.mark.parametrize("text", ["", "a", "4-2", "1,1", "-1", "0-", "1.5", "0-2,2"])
def test_parse_seeds_rejects(text):
    with pytest.raises(ValueError, match="--seeds"):
        sweep.parse_seeds(text)


def test_parse_grid_and_sets():
    assert sweep.parse_grid(["n_pair=5,10,15", "lr=1e-3"]) == {"n_pair": ["5", "10", "15"], "lr": ["1e-3"]}
    assert sweep.parse_grid(["n-pair=5"]) == {"n_pair": ["5"]}          # dashes as in --n-pair
    assert sweep.parse_grid(["data.n_layout=5,20"]) == {"data.n_layout": ["5", "20"]}
    assert sweep.parse_sets(["steps=5", "caption_mode=left+right"]) == {"steps": "5", "caption_mode": "left+right"}
    for bad, msg in [("n_pair", "KEY=V1"), ("n_pair=", "empty"), ("n_pair=5,,6", "empty"),
                     ("n_pair=5,5", "repeats"), ("bogus=1,2", "unknown config field 'bogus'")]:
        with pytest.raises(ValueError, match=msg):
            sweep.parse_grid([bad])
    with pytest.raises(ValueError, match="twice"):
        sweep.parse_grid(["n_pair=5", "n_pair=6"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.parse_sets(["steps"])


def test_overlapping_settings_are_rejected():
    sweep.check_no_overlap({"n_pair": ["5"]}, {"steps": "5"})
    with pytest.raises(ValueError, match="data.n_pair"):
        sweep.check_no_overlap({"n_pair": ["5"]}, {"data.n_pair": "6"})
    with pytest.raises(ValueError, match="--seeds"):
        sweep.check_no_overlap({}, {"train.seed": "1"})


def test_plan_runs_order_names_and_overrides():
    runs = sweep.plan_runs({"n_pair": ["5", "10"], "lr": ["1e-3", "3e-4"]}, [0, 1], {"steps": "7"})
    assert [r.name for r in runs[:3]] == ["n_pair=5__lr=1e-3__seed=0", "n_pair=5__lr=1e-3__seed=1",
                                          "n_pair=5__lr=3e-4__seed=0"]
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[-1].overrides == {"steps": "7", "n_pair": "10", "lr": "3e-4", "seed": "1"}
    assert sweep.run_name({"caption_mode": "left+right"}, 2) == "caption_mode=left+right__seed=2"
    assert sweep.run_name({"x": "a/b c"}, 0) == "x=a_b_c__seed=0"
    assert sweep.plan_runs({}, [3], {})[0].name == "seed=3"


def test_train_command_is_single_threaded_and_complete(tmp_path):
    run = sweep.plan_runs({"n_pair": ["5"]}, [2], {"steps": "3"})[0]
    cmd = sweep.Runner(tmp_path, "tiny").command(run, overwrite=True)
    assert cmd[:4] == [sys.executable, "-m", "minispatial", "train"]
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "runs" / "n_pair=5__seed=2")
    assert cmd[cmd.index("--preset") + 1] == "tiny"
    assert {"--steps=3", "--n_pair=5", "--seed=2", "--overwrite"} <= set(cmd)
    assert all(sweep.SINGLE_THREAD_ENV[k] == "1" for k in
               ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"))


@pytest.mark.parametrize("args, msg", [
    (["--grid", "n_pair=5,99"], "run n_pair=99__seed=0: TestbedConfig.n_pair=99"),
    (["--grid", "n_pairs=5"], "unknown config field 'n_pairs'"),
    (["--set", "lr=fast"], "lr='fast' is invalid"),
    (["--grid", "seed=1,2"], "--seeds"),
    (["--seeds", "2-1"], "--seeds"),
    (["--workers", "0"], "--workers"),
])
def test_bad_settings_are_rejected_before_anything_runs(tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.setattr(sweep.subprocess, "Popen", None)        # any launch would crash
    out = tmp_path / "sw"
    assert sweep.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "minispatial sweep: error:" in err and msg in err
    assert not out.exists()


def test_error_message_prefers_the_error_line(tmp_path):
    p = tmp_path / "err"
    p.write_text("x.py:1: RuntimeWarning: overflow\n  a = b @ c\n\nminispatial train: error: loss is nan\n")
    assert sweep.error_message(p) == "minispatial train: error: loss is nan"
    p.write_text("Traceback (most recent call last):\n  File \"x\", line 1\nKeyError: 'w'\n")
    assert sweep.error_message(p) == "KeyError: 'w'"
    p.write_text("one\ntwo\nthree\nfour\n")
    assert sweep.error_message(p) == "two | three | four"
    assert sweep.error_message(tmp_path / "missing") == ""


# ------------------------------------------------------------------------------- aggregation

def test_aggregate_mean_and_sample_std_ignoring_nan_and_failures():
    rows = [
        {"run": "a0", "status": "ok", "error": "", "n_pair": "5", "seed": 0, "m": 0.5, "k": "x"},
        {"run": "a1", "status": "ok", "error": "", "n_pair": "5", "seed": 1, "m": 0.7, "k": "x"},
        {"run": "a2", "status": "ok", "error": "", "n_pair": "5", "seed": 2, "m": "nan", "k": "x"},
        {"run": "a3", "status": "failed", "error": "boom", "n_pair": "5", "seed": 3, "m": 9.0, "k": "x"},
        {"run": "b0", "status": "ok", "error": "", "n_pair": "10", "seed": 0, "m": "0.9", "k": "x"},
        {"run": "b1", "status": "failed", "error": "boom", "n_pair": "10", "seed": 1, "k": ""},
    ]
    agg = sweep.aggregate(rows, ["n_pair"])
    assert [g["n_pair"] for g in agg] == ["5", "10"]
    a, b = agg
    assert (a["n_runs"], a["n_ok"], b["n_runs"], b["n_ok"]) == (4, 3, 2, 1)
    assert a["m.mean"] == pytest.approx(0.6)
    assert a["m.std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert b["m.mean"] == pytest.approx(0.9) and math.isnan(b["m.std"])   # one value: no std
    assert "k.mean" not in a and "seed.mean" not in a                     # non-numeric, seed
    assert sweep.aggregate(rows, [], ["m"])[0]["m.mean"] == pytest.approx(0.7)


def test_plot_figures_from_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"status": "ok", "n_pair": str(p), "n_layout": str(l), "seed": s,
             "val_unseen_pair.lr_acc": 0.5 + 0.02 * p + 0.01 * s, "val_single.i2t_acc": "nan"}
            for p in (5, 10) for l in (5, 20) for s in (0, 1)]
    files = sweep.plot_figures(rows, {"n_pair": ["5", "10"], "n_layout": ["5", "20"]}, tmp_path / "fig")
    assert [f.name for f in files] == ["val_unseen_pair.lr_acc.png"]      # NaN-only metrics skipped
    assert files[0].stat().st_size > 1000
    # categorical first key, no grid at all
    assert sweep.plot_figures(rows, {"caption_mode": ["left", "left+right"]}, tmp_path / "f2")
    assert sweep.plot_figures(rows, {}, tmp_path / "f3")


def test_plot_figures_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)                 # import fails
    assert sweep.plot_figures([], {"n_pair": ["5"]}, tmp_path / "fig") is None


# ------------------------------------------------------------------------------- real sweeps

def test_tiny_sweep_runs_writes_results_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    assert sweep.main(["--grid", "n_pair=5,6", "--seeds", "0", *FAST, "--out", str(out)]) == 0
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
    monkeypatch.setattr(sweep.subprocess, "Popen", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["--grid", "n_pair=5,6", "--seeds", "0", "--preset", "tiny", "--set", "steps=3", "--out", str(out)]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (done)") == 2 and "matplotlib is not installed" in printed
    assert "[2/2] n_pair=6 seed=0 skipped (done)" in printed
    assert [r["status"] for r in read_rows(out / "results.csv")] == ["ok", "ok"]

    # a different fixed setting into the same directory is refused
    assert sweep.main(["--grid", "n_pair=5", "--preset", "tiny", "--set", "steps=4", "--out", str(out)]) == 2
    assert "another config" in capsys.readouterr().err


def test_failed_run_is_recorded_and_retried(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["--grid", "lr=1e30", "--seeds", "0", *FAST, "--out", str(out)]
    assert sweep.main(args) == 1                                 # the sweep finishes, reports failure
    (row,) = read_rows(out / "results.csv")
    assert row["status"] == "failed" and "loss is nan" in row["error"]
    assert all(v == "" for k, v in row.items() if "." in k)      # no metrics
    assert "failed" in capsys.readouterr().err
    # the run directory exists without summary.json: the next invocation retries with --overwrite
    assert (out / "runs" / "lr=1e30__seed=0").is_dir()
    assert sweep.main(args) == 1
    record = json.loads((out / "logs" / "lr=1e30__seed=0.json").read_text())
    assert "--overwrite" in record["command"] and record["status"] == "failed"


def _rows_by_run(path):
    return {r["run"]: r for r in read_rows(path)}


def test_rerun_with_a_narrower_grid_keeps_every_finished_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)             # no figures: faster
    out = tmp_path / "sw"
    assert sweep.main(["--grid", "n_pair=5,7", "--seeds", "0-1", *FAST, "--workers", "2",
                       "--out", str(out)]) == 0
    first = _rows_by_run(out / "results.csv")
    first_summary = read_rows(out / "summary.csv")
    assert len(first) == 4 and len(first_summary) == 2

    # the same directory, only n_pair=5: nothing runs, the n_pair=7 rows stay, values unchanged
    assert sweep.main(["--grid", "n_pair=5", "--seeds", "0-1", *FAST, "--out", str(out)]) == 0
    rows = read_rows(out / "results.csv")
    assert [r["run"] for r in rows] == ["n_pair=5__seed=0", "n_pair=5__seed=1",
                                        "n_pair=7__seed=0", "n_pair=7__seed=1"]
    assert {r["run"]: r for r in rows} == first                 # every value, wall_s included
    assert read_rows(out / "summary.csv") == first_summary
    info = json.loads((out / "sweep.json").read_text())
    assert info["grid"] == {"n_pair": ["5"]}                   # the last invocation, as before
    assert [inv["grid"] for inv in info["invocations"]] == [{"n_pair": ["5", "7"]}, {"n_pair": ["5"]}]

    # another grid key and another fixed setting: columns of the union, filled from config.json
    assert sweep.main(["--grid", "lr=1e-3,3e-4", "--seeds", "0", "--preset", "tiny",
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
    monkeypatch.setattr(sweep.subprocess, "Popen", None)        # any launch would crash
    assert sweep.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "minispatial sweep: error:" in err and str(stray / "config.json") in err
    assert "results.csv" in err                                 # says why it matters


def test_old_sweep_json_without_history_is_kept_as_the_first_invocation(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "sw"
    assert sweep.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 0
    info = json.loads((out / "sweep.json").read_text())
    old = {k: v for k, v in info.items() if k != "invocations"}          # as written before
    (out / "sweep.json").write_text(json.dumps(old))
    assert sweep.main(["--grid", "n_pair=6", *FAST, "--out", str(out)]) == 0
    invs = json.loads((out / "sweep.json").read_text())["invocations"]
    assert [i["grid"] for i in invs] == [{"n_pair": ["5"]}, {"n_pair": ["6"]}]
    assert [r["run"] for r in read_rows(out / "results.csv")] == ["n_pair=6__seed=0", "n_pair=5__seed=0"]
