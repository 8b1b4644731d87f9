"""The recorded reference numbers cannot drift from the code silently, on any machine.

reference_runs/repro/ holds one short training run (200 steps) recorded twice, and the
fingerprint of the machine that recorded it (`minispatial.machine.fingerprint()`):

    config.json, summary.json                   float32, as every run trains by default
    float64.config.json, float64.summary.json   the same run in float64
    machine.json                                the recording machine's fingerprint

Float32 training amplifies rounding: another OpenBLAS core type moves a few metrics in their
2nd-3rd digit after 200 steps (measured: labelset_acc 0.65 -> 0.62 under Haswell kernels). So
the guard is the float64 run: there the same differences stay at ~1e-10 relative (measured
2.5e-10 over four simulated machines), while any change to what the code computes (an init
constant, the schedule, a batch) moves some metric by far more than 1e-3 relative. Between the
two sits FLOAT64_RTOL = 1e-7. The float32 record is compared exactly where this machine's
fingerprint equals the recording machine's, and within the loose FLOAT32_TOL elsewhere.

Both halves are tested: simulated machines (other OpenBLAS core types, NumPy's SIMD dispatch
switched off, another numba target, the NumPy reference step) pass the float64 guard, and
mutated configs and code fail it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from minispatial import config as config_mod
from minispatial import machine
from minispatial import train as train_mod
from minispatial.reporting import clean_json

REPRO = Path(__file__).resolve().parent.parent / "reference_runs" / "repro"

# float64: |a - b| <= FLOAT64_RTOL * max(|a|, |b|) + FLOAT64_ATOL (the atol only matters for
# values near 0, such as neg_cos 0.003). Measured across machines: <= 2.5e-10 relative.
FLOAT64_RTOL, FLOAT64_ATOL = 1e-7, 1e-10
# float32 on a machine whose fingerprint differs from the recording one: a sanity bound, not a
# guard (the float64 record is the guard). Measured across core types: <= 0.03 on an accuracy.
FLOAT32_TOL = 0.1
NOT_METRICS = ("backend",)        # which step ran ("numba": fast, "numpy": reference); they must agree otherwise


def recorded(name: str) -> dict:
    return json.loads((REPRO / name).read_text())


def diffs(want: dict, got: dict, tol) -> dict:
    """{key: (recorded, now)} for every value outside `tol(recorded, now) -> bool`."""
    assert set(want) == set(got), f"metric names differ: {set(want) ^ set(got)}"
    out = {}
    for k, a in want.items():
        b = got[k]
        if k in NOT_METRICS or a == b:
            continue
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            if tol(float(a), float(b)):
                continue
        out[k] = (a, b)
    return out


def float64_close(a: float, b: float) -> bool:
    return math.isfinite(b) and abs(a - b) <= FLOAT64_RTOL * max(abs(a), abs(b)) + FLOAT64_ATOL


def float32_close(a: float, b: float) -> bool:
    return math.isfinite(b) and abs(a - b) <= FLOAT32_TOL * max(1.0, abs(a))


def train_cli(config: str, out: Path, env_extra: dict | None = None, step: str = "fast") -> dict:
    """Train a recorded config through the CLI (as sweeps do) in a fresh process; -> summary."""
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "minispatial", "train", "--config", str(REPRO / config),
                           "--out", str(out), "--quiet", "--json", "--step", step],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text()) == recorded(config)
    return json.loads((out / "summary.json").read_text())


def fingerprint_under(env_extra: dict) -> dict:
    """The fingerprint a process started with env_extra sees (proves a simulation took effect)."""
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-m", "minispatial.machine"], capture_output=True,
                         text=True, env=env, timeout=300, check=True).stdout
    return json.loads(out)


# --------------------------------------------------------------------------------------------
# the records themselves

def test_records_are_the_same_run_in_two_dtypes():
    f32, f64 = recorded("config.json"), recorded("float64.config.json")
    assert f32["model"].pop("dtype") == "float32" and f64["model"].pop("dtype") == "float64"
    assert f32 == f64
    assert recorded("summary.json")["step"] == recorded("float64.summary.json")["step"] == 200
    assert set(recorded("machine.json")) == set(machine.fingerprint())


# --------------------------------------------------------------------------------------------
# this machine

def test_float64_record_reproduces(tmp_path):
    got = train_cli("float64.config.json", tmp_path / "run")
    bad = diffs(recorded("float64.summary.json"), got, float64_close)
    assert not bad, f"the float64 reference run no longer reproduces (rtol {FLOAT64_RTOL}): {bad}"


def test_float32_record_reproduces(tmp_path):
    """Exact where the fingerprint matches the recording machine's; FLOAT32_TOL elsewhere."""
    got = train_cli("config.json", tmp_path / "run")
    same_machine = machine.fingerprint() == recorded("machine.json")
    want = recorded("summary.json")
    bad = diffs(want, got, (lambda a, b: False) if same_machine else float32_close)
    kind = "exactly (same fingerprint)" if same_machine else f"within {FLOAT32_TOL} (other machine)"
    assert not bad, f"the float32 reference run does not reproduce {kind}: {bad}"


# --------------------------------------------------------------------------------------------
# other machines, simulated: their rounding must pass the float64 guard

