"""Checkpoints (minispatial/checkpoint.py): written atomically, read back exactly, and every entry
validated before any of it is used, by `load_checkpoint` and by `minispatial train --resume`
(exit 2, one line naming the file and the entry, nothing touched).

The checkpoints under test come from short runs of the reference step: what is tested is the
file, not the step that wrote it."""

import numpy as np
import pytest

from minispatial import checkpoint, config, train
from minispatial.checkpoint import (
    CHECKPOINT,
    FORMAT_VERSION,
    load_checkpoint,
    save_checkpoint,
    validate_checkpoint,
    write_atomic,
)
from minispatial.model import init_params
from minispatial.optim import AdamW
from minispatial.train import main
from support import tamper

SMALL = {"n_pair": 4, "n_labels": 8, "n_heldout": 3, "image_len": 6, "n_layout": 10}
RESUME = ["--step", "reference", "--quiet"]


def small_cfg(**overrides):
    return config.make_config({**SMALL, **overrides}, preset="tiny")


def no_tmp_files(*dirs):
    return all(not list(d.glob("*.tmp")) for d in dirs)


@pytest.fixture
def train_ckpt(tmp_path):
    """A run of 30 steps stopped (with its checkpoint) after step 5."""
    out = tmp_path / "run"
    train.train(small_cfg(), out, step="reference", stop_after=5, verbose=False)
    return out


# --------------------------------------------------------------------------------------------
# saving and loading

def test_save_and_load_round_trip_an_adamw_state(tmp_path):
    # what the trainer saves (AdamW's views of its flat buffer) is what load returns, bit for bit
    cfg = small_cfg()
    opt = AdamW(init_params(cfg.model, 0), beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        opt.step({n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in opt.params.items()}, 1e-3)
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, cfg, opt.params, {"t": opt.t, "m": opt.m, "v": opt.v}, 3)
    got_cfg, params, state, step = load_checkpoint(tmp_path)          # a directory: its checkpoint.npz
    assert got_cfg == cfg and step == 3 and state["t"] == 3 and list(params) == list(opt.params)
    for n, p in opt.params.items():
        assert params[n].dtype == p.dtype and params[n].shape == p.shape
        assert np.array_equal(params[n], p) and np.array_equal(state["m"][n], opt.m[n])
        assert np.array_equal(state["v"][n], opt.v[n])
    with np.load(path) as z:
        assert int(z["meta/format"]) == FORMAT_VERSION
        assert validate_checkpoint({k: z[k] for k in z.files}) == (cfg, 3)
    assert no_tmp_files(tmp_path)


def test_truncated_checkpoint_is_rejected(tmp_path, capsys):
    out = tmp_path / "run"
    train.train(small_cfg(), out, step="reference", stop_after=3, verbose=False)
    path = out / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    assert main(["--resume", str(out), *RESUME]) in (1, 2)
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and str(path) in err


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path)                       # a directory without checkpoint.npz
    assert main(["--resume", str(tmp_path), *RESUME]) == 2       # a bad argument
    assert "checkpoint.npz" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a valid minispatial checkpoint"):
        load_checkpoint(tmp_path / "other.npz")


def test_checkpoint_with_wrong_shapes_is_rejected(tmp_path):
    cfg = small_cfg()
    train.train(cfg, tmp_path, step="reference", stop_after=1, verbose=False)
    _, params, opt, _ = load_checkpoint(tmp_path)
    params["text.W_E"] = params["text.W_E"][:-1]
    opt["m"]["text.W_E"] = opt["m"]["text.W_E"][:-1]
    opt["v"]["text.W_E"] = opt["v"]["text.W_E"][:-1]
    save_checkpoint(tmp_path / "bad.npz", cfg, params, opt, 1)
    with pytest.raises(ValueError, match="text.W_E"):
        load_checkpoint(tmp_path / "bad.npz")


def test_save_is_atomic_and_leaves_no_tmp_files(tmp_path, monkeypatch):
    cfg = small_cfg()
    train.train(cfg, tmp_path, step="reference", stop_after=2, verbose=False)
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
    monkeypatch.setattr(checkpoint.np, "savez", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, cfg, params, opt, 7)
    assert path.read_bytes() == good                               # the old checkpoint is intact
    assert load_checkpoint(path)[3] == 2
    assert no_tmp_files(tmp_path)


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_atomic(path, "first\n")
    write_atomic(path, "second\n")
    assert path.read_text() == "second\n" and no_tmp_files(tmp_path)

    def no_rename(src, dst):                                       # e.g. Ctrl-C before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "third\n")
    assert path.read_text() == "second\n" and no_tmp_files(tmp_path)


# --------------------------------------------------------------------------------------------
# checkpoint validation: everything a checkpoint holds is checked before any of it is used

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


@pytest.mark.parametrize("case", list(TAMPERED))
def test_every_part_of_a_checkpoint_is_validated(train_ckpt, capsys, case):
    changes, named = TAMPERED[case]
    path = train_ckpt / CHECKPOINT
    tamper(path, **changes)
    with pytest.raises(ValueError, match="not a valid minispatial checkpoint") as e:
        load_checkpoint(path)
    assert named in str(e.value) and str(path) in str(e.value)
    before = {p.name: p.read_bytes() for p in train_ckpt.iterdir()}
    assert main(["--resume", str(train_ckpt), *RESUME]) == 2          # a bad input file
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
    assert main(["--resume", str(train_ckpt), *RESUME]) == 2
    err = capsys.readouterr().err
    assert "not a minispatial checkpoint" in err and "pickle" not in err
