"""A one-layer tower's pooled row from tables (rewrites 2 + 3): forward and backward.

Legend (every shape comment): B batch, T tokens, D d_model, H heads, Dh d_head, HD = H*Dh,
V' rows of the token table A (vocabulary, + the CLS row for vision), VT = V' + T rows of the
stacked tables AP = [A ; P], U distinct pooled queries, u = qi[b] the query of sample b.
    r [B, T]      row of A of x[b, t]  (X[b, t] = A[r[b, t]] + P[t], step.input_tables)
    X_u [U, D]    query u's row of the residual stream, A[r_u] + P[p_u]
    q [U, HD]     its query X_u W_Q + b_Q;  bk_q [H, U] = b_K,h . q_u,h
    Qt [H, U, D]  the query read back into the residual stream, Qt_u,h = W_K,h q_u,h
    S [H, U, VT]  scores of query u against the table rows, S[h, u, i] = AP_i . Qt_u,h (+ bk_q
                  on the position rows); the score of key j of sample b is S[u, r[b, j]] + S[u, V' + j]
    Vtab [H, VT, Dh]  the V table AP W_V (+ b_V on the position rows)
    C [B, H*VT + U]   the binned pattern;  O [H*VT + U, D] the output table;  pooled = C @ O

The layer is the tower's only layer, so it is also its last: the feature needs the pooled row
only (rewrite 1, see last_layer.py), whose attention this module computes from tables:

2. Tables. Projections are linear, so every value (and key) is the sum of a token-table row and a
   position-table row: X W_V + b_V = (A W_V)[r] + (P W_V + b_V), the V table Vtab = AP W_V (+ b_V).
3. Everything of the pooled row from the tables:
   - the pooled row's query depends only on its (table row, position): one CLS query for every
     image, one EOT query per EOT position for the captions; each of the U distinct queries is
     computed once (`kernels.distinct_pairs`, `kernels.query_kernel`);
   - keys through the query: q_u,h . k_h = (A[r] + P[j]) . Qt_u,h + bk_q[h, u], so S comes out
     of the same GEMM as the V table, [Vtab | S^T] = AP @ [W_V | Qt], and a score is two lookups
     (no key table, no Dh-long dot product per key);
   - the softmax's exp factorises the same way: exp(score - shift) = ES[u, r[b, j]] ES[u, V' + j]
     with ES = exp(S / sqrt(Dh) - max), the max over the token rows and over the position rows
     separately (`kernels.exp_tables_kernel`); a row whose products underflow is recomputed
     with its own max, as the reference computes every row;
   - z_b,h = sum_j pattern[b, h, j] (Vtab[r[b, j]] + Vtab[V' + j]) = C[b, h] @ Vtab_h, where C
     bins the pattern by table row and keeps it per position (`kernels.table_pattern_kernel`);
     so W_O applies to the V tables, O_h = Vtab_h W_O,h, and with the residual row and b_O as U
     more rows (X_u + b_O, picked by a one-hot of qi in C), pooled = C @ O: one GEMM per batch.
   Backward: dC = dpool O^T and dO = C^T dpool, then table-sized products only; the kernels
   invert theirs (dS sums each sample's score gradients into its query's row).
products.py lists every matrix product (`one_layer_products`); reference.py writes the same
sums in plain NumPy (`table_forward`, `table_backward`).
"""

from __future__ import annotations

import math

import numpy as np

from minispatial import model
from minispatial.fast import kernels
from minispatial.fast.kernels import SAFE_SUM


def table_attention_forward(S, qi, r, n_keys, Dh: int):
    # S [H, U, VT], qi [B], r [B, T], n_keys [B] -> pattern [B, H, T], C [B, H*VT + U]
    H, U, VT = S.shape
    B, T = r.shape
    S = np.ascontiguousarray(S)
    scale = S.dtype.type(1.0 / math.sqrt(Dh))      # as the reference: python scale in the dtype
    ES = np.empty_like(S)
    kernels.exp_tables_kernel(S, VT - T, scale, ES)
    pattern = np.empty((B, H, T), dtype=S.dtype)
    C = np.empty((B, H * VT + U), dtype=S.dtype)
    kernels.table_pattern_kernel(ES, S, qi, r, n_keys, scale, SAFE_SUM[S.dtype], pattern, C)
    return pattern, C


