"""The trainer end to end on seconds-long runs: learning, exact resumption, determinism, the
files of a run directory, the command line's errors, NaN handling and checkpoint integrity."""

import json
import math

import numpy as np
import pytest

from minispatial import config, train
from minispatial.optim import lr_at
from minispatial.train import CHECKPOINT, load_checkpoint, main, save_checkpoint

SMALL = {"n_pair": 4, "n_labels": 8, "n_heldout": 3, "image_len": 6, "n_layout": 10}
SMALL_ARGS = [a for k, v in SMALL.items() for a in (f"--{k}", str(v))]
METRIC_FIELDS = {"step", "loss", "lr", "logit_scale", "grad_norm", "samples_per_s"}
TIMING_FIELDS = {"samples_per_s"}


def small_cfg(**overrides):
    return config.make_config({**SMALL, **overrides}, preset="tiny")


def metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def assert_same_checkpoint(a, b):
    """Params, AdamW moments, step count, step and config all bit-identical."""
    cfg_a, pa, oa, sa = load_checkpoint(a)
    cfg_b, pb, ob, sb = load_checkpoint(b)
    assert cfg_a == cfg_b and sa == sb and oa["t"] == ob["t"]
    assert list(pa) == list(pb)
    for n in pa:
        assert pa[n].dtype == pb[n].dtype
        assert np.array_equal(pa[n], pb[n]), f"param {n} differs"
        assert np.array_equal(oa["m"][n], ob["m"][n]), f"adam m of {n} differs"
        assert np.array_equal(oa["v"][n], ob["v"][n]), f"adam v of {n} differs"


def no_tmp_files(*dirs):
    return all(not list(d.glob("*.tmp")) for d in dirs)


# --------------------------------------------------------------------------------------------
# learning

def test_loss_decreases(tmp_path):
    cfg = small_cfg(steps=60, lr=3e-3, warmup=5, log_every=5)
    train.train(cfg, tmp_path, verbose=False)
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    # ~2.8 -> ~1.2 in practice; chance level is ln(20 captions) = 3.0
    assert first > 2.5
    assert last < first - 0.8, losses


# --------------------------------------------------------------------------------------------
# resumption and determinism

def test_resume_equals_uninterrupted(tmp_path):
    cfg = small_cfg(steps=40, log_every=5, checkpoint_every=5)
    a, b = tmp_path / "a", tmp_path / "b"
    summary_a = train.train(cfg, a, verbose=False)

    assert train.train(cfg, b, stop_after=17, verbose=False) == {"step": 17, "stopped_early": True}
    assert load_checkpoint(b)[3] == 17
    assert not (b / "summary.json").exists()
    assert [r["step"] for r in metrics(b)] == [5, 10, 15]
    # a log line written after the checkpoint (as by a run killed at step 20) is dropped on resume
    with open(b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, "loss": 123.0}) + "\n")
    summary_b = train.train(None, b, resume=True, verbose=False)

    assert_same_checkpoint(a / CHECKPOINT, b / CHECKPOINT)
    assert load_checkpoint(b)[3] == 40 and load_checkpoint(b)[2]["t"] == 40
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == list(range(5, 41, 5))
    assert without_timing(ma) == without_timing(mb)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    assert json.dumps(summary_a, sort_keys=True) == json.dumps(summary_b, sort_keys=True)
    assert no_tmp_files(a, b)


def test_resume_updates_every_tensor_in_one_call(tmp_path, monkeypatch):
    # the trainer re-flattens the loaded params and moments (optim.flatten), so a resumed run
    # takes the one-call AdamW path as a fresh one does, not the per-tensor fallback
    from minispatial import kernels, ops

    cfg = small_cfg(steps=10, checkpoint_every=5)
    assert train.train(cfg, tmp_path, stop_after=5, verbose=False)["stopped_early"]

    def per_tensor(*args):
        raise AssertionError("AdamW fell back to one kernel call per tensor")

    monkeypatch.setattr(kernels, "adamw_update", per_tensor)
    with ops.use_backend("numba"):
        assert train.train(None, tmp_path, resume=True, verbose=False)["step"] == 10


def test_resume_from_the_command_line(tmp_path, capsys):
    d, straight = str(tmp_path / "d"), str(tmp_path / "straight")
    assert main(["--out", d, "--preset", "tiny", "--stop-after", "10", "--quiet"]) == 0
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


