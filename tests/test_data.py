"""The testbed: every split is checked against its definition in docs/paper.md §2, over many configs.

The checks decode images and parse captions here, independently of data.py's own helpers.
"""

import dataclasses
import re
from collections import Counter
from itertools import combinations
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minispatial.data import (
    SPLIT_NAMES,
    Split,
    TestbedConfig,
    main,
    make_testbed,
    render_example,
    sample_batch,
)
from minispatial.text import TEXT_LEN, Tokenizer

FAST = settings(max_examples=30, deadline=None)
CAPTION_RE = re.compile(r"(\d+) is in the image|(\d+) is on the left of (\d+)|(\d+) is on the right of (\d+)")


@st.composite
def configs(draw, max_labels=20, max_len=12):
    """A valid TestbedConfig; fields are drawn in dependency order so every constraint holds."""
    unseen_mode = draw(st.sampled_from(["both", "one"]))
    min_held = 2 if unseen_mode == "both" else 1
    image_len = draw(st.integers(2, max_len))
    n_labels = draw(st.integers(min_held + 2, max_labels))
    n_heldout = draw(st.integers(min_held, n_labels - 2))
    n_pair = draw(st.integers(2, min(n_labels - n_heldout, 8)))  # <= 8 keeps the train split small
    C = comb(image_len, 2)
    return TestbedConfig(
        image_len=image_len, n_labels=n_labels, n_heldout=n_heldout, n_pair=n_pair,
        n_layout=draw(st.integers(1, C)), n_single_layout=draw(st.integers(1, image_len)),
        n_eval_layout=draw(st.integers(1, C + 3)), caption_mode=draw(st.sampled_from(["left", "left+right"])),
        unseen_mode=unseen_mode, seed=draw(st.integers(0, 2**32)),
    )


def objects(image):
    """[L] image -> [(position, label)] of its nonzero pixels, left to right."""
    return [(int(p), int(image[p])) for p in np.flatnonzero(image)]


def parse(caption):
    """caption -> (form, left label, right label or 0), read from the words."""
    m = CAPTION_RE.fullmatch(caption)
    assert m, caption
    if m.group(1):
        return 0, int(m.group(1)), 0
    if m.group(2):
        return 1, int(m.group(2)), int(m.group(3))
    return 2, int(m.group(5)), int(m.group(4))  # "{b} is on the right of {a}": a is left


def pair_layouts(split):
    """-> {(a, b): [(i, j), ...]} of the two-object examples (with repeats)."""
    out = {}
    for (a, b), (i, j) in zip(split.labels[split.is_pair].tolist(), split.positions[split.is_pair].tolist()):
        out.setdefault((a, b), []).append((i, j))
    return out


def check_split_consistent(split, image_len, tok):
    """Images, labels, positions, captions, tokens, keys and forms all describe the same scenes."""
    n = len(split)
    assert split.images.shape == (n, image_len) and split.tokens.shape == (n, TEXT_LEN)
    for arr in (split.images, split.labels, split.positions, split.tokens, split.eot, split.scene_key):
        assert arr.dtype == np.int64
    assert split.labels.shape == split.positions.shape == (n, 2) and split.form.dtype == np.int8
    assert tok.decode_batch(split.tokens) == list(split.captions)
    assert (split.tokens[np.arange(n), split.eot] == 1).all()
    for k in range(n):
        objs = objects(split.images[k])
        form, a, b = parse(split.captions[k])
        assert form == split.form[k]
        if form == 0:
            assert objs == [(split.positions[k, 0], a)]
            assert split.labels[k].tolist() == [a, 0] and split.positions[k, 1] == -1
        else:
            (i, la), (j, lb) = objs
            assert (la, lb) == (a, b) and a != b
            assert split.labels[k].tolist() == [a, b] and split.positions[k].tolist() == [i, j]


def check_keys_mean_scenes(splits):
    """Across all splits: equal scene keys <=> equal (form-free) meaning of the caption."""
    keys = [k for s in splits for k in s.scene_key.tolist()]
    meaning = [parse(c)[1:] for s in splits for c in s.captions]
    assert len(set(zip(keys, meaning))) == len(set(meaning)) == len(set(keys))


