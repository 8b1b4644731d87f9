"""Evaluation: every metric of one trained dual encoder on the four splits of the testbed.

    minispatial eval CHECKPOINT [--json]

Legend: N images (examples) of a split, K candidate captions, E feature width, n = n_labels.
All scores are cosines cos(image, caption) = <img_feat, txt_feat> of the L2-normalised features,
computed in float64. A caption *describes* an image when both have the same scene (the same
labels in the same left-to-right order: `Split.scene_key`); in left mode that is exactly "it is
the image's own caption", in left+right mode both forms of a scene describe its images.

Ties. When several candidates share the top score (within TIE_TOL = 1e-9), an example earns the
fraction of the tied candidates that are correct, i.e. the expected accuracy of a random
tie-break. So a two-way comparison that ties scores 0.5: a model blind to order gets exactly the
chance level 0.5 in `lr_acc`, not 0.

Metrics of a split (keys "{split}.{metric}" in `evaluate_all`; NaN when undefined, e.g. on an
empty split or a split without two-object scenes):

  n                    number of examples of the split.
  i2t_acc              image -> text retrieval, over the split's N images: the top-scoring caption
                       among the split's distinct captions describes the image.
  t2i_acc              text -> image retrieval, over the split's distinct captions: the
                       top-scoring image among the split's N images is one the caption describes.
  lr_acc               left-right discrimination, over the two-object images (a left of b):
                       cos(image, "{a} is on the left of {b}") > cos(image, "{b} is on the left
                       of {a}"). Chance 0.5. The candidate captions need not be in the split.
  lr_acc_right         (only in left+right caption mode) the same with the right form:
                       cos(image, "{b} is on the right of {a}") > cos(image, "{a} is on the right
                       of {b}").
  labelset_acc         label-set recognition, over the two-object images: the top-scoring caption
                       among ALL n(n-1) left-form captions "{x} is on the left of {y}" (x != y)
                       names the image's two labels, in either order. Chance 2/(n(n-1)).
  labelset_acc_single  the same over the one-object images: the top-scoring caption among all n
                       captions "{x} is in the image" names its label. Chance 1/n.
  pos_cos              mean over the N images of cos(image, its own caption).
  neg_cos              mean of cos(image, c) over every pair of an image of the split and a
                       distinct caption c of the split that does not describe it.
  loss                 the symmetric CLIP loss (PAPER.md §3; the trainer's loss) of one fixed batch:
                       `sample_batch(split, 128, np.random.default_rng(0))`, i.e. up to 128
                       distinct scenes, one random image and caption each; the logit scale is the
                       model's. Comparable between train and validation splits.

and, once per model, `logit_scale` = exp(params["logit_scale"]) (the multiplier of the cosines).

Every caption the metrics can ask for (n single, n(n-1) left-form, n(n-1) right-form) is
encoded once into a `CaptionBank`; images are encoded in chunks of ENCODE_CHUNK rows, and score
matrices are built in chunks of at most SCORE_CHUNK_ELEMS entries, so memory stays small.

Encoders. Every function that encodes takes `encoders=None`: an optional pair

    (encode_images_fn(params, images, cfg) -> [B, E],  encode_texts_fn(params, tokens, eot, cfg) -> [B, E])

used in place of the model's own `model.encode_images` / `model.encode_texts` (the default).
`analysis.evaluate_ablation` passes encoders with attention terms removed; the tests pass
oracles that read the scene off the pixels and tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from minispatial.data import SPLIT_NAMES, Split, Testbed, sample_batch, scene_keys
from minispatial.model import ModelConfig, encode_images, encode_texts
from minispatial.ops import clip_loss_forward
from minispatial.text import left_caption, right_caption, single_caption

METRICS = ("n", "i2t_acc", "t2i_acc", "lr_acc", "lr_acc_right", "labelset_acc",
           "labelset_acc_single", "pos_cos", "neg_cos", "loss")
TIE_TOL = 1e-9            # cosines closer than this count as tied
LOSS_BATCH = 128          # batch of the `loss` metric (capped at the split's distinct scenes)
ENCODE_CHUNK = 1024       # rows per encoder call
SCORE_CHUNK_ELEMS = 1 << 20  # entries per score-matrix chunk (8 MB of float64)

# (encode_images_fn(params, images, cfg), encode_texts_fn(params, tokens, eot, cfg)): module docstring
Encoders = tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]


def model_encoders(encoders: Encoders | None = None) -> Encoders:
    """`encoders`, or the model's own (model.encode_images, model.encode_texts) when None."""
    return (encode_images, encode_texts) if encoders is None else encoders


