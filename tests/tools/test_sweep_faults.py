"""Fault injection for `minispatial sweep`: the sweep killed with SIGKILL, two sweeps on one
directory, an unwritable or full --out, a run directory locked by another writer, unwritable
logs, interrupts outside the training phase.

Each test injects a real fault where it can (a real `kill -9`, a real read-only mount, a real
second process) and a simulated one (monkeypatch) only where a real one cannot be arranged
reliably (a disk filling up in the middle of one file). The trainings are `tiny` runs.
"""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minispatial.tools.sweep import cli, figures, runner

LINUX = sys.platform.startswith("linux")
SWEEP = [sys.executable, "-m", "minispatial", "sweep"]
FAST = ["--preset", "tiny", "--steps", "3", "--workers", "1", "--quiet"]


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """In-process sweeps skip the figures (seconds of matplotlib per sweep, not under test)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of sweep subprocesses: one BLAS thread, and a `matplotlib` that fails to
    import (a shim first on PYTHONPATH), so they skip the figures too."""
    shim = tmp_path_factory.mktemp("no_matplotlib")
    (shim / "matplotlib").mkdir()
    (shim / "matplotlib" / "__init__.py").write_text("raise ImportError('disabled by the test')\n")
    path = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": path}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def proc_state(pid: int) -> str | None:
    """The state letter of a live process ('R', 'S', 'Z' ...), None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z")


def children(pid: int) -> list[int]:
    """Live child processes of pid (scanning /proc: works without CONFIG_PROC_CHILDREN)."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(d))
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def training(run_dir: Path) -> bool:
    """The trainer of run_dir has logged its first metrics line (it is past start-up)."""
    m = run_dir / "metrics.jsonl"
    return m.is_file() and m.stat().st_size > 0


def start_sweep(args, out: Path, env: dict, **kw) -> subprocess.Popen:
    """A sweep subprocess; its stdout and stderr go to DIR.stdout and DIR.stderr."""
    with open(out.parent / f"{out.name}.stdout", "w") as fo, \
            open(out.parent / f"{out.name}.stderr", "w") as fe:
        return subprocess.Popen(SWEEP + args + ["--out", str(out)], env=env, stdout=fo, stderr=fe, **kw)


def kill_leftovers(pids):
    for pid in pids:                # processes this test started (through the sweep), by pid
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------- kill -9

