"""The trainer end to end on seconds-long runs: learning, exact resumption, determinism, the
files of a run directory, the command line's errors, NaN handling, and the two training steps
(`--step fast`, the default, and `--step reference`) giving the same run up to float rounding.
Checkpoints are tested in test_checkpoint.py, the run directory (lock, --overwrite,
metrics.jsonl on resume) in test_rundir.py."""

import json
import math
import re

import numpy as np
import pytest

from minispatial import config, train
from minispatial.checkpoint import CHECKPOINT, load_checkpoint
from minispatial.optim import lr_at
from minispatial.step import REFERENCE
from minispatial.train import main
from support import SMALL_ARGS, assert_same_checkpoint, metrics, small_cfg, without_timing

METRIC_FIELDS = {"step", "loss", "lr", "logit_scale", "grad_norm", "samples_per_s"}
STEPS = ("fast", "reference")






def no_tmp_files(*dirs):
    return all(not list(d.glob("*.tmp")) for d in dirs)


# --------------------------------------------------------------------------------------------
# learning

@pytest.mark.parametrize("step", STEPS)
def test_loss_decreases(tmp_path, step):
    cfg = small_cfg(steps=60, lr=3e-3, warmup=5, log_every=5)
    train.train(cfg, tmp_path, step=step, verbose=False)
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    # ~2.8 -> ~1.2 in practice; chance level is ln(20 captions) = 3.0
    assert first > 2.5
    assert last < first - 0.8, losses


# --------------------------------------------------------------------------------------------
# resumption and determinism

@pytest.mark.parametrize("step", STEPS)
def test_resume_equals_uninterrupted(tmp_path, step):
    cfg = small_cfg(steps=40, log_every=5, checkpoint_every=5)
    a, b = tmp_path / "a", tmp_path / "b"
    summary_a = train.train(cfg, a, step=step, verbose=False)

    assert train.train(cfg, b, step=step, stop_after=17, verbose=False) == {"step": 17, "stopped_early": True}
    assert load_checkpoint(b)[3] == 17
    assert not (b / "summary.json").exists()
    assert [r["step"] for r in metrics(b)] == [5, 10, 15]
    # a log line written after the checkpoint (as by a run killed at step 20) is dropped on resume
    with open(b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, "loss": 123.0}) + "\n")
    summary_b = train.train(None, b, step=step, resume=True, verbose=False)

    assert_same_checkpoint(a / CHECKPOINT, b / CHECKPOINT)
    assert load_checkpoint(b)[3] == 40 and load_checkpoint(b)[2]["t"] == 40
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == list(range(5, 41, 5))
    assert without_timing(ma) == without_timing(mb)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    assert json.dumps(summary_a, sort_keys=True) == json.dumps(summary_b, sort_keys=True)
    assert no_tmp_files(a, b)


def test_resume_updates_every_tensor_in_one_call(tmp_path):
    # a resumed run loads the checkpoint into AdamW's flat buffer (AdamW.load), so each step is
    # one call of the step's adamw_update over every parameter, as in a fresh run
    from minispatial.model import n_params

    cfg = small_cfg(steps=10, checkpoint_every=5)
    calls = []

    def counting(p, *args):
        calls.append(p.size)
        return REFERENCE.adamw_update(p, *args)

    counted = REFERENCE._replace(adamw_update=counting)
    assert train.train(cfg, tmp_path, step=counted, stop_after=5, verbose=False)["stopped_early"]
    assert calls == [n_params(cfg.model)] * 5
    assert train.train(None, tmp_path, step=counted, resume=True, verbose=False)["step"] == 10
    assert calls == [n_params(cfg.model)] * 10


