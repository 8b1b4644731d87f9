"""The rewrites of the fast path in plain NumPy (einsum): the readable version, which the kernels
are held to (tests/fast/test_reference.py: kernels == this at 1e-12 in float64, and this ==
model.loss_and_grads at 1e-10). Nothing here is fast; everything is written as the math reads.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, V' rows of the token table A, VT = V' + T
rows of [A ; P], U distinct pooled queries (u = qi[b] is sample b's), E feature width.
    tables        X[b, t] = A[r[b, t]] + P[t] (step.input_tables): A [V', D], P [T, D], r [B, T]
    X_u, q        the distinct pooled rows A[r_u] + P[p_u] [U, D] and their queries [U, H, Dh]
    Qt [H, U, D]  the query read back into the residual stream: Qt_u,h = W_K,h q_u,h
    bk_q [H, U]   b_K,h . q_u,h, the key bias's share of every score of query u
    S [H, U, VT]  S[h, u, i] = [A ; P]_i . Qt_u,h (+ bk_q on the position rows): the score of
                  key j of sample b is S[h, u, r[b, j]] + S[h, u, V' + j]
    Vtab [H, VT, Dh]  the V table [A ; P] W_V (+ b_V on the position rows)
    C [B, H*VT + U]   the binned pattern: C[b, h, v] = sum of pattern[b, h, j] over r[b, j] = v,
                      C[b, h, V' + j] = pattern[b, h, j], and a one-hot of qi[b]
    O [H*VT + U, D]   [Vtab_h W_O,h for each h ; X_u + b_O];   pooled = C @ O

Rewrite 1 (`pooled_row_forward/backward`): the last layer of a dense stream x [B, T, D] for the
pooled row only. Rewrites 2 + 3 (`table_forward/backward`): a one-layer tower from the tables.
`loss_and_grads` assembles them into the step, as step.py does with the kernels.
"""

from __future__ import annotations

import math

import numpy as np

from minispatial import model, ops
from minispatial.fast.step import input_tables, supports, table_grads