@FAST
@given(configs())
def test_testbed_matches_its_definition(cfg):
    tb = make_testbed(cfg)
    assert list(tb.splits) == list(SPLIT_NAMES)
    C, L = comb(cfg.image_len, 2), cfg.image_len
    pair_labels = set(range(1, cfg.n_pair + 1))
    held = set(range(cfg.n_labels - cfg.n_heldout + 1, cfg.n_labels + 1))
    assert set(tb.pair_labels) == pair_labels and set(tb.heldout_labels) == held
    assert tb.n_vision_vocab == cfg.n_labels + 1 and tb.text_len == TEXT_LEN
    for s in tb.splits.values():
        check_split_consistent(s, L, tb.tokenizer)
    check_keys_mean_scenes([*tb.splits.values(), tb.splits["train"].right_form()])

    train, vs, vp, vu = (tb.splits[k] for k in SPLIT_NAMES)
    # train singles: every label at n_single_layout distinct positions; val_single: the rest
    train_single = Counter(zip(train.labels[~train.is_pair, 0].tolist(), train.positions[~train.is_pair, 0].tolist()))
    assert set(train_single.values()) == {1} and len(train_single) == cfg.n_labels * cfg.n_single_layout
    assert Counter(a for a, _ in train_single) == {a: cfg.n_single_layout for a in range(1, cfg.n_labels + 1)}
    assert not vs.is_pair.any()
    val_single = list(zip(vs.labels[:, 0].tolist(), vs.positions[:, 0].tolist()))
    assert set(val_single) == {(a, p) for a in range(1, cfg.n_labels + 1) for p in range(L)} - set(train_single)
    assert len(val_single) == len(set(val_single)) == cfg.n_labels * (L - cfg.n_single_layout)

    # train pairs: all ordered pairs of 1..n_pair, n_layout distinct layouts each, no held-out label
    reps = 2 if cfg.caption_mode == "left+right" else 1
    trained = pair_layouts(train)
    assert set(trained) == {(a, b) for a in pair_labels for b in pair_labels if a != b}
    assert len(trained) == cfg.n_pair * (cfg.n_pair - 1)
    for layouts in trained.values():
        assert len(set(layouts)) == cfg.n_layout and Counter(layouts).most_common()[-1][1] == reps
        assert len(layouts) == reps * cfg.n_layout
    assert not held & set(train.labels[train.is_pair].ravel().tolist())
    forms = Counter(train.form[train.is_pair].tolist())
    per_form = len(trained) * cfg.n_layout
    assert forms == ({1: per_form} if reps == 1 else {1: per_form, 2: per_form})

    # val_seen_pair: trained pairs, untrained layouts, up to n_eval_layout each
    seen = pair_layouts(vp)
    assert vp.is_pair.all() and set(seen) <= set(trained)
    if C > cfg.n_layout:
        assert set(seen) == set(trained)
    for ab, layouts in seen.items():
        assert len(layouts) == len(set(layouts)) == min(cfg.n_eval_layout, C - cfg.n_layout)
        assert not set(layouts) & set(trained[ab])

    # val_unseen_pair: no trained label pair; both held out, or exactly one
    unseen = pair_layouts(vu)
    assert vu.is_pair.all() and not set(unseen) & set(trained)
    n_held = {ab: len(held & set(ab)) for ab in unseen}
    if cfg.unseen_mode == "both":
        assert set(unseen) == {(a, b) for a in held for b in held if a != b}
    else:
        assert set(unseen) == {(h, p) for h in held for p in pair_labels} | {(p, h) for h in held for p in pair_labels}
        assert set(n_held.values()) == {1}
    for layouts in unseen.values():
        assert len(layouts) == len(set(layouts)) == min(cfg.n_eval_layout, C)

    # evaluation splits carry the left form only; the four splits are disjoint as (image, caption)
    for s in (vs, vp, vu):
        assert set(s.form.tolist()) <= {0, 1}
    sets = [{(s.images[k].tobytes(), s.captions[k]) for k in range(len(s))} for s in tb.splits.values()]
    for x, y in combinations(sets, 2):
        assert not x & y


