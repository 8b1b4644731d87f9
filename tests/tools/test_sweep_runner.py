"""Running a sweep's trainings: the training command and the error a failed run reports
(minispatial/tools/sweep/runner.py; the sweep directory's lock, kill -9 and Ctrl-C are in
test_sweep_faults.py)."""

import sys

from minispatial.tools.sweep import plan, runner


def test_train_command_is_single_threaded_and_complete(tmp_path):
    run = plan.plan_runs({"n_pair": ["5"]}, [2], {"steps": "3"})[0]
    cmd = runner.Runner(tmp_path, "tiny").command(run, overwrite=True)
    assert cmd[:4] == [sys.executable, "-m", "minispatial", "train"]
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "runs" / "n_pair=5__seed=2")
    assert cmd[cmd.index("--preset") + 1] == "tiny"
    assert {"--steps=3", "--n_pair=5", "--seed=2", "--overwrite"} <= set(cmd)
    assert all(runner.SINGLE_THREAD_ENV[k] == "1" for k in
               ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"))


def test_error_message_prefers_the_error_line(tmp_path):
    p = tmp_path / "err"
    p.write_text("x.py:1: RuntimeWarning: overflow\n  a = b @ c\n\nminispatial train: error: loss is nan\n")
    assert runner.error_message(p) == "minispatial train: error: loss is nan"
    p.write_text("Traceback (most recent call last):\n  File \"x\", line 1\nKeyError: 'w'\n")
    assert runner.error_message(p) == "KeyError: 'w'"
    p.write_text("one\ntwo\nthree\nfour\n")
    assert runner.error_message(p) == "two | three | four"
    assert runner.error_message(tmp_path / "missing") == ""