def table_attention_backward(dC, pattern, qi, r, n_keys, U: int, Dh: int):
    # dC [B, H*VT] (the pattern part of C's gradient) -> dS [H, U, VT]
    H = pattern.shape[1]
    scale = dC.dtype.type(1.0 / math.sqrt(Dh))
    dS = np.zeros((H, U, dC.shape[1] // H), dtype=dC.dtype)
    kernels.table_attention_backward_kernel(np.ascontiguousarray(dC), pattern, qi, r, n_keys, scale, dS)
    return dS


def forward(params, block: str, tables):
    # tables (step.Tables) -> pooled [B, D] (the pooled row of the block's output), saved
    #   replaces, for the pooled row, model.py's ops.attention_forward and residual add
    p = model.attn_params(params, block)
    A, P, r = tables.A, tables.P, tables.r
    H, _, Dh = p["W_Q"].shape                      # from the weights: shapes are never guessed
    HD = H * Dh
    B, T = r.shape
    Vp, D = A.shape
    VT = Vp + T
    AP = np.concatenate([A, P])                                            # [VT, D]: the table rows
    # the distinct pooled queries: u = 0..U-1, sample b uses u = qi[b]
    r_u, p_u, qi = kernels.distinct_pairs(tables.r_pool, tables.pool, T)   # [U], [U], [B]
    U = r_u.shape[0]
    X_u, q = np.empty((U, D), dtype=AP.dtype), np.empty((U, HD), dtype=AP.dtype)
    bk_q = np.empty((H, U), dtype=AP.dtype)
    kernels.query_kernel(AP, r_u, p_u, Vp, p["W_Q"], p["b_Q"], p["b_K"], X_u, q, bk_q)
    # keys through the query, and the V table: [Vtab | S^T] = AP @ [W_V | Qt], with
    # Qt [D, H*U] (column (h, u) = W_K,h q_u,h)
    WV_Qt = np.empty((D, HD + H * U), dtype=AP.dtype)                      # [W_V | Qt]
    kernels.pack_weight_kernel(p["W_V"], WV_Qt[:, :HD])
    np.matmul(p["W_K"], q.reshape(U, H, Dh).transpose(1, 2, 0),
              out=WV_Qt[:, HD:].reshape(D, H, U).transpose(1, 0, 2))       # [H, D, U]
    Vtab_St = AP @ WV_Qt                                                   # [VT, HD + H*U]
    Vtab_St[Vp:, :HD] += p["b_V"].reshape(-1)                              # v = x W_V + b_V
    # S: bk_q on the position rows (it shifts all keys of a query alike, so the softmax cancels
    # it; added so that S holds the model's scores, tests/fast/test_one_layer.py)
    S = np.ascontiguousarray(Vtab_St[:, HD:].T).reshape(H, U, VT)
    S[:, :, Vp:] += bk_q[:, :, None]
    pattern, C = table_attention_forward(S, qi, r, tables.n_keys, Dh)     # [B, H, T], [B, H*VT + U]
    # pooled_b = x[b, p_b] + sum_h z_b,h W_O,h + b_O = C[b] @ O, O stacked in rows:
    #   O_h = Vtab_h W_O,h  [H*VT, D];   X_u + b_O  [U, D]
    Vtab = Vtab_St[:, :HD].reshape(VT, H, Dh).transpose(1, 0, 2)           # [H, VT, Dh] (a view)
    HV = H * VT
    O = np.empty((HV + U, D), dtype=AP.dtype)
    np.matmul(Vtab, p["W_O"], out=O[:HV].reshape(H, VT, D))
    np.add(X_u, p["b_O"], out=O[HV:])
    pooled = C @ O                                                         # [B, D]
    saved = dict(tables=tables, AP=AP, WV_Qt=WV_Qt, X_u=X_u, q=q, qi=qi, r_u=r_u, p_u=p_u, S=S,
                 Vtab=Vtab, pattern=pattern, C=C, O=O)
    return pooled, saved


def backward(dpool, saved, params, block: str, g: dict):
    # dpool [B, D] -> (dA [V', D], dP [T, D]); the block's gradients go into g
    p = model.attn_params(params, block)
    tables = saved["tables"]
    AP, WV_Qt, X_u, q, Vtab, C, O = (saved[k] for k in ("AP", "WV_Qt", "X_u", "q", "Vtab", "C", "O"))
    r_u, p_u, U = saved["r_u"], saved["p_u"], q.shape[0]
    H, _, Dh = p["W_Q"].shape
    HD = H * Dh
    Vp, D = tables.A.shape
    VT = AP.shape[0]
    HV, HU = H * VT, H * U
    a = f"{block}.attn."
    # inverts pooled = C @ O: dC of the pattern part (the one-hot part needs none) and dO
    dC = dpool @ O[:HV].T                                                  # [B, H*VT]
    dO = C.T @ dpool                                                       # [H*VT + U, D]
    dX_u = dO[HV:].copy()                                                  # [U, D] = d (X_u + b_O)
    g[a + "b_O"] = dX_u.sum(axis=0)
    # inverts O_h = Vtab_h W_O,h
    dO = dO[:HV].reshape(H, VT, D)
    g[a + "W_O"] = np.matmul(Vtab.transpose(0, 2, 1), dO)                 # [H, Dh, D]
    dVtab_St = np.empty((VT, HD + HU), dtype=AP.dtype)                     # [d Vtab | d S^T]
    dVtab = dVtab_St[:, :HD]                                               # [VT, HD]
    np.matmul(dO, p["W_O"].transpose(0, 2, 1), out=dVtab.reshape(VT, H, Dh).transpose(1, 0, 2))
    # inverts Vtab = AP W_V (+ b_V on the position rows)
    g[a + "W_V"] = np.matmul(AP.T, dVtab.reshape(VT, H, Dh).transpose(1, 0, 2))   # [H, D, Dh]
    g[a + "b_V"] = dVtab[Vp:].sum(axis=0).reshape(H, Dh)
    # inverts pattern, C = softmax of the table scores (kernel)
    dS = table_attention_backward(dC, saved["pattern"], saved["qi"], tables.r, tables.n_keys, U, Dh)
    dVtab_St[:, HD:] = dS.reshape(HU, VT).T
    # inverts S = AP Qt (+ bk_q on the position rows), Qt_h = W_K,h q_h:
    #   dQt = dS AP, dW_K,h = dQt_h^T q_h, dq_h = dQt_h W_K,h (+ bk_q's share)
    dQt = dS.reshape(HU, VT) @ AP                                          # [H*U, D]
    dq = np.empty_like(q)                                                  # [U, HD]
    np.matmul(dQt.reshape(H, U, D), p["W_K"], out=dq.reshape(U, H, Dh).transpose(1, 0, 2))
    g[a + "W_K"] = np.empty_like(p["W_K"])                                 # [H, D, Dh]
    g[a + "b_K"] = np.empty_like(p["b_K"])                                 # [H, Dh]
    dbk_q = dVtab_St[Vp:, HD:].sum(axis=0).reshape(H, U)                   # [H, U]
    kernels.keys_backward_kernel(dQt.reshape(H, U, D), dbk_q, q, p["b_K"], g[a + "W_K"], g[a + "b_K"], dq)
    # d AP^T = W_V dVtab^T + Qt dS (the V table's and the scores' share) in one GEMM
    dAPT = WV_Qt @ dVtab_St.T                                              # [D, VT]
    # inverts q = X_u W_Q + b_Q: dW_Q, db_Q, and dX_u gets the query's share
    g[a + "W_Q"] = np.empty_like(p["W_Q"])                                 # [H, D, Dh]
    kernels.query_backward_kernel(dq, X_u, p["W_Q"], g[a + "W_Q"], dX_u)
    g[a + "b_Q"] = dq.sum(axis=0).reshape(H, Dh)
    dAP = dAPT.T                                                           # [VT, D] (a view)
    # inverts X_u = AP[r_u] + AP[V' + p_u] (the pooled rows: residual and query)
    kernels.add_rows(dAP, r_u, dX_u)
    kernels.add_rows(dAP, Vp + p_u, dX_u)
    return dAP[:Vp], dAP[Vp:]                                              # dA [V', D], dP [T, D]
