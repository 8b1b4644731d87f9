"""The metrics of evaluate.py on cases whose answer is known by construction.

Oracle models, passed as evaluate's `encoders` argument in place of the two towers, read the
scene straight off the pixels and tokens, so their scores, and hence every metric, follow from
the definitions.
"""

import json
import math

import numpy as np
import pytest

from minispatial import evaluate as ev
from minispatial.config import make_config
from minispatial.data import SPLIT_NAMES, TestbedConfig, make_testbed, sample_batch
from minispatial.model import ModelConfig, encode_images, encode_texts, init_params, loss_only
from minispatial.text import FIRST_LABEL_ID, Tokenizer
from support import tamper

SMALL = dict(image_len=6, n_labels=8, n_heldout=3, n_pair=5, n_layout=5, n_single_layout=3,
             n_eval_layout=4)


def small_testbed(**kw):
    return make_testbed(TestbedConfig(**{**SMALL, **kw}))


def model_cfg_for(tb, **kw):
    d = tb.config
    return ModelConfig(**{"d_model": 16, "n_heads": 2, "d_head": 8, **kw,
                          "vision_vocab": d.n_labels + 1, "text_vocab": 10 + d.n_labels,
                          "vision_ctx": d.image_len + 1, "text_ctx": 8})


# ------------------------------------------------------------------------------- oracles

def image_scene(images):
    # images [B, L] -> (left label [B], right label or 0 [B]) read off the pixels
    rows = np.arange(len(images))
    nz = images > 0
    first = np.argmax(nz, axis=1)
    rest = nz.copy()
    rest[rows, first] = False
    second = np.argmax(rest, axis=1)
    return images[rows, first], np.where(rest.any(axis=1), images[rows, second], 0)


def text_scene(tokens):
    # tokens [B, T] -> (left label [B], right label or 0 [B]) of the scene the caption describes
    right_id = Tokenizer(1).token_id("right")
    x = tokens[:, 0] - FIRST_LABEL_ID + 1                       # first-mentioned label
    y = np.where(tokens[:, 6] >= FIRST_LABEL_ID, tokens[:, 6] - FIRST_LABEL_ID + 1, 0)
    is_right = (tokens == right_id).any(axis=1)                 # "{b} is on the right of {a}"
    return np.where(is_right, y, x), np.where(is_right, x, y)


def onehot_scene(a, b, n):
    f = np.zeros((len(a), (n + 1) ** 2), np.float32)
    f[np.arange(len(a)), a * (n + 1) + b] = 1.0
    return f


def label_set(a, b, n):
    f = np.zeros((len(a), n + 1), np.float32)
    f[np.arange(len(a)), a] = 1.0
    f[np.arange(len(a)), b] += 1.0
    f[:, 0] = 0.0
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def encoders(img_fn, txt_fn):
    # features of the raw input -> the (encode_images_fn, encode_texts_fn) pair evaluate takes
    return (lambda params, images, cfg: img_fn(images),
            lambda params, tokens, eot, cfg: txt_fn(tokens))


def perfect_oracle(n):
    return encoders(lambda im: onehot_scene(*image_scene(im), n),
                    lambda tk: onehot_scene(*text_scene(tk), n))


def order_blind_oracle(n):
    return encoders(lambda im: label_set(*image_scene(im), n),
                    lambda tk: label_set(*text_scene(tk), n))


def noisy_oracle(n, noise=0.9, seed=0):
    """The perfect oracle plus a fixed random linear function of the raw input: mixed results."""
    rng = np.random.default_rng(seed)
    Wi = rng.standard_normal((n + 1, 16, (n + 1) ** 2)).astype(np.float32)
    Wt = rng.standard_normal((10 + n, 8, (n + 1) ** 2)).astype(np.float32)

    def feat(scene, noise_vec):
        f = onehot_scene(*scene, n) + noise * noise_vec
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def img(im):
        return feat(image_scene(im), Wi[im, np.arange(im.shape[1])].sum(1) / 4)

    def txt(tk):
        return feat(text_scene(tk), Wt[tk, np.arange(tk.shape[1])].sum(1) / 4)

    return encoders(img, txt)


PARAMS = {"logit_scale": np.array(math.log(100.0))}


# ------------------------------------------------------------------------------- tie rules