def simulated_machines() -> list:
    """Environments that change the low digits the way another machine would, each checked to
    have taken effect. OpenBLAS core types must be ones this CPU can run."""
    cases = []
    arch = platform.machine().lower()
    here = machine.blas_core()
    if arch in ("x86_64", "amd64"):
        flags = ""
        try:
            flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
        except (OSError, IndexError):
            pass
        cores = ["Nehalem"] + (["Sandybridge"] if " avx " in flags + " " else []) \
            + (["Haswell"] if " avx2 " in flags + " " else []) \
            + (["SkylakeX"] if " avx512f " in flags + " " else [])
        others = [c for c in reversed(cores) if c != here][:2]
    elif arch in ("aarch64", "arm64"):
        others = ["ARMV8"] if here != "ARMV8" else []
    else:
        others = []
    for core in others:
        cases.append(pytest.param({"OPENBLAS_CORETYPE": core}, {"blas_core": core}, id=f"openblas-{core}"))
    simd = machine.numpy_simd()
    avx512 = [t for t in simd if "512" in t or t == "X86_V4"]
    off = avx512 or simd
    if off:
        already = os.environ.get("NPY_DISABLE_CPU_FEATURES", "").split()
        cases.append(pytest.param({"NPY_DISABLE_CPU_FEATURES": " ".join(already + off)},
                                  {"numpy_simd": [t for t in simd if t not in off]},
                                  id="numpy-no-avx512" if avx512 else "numpy-baseline-only"))
    cases.append(pytest.param({"NUMBA_CPU_NAME": "generic"}, {"numba_cpu": "generic"}, id="numba-generic"))
    cases.append(pytest.param({}, {"step": "reference"}, id="numpy-reference-step"))
    return cases


@pytest.mark.parametrize("env_extra, expect", simulated_machines())
def test_float64_record_reproduces_on_simulated_machine(tmp_path, env_extra, expect):
    expect = dict(expect)
    step = expect.pop("step", "fast")
    seen = fingerprint_under(env_extra)
    for k, v in expect.items():
        assert seen[k] == v, f"the simulation {env_extra} did not take effect: {k} = {seen[k]!r}"
    got = train_cli("float64.config.json", tmp_path / "run", env_extra, step)
    bad = diffs(recorded("float64.summary.json"), got, float64_close)
    assert not bad, f"under {env_extra} the float64 record does not reproduce: {bad}"


def test_simulated_machines_cover_two_core_types_and_simd():
    ids = [p.id for p in simulated_machines()]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert sum(i.startswith("openblas-") for i in ids) >= 2, ids
        assert any(i.startswith("numpy-no") or i.startswith("numpy-base") for i in ids), ids


def test_float32_within_tolerance_under_another_core_type(tmp_path):
    """The other half of the float32 test: on a machine with another fingerprint the loose
    comparison is what runs, and it passes."""
    rec_core = recorded("machine.json")["blas_core"]
    cases = [p for p in simulated_machines()
             if p.id.startswith("openblas-") and p.values[0]["OPENBLAS_CORETYPE"] != rec_core]
    if not cases:
        pytest.skip(f"no OpenBLAS core type other than {rec_core} to simulate on this CPU")
    env_extra = cases[0].values[0]
    assert fingerprint_under(env_extra) != recorded("machine.json")
    got = train_cli("config.json", tmp_path / "run", env_extra)
    bad = diffs(recorded("summary.json"), got, float32_close)
    assert not bad, f"under {env_extra} the float32 record is outside {FLOAT32_TOL}: {bad}"


# --------------------------------------------------------------------------------------------
# the guard stays sharp: changes to what the code computes fail it, on any machine

def _lr_off_by_one(step, *args):
    return ORIG["lr_at"](step + 1, *args)


def _batch_short_by_one(split, batch_size, rng, sampler="distinct"):
    return ORIG["sample_batch"](split, batch_size, rng, sampler)[:-1]


def _init_scaled(model_cfg, seed):
    params = ORIG["init_params"](model_cfg, seed)
    params["vision.W_pos"] = params["vision.W_pos"] * 1.001
    return params


ORIG = {"lr_at": train_mod.lr_at, "sample_batch": train_mod.sample_batch,
        "init_params": train_mod.init_params}

MUTATIONS = {
    "none": ({}, {}),
    "warmup+1": ({"warmup": 11}, {}),
    "lr*1.0001": ({"lr": 1.0001e-3}, {}),
    "lr-schedule-off-by-one": ({}, {"lr_at": _lr_off_by_one}),
    "batch-short-by-one": ({}, {"sample_batch": _batch_short_by_one}),
    "init-W_pos*1.001": ({}, {"init_params": _init_scaled}),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_float64_guard_catches_changes(tmp_path, monkeypatch, name):
    """In-process training of the float64 record, unchanged ('none', must pass) or mutated
    (must fail by far more than the tolerance: at least 1e3 x FLOAT64_RTOL)."""
    cfg_changes, code_changes = MUTATIONS[name]
    for attr, fn in code_changes.items():
        monkeypatch.setattr(train_mod, attr, fn)
    overrides = {k: str(v) for k, v in cfg_changes.items()}
    cfg = config_mod.make_config(overrides, base=recorded("float64.config.json"))
    got = clean_json(train_mod.train(cfg, tmp_path / "run", verbose=False))
    want = recorded("float64.summary.json")
    bad = diffs(want, got, float64_close)
    if name == "none":
        assert not bad, bad
        return
    assert bad, f"mutation {name} was not caught"
    worst = max(abs(a - b) / max(abs(a), abs(b)) for a, b in bad.values())
    assert worst > 1e3 * FLOAT64_RTOL, f"mutation {name} moved the record by only {worst:.2e}"