def metric_names(caption_mode: str) -> tuple[str, ...]:
    """The metrics reported for each split; lr_acc_right only in "left+right" caption mode."""
    return tuple(m for m in METRICS if m != "lr_acc_right" or caption_mode == "left+right")


# --------------------------------------------------------------------------------------------
# the caption bank: every caption a metric can ask for, encoded once

@dataclass(frozen=True)
class CaptionBank:
    """All n single, n(n-1) left-form and n(n-1) right-form captions and their features.

    single [n+1]       index of "{a} is in the image" (row 0 unused, -1)
    left   [n+1, n+1]  index of "{a} is on the left of {b}"   (scene: a left of b; -1 if invalid)
    right  [n+1, n+1]  index of "{b} is on the right of {a}"  (scene: a left of b; -1 if invalid)
    scene  [K]         scene key each caption describes (`data.scene_keys`)
    pair_a, pair_b [P] the labels (x, y) of the P = n(n-1) left-form captions, in bank order
    feats  [K, E]      text features, float64
    """

    captions: tuple[str, ...]
    single: np.ndarray
    left: np.ndarray
    right: np.ndarray
    scene: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    feats: np.ndarray

    def example_index(self, split: Split) -> np.ndarray:
        # split -> [N] bank index of each example's own caption
        a, b = split.labels[:, 0], split.labels[:, 1]
        return np.where(split.form == 0, self.single[a],
                        np.where(split.form == 1, self.left[a, b], self.right[a, b]))


def caption_bank(params: dict, testbed: Testbed, model_cfg: ModelConfig,
                 encoders: Encoders | None = None) -> CaptionBank:
    """Build the captions of `testbed`'s labels, tokenize them and encode them with the text
    tower (the text encoder of `encoders`, module docstring)."""
    encode_texts_fn = model_encoders(encoders)[1]
    n = testbed.config.n_labels
    labels = np.arange(1, n + 1)
    pa, pb = np.meshgrid(labels, labels, indexing="ij")
    keep = pa != pb
    pa, pb = pa[keep], pb[keep]                                   # [P] ordered pairs, x != y
    P = len(pa)
    captions = ([single_caption(a) for a in labels.tolist()]
                + [left_caption(a, b) for a, b in zip(pa.tolist(), pb.tolist())]
                + [right_caption(a, b) for a, b in zip(pa.tolist(), pb.tolist())])
    single = np.full(n + 1, -1, dtype=np.int64)
    single[labels] = np.arange(n)
    left = np.full((n + 1, n + 1), -1, dtype=np.int64)
    left[pa, pb] = n + np.arange(P)
    right = np.full((n + 1, n + 1), -1, dtype=np.int64)
    right[pa, pb] = n + P + np.arange(P)
    scene = np.concatenate([scene_keys(np.stack([labels, 0 * labels], 1), n),
                            np.tile(scene_keys(np.stack([pa, pb], 1), n), 2)])
    tokens, eot = testbed.tokenizer.encode_batch(captions)
    feats = _encode_chunked(lambda s: encode_texts_fn(params, tokens[s], eot[s], model_cfg), len(captions))
    return CaptionBank(tuple(captions), single, left, right, scene, pa, pb, feats)


def _encode_chunked(encode, N: int) -> np.ndarray:
    # encode(slice) -> [rows, E]; -> [N, E] float64
    parts = [np.asarray(encode(slice(i, i + ENCODE_CHUNK)), dtype=np.float64)
             for i in range(0, N, ENCODE_CHUNK)]
    return np.concatenate(parts)


def encode_split_images(params: dict, split: Split, model_cfg: ModelConfig,
                        encoders: Encoders | None = None) -> np.ndarray:
    # split -> image features [N, E] float64, from the image encoder of `encoders`
    encode_images_fn = model_encoders(encoders)[0]
    return _encode_chunked(lambda s: encode_images_fn(params, split.images[s], model_cfg), len(split))


# --------------------------------------------------------------------------------------------
# scoring helpers