@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only (see minispatial/tools/sweep/runner.py)")
def test_kill9_of_a_sweep_kills_its_trainers_and_a_rerun_is_clean(tmp_path, env):
    out = tmp_path / "sw"
    # 1000 tiny steps (~0.6 s): the sweep is killed once both trainers logged step 10. A trainer
    # that outlived it is either still running 3 s later or has finished and written summary.json
    args = ["--grid", "n_pair=5", "--seeds", "0-1", "--preset", "tiny", "--set", "steps=1000",
            "--workers", "2", "--quiet"]
    p = start_sweep(args, out, env)
    kids = []
    try:
        wait_for(lambda: all(training(out / "runs" / f"n_pair=5__seed={s}") for s in (0, 1)),
                 90, "both trainers to start")
        kids = [c for c in children(p.pid) if " train " in cmdline(c)]
        assert len(kids) == 2, [cmdline(c) for c in children(p.pid)]
        p.kill()                                                   # kill -9 the sweep
        p.wait()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(alive(c) for c in kids):
            time.sleep(0.05)
        survivors = [c for c in kids if alive(c)]
        assert not survivors, f"trainers outlived their sweep: {[cmdline(c) for c in survivors]}"
        finished = [s for s in (0, 1) if (out / "runs" / f"n_pair=5__seed={s}" / "summary.json").exists()]
        assert not finished, f"trainers outlived their sweep and finished seeds {finished}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        kill_leftovers(kids)

    # an immediate rerun of the same sweep: no other writer, both runs retrained from scratch
    rerun = subprocess.run(SWEEP + args + ["--out", str(out)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    rows = read_rows(out / "results.csv")
    assert [(r["status"], r["step"]) for r in rows] == [("ok", "1000"), ("ok", "1000")]
    # the result is that of a clean run of the same config, trained on its own
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "minispatial", "train", "--preset", "tiny", "--steps", "1000",
                    "--n_pair", "5", "--seed", "0", "--out", str(ref), "--quiet"],
                   env={**env, **runner.SINGLE_THREAD_ENV}, check=True, capture_output=True, timeout=300)
    want = json.loads((ref / "summary.json").read_text())
    got = json.loads((out / "runs" / "n_pair=5__seed=0" / "summary.json").read_text())
    assert got == want
    assert float(rows[0]["val_unseen_pair.lr_acc"]) == want["val_unseen_pair.lr_acc"]
    steps = [json.loads(ln)["step"] for ln in
             (out / "runs" / "n_pair=5__seed=0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 1001, 10))                      # one clean log, no second writer


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only (see minispatial/tools/sweep/runner.py)")
def test_trainer_of_a_parent_that_died_before_prctl_does_not_train(tmp_path):
    """The race guard: a launcher whose expected parent is not its parent (the sweep died between
    fork and prctl, so the launcher was re-parented) exits instead of exec'ing the trainer."""
    marker = tmp_path / "ran"
    cmd = runner.die_with_parent_command([sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                                        parent_pid=1)            # never our parent
    assert cmd[0] == sys.executable and cmd[1] == "-c"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not marker.exists()
    assert "parent" in proc.stderr
    # with the right parent the command runs, and the child carries PDEATHSIG = SIGKILL
    probe = ("import ctypes, sys; v = ctypes.c_int(); "
             "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); "     # PR_GET_PDEATHSIG
             f"open({str(marker)!r}, 'w').write(str(v.value))")
    cmd = runner.die_with_parent_command([sys.executable, "-c", probe], parent_pid=os.getpid())
    subprocess.run(cmd, check=True, timeout=60)
    assert marker.read_text() == str(int(signal.SIGKILL))


def test_without_prctl_the_training_is_started_directly(monkeypatch):
    """macOS and other systems without PR_SET_PDEATHSIG: no launcher (documented degradation)."""
    monkeypatch.setattr(runner, "PDEATHSIG", False)
    cmd = [sys.executable, "-m", "minispatial", "train", "--out", "x"]
    assert runner.die_with_parent_command(cmd) == cmd


# ------------------------------------------------------------------------------- two writers

def test_a_second_sweep_on_the_same_out_is_refused(tmp_path, capsys, monkeypatch, env):
    out = tmp_path / "sw"
    args = ["--grid", "n_pair=5", "--seeds", "0", "--preset", "tiny", "--set", "steps=1000",
            "--workers", "1", "--quiet"]
    monkeypatch.setattr(runner, "LOCK_WAIT_S", 0.0, raising=False)   # no grace period: refuse at once
    p = start_sweep(args, out, env)
    try:
        wait_for(lambda: training(out / "runs" / "n_pair=5__seed=0"), 90, "the first sweep's trainer")
        t0 = time.monotonic()
        assert cli.main(args + ["--out", str(out)]) == 2
        assert time.monotonic() - t0 < 10                       # refused, not trained a second time
        err = capsys.readouterr().err
        assert "minispatial sweep: error:" in err and str(out) in err
        assert "another sweep" in err and "Traceback" not in err
        assert p.wait(timeout=300) == 0                        # the first one is undisturbed
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    (row,) = read_rows(out / "results.csv")
    assert row["status"] == "ok" and row["step"] == "1000"


def test_run_dir_locked_by_another_writer_is_a_failed_run(tmp_path, capsys, monkeypatch):
    """A trainer refused because another process writes its run directory (it exits 1 with
    "another process is writing to DIR") is a failed run with that message; the sweep goes on."""
    out = tmp_path / "sw"
    locked = out / "runs" / "n_pair=5__seed=0"
    real = runner.Runner.command

    def command(self, run, overwrite):
        if run.name == locked.name:                             # what train.py prints then
            msg = f"minispatial train: error: another process is writing to {locked}"
            return [sys.executable, "-c", f"import sys; print({msg!r}, file=sys.stderr); sys.exit(1)"]
        return real(self, run, overwrite)

    monkeypatch.setattr(runner.Runner, "command", command)
    assert cli.main(["--grid", "n_pair=5,6", "--seeds", "0", *FAST, "--out", str(out)]) == 1
    rows = {r["run"]: r for r in read_rows(out / "results.csv")}
    assert rows[locked.name]["status"] == "failed"
    assert f"another process is writing to {locked}" in rows[locked.name]["error"]
    assert rows["n_pair=6__seed=0"]["status"] == "ok"
    err = capsys.readouterr().err
    assert f"run {locked.name} failed" in err and "Traceback" not in err


def test_run_dir_locked_by_a_real_trainer(tmp_path, capsys, env):
    """The same with a real second writer: a `minispatial train` on the run directory (the trainer
    locks its run directory: minispatial/rundir.py)."""
    out = tmp_path / "sw"
    run_dir = out / "runs" / "n_pair=5__seed=0"
    other = subprocess.Popen([sys.executable, "-m", "minispatial", "train", "--preset", "tiny",
                              "--steps", "4000", "--n_pair", "5", "--seed", "0", "--out", str(run_dir),
                              "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: training(run_dir), 90, "the other trainer")
        code = cli.main(["--grid", "n_pair=5", "--seeds", "0", "--preset", "tiny",
                           "--set", "steps=4000", "--quiet", "--out", str(out)])
        still_running = other.poll() is None
    finally:
        other.kill()
        other.wait()
    if not still_running:
        pytest.skip("the other trainer finished before the sweep's trainer started")
    assert code == 1
    (row,) = read_rows(out / "results.csv")
    assert row["status"] == "failed" and "another process is writing to" in row["error"]
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------- unwritable --out

def _assert_refused(capsys, out, reason_words):
    err = capsys.readouterr().err
    assert "minispatial sweep: error:" in err and "Traceback" not in err
    assert str(out) in err, err
    assert any(w in err for w in reason_words), err
    return err


@pytest.fixture
def no_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a training was launched")
    monkeypatch.setattr(runner.Runner, "run", boom)


def test_out_beneath_a_regular_file_is_a_bad_argument(tmp_path, capsys, no_launch):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sw"
    assert cli.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 2
    _assert_refused(capsys, out, ["Not a directory", "not a directory"])


def test_out_that_is_a_regular_file_is_a_bad_argument(tmp_path, capsys, no_launch):
    out = tmp_path / "results.txt"
    out.write_text("precious\n")
    assert cli.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 2
    _assert_refused(capsys, out, ["not a directory"])
    assert out.read_text() == "precious\n"


@pytest.fixture
def readonly_mount(tmp_path):
    """A read-only tmpfs (needs CAP_SYS_ADMIN and `mount`; skipped otherwise)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount is not permitted here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if os.spawnvp(os.P_WAIT, "umount", ["umount", str(mnt)]) != 0:   # (not through Popen,
            os.spawnvp(os.P_WAIT, "umount", ["umount", "-l", str(mnt)])  # which a test may patch)


@pytest.mark.parametrize("where", ["new", "existing"])
def test_out_on_a_read_only_mount_is_a_bad_argument(readonly_mount, capsys, no_launch, where):
    out = readonly_mount / "sw" if where == "new" else readonly_mount
    assert cli.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 2
    _assert_refused(capsys, out, ["Read-only file system"])


def test_results_csv_write_failure_keeps_the_old_file_and_names_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    args = ["--grid", "n_pair=5", "--seeds", "0-1", *FAST, "--out", str(out)]
    assert cli.main(args) == 0
    before = (out / "results.csv").read_bytes()
    capsys.readouterr()

    real = csv.DictWriter.writerow
    calls = []

    def writerow(self, row):                                   # the disk fills after the header
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", writerow)
    code = cli.main(args)
    assert code == 1
    err = capsys.readouterr().err
    assert "minispatial sweep: error:" in err and "Traceback" not in err
    assert str(out / "results.csv") in err and "No space left on device" in err
    assert (out / "results.csv").read_bytes() == before          # not torn
    assert not list(out.glob("*.tmp"))                          # no temporary file left

    # a real ENOSPC from the kernel: the temporary file (results.csv.tmp) leads to /dev/full
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    if not os.path.exists("/dev/full"):
        return
    os.symlink("/dev/full", out / "results.csv.tmp")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'results.csv'}: No space left on device" in err
    assert (out / "results.csv").read_bytes() == before
    assert not os.path.lexists(out / "results.csv.tmp")


def test_unwritable_log_is_a_failed_run_not_a_crash(tmp_path, capsys):
    out = tmp_path / "sw"
    (out / "logs" / "n_pair=5__seed=0.err").mkdir(parents=True)    # the log cannot be opened
    assert cli.main(["--grid", "n_pair=5,6", "--seeds", "0", *FAST, "--out", str(out)]) == 1
    rows = {r["run"]: r for r in read_rows(out / "results.csv")}
    bad = rows["n_pair=5__seed=0"]
    assert bad["status"] == "failed"
    assert str(out / "logs" / "n_pair=5__seed=0.err") in bad["error"]
    assert rows["n_pair=6__seed=0"]["status"] == "ok"
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------- interrupts

def test_interrupt_outside_the_runs_exits_130_without_traceback(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"

    def interrupted(*a, **k):                                  # Ctrl-C while writing figures
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "plot_figures", interrupted)
    assert cli.main(["--grid", "n_pair=5", *FAST, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.skipif(not LINUX, reason="uses /proc")
def test_ctrl_c_stops_every_trainer_and_marks_runs_interrupted(tmp_path, env):
    """Ctrl-C in a terminal: SIGINT to the whole process group (sweep and trainers)."""
    out = tmp_path / "sw"
    args = ["--grid", "n_pair=5", "--seeds", "0-1", "--preset", "tiny", "--set", "steps=3000",
            "--workers", "2"]
    p = start_sweep(args, out, env, start_new_session=True)
    kids = []
    try:
        wait_for(lambda: all(training(out / "runs" / f"n_pair=5__seed={s}") for s in (0, 1)),
                 90, "both trainers to start")
        kids = [c for c in children(p.pid) if " train " in cmdline(c)]
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(timeout=30) == 130
        assert not [c for c in kids if alive(c)]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        kill_leftovers(kids)
    err = (tmp_path / "sw.stderr").read_text()
    assert "Traceback" not in err and "run the same command again to resume" in err
    assert [r["status"] for r in read_rows(out / "results.csv")] == ["interrupted", "interrupted"]
    assert "2 interrupted" in (tmp_path / "sw.stdout").read_text()