def test_tie_rules():
    s = np.array([[0.9, 0.9, 0.1], [0.2, 0.9, 0.9], [0.5, 0.1, 0.2], [0.3, 0.3, 0.3]])
    c = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 1]], bool)
    np.testing.assert_allclose(ev.top_credit(s, c), [0.5, 0.0, 1.0, 2 / 3])
    np.testing.assert_allclose(ev.pair_credit(np.array([0.5, 0.5, 0.2]), np.array([0.2, 0.5, 0.5])),
                               [1.0, 0.5, 0.0])


# ------------------------------------------------------------------------------- caption bank

@pytest.mark.parametrize("mode", ["left", "left+right"])
def test_bank_matches_the_split_captions(mode):
    tb = small_testbed(caption_mode=mode)
    bank = ev.caption_bank({}, tb, None, encoders(None, lambda tokens: np.zeros((len(tokens), 3))))
    caps = np.array(bank.captions, dtype=object)
    for name in SPLIT_NAMES:
        split = tb.splits[name]
        assert list(caps[bank.example_index(split)]) == list(split.captions)
        pair = split.is_pair
        a, b = split.labels[pair, 0], split.labels[pair, 1]
        assert list(caps[bank.left[b, a]]) == list(np.array(split.swapped_left_captions()[0], object)[pair])
        assert list(caps[bank.right[a, b]]) == list(np.array(split.right_form().captions, object)[pair])
        assert list(caps[bank.right[b, a]]) == [f"{x} is on the right of {y}" for x, y in zip(a, b)]
        np.testing.assert_array_equal(bank.scene[bank.example_index(split)], split.scene_key)


# ------------------------------------------------------------------------------- oracles

@pytest.mark.parametrize("mode", ["left", "left+right"])
def test_perfect_oracle_scores_one_everywhere(mode):
    tb = small_testbed(caption_mode=mode)
    m = ev.evaluate_all(PARAMS, tb, None, encoders=perfect_oracle(tb.config.n_labels))
    for k, v in m.items():
        split, _, metric = k.partition(".")
        if metric.endswith("acc") or metric.startswith(("lr_acc", "labelset_acc")):
            by_label = metric.endswith("_labels")
            expect_nan = ((split == "val_single" and metric in ("lr_acc", "lr_acc_right", "labelset_acc",
                                                                 "lr_acc_recognised"))
                          or (split in ("val_seen_pair", "val_unseen_pair")
                              and (metric == "labelset_acc_single" or by_label))
                          or metric == "i2t_acc_single_labels")   # SMALL: n_pair = n_labels - n_heldout
            assert math.isnan(v) if expect_nan else v == 1.0, (k, v)
        elif metric == "pos_cos":
            assert v == pytest.approx(1.0)
        elif metric == "neg_cos":
            assert v == pytest.approx(0.0)
        elif metric == "loss":
            assert 0.0 <= v < 1e-30  # logits 100 on the diagonal, 0 elsewhere
    assert m["logit_scale"] == pytest.approx(100.0)
    assert ("val_seen_pair.lr_acc_right" in m) == (mode == "left+right")


@pytest.mark.parametrize("mode", ["left", "left+right"])
def test_order_blind_oracle_is_at_chance_on_order_only(mode):
    tb = small_testbed(caption_mode=mode)
    m = ev.evaluate_all(PARAMS, tb, None, encoders=order_blind_oracle(tb.config.n_labels))
    for split in ("train", "val_seen_pair", "val_unseen_pair"):
        assert m[f"{split}.lr_acc"] == 0.5                 # every comparison is a tie: half credit
        assert m[f"{split}.labelset_acc"] == 1.0           # both orders are right
        if mode == "left+right":
            assert m[f"{split}.lr_acc_right"] == 0.5
    for split in ("val_seen_pair", "val_unseen_pair"):     # "a left of b" ties "b left of a"
        assert m[f"{split}.i2t_acc"] == 0.5
        assert m[f"{split}.t2i_acc"] == 0.5                # as many (a, b) as (b, a) images
    for metric in ("i2t_acc", "t2i_acc", "labelset_acc_single"):
        assert m[f"val_single.{metric}"] == 1.0
    # train: singles are exact; pair images tie between the two orders
    tr = tb.splits["train"]
    n_single = int((~tr.is_pair).sum())
    assert m["train.i2t_acc"] == pytest.approx((n_single + 0.5 * (len(tr) - n_single)) / len(tr))
    n_pair_caps = len({c for c, p in zip(tr.captions, tr.is_pair) if p})
    n_lab = tb.config.n_labels
    assert m["train.t2i_acc"] == pytest.approx((n_lab + 0.5 * n_pair_caps) / (n_lab + n_pair_caps))


