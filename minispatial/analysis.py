"""Inside a trained dual encoder (PAPER.md §6): the attention-logit decomposition, the horizontal
attention gradient, head classes, the text EOT attention, label-embedding alignment, and
inference-time ablations of score terms; over several runs, their mean ± std.

    minispatial analyze CHECKPOINT [CHECKPOINT ...] [--ablate EP,PP ...] [--heads 0,1,2,3]
                        [--tower vision|text|both] [--n-images N] [--json] [--out FILE] [--plots DIR]

Legend: B batch, T tokens, D d_model, H heads (h: a selection of them), Dh d_head, L image_len,
n n_labels, Tq/Tk query/key positions.

The decomposition
-----------------
Layer l of a tower reads the residual stream x (its `hook_resid_pre`) and, per head, scores

    scores = (h W_Q + b_Q)(h W_K + b_K)ᵀ / sqrt(Dh)        h = x, or ln1(x) with LayerNorm

(the model's `hook_attn_scores`, taken before the causal mask). We split x into parts:

    E  the token part: `hook_embed` (W_E[ids] times the embed scale; on the vision CLS row the
       class_embedding), carried to layer l unchanged by the skip connections;
    P  the position part: `hook_pos_embed` (W_pos[:T]), carried likewise;
    R  (layers l > 0 only) the rest, R = x - E - P: everything earlier blocks wrote into the
       stream (attention outputs, MLP outputs). At layer 0, R = 0 and is left out.

This is the "direct path" split: E and P are not propagated through earlier attention layers,
whose outputs (which also carry label and position information) are all in R.
With LayerNorm, ln1(x) = (x - mean x) * rstd * w + b is linear in x once rstd (1/std, per token)
is frozen at its cached value (`ln1.hook_scale`); each part c becomes (c - mean c) * rstd * w,
and the constant b is folded into the biases: b_Q <- b_Q + b W_Q, b_K <- b_K + b W_K.
With parts a, c in {E, P, R} the score splits, exactly, into the named terms

    ac     = a W_Q W_Kᵀ cᵀ / sqrt(Dh)       (EE, EP, PE, PP and, for l > 0, ER, RE, PR, RP, RR)
    Bc     = b_Q W_Kᵀ cᵀ / sqrt(Dh)         (BE, BP, BR): the query bias against a key part
    const  = (x W_Q + b_Q) b_Kᵀ / sqrt(Dh)  constant along each query row: no effect on softmax.

The first letter is the query side, the second the key side. The terms sum to the model's own
scores (to ~1e-15 in float64; `sum_max_abs_err` in the output reports it). Every measurement
below runs a float64 copy of the model, so the check holds for float32 checkpoints too.

Measurements (all per tower, layer and head)
--------------------------------------------
curve, slope, right_left (vision CLS row, query 0): each term's value at the key of pixel j,
    j = 0..L-1, averaged over the labels: on the "grid" probe (n x L single-object images, every
    label at every pixel) curve[j] = mean over labels v of term(CLS, key of pixel j) in the image
    holding v at j. (EP on the CLS row does not depend on the key's label at layer 0 without
    LayerNorm, so there it is exact; EE, PE, BE do, hence the label average.)
    `slope` is the least-squares slope of curve against j (logit units per pixel) and
    `right_left` = curve[L-1] - curve[0]. `curve_batch` is the same term averaged over the pair
    probe images at every key (objects and background alike).
std_ratio, var_share (CLS row over the L pixel keys; EOT row over the keys 0..eot in text):
    on the "pair" probe (up to n_images two-object images from val_seen_pair + val_unseen_pair,
    or every two-object left-form caption in text), d_t = term t minus its mean over the row's
    keys, d = the same for the total score, pooled over images:
        std_ratio_t = sqrt(sum d_t^2) / sqrt(sum d^2)   (the term's std as a fraction of the total's)
        var_share_t = sum d_t d / sum d^2               (its share of the variance; sums to 1)
head class (relational vs label-specific): S[v, k] = total score minus `const` at the key of the
    object with label v in key slot k, averaged over images. Vision: the CLS row, slots = the L
    pixels, from the grid probe. Text: the EOT row, slots = first- and second-mentioned label,
    from every left-form two-object caption.
        pos_var = mean over v of Var over k of S;   label_var = mean over k of Var over v of S
    A head is "relational" when pos_var > label_var, "label-specific" otherwise
    (pos_frac = pos_var / (pos_var + label_var)).
text EOT attention: per text layer and head, the EOT query's attention probability on the
    first- and second-mentioned label token, averaged over captions; `first_wins` = fraction of
    captions with more on the first. Left-form captions (first = left object) and, in left+right
    mode, right-form captions (first = right object) separately; also on held-out pairs only.
alignment: label embeddings u_v (image side) and t_v (text side), unit-normalised.
    "features": u_v = mean over pixels of the image features of the grid images of label v;
                t_v = the text feature of "{v} is in the image".
    "embeddings": u_v = vision.W_E[v], t_v = text.W_E[token of v] (requires equal widths: both D).
    An orthogonal R (Procrustes: R = U Vᵀ from the SVD of U_seenᵀ T_seen, no centring) is fitted on
    the seen labels (the pair labels 1..n_pair). Reported: mean cos(u_v R, t_v) on seen labels
    (`fit_cos`) and held-out labels (`heldout_cos`), the same without rotation (`*_identity`),
    the mean cos(u_v R, t_w) over held-out v and w != v (`heldout_cos_other`, a floor), and the
    fraction of held-out labels whose nearest t among all n labels is their own (`heldout_top1`).

Ablations
---------
An `Ablation` removes (subtracts) chosen score terms before the softmax, on every query row, in
the chosen heads, layers and towers, and optionally the value path's position part ("VP":
v = (h - P') W_V + b_V, P' the position part as in the decomposition). Nothing is retrained.
Every metric of `evaluate.evaluate_all` is then recomputed, by passing it the ablated encoders
(`ablated_encoders`) as its `encoders` argument. An empty ablation runs evaluate_all with the
model's own encoders (so it reproduces it exactly).

Many runs
---------
Given several checkpoints (e.g. the seeds of a sweep: `minispatial analyze SWEEP/runs/*`), each is
analysed as above, and `aggregate_reports` takes the mean and sample standard deviation (ddof=1)
over the runs of: every ablation's metrics; per vision layer, CLS-row term and head, the slope,
right_left, std_ratio, var_share and curve; the same four first reduced over the heads of each run
(`head_mean`, `head_max`: the signed maximum) and then averaged over runs; and the number of
relational heads per tower and layer. Heads are not matched across runs (head 0 of one seed need
not do what head 0 of another does), so the per-head rows are a record, and the head mean and max
are what compares between runs. Undefined values (NaN) are left out, `n` counts the runs used.
All runs must share the model's shape (SHAPE_FIELDS) and the list of ablations. --json / --out
then give {"runs": [one report per checkpoint], "aggregate": aggregate_reports(...)}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minispatial import model
from minispatial.cli import check_output_dir, check_output_file
from minispatial.text import FIRST_LABEL_ID, left_caption, right_caption, single_caption

F64 = np.float64
PARTS = ("E", "P", "R")
TOWERS = ("vision", "text")
DEFAULT_ABLATIONS = ("", "EP", "PE", "PP", "BP", "EP,VP")
KEY_METRICS = ("val_unseen_pair.lr_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.lr_acc",
               "val_seen_pair.labelset_acc", "val_single.labelset_acc_single", "val_single.i2t_acc",
               "val_unseen_pair.i2t_acc", "train.lr_acc")


def term_names(parts=("E", "P")) -> list[str]:
    """Names of the score terms for residual parts `parts` (("E", "P") at layer 0)."""
    return [a + c for a in parts for c in parts] + ["B" + c for c in parts] + ["const"]


ALL_TERMS = tuple(term_names(PARTS))
POS_TERMS = tuple(t for t in ALL_TERMS if "P" in t)       # every score term with a position part


# --------------------------------------------------------------------------------------------
# the decomposition

def layer_parts(params: dict, cfg, tower: str, layer: int, record: dict):
    # record of a forward pass -> ({"E", "P"[, "R"]: [B, T, D] float64}, ln bias [D] or None)
    """The parts of the residual stream as they enter W_Q/W_K/W_V of `layer` (module docstring)."""
    E = np.asarray(record[f"{tower}.hook_embed"], dtype=F64)                       # [B, T, D]
    P = np.broadcast_to(np.asarray(record[f"{tower}.hook_pos_embed"], dtype=F64), E.shape)
    parts = {"E": E, "P": P}
    b = f"{tower}.blocks.{layer}"
    if layer > 0:
        parts["R"] = np.asarray(record[f"{b}.hook_resid_pre"], dtype=F64) - E - P
    if not cfg.layernorm:
        return parts, None
    rstd = np.asarray(record[f"{b}.ln1.hook_scale"], dtype=F64)                    # [B, T, 1]
    w = params[f"{b}.ln1.w"].astype(F64)
    parts = {k: (c - c.mean(axis=-1, keepdims=True)) * rstd * w for k, c in parts.items()}
    return parts, params[f"{b}.ln1.b"].astype(F64)


def attn_weights(params: dict, tower: str, layer: int, heads=None) -> dict:
    # -> {W_Q, W_K, W_V [h, D, Dh], b_Q, b_K, b_V [h, Dh]} float64 for the selected heads
    b = f"{tower}.blocks.{layer}.attn"
    H = params[f"{b}.W_Q"].shape[0]
    hs = np.arange(H) if heads is None else np.asarray(heads, dtype=np.int64)
    return {n: params[f"{b}.{n}"][hs].astype(F64) for n in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")}


def score_terms(parts: dict, ln_b, w: dict, names=None) -> dict[str, np.ndarray]:
    # parts {name: [B, T, D]}, ln_b [D] or None, w (attn_weights) -> {term: [B, h, Tq, Tk]} float64
    """The named terms of the attention scores (module docstring); `names` picks a subset
    (names whose parts are absent, e.g. R terms at layer 0, are identically zero and skipped)."""
    W_Q, W_K, b_Q, b_K = w["W_Q"], w["W_K"], w["b_Q"], w["b_K"]
    if ln_b is not None:                                     # LayerNorm's b is a constant input
        b_Q = b_Q + np.einsum("d,hde->he", ln_b, W_Q)
        b_K = b_K + np.einsum("d,hde->he", ln_b, W_K)
    scale = 1.0 / math.sqrt(W_Q.shape[2])
    avail = term_names(tuple(p for p in PARTS if p in parts))
    names = avail if names is None else [n for n in names if n in avail]
    B, T, _ = next(iter(parts.values())).shape
    shape = (B, W_Q.shape[0], T, T)
    q: dict[str, np.ndarray] = {}
    k: dict[str, np.ndarray] = {}

    def Q(a):   # a W_Q  [B, h, T, Dh]
        if a not in q:
            q[a] = np.einsum("btd,hde->bhte", parts[a], W_Q)
        return q[a]

    def K(c):   # c W_K  [B, h, T, Dh]
        if c not in k:
            k[c] = np.einsum("btd,hde->bhte", parts[c], W_K)
        return k[c]

    out = {}
    for n in names:
        if n == "const":
            qx = sum(Q(a) for a in parts) + b_Q[None, :, None, :]                   # x W_Q + b_Q
            row = np.einsum("bhte,he->bht", qx, b_K) * scale                       # [B, h, Tq]
            out[n] = np.broadcast_to(row[..., None], shape).copy()
        elif n[0] == "B":
            col = np.einsum("he,bhke->bhk", b_Q, K(n[1])) * scale                  # [B, h, Tk]
            out[n] = np.broadcast_to(col[:, :, None, :], shape).copy()
        else:
            out[n] = (Q(n[0]) @ K(n[1]).swapaxes(-1, -2)) * scale
    return out


def float64_model(params: dict, cfg):
    """(params, cfg) in float64 (a copy when the checkpoint is float32)."""
    if cfg.dtype == "float64":
        return params, cfg
    return {n: p.astype(F64) for n, p in params.items()}, dataclasses.replace(cfg, dtype="float64")


def run_tower(params: dict, cfg, tower: str, ids, eot=None, hooks=None):
    # ids [B, L] pixels or [B, Tt] tokens (eot [B]) -> (features [B, E], record)
    record: dict[str, np.ndarray] = {}
    if tower == "vision":
        feats = model.encode_images(params, ids, cfg, hooks=hooks, record=record)
    else:
        feats = model.encode_texts(params, ids, eot, cfg, hooks=hooks, record=record)
    return feats, record


def decompose(params: dict, cfg, tower: str, layer: int, ids, eot=None):
    # -> (terms {name: [B, H, Tq, Tk]}, scores [B, H, Tq, Tk], pattern [B, H, Tq, Tk], record)
    """Run `tower` on a batch (in the model's dtype; pass float64_model(...) for exactness) and
    split the scores of `layer` into terms. ValueError for a layer the tower does not have."""
    n_layers = cfg.layers(tower)
    if tower not in TOWERS:
        raise ValueError(f"tower={tower!r} is invalid: must be one of {TOWERS}")
    if not (isinstance(layer, int) and 0 <= layer < n_layers):
        raise ValueError(f"layer={layer!r} is invalid: the {tower} tower has layers 0..{n_layers - 1}")
    _, record = run_tower(params, cfg, tower, ids, eot)
    parts, ln_b = layer_parts(params, cfg, tower, layer, record)
    terms = score_terms(parts, ln_b, attn_weights(params, tower, layer))
    a = f"{tower}.blocks.{layer}.attn."
    return terms, record[a + "hook_attn_scores"], record[a + "hook_pattern"], record


# --------------------------------------------------------------------------------------------
# ablations

@dataclass(frozen=True)
class Ablation:
    """Score terms removed before softmax, and/or the value path's position part (VP).

    towers: where (any of "vision", "text"); heads / layers: None = all of them."""

    terms: tuple[str, ...] = ()
    value_pos: bool = False
    towers: tuple[str, ...] = ("vision",)
    heads: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        bad = [t for t in self.terms if t not in ALL_TERMS]
        if bad:
            raise ValueError(f"Ablation.terms has {bad}: allowed {list(ALL_TERMS)} (and VP, POS)")
        bad = [t for t in self.towers if t not in TOWERS]
        if bad or not self.towers:
            raise ValueError(f"Ablation.towers={self.towers!r} is invalid: a non-empty subset of {TOWERS}")

    @property
    def empty(self) -> bool:
        return not self.terms and not self.value_pos

    @property
    def name(self) -> str:
        if self.empty:
            return "baseline"
        return "".join("-" + t for t in self.terms) + ("-VP" if self.value_pos else "")

    def check(self, cfg) -> None:
        """ValueError when a head or layer is out of range for the model."""
        for h in self.heads or ():
            if not 0 <= h < cfg.n_heads:
                raise ValueError(f"ablation head {h} is out of range: the model has heads 0..{cfg.n_heads - 1}")
        top = max(cfg.layers(t) for t in self.towers)
        for l in self.layers or ():
            if not 0 <= l < top:
                raise ValueError(f"ablation layer {l} is out of range: layers 0..{top - 1}")


def parse_ablation(text: str, towers=("vision",), heads=None, layers=None) -> Ablation:
    """"EP,VP" / "EP+VP" / "-EP-VP" -> Ablation. "" / "none" / "baseline": nothing removed;
    "POS": every score term with a position part (EP, PE, PP, BP, PR, RP)."""
    lookup = {t.upper(): t for t in ALL_TERMS}
    terms: list[str] = []
    vp = False
    for tok in text.replace("+", ",").replace("-", ",").split(","):
        tok = tok.strip().upper()
        if tok in ("", "NONE", "BASELINE"):
            continue
        if tok == "VP":
            vp = True
        elif tok == "POS":
            terms += [t for t in POS_TERMS if t not in terms]
        elif tok in lookup:
            if lookup[tok] not in terms:
                terms.append(lookup[tok])
        else:
            raise ValueError(f"--ablate {text!r}: unknown term {tok!r}; allowed {list(ALL_TERMS)}, VP, POS, none")
    return Ablation(tuple(terms), vp, tuple(towers), None if heads is None else tuple(heads),
                    None if layers is None else tuple(layers))


def ablation_hooks(params: dict, cfg, tower: str, ablation: Ablation, record: dict) -> dict:
    """Hooks for one forward pass of `tower` that apply `ablation`. They read the residual
    parts from `record`, which must be the record dict passed to that same forward pass."""
    if tower not in ablation.towers or ablation.empty:
        return {}
    heads = list(range(cfg.n_heads)) if ablation.heads is None else list(ablation.heads)
    layers = range(cfg.layers(tower)) if ablation.layers is None else [l for l in ablation.layers
                                                                        if l < cfg.layers(tower)]
    hooks = {}
    for l in layers:
        w = attn_weights(params, tower, l, heads)
        prefix = f"{tower}.blocks.{l}.attn."
        if ablation.terms:
            def remove_terms(scores, l=l, w=w):
                # scores [B, H, Tq, Tk] -> scores minus the removed terms in the chosen heads
                parts, ln_b = layer_parts(params, cfg, tower, l, record)
                terms = score_terms(parts, ln_b, w, ablation.terms)
                out = scores.astype(F64)
                if terms:
                    out[:, heads] -= sum(terms.values())
                return out
            hooks[prefix + "hook_attn_scores"] = remove_terms
        if ablation.value_pos:
            def remove_value_pos(v, l=l, w=w):
                # v [B, T, H, Dh] -> v computed from h - P' in the chosen heads
                parts, _ = layer_parts(params, cfg, tower, l, record)
                out = v.astype(F64)
                out[:, :, heads] -= np.einsum("btd,hde->bthe", parts["P"], w["W_V"])
                return out
            hooks[prefix + "hook_v"] = remove_value_pos
    return hooks


def encode_ablated(params: dict, cfg, tower: str, ids, eot, ablation: Ablation, record=None):
    # ids [B, ...] -> features [B, E] under the ablation (plain forward when it does not apply)
    record = {} if record is None else record
    hooks = ablation_hooks(params, cfg, tower, ablation, record)
    if tower == "vision":
        return model.encode_images(params, ids, cfg, hooks=hooks, record=record)
    return model.encode_texts(params, ids, eot, cfg, hooks=hooks, record=record)


def ablated_encoders(ablation: Ablation):
    """The pair (encode_images_fn(params, images, cfg), encode_texts_fn(params, tokens, eot, cfg))
    that `evaluate.evaluate_all(..., encoders=)` takes, with `ablation` applied in both towers."""

    def encode_images_fn(params, images, cfg):
        return encode_ablated(params, cfg, "vision", images, None, ablation)

    def encode_texts_fn(params, tokens, eot, cfg):
        return encode_ablated(params, cfg, "text", tokens, eot, ablation)

    return encode_images_fn, encode_texts_fn


def evaluate_ablation(params: dict, testbed, cfg, ablation: Ablation) -> dict[str, float]:
    """Every metric of evaluate_all with `ablation` applied (exactly evaluate_all when empty)."""
    from minispatial.evaluate import evaluate_all

    ablation.check(cfg)
    if ablation.empty:
        return evaluate_all(params, testbed, cfg)
    return evaluate_all(params, testbed, cfg, encoders=ablated_encoders(ablation))


# --------------------------------------------------------------------------------------------
# probes and statistics

def grid_images(n_labels: int, image_len: int) -> np.ndarray:
    # -> images [n * L, L]: image (v - 1) * L + j holds label v at pixel j, background elsewhere
    images = np.zeros((n_labels * image_len, image_len), dtype=np.int64)
    v = np.repeat(np.arange(1, n_labels + 1), image_len)
    j = np.tile(np.arange(image_len), n_labels)
    images[np.arange(len(v)), j] = v
    return images


def pair_images(testbed, n_images: int) -> np.ndarray:
    # -> images [N, L]: up to n_images two-object images of val_seen_pair + val_unseen_pair
    ims = np.concatenate([testbed.splits[s].images for s in ("val_seen_pair", "val_unseen_pair")])
    if len(ims) > n_images:
        ims = ims[np.sort(np.random.default_rng(0).choice(len(ims), n_images, replace=False))]
    return ims


def slope_of(curve: np.ndarray) -> np.ndarray:
    # curve [..., L] -> least-squares slope against 0..L-1 [...]
    x = np.arange(curve.shape[-1], dtype=F64)
    x -= x.mean()
    return (curve - curve.mean(axis=-1, keepdims=True)) @ x / (x @ x)


def row_shares(terms: dict, keymask: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # terms {name: [B, h, K]} one query row each, keymask [B, K] bool -> {name: (std_ratio [h], var_share [h])}
    m = keymask[:, None, :].astype(F64)
    cnt = m.sum(axis=-1, keepdims=True)

    def dev(a):
        return (a - (a * m).sum(axis=-1, keepdims=True) / cnt) * m

    d = dev(sum(terms.values()))
    tot = (d * d).sum(axis=(0, 2))
    out = {}
    for n, a in terms.items():
        dt = dev(a)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[n] = (np.sqrt((dt * dt).sum(axis=(0, 2)) / tot), (dt * d).sum(axis=(0, 2)) / tot)
    return out


def head_class(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # S [H, n_labels, slots] score by label and slot -> pos_var [H], label_var [H]
    return S.var(axis=2).mean(axis=1), S.var(axis=1).mean(axis=1)


def _heads_table(pos_var, label_var) -> list[dict]:
    out = []
    for h, (pv, lv) in enumerate(zip(pos_var, label_var)):
        out.append({"head": h, "pos_var": float(pv), "label_var": float(lv),
                    "pos_frac": float(pv / (pv + lv)) if pv + lv > 0 else math.nan,
                    "class": "relational" if pv > lv else "label-specific"})
    return out


# --------------------------------------------------------------------------------------------
# vision: CLS row

def analyze_vision(params: dict, cfg, testbed, n_images: int = 512) -> list[dict]:
    """Per vision layer: the CLS-row terms of every head (curves, slopes, shares), the head
    classes and the sum check. `params`/`cfg` should be float64 (float64_model)."""
    n, L = testbed.config.n_labels, testbed.config.image_len
    grid = grid_images(n, L)
    pairs = pair_images(testbed, n_images)
    vs, js = np.repeat(np.arange(n), L), np.tile(np.arange(L), n)
    out = []
    for layer in range(cfg.vision_layers):
        tg, sg, _, _ = decompose(params, cfg, "vision", layer, grid)
        tp, sp, pattern, _ = decompose(params, cfg, "vision", layer, pairs)
        err = max(float(np.abs(sum(tg.values()) - sg).max()), float(np.abs(sum(tp.values()) - sp).max()))
        # object key of each grid image: curve[t][h, j] = mean over v
        obj = {t: a[np.arange(len(grid)), :, 0, 1 + js].reshape(n, L, -1).transpose(2, 0, 1)
               for t, a in tg.items()}                                              # [H, n, L]
        cls_rows = {t: a[:, :, 0, 1:] for t, a in tp.items()}                       # [B, H, L]
        shares = row_shares(cls_rows, np.ones((len(pairs), L), dtype=bool))
        pos_var, label_var = head_class(sum(obj.values()) - obj["const"])
        heads = _heads_table(pos_var, label_var)
        for h, head in enumerate(heads):
            head["terms"] = {}
            for t in tg:
                curve = obj[t][h].mean(axis=0)                                      # [L]
                head["terms"][t] = {
                    "slope": float(slope_of(curve)), "right_left": float(curve[-1] - curve[0]),
                    "std_ratio": float(shares[t][0][h]), "var_share": float(shares[t][1][h]),
                    "curve": curve.tolist(), "curve_batch": cls_rows[t][:, h].mean(axis=0).tolist()}
        out.append({"layer": layer, "terms": list(tg), "sum_max_abs_err": err, "n_grid": len(grid),
                    "n_pair_images": len(pairs), "heads": heads,
                    "mean_terms": {t: a.mean(axis=0).tolist() for t, a in tp.items()},
                    "mean_pattern": pattern.mean(axis=0).tolist()})
    return out


# --------------------------------------------------------------------------------------------
# text: EOT row

def pair_captions(testbed, form: str):
    # -> tokens [N, Tt], eot [N], first/second label [N], first/second token index [N]
    n = testbed.config.n_labels
    a, b = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1), indexing="ij")
    keep = a != b
    a, b = a[keep], b[keep]                                   # scene: a left of b
    if form == "left":
        caps, first, second = [left_caption(x, y) for x, y in zip(a, b)], a, b
    else:
        caps, first, second = [right_caption(x, y) for x, y in zip(a, b)], b, a
    tokens, eot = testbed.tokenizer.encode_batch(caps)
    is_label = tokens >= FIRST_LABEL_ID
    i_first = np.argmax(is_label, axis=1)
    i_second = tokens.shape[1] - 1 - np.argmax(is_label[:, ::-1], axis=1)
    return tokens, eot, first, second, i_first, i_second


def analyze_text(params: dict, cfg, testbed) -> list[dict]:
    """Per text layer: EOT-row term shares, head classes, EOT attention to the first- vs
    second-mentioned label, and the sum check. `params`/`cfg` should be float64."""
    held = np.isin(np.arange(testbed.config.n_labels + 1), testbed.heldout_labels)
    n = testbed.config.n_labels
    forms = ["left"] + (["right"] if testbed.config.caption_mode == "left+right" else [])
    data = {f: pair_captions(testbed, f) for f in forms}
    out = []
    for layer in range(cfg.text_layers):
        entry = {"layer": layer, "sum_max_abs_err": 0.0, "eot_attention": {}}
        for f in forms:
            tokens, eot, first, second, i1, i2 = data[f]
            terms, scores, pattern, _ = decompose(params, cfg, "text", layer, tokens, eot)
            entry["sum_max_abs_err"] = max(entry["sum_max_abs_err"],
                                           float(np.abs(sum(terms.values()) - scores).max()))
            rows = np.arange(len(tokens))
            p1, p2 = pattern[rows, :, eot, i1], pattern[rows, :, eot, i2]           # [N, H]
            both_held = held[first] & held[second]
            stats = []
            for h in range(cfg.n_heads):
                s = {"head": h, "att_first": float(p1[:, h].mean()), "att_second": float(p2[:, h].mean()),
                     "first_wins": float((p1[:, h] > p2[:, h]).mean())}
                if both_held.any():
                    s["heldout_att_first"] = float(p1[both_held, h].mean())
                    s["heldout_att_second"] = float(p2[both_held, h].mean())
                stats.append(s)
            entry["eot_attention"][f] = stats
            if f != "left":
                continue
            T = tokens.shape[1]
            eot_rows = {t: a[rows, :, eot, :] for t, a in terms.items()}           # [N, H, T]
            shares = row_shares(eot_rows, np.arange(T)[None, :] <= eot[:, None])
            S = np.zeros((cfg.n_heads, n, 2))
            cnt = np.zeros((n, 2))
            noconst = sum(terms.values()) - terms["const"]
            for slot, (lab, idx) in enumerate(((first, i1), (second, i2))):
                np.add.at(S[:, :, slot].T, lab - 1, noconst[rows, :, eot, idx])
                np.add.at(cnt[:, slot], lab - 1, 1)
            heads = _heads_table(*head_class(S / cnt[None]))
            for h, head in enumerate(heads):
                head["terms"] = {t: {"std_ratio": float(shares[t][0][h]), "var_share": float(shares[t][1][h])}
                                 for t in terms}
            entry.update({"terms": list(terms), "heads": heads,
                          "mean_terms": {t: a.mean(axis=0).tolist() for t, a in terms.items()},
                          "mean_pattern": pattern.mean(axis=0).tolist()})
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# alignment of image-side and text-side label embeddings

def procrustes(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    # U [k, E], V [k, E] -> orthogonal R [E, E] minimising |U R - V|_F
    A, _, Bt = np.linalg.svd(U.T @ V)
    return A @ Bt


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def alignment_scores(U: np.ndarray, V: np.ndarray, seen, heldout) -> dict[str, float]:
    # U, V [n, E] label embeddings (row v-1 = label v), seen / heldout label lists -> metrics
    U, V = _unit(U), _unit(V)
    s, h = np.asarray(seen) - 1, np.asarray(heldout) - 1
    R = procrustes(U[s], V[s])
    cos = (U @ R) @ V.T                                      # [n, n] cos(u_v R, t_w)
    cos0 = U @ V.T
    off = ~np.eye(len(U), dtype=bool)[h]
    return {"fit_cos": float(np.diag(cos)[s].mean()), "heldout_cos": float(np.diag(cos)[h].mean()),
            "fit_cos_identity": float(np.diag(cos0)[s].mean()),
            "heldout_cos_identity": float(np.diag(cos0)[h].mean()),
            "heldout_cos_other": float(cos[h][off].mean()),
            "heldout_top1": float((cos[h].argmax(axis=1) == h).mean()),
            "heldout_top1_identity": float((cos0[h].argmax(axis=1) == h).mean())}


def analyze_alignment(params: dict, cfg, testbed) -> dict:
    """Procrustes alignment on seen (pair) labels, tested on held-out labels (module docstring)."""
    n, L = testbed.config.n_labels, testbed.config.image_len
    seen, held = testbed.pair_labels, testbed.heldout_labels
    img = model.encode_images(params, grid_images(n, L), cfg).reshape(n, L, -1).mean(axis=1)
    tokens, eot = testbed.tokenizer.encode_batch([single_caption(v) for v in range(1, n + 1)])
    txt = model.encode_texts(params, tokens, eot, cfg)
    out = {"seen_labels": list(seen), "heldout_labels": list(held),
           "features": alignment_scores(img, txt, seen, held)}
    vis_E = params["vision.W_E"][1:n + 1]
    txt_E = params["text.W_E"][FIRST_LABEL_ID:FIRST_LABEL_ID + n]
    out["embeddings"] = alignment_scores(vis_E, txt_E, seen, held)
    return out


# --------------------------------------------------------------------------------------------
# everything for one model

def _clean(x):
    """NaN/inf -> None, numpy scalars -> Python, recursively (JSON-safe)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def as_ablation(a, towers, heads) -> Ablation:
    return a if isinstance(a, Ablation) else parse_ablation(a, towers, heads)


def analyze(params: dict, run_cfg, ablations=DEFAULT_ABLATIONS, heads=None, tower: str = "vision",
            n_images: int = 512, testbed=None) -> dict:
    """Every measurement and ablation of one model -> JSON-serialisable dict.

    ablations: Ablation objects or strings ("EP,VP"); strings apply to `tower` ("vision",
    "text" or "both") and `heads` (None = all). The baseline is always evaluated first."""
    from minispatial.data import make_testbed

    if tower not in (*TOWERS, "both"):
        raise ValueError(f"tower={tower!r} is invalid: must be vision, text or both")
    towers = TOWERS if tower == "both" else (tower,)
    cfg = run_cfg.model
    testbed = make_testbed(run_cfg.data) if testbed is None else testbed
    abls = [as_ablation(a, towers, heads) for a in ablations]
    abls = [Ablation(towers=towers)] + [a for a in abls if not a.empty]
    for a in abls:
        a.check(cfg)
    p64, c64 = float64_model(params, cfg)
    result = {"model": dataclasses.asdict(cfg),
              "vision": analyze_vision(p64, c64, testbed, n_images),
              "text": analyze_text(p64, c64, testbed),
              "alignment": analyze_alignment(p64, c64, testbed),
              "ablations": []}
    for a in abls:
        metrics = evaluate_ablation(params, testbed, cfg, a)
        result["ablations"].append({"name": a.name, "terms": list(a.terms), "value_pos": a.value_pos,
                                    "towers": list(a.towers),
                                    "heads": None if a.heads is None else list(a.heads),
                                    "metrics": metrics})
    return _clean(result)


def analyze_checkpoint(path, ablations=DEFAULT_ABLATIONS, heads=None, tower: str = "vision",
                       n_images: int = 512) -> dict:
    """`analyze` on a checkpoint file (or run directory); adds "checkpoint" and "step"."""
    from minispatial.train import load_checkpoint

    run_cfg, params, _, step = load_checkpoint(path)
    return {"checkpoint": str(path), "step": step,
            **analyze(params, run_cfg, ablations, heads, tower, n_images)}


# --------------------------------------------------------------------------------------------
# many runs: mean ± std over checkpoints

CLS_STATS = ("slope", "right_left", "std_ratio", "var_share")     # per head and CLS-row term
SHAPE_FIELDS = ("n_heads", "vision_layers", "text_layers", "vision_ctx")


def check_same_shape(models: list[dict], names: list[str]) -> None:
    """ValueError unless the models (dataclasses.asdict of ModelConfig) agree on SHAPE_FIELDS."""
    for k in SHAPE_FIELDS:
        vals = [m[k] for m in models]
        if len(set(vals)) > 1:
            raise ValueError(f"cannot aggregate runs of different model shapes: model.{k} is "
                             + ", ".join(f"{v} in {n}" for v, n in zip(vals, names)))


def mean_std(values: list) -> dict:
    # per-run values (numbers, or equal-length lists; None = undefined) -> {"mean", "std", "n", "values"}
    """Mean and sample standard deviation (ddof=1) over the runs whose value is defined (not None
    or NaN; a list counts when all its entries are): n of them. std is NaN (null in the JSON)
    below two runs. `values` keeps every run's value, in run order."""
    a = np.array(values, dtype=F64)                          # [runs] or [runs, L]; None -> NaN
    a = a[np.isfinite(a).reshape(len(a), -1).all(axis=1)]
    nan = np.full(a.shape[1:], np.nan)
    return {"mean": (a.mean(axis=0) if len(a) else nan).tolist(),
            "std": (a.std(axis=0, ddof=1) if len(a) > 1 else nan).tolist(),
            "n": len(a), "values": list(values)}


def _over_heads(entry: dict, term: str, stat: str, reduce) -> float:
    # one run's vision layer entry -> reduce (np.mean, np.max) over heads of heads[h].terms[term][stat]
    return float(reduce(np.array([h["terms"][term][stat] for h in entry["heads"]], dtype=F64)))


def _n_relational(entry: dict) -> int:
    # one run's layer entry (either tower) -> how many of its heads are classed relational
    return sum(h["class"] == "relational" for h in entry["heads"])


def aggregate_reports(reports: list[dict]) -> dict:
    """Mean ± std (ddof=1) over runs of `analyze` reports of models of one shape (module
    docstring, "Many runs"): every ablation's metrics; per vision layer, for every CLS-row term,
    slope / right_left / std_ratio / var_share and the curve per head, and the per-run mean and max
    over heads of the four; the number of relational heads per tower and layer. JSON-serialisable.
    ValueError for no reports, different model shapes, or different lists of ablations."""
    if not reports:
        raise ValueError("aggregate_reports needs at least one report")
    names = [r.get("checkpoint", f"report {i}") for i, r in enumerate(reports)]
    check_same_shape([r["model"] for r in reports], names)
    keys = [[(a["name"], a["towers"], a["heads"]) for a in r["ablations"]] for r in reports]
    if any(k != keys[0] for k in keys):
        raise ValueError("cannot aggregate runs analysed with different ablations: "
                         + "; ".join(f"{n}: {[a[0] for a in k]}" for n, k in zip(names, keys)))
    agg = {"n_runs": len(reports),
           "runs": [{"checkpoint": n, "step": r.get("step")} for n, r in zip(names, reports)],
           "ablations": [], "vision": []}
    for i, first in enumerate(reports[0]["ablations"]):
        per_run = [r["ablations"][i]["metrics"] for r in reports]
        agg["ablations"].append({**{k: first[k] for k in ("name", "terms", "value_pos", "towers", "heads")},
                                 "metrics": {m: mean_std([run.get(m) for run in per_run])
                                             for m in first["metrics"]}})
    for l, first in enumerate(reports[0]["vision"]):
        per_run = [r["vision"][l] for r in reports]               # this layer, every run
        terms = first["terms"]
        heads = []
        for h in range(len(first["heads"])):
            stats = {t: {q: mean_std([e["heads"][h]["terms"][t][q] for e in per_run])
                         for q in (*CLS_STATS, "curve")} for t in terms}
            heads.append({"head": h, "terms": stats})
        agg["vision"].append({
            "layer": first["layer"], "terms": terms, "heads": heads,
            "head_mean": {t: {q: mean_std([_over_heads(e, t, q, np.mean) for e in per_run]) for q in CLS_STATS}
                          for t in terms},
            "head_max": {t: {q: mean_std([_over_heads(e, t, q, np.max) for e in per_run]) for q in CLS_STATS}
                         for t in terms},
            "n_relational": mean_std([_n_relational(e) for e in per_run])})
    agg["text"] = [{"layer": first["layer"],
                    "n_relational": mean_std([_n_relational(r["text"][l]) for r in reports])}
                   for l, first in enumerate(reports[0]["text"])]
    return _clean(agg)


# --------------------------------------------------------------------------------------------
# printing and plots

def _f(v, spec=".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(x) for h, x in zip(header, w)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.rjust(x) for c, x in zip(r, w)) for r in rows]
    return "\n".join(lines)


def format_report(res: dict) -> str:
    out = []
    if "checkpoint" in res:
        out.append(f"checkpoint {res['checkpoint']} (step {res['step']})")
    m = res["model"]
    out.append(f"model: D={m['d_model']} H={m['n_heads']} Dh={m['d_head']} vision_layers={m['vision_layers']} "
               f"text_layers={m['text_layers']} layernorm={m['layernorm']} mlp={m['mlp']}")
    for tower in TOWERS:
        for e in res[tower]:
            out.append(f"sum check {tower} layer {e['layer']}: max |sum of terms - hook_attn_scores| = "
                       f"{e['sum_max_abs_err']:.1e}")
    for e in res["vision"]:
        out.append(f"\nvision layer {e['layer']}: CLS-row terms. slope / right-left of the label-averaged "
                   f"curve over pixels; std_ratio, var_share over the pixel keys of {e['n_pair_images']} "
                   f"two-object images")
        rows = []
        for h in e["heads"]:
            for t in e["terms"]:
                s = h["terms"][t]
                rows.append([str(h["head"]), t, _f(s["slope"], "+.3f"), _f(s["right_left"], "+.3f"),
                             _f(s["std_ratio"]), _f(s["var_share"], "+.3f")])
        out.append(_table(["head", "term", "slope", "right-left", "std_ratio", "var_share"], rows))
    out.append("\nhead classes (pos_var: score variance across positions, label fixed; label_var: "
               "across labels, position fixed)")
    rows = []
    for tower in TOWERS:
        for e in res[tower]:
            for h in e["heads"]:
                rows.append([tower, str(e["layer"]), str(h["head"]), _f(h["pos_var"], ".4g"),
                             _f(h["label_var"], ".4g"), _f(h["pos_frac"]), h["class"]])
    out.append(_table(["tower", "layer", "head", "pos_var", "label_var", "pos_frac", "class"], rows))
    out.append("\ntext: EOT attention to the first- vs second-mentioned label (two-object captions)")
    rows = []
    for e in res["text"]:
        for form, stats in e["eot_attention"].items():
            for s in stats:
                rows.append([str(e["layer"]), form, str(s["head"]), _f(s["att_first"]), _f(s["att_second"]),
                             _f(s["first_wins"]), _f(s.get("heldout_att_first")),
                             _f(s.get("heldout_att_second"))])
    out.append(_table(["layer", "form", "head", "att_first", "att_second", "first_wins",
                       "held_first", "held_second"], rows))
    a = res["alignment"]
    out.append(f"\nalignment: orthogonal Procrustes fitted on seen labels {a['seen_labels']}, "
               f"tested on held-out {a['heldout_labels']}")
    keys = ["fit_cos", "heldout_cos", "heldout_cos_identity", "heldout_cos_other", "heldout_top1",
            "heldout_top1_identity"]
    out.append(_table(["source"] + keys, [[src] + [_f(a[src][k]) for k in keys]
                                          for src in ("features", "embeddings")]))
    out.append("\nablations (metrics recomputed with the terms removed before softmax; VP: value "
               "path without its position part)")
    cols = [k for k in KEY_METRICS if any(k in ab["metrics"] for ab in res["ablations"])]
    rows = [[ab["name"], ",".join(ab["towers"]), "all" if ab["heads"] is None else ",".join(map(str, ab["heads"]))]
            + [_f(ab["metrics"].get(k)) for k in cols] for ab in res["ablations"]]
    out.append(_table(["ablation", "towers", "heads"] + [k.replace("val_", "").replace("_pair", "")
                                                        for k in cols], rows))
    return "\n".join(out)


def _pm(stat: dict, spec: str = ".3f") -> str:
    # a mean_std dict -> "mean±std" ("-" when undefined; the mean alone below two runs)
    if stat["std"] is None:
        return _f(stat["mean"], spec)
    return f"{_f(stat['mean'], spec)}±{_f(stat['std'], spec.lstrip('+'))}"


def format_aggregate(agg: dict) -> str:
    """The aggregate_reports dict as text tables of mean±std over the runs."""
    out = [f"{agg['n_runs']} runs: mean±std over runs (sample std, ddof=1)",
           _table(["run", "checkpoint", "step"],
                  [[str(i), r["checkpoint"], str(r["step"])] for i, r in enumerate(agg["runs"])])]
    out.append("\nablations (metrics recomputed with the terms removed before softmax; VP: value "
               "path without its position part)")
    cols = [k for k in KEY_METRICS if any(k in ab["metrics"] for ab in agg["ablations"])]
    rows = [[ab["name"], ",".join(ab["towers"]), "all" if ab["heads"] is None else ",".join(map(str, ab["heads"]))]
            + [_pm(ab["metrics"][k]) if k in ab["metrics"] else "-" for k in cols] for ab in agg["ablations"]]
    out.append(_table(["ablation", "towers", "heads"] + [k.replace("val_", "").replace("_pair", "")
                                                        for k in cols], rows))
    specs = dict(zip(CLS_STATS, ("+.3f", "+.3f", ".3f", "+.3f")))
    for e in agg["vision"]:
        out.append(f"\nvision layer {e['layer']}: CLS-row terms per head, then the mean and the max over "
                   "the heads of each run (heads are not matched across runs)")
        rows = []
        for t in e["terms"]:
            per_head = [(str(h["head"]), h["terms"][t]) for h in e["heads"]]
            for label, stats in per_head + [("mean", e["head_mean"][t]), ("max", e["head_max"][t])]:
                rows.append([t, label] + [_pm(stats[q], specs[q]) for q in CLS_STATS])
        out.append(_table(["term", "head", "slope", "right-left", "std_ratio", "var_share"], rows))
    out.append("\nrelational heads per run (head classes as in a single report)")
    rows = [[tower, str(e["layer"]), _pm(e["n_relational"], ".2f"),
             " ".join(str(v) for v in e["n_relational"]["values"])]
            for tower in TOWERS for e in agg[tower]]
    out.append(_table(["tower", "layer", "relational", "per run"], rows))
    return "\n".join(out)


def _pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_plots(res: dict, out_dir) -> list[str]:
    """Heat maps (query x key) of every term per head and the CLS-row curves per term, as PNGs
    in out_dir; [] (and nothing written) when matplotlib is not importable."""
    plt = _pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for tower in TOWERS:
        for e in res[tower]:
            if "mean_terms" not in e:
                continue
            terms = e["terms"] + ["total"]
            maps = {t: np.asarray(e["mean_terms"][t]) for t in e["terms"]}
            maps["total"] = sum(maps.values())
            H = maps["total"].shape[0]
            fig, axes = plt.subplots(H, len(terms), figsize=(1.8 * len(terms), 1.8 * H), squeeze=False)
            for h in range(H):
                for i, t in enumerate(terms):
                    ax = axes[h, i]
                    m = maps[t][h]
                    lim = float(np.abs(m).max()) or 1.0
                    ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if h == 0:
                        ax.set_title(t, fontsize=8)
                    if i == 0:
                        ax.set_ylabel(f"head {h}", fontsize=8)
            fig.suptitle(f"{tower} layer {e['layer']}: mean score terms (query x key)", fontsize=9)
            path = out_dir / f"{tower}_layer{e['layer']}_terms.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(str(path))
    for e in res["vision"]:
        H = len(e["heads"])
        fig, axes = plt.subplots(1, H, figsize=(3.2 * H, 3.0), squeeze=False)
        for h, head in enumerate(e["heads"]):
            ax = axes[0, h]
            for t in e["terms"]:
                if t != "const":
                    ax.plot(head["terms"][t]["curve"], label=t, marker=".")
            ax.set_title(f"head {h} ({head['class']})", fontsize=8)
            ax.set_xlabel("key pixel")
        axes[0, 0].set_ylabel("CLS-row term (label-averaged)")
        axes[0, -1].legend(fontsize=7)
        path = out_dir / f"vision_layer{e['layer']}_cls_curves.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))
    return written


PLOT_METRICS = ("val_unseen_pair.lr_acc", "val_unseen_pair.labelset_acc", "val_seen_pair.lr_acc",
                "val_seen_pair.labelset_acc")


def save_aggregate_plots(agg: dict, out_dir, term: str = "EP") -> list[str]:
    """For an aggregate_reports dict, as PNGs in out_dir: per vision layer, the CLS-row curve of
    `term` per head (mean over runs, a ±std band, each run in grey), and a bar chart of the
    ablation table (mean, std as error bars). [] when matplotlib is not importable."""
    plt = _pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for e in agg["vision"]:
        H = len(e["heads"])
        fig, axes = plt.subplots(1, H, figsize=(3.2 * H, 3.0), squeeze=False, sharey=True)
        for h, head in enumerate(e["heads"]):
            ax, curve = axes[0, h], head["terms"][term]["curve"]
            mean, std = np.array(curve["mean"], dtype=F64), np.array(curve["std"], dtype=F64)
            x = np.arange(len(mean))
            for run in curve["values"]:
                ax.plot(x, run, color="0.7", lw=0.8)
            ax.fill_between(x, mean - np.nan_to_num(std), mean + np.nan_to_num(std), color="C0", alpha=0.25)
            ax.plot(x, mean, color="C0", marker=".")
            ax.set_title(f"head {h}: slope {_pm(head['terms'][term]['slope'], '+.3f')}", fontsize=8)
            ax.set_xlabel("key pixel")
        axes[0, 0].set_ylabel(f"CLS-row {term} (label-averaged)")
        fig.suptitle(f"vision layer {e['layer']}: {term} on the CLS row, mean ± std over "
                     f"{agg['n_runs']} runs (grey: each run)", fontsize=9, y=1.03)
        path = out_dir / f"vision_layer{e['layer']}_{term}_curve_runs.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))
    abls = agg["ablations"]
    metrics = [m for m in PLOT_METRICS if m in abls[0]["metrics"]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(abls), 3.2))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        mean = np.array([ab["metrics"][m]["mean"] for ab in abls], dtype=F64)
        std = np.array([ab["metrics"][m]["std"] for ab in abls], dtype=F64)
        ax.bar(np.arange(len(abls)) + (i - (len(metrics) - 1) / 2) * width, mean, width,
               yerr=np.nan_to_num(std), capsize=2, label=m.replace("val_", "").replace("_pair", ""))
    ax.axhline(0.5, color="0.5", ls="--", lw=0.8)                   # chance level of lr_acc
    ax.set_xticks(np.arange(len(abls)), [ab["name"] for ab in abls], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"ablations: mean ± std over {agg['n_runs']} runs (dashed: lr_acc chance)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path = out_dir / "ablations_runs.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(str(path))
    return written


# --------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minispatial analyze",
                                description="Attention-logit decomposition (EE, EP, PE, PP, BE, BP, ...), "
                                            "horizontal gradient, head classes, text EOT attention, "
                                            "alignment and inference-time ablations of a checkpoint; "
                                            "with several checkpoints, also mean ± std over them.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a checkpoint.npz, or a run directory holding one; several (e.g. a shell glob "
                        "SWEEP/runs/*) are each analysed and then aggregated")
    p.add_argument("--ablate", action="append", default=None, metavar="TERMS",
                   help="a set of terms to remove, comma-separated, e.g. EP or EP,VP (repeatable; "
                        f"terms {', '.join(ALL_TERMS)}; VP = value-path position part; POS = every term "
                        "with P). Default: baseline, EP, PE, PP, BP, EP+VP")
    p.add_argument("--heads", default=None, help="heads the ablations apply to, e.g. 0,1 (default all)")
    p.add_argument("--tower", default="vision", choices=["vision", "text", "both"],
                   help="tower the ablations apply to (default vision)")
    p.add_argument("--n-images", type=int, default=512,
                   help="two-object images for the CLS-row statistics (default 512)")
    p.add_argument("--json", action="store_true",
                   help="print the whole result as JSON (several checkpoints: "
                        "{\"runs\": [one report each], \"aggregate\": {...}})")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write that JSON to FILE")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="save PNGs in DIR (needs matplotlib): heat maps and CLS-row curves of one "
                        "checkpoint, or of several the EP curves and the ablation table over runs")
    return p


