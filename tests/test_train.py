"""The trainer end to end on seconds-long runs: learning, exact resumption, determinism, the
files of a run directory, the command line's errors, NaN handling and checkpoint integrity."""

import json
import math
import shutil

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
    assert main(["--resume", str(tmp_path), "--quiet"]) == 2       # a bad argument
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
    opt["t"] = 5                                                   # (t counts the steps: load checks it)
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


# --------------------------------------------------------------------------------------------
# checkpoint validation: everything a checkpoint holds is checked before any of it is used

def tamper(path, **changes):
    """Rewrite the checkpoint at `path` with arrays replaced (a value) or removed (None)."""
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v(data) if callable(v) else v
    with open(path, "wb") as f:
        np.savez(f, **data)


def _bad_value(key, value):
    def f(data):
        a = data[key].copy()
        a.reshape(-1)[-1] = value
        return a
    return f


W = "text.W_E"                   # a 2-D parameter of every model
TAMPERED = {
    # the bug report: moments of the wrong shape were copied into an uninitialised buffer
    "adam_m shape": ({f"adam_m/{W}": np.zeros((3, 3), np.float32)}, f"adam_m/{W}"),
    "adam_v shape": ({f"adam_v/{W}": lambda d: d[f"adam_v/{W}"][:-1]}, f"adam_v/{W}"),
    "adam_v dtype": ({f"adam_v/{W}": lambda d: d[f"adam_v/{W}"].astype(np.float64)}, f"adam_v/{W}"),
    "adam_m missing": ({"adam_m/logit_scale": None}, "adam_m/logit_scale"),
    "extra moment": ({"adam_v/extra": np.zeros(3, np.float32)}, "adam_v/extra"),
    "extra key": ({"notes": np.zeros(1)}, "notes"),
    "param nan": ({f"param/{W}": _bad_value(f"param/{W}", np.nan)}, f"param/{W}"),
    "adam_m inf": ({f"adam_m/{W}": _bad_value(f"adam_m/{W}", -np.inf)}, f"adam_m/{W}"),
    "adam_v negative": ({f"adam_v/{W}": _bad_value(f"adam_v/{W}", -1.0)}, f"adam_v/{W}"),
    "step beyond steps": ({"meta/step": np.array(31), "meta/t": np.array(31)}, "meta/step"),
    "step negative": ({"meta/step": np.array(-1), "meta/t": np.array(-1)}, "meta/step"),
    "step float": ({"meta/step": np.array(5.5)}, "meta/step"),
    "step vector": ({"meta/step": np.array([5, 5])}, "meta/step"),
    "t negative": ({"meta/t": np.array(-3)}, "meta/t"),
    "t not the step": ({"meta/t": np.array(4)}, "meta/t"),
    "format": ({"meta/format": np.array(2)}, "format"),
    "format missing": ({"meta/format": None}, "meta/format"),
    "config a list": ({"meta/config": np.array("[1, 2]")}, "meta/config"),
    "config not JSON": ({"meta/config": np.array("{oops")}, "meta/config"),
    "config bad field": ({"meta/config": np.array('{"train": {"steps": -4}}')}, "steps"),
}


@pytest.fixture
def train_ckpt(tmp_path):
    """A run of 30 steps stopped (with its checkpoint) after step 5."""
    out = tmp_path / "run"
    train.train(small_cfg(), out, stop_after=5, verbose=False)
    return out


@pytest.mark.parametrize("case", list(TAMPERED))
def test_every_part_of_a_checkpoint_is_validated(train_ckpt, capsys, case):
    changes, named = TAMPERED[case]
    path = train_ckpt / CHECKPOINT
    tamper(path, **changes)
    with pytest.raises(ValueError, match="not a valid minispatial checkpoint") as e:
        load_checkpoint(path)
    assert named in str(e.value) and str(path) in str(e.value)
    before = {p.name: p.read_bytes() for p in train_ckpt.iterdir()}
    assert main(["--resume", str(train_ckpt), "--quiet"]) == 2          # a bad input file
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and "minispatial train: error:" in err and named in err
    assert {p.name: p.read_bytes() for p in train_ckpt.iterdir()} == before   # nothing touched