def top_credit(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    # scores [R, K], correct [R, K] bool -> credit [R]: the fraction of the top-scoring
    # candidates (ties within TIE_TOL) that are correct
    top = scores >= scores.max(axis=1, keepdims=True) - TIE_TOL
    return (top & correct).sum(axis=1) / top.sum(axis=1)


def pair_credit(s_true: np.ndarray, s_false: np.ndarray) -> np.ndarray:
    # [R], [R] -> [R]: 1 if the true caption wins, 0.5 on a tie (within TIE_TOL), 0 if it loses
    d = s_true - s_false
    return np.where(d > TIE_TOL, 1.0, np.where(d < -TIE_TOL, 0.0, 0.5))


def _rowwise_cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # [R, E], [R, E] -> [R]
    return np.einsum("re,re->r", x, y)


def _chunks(R: int, K: int):
    step = max(1, SCORE_CHUNK_ELEMS // max(K, 1))
    for i in range(0, R, step):
        yield slice(i, min(R, i + step))


def _retrieval(q: np.ndarray, q_key: np.ndarray, c: np.ndarray, c_key: np.ndarray):
    # queries q [R, E] with keys [R], candidates c [K, E] with keys [K] ->
    # (credit [R], sum of non-matching cosines, number of non-matching pairs)
    credit = np.empty(len(q))
    neg_sum, neg_n = 0.0, 0
    for s in _chunks(len(q), len(c)):
        scores = q[s] @ c.T                                          # [r, K]
        match = q_key[s, None] == c_key[None, :]                     # [r, K]
        credit[s] = top_credit(scores, match)
        neg_sum += float(scores[~match].sum())
        neg_n += int((~match).sum())
    return credit, neg_sum, neg_n


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


# --------------------------------------------------------------------------------------------
# the metrics

def evaluate_split(params: dict, testbed: Testbed, name: str, model_cfg: ModelConfig,
                   bank: CaptionBank | None = None, encoders: Encoders | None = None) -> dict[str, float]:
    """Metrics of split `name` (see the module docstring): {metric: float}, NaN where undefined.

    `bank` (from `caption_bank`) can be passed to share the text features between splits; it
    must then come from the same `encoders` (None: the model's own)."""
    if name not in testbed.splits:
        raise ValueError(f"split {name!r} is unknown: allowed {list(testbed.splits)}")
    split = testbed.splits[name]
    out = {m: math.nan for m in metric_names(testbed.config.caption_mode)}
    N = len(split)
    out["n"] = float(N)
    if N == 0:
        return out
    if bank is None:
        bank = caption_bank(params, testbed, model_cfg, encoders)

    img = encode_split_images(params, split, model_cfg, encoders)    # [N, E]
    own = bank.example_index(split)                                   # [N] bank index
    key = split.scene_key                                             # [N]
    cids = np.unique(own)                                             # [C] distinct captions
    txt, txt_key = bank.feats[cids], bank.scene[cids]                 # [C, E], [C]

    # retrieval both ways among the split's own images and distinct captions
    i2t, neg_sum, neg_n = _retrieval(img, key, txt, txt_key)
    t2i, _, _ = _retrieval(txt, txt_key, img, key)
    out["i2t_acc"] = _mean(i2t)
    out["t2i_acc"] = _mean(t2i)
    out["pos_cos"] = _mean(_rowwise_cos(img, bank.feats[own]))
    out["neg_cos"] = neg_sum / neg_n if neg_n else math.nan

    # left-right discrimination: true caption against the one with the labels swapped
    pair = split.is_pair
    a, b = split.labels[pair, 0], split.labels[pair, 1]
    ip = img[pair]                                                    # [Np, E]
    forms = [("lr_acc", bank.left)] + ([("lr_acc_right", bank.right)] if "lr_acc_right" in out else [])
    for metric, table in forms:
        credit = pair_credit(_rowwise_cos(ip, bank.feats[table[a, b]]),
                             _rowwise_cos(ip, bank.feats[table[b, a]]))
        out[metric] = _mean(credit)

    # label-set recognition among every caption of the same kind
    n_lab = testbed.config.n_labels
    pairs = bank.feats[bank.left[bank.pair_a, bank.pair_b]]           # [P, E]
    pair_key = scene_keys(np.sort(np.stack([bank.pair_a, bank.pair_b], 1), axis=1), n_lab)
    set_key = scene_keys(np.sort(np.stack([a, b], 1), axis=1), n_lab)  # order-free key of {a, b}
    out["labelset_acc"] = _mean(_retrieval(ip, set_key, pairs, pair_key)[0])
    singles = bank.feats[bank.single[1:]]                             # [n, E]
    out["labelset_acc_single"] = _mean(_retrieval(img[~pair], split.labels[~pair, 0], singles,
                                                  np.arange(1, n_lab + 1))[0])

    # the CLIP loss of one fixed batch of distinct scenes
    idx = sample_batch(split, LOSS_BATCH, np.random.default_rng(0))
    loss, _ = clip_loss_forward(img[idx], bank.feats[own[idx]],
                                np.asarray(params["logit_scale"], dtype=np.float64))
    out["loss"] = float(loss)
    return out


def evaluate_all(params: dict, testbed: Testbed, model_cfg: ModelConfig,
                 encoders: Encoders | None = None) -> dict[str, float]:
    """Every split's metrics as one flat dict {"{split}.{metric}": float} plus "logit_scale".

    encoders: None for the model's own, or a pair (encode_images_fn, encode_texts_fn) to use
    instead (module docstring), e.g. `analysis.ablated_encoders(ablation)`."""
    bank = caption_bank(params, testbed, model_cfg, encoders)
    flat: dict[str, float] = {}
    for name in SPLIT_NAMES:
        for metric, v in evaluate_split(params, testbed, name, model_cfg, bank, encoders).items():
            flat[f"{name}.{metric}"] = v
    flat["logit_scale"] = float(np.exp(params["logit_scale"]))
    return flat


# --------------------------------------------------------------------------------------------
# printing and the command line

def _fmt(metric: str, v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return str(v)
    if math.isnan(v):
        return "-"
    if metric in ("n", "step"):
        return str(int(v))
    return f"{v:.3f}"


def format_table(metrics: dict) -> str:
    """A table: one row per metric, one column per split ("-" = NaN/undefined); other keys
    (logit_scale, step, ...) are listed below it."""
    per: dict[str, dict[str, object]] = {}
    other: dict[str, object] = {}
    for k, v in metrics.items():
        split, _, metric = k.partition(".")
        if split in SPLIT_NAMES and metric:
            per.setdefault(metric, {})[split] = v
        else:
            other[k] = v
    splits = [s for s in SPLIT_NAMES if any(s in row for row in per.values())]
    rows = [m for m in METRICS if m in per] + sorted(m for m in per if m not in METRICS)
    w0 = max([len("metric")] + [len(m) for m in rows])
    widths = [max(len(s), 7) for s in splits]
    lines = ["  ".join([f"{'metric':<{w0}}"] + [f"{s:>{w}}" for s, w in zip(splits, widths)])]
    lines.append("  ".join(["-" * w0] + ["-" * w for w in widths]))
    for m in rows:
        cells = [_fmt(m, per[m].get(s, math.nan)) for s in splits]
        lines.append("  ".join([f"{m:<{w0}}"] + [f"{c:>{w}}" for c, w in zip(cells, widths)]))
    for k, v in other.items():
        lines.append(f"{k}: {_fmt(k, v)}")
    return "\n".join(lines)


def _json_safe(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minispatial eval",
                                description="Recompute every evaluation metric of a checkpoint "
                                            "on the testbed rebuilt from its config.")
    p.add_argument("checkpoint", help="a checkpoint.npz, or a run directory holding one")
    p.add_argument("--json", action="store_true",
                   help="print the metrics as one JSON object (NaN as null) instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    """`minispatial eval CHECKPOINT [--json]` -> 0, 2 on a missing, corrupt or invalid checkpoint
    (`train.load_checkpoint` validates every entry, so a NaN model is refused, naming the tensor,
    instead of scoring chance), 130 on Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the message (or the help)
        return e.code if isinstance(e.code, int) else 2
    from minispatial.data import make_testbed
    from minispatial.train import load_checkpoint

    try:
        cfg, params, _, step = load_checkpoint(args.checkpoint)
    except (ValueError, OSError) as e:
        print(f"minispatial eval: error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = {"step": step, **evaluate_all(params, make_testbed(cfg.data), cfg.model)}
    except KeyboardInterrupt:
        print("\nminispatial eval: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({k: _json_safe(v) for k, v in metrics.items()}, indent=2))
    else:
        print(f"checkpoint {args.checkpoint}")
        print(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
