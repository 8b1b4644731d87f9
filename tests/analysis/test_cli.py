"""analysis/cli.py: `minispatial analyze` on one checkpoint and on several (text, JSON, --out,
plots), --step, the flag spellings, and refusals before the (slow) work."""

import json
import math

import numpy as np
import pytest

from minispatial.analysis import cli, measure
from minispatial.analysis.report import ABLATION_METRICS
from minispatial.analysis.runs import aggregate_reports
from minispatial.checkpoint import save_checkpoint
from minispatial.config import make_config
from minispatial.evaluate import evaluate_all
from minispatial.step import choose


def write_checkpoint(run, params, path):
    # an untrained model as a step-0 checkpoint (zero AdamW moments)
    zeros = {n: np.zeros_like(p) for n, p in params.items()}
    save_checkpoint(path, run, params, {"t": 0, "m": zeros, "v": dict(zeros)}, 0)


def test_analyze_command_end_to_end(tmp_path, capsys, an_model):
    run, params, tb = an_model(dtype="float32", vision_layers=2)
    ckpt = tmp_path / "checkpoint.npz"
    write_checkpoint(run, params, ckpt)
    assert cli.main([str(tmp_path), "--json", "--n_images", "32", "--ablate", "EP", "--ablate",
                     "PP,VP", "--heads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in res["ablations"]] == ["baseline", "-EP", "-PP-VP"]
    assert res["ablations"][1]["heads"] == [1]
    base = evaluate_all(params, tb, run.model, encoders=choose("fast").encoders)   # --step fast
    got = res["ablations"][0]["metrics"]
    assert all(got[k] == (None if math.isnan(v) else v) for k, v in base.items())
    assert all(e["sum_max_abs_err"] < 1e-10 for e in res["vision"] + res["text"])   # float64 copy
    json.dumps(res, allow_nan=False)
    assert cli.main([str(ckpt), "--n-images", "32", "--ablate", "EP", "--ablate", "PP,VP", "--heads", "1",
                     "--out", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text()) == {**res, "checkpoint": str(ckpt)}
    capsys.readouterr()
    assert cli.main([str(tmp_path), "--ablate", "EP", "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "-EP" in out and "alignment" in out and "sum check" in out
    assert (tmp_path / "plots" / "vision_layer1_cls_curves.png").is_file()
    assert cli.main([str(tmp_path / "missing")]) == 2
    assert cli.main([str(tmp_path), "--ablate", "QQ"]) == 2


def test_step_reference_evaluates_the_baseline_with_the_reference_model(tmp_path, capsys, an_model):
    run, params, tb = an_model(dtype="float32")
    write_checkpoint(run, params, tmp_path / "checkpoint.npz")
    argv = [str(tmp_path), "--json", "--n_images", "8", "--ablate", "none"]
    assert cli.main(argv + ["--step", "reference"]) == 0
    res = json.loads(capsys.readouterr().out)
    base = evaluate_all(params, tb, run.model)                 # the reference encoders
    assert res["ablations"][0]["metrics"] == {k: None if math.isnan(v) else v for k, v in base.items()}
    with pytest.raises(SystemExit):
        cli.main(argv + ["--step", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_plots_without_matplotlib_fail_before_the_work(tmp_path, capsys, monkeypatch, an_model):
    run, params, _ = an_model(dtype="float32")
    write_checkpoint(run, params, tmp_path / "checkpoint.npz")

    def no_matplotlib():
        raise ImportError("matplotlib is not installed (pip install 'minispatial[plot]')")

    monkeypatch.setattr(cli, "pyplot", no_matplotlib)
    monkeypatch.setattr(measure, "analyze", lambda *a, **k: pytest.fail("the analysis ran"))
    assert cli.main([str(tmp_path), "--plots", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minispatial analyze: error: matplotlib is not installed") and "[plot]" in err
    assert not (tmp_path / "plots").exists()


@pytest.fixture(scope="module")
def an_two_runs(tmp_path_factory):
    """Two tiny trained runs (seeds 0 and 1) -> their run directories."""
    from minispatial.train import train

    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for seed in (0, 1):
        cfg = make_config({"n_labels": 8, "n_heldout": 3, "n_pair": 4, "image_len": 6, "n_layout": 5,
                           "n_single_layout": 3, "steps": 20, "seed": seed}, preset="tiny")
        train(cfg, root / f"seed={seed}", verbose=False)
        dirs.append(root / f"seed={seed}")
    return dirs


def test_analyze_command_on_several_checkpoints(an_two_runs, tmp_path, capsys):
    runs = [str(d) for d in an_two_runs]
    out = tmp_path / "ref" / "analysis.json"
    argv = ["--n_images", "16", "--ablate", "EP", "--out", str(out)]
    assert cli.main(runs + argv + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    doc = json.loads(out.read_text())
    assert printed == doc
    assert [r["checkpoint"] for r in doc["runs"]] == runs
    agg = doc["aggregate"]
    assert agg == aggregate_reports(doc["runs"])
    for i, ab in enumerate(agg["ablations"]):
        for k in ABLATION_METRICS:
            vals = [r["ablations"][i]["metrics"][k] for r in doc["runs"]]
            assert ab["metrics"][k]["values"] == vals
            assert ab["metrics"][k]["mean"] == pytest.approx(np.mean(vals))
            assert ab["metrics"][k]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert [ab["name"] for ab in agg["ablations"]] == ["baseline", "-EP"]
    # text, and plots of the aggregate
    assert cli.main(runs + argv + ["--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "2 runs" in text and "±" in text and "relational heads per run" in text
    assert f"wrote {out}" in text
    assert (tmp_path / "plots" / "vision_layer0_EP_curve_aligned.png").is_file()
    assert (tmp_path / "plots" / "ablations_runs.png").is_file()


def test_analyze_command_refuses_a_checkpoint_given_twice(an_two_runs, capsys):
    run = an_two_runs[0]
    assert cli.main([str(run), str(run / "checkpoint.npz")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_the_recorded_experiment_commands_parse():
    # reference_runs/experiments.sh calls analyze with these flags (checkpoints globbed)
    args = cli.build_parser().parse_args(
        ["a", "b", "--ablate", "none", "--ablate", "EP", "--ablate", "PE", "--ablate", "PP", "--ablate", "BP",
         "--ablate", "EP,VP", "--ablate", "VP", "--ablate", "POS,VP", "--out", "analysis/full/x.json",
         "--plots", "analysis/figures_x"])
    assert args.step == "fast" and args.n_images == 512 and len(args.ablate) == 8
