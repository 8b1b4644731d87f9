"""The attention-logit decomposition: a layer's scores as a sum of named token/position terms.

Layer l of a tower reads the residual stream x (its `hook_resid_pre`) and, per head, scores

    scores = (h W_Q + b_Q)(h W_K + b_K)ᵀ / sqrt(Dh)        h = x, or ln1(x) with LayerNorm

(the model's `hook_attn_scores`; in the causal text tower the masked keys are -inf there, while
the terms below are defined, and finite, at every query and key). We split x into parts:

    E  the token part: `hook_embed` (W_E[ids] times the embed scale; on the vision CLS row the
       class_embedding), carried to layer l unchanged by the skip connections;
    P  the position part: `hook_pos_embed` (W_pos[:T] over the batch), carried likewise;
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
scores (to ~1e-15 in float64; `sum_error` measures it on the entries the model uses, i.e. not
on causally masked keys). Measurements run a float64 copy of the model (`float64_model`), so the
check holds for float32 checkpoints too.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from minispatial import model

F64 = np.float64
PARTS = ("E", "P", "R")
TOWERS = ("vision", "text")


def term_names(parts=("E", "P")) -> list[str]:
    """Names of the score terms for residual parts `parts` (("E", "P") at layer 0)."""
    return [a + c for a in parts for c in parts] + ["B" + c for c in parts] + ["const"]


ALL_TERMS = tuple(term_names(PARTS))
POS_TERMS = tuple(t for t in ALL_TERMS if "P" in t)       # every score term with a position part


def layer_parts(params: dict, cfg, tower: str, layer: int, record: dict):
    # record of a forward pass -> ({"E", "P"[, "R"]: [B, T, D] float64}, ln bias [D] or None)
    """The parts of the residual stream as they enter W_Q/W_K/W_V of `layer` (module docstring)."""
    E = np.asarray(record[f"{tower}.hook_embed"], dtype=F64)                       # [B, T, D]
    P = np.asarray(record[f"{tower}.hook_pos_embed"], dtype=F64)                   # [B, T, D]
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
    """The reference (NumPy) forward of one tower, recording every hook point."""
    record: dict[str, np.ndarray] = {}
    if tower == "vision":
        feats = model.encode_images(params, ids, cfg, hooks=hooks, record=record)
    else:
        feats = model.encode_texts(params, ids, eot, cfg, hooks=hooks, record=record)
    return feats, record


def decompose(params: dict, cfg, tower: str, layer: int, ids, eot=None):
    # -> (terms {name: [B, H, Tq, Tk]}, scores [B, H, Tq, Tk], pattern [B, H, Tq, Tk], record)
    """Run `tower` on a batch (in the model's dtype; pass float64_model(...) for exactness) and
    split the scores of `layer` into terms. `scores` is the model's hook_attn_scores (-inf at
    causally masked keys). ValueError for a layer the tower does not have."""
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


def sum_error(terms: dict, scores: np.ndarray) -> float:
    # terms {name: [B, H, Tq, Tk]}, scores [B, H, Tq, Tk] -> max |sum of terms - scores|
    """How far the terms are from summing to the model's scores, over the entries the model uses
    (masked keys, -inf in the scores, are left out)."""
    used = np.isfinite(scores)
    return float(np.abs(sum(terms.values()) - scores)[used].max())