def reference_split(feats_img, feats_txt, tb, name):
    """Naive per-example loops over the definitions (no ties happen with the noisy oracle)."""
    split = tb.splits[name]
    n = tb.config.n_labels
    img = feats_img(split.images).astype(np.float64)
    caps = sorted(set(split.captions))
    ctok, ceot = tb.tokenizer.encode_batch(caps)
    cfeat = feats_txt(ctok).astype(np.float64)
    cscene = {c: text_scene(t[None])[0][0] * (n + 1) + text_scene(t[None])[1][0] for c, t in zip(caps, ctok)}
    out = {}
    out["i2t_acc"] = np.mean([cscene[caps[int(np.argmax(cfeat @ img[i]))]] == split.scene_key[i]
                              for i in range(len(split))])
    out["t2i_acc"] = np.mean([split.scene_key[int(np.argmax(img @ cfeat[j]))] == cscene[c]
                              for j, c in enumerate(caps)])
    own = {c: cfeat[j] for j, c in enumerate(caps)}
    out["pos_cos"] = np.mean([img[i] @ own[split.captions[i]] for i in range(len(split))])
    negs = [img[i] @ cfeat[j] for i in range(len(split)) for j, c in enumerate(caps)
            if cscene[c] != split.scene_key[i]]
    out["neg_cos"] = np.mean(negs) if negs else math.nan
    lr, ls = [], []
    all_pairs = [(x, y) for x in range(1, n + 1) for y in range(1, n + 1) if x != y]
    ptok, _ = tb.tokenizer.encode_batch([f"{x} is on the left of {y}" for x, y in all_pairs])
    pfeat = feats_txt(ptok).astype(np.float64)
    stok, _ = tb.tokenizer.encode_batch([f"{x} is in the image" for x in range(1, n + 1)])
    sfeat = feats_txt(stok).astype(np.float64)
    single_hits = []
    for i in range(len(split)):
        a, b = split.labels[i]
        if b:
            t, _ = tb.tokenizer.encode_batch([f"{a} is on the left of {b}", f"{b} is on the left of {a}"])
            f = feats_txt(t).astype(np.float64)
            lr.append(float(img[i] @ f[0] > img[i] @ f[1]))
            best = all_pairs[int(np.argmax(pfeat @ img[i]))]
            ls.append(set(best) == {a, b})
        else:
            single_hits.append(int(np.argmax(sfeat @ img[i])) + 1 == a)
    out["lr_acc"] = np.mean(lr) if lr else math.nan
    out["labelset_acc"] = np.mean(ls) if ls else math.nan
    out["labelset_acc_single"] = np.mean(single_hits) if single_hits else math.nan
    return out


@pytest.mark.parametrize("chunked", [False, True])
def test_matches_naive_reference_with_noisy_oracle(monkeypatch, chunked):
    tb = small_testbed()
    enc_img, enc_txt = noisy_oracle(tb.config.n_labels)
    if chunked:  # tiny chunks must not change anything
        monkeypatch.setattr(ev, "ENCODE_CHUNK", 7)
        monkeypatch.setattr(ev, "SCORE_CHUNK_ELEMS", 50)
    m = ev.evaluate_all(PARAMS, tb, None, encoders=(enc_img, enc_txt))
    for name in SPLIT_NAMES:
        ref = reference_split(lambda im: enc_img(None, im, None),
                              lambda tk: enc_txt(None, tk, None, None), tb, name)
        for metric, v in ref.items():
            got = m[f"{name}.{metric}"]
            if math.isnan(v):
                assert math.isnan(got), (name, metric)
            else:
                assert got == pytest.approx(v, abs=1e-9), (name, metric, got, v)
    accs = [m[f"{s}.i2t_acc"] for s in SPLIT_NAMES]
    assert 0.05 < min(accs) and max(accs) < 1.0      # the noise makes the test non-trivial


# ------------------------------------------------------------------------------- real model

