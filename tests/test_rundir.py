"""The run directory (minispatial/rundir.py): one writer at a time (the flock on LOCK_FILE),
--overwrite, metrics.jsonl on resume (a torn tail dropped, a corrupt line named) and the message
of what a stopped run keeps on disk. The runs here use the reference step: what is tested is the
directory, not the step."""

import fcntl
import json
import shutil

import pytest

from minispatial import config, rundir, train
from minispatial.checkpoint import CHECKPOINT
from minispatial.rundir import (
    LOCK_FILE,
    RUN_FILES,
    TrainingError,
    lock_run_dir,
    locked_by_another,
    on_disk,
    prepare_out_dir,
    read_metrics,
    unlock_run_dir,
)
from minispatial.train import main
from support import SMALL, SMALL_ARGS, assert_same_checkpoint, metrics, small_cfg, without_timing

REF = ["--step", "reference", "--quiet"]






@pytest.fixture
def train_ckpt(tmp_path):
    """A run of 30 steps stopped (with its checkpoint) after step 5."""
    out = tmp_path / "run"
    train.train(small_cfg(), out, step="reference", stop_after=5, verbose=False)
    return out


# --------------------------------------------------------------------------------------------
# one writer per run directory

def test_a_locked_run_directory_is_refused(train_ckpt, capsys):
    with open(train_ckpt / LOCK_FILE, "w") as f:        # as a running trainer holds it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = {p.name: p.read_bytes() for p in train_ckpt.iterdir()}
        for args in (["--resume", str(train_ckpt)], ["--out", str(train_ckpt), "--preset", "tiny", "--overwrite"]):
            assert main([*args, *REF]) == 1
            err = capsys.readouterr().err
            assert "another process is writing to" in err and str(train_ckpt) in err
        assert {p.name: p.read_bytes() for p in train_ckpt.iterdir()} == before
    assert main(["--resume", str(train_ckpt), *REF]) == 0          # released: it goes on
    assert not (train_ckpt / LOCK_FILE).exists()                   # and the lock file is gone


def test_lock_unlock_and_probe(tmp_path):
    assert not locked_by_another(tmp_path) and not (tmp_path / LOCK_FILE).exists()   # probing creates nothing
    fd = lock_run_dir(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).is_file() and locked_by_another(tmp_path)
        with pytest.raises(TrainingError, match="another process is writing to"):
            lock_run_dir(tmp_path)                              # a second open file: refused
    finally:
        unlock_run_dir(tmp_path, fd)
    assert not (tmp_path / LOCK_FILE).exists() and not locked_by_another(tmp_path)
    (tmp_path / LOCK_FILE).write_text("")                       # left behind by a dead process
    unlock_run_dir(tmp_path, lock_run_dir(tmp_path))            # is simply locked again


# --------------------------------------------------------------------------------------------
# --out and --overwrite

def test_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("not json")
    (out / "metrics.jsonl").write_text('{"step": 99}\n' * 5)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    args = ["--out", str(out), "--preset", "tiny", *SMALL_ARGS, *REF]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert main(args + ["--overwrite"]) == 0
    cfg = config.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg == config.make_config(SMALL, preset="tiny")
    assert [r["step"] for r in metrics(out)] == [10, 20, 30]            # the old log is gone
    assert (out / "summary.json").is_file() and (out / "notes.txt").read_text() == "mine"


def test_prepare_out_dir_removes_only_the_run_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in (*RUN_FILES, "notes.txt"):
        (out / name).write_text("x")
    with pytest.raises(TrainingError, match="not empty"):
        prepare_out_dir(out, resume=False, overwrite=False)
    fd = prepare_out_dir(out, resume=False, overwrite=True)
    try:
        assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, "notes.txt"])
    finally:
        unlock_run_dir(out, fd)
    with pytest.raises(TrainingError, match=f"no {CHECKPOINT} there") as e:
        prepare_out_dir(out, resume=True, overwrite=False)
    assert e.value.exit_code == 2