def test_resume_from_the_command_line(tmp_path, capsys):
    d, straight = str(tmp_path / "d"), str(tmp_path / "straight")
    assert main(["--out", d, "--preset", "tiny", "--stop_after", "10", "--quiet"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert load_checkpoint(d)[3] == 10
    assert main(["--resume", d, "--quiet"]) == 0
    assert main(["--out", straight, "--preset", "tiny", "--quiet"]) == 0
    assert_same_checkpoint(tmp_path / "d" / CHECKPOINT, tmp_path / "straight" / CHECKPOINT)
    assert without_timing(metrics(tmp_path / "d")) == without_timing(metrics(tmp_path / "straight"))
    # config fields cannot be changed on resume
    capsys.readouterr()
    assert main(["--resume", d, "--lr", "1e-2", "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_same_seed_is_bit_identical_and_another_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train.train(small_cfg(seed=seed), tmp_path / name, stop_after=12, verbose=False)
        runs[name] = load_checkpoint(tmp_path / name)[1]
    for n in runs["a"]:
        assert np.array_equal(runs["a"][n], runs["b"][n]), n
    differ = [n for n in runs["a"] if not np.array_equal(runs["a"][n], runs["c"][n])]
    assert set(differ) == set(runs["a"])        # every tensor, the logit scale too (different batches)
    # the training seed alone (same testbed) also changes the run
    train.train(small_cfg(**{"train.seed": 1}), tmp_path / "d", stop_after=12, verbose=False)
    d = load_checkpoint(tmp_path / "d")[1]
    assert not np.array_equal(d["vision.W_E"], runs["a"]["vision.W_E"])


# --------------------------------------------------------------------------------------------
# the run directory

def test_files_written(tmp_path):
    cfg = small_cfg(min_lr_frac=0.1)
    summary = train.train(cfg, tmp_path, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "config.json", "metrics.jsonl",
                                                          "summary.json"]
    # config.json round-trips to the very RunConfig that was trained
    assert config.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg

    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == [10, 20, 30]
    assert summary["backend"] == "numba"                     # the default step: fast
    ckpt_cfg, params, opt, step = load_checkpoint(tmp_path)
    assert ckpt_cfg == cfg and step == 30 and opt["t"] == 30
    tc = cfg.train
    for r in recs:
        assert METRIC_FIELDS <= set(r)
        assert r["lr"] == lr_at(r["step"] - 1, tc.lr, tc.warmup, tc.steps, tc.schedule, tc.min_lr_frac)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["samples_per_s"] > 0
    assert recs[-1]["lr"] == pytest.approx(tc.lr * tc.min_lr_frac, rel=1e-12)   # cosine ends there
    assert recs[-1]["logit_scale"] == float(np.exp(params["logit_scale"]))

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["step"] == 30 and on_disk["dtype"] == "float32"
    for split in ("train", "val_seen_pair", "val_unseen_pair"):
        assert 0.0 <= on_disk[f"{split}.lr_acc"] <= 1.0
        assert 0.0 <= on_disk[f"{split}.i2t_acc"] <= 1.0
    assert on_disk["logit_scale"] == pytest.approx(float(np.exp(params["logit_scale"])), rel=1e-7)
    assert set(on_disk) == set(summary)
    for k, v in summary.items():
            assert on_disk[k] == v or (isinstance(v, float) and math.isnan(v) and on_disk[k] is None), k  # NaN is written as null


# --------------------------------------------------------------------------------------------
# command-line errors: exit code 2 and the field named, nothing written

@pytest.mark.parametrize("args, named", [
    (["--n_pairs", "5"], "n_pairs"),
    (["--lr", "abc"], "lr"),
    (["--n_pair", "99"], "n_pair"),
    (["--steps", "-1"], "steps"),
    (["--caption_mode", "up"], "caption_mode"),
    (["--vision_vocab", "5"], "vision_vocab"),
    (["--lr"], "--lr"),
    (["stray"], "stray"),
])
def test_cli_rejects_bad_fields(tmp_path, capsys, args, named):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err
    assert not out.exists()


def test_cli_requires_out(capsys):
    assert main(["--preset", "tiny", "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err


def test_cli_rejects_an_unknown_step(tmp_path, capsys):
    out = tmp_path / "run"
    try:                                   # argparse's own refusal (as for --preset) exits with 2
        rc = main(["--out", str(out), "--preset", "tiny", "--step", "numba", "--quiet"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "--step" in err and "'fast'" in err and "'reference'" in err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"step='numba' is not allowed"):
        train.train(small_cfg(), out, step="numba", verbose=False)
    assert not out.exists()


def test_parse_overrides():
    assert train.parse_overrides(["--n_pair", "5", "--lr=1e-3", "--steps", "-1"]) == \
        {"n_pair": "5", "lr": "1e-3", "steps": "-1"}
    with pytest.raises(ValueError, match="x"):
        train.parse_overrides(["x"])


# --------------------------------------------------------------------------------------------
# NaN / inf

@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # overflow, on purpose
@pytest.mark.parametrize("step", STEPS)
def test_absurd_lr_stops_with_a_message_and_keeps_a_good_checkpoint(tmp_path, capsys, step):
    out = tmp_path / "run"
    rc = main(["--out", str(out), "--preset", "tiny", *SMALL_ARGS, "--lr", "1e30", "--checkpoint_every", "1",
               "--step", step, "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err.lower()
    assert "step" in err and ("nan" in err or "inf" in err)
    cfg, params, _, step = load_checkpoint(out)        # the last checkpoint before the blow-up
    assert cfg.train.lr == 1e30 and step >= 1
    assert all(np.isfinite(p).all() for p in params.values())
    assert not (out / "summary.json").exists() and no_tmp_files(out)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # overflow, on purpose
@pytest.mark.parametrize("step", STEPS)
def test_inf_params_are_never_checkpointed(tmp_path, capsys, step):
    # lr 1e39 overflows float32 in the first update: every param becomes inf/NaN at once, before
    # any loss is NaN; the checkpoint due after step 1 must not be written
    out = tmp_path / "run"
    rc = main(["--out", str(out), "--preset", "tiny", *SMALL_ARGS, "--lr", "1e39", "--checkpoint_every", "1",
               "--step", step, "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err.lower()
    assert "step 1" in err and ("nan" in err or "inf" in err)
    if (out / CHECKPOINT).exists():
        params = load_checkpoint(out)[1]
        assert all(np.isfinite(p).all() for p in params.values())
    else:
        assert "no checkpoint" in err                   # and the message does not promise one


def test_nan_midway_keeps_the_last_good_checkpoint(tmp_path):
    from minispatial.rundir import TrainingError

    cfg = small_cfg(checkpoint_every=2)
    clean = tmp_path / "clean"
    train.train(cfg, clean, step="reference", stop_after=4, verbose=False)

    calls = []

    def nan_at_step_6(*args):
        calls.append(1)
        loss, grads = REFERENCE.loss_and_grads(*args)
        return (math.nan if len(calls) == 6 else loss), grads

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss is nan .*step 6.*step 4"):
        train.train(cfg, out, step=REFERENCE._replace(loss_and_grads=nan_at_step_6), verbose=False)
    assert_same_checkpoint(out / CHECKPOINT, clean / CHECKPOINT)   # the step-4 state, intact
    assert no_tmp_files(out)


def test_keep_freed_memory_is_harmless():
    # cli.py asks glibc's malloc to keep freed memory (fewer page faults per step); elsewhere a no-op
    import platform

    from minispatial.cli import keep_freed_memory

    got = keep_freed_memory()
    assert isinstance(got, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert got


# --------------------------------------------------------------------------------------------
# command-line combinations that cannot work

@pytest.fixture
def train_ckpt(tmp_path):
    """A run of 30 steps stopped (with its checkpoint) after step 5."""
    out = tmp_path / "run"
    train.train(small_cfg(), out, step="reference", stop_after=5, verbose=False)
    return out


@pytest.mark.parametrize("flag", ["--stop_after", "--stop-after"])    # the old spelling is an alias
@pytest.mark.parametrize("k", ["-1", "0"])
def test_stop_after_must_be_positive(tmp_path, capsys, k, flag):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--preset", "tiny", flag, k, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search("--stop[-_]after", err) and k in err and ">= 1" in err
    assert not out.exists()


def test_resume_with_out_is_refused(train_ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    before = {p.name: p.read_bytes() for p in train_ckpt.iterdir()}
    assert main(["--resume", str(train_ckpt), "--out", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--out" in err and "in place" in err
    assert not other.exists()
    assert {p.name: p.read_bytes() for p in train_ckpt.iterdir()} == before


def test_effective_batch_below_two_is_refused_before_training(tmp_path, monkeypatch):
    # every valid testbed has >= 2 distinct training scenes; a one-scene train split is forced here
    from minispatial.data import Split

    real = train.make_testbed

    def one_scene(cfg):
        tb = real(cfg)
        s = tb.splits["train"]
        one = Split.build([[1, 0]] * 3, [[0, -1], [1, -1], [2, -1]], [0, 0, 0], s.image_len, s.tokenizer)
        tb.splits["train"] = one
        return tb

    monkeypatch.setattr(train, "make_testbed", one_scene)
    out = tmp_path / "run"
    with pytest.raises(train.TrainingError, match=r"batch.* 1 .*batch_size = 32"):
        train.train(small_cfg(), out, verbose=False)
    assert not (out / CHECKPOINT).exists() and not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------
# a finished run, the progress line

def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--preset", "tiny", *SMALL_ARGS, "--quiet"]) == 0
    capsys.readouterr()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert main(["--resume", str(out), "--quiet"]) == 0
    got = capsys.readouterr().out
    assert "already complete" in got and "step 30" in got and "trained" not in got
    assert "val_unseen_pair" in got                                    # its metrics, from summary.json
    assert main(["--resume", str(out), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "summary.json").read_text())
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_eta_starts_after_the_first_step(monkeypatch, capsys):
    # the first step compiles the numba kernels (seconds); the ETA must not extrapolate it
    now = [100.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])
    p = train.Progress(total=1000, verbose=True)
    for step, took in enumerate([10.0, 0.1, 0.1, 0.1]):                # step 1 compiles
        now[0] += took
        p.update(step, 1.0, 100.0, force=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    eta = float(last.split("eta")[1].strip().rstrip("s"))
    assert eta == pytest.approx(0.1 * 996, abs=1), last               # 0.1 s a step, 996 to go


# --------------------------------------------------------------------------------------------
# the two steps: the same run up to float rounding

def test_reference_and_fast_training_runs_agree(tmp_path):
    # float64, the tiny preset's 30 steps: the fast step computes the reference's sums in another
    # order, so the runs differ only by rounding (measured: <= 1.3e-11 relative on the params).
    # The floor atol 1e-12 is for b_K, whose gradient is rounding noise in both steps: its
    # entries stay ~1e-19, where a relative difference means nothing
    cfg = config.make_config({"dtype": "float64"}, preset="tiny")
    summaries = {s: train.train(cfg, tmp_path / s, step=s, verbose=False) for s in STEPS}
    assert summaries["fast"]["backend"] == "numba" and summaries["reference"]["backend"] == "numpy"
    (cfg_f, p_f, o_f, s_f), (cfg_r, p_r, o_r, s_r) = (load_checkpoint(tmp_path / s) for s in STEPS)
    assert cfg_f == cfg_r == cfg and s_f == s_r == 30 and o_f["t"] == o_r["t"] == 30
    assert list(p_f) == list(p_r)
    for n in p_r:
        assert p_f[n].dtype == np.float64
        np.testing.assert_allclose(p_f[n], p_r[n], rtol=1e-9, atol=1e-12, err_msg=n)
    losses = {s: [r["loss"] for r in metrics(tmp_path / s)] for s in STEPS}
    np.testing.assert_allclose(losses["fast"], losses["reference"], rtol=1e-9)


def test_the_step_flag_selects_the_implementation(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--preset", "tiny", *SMALL_ARGS, "--step", "reference", "--quiet",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "numpy"
    assert json.loads((out / "summary.json").read_text())["backend"] == "numpy"


def test_uniform_sampler_trains_with_the_split_size_as_cap(tmp_path):
    from minispatial.config import TrainConfig
    assert TrainConfig().sampler == "distinct"
    with pytest.raises(ValueError, match=r"TrainConfig\.sampler='iid' is invalid.*uniform"):
        TrainConfig(sampler="iid")
    cfg = small_cfg(sampler="uniform", batch_size=100000, steps=3, log_every=1)
    tb = train.make_testbed(cfg.data)
    train.check_batch(cfg, tb)
    train.train(cfg, tmp_path / "run", verbose=False)
    assert {r["batch"] for r in metrics(tmp_path / "run")} == {len(tb.splits["train"])}


def test_uniform_sampler_check_batch_uses_the_examples_as_cap(monkeypatch):
    from minispatial.data import Split
    cfg = small_cfg(sampler="uniform")
    tb = train.make_testbed(cfg.data)
    s = tb.splits["train"]
    tb.splits["train"] = Split.build([[1, 0]] * 3, [[0, -1], [1, -1], [2, -1]], [0, 0, 0], s.image_len, s.tokenizer)
    train.check_batch(cfg, tb)                                       # 3 examples: a batch of 3
    with pytest.raises(train.TrainingError, match=r"batch size is 1 .*1 distinct scenes"):
        train.check_batch(small_cfg(), tb)