def softmax_masked(scores, n_keys):
    # scores [B, H, T], n_keys [B] -> pattern [B, H, T]: softmax over keys 0..n_keys[b]-1, 0 beyond
    mask = np.arange(scores.shape[2])[None, None, :] < n_keys[:, None, None]
    s = np.where(mask, scores, -np.inf)
    e = np.exp(s - s.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def softmax_backward(dpattern, pattern, Dh: int):
    # -> d scores (before the 1/sqrt(Dh) scale)
    return pattern * (dpattern - (dpattern * pattern).sum(axis=2, keepdims=True)) / math.sqrt(Dh)


def one_hot(idx, n: int, dtype):
    # idx [...] -> [..., n]
    return (np.asarray(idx)[..., None] == np.arange(n)).astype(dtype)


# --------------------------------------------------------------------------------------------
# rewrite 1: the pooled row of the last layer of a dense stream

def pooled_row_forward(x, p: dict, pool, n_keys):
    # x [B, T, D], p: the layer's attention weights, pool [B], n_keys [B] -> pooled [B, D], saved
    B = x.shape[0]
    Dh = p["W_Q"].shape[2]
    x_pool = x[np.arange(B), pool]                                         # [B, D]
    q = np.einsum("bd,hde->bhe", x_pool, p["W_Q"]) + p["b_Q"]              # the pooled row's query
    k = np.einsum("btd,hde->bthe", x, p["W_K"]) + p["b_K"]                 # every row's key, value
    v = np.einsum("btd,hde->bthe", x, p["W_V"]) + p["b_V"]
    pattern = softmax_masked(np.einsum("bhe,bthe->bht", q, k) / math.sqrt(Dh), n_keys)
    z = np.einsum("bht,bthe->bhe", pattern, v)
    pooled = x_pool + np.einsum("bhe,hed->bd", z, p["W_O"]) + p["b_O"]
    return pooled, dict(x=x, x_pool=x_pool, q=q, k=k, v=v, pattern=pattern, z=z)


def pooled_row_backward(dpool, saved, p: dict, pool):
    # dpool [B, D] -> dx [B, T, D], grads {W_Q, ..., b_O}
    x, x_pool, q, k, v, pattern, z = (saved[n] for n in ("x", "x_pool", "q", "k", "v", "pattern", "z"))
    B = x.shape[0]
    g = {"b_O": dpool.sum(axis=0), "W_O": np.einsum("bhe,bd->hed", z, dpool)}
    dz = np.einsum("bd,hed->bhe", dpool, p["W_O"])
    dv = np.einsum("bht,bhe->bthe", pattern, dz)
    ds = softmax_backward(np.einsum("bhe,bthe->bht", dz, v), pattern, q.shape[2])
    dq = np.einsum("bht,bthe->bhe", ds, k)
    dk = np.einsum("bht,bhe->bthe", ds, q)
    g["W_Q"], g["b_Q"] = np.einsum("bd,bhe->hde", x_pool, dq), dq.sum(axis=0)
    g["W_K"], g["b_K"] = np.einsum("btd,bthe->hde", x, dk), dk.sum(axis=(0, 1))
    g["W_V"], g["b_V"] = np.einsum("btd,bthe->hde", x, dv), dv.sum(axis=(0, 1))
    dx = np.einsum("bthe,hde->btd", dk, p["W_K"]) + np.einsum("bthe,hde->btd", dv, p["W_V"])
    dx[np.arange(B), pool] += np.einsum("bhe,hde->bd", dq, p["W_Q"]) + dpool
    return dx, g


# --------------------------------------------------------------------------------------------
# rewrites 2 + 3: a one-layer tower from the tables

def distinct_queries(r_pool, pool):
    # -> (r_u [U], p_u [U], qi [B]): the distinct (table row, position) pairs of the pooled rows,
    # in increasing order, and the pair of each sample
    pairs, qi = np.unique(np.stack([r_pool, pool], axis=1), axis=0, return_inverse=True)
    return pairs[:, 0], pairs[:, 1], qi.reshape(-1)


def table_forward(p: dict, tables):
    # p: the layer's attention weights, tables (step.Tables) -> pooled [B, D], saved
    A, P, r, n_keys = tables.A, tables.P, tables.r, tables.n_keys
    (Vp, D), (B, T), Dh = A.shape, r.shape, p["W_Q"].shape[2]
    AP = np.concatenate([A, P])                                            # [VT, D]
    on_pos = (np.arange(Vp + T) >= Vp).astype(A.dtype)                  # the position rows
    r_u, p_u, qi = distinct_queries(tables.r_pool, tables.pool)
    X_u = A[r_u] + P[p_u]                                                  # [U, D]
    q = np.einsum("ud,hde->uhe", X_u, p["W_Q"]) + p["b_Q"]                 # [U, H, Dh]
    Qt = np.einsum("hde,uhe->hud", p["W_K"], q)                            # [H, U, D]
    bk_q = np.einsum("he,uhe->hu", p["b_K"], q)                            # [H, U]
    S = np.einsum("id,hud->hui", AP, Qt) + bk_q[:, :, None] * on_pos       # [H, U, VT]
    # the scores of sample b: S[h, qi[b], r[b, j]] + S[h, qi[b], V' + j]
    Su = S[:, qi].transpose(1, 0, 2)                                       # [B, H, VT]
    scores = np.take_along_axis(Su, r[:, None, :], axis=2) + Su[:, :, Vp:]
    pattern = softmax_masked(scores / math.sqrt(Dh), n_keys)               # [B, H, T]
    R = one_hot(r, Vp, A.dtype)                                            # [B, T, V']
    C = np.concatenate([np.einsum("bhj,bjv->bhv", pattern, R), pattern], axis=2).reshape(B, -1)
    C = np.concatenate([C, one_hot(qi, len(r_u), A.dtype)], axis=1)       # [B, H*VT + U]
    Vtab = np.einsum("id,hde->hie", AP, p["W_V"]) + p["b_V"][:, None, :] * on_pos[:, None]
    O = np.concatenate([np.einsum("hie,hed->hid", Vtab, p["W_O"]).reshape(-1, D), X_u + p["b_O"]])
    saved = dict(tables=tables, AP=AP, r_u=r_u, p_u=p_u, qi=qi, X_u=X_u, q=q, Qt=Qt, bk_q=bk_q,
                 S=S, pattern=pattern, R=R, C=C, Vtab=Vtab, O=O)
    return C @ O, saved


def table_backward(dpool, saved, p: dict):
    # dpool [B, D] -> dA [V', D], dP [T, D], grads {W_Q, ..., b_O}
    AP, r_u, p_u, qi, X_u, q, Qt, pattern, R, C, Vtab, O = (saved[n] for n in (
        "AP", "r_u", "p_u", "qi", "X_u", "q", "Qt", "pattern", "R", "C", "Vtab", "O"))
    B, H, T = pattern.shape
    VT, Vp, U = AP.shape[0], R.shape[2], len(r_u)
    dC = (dpool @ O.T)[:, :H * VT].reshape(B, H, VT)                       # pooled = C @ O
    dO = C.T @ dpool
    dOh, dX_u = dO[:H * VT].reshape(H, VT, -1), dO[H * VT:]
    g = {"b_O": dX_u.sum(axis=0), "W_O": np.einsum("hie,hid->hed", Vtab, dOh)}
    dVtab = np.einsum("hid,hed->hie", dOh, p["W_O"])                       # O_h = Vtab_h W_O,h
    g["W_V"], g["b_V"] = np.einsum("id,hie->hde", AP, dVtab), dVtab[:, Vp:].sum(axis=1)
    dAP = np.einsum("hie,hde->id", dVtab, p["W_V"])
    # C: the binned pattern and the pattern itself
    dpattern = np.einsum("bhv,bjv->bhj", dC[:, :, :Vp], R) + dC[:, :, Vp:]
    ds = softmax_backward(dpattern, pattern, q.shape[2])                   # d scores [B, H, T]
    # scores = S[qi, r] + S[qi, V' + j]: each sample's score gradients go to its query's row
    Qb = one_hot(qi, U, AP.dtype)                                          # [B, U]
    dS = np.concatenate([np.einsum("bhj,bjv,bu->huv", ds, R, Qb), np.einsum("bhj,bu->huj", ds, Qb)], axis=2)
    dAP += np.einsum("hui,hud->id", dS, Qt)                                # S = AP Qt (+ bk_q)
    dQt, dbk_q = np.einsum("hui,id->hud", dS, AP), dS[:, :, Vp:].sum(axis=2)
    g["W_K"], g["b_K"] = np.einsum("hud,uhe->hde", dQt, q), np.einsum("hu,uhe->he", dbk_q, q)
    dq = np.einsum("hud,hde->uhe", dQt, p["W_K"]) + np.einsum("hu,he->uhe", dbk_q, p["b_K"])
    g["W_Q"], g["b_Q"] = np.einsum("ud,uhe->hde", X_u, dq), dq.sum(axis=0)
    dX_u = dX_u + np.einsum("uhe,hde->ud", dq, p["W_Q"])                  # q = X_u W_Q + b_Q
    np.add.at(dAP, r_u, dX_u)                                              # X_u = A[r_u] + P[p_u]
    np.add.at(dAP, Vp + p_u, dX_u)
    return dAP[:Vp], dAP[Vp:], g


# --------------------------------------------------------------------------------------------
# the step

def tower_forward(params, tower: str, ids, pool_idx, cfg):
    # ids [B, L] or [B, Tt], pool_idx [B] -> feat [B, E], cache    (model.tower_forward, no hooks)
    s = model.embed_scale(cfg)
    tables = input_tables(params, tower, ids, pool_idx, s)
    n_layers = cfg.layers(tower)
    last = model.attn_params(params, f"{tower}.blocks.{n_layers - 1}")
    if n_layers == 1:
        pooled, saved = table_forward(last, tables)
    else:
        x = tables.A[tables.r] + tables.P                                  # the dense layers first
        saved = {"layers": []}
        for l in range(n_layers - 1):
            a, ac = ops.attention_forward(x, model.attn_params(params, f"{tower}.blocks.{l}"), tower == "text")
            saved["layers"].append(ac)
            x = x + a
        pooled, saved["last"] = pooled_row_forward(x, last, tables.pool, tables.n_keys)
    proj = None
    if cfg.proj_dim:
        pooled, proj = ops.linear_forward(pooled, params[f"{tower}.W_proj"])
    feat, l2 = ops.l2norm_forward(pooled)
    return feat, (tower, s, tables, saved, proj, l2)


def tower_backward(dfeat, cache, params, cfg) -> dict:
    # dfeat [B, E] -> grads {name: array} of this tower
    tower, s, tables, saved, proj, l2 = cache
    g = {}
    d = ops.l2norm_backward(dfeat, l2)
    if cfg.proj_dim:
        d, g[f"{tower}.W_proj"], _ = ops.linear_backward(d, proj)
    n_layers = cfg.layers(tower)
    blocks = [f"{tower}.blocks.{l}" for l in range(n_layers)]
    last = model.attn_params(params, blocks[-1])
    if n_layers == 1:
        dA, dP, ga = table_backward(d, saved, last)
    else:
        dx, ga = pooled_row_backward(d, saved["last"], last, tables.pool)
        for l in reversed(range(n_layers - 1)):
            dh, gl = ops.attention_backward(dx, saved["layers"][l], model.attn_params(params, blocks[l]))
            g.update({f"{blocks[l]}.attn.{n}": gv for n, gv in gl.items()})
            dx = dx + dh
        dA = ops.scatter_add_rows(tables.r.reshape(-1), dx.reshape(-1, dx.shape[2]), tables.A.shape[0])
        dP = dx.sum(axis=0)
    g.update({f"{blocks[-1]}.attn.{n}": gv for n, gv in ga.items()})
    table_grads(g, params, tower, s, dA, dP)
    return g


def loss_and_grads(params, images, tokens, eot, cfg):
    # images [B, L], tokens [B, Tt], eot [B] -> (loss, grads): model.loss_and_grads, by the rewrites
    if not supports(cfg):
        raise ValueError("fast.reference: the rewrites do not cover LayerNorm or the MLP")
    model.check_inputs(images, tokens, eot, cfg)
    return model.two_tower_loss_and_grads(params, images, tokens, eot, cfg, tower_forward, tower_backward)
