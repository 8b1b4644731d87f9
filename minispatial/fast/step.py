"""The fast training step: `loss_and_grads`, the same loss and gradients as model.loss_and_grads
with less work.

Legend: B batch, T tokens of a tower (vision: 1 + L, the CLS row first; text: Tt), D d_model,
V vocabulary, V' rows of the token table A (V, + the CLS row for vision), E feature width.

Both towers start from the same input tables (`input_tables`): the residual stream's input is
    X[b, t] = A[r[b, t]] + P[t],   A = [s W_E ; class_embedding] [V', D],  P = W_pos[:T] [T, D]
(model.py: tok = W_E[ids] * s, the CLS row prepended, x = tok + W_pos[:T]; the CLS row is row V of
A, at t = 0 of every image). The feature reads one row of the last layer's output, the pooled
row p_b (0 for vision, eot[b] for text). Then, by the number of layers of the tower:

    1 layer    one_layer.py:  everything from the tables (rewrites 2 + 3)
    L layers   last_layer.py: layers 0..L-2 dense (model's ops with the numba attention core),
                              the last layer for the pooled row only (rewrite 1)

and both end as model.py does: [pooled @ W_proj], L2 norm (loss.py), the CLIP loss (loss.py).
Configs with LayerNorm or the MLP run model.loss_and_grads itself with the numba attention core
(ATTENTION_CORE): nothing of them is rewritten. products.py lists the matrix products.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minispatial import model, ops
from minispatial.fast import last_layer, loss, one_layer
from minispatial.fast.attention_core import ATTENTION_CORE


def supports(cfg) -> bool:
    """Does the fast step rewrite this config? (LayerNorm and the MLP are not rewritten:
    `loss_and_grads` runs the reference model with the numba attention core for them.)"""
    return not cfg.layernorm and not cfg.mlp


class Tables(NamedTuple):
    """One tower's input as tables and row indices: X[b, t] = A[r[b, t]] + P[t]."""
    A: np.ndarray           # [V', D] token table: s W_E, and class_embedding as row V for vision
    P: np.ndarray           # [T, D] position table W_pos[:T]
    r: np.ndarray           # [B, T] int64: the row of A of x[b, t]
    pool: np.ndarray        # [B] int64: p_b, the pooled row (0: CLS; eot[b])
    r_pool: np.ndarray      # [B] int64: r[b, p_b], the table row of the pooled row
    n_keys: np.ndarray      # [B] int64: keys the pooled row attends to (T; eot[b] + 1, causal)


def input_tables(params, tower: str, ids, pool_idx, s: float) -> Tables:
    # ids [B, L] (pixels, CLS prepended here) or [B, Tt] (tokens), pool_idx [B] -> Tables
    W_E = params[f"{tower}.W_E"]
    V = W_E.shape[0]
    B = ids.shape[0]
    A = W_E * s if s != 1.0 else W_E                                       # [V, D]
    r = ids.astype(np.int64)
    if tower == "vision":
        A = np.concatenate([A, params["vision.class_embedding"][None]], axis=0)   # [V+1, D]
        r = np.concatenate([np.full((B, 1), V, dtype=np.int64), r], axis=1)        # CLS = row V
    T = r.shape[1]
    if T > params[f"{tower}.W_pos"].shape[0]:
        raise ValueError(f"{tower} input has {T} positions but the model's context is "
                         f"{params[f'{tower}.W_pos'].shape[0]}")
    pool = np.ascontiguousarray(pool_idx, dtype=np.int64)
    n_keys = pool + 1 if tower == "text" else np.full(B, T, dtype=np.int64)   # causal: keys <= eot
    return Tables(A, params[f"{tower}.W_pos"][:T], r, pool, r[np.arange(B), pool], n_keys)


def table_grads(g: dict, params, tower: str, s: float, dA, dP) -> None:
    # dA [V', D], dP [T, D] -> g[W_E], g[class_embedding], g[W_pos]
    # inverts A = [s W_E ; class_embedding] and P = W_pos[:T]
    V = params[f"{tower}.W_E"].shape[0]
    g[f"{tower}.W_E"] = dA[:V] * s if s != 1.0 else np.ascontiguousarray(dA[:V])
    if tower == "vision":
        g["vision.class_embedding"] = dA[V].copy()
    dW_pos = np.zeros_like(params[f"{tower}.W_pos"])
    dW_pos[:dP.shape[0]] = dP
    g[f"{tower}.W_pos"] = dW_pos


def tower_forward(params, tower: str, ids, pool_idx, cfg):
    # ids [B, L] or [B, Tt], pool_idx [B] -> feat [B, E] (L2-normalised), cache
    #   replaces model.tower_forward (no hooks)
    s = model.embed_scale(cfg)
    tables = input_tables(params, tower, ids, pool_idx, s)
    n_layers = cfg.layers(tower)
    if n_layers == 1:
        pooled, saved = one_layer.forward(params, f"{tower}.blocks.0", tables)          # [B, D]
    else:
        pooled, saved = last_layer.forward(params, tower, n_layers, tables, ATTENTION_CORE)
    caches = {}
    if cfg.proj_dim:
        pooled, caches["proj"] = ops.linear_forward(pooled, params[f"{tower}.W_proj"])   # [B, E]
    feat, caches["l2"] = loss.l2norm_forward(pooled)
    return feat, (tower, s, n_layers, saved, caches)


def tower_backward(dfeat, cache, params, cfg) -> dict:
    # dfeat [B, E] -> grads {name: array} of this tower      replaces model.tower_backward
    tower, s, n_layers, saved, caches = cache
    g: dict[str, np.ndarray] = {}
    d = loss.l2norm_backward(dfeat, caches["l2"])                          # inverts feat = l2norm(pooled)
    if cfg.proj_dim:
        d, g[f"{tower}.W_proj"], _ = ops.linear_backward(d, caches["proj"])    # inverts pooled @ W_proj
    if n_layers == 1:
        dA, dP = one_layer.backward(d, saved, params, f"{tower}.blocks.0", g)
    else:
        dA, dP = last_layer.backward(d, saved, params, tower, n_layers, g)
    table_grads(g, params, tower, s, dA, dP)
    return g


def loss_and_grads(params, images, tokens, eot, cfg):
    # images [B, L], tokens [B, Tt], eot [B] -> (loss float, grads {name: array like params})
    """model.loss_and_grads computed with the rewrites (LayerNorm/MLP configs: with the numba
    attention core only)."""
    if not supports(cfg):
        return model.loss_and_grads(params, images, tokens, eot, cfg, core=ATTENTION_CORE)
    # shapes first: the kernels would read/write a wrong-shaped table out of bounds
    model.check_params({n: np.asarray(p) for n, p in params.items()}, cfg)   # (0-d scalars are fine)
    model.check_inputs(images, tokens, eot, cfg)
    # the kernels do no bounds checks: ids are checked against the tables they index
    ops.check_ids("images", images, params["vision.W_E"].shape[0])
    ops.check_ids("tokens", tokens, params["text.W_E"].shape[0])
    return model.two_tower_loss_and_grads(params, images, tokens, eot, cfg,
                                          tower_forward, tower_backward, loss.clip_loss)