def test_default_sizes():
    tb = make_testbed(TestbedConfig())
    sizes = {k: (len(s), s.n_captions) for k, s in tb.splits.items()}
    assert sizes == {
        "train": (4300, 230), "val_single": (100, 20), "val_seen_pair": (2100, 210), "val_unseen_pair": (200, 20)
    }
    assert tb.heldout_labels == (16, 17, 18, 19, 20) and tb.pair_labels == tuple(range(1, 16))
    assert tb.tokenizer.vocab_size == 30 and tb.n_vision_vocab == 21


def test_left_right_and_one_mode_sizes():
    tb = make_testbed(TestbedConfig(caption_mode="left+right", unseen_mode="one"))
    train = tb.splits["train"]
    assert len(train) == 100 + 2 * 4200 and train.n_captions == 20 + 2 * 210 and train.n_scenes == 230
    assert len(tb.splits["val_unseen_pair"]) == 5 * 15 * 2 * 10


def test_full_layouts_give_valid_empty_splits():
    tb = make_testbed(TestbedConfig(n_layout=45, n_single_layout=10))
    for name in ("val_seen_pair", "val_single"):
        s = tb.splits[name]
        assert len(s) == 0 and s.n_captions == 0 and s.n_scenes == 0
        assert s.images.shape == (0, 10) and s.tokens.shape == (0, TEXT_LEN) and s.labels.shape == (0, 2)
        assert s.right_form().images.shape == (0, 10) and len(sample_batch(s, 8, np.random.default_rng(0))) == 0


def test_deterministic_and_seed_dependent():
    a, b = make_testbed(TestbedConfig()), make_testbed(TestbedConfig())
    c = make_testbed(TestbedConfig(seed=1))
    for name in SPLIT_NAMES:
        for f in ("images", "labels", "positions", "tokens", "eot", "scene_key", "form"):
            assert np.array_equal(getattr(a.splits[name], f), getattr(b.splits[name], f))
        assert a.splits[name].captions == b.splits[name].captions
    for name in SPLIT_NAMES:
        assert not np.array_equal(a.splits[name].positions, c.splits[name].positions)


def test_sweeps_are_nested():
    """Smaller n_pair / n_layout train on a subset of the bigger one's scenes; unseen eval is unchanged."""
    def scenes(cfg):
        tb = make_testbed(cfg)
        s = tb.splits["train"]
        return {(tuple(s.labels[k]), tuple(s.positions[k])) for k in range(len(s))}, tb
    small, tb_s = scenes(TestbedConfig(n_pair=5, n_layout=10))
    big, tb_b = scenes(TestbedConfig(n_pair=15, n_layout=20))
    assert small < big
    assert np.array_equal(tb_s.splits["val_unseen_pair"].images, tb_b.splits["val_unseen_pair"].images)


def test_arrays_are_read_only():
    cfg = TestbedConfig(n_labels=4, n_heldout=2, n_pair=2, image_len=4, n_layout=2, n_single_layout=2)
    s = make_testbed(cfg).splits["train"]
    with pytest.raises(ValueError):
        s.images[0, 0] = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.images = s.images.copy()


@FAST
@given(configs(max_labels=8, max_len=6), st.integers(1, 300), st.integers(0, 2**32))
def test_sampler(cfg, batch_size, seed):
    tb = make_testbed(cfg)
    for s in tb.splits.values():
        idx = sample_batch(s, batch_size, np.random.default_rng(seed))
        assert idx.dtype == np.int64 and len(idx) == min(batch_size, s.n_scenes)
        assert len(set(s.scene_key[idx].tolist())) == len(idx)  # no scene twice ...
        assert len({s.captions[i] for i in idx}) == len(idx)  # ... so no caption twice
        assert np.array_equal(idx, sample_batch(s, batch_size, np.random.default_rng(seed)))
        if batch_size >= s.n_scenes:
            assert set(s.scene_key[idx].tolist()) == set(s.scene_key.tolist())


