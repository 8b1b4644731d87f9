"""The 1D image-text testbed of docs/paper.md §2: scenes, captions, the four splits and the batch sampler.

An image is a row of `image_len` pixels: 0 is background, an object is one pixel whose value is its
label (1..n_labels). A scene holds one object ("3 is in the image") or two objects at pixels i < j
("3 is on the left of 7", or in left+right mode also "7 is on the right of 3").

Layouts (position pairs i < j) are numbered 0..C(image_len,2)-1 in `np.triu_indices` order.

How the random draws are laid out (so that sweeps are nested, see `make_testbed`):
  1. one random permutation of the image_len positions per label (all n_labels labels);
  2. one random permutation of the C(image_len,2) layouts per ordered label pair (all n_labels^2),
     the argsort of C uniform draws, pair (a, b) taking the ((a-1) n_labels + (b-1))-th block of
     C draws of the stream. Only the permutations of the pairs a split uses are computed, and of
     each only the prefix and tail it uses (`layouts.layout_draws`); the others are skipped over in the
     stream, so memory does not grow with n_labels^2 x C(image_len, 2).
Both depend only on (seed, n_labels, image_len). Training takes a prefix of each permutation and
evaluation takes the tail, so for one seed changing n_pair, n_layout or n_single_layout grows or
shrinks the training set without redrawing it, the layouts of every evaluated pair stay the same
(while n_layout <= C(image_len,2) - n_eval_layout), and in unseen_mode "both" val_unseen_pair does
not change at all.

Shape letters: N examples, L image_len, T text length (TEXT_LEN), B batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import comb

import numpy as np

from minispatial import layouts
from minispatial.layouts import layout_draws, layout_positions
from minispatial.memory import check_memory
from minispatial.text import (
    TEXT_LEN,
    Tokenizer,
    left_caption,
    right_caption,
    single_caption,
)

SPLIT_NAMES = ("train", "val_single", "val_seen_pair", "val_unseen_pair")
FORM_SINGLE, FORM_LEFT, FORM_RIGHT = 0, 1, 2
CAPTION_MODES = ("left", "left+right")
UNSEEN_MODES = ("both", "one")

# help text of every TestbedConfig field, used by the `minispatial data` options
FIELD_HELP = {
    "image_len": "pixels per image (>= 2)",
    "n_labels": "number of object labels 1..n_labels (>= 2)",
    "n_heldout": "the last n_heldout labels never appear in a two-object training scene",
    "n_pair": "label diversity: two-object training scenes use all ordered pairs of labels 1..n_pair",
    "n_layout": "layout diversity (paper's n_2): position pairs per trained label pair, <= C(image_len,2)",
    "n_single_layout": "positions per label in single-object training scenes; the rest go to val_single",
    "n_eval_layout": "layouts per label pair in val_seen_pair / val_unseen_pair (capped by what is left)",
    "caption_mode": "'left' (left form only) or 'left+right' (each training scene in both forms)",
    "unseen_mode": "val_unseen_pair pairs: 'both' labels held out, or exactly 'one' held out",
    "seed": "seed of the layout draws (>= 0)",
}


# ----------------------------------------------------------------------------- config


def n_layouts(image_len: int) -> int:
    """Number of two-object layouts (position pairs i < j): C(image_len, 2)."""
    return comb(image_len, 2)


def _is_int(v: object) -> bool:
    """True for Python and NumPy integers, False for bools (True is not a count)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that defines the testbed; the paper's values are the defaults (docs/paper.md §2).

    Pair labels are labels 1..n_pair (not a random subset), so a sweep over n_pair is nested:
    the scenes of n_pair = 5 are a subset of those of n_pair = 10 for the same seed.
    The held-out labels are the last n_heldout ones (16..20 by default).

    n_single_layout (our choice, the paper is silent): the default 5 of 10 positions trains half the
    positions of every label and keeps the other half for the single-object evaluation;
    n_single_layout == image_len trains every (label, position) and leaves val_single empty.
    """

    __test__ = False  # not a pytest test class despite the name

    image_len: int = 10
    n_labels: int = 20
    n_heldout: int = 5
    n_pair: int = 15
    n_layout: int = 20
    n_single_layout: int = 5
    n_eval_layout: int = 10
    caption_mode: str = "left"
    unseen_mode: str = "both"
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, int):
                if not _is_int(value):
                    raise ValueError(
                        f"TestbedConfig.{f.name}={value!r} is not an int: must be an int ({FIELD_HELP[f.name]})"
                    )
                object.__setattr__(self, f.name, int(value))
            elif not isinstance(value, str):
                raise ValueError(f"TestbedConfig.{f.name}={value!r} is not a str: {FIELD_HELP[f.name]}")
        self._check_ranges()

    def _bad(self, name: str, allowed: str) -> ValueError:
        return ValueError(f"TestbedConfig.{name}={getattr(self, name)!r} is out of range: must be {allowed}")

    def _check_range(self, name: str, lo: int, hi: int | None = None, why: str = "") -> None:
        v = getattr(self, name)
        if v < lo or (hi is not None and v > hi):
            allowed = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
            raise self._bad(name, allowed + (f" ({why})" if why else ""))

    def _check_ranges(self) -> None:
        self._check_range("image_len", 2)
        self._check_range("n_labels", 2)
        self._check_range("n_heldout", 0, self.n_labels - 2, "n_labels - 2, so that a pair of trainable labels exists")
        self._check_range("n_pair", 2, self.n_labels - self.n_heldout, "n_labels - n_heldout")
        self._check_range("n_layout", 1, n_layouts(self.image_len), "C(image_len, 2)")
        self._check_range("n_single_layout", 1, self.image_len, "image_len")
        self._check_range("n_eval_layout", 1)
        for name, allowed in (("caption_mode", CAPTION_MODES), ("unseen_mode", UNSEEN_MODES)):
            if getattr(self, name) not in allowed:
                value = getattr(self, name)
                raise ValueError(f"TestbedConfig.{name}={value!r} is not allowed: must be one of {allowed}")
        need = 2 if self.unseen_mode == "both" else 1
        if self.n_heldout < need:
            raise ValueError(
                f"TestbedConfig.n_heldout={self.n_heldout!r} is too small for unseen_mode={self.unseen_mode!r}: "
                f"must be >= {need} (unseen pairs need {need} held-out label{'s' if need > 1 else ''})"
            )
        self._check_range("seed", 0)
        self._check_memory()

    def _check_memory(self) -> None:
        """Refuse a testbed that cannot fit in memory (memory.memory_limit_bytes), naming the size
        fields above their defaults (all of them when none is), before anything is built."""
        grown = [f.name for f in dataclasses.fields(self)
                 if f.name in MEMORY_FIELDS and getattr(self, f.name) > f.default] or list(MEMORY_FIELDS)
        n = sum(split_sizes(self).values())
        check_memory("TestbedConfig." + ", ".join(f"{k}={getattr(self, k)!r}" for k in grown),
                     estimate_testbed_bytes(self),
                     f"the testbed ({n:,} examples of {self.image_len} pixels)")

    @property
    def pair_labels(self) -> tuple[int, ...]:
        """Labels used in two-object training scenes: 1..n_pair."""
        return tuple(range(1, self.n_pair + 1))

    @property
    def heldout_labels(self) -> tuple[int, ...]:
        """Labels never seen in a two-object training scene: the last n_heldout."""
        return tuple(range(self.n_labels - self.n_heldout + 1, self.n_labels + 1))


# ----------------------------------------------------------------------------- memory

# the fields the testbed's memory grows with (named when it is too large)
MEMORY_FIELDS = ("image_len", "n_labels", "n_heldout", "n_pair", "n_layout", "n_eval_layout")
# bytes per example besides its image (8 image_len): the int64 rows of labels, positions,
# tokens, eot, scene key and sampler order, the form, the caption string and its tuple slot
EXAMPLE_BYTES = 8 * (2 + 2 + TEXT_LEN + 1 + 1 + 1) + 1 + 90
# while a split is built, per example: its arrays twice (built, then the Split's frozen copies),
# the caption list and the unicode array of `_encode` (~4 bytes a character), np.unique's sort
BUILD_BYTES = 2 * EXAMPLE_BYTES + 400


def split_sizes(cfg: TestbedConfig) -> dict[str, int]:
    """Number of examples of each split (as make_testbed builds them), from the config alone."""
    C = n_layouts(cfg.image_len)
    n_pairs = cfg.n_pair * (cfg.n_pair - 1)
    h = cfg.n_heldout
    n_unseen = h * (h - 1) if cfg.unseen_mode == "both" else 2 * h * cfg.n_pair
    forms = 2 if cfg.caption_mode == "left+right" else 1
    return {"train": cfg.n_labels * cfg.n_single_layout + n_pairs * cfg.n_layout * forms,
            "val_single": cfg.n_labels * (cfg.image_len - cfg.n_single_layout),
            "val_seen_pair": n_pairs * max(0, min(cfg.n_eval_layout, C - cfg.n_layout)),
            "val_unseen_pair": n_unseen * min(cfg.n_eval_layout, C)}


def n_train_scenes(cfg: TestbedConfig) -> int:
    """Distinct scenes of the train split: the largest batch `sample_batch` can draw from it."""
    return cfg.n_labels + cfg.n_pair * (cfg.n_pair - 1)


def estimate_testbed_bytes(cfg: TestbedConfig) -> int:
    """Peak memory of make_testbed(cfg) and of keeping its splits, estimated from the config.

    The splits: per example its image (8 image_len bytes) and EXAMPLE_BYTES; while the largest
    split is built, BUILD_BYTES more per example; the layout draws of the used pairs (a block
    of BLOCK_ELEMS draws and their argsort, or one pair's C draws and their argpartition);
    the position permutations. Checked against tracemalloc's peak in tests/test_faults_inputs.py."""
    L, C = cfg.image_len, n_layouts(cfg.image_len)
    sizes = split_sizes(cfg)
    n = sum(sizes.values())
    splits = n * (8 * L + EXAMPLE_BYTES)
    build = max(sizes.values()) * (8 * L + BUILD_BYTES)
    n_pairs = cfg.n_pair * (cfg.n_pair - 1) + sizes["val_unseen_pair"] // max(1, min(cfg.n_eval_layout, C))
    kept_draws = 8 * n_pairs * (cfg.n_layout + min(cfg.n_eval_layout, C))
    row_draws = (16 * min(layouts.BLOCK_ELEMS, cfg.n_labels ** 2 * C) if C < layouts.ROW_WISE_MIN
                 else 33 * C)
    positions = 16 * cfg.n_labels * L
    return int(splits + build + 2 * kept_draws + row_draws + positions + (2 << 20))


# ----------------------------------------------------------------------------- split


def scene_keys(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """[N, 2] (left, right or 0) -> [N] key = left * (n_labels + 1) + right: one per meaning."""
    return labels[:, 0] * (n_labels + 1) + labels[:, 1]


def make_captions(labels: np.ndarray, form: np.ndarray) -> list[str]:
    """[N, 2] labels, [N] form -> N captions (single, left form or right form)."""
    templates = {FORM_SINGLE: lambda a, b: single_caption(a), FORM_LEFT: left_caption, FORM_RIGHT: right_caption}
    return [templates[f](a, b) for (a, b), f in zip(labels.tolist(), form.tolist())]


def render_images(labels: np.ndarray, positions: np.ndarray, image_len: int) -> np.ndarray:
    """[N, 2] labels, [N, 2] positions (-1 = none) -> images int64 [N, L]."""
    images = np.zeros((len(labels), image_len), dtype=np.int64)
    rows = np.arange(len(labels))
    for k in range(2):
        has = positions[:, k] >= 0
        images[rows[has], positions[has, k]] = labels[has, k]
    return images


def _encode(tokenizer: Tokenizer, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """N captions -> tokens [N, T], eot [N]; each distinct caption is tokenized once."""
    uniq, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    tokens, eot = tokenizer.encode_batch(list(uniq), TEXT_LEN)
    return tokens[inverse.reshape(-1)], eot[inverse.reshape(-1)]


@dataclass(frozen=True, eq=False)
class Split:
    """N examples (image, caption) of one split; arrays are read-only.

    images int64 [N, L]: 0 background, the label value at object pixels.
    labels int64 [N, 2]: (left label, right label), right = 0 for a single object.
    positions int64 [N, 2]: pixel indices, -1 where there is no second object.
    captions: N strings (a tuple); tokens int64 [N, T]; eot int64 [N] index of EOT.
    scene_key int64 [N]: the meaning; examples with equal keys have interchangeable captions.
    form int8 [N]: 0 single, 1 left form, 2 right form.
    """

    tokenizer: Tokenizer
    images: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    captions: tuple[str, ...]
    tokens: np.ndarray
    eot: np.ndarray
    scene_key: np.ndarray
    form: np.ndarray
    # grouping of example indices by scene_key, for the vectorised sampler
    key_order: np.ndarray = field(init=False, repr=False)
    key_start: np.ndarray = field(init=False, repr=False)
    key_count: np.ndarray = field(init=False, repr=False)

    @classmethod
    def build(
        cls, labels: np.ndarray, positions: np.ndarray, form: np.ndarray, image_len: int, tokenizer: Tokenizer
    ) -> Split:
        """[N, 2] labels, [N, 2] positions, [N] form -> Split with images, captions and tokens."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1, 2)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
        form = np.asarray(form, dtype=np.int8).reshape(-1)
        captions = make_captions(labels, form)
        tokens, eot = _encode(tokenizer, captions)
        images = render_images(labels, positions, image_len)
        return cls(tokenizer, images, labels, positions, tuple(captions), tokens, eot,
                   scene_keys(labels, tokenizer.n_labels), form)

    def __post_init__(self) -> None:
        n = len(self.captions)
        object.__setattr__(self, "captions", tuple(self.captions))
        for name in ("images", "labels", "positions", "tokens", "eot", "scene_key", "form"):
            arr = np.array(getattr(self, name))  # a private copy, then frozen
            if len(arr) != n:
                raise ValueError(f"Split.{name} has {len(arr)} rows but there are {n} captions")
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        order = np.argsort(self.scene_key, kind="stable")
        _, start, count = np.unique(self.scene_key[order], return_index=True, return_counts=True)
        for name, arr in (("key_order", order), ("key_start", start), ("key_count", count)):
            arr = arr.astype(np.int64)
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image_len(self) -> int:
        return self.images.shape[1]

    @property
    def n_captions(self) -> int:
        """Number of distinct captions."""
        return len(set(self.captions))

    @property
    def n_scenes(self) -> int:
        """Number of distinct scene keys (= n_captions in left mode)."""
        return len(self.key_start)

    @property
    def is_pair(self) -> np.ndarray:
        """[N] bool: True for two-object examples."""
        return self.positions[:, 1] >= 0

    def with_form(self, pair_form: int) -> Split:
        """Same examples, every two-object caption in `pair_form` (FORM_LEFT or FORM_RIGHT)."""
        form = np.where(self.is_pair, np.int8(pair_form), np.int8(FORM_SINGLE)).astype(np.int8)
        return Split.build(self.labels, self.positions, form, self.image_len, self.tokenizer)

    def right_form(self) -> Split:
        """Same images; two-object examples carry "{b} is on the right of {a}" (a left of b)."""
        return self.with_form(FORM_RIGHT)

    def left_form(self) -> Split:
        """Same images; two-object examples carry "{a} is on the left of {b}" (a left of b)."""
        return self.with_form(FORM_LEFT)

    def swapped_left_captions(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """-> N captions, tokens [N, T], eot [N]: "{b} is on the left of {a}" for a left of b.

        The false caption of the left-right discrimination test. Single objects keep their caption.
        """
        swapped = np.where(self.is_pair[:, None], self.labels[:, ::-1], self.labels)
        form = np.where(self.is_pair, np.int8(FORM_LEFT), np.int8(FORM_SINGLE)).astype(np.int8)
        captions = make_captions(swapped, form)
        tokens, eot = _encode(self.tokenizer, captions)
        return captions, tokens, eot


# ----------------------------------------------------------------------------- testbed


@dataclass(frozen=True, eq=False)
class Testbed:
    """A config, its tokenizer and the four splits (keys of SPLIT_NAMES)."""

    __test__ = False  # not a pytest test class despite the name

    config: TestbedConfig
    tokenizer: Tokenizer
    splits: dict[str, Split]

    @property
    def heldout_labels(self) -> tuple[int, ...]:
        return self.config.heldout_labels

    @property
    def pair_labels(self) -> tuple[int, ...]:
        return self.config.pair_labels

    @property
    def n_vision_vocab(self) -> int:
        """Pixel values: background 0 and the labels 1..n_labels."""
        return self.config.n_labels + 1

    @property
    def text_len(self) -> int:
        return TEXT_LEN


def _ordered_pairs(first: Sequence[int], second: Sequence[int]) -> np.ndarray:
    """-> [P, 2] all (a, b), a in first, b in second, a != b, in lexicographic order."""
    pairs = [(a, b) for a in first for b in second if a != b]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _single_examples(perm: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """perm [n_labels, L] positions per label, slice [lo:hi] -> labels [N, 2], positions [N, 2]."""
    pos = perm[:, lo:hi]
    n_labels, k = pos.shape
    labels = np.stack([np.repeat(np.arange(1, n_labels + 1), k), np.zeros(n_labels * k, np.int64)], 1)
    positions = np.stack([pos.reshape(-1), np.full(n_labels * k, -1)], 1)
    return labels, positions


def _pair_examples(pairs: np.ndarray, layouts: np.ndarray, image_len: int) -> tuple[np.ndarray, np.ndarray]:
    """pairs [P, 2], layouts [P, k] (layout numbers of each pair) -> labels [N, 2], positions [N, 2]."""
    layouts = np.asarray(layouts, dtype=np.int64).reshape(len(pairs), -1)
    k = layouts.shape[1]
    i, j = layout_positions(layouts.reshape(-1), image_len)
    labels = np.repeat(pairs, k, axis=0)
    positions = np.stack([i, j], 1).astype(np.int64)
    return labels.reshape(-1, 2), positions.reshape(-1, 2)


def _unseen_pairs(cfg: TestbedConfig) -> np.ndarray:
    """-> [P, 2] ordered label pairs of val_unseen_pair."""
    held = cfg.heldout_labels
    if cfg.unseen_mode == "both":
        return _ordered_pairs(held, held)
    return np.concatenate([_ordered_pairs(held, cfg.pair_labels), _ordered_pairs(cfg.pair_labels, held)])


def make_testbed(cfg: TestbedConfig) -> Testbed:
    """Build the four splits; deterministic given cfg.

    train: every label at n_single_layout random positions (alone); every ordered pair of the pair
      labels 1..n_pair at n_layout random layouts (twice, left and right form, in left+right mode).
    val_single: every label at each position not trained for it.
    val_seen_pair: every trained pair at up to n_eval_layout untrained layouts.
    val_unseen_pair: the unseen pairs (see unseen_mode) at n_eval_layout layouts (capped at C(L,2)).
    Evaluation splits carry the left form only (use `Split.right_form()` for the other).

    Random draws (rng = default_rng(seed)): a position permutation per label, then a layout
    permutation per ordered label pair, for all labels whatever n_pair (only the used pairs'
    used entries are computed, see `layouts.layout_draws`). Training takes the first
    n_single_layout / n_layout entries, evaluation the last ones, so sweeps over n_pair, n_layout and
    n_single_layout are nested for one seed, and the evaluation layouts of a pair stay the same while
    n_layout <= C(L,2) - n_eval_layout.
    """
    L, n_lab, C = cfg.image_len, cfg.n_labels, n_layouts(cfg.image_len)
    rng = np.random.default_rng(cfg.seed)
    pos_perm = np.argsort(rng.random((n_lab, L)), axis=1)  # [n_labels, L]; row k-1 is label k
    tok = Tokenizer(n_lab)

    single_train = _single_examples(pos_perm, 0, cfg.n_single_layout)
    pairs = _ordered_pairs(cfg.pair_labels, cfg.pair_labels)
    unseen = _unseen_pairs(cfg)
    n_seen_eval = min(cfg.n_eval_layout, C - cfg.n_layout)
    n_unseen_eval = min(cfg.n_eval_layout, C)
    # of each used pair's layout permutation: the first n_layout (train), the last ones (evaluation)
    pair_rows, unseen_rows = ((p[:, 0] - 1) * n_lab + (p[:, 1] - 1) for p in (pairs, unseen))
    rows = np.unique(np.concatenate([pair_rows, unseen_rows]))
    k_tail = max(n_seen_eval, n_unseen_eval)
    heads, tails = layout_draws(rng, n_lab, C, rows, cfg.n_layout, k_tail)
    ip, iu = np.searchsorted(rows, pair_rows), np.searchsorted(rows, unseen_rows)
    pair_train = _pair_examples(pairs, heads[ip], L)
    seen_eval = _pair_examples(pairs, tails[ip, k_tail - n_seen_eval:], L)
    unseen_eval = _pair_examples(unseen, tails[iu, k_tail - n_unseen_eval:], L)
    del heads, tails

    forms = [FORM_LEFT] if cfg.caption_mode == "left" else [FORM_LEFT, FORM_RIGHT]
    parts = [(*single_train, FORM_SINGLE)] + [(*pair_train, f) for f in forms]
    train = _concat(parts, L, tok)
    splits = {
        "train": train,
        "val_single": _concat([(*_single_examples(pos_perm, cfg.n_single_layout, L), FORM_SINGLE)], L, tok),
        "val_seen_pair": _concat([(*seen_eval, FORM_LEFT)], L, tok),
        "val_unseen_pair": _concat([(*unseen_eval, FORM_LEFT)], L, tok),
    }
    return Testbed(cfg, tok, splits)


def _concat(parts: list[tuple[np.ndarray, np.ndarray, int]], image_len: int, tok: Tokenizer) -> Split:
    """[(labels [n, 2], positions [n, 2], form)] -> one Split of all the parts in order."""
    labels = np.concatenate([p[0] for p in parts]).reshape(-1, 2)
    positions = np.concatenate([p[1] for p in parts]).reshape(-1, 2)
    form = np.concatenate([np.full(len(p[0]), p[2], np.int8) for p in parts])
    return Split.build(labels, positions, form, image_len, tok)


# ----------------------------------------------------------------------------- sampling


SAMPLERS = ("distinct", "uniform")


def sampler_cap(split: Split, sampler: str = "distinct") -> int:
    """The largest batch `sample_batch` draws from `split`: its distinct scenes or (uniform) examples."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is invalid: must be one of {SAMPLERS}")
    return split.n_scenes if sampler == "distinct" else len(split)


def sample_batch(split: Split, batch_size: int, rng: np.random.Generator, sampler: str = "distinct") -> np.ndarray:
    """-> int64 [B] indices into `split`, B = min(batch_size, sampler_cap(split, sampler)).
    "uniform" (plain CLIP): distinct examples uniformly without replacement from the whole split,
    so a caption can repeat in a batch (a false negative). "distinct" (default): one per scene.
    Why distinct scenes: CLIP's loss treats every other caption in the batch as a negative. Here
    many images share one caption (same label pair, different layout), so a caption repeated in a
    batch would make a true image-caption match count as a negative (a false negative). The sampler
    draws distinct scene keys without replacement, then for each a uniformly random example with
    that key: a random image (layout), and in left+right mode a random caption form, so neither a
    caption nor two captions of the same scene ever share a batch.

    Capping: the effective batch size is min(batch_size, number of distinct scenes), i.e. of
    distinct captions in left mode (230 for the default config's train split).
    Deterministic given the generator's state.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"sample_batch: batch_size={batch_size!r} is invalid: must be an int >= 1")
    n = min(int(batch_size), sampler_cap(split, sampler))
    if sampler == "uniform":
        return rng.choice(len(split), size=n, replace=False).astype(np.int64)
    keys = rng.choice(split.n_scenes, size=n, replace=False)  # [B] group ids
    offsets = rng.integers(0, split.key_count[keys])  # [B] which example of each scene
    return split.key_order[split.key_start[keys] + offsets].astype(np.int64)


# ----------------------------------------------------------------------------- printing / CLI


def render_example(split: Split, i: int) -> str:
    """One example as text, e.g. `. . 3 . . . 7 . . .  "3 is on the left of 7"`."""
    pixels = " ".join("." if v == 0 else str(v) for v in split.images[i].tolist())
    return f'{pixels}  "{split.captions[i]}"'


def _spread(n: int, k: int) -> list[int]:
    """Up to k indices spread evenly over range(n)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))}) if n and k else []