def test_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("not json")
    (out / "metrics.jsonl").write_text('{"step": 99}\n' * 5)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    args = ["--out", str(out), "--preset", "tiny", *SMALL_ARGS, "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert main(args + ["--overwrite"]) == 0
    cfg = config.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg == config.make_config(SMALL, preset="tiny")
    assert [r["step"] for r in metrics(out)] == [10, 20, 30]            # the old log is gone
    assert (out / "summary.json").is_file() and (out / "notes.txt").read_text() == "mine"


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


def test_parse_overrides():
    assert train.parse_overrides(["--n_pair", "5", "--lr=1e-3", "--steps", "-1"]) == \
        {"n_pair": "5", "lr": "1e-3", "steps": "-1"}
    with pytest.raises(ValueError, match="x"):
        train.parse_overrides(["x"])


# --------------------------------------------------------------------------------------------
# NaN / inf

@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # overflow, on purpose
def test_absurd_lr_stops_with_a_message_and_keeps_a_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--out", str(out), "--preset", "tiny", *SMALL_ARGS, "--lr", "1e30", "--checkpoint_every", "1",
               "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err.lower()
    assert "step" in err and ("nan" in err or "inf" in err)
    cfg, params, _, step = load_checkpoint(out)        # the last checkpoint before the blow-up
    assert cfg.train.lr == 1e30 and step >= 1
    assert all(np.isfinite(p).all() for p in params.values())
    assert not (out / "summary.json").exists() and no_tmp_files(out)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # overflow, on purpose
def test_inf_params_are_never_checkpointed(tmp_path, capsys):
    # lr 1e39 overflows float32 in the first update: every param becomes inf/NaN at once, before
    # any loss is NaN; the checkpoint due after step 1 must not be written
    out = tmp_path / "run"
    rc = main(["--out", str(out), "--preset", "tiny", *SMALL_ARGS, "--lr", "1e39", "--checkpoint_every", "1",
               "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err.lower()
    assert "step 1" in err and ("nan" in err or "inf" in err)
    if (out / CHECKPOINT).exists():
        params = load_checkpoint(out)[1]
        assert all(np.isfinite(p).all() for p in params.values())
    else:
        assert "no checkpoint" in err                   # and the message does not promise one


def test_nan_midway_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg(checkpoint_every=2)
    clean = tmp_path / "clean"
    train.train(cfg, clean, stop_after=4, verbose=False)

    real = train.loss_and_grads
    calls = []

    def nan_at_step_6(*args):
        calls.append(1)
        loss, grads = real(*args)
        return (math.nan if len(calls) == 6 else loss), grads

    monkeypatch.setattr(train, "loss_and_grads", nan_at_step_6)
    out = tmp_path / "run"
    with pytest.raises(train.TrainingError, match=r"loss is nan .*step 6.*step 4"):
        train.train(cfg, out, verbose=False)
    assert_same_checkpoint(out / CHECKPOINT, clean / CHECKPOINT)   # the step-4 state, intact
    assert no_tmp_files(out)


# --------------------------------------------------------------------------------------------
# checkpoints

def test_truncated_checkpoint_is_rejected(tmp_path, capsys):
    out = tmp_path / "run"
    train.train(small_cfg(), out, stop_after=3, verbose=False)
    path = out / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    assert main(["--resume", str(out), "--quiet"]) in (1, 2)
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and str(path) in err


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path)                       # a directory without checkpoint.npz
    assert main(["--resume", str(tmp_path), "--quiet"]) == 1
    assert "checkpoint.npz" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a valid minispatial checkpoint"):
        load_checkpoint(tmp_path / "other.npz")


def test_checkpoint_with_wrong_shapes_is_rejected(tmp_path):
    cfg = small_cfg()
    train.train(cfg, tmp_path, stop_after=1, verbose=False)
    _, params, opt, _ = load_checkpoint(tmp_path)
    params["text.W_E"] = params["text.W_E"][:-1]
    opt["m"]["text.W_E"] = opt["m"]["text.W_E"][:-1]
    opt["v"]["text.W_E"] = opt["v"]["text.W_E"][:-1]
    save_checkpoint(tmp_path / "bad.npz", cfg, params, opt, 1)
    with pytest.raises(ValueError, match="text.W_E"):
        load_checkpoint(tmp_path / "bad.npz")


def test_save_is_atomic_and_leaves_no_tmp_files(tmp_path, monkeypatch):
    cfg = small_cfg()
    train.train(cfg, tmp_path, stop_after=2, verbose=False)
    path = tmp_path / CHECKPOINT
    good = path.read_bytes()
    assert no_tmp_files(tmp_path)
    _, params, opt, _ = load_checkpoint(path)
    save_checkpoint(path, cfg, params, opt, 5)                    # a successful save replaces it
    assert load_checkpoint(path)[3] == 5 and no_tmp_files(tmp_path)

    def dies_midway(f, **arrays):                                  # a crash while writing
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    path.write_bytes(good)
    monkeypatch.setattr(train.np, "savez", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, cfg, params, opt, 7)
    assert path.read_bytes() == good                               # the old checkpoint is intact
    assert load_checkpoint(path)[3] == 2
    assert no_tmp_files(tmp_path)


def test_keep_freed_memory_is_harmless():
    # cli.py asks glibc's malloc to keep freed memory (fewer page faults per step); elsewhere a no-op
    import platform

    from minispatial.cli import keep_freed_memory

    got = keep_freed_memory()
    assert isinstance(got, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert got