def test_sampler_draws_every_example_and_form():
    cfg = TestbedConfig(image_len=5, n_labels=5, n_heldout=2, n_pair=3, n_layout=4, caption_mode="left+right")
    s = make_testbed(cfg).splits["train"]
    rng = np.random.default_rng(0)
    batches = [sample_batch(s, 4, rng) for _ in range(400)]
    hits = np.bincount(np.concatenate(batches), minlength=len(s))
    assert (hits > 0).all()  # every image and both caption forms of each scene get drawn
    assert not np.array_equal(batches[0], batches[1])
    # uniform over scenes: each key is drawn with probability 4 / n_scenes per batch
    per_key = np.bincount(np.searchsorted(np.unique(s.scene_key), s.scene_key[np.concatenate(batches)]))
    assert len(per_key) == s.n_scenes and per_key.min() > 0.5 * per_key.mean()


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_sampler_rejects_bad_batch_size(bad):
    s = make_testbed(TestbedConfig()).splits["val_unseen_pair"]
    with pytest.raises(ValueError, match="batch_size"):
        sample_batch(s, bad, np.random.default_rng(0))


@FAST
@given(configs(max_labels=10, max_len=8))
def test_right_form_and_swapped_captions(cfg):
    tb = make_testbed(cfg)
    for s in tb.splits.values():
        r = s.right_form()
        assert np.array_equal(r.images, s.images) and np.array_equal(r.scene_key, s.scene_key)
        caps, tokens, eot = s.swapped_left_captions()
        assert tb.tokenizer.decode_batch(tokens) == caps and (tokens[np.arange(len(s)), eot] == 1).all()
        for k in range(len(s)):
            a, b = s.labels[k]
            if s.is_pair[k]:
                assert r.captions[k] == f"{b} is on the right of {a}" and r.form[k] == 2
                assert caps[k] == f"{b} is on the left of {a}"
            else:
                assert r.captions[k] == s.captions[k] == caps[k] == f"{a} is in the image"
        assert tb.tokenizer.decode_batch(r.tokens) == list(r.captions)
        left = [f"{a} is on the left of {b}" if p else f"{a} is in the image" for (a, b), p in zip(s.labels, s.is_pair)]
        assert r.left_form().captions == tuple(left)


def test_render_example():
    tok = Tokenizer(20)
    s = Split.build(np.array([[3, 7]]), np.array([[2, 6]]), np.array([1]), 10, tok)
    assert render_example(s, 0) == '. . 3 . . . 7 . . .  "3 is on the left of 7"'


# ----------------------------------------------------------------------------- config validation

BAD = [
    ("image_len", 1), ("image_len", True), ("image_len", 10.0), ("image_len", "10"),
    ("n_labels", 1), ("n_labels", None),
    ("n_heldout", -1), ("n_heldout", 19), ("n_heldout", 1), ("n_heldout", False),
    ("n_pair", 1), ("n_pair", 16), ("n_pair", 99),
    ("n_layout", 0), ("n_layout", 46),
    ("n_single_layout", 0), ("n_single_layout", 11),
    ("n_eval_layout", 0), ("n_eval_layout", 2.0),
    ("caption_mode", "right"), ("caption_mode", 1),
    ("unseen_mode", "none"), ("unseen_mode", None),
    ("seed", -1), ("seed", 1.5),
]


def test_every_field_has_a_bad_case():
    assert {f.name for f in dataclasses.fields(TestbedConfig)} == {name for name, _ in BAD}


@pytest.mark.parametrize("name,value", BAD)
def test_bad_config_rejected(name, value):
    with pytest.raises(ValueError) as e:
        TestbedConfig(**{name: value})
    assert f"TestbedConfig.{name}={value!r}" in str(e.value)