# --------------------------------------------------------------------------------------------
# metrics.jsonl on resume: a torn tail is dropped, a corrupt line is named

def test_resume_tolerates_a_torn_metrics_tail(tmp_path):
    cfg = small_cfg(log_every=5, checkpoint_every=10)
    clean, out = tmp_path / "clean", tmp_path / "run"
    train.train(cfg, clean, step="reference", verbose=False)
    for tail in ('{"step": 15, "loss": 2.7', "\n\n", '{"step": 15, "loss": 2.7}\n{"step": 2', "\x00\x00\x00",
                 "  \n"):
        shutil.rmtree(out, ignore_errors=True)
        train.train(cfg, out, step="reference", stop_after=10, verbose=False)
        with open(out / "metrics.jsonl", "a") as f:          # what a crash or a full disk leaves
            f.write(tail)
        train.train(None, out, step="reference", resume=True, verbose=False)
        assert without_timing(metrics(out)) == without_timing(metrics(clean)), repr(tail)
        assert_same_checkpoint(out / CHECKPOINT, clean / CHECKPOINT)


@pytest.mark.parametrize("bad", ['{"step": "x"}', "[1, 2]", "garbage", '{"loss": 1.0}', '{"step": 2.5}',
                                 '{"step": true}', "7"])
def test_a_corrupt_metrics_line_is_named(train_ckpt, capsys, bad):
    mpath = train_ckpt / "metrics.jsonl"
    lines = ['{"step": 2}', bad, '{"step": 4}']
    mpath.write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_bytes() for p in train_ckpt.iterdir()}
    assert main(["--resume", str(train_ckpt), *REF]) == 2
    err = capsys.readouterr().err
    assert "minispatial train: error:" in err and f"{mpath} line 2" in err
    assert {p.name: p.read_bytes() for p in train_ckpt.iterdir()} == before


def test_read_metrics_keeps_the_lines_up_to_the_checkpoint(tmp_path):
    mpath = tmp_path / "metrics.jsonl"
    assert read_metrics(mpath, 10) == []                                 # no file yet
    mpath.write_text('{"step": 5}\n\n{"step": 10}\n{"step": 15}\n{"step": 20, "lo')
    assert read_metrics(mpath, 10) == ['{"step": 5}', '{"step": 10}']
    assert read_metrics(mpath, 20) == ['{"step": 5}', '{"step": 10}', '{"step": 15}']   # torn tail dropped
    mpath.write_text('{"step": 5}\nnope\n')
    with pytest.raises(TrainingError, match=r"line 2: not JSON") as e:
        read_metrics(mpath, 10)
    assert e.value.exit_code == 2


# --------------------------------------------------------------------------------------------
# what a stopped run keeps on disk

def test_on_disk_says_what_is_kept_and_how_to_go_on(tmp_path, train_ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint has been written yet" in on_disk(empty)
    assert "the same command and --overwrite" in on_disk(empty)
    (empty / "config.json").write_text("{}")
    assert f"--config {empty / 'config.json'} --out {empty} --overwrite" in on_disk(empty)
    msg = on_disk(train_ckpt)
    assert "the checkpoint of step 5" in msg and f"minispatial train --resume {train_ckpt}" in msg
    assert main(["--resume", str(train_ckpt), *REF]) == 0                # the run completes
    assert "the run is complete (step 30)" in on_disk(train_ckpt)
    (train_ckpt / "summary.json").unlink()                               # final evaluation cut short
    msg = on_disk(train_ckpt)
    assert "training is complete" in msg and f"minispatial eval {train_ckpt}" in msg
    err = rundir.cannot_write(train_ckpt / "x", OSError(28, "No space left on device"), train_ckpt)
    assert isinstance(err, TrainingError) and "No space left on device" in str(err)
    assert str(train_ckpt / "x") in str(err) and "training is complete" in str(err)