def summary(tb: Testbed, show: int = 3) -> str:
    """The config, the size of each split and `show` rendered examples per split, as text."""
    cfg = tb.config
    lines = ["TestbedConfig(" + ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)) + ")",
             f"pair labels 1..{cfg.n_pair}; held-out labels {list(tb.heldout_labels)}; "
             f"text vocab {tb.tokenizer.vocab_size}; vision vocab {tb.n_vision_vocab}; text_len {tb.text_len}"]
    for name in SPLIT_NAMES:
        s = tb.splits[name]
        lines.append(f"{name}: {len(s)} examples, {s.n_captions} distinct captions, {s.n_scenes} distinct scenes"
                     f" ({int(s.is_pair.sum())} two-object)")
        for i in _spread(len(s), show):
            lines.append("    " + render_example(s, i))
    lines.append(f"largest batch of distinct scenes from train: {tb.splits['train'].n_scenes}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """argparse parser of `minispatial data`: one option per TestbedConfig field."""
    p = argparse.ArgumentParser(prog="minispatial data", description="Build the 1D testbed and print a summary.")
    for f in dataclasses.fields(TestbedConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kind = type(f.default)
        p.add_argument(*names, dest=f.name, type=kind, default=f.default, metavar=kind.__name__.upper(),
                       help=f"{FIELD_HELP[f.name]} (default: {f.default!r})")
    p.add_argument("--summary", action="store_true", help="print the summary (the default and only action)")
    p.add_argument("--show", type=int, default=3, metavar="N", help="rendered examples per split (default: 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`minispatial data [--field value ...] [--summary] [--show N]` -> exit code (2 on a bad config)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its message (or the help)
        return e.code if isinstance(e.code, int) else 2
    if args.show < 0:
        print(f"minispatial data: error: --show={args.show} is invalid: must be an int >= 0", file=sys.stderr)
        return 2
    try:
        cfg = TestbedConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TestbedConfig)})
    except ValueError as e:
        print(f"minispatial data: error: {e}", file=sys.stderr)
        return 2
    print(summary(make_testbed(cfg), args.show))
    return 0


if __name__ == "__main__":
    sys.exit(main())
