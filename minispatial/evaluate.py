"""Evaluation: every metric of one trained dual encoder on the four splits of the testbed.

    minispatial eval CHECKPOINT [--json] [--step fast|reference]

Legend: N images (examples) of a split, K candidate captions, E feature width, n = n_labels.
The metrics (n, i2t_acc, t2i_acc, lr_acc, lr_acc_right, labelset_acc, labelset_acc_single,
pos_cos, neg_cos, loss, i2t_acc_{pair,single,heldout}_labels, lr_acc_recognised, and
logit_scale), how ties count (TIE_TOL) and which captions are
candidates are defined once, in docs/metrics.md. All scores are cosines of the L2-normalised
features, computed in float64.

Every caption the metrics can ask for (n single, n(n-1) left-form, n(n-1) right-form) is
encoded once into a `CaptionBank`; images are encoded in chunks of ENCODE_CHUNK rows, and score
matrices are built in chunks of at most SCORE_CHUNK_ELEMS entries, so memory stays small.

Encoders. Every function that encodes takes `encoders=None`: an optional pair

    (encode_images_fn(params, images, cfg) -> [B, E],  encode_texts_fn(params, tokens, eot, cfg) -> [B, E])

used in place of the model's own `model.encode_images` / `model.encode_texts` (the default).
`analysis.ablate.evaluate_ablation` passes encoders with attention terms removed, the trainer
the encoders of its step (minispatial/step.py); the tests pass
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

from minispatial.data import FORM_SINGLE, SPLIT_NAMES, Split, Testbed, sample_batch, scene_keys
from minispatial.model import ENCODE_CHUNK, ModelConfig, encode_images, encode_texts
from minispatial.ops import clip_loss_forward
from minispatial.reporting import clean_json
from minispatial.reporting import format_table as format_rows
from minispatial.step import STEPS, choose
from minispatial.text import left_caption, right_caption, single_caption

METRICS = ("n", "i2t_acc", "t2i_acc", "lr_acc", "lr_acc_right", "labelset_acc",
           "labelset_acc_single", "pos_cos", "neg_cos", "loss",
           "i2t_acc_pair_labels", "i2t_acc_single_labels", "i2t_acc_heldout_labels", "lr_acc_recognised")
TIE_TOL = 1e-9            # cosines closer than this count as tied
LOSS_BATCH = 128          # batch of the `loss` metric (capped at the split's distinct scenes)
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
        return np.where(split.form == FORM_SINGLE, self.single[a],
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


def label_groups(cfg) -> dict[str, np.ndarray]:
    """{metric: labels} of the i2t_acc_*_labels metrics for a TestbedConfig: the pair labels
    1..n_pair, the labels only ever alone in training n_pair+1..n_labels-n_heldout, the held-out."""
    return {"i2t_acc_pair_labels": np.arange(1, cfg.n_pair + 1),
            "i2t_acc_single_labels": np.arange(cfg.n_pair + 1, cfg.n_labels - cfg.n_heldout + 1),
            "i2t_acc_heldout_labels": np.asarray(cfg.heldout_labels, dtype=np.int64)}


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
    # i2t_acc of the one-object images, by label group (NaN on splits without one-object images)
    pair = split.is_pair
    for metric, labels in label_groups(testbed.config).items():
        out[metric] = _mean(i2t[~pair & np.isin(split.labels[:, 0], labels)])

    # left-right discrimination: true caption against the one with the labels swapped
    a, b = split.labels[pair, 0], split.labels[pair, 1]
    ip = img[pair]                                                    # [Np, E]
    forms = [("lr_acc", bank.left)] + ([("lr_acc_right", bank.right)] if "lr_acc_right" in out else [])
    lr_credit = {}
    for metric, table in forms:
        lr_credit[metric] = pair_credit(_rowwise_cos(ip, bank.feats[table[a, b]]),
                                        _rowwise_cos(ip, bank.feats[table[b, a]]))
        out[metric] = _mean(lr_credit[metric])

    # label-set recognition among every caption of the same kind
    n_lab = testbed.config.n_labels
    pairs = bank.feats[bank.left[bank.pair_a, bank.pair_b]]           # [P, E]
    pair_key = scene_keys(np.sort(np.stack([bank.pair_a, bank.pair_b], 1), axis=1), n_lab)
    set_key = scene_keys(np.sort(np.stack([a, b], 1), axis=1), n_lab)  # order-free key of {a, b}
    recognised = _retrieval(ip, set_key, pairs, pair_key)[0]         # [Np] credit, ties fractional
    out["labelset_acc"] = _mean(recognised)
    # lr_acc over the recognised images, each weighted by its label-set credit
    weight = float(recognised.sum())
    out["lr_acc_recognised"] = float((lr_credit["lr_acc"] * recognised).sum() / weight) if weight > 0 else math.nan
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
    instead (module docstring), e.g. `analysis.ablate.ablated_encoders(ablation)`."""
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
    cells = [[m] + [_fmt(m, per[m].get(s, math.nan)) for s in splits] for m in rows]
    lines = [format_rows(["metric", *splits], cells, align="l" + "r" * len(splits),
                         min_width=[0] + [7] * len(splits))]
    for k, v in other.items():
        lines.append(f"{k}: {_fmt(k, v)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minispatial eval",
                                description="Recompute every evaluation metric of a checkpoint "
                                            "on the testbed rebuilt from its config.")
    p.add_argument("checkpoint", help="a checkpoint.npz, or a run directory holding one")
    p.add_argument("--json", action="store_true",
                   help="print the metrics as one JSON object (NaN as null) instead of a table")
    p.add_argument("--step", default="fast", choices=STEPS,
                   help="encode with the fast step's encoders (default: as training evaluates) or "
                        "the reference model's (plain NumPy; equal up to float rounding)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`minispatial eval CHECKPOINT [--json]` -> 0, 2 on a missing, corrupt or invalid checkpoint
    (`checkpoint.load_checkpoint` validates every entry, so a NaN model is refused, naming the tensor,
    instead of scoring chance), 130 on Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the message (or the help)
        return e.code if isinstance(e.code, int) else 2
    from minispatial.checkpoint import load_checkpoint
    from minispatial.data import make_testbed

    try:
        cfg, params, _, step = load_checkpoint(args.checkpoint)
    except (ValueError, OSError) as e:
        print(f"minispatial eval: error: {e}", file=sys.stderr)
        return 2
    try:
        encoders = choose(args.step).encoders
        metrics = {"step": step, **evaluate_all(params, make_testbed(cfg.data), cfg.model, encoders)}
    except KeyboardInterrupt:
        print("\nminispatial eval: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(clean_json(metrics), indent=2))
    else:
        print(f"checkpoint {args.checkpoint}")
        print(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