def test_an_untampered_rewrite_still_loads(train_ckpt):
    tamper(train_ckpt / CHECKPOINT)
    cfg, params, opt, step = load_checkpoint(train_ckpt)
    assert step == 5 and opt["t"] == 5 and set(opt["m"]) == set(params) == set(opt["v"])


def test_random_bytes_are_not_a_checkpoint(train_ckpt, capsys):
    path = train_ckpt / CHECKPOINT
    path.write_bytes(np.random.default_rng(1).bytes(20000))
    with pytest.raises(ValueError, match="not a minispatial checkpoint") as e:
        load_checkpoint(path)
    assert "pickle" not in str(e.value)
    assert main(["--resume", str(train_ckpt), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a minispatial checkpoint" in err and "pickle" not in err


# --------------------------------------------------------------------------------------------
# command-line combinations that cannot work

@pytest.mark.parametrize("k", ["-1", "0"])
def test_stop_after_must_be_positive(tmp_path, capsys, k):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--preset", "tiny", "--stop-after", k, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--stop-after" in err and k in err and ">= 1" in err
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
# metrics.jsonl on resume: a torn tail is dropped, a corrupt line is named

def test_resume_tolerates_a_torn_metrics_tail(tmp_path):
    cfg = small_cfg(log_every=5, checkpoint_every=10)
    clean, out = tmp_path / "clean", tmp_path / "run"
    train.train(cfg, clean, verbose=False)
    for tail in ('{"step": 15, "loss": 2.7', "\n\n", '{"step": 15, "loss": 2.7}\n{"step": 2', "\x00\x00\x00",
                 "  \n"):
        shutil.rmtree(out, ignore_errors=True)
        train.train(cfg, out, stop_after=10, verbose=False)
        with open(out / "metrics.jsonl", "a") as f:          # what a crash or a full disk leaves
            f.write(tail)
        train.train(None, out, resume=True, verbose=False)
        assert without_timing(metrics(out)) == without_timing(metrics(clean)), repr(tail)
        assert_same_checkpoint(out / CHECKPOINT, clean / CHECKPOINT)


@pytest.mark.parametrize("bad", ['{"step": "x"}', "[1, 2]", "garbage", '{"loss": 1.0}', '{"step": 2.5}',
                                 '{"step": true}', "7"])
def test_a_corrupt_metrics_line_is_named(train_ckpt, capsys, bad):
    mpath = train_ckpt / "metrics.jsonl"
    lines = ['{"step": 2}', bad, '{"step": 4}']
    mpath.write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_bytes() for p in train_ckpt.iterdir()}
    assert main(["--resume", str(train_ckpt), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "minispatial train: error:" in err and f"{mpath} line 2" in err
    assert {p.name: p.read_bytes() for p in train_ckpt.iterdir()} == before


# --------------------------------------------------------------------------------------------
# a finished run, the run-directory lock, the progress line

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


def test_a_locked_run_directory_is_refused(train_ckpt, capsys):
    import fcntl

    with open(train_ckpt / train.LOCK_FILE, "w") as f:        # as a running trainer holds it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = {p.name: p.read_bytes() for p in train_ckpt.iterdir()}
        for args in (["--resume", str(train_ckpt)], ["--out", str(train_ckpt), "--preset", "tiny", "--overwrite"]):
            assert main([*args, "--quiet"]) == 1
            err = capsys.readouterr().err
            assert "another process is writing to" in err and str(train_ckpt) in err
        assert {p.name: p.read_bytes() for p in train_ckpt.iterdir()} == before
    assert main(["--resume", str(train_ckpt), "--quiet"]) == 0          # released: it goes on
    assert not (train_ckpt / train.LOCK_FILE).exists()                 # and the lock file is gone


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