def test_error_message_format():
    with pytest.raises(ValueError) as e:
        TestbedConfig(n_pair=16)
    assert str(e.value) == "TestbedConfig.n_pair=16 is out of range: must be an int in [2, 15] (n_labels - n_heldout)"
    with pytest.raises(ValueError, match=r"unseen_mode='one'.*>= 1"):
        TestbedConfig(n_heldout=0, unseen_mode="one")


def test_coupled_limits_are_accepted():
    TestbedConfig(n_heldout=1, unseen_mode="one", n_pair=19)
    TestbedConfig(image_len=2, n_layout=1, n_single_layout=2, n_labels=4, n_heldout=2, n_pair=2)
    assert TestbedConfig(n_pair=np.int64(5)).n_pair == 5 and type(TestbedConfig(n_pair=np.int64(5)).n_pair) is int


@FAST
@given(configs(), st.sampled_from(["n_pair", "n_layout", "n_single_layout", "n_heldout"]), st.integers(1, 50))
def test_out_of_range_coupled_fields_rejected(cfg, name, excess):
    limit = {
        "n_pair": cfg.n_labels - cfg.n_heldout, "n_layout": comb(cfg.image_len, 2),
        "n_single_layout": cfg.image_len, "n_heldout": cfg.n_labels - 2,
    }[name]
    with pytest.raises(ValueError, match=rf"TestbedConfig\.{name}={limit + excess}\b"):
        dataclasses.replace(cfg, **{name: limit + excess})


# ----------------------------------------------------------------------------- CLI


def test_main_summary(capsys):
    assert main(["--summary"]) == 0
    out = capsys.readouterr().out
    for name in SPLIT_NAMES:
        assert name in out
    assert "4300 examples" in out and '"1 is in the image"' in out


def test_main_options(capsys):
    assert main(["--n-pair", "5", "--n_layout", "3", "--caption_mode", "left+right", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "n_pair=5" in out and "n_layout=3" in out and f"{20 * 5 + 20 * 3 * 2} examples" in out


def test_main_bad_config(capsys):
    assert main(["--n_pair", "99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minispatial data: error: ") and "n_pair=99" in err


@pytest.mark.parametrize("argv", [["--n_pair", "abc"], ["--bogus"], ["--show", "-1"]])
def test_main_argparse_errors(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_main_help_names_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TestbedConfig):
        assert f"--{f.name}" in out
    assert "(default: 15)" in out and "(default: 'left')" in out


# ----------------------------------------------------------------------------- sampler="uniform"


def test_uniform_sampler_draws_distinct_examples_with_repeated_captions():
    from minispatial.data import sampler_cap
    split = make_testbed(TestbedConfig()).splits["train"]
    N = len(split)
    assert sampler_cap(split, "uniform") == N and sampler_cap(split, "distinct") == split.n_scenes
    repeats = 0
    for seed in range(5):
        idx = sample_batch(split, 128, np.random.default_rng([0, seed]), sampler="uniform")
        assert idx.dtype == np.int64 and len(idx) == 128
        assert len(set(idx.tolist())) == 128 and idx.min() >= 0 and idx.max() < N
        repeats += 128 - len({split.captions[i] for i in idx})
    assert repeats > 0                   # 128 of 4300 examples over 230 captions: repeats (false negatives)
    for B in (N, N + 7):                 # capped at the split size: a permutation of it
        idx = sample_batch(split, B, np.random.default_rng(1), sampler="uniform")
        assert sorted(idx.tolist()) == list(range(N))


def test_default_sampler_is_distinct_and_unknown_is_refused():
    split = make_testbed(TestbedConfig()).splits["train"]
    a = sample_batch(split, 128, np.random.default_rng([0, 3]))
    b = sample_batch(split, 128, np.random.default_rng([0, 3]), sampler="distinct")
    np.testing.assert_array_equal(a, b)
    assert len(set(split.scene_key[a].tolist())) == 128
    with pytest.raises(ValueError, match=r"sampler='iid'.*distinct.*uniform"):
        sample_batch(split, 8, np.random.default_rng(0), sampler="iid")
