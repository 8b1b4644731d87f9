"""The recorded reference numbers cannot drift from the code silently.

reference_runs/repro/ holds the config.json and summary.json of one short recorded training run
(see reference_runs/README.md). This test trains the same config again through the CLI (as the
sweeps do) and requires every recorded metric to come out exactly equal: the same config and seed
give bit-identical results on the same machine. A change to the model, data, optimizer or
evaluation code that moves any number fails here, and the reference runs must then be redone.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPRO = Path(__file__).resolve().parent.parent / "reference_runs" / "repro"


def test_recorded_short_run_reproduces_exactly(tmp_path):
    recorded = json.loads((REPRO / "summary.json").read_text())
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MINISPATIAL_BACKEND"}
    proc = subprocess.run([sys.executable, "-m", "minispatial", "train", "--config",
                           str(REPRO / "config.json"), "--out", str(out), "--quiet", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "config.json").read_text()) == json.loads((REPRO / "config.json").read_text())
    assert set(again) == set(recorded)
    diffs = {k: (recorded[k], again[k]) for k in recorded if recorded[k] != again[k]}
    assert not diffs, f"recorded reference numbers no longer reproduce: {diffs}"
    assert recorded["step"] == 200 and 0.0 <= recorded["val_unseen_pair.lr_acc"] <= 1.0
