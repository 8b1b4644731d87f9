"""Fault injection at the process level: `python -m minispatial train ...` in a subprocess, fed bad
files and killed, interrupted, starved of disk or raced at the worst moments. Every case checks
the exit code (2 bad arguments or input files, 1 a failed run, 130 Ctrl-C), a one-line
`minispatial train: ...` message naming the path, no Python traceback, and that nothing finished
is lost: the last checkpoint still loads and resuming it completes the run.

The phases are reached by watching the run directory (a metrics line, checkpoint.npz, its step),
never by a hook in the product. Each run uses the `tiny` preset (seconds) and the default
(fast) training step, as a user's command does; only the run under test is a subprocess, what
sets it up or checks it afterwards runs in this process (`train.main`, `train.train`), which
saves a second of start-up per run."""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minispatial import config, evaluate, train
from minispatial.checkpoint import CHECKPOINT, load_checkpoint
from minispatial.rundir import LOCK_FILE

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
TINY = ["--preset", "tiny", "--quiet"]
LONG = ["--steps", "100000"]                     # a run that is still going when it is signalled


def cli(*args, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minispatial", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, preexec_fn=preexec_fn)


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def faults_no_stray_trainers():
    """A failing test must not leave a 100000-step trainer running."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start(*args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "minispatial", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(cond, proc: subprocess.Popen | None = None, timeout=120.0, what=""):
    """Poll cond() every 5 ms until it is true; fail if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def ckpt_step(d: Path) -> int | None:
    """The step of d/checkpoint.npz, None while there is none (it is replaced atomically)."""
    try:
        with np.load(d / CHECKPOINT) as z:
            return int(z["meta/step"])
    except (OSError, KeyError, ValueError):
        return None


def n_metrics(d: Path) -> int:
    try:
        return (d / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def message(rc: int, err: str, code: int, *needles: str) -> str:
    """The one `minispatial train: ...` line of stderr, after checking the exit code, that there is
    no traceback and that the line contains every needle."""
    assert rc == code, f"exit {rc}, expected {code}: {err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("minispatial ")]
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(d: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def run_files(d: Path) -> dict:
    """What a reader of the run sees (the lock file aside)."""
    return {k: v for k, v in snapshot(d).items() if k != LOCK_FILE}


def suggested_command(line: str, after: str) -> list[str]:
    """The command a message suggests after `after`, as argv for this interpreter."""
    cmd = shlex.split(line.split(after, 1)[1].strip().rstrip(".;"))
    assert cmd[:2] in (["minispatial", "train"], ["minispatial", "eval"]), cmd
    return cmd[1:]


def limit_file_size(nbytes: int):
    """preexec_fn: a full disk, as RLIMIT_FSIZE: writes past nbytes fail with EFBIG."""
    def f():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return f


# --------------------------------------------------------------------------------------------
# outputs that cannot be written: exit 1, the path named, nothing left behind

def test_out_is_an_existing_regular_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    p = cli("train", "--out", f, *TINY)
    message(p.returncode, p.stderr, 1, str(f), "not a directory")
    assert f.read_text() == "mine"


def test_out_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "run"                    # ENOTDIR
    p = cli("train", "--out", out, *TINY)
    message(p.returncode, p.stderr, 1, str(out), "Not a directory")


def test_out_on_a_read_only_file_system(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        out = mnt / "run"
        p = cli("train", "--out", out, *TINY)
        message(p.returncode, p.stderr, 1, str(out), "Read-only file system")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    d = tmp_path / "run"
    assert train.main(["--out", str(d), *TINY, "--stop_after", "10"]) == 0
    good = (d / CHECKPOINT).read_bytes()
    assert len(good) > 50_000
    p = cli("train", "--resume", d, "--quiet", preexec_fn=limit_file_size(50_000))
    message(p.returncode, p.stderr, 1, str(d / CHECKPOINT), "File too large", "step 10")
    assert (d / CHECKPOINT).read_bytes() == good and load_checkpoint(d)[3] == 10
    assert not list(d.glob("*.tmp"))
    # nothing finished is lost: resuming completes the run, as if it had never failed
    assert train.main(["--resume", str(d), "--quiet"]) == 0
    assert load_checkpoint(d)[3] == 30 and (d / "summary.json").is_file()
    assert [json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines()] == [10, 20, 30]


def test_disk_full_while_logging_leaves_a_torn_line_that_resume_drops(tmp_path):
    d, straight = tmp_path / "run", tmp_path / "straight"
    assert train.main(["--out", str(d), *TINY, "--stop_after", "10"]) == 0
    size = (d / "metrics.jsonl").stat().st_size
    p = cli("train", "--resume", d, "--quiet", preexec_fn=limit_file_size(size + 40))
    message(p.returncode, p.stderr, 1, str(d / "metrics.jsonl"), "File too large", "step 10")
    torn = (d / "metrics.jsonl").read_text()
    assert len(torn) == size + 40 and not torn.endswith("\n")      # a partial last line
    assert load_checkpoint(d)[3] == 10
    assert train.main(["--resume", str(d), "--quiet"]) == 0
    recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30]
    train.train(config.make_config(preset="tiny"), straight, verbose=False)
    a, b = load_checkpoint(d), load_checkpoint(straight)
    assert a[0] == b[0] and all(np.array_equal(a[1][n], b[1][n]) for n in a[1])   # bit-identical


# --------------------------------------------------------------------------------------------
# bad --config files: exit 2, the file named, nothing created

@pytest.mark.parametrize("content, named", [
    ("[1, 2]", "list"),
    ("7", "int"),
    ('{"train": {"steps": 3}', "JSON"),
    (None, "No such file"),
    (b"\xff\xfe\x00garbage", "JSON"),
])
def test_bad_config_file(tmp_path, content, named):
    f = tmp_path / "cfg.json"
    if isinstance(content, str):
        f.write_text(content)
    elif content is not None:
        f.write_bytes(content)
    out = tmp_path / "run"
    p = cli("train", "--config", f, "--out", out, *TINY)
    message(p.returncode, p.stderr, 2, str(f), named)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Ctrl-C in each phase: the message says what is on disk, and its advice works

def test_sigint_before_the_first_checkpoint(tmp_path):
    d = tmp_path / "run"
    proc = start("train", "--out", d, *TINY, *LONG, "--log_every", 1, "--checkpoint_every", 100000)
    wait_for(lambda: n_metrics(d) >= 3, proc, what="3 metrics lines")
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    line = message(rc, err, 130, "interrupted", "no checkpoint", "--overwrite")
    assert "step 0" not in line and not (d / CHECKPOINT).exists()
    # the advice: start again (here only 2 steps of it)
    assert train.main([*suggested_command(line, "start again with:")[1:], "--stop_after", "2", "--quiet"]) == 0
    cfg, _, _, step = load_checkpoint(d)
    assert step == 2 and cfg.train.steps == 100000 and cfg.train.log_every == 1


def test_sigint_after_a_checkpoint(tmp_path):
    d = tmp_path / "run"
    proc = start("train", "--out", d, *TINY, *LONG, "--checkpoint_every", 7)
    wait_for(lambda: (ckpt_step(d) or 0) >= 14, proc, what="the checkpoint of step 14")
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    step = load_checkpoint(d)[3]
    line = message(rc, err, 130, "interrupted", f"step {step}", "--resume")
    assert train.main([*suggested_command(line, "continue with:")[1:], "--stop_after", "3", "--quiet"]) == 0
    assert load_checkpoint(d)[3] == step + 3


def test_sigint_during_the_final_evaluation(tmp_path, capsys):
    # a large label set makes the evaluation (~1 s) much longer than the 3 training steps
    d = tmp_path / "run"
    proc = start("train", "--out", d, *TINY, "--steps", 3, "--n_labels", 100, "--n_pair", 20)
    wait_for(lambda: ckpt_step(d) == 3, proc, what="the final checkpoint")
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    line = message(rc, err, 130, "interrupted", "final evaluation", "step 3", f"minispatial eval {d}",
                   f"minispatial train --resume {d}")
    assert "?" not in line and not (d / "summary.json").exists()
    # the advice: the run is complete, `eval` prints its metrics ...
    assert evaluate.main([str(d)]) == 0
    assert "val_unseen_pair" in capsys.readouterr().out
    # ... and `--resume` evaluates it, writes summary.json and trains nothing
    before = run_files(d)
    assert train.main(["--resume", str(d), "--quiet"]) == 0
    got = capsys.readouterr().out
    assert "already complete" in got and "step 3" in got and "val_unseen_pair" in got
    after = run_files(d)
    assert set(after) == set(before) | {"summary.json"}
    assert all(after[k] == before[k] for k in before)                # nothing else rewritten
    assert json.loads((d / "summary.json").read_text())["step"] == 3


# --------------------------------------------------------------------------------------------
# one writer per run directory; kill -9 never leaves a broken checkpoint

def test_a_second_writer_is_refused_and_touches_nothing(tmp_path):
    d = tmp_path / "run"
    a = start("train", "--out", d, *TINY, *LONG, "--checkpoint_every", 5)
    try:
        wait_for(lambda: ckpt_step(d) is not None, a, what="the first checkpoint")
        a.send_signal(signal.SIGSTOP)               # A holds the run directory, and stands still
        before = snapshot(d)
        for args in (["--out", d, *TINY, "--overwrite"], ["--resume", d, "--quiet"], ["--out", d, *TINY]):
            p = cli("train", *args)
            message(p.returncode, p.stderr, 1, "another process", str(d))
        assert snapshot(d) == before
    finally:
        a.send_signal(signal.SIGCONT)
    wait_for(lambda: (ckpt_step(d) or 0) >= 10, a, what="A to go on")
    a.send_signal(signal.SIGINT)
    rc, _, err = finish(a)
    assert rc == 130, err
    step = load_checkpoint(d)[3]
    assert train.main(["--resume", str(d), "--stop_after", "2", "--quiet"]) == 0   # the lock went with A
    assert load_checkpoint(d)[3] == step + 2


def test_kill_9_while_saving_checkpoints(tmp_path):
    d, straight = tmp_path / "run", tmp_path / "straight"
    tmp = d / (CHECKPOINT + ".tmp")                # exists only while a checkpoint is being written
    args = ["train", "--out", d, *TINY, *LONG, "--checkpoint_every", 1, "--log_every", 1]
    last = 0
    for _ in range(3):
        proc = start(*args)
        wait_for(lambda: (ckpt_step(d) or 0) >= last + 3, proc, what=f"a checkpoint past {last + 3}")
        wait_for(tmp.exists, proc, what="a checkpoint being written")
        proc.kill()                                # kill -9 in the middle of a save
        proc.communicate()
        cfg, params, opt, step = load_checkpoint(d)         # always a whole checkpoint
        assert step >= last + 3 and opt["t"] == step
        last = step
        args = ["train", "--resume", d, "--quiet"]
    assert train.main([*map(str, args[1:]), "--stop_after", "4"]) == 0
    assert load_checkpoint(d)[3] == last + 4 and not tmp.exists()
    # and the run is exactly the uninterrupted one
    cfg = config.make_config({"steps": 100000, "checkpoint_every": 1000}, preset="tiny")
    train.train(cfg, straight, stop_after=last + 4, verbose=False)
    a, b = load_checkpoint(d), load_checkpoint(straight)
    for n in a[1]:
        assert np.array_equal(a[1][n], b[1][n]) and np.array_equal(a[2]["m"][n], b[2]["m"][n]), n
    steps = [json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 5))


# --------------------------------------------------------------------------------------------
# a run that cannot fit in memory is refused before anything is built or written

def test_a_run_too_large_for_memory_is_refused_up_front(tmp_path):
    d = tmp_path / "run"
    p = cli("train", "--out", d, "--image_len", 1000, "--quiet")   # a valid testbed, ~70 GB to train
    line = message(p.returncode, p.stderr, 2, "image_len=1000", "would need an estimated",
                   "memory limit")
    assert "GiB" in line and not d.exists()


def test_a_sweep_refuses_a_grid_point_too_large_for_memory(tmp_path):
    d = tmp_path / "sweep"
    p = cli("sweep", "--grid", "image_len=10,1000", "--seeds", "0", "--preset", "tiny", "--out", d)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "image_len=1000" in p.stderr and "would need an estimated" in p.stderr
    assert not (d / "runs").exists() or not any((d / "runs").iterdir())


def test_ctrl_c_inside_a_numba_kernel_is_an_interrupt(tmp_path, monkeypatch):
    """numba reports a KeyboardInterrupt raised during a kernel as SystemError("... returned a
    result with an exception set"): the trainer must still treat it as Ctrl-C."""
    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise SystemError("CPUDispatcher(<function k>) returned a result with an exception set") from e
    monkeypatch.setattr(train, "_train", interrupted)
    cfg = config.make_config({}, preset="tiny")
    with pytest.raises(KeyboardInterrupt, match="no checkpoint"):
        train.train(cfg, tmp_path / "run", verbose=False)