@pytest.mark.parametrize("mode", ["left", "left+right"])
def test_random_init_model_is_near_chance(mode):
    tb = small_testbed(caption_mode=mode)
    mc = model_cfg_for(tb, text_layers=2 if mode == "left+right" else 1)
    names = ev.metric_names(mode)
    for seed in range(2):
        params = init_params(mc, seed)
        m = ev.evaluate_all(params, tb, mc)
        assert set(m) == {f"{s}.{k}" for s in SPLIT_NAMES for k in names} | {"logit_scale"}
        for k, v in m.items():
            if "acc" in k:
                assert 0.0 <= v <= 1.0 or math.isnan(v), k
        n_pairs = tb.config.n_labels * (tb.config.n_labels - 1)
        for s in ("val_seen_pair", "val_unseen_pair"):
            assert 0.2 <= m[f"{s}.lr_acc"] <= 0.8
            assert m[f"{s}.labelset_acc"] <= 10 * 2 / n_pairs
            assert m[f"{s}.i2t_acc"] <= 0.5
        assert abs(m["val_seen_pair.pos_cos"] - m["val_seen_pair.neg_cos"]) < 0.2
        assert m["logit_scale"] == pytest.approx(1 / 0.07)


def test_encoders_default_to_the_models_own_and_are_used_everywhere():
    tb = small_testbed()
    mc = model_cfg_for(tb)
    params = init_params(mc, 1)
    base = ev.evaluate_all(params, tb, mc)
    explicit = ev.evaluate_all(params, tb, mc, encoders=(encode_images, encode_texts))
    assert all(base[k] == explicit[k] or (math.isnan(base[k]) and math.isnan(explicit[k])) for k in base)
    # every image and every caption goes through the encoders given, none through the model's
    calls = {"images": 0, "texts": 0}

    def img(params, images, cfg):
        calls["images"] += len(images)
        return encode_images(params, images, cfg)

    def txt(params, tokens, eot, cfg):
        calls["texts"] += len(tokens)
        return encode_texts(params, tokens, eot, cfg)

    counted = ev.evaluate_all(params, tb, mc, encoders=(img, txt))
    assert all(counted[k] == base[k] or math.isnan(base[k]) for k in base)
    n = tb.config.n_labels
    assert calls == {"images": sum(len(tb.splits[s]) for s in SPLIT_NAMES), "texts": n + 2 * n * (n - 1)}
    oracle = ev.evaluate_split(params, tb, "val_unseen_pair", mc, encoders=perfect_oracle(n))
    assert oracle["lr_acc"] == 1.0 and base["val_unseen_pair.lr_acc"] < 1.0


def test_loss_is_the_model_loss_on_the_fixed_batch():
    tb = small_testbed(caption_mode="left+right")
    mc = model_cfg_for(tb, text_layers=2)
    params = init_params(mc, 3)
    for name in ("train", "val_seen_pair"):
        split = tb.splits[name]
        got = ev.evaluate_split(params, tb, name, mc)["loss"]
        idx = sample_batch(split, 128, np.random.default_rng(0))
        want = loss_only(params, split.images[idx], split.tokens[idx], split.eot[idx], mc)
        assert got == pytest.approx(want, rel=1e-5)


def test_empty_splits_give_nan_without_crashing():
    # n_single_layout == image_len leaves val_single empty; n_layout == C(L, 2) empties val_seen_pair
    tb = small_testbed(n_single_layout=6, n_layout=15)
    mc = model_cfg_for(tb)
    m = ev.evaluate_all(init_params(mc, 0), tb, mc)
    for s in ("val_single", "val_seen_pair"):
        assert m[f"{s}.n"] == 0
        assert all(math.isnan(m[f"{s}.{k}"]) for k in ev.metric_names("left") if k != "n")
    assert m["val_unseen_pair.n"] > 0 and not math.isnan(m["val_unseen_pair.lr_acc"])
    assert math.isnan(m["val_unseen_pair.labelset_acc_single"])   # no single objects there
    assert "-" in ev.format_table(m)


def test_unknown_split_is_an_error():
    tb = small_testbed()
    with pytest.raises(ValueError, match="val_nope"):
        ev.evaluate_split({}, tb, "val_nope", None)


def test_format_table_layout():
    m = {f"{s}.{k}": 0.5 for s in SPLIT_NAMES for k in ev.metric_names("left")}
    m.update({f"{s}.n": 5.0 for s in SPLIT_NAMES})
    m.update({"train.n": 10.0, "val_single.lr_acc": math.nan, "logit_scale": 14.3, "backend": "numba"})
    lines = ev.format_table(m).splitlines()
    assert lines[0].split() == ["metric", *SPLIT_NAMES]
    assert lines[2].split() == ["n", "10", "5", "5", "5"]
    lr = next(ln for ln in lines if ln.startswith("lr_acc"))
    assert lr.split() == ["lr_acc", "0.500", "-", "0.500", "0.500"]
    assert "logit_scale: 14.300" in lines and "backend: numba" in lines


# ------------------------------------------------------------------------------- command line