def load_checkpoints(paths: list[str]) -> list[tuple]:
    """load_checkpoint of every path, before any (slow) analysis starts. ValueError on a bad
    checkpoint, on one given twice (it would count twice in the mean) or on different shapes."""
    from minispatial.train import CHECKPOINT, load_checkpoint

    seen: dict[Path, str] = {}
    for p in paths:
        f = (Path(p) / CHECKPOINT if Path(p).is_dir() else Path(p)).resolve()
        if f in seen:
            raise ValueError(f"checkpoint {f} is given twice (as {seen[f]} and {p})")
        seen[f] = p
    loaded = [load_checkpoint(p) for p in paths]
    check_same_shape([dataclasses.asdict(run_cfg.model) for run_cfg, *_ in loaded], list(paths))
    return loaded


def main(argv: list[str] | None = None) -> int:
    """`minispatial analyze CHECKPOINT [CHECKPOINT ...]` -> 0, or 2 on a bad checkpoint or option."""
    args = build_parser().parse_args(argv)
    try:
        heads = None if args.heads is None else [int(h) for h in args.heads.split(",") if h.strip()]
        if args.n_images < 1:
            raise ValueError(f"--n-images={args.n_images} is invalid: must be >= 1")
        ablations = DEFAULT_ABLATIONS if args.ablate is None else args.ablate
        # every output path is checked before the (slow) analysis; created only to write into
        if args.out:
            check_output_file(args.out, "--out")
        if args.plots:
            check_output_dir(args.plots, "--plots")
        loaded = load_checkpoints(args.checkpoints)
        reports = []
        for i, (path, (run_cfg, params, _, step)) in enumerate(zip(args.checkpoints, loaded)):
            if len(loaded) > 1:
                print(f"analysing {i + 1}/{len(loaded)}: {path}", file=sys.stderr)
            reports.append({"checkpoint": str(path), "step": step,
                            **analyze(params, run_cfg, ablations, heads, args.tower, args.n_images)})
        agg = aggregate_reports(reports) if len(reports) > 1 else None
        doc = reports[0] if agg is None else {"runs": reports, "aggregate": agg}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        written = []
        if args.plots:
            written = save_plots(doc, args.plots) if agg is None else save_aggregate_plots(agg, args.plots)
            if not written:
                print("minispatial analyze: matplotlib is not importable; no plots written", file=sys.stderr)
    except (ValueError, OSError) as e:
        print(f"minispatial analyze: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_report(doc) if agg is None else format_aggregate(agg))
        for w in written + ([args.out] if args.out else []):
            print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