def test_main_missing_and_corrupt_checkpoint(tmp_path, capsys):
    assert ev.main([str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minispatial eval: error:") and "nope.npz" in err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    assert ev.main([str(bad)]) == 2
    assert "minispatial eval: error:" in capsys.readouterr().err


@pytest.mark.parametrize("step", ["fast", "reference"])
def test_main_on_a_real_checkpoint(tmp_path, capsys, step):
    # `eval --step S` of a run trained with `--step S` prints the trainer's own summary numbers
    # (`eval` without --step encodes as the default training step does: fast)
    from minispatial.train import train

    cfg = make_config({"steps": 2, "n_labels": 8, "n_heldout": 3, "n_pair": 5, "image_len": 6,
                       "n_single_layout": 3, "n_layout": 5}, preset="tiny")
    summary = train(cfg, tmp_path / "run", step=step, verbose=False)
    flag = [] if step == "fast" else ["--step", step]
    assert ev.main([str(tmp_path / "run" / "checkpoint.npz"), *flag]) == 0
    out = capsys.readouterr().out
    assert "val_unseen_pair" in out and "lr_acc" in out
    assert ev.main([str(tmp_path / "run"), "--json", *flag]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["step"] == 2
    for k, v in got.items():   # the same numbers as the trainer's summary (NaN -> null)
        want = summary[k]
        assert (v is None and math.isnan(want)) or v == pytest.approx(want, rel=1e-12), k


def test_main_refuses_an_unknown_step(capsys, ev_small_run):
    assert ev.main([str(ev_small_run), "--step", "numba"]) == 2
    err = capsys.readouterr().err
    assert "--step" in err and "'fast'" in err and "'reference'" in err


@pytest.fixture
def ev_small_run(tmp_path):
    from minispatial.train import train

    cfg = make_config({"steps": 2, "n_labels": 8, "n_heldout": 3, "n_pair": 5, "image_len": 6,
                       "n_single_layout": 3, "n_layout": 5}, preset="tiny")
    train(cfg, tmp_path / "run", step="reference", verbose=False)      # (any step: the file is tested)
    return tmp_path / "run" / "checkpoint.npz"


@pytest.mark.parametrize("tensor, value", [("param/vision.W_pos", np.nan), ("param/logit_scale", np.inf),
                                           ("adam_v/text.W_E", np.nan)])
def test_main_refuses_a_non_finite_checkpoint(tmp_path, capsys, ev_small_run, tensor, value):
    # a NaN model scored lr_acc 0.500 with exit 0 (every cosine NaN: every comparison a tie)
    with np.load(ev_small_run) as z:
        bad = z[tensor].copy()
    bad.reshape(-1)[0] = value
    path = tamper(ev_small_run, tmp_path / "nan.npz", **{tensor: bad})
    assert ev.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("minispatial eval: error:") and tensor in err and str(path) in err
    assert "nan" in err or "inf" in err


def test_main_random_bytes_get_our_message(tmp_path, capsys):
    # NumPy's own advice ("load it unsafely using allow_pickle") is not for our users
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    assert ev.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a minispatial checkpoint" in err and str(path) in err
    assert "pickle" not in err


# ------------------------------------------------------------------------------- label groups, lr_acc_recognised

def scene_oracle(n, remap):
    """Perfect text tower; the image tower sees remap(a, b) -> (a', b') instead of the scene."""
    return encoders(lambda im: onehot_scene(*remap(*image_scene(im)), n),
                    lambda tk: onehot_scene(*text_scene(tk), n))


GROUPS = ("i2t_acc_pair_labels", "i2t_acc_single_labels", "i2t_acc_heldout_labels")


def test_i2t_by_label_group_on_oracles():
    tb = small_testbed(n_pair=3)                 # pair labels 1..3, alone only 4..5, held out 6..8
    n = tb.config.n_labels
    m = ev.evaluate_all(PARAMS, tb, None, encoders=perfect_oracle(n))
    for s in ("train", "val_single"):
        assert [m[f"{s}.{k}"] for k in GROUPS] == [1.0, 1.0, 1.0]
    for s in ("val_seen_pair", "val_unseen_pair"):           # no one-object images: NaN
        assert all(math.isnan(m[f"{s}.{k}"]) for k in GROUPS)
    # single held-out images seen as label 1 and label-4 ones as label 5: those groups fail
    def remap(a, b):
        lone = b == 0
        a = np.where(lone & (a >= 6), 1, np.where(lone & (a == 4), 5, a))
        return a, b
    m = ev.evaluate_all(PARAMS, tb, None, encoders=scene_oracle(n, remap))
    for s in ("train", "val_single"):
        assert m[f"{s}.i2t_acc_pair_labels"] == 1.0
        assert m[f"{s}.i2t_acc_single_labels"] == 0.5       # label 5 right, label 4 wrong, equal counts
        assert m[f"{s}.i2t_acc_heldout_labels"] == 0.0
    vs = tb.splits["val_single"]
    assert m["val_single.i2t_acc"] == pytest.approx(np.mean(~np.isin(vs.labels[:, 0], [4, 6, 7, 8])))
    # no label only ever alone (n_pair = n_labels - n_heldout): that group is NaN
    m = ev.evaluate_all(PARAMS, small_testbed(), None, encoders=perfect_oracle(n))
    assert math.isnan(m["val_single.i2t_acc_single_labels"]) and m["val_single.i2t_acc_heldout_labels"] == 1.0


def test_lr_acc_recognised_on_oracles():
    tb = small_testbed()
    n = tb.config.n_labels
    pair_splits = ("train", "val_seen_pair", "val_unseen_pair")
    m = ev.evaluate_all(PARAMS, tb, None, encoders=perfect_oracle(n))
    assert all(m[f"{s}.lr_acc_recognised"] == 1.0 for s in pair_splits)
    assert math.isnan(m["val_single.lr_acc_recognised"])      # no two-object images
    # order-blind: every label set recognised, every order a tie
    m = ev.evaluate_all(PARAMS, tb, None, encoders=order_blind_oracle(n))
    assert all(m[f"{s}.lr_acc_recognised"] == 0.5 for s in pair_splits)
    # images with a > b seen as another label set: not recognised, their order a tie (0.5)
    def swap_set(a, b):
        bad = (b > 0) & (a > b)
        return np.where(bad, a % n + 1, a), np.where(bad, b % n + 1, b)
    m = ev.evaluate_all(PARAMS, tb, None, encoders=scene_oracle(n, swap_set))
    for s in pair_splits:
        sp = tb.splits[s]
        a, b = sp.labels[sp.is_pair, 0], sp.labels[sp.is_pair, 1]
        good = np.mean(a < b)
        assert m[f"{s}.labelset_acc"] == pytest.approx(good)
        assert m[f"{s}.lr_acc"] == pytest.approx(good + 0.5 * (1 - good))
        assert m[f"{s}.lr_acc_recognised"] == 1.0
    # no image recognised: NaN
    m = ev.evaluate_all(PARAMS, tb, None,
                        encoders=scene_oracle(n, lambda a, b: (np.where(b > 0, a % n + 1, a), np.where(b > 0, b % n + 1, b))))
    for s in pair_splits:
        assert m[f"{s}.labelset_acc"] == 0.0 and m[f"{s}.lr_acc"] == 0.5
        assert math.isnan(m[f"{s}.lr_acc_recognised"])


def test_lr_acc_recognised_weights_ties_by_label_set_credit():
    # an image whose label-set top-1 ties between its set and another earns half a recognition
    tb = small_testbed()
    n = tb.config.n_labels
    P = n + 1

    def img(im):
        a, b = image_scene(im)
        f = onehot_scene(a, b, n)
        wrong = (b > 0) & (a > b)                 # tie own scene with another set, order lost
        other_a, other_b = a % n + 1, b % n + 1
        rows = np.flatnonzero(wrong)
        f[rows] = 0.0
        f[rows, other_a[rows] * P + other_b[rows]] = 1.0
        f[rows, a[rows] * P + b[rows]] = 1.0
        f[rows, b[rows] * P + a[rows]] = 1.0
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    m = ev.evaluate_all(PARAMS, tb, None, encoders=encoders(img, lambda tk: onehot_scene(*text_scene(tk), n)))
    sp = tb.splits["val_unseen_pair"]
    good = np.mean(sp.labels[sp.is_pair, 0] < sp.labels[sp.is_pair, 1])
    # a < b: credit 1, lr 1; a > b: labelset credit 2/3 (a-b, b-a, other tie), lr tie 0.5
    assert m["val_unseen_pair.labelset_acc"] == pytest.approx(good + (1 - good) * 2 / 3)
    want = (good * 1.0 + (1 - good) * (2 / 3) * 0.5) / (good + (1 - good) * 2 / 3)
    assert m["val_unseen_pair.lr_acc_recognised"] == pytest.approx(want)
