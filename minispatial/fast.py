"""The fast training step: the same loss and gradients as `model.loss_and_grads`, less work.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, HD = H*Dh, V vocabulary,
V' = rows of the token table A (V, plus the CLS row for vision), E feature width.

`model.loss_and_grads` calls `loss_and_grads_fast` when the backend is "numba" and `supports(cfg)`
(no LayerNorm, no MLP; any number of layers, proj_dim and embed_scale). Everything else (and the
hooks of `run_with_cache`) stays on the reference path in model.py / ops.py, which is what this
file is tested against (tests/test_fast.py: 1e-10 in float64, 1e-4 in float32).

Exact rewrites, all "the same sums in another order":

1. Pooled row only, in the LAST layer of a tower. The feature reads one row of the residual
   stream, x[b, p_b] (p_b = 0, the CLS row, for vision; p_b = eot[b] for text), so the last
   layer needs k and v of every row but q, the attention pattern, z, the output projection and
   the residual add of that one row only:
        q_b = x[b, p_b] W_Q + b_Q                              [B, HD]     (not [B, T, HD])
        pattern[b, h, :] = softmax(q_b,h . k[b, :, h] / sqrt(Dh))  over keys 0..n_b-1
                            (n_b = T for vision; eot[b] + 1 for text: the causal mask of row eot)
        pooled_b = x[b, p_b] + z_b W_O + b_O                   [B, D]
   Backward: only that row's gradient flows into W_O, W_Q, and the softmax; k and v get
   gradients on every row the pooled query attends to.

2. Tables (when a tower has ONE layer, so layer 0 is also the last layer). The input is
   X[b, t] = A[r[b, t]] + P[t] with A = [s W_E ; class_embedding] (the CLS row is row V of A,
   used at t = 0 by every image) and P = W_pos[:T]. Projections are linear, so
        X W_V + b_V = (A W_V)[r] + (P W_V + b_V):  the V table Vtab = [A ; P] W_V (+ b_V), tiny
   Every value (and key) is the sum of a token-table row and a position-table row.

3. Everything of the pooled row from the tables (one layer, on top of 2 and 1):
   - the pooled row's query depends only on its (table row, position): the same CLS query for
     every image, one EOT query per EOT position for the captions. Each of the U distinct
     queries q_u = X_u W_Q + b_Q, X_u = A[r_u] + P[p_u], is computed once (`distinct_pairs`;
     sample b uses u = qi[b]; `_query_kernel`): no query of the other table rows;
   - keys through the query: a score is q_u,h . k_h = q_u,h . ((A[r] + P[j]) W_K,h + b_K,h)
     = A[r] . Qt_u,h + P[j] . Qt_u,h + c[h, u], with Qt_u,h = W_K,h q_u,h [D] (the query read
     back into the residual stream: TransformerLens's QK circuit W_Q W_K^T from the query side)
     and c = b_K,h . q_u,h. So S[h, u, i] = AP_i . Qt_u,h (+ c on the position rows) and a
     score is S[h, u, r[b, j]] + S[h, u, V' + j]: lookups, no key table and no d_head-long
     dot product per key. S comes out of the same GEMM as the V table:
        [Vtab | S^T] = [A ; P] @ [W_V | Qt]        [V'+T, HD + H*U]
   - the softmax's exp factorises the same way: exp(score - shift) = ES[u, r[b, j]] * ES[u, V' + j]
     with ES = exp(S / sqrt(Dh) - max), the max taken over the token rows and over the position
     rows separately (`_exp_tables_kernel`), so there is no exp per key either; a row whose
     products underflow (its keys all far below the tables' maxima) is recomputed with its own
     max, as the reference computes every row;
   - z_b,h = sum_j pattern[b, h, j] (VA[r[b, j]] + VP[j]) = C[b, h] @ [VA ; VP]_h, where C bins
     the pattern by table row (and keeps it per position); so the output projection applies to
     the V tables, O_h = [VA ; VP]_h W_O,h, and with the residual row and bias as U more rows,
        pooled = C @ O,   C [B, H*(V'+T) + U] (one-hot of qi in the last U columns),
                          O [H*(V'+T) + U, D] (last rows X_u = A[r_u] + P[p_u] + b_O)
     one GEMM per batch; backward dC = dpool O^T, dO = C^T dpool (which also sums dpool per
     query for the residual and b_O), then only table-sized products.
   Backward of the kernels: dS sums each sample's score gradients into its query's row; then
   dQt = dS [A ; P], dW_K,h = dQt_h^T q_h and dq_h = dQt_h W_K,h (`_keys_backward_kernel` adds
   c's share and gives db_K), d[A ; P]^T = [W_V | Qt] [dVtab | dS^T]^T in one GEMM, and dW_Q and
   the query's share of d X_u come from dq (`_query_backward_kernel`).

With more than one layer, layers 0..L-2 run the reference ops (numba attention core) and only
the last layer uses rewrite 1 on the dense residual stream.

The loss and the L2 norm of the features come from fastloss.py (`clip_loss_fast`: the CLIP loss
and its gradients in fewer passes over [B, B]).

Numba kernels: `cache=True`, `error_model="numpy"` (IEEE division, so loops vectorise), no
fastmath, serial (see the note above the kernels); the softmax of a row is kernels.softmax_row,
shared with the reference path's attention kernel. Arithmetic stays in the input dtype, except
that fastloss.py sums dtau in float64. With NUMBA_DISABLE_JIT=1 the same loops run as Python.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from minispatial import model, ops
from minispatial.kernels import softmax_row
from minispatial.fastloss import SAFE_SUM, _dot8, clip_loss_fast, l2norm_backward, l2norm_forward


def supports(cfg) -> bool:
    """Can `loss_and_grads_fast` compute this config? (LayerNorm and the MLP are not fused.)"""
    return not cfg.layernorm and not cfg.mlp


# --------------------------------------------------------------------------------------------
# kernels

# The kernels are serial. Each call does well under a millisecond of work, and on this project's
# 2-core machines, shared with other processes, a parallel launch can cost more than that: numba's
# default OpenMP layer took ~10 ms per `prange` launch while another process kept the cores busy
# (benchmarks/README.md). Most loops over the batch write only rows b of their outputs, so they
# could become a `prange` without changing any sum; the exception, the backward kernel of
# rewrite 3, adds into the shared rows of dS in order.


@numba.njit(cache=True, error_model="numpy")
def _exp_tables_kernel(S, Vp, scale, ES):
    # S [H, U, V'+T] (q_u . [KA ; KP] rows) -> fills ES [H, U, V'+T] with the two factors of the
    # softmax's exp: exp(scale S - max) taken separately over the token rows (< V') and over the
    # position rows (>= V'), so that exp(score - shift) = ES[h, u, r[b, j]] * ES[h, u, V' + j]
    H, U, VT = S.shape
    for h in range(H):
        for u in range(U):
            row = S[h, u]
            for lo, hi in ((0, Vp), (Vp, VT)):
                m = row[lo]
                for i in range(lo, hi):
                    m = max(m, row[i])
                for i in range(lo, hi):
                    ES[h, u, i] = np.exp((row[i] - m) * scale)


@numba.njit(cache=True, error_model="numpy")
def _query_kernel(AP, r_u, p_u, Vp, W_Q, b_Q, b_K, X, q, c):
    # AP [V'+T, D] (table rows), r_u, p_u [U], W_Q [H, D, Dh], b_Q, b_K [H, Dh] -> fills the pooled
    # rows X [U, D] = AP[r_u] + AP[V' + p_u], their queries q [U, HD] = X W_Q + b_Q and
    # c [H, U] = b_K,h . q_u,h (the key bias's share of every score of query u)
    U, D = X.shape
    H, _, Dh = W_Q.shape
    zero = q.dtype.type(0)
    for u in range(U):
        for k in range(D):
            X[u, k] = AP[r_u[u], k] + AP[Vp + p_u[u], k]
        for h in range(H):
            qh = q[u, h * Dh:(h + 1) * Dh]
            for d in range(Dh):
                qh[d] = zero
            for k in range(D):
                x = X[u, k]
                for d in range(Dh):
                    qh[d] += x * W_Q[h, k, d]
            for d in range(Dh):
                qh[d] += b_Q[h, d]
            c[h, u] = _dot8(b_K[h], qh)


@numba.njit(cache=True, error_model="numpy")
def _query_backward_kernel(dq, X, W_Q, dW_Q, dX):
    # dq [U, HD], X [U, D], W_Q [H, D, Dh] -> fills dW_Q [H, D, Dh] = sum_u X[u]^T dq_u,h and adds
    # into dX [U, D] the query's share, dq_u W_Q^T (inverts _query_kernel's q = X W_Q + b_Q)
    U, D = X.shape
    H, _, Dh = W_Q.shape
    zero = dq.dtype.type(0)
    for h in range(H):
        for k in range(D):
            w = dW_Q[h, k]
            for d in range(Dh):
                w[d] = zero
            for u in range(U):
                x = X[u, k]
                for d in range(Dh):
                    w[d] += x * dq[u, h * Dh + d]
    for u in range(U):
        for k in range(D):
            acc = zero
            for h in range(H):
                acc += _dot8(dq[u, h * Dh:(h + 1) * Dh], W_Q[h, k])
            dX[u, k] += acc


@numba.njit(cache=True, error_model="numpy")
def _keys_backward_kernel(dQt, sp, q, b_K, dW_K, db_K, dq):
    # dQt [H, U, D] (gradient of Qt_u,h = W_K,h q_u,h), sp [H, U] (gradient of c[h, u] =
    # b_K,h . q_u,h), q [U, HD], b_K [H, Dh], dq [U, HD] holding dQt_u,h W_K,h
    #   -> fills dW_K [H, D, Dh] = sum_u dQt_u,h (outer) q_u,h, db_K [H, Dh] = sum_u sp[h, u] q_u,h
    #      and adds sp[h, u] b_K,h into dq
    # inverts Qt = W_K q (a batched matmul in tower_forward_fast) and c (`_query_kernel`);
    # sp is ~0: c shifts every score of a query row alike, which the softmax cancels
    H, U, D = dQt.shape
    Dh = b_K.shape[1]
    zero = q.dtype.type(0)
    for h in range(H):
        o = h * Dh
        w = dW_K[h]
        for k in range(D):
            for d in range(Dh):
                w[k, d] = zero
        for d in range(Dh):
            db_K[h, d] = zero
        for u in range(U):
            qu = q[u, o:o + Dh]
            g = dQt[h, u]
            for k in range(D):
                gk = g[k]
                for d in range(Dh):
                    w[k, d] += gk * qu[d]
            su = sp[h, u]
            for d in range(Dh):
                dq[u, o + d] += su * b_K[h, d]
                db_K[h, d] += su * qu[d]


@numba.njit(cache=True, error_model="numpy")
def _table_pattern_kernel(ES, S, qi, r, n_keys, scale, safe, pattern, C):
    # ES, S [H, U, V'+T], qi [B]: sample b's query is u = qi[b], r [B, T]: table rows,
    # n_keys [B], safe: the smallest trusted sum of a row's exps
    #   -> fills pattern [B, H, T] = softmax of the scores (0 for keys >= n_keys[b]) and
    #      C [B, H*(V'+T) + U]:
    #      C[b, h*VT + v]      = sum_{j: r[b, j] = v} pattern[b, h, j]   (v < V': the pattern
    #                            binned by table row), so that z_b,h = C[b, h] @ [VA ; VP]_h
    #      C[b, h*VT + V' + j] = pattern[b, h, j]
    #      C[b, H*VT + u]      = 1 if u = qi[b] else 0     (picks the residual row x[b, p_b])
    # A key's exp is a product of two table entries (no exp per key). If a row's exps add up to
    # less than `safe` (its keys all score far below the tables' maxima, so they underflow), the
    # row is recomputed with its own maximum, as the reference does.
    B, H, T = pattern.shape
    VT = S.shape[2]
    Vp = VT - T
    zero = pattern.dtype.type(0)
    for b in range(B):                             # b owns pattern[b], C[b]
        n = n_keys[b]
        cb = C[b]
        for i in range(cb.shape[0]):
            cb[i] = zero
        cb[H * VT + qi[b]] = pattern.dtype.type(1)
        for h in range(H):
            p = pattern[b, h]
            e = ES[h, qi[b]]
            total = zero
            for j in range(n):                     # exp(score_j - shift)
                w = e[r[b, j]] * e[Vp + j]
                p[j] = w
                total += w
            if not total >= safe:                  # rare: recompute exp(score_j - max_j score_j)
                s_row = S[h, qi[b]]
                for j in range(n):
                    p[j] = (s_row[r[b, j]] + s_row[Vp + j]) * scale
                softmax_row(p, n)
                total = pattern.dtype.type(1)
            o = h * VT
            for j in range(n):
                pj = p[j] / total
                p[j] = pj
                cb[o + r[b, j]] += pj
                cb[o + Vp + j] = pj
            for j in range(n, T):
                p[j] = zero


@numba.njit(cache=True, error_model="numpy")
def _table_attention_backward_kernel(dC, pattern, qi, r, n_keys, scale, dS):
    # dC [B, H*(V'+T)] (gradient of C's pattern part), pattern [B, H, T], qi [B], r [B, T], n_keys [B]
    #   -> adds into zeroed dS [H, U, V'+T] the gradient of S (inverts the forward kernel above):
    #      the samples that share a query add their gradients into its row, in order b = 0..B-1
    H, U, VT = dS.shape
    B, T = r.shape
    Vp = VT - T
    zero = dC.dtype.type(0)
    dp = np.empty(T, dtype=dC.dtype)
    for b in range(B):
        n = n_keys[b]
        for h in range(H):
            p = pattern[b, h]
            o = h * VT
            # inverts C: dpattern[j] = dC[r[b, j]] + dC[V' + j]
            rowdot = zero                          # <dpattern, pattern> of the softmax backward
            for j in range(n):
                d = dC[b, o + r[b, j]] + dC[b, o + Vp + j]
                dp[j] = d
                rowdot += d * p[j]
            # inverts pattern = softmax(scores): ds = pattern * (dpattern - rowdot) * scale;
            # inverts scores = S[u, r[b, j]] + S[u, V' + j]: add ds back by table row and position
            ds_row = dS[h, qi[b]]
            for j in range(n):
                ds = p[j] * (dp[j] - rowdot) * scale
                ds_row[r[b, j]] += ds
                ds_row[Vp + j] += ds


@numba.njit(cache=True, error_model="numpy")
def _pooled_attention_forward_kernel(q, kv, n_keys, scale, z, pattern):
    # q [B, H, Dh] (the pooled row), kv [B, T, 2, H, Dh] (k = kv[:, :, 0], v = kv[:, :, 1]),
    # n_keys [B] -> fills z [B, H, Dh],
    # pattern [B, H, T] (zero for keys >= n_keys[b]: the causal mask of the EOT row)
    # replaces, for the pooled row only, ops.attention_core_forward (model.py: ops.attention_forward)
    B, _, _, H, Dh = kv.shape
    zero = q.dtype.type(0)
    for b in range(B):                             # b owns z[b], pattern[b]
        n = n_keys[b]
        for h in range(H):
            p = pattern[b, h]
            # scores = q . k^T * (1 / sqrt(Dh)), then their softmax over keys 0..n-1
            for j in range(n):
                acc = zero
                for d in range(Dh):
                    acc += q[b, h, d] * kv[b, j, 0, h, d]
                p[j] = acc * scale
            softmax_row(p, n)
            # z = pattern @ v
            for d in range(Dh):
                z[b, h, d] = zero
            for j in range(n):
                pj = p[j]
                for d in range(Dh):
                    z[b, h, d] += pj * kv[b, j, 1, h, d]


@numba.njit(cache=True, error_model="numpy")
def _pooled_attention_backward_kernel(dz, q, kv, pattern, n_keys, scale, dq, dkv):
    # dz [B, H, Dh], q [B, H, Dh], kv [B, T, 2, H, Dh], pattern [B, H, T]
    #   -> fills dq [B, H, Dh] and dkv [B, T, 2, H, Dh] (dk | dv)
    # replaces, for the pooled row only, ops.attention_core_backward
    B, T, _, H, Dh = kv.shape
    zero = q.dtype.type(0)
    for b in range(B):                             # b owns dq[b], dkv[b]
        dp = np.empty(T, dtype=q.dtype)
        n = n_keys[b]
        for h in range(H):
            p = pattern[b, h]
            # inverts z = pattern @ v:  dpattern[j] = dz . v[j];  dv[j] = pattern[j] dz
            rowdot = zero                          # <dpattern, pattern> of the softmax backward
            for j in range(n):
                pj = p[j]
                acc = zero
                for d in range(Dh):
                    acc += dz[b, h, d] * kv[b, j, 1, h, d]
                dp[j] = acc
                rowdot += acc * pj
                for d in range(Dh):
                    dkv[b, j, 1, h, d] = pj * dz[b, h, d]
            for j in range(n, T):                  # keys the pooled row does not see
                for d in range(Dh):
                    dkv[b, j, 0, h, d] = zero
                    dkv[b, j, 1, h, d] = zero
            # inverts pattern = softmax(scores): ds = pattern * (dpattern - rowdot) * scale
            # inverts scores = q . k^T * scale:  dq = sum_j ds[j] k[j];  dk[j] = ds[j] q
            for d in range(Dh):
                dq[b, h, d] = zero
            for j in range(n):
                ds = p[j] * (dp[j] - rowdot) * scale
                for d in range(Dh):
                    dq[b, h, d] += ds * kv[b, j, 0, h, d]
                    dkv[b, j, 0, h, d] = ds * q[b, h, d]


@numba.njit(cache=True, error_model="numpy")
def _add_rows(dst, idx, src):
    # dst [N, D], idx [M], src [M, D] -> in place dst[idx[m]] += src[m], m = 0..M-1 in order
    #   (np.add.at(dst, idx, src): repeated indices add up)
    for m in range(idx.shape[0]):
        for d in range(src.shape[1]):
            dst[idx[m], d] += src[m, d]


@numba.njit(cache=True)
def distinct_pairs(rows, pos, T):
    # rows [B], pos [B] (ints >= 0, pos < T) -> (rows_u [U], pos_u [U], inverse [B]): the distinct
    # (row, pos) pairs in increasing order of row * T + pos, and pair u = inverse[b] of sample b
    B = rows.shape[0]
    K = 0
    for b in range(B):
        K = max(K, rows[b] * T + pos[b] + 1)
    lookup = np.full(K, -1, dtype=np.int64)        # key -> u (-1: no sample has this pair)
    for b in range(B):
        lookup[rows[b] * T + pos[b]] = 0
    U = 0
    for k in range(K):
        if lookup[k] >= 0:
            lookup[k] = U
            U += 1
    rows_u, pos_u = np.empty(U, dtype=np.int64), np.empty(U, dtype=np.int64)
    for k in range(K):
        if lookup[k] >= 0:
            rows_u[lookup[k]] = k // T
            pos_u[lookup[k]] = k % T
    inverse = np.empty(B, dtype=np.int64)
    for b in range(B):
        inverse[b] = lookup[rows[b] * T + pos[b]]
    return rows_u, pos_u, inverse


def table_attention_forward(S, qi, r, n_keys, Dh: int):
    # S [H, U, V'+T], qi [B], r [B, T], n_keys [B] -> pattern [B, H, T], C [B, H*(V'+T) + U]
    H, U, VT = S.shape
    B, T = r.shape
    S = np.ascontiguousarray(S)
    scale = S.dtype.type(1.0 / math.sqrt(Dh))      # as the reference: python scale in the dtype
    ES = np.empty_like(S)
    _exp_tables_kernel(S, VT - T, scale, ES)
    pattern = np.empty((B, H, T), dtype=S.dtype)
    C = np.empty((B, H * VT + U), dtype=S.dtype)
    _table_pattern_kernel(ES, S, qi, r, n_keys, scale, SAFE_SUM[S.dtype], pattern, C)
    return pattern, C


def table_attention_backward(dC, pattern, qi, r, n_keys, U: int, Dh: int):
    # dC [B, H*(V'+T)] -> dS [H, U, V'+T]
    H = pattern.shape[1]
    scale = dC.dtype.type(1.0 / math.sqrt(Dh))
    dS = np.zeros((H, U, dC.shape[1] // H), dtype=dC.dtype)
    _table_attention_backward_kernel(np.ascontiguousarray(dC), pattern, qi, r, n_keys, scale, dS)
    return dS


def pooled_attention_forward(q, kv, n_keys):
    # q [B, H, Dh], kv [B, T, 2, H, Dh] (k | v), n_keys [B] -> z [B, H, Dh], pattern [B, H, T]
    B, T, _, H, Dh = kv.shape
    scale = q.dtype.type(1.0 / math.sqrt(Dh))      # as the reference: python scale in the dtype
    z = np.empty((B, H, Dh), dtype=q.dtype)
    pattern = np.empty((B, H, T), dtype=q.dtype)
    _pooled_attention_forward_kernel(q, kv, n_keys, scale, z, pattern)
    return z, pattern


def pooled_attention_backward(dz, q, kv, pattern, n_keys):
    # dz [B, H, Dh] -> dq [B, H, Dh], dkv [B, T, 2, H, Dh] (zero for keys the row does not see)
    Dh = q.shape[-1]
    scale = q.dtype.type(1.0 / math.sqrt(Dh))
    dq = np.empty_like(q)
    dkv = np.empty_like(kv)
    _pooled_attention_backward_kernel(np.ascontiguousarray(dz), q, kv, pattern, n_keys, scale, dq, dkv)
    return dq, dkv


# --------------------------------------------------------------------------------------------
# one tower

@numba.njit(cache=True, error_model="numpy")
def _pack_weight_kernel(w, W):
    # w [H, D, Dh] -> W [D, H*Dh] (any strides: a column block of a wider matrix) with
    # W[k, h*Dh + d] = w[h, k, d]; reads w in memory order (NumPy's copy walks W's order instead,
    # jumping through w: ~2x slower when w is not in cache, as right after the optimizer step)
    H, D, Dh = w.shape
    for h in range(H):
        for k in range(D):
            for d in range(Dh):
                W[k, h * Dh + d] = w[h, k, d]


def _qkv_weights(params, b: str, names: str = "QKV"):
    # -> W [D, len(names) HD] (e.g. Q | K | V, columns h-major as ops.attention_forward), bias [len(names) HD]
    Ws = [params[f"{b}.attn.W_{n}"] for n in names]                         # each [H, D, Dh]
    H, D, Dh = Ws[0].shape
    HD = H * Dh
    W = np.empty((D, len(Ws) * HD), dtype=Ws[0].dtype)
    for i, w in enumerate(Ws):
        _pack_weight_kernel(w, W[:, i * HD:(i + 1) * HD])
    bias = np.concatenate([params[f"{b}.attn.b_{n}"].reshape(-1) for n in names])
    return W, bias


def _split_qkv_grads(g: dict, b: str, dW_qkv, db_qkv, H: int, Dh: int) -> None:
    # dW_qkv [D, 3HD], db_qkv [3HD] -> g[W_Q|W_K|W_V] [H, D, Dh], g[b_Q|b_K|b_V] [H, Dh]
    D, HD = dW_qkv.shape[0], H * Dh
    for i, n in enumerate(("Q", "K", "V")):
        g[f"{b}.attn.W_{n}"] = dW_qkv[:, i * HD:(i + 1) * HD].reshape(D, H, Dh).transpose(1, 0, 2).copy()
        g[f"{b}.attn.b_{n}"] = db_qkv[i * HD:(i + 1) * HD].reshape(H, Dh).copy()


def tower_forward_fast(params, tower: str, ids, pool_idx, cfg):
    # ids [B, L] (vision pixels, CLS prepended here) or [B, Tt] (text), pool_idx [B]
    #   -> feat [B, E] (L2-normalised), cache        replaces model.tower_forward (no hooks)
    s = model._embed_scale(cfg)
    n_layers = cfg.layers(tower)
    last = f"{tower}.blocks.{n_layers - 1}"
    H, _, Dh = params[f"{last}.attn.W_Q"].shape          # from the weights: shapes are never guessed
    HD = H * Dh
    B = ids.shape[0]
    W_E = params[f"{tower}.W_E"]
    V, D = W_E.shape
    # the input as a table and row indices: X[b, t] = A[r[b, t]] + P[t]
    #   (model.py: tok = W_E[ids] * s; CLS prepended; x = tok + W_pos[:T])
    A = W_E * s if s != 1.0 else W_E                                       # [V, D]
    r = ids.astype(np.int64)
    if tower == "vision":
        A = np.concatenate([A, params["vision.class_embedding"][None]], axis=0)   # [V+1, D]
        r = np.concatenate([np.full((B, 1), V, dtype=np.int64), r], axis=1)        # CLS = row V
    T = r.shape[1]
    if T > params[f"{tower}.W_pos"].shape[0]:
        raise ValueError(f"{tower} input has {T} positions but the model's context is "
                         f"{params[f'{tower}.W_pos'].shape[0]}")
    P = params[f"{tower}.W_pos"][:T]                                       # [T, D]
    pool = np.ascontiguousarray(pool_idx, dtype=np.int64)                 # p_b
    r_pool = r[np.arange(B), pool]                                         # table row of x[b, p_b]
    n_keys = pool + 1 if tower == "text" else np.full(B, T, dtype=np.int64)   # causal: keys <= eot
    c = {"A": A, "r": r, "P": P, "pool": pool, "r_pool": r_pool, "n_keys": n_keys}

    if n_layers == 1:
        # rewrites 2 + 3: everything from the tables (model.py: ops.attention_forward)
        Vp = A.shape[0]
        VT = Vp + T
        AP = np.concatenate([A, P])                                        # [V'+T, D]: the table rows
        # the pooled row's query depends on (its table row, its position) only: the CLS row at 0
        # for every image, the EOT row at one of a few positions for the captions. Compute each
        # distinct query once: q_u for u = 0..U-1, sample b uses u = qi[b]
        r_u, p_u, qi = distinct_pairs(r_pool, pool, T)                     # [U], [U], [B]
        U = r_u.shape[0]
        # query u's row of the residual stream, X_u = AP[r_u] + AP[V' + p_u], and q_u = X_u W_Q + b_Q
        X_u, q = np.empty((U, D), dtype=AP.dtype), np.empty((U, HD), dtype=AP.dtype)
        c_hu = np.empty((H, U), dtype=AP.dtype)                            # b_K,h . q_u,h
        _query_kernel(AP, r_u, p_u, Vp, params[f"{last}.attn.W_Q"], params[f"{last}.attn.b_Q"],
                      params[f"{last}.attn.b_K"], X_u, q, c_hu)
        # keys through the query: q_u,h . k_i,h = AP_i . (W_K,h q_u,h) + b_K,h . q_u,h, so no key
        # table is needed. One GEMM gives the V table and every score:
        #   [Vtab | S^T] = AP @ [W_V | Qt],   Qt [D, H*U]: column (h, u) = W_K,h q_u,h
        WQ = np.empty((D, HD + H * U), dtype=AP.dtype)                     # [W_V | Qt]
        _pack_weight_kernel(params[f"{last}.attn.W_V"], WQ[:, :HD])
        np.matmul(params[f"{last}.attn.W_K"], q.reshape(U, H, Dh).transpose(1, 2, 0),
                  out=WQ[:, HD:].reshape(D, H, U).transpose(1, 0, 2))      # [H, D, U]
        VS = AP @ WQ                                                       # [V'+T, HD + H*U]
        VS[Vp:, :HD] += params[f"{last}.attn.b_V"].reshape(-1)            # v = x W_V + b_V
        # S[h, u, i] = q_u,h . k_i,h: the score of key j of sample b is
        #   S[h, qi[b], r[b, j]] + S[h, qi[b], V' + j]   (b_K's share on the position rows: it
        #   shifts all keys of a query alike, so the softmax cancels it; added so that S holds the
        #   model's scores, tests/test_fast.py)
        S = np.ascontiguousarray(VS[:, HD:].T).reshape(H, U, VT)
        S[:, :, Vp:] += c_hu[:, :, None]
        pattern, C = table_attention_forward(S, qi, r, n_keys, Dh)         # [B, H, T], [B, H*(V'+T) + U]
        # pooled_b = x[b, p_b] + sum_h z_b,h W_O,h + b_O = C[b] @ O with, stacked in rows,
        #   O_h = Vtab_h W_O,h   (the output projection applied to the V tables)  [H*(V'+T), D]
        #   X_u + b_O            (the residual row of query u, plus the bias)     [U, D]
        W_O = params[f"{last}.attn.W_O"]                                   # [H, Dh, D]
        Vtab = VS[:, :HD].reshape(VT, H, Dh).transpose(1, 0, 2)            # [H, V'+T, Dh] (a view)
        HV = H * VT
        O = np.empty((HV + U, D), dtype=AP.dtype)                          # [H*(V'+T) + U, D]
        np.matmul(Vtab, W_O, out=O[:HV].reshape(H, VT, D))
        np.add(X_u, params[f"{last}.attn.b_O"], out=O[HV:])
        pooled = C @ O                                                     # [B, D]
        c.update(AP=AP, WQ=WQ, X_u=X_u, q=q, qi=qi, r_u=r_u, p_u=p_u, S=S,
                 Vtab=Vtab, pattern=pattern, C=C, O=O)
    else:
        # layers 0..L-2: the reference blocks (numba attention core), dense x [B, T, D]
        x = A[r] + P
        c["layers"] = []
        for l in range(n_layers - 1):
            a, ac = ops.attention_forward(x, model._attn_params(params, f"{tower}.blocks.{l}"),
                                          tower == "text")
            c["layers"].append(ac)
            x = x + a
        # rewrite 1 on the dense stream: k, v of every row, q of the pooled row
        W_qkv, b_qkv = _qkv_weights(params, last)
        c["W_qkv"] = W_qkv
        x2 = x.reshape(B * T, D)
        kv = (x2 @ W_qkv[:, HD:] + b_qkv[HD:]).reshape(B, T, 2, H, Dh)      # k = kv[:, :, 0], v = kv[:, :, 1]
        x_pool = x[np.arange(B), pool]                                     # [B, D]
        q = (x_pool @ W_qkv[:, :HD] + b_qkv[:HD]).reshape(B, H, Dh)        # [B, H, Dh]
        # rewrite 1: the pooled row's attention, output projection and residual
        z, pattern = pooled_attention_forward(q, kv, n_keys)             # [B, H, Dh], [B, H, T]
        W_O2 = params[f"{last}.attn.W_O"].reshape(HD, D)
        pooled = x_pool + (z.reshape(B, HD) @ W_O2 + params[f"{last}.attn.b_O"])   # [B, D]
        c.update(x2=x2, q=q, kv=kv, z=z, pattern=pattern, x_pool=x_pool)
    caches = {}
    if cfg.proj_dim:
        pooled, caches["proj"] = ops.linear_forward(pooled, params[f"{tower}.W_proj"])   # [B, E]
    feat, caches["l2"] = l2norm_forward(pooled)
    return feat, (tower, s, c, caches)


def tower_backward_fast(dfeat, cache, params, cfg) -> dict:
    # dfeat [B, E] -> grads {name: array} of this tower          replaces model.tower_backward
    tower, s, c, caches = cache
    n_layers = cfg.layers(tower)
    last = f"{tower}.blocks.{n_layers - 1}"
    A, r, P, pool = c["A"], c["r"], c["P"], c["pool"]
    pattern = c["pattern"]
    H, _, Dh = params[f"{last}.attn.W_Q"].shape
    HD = H * Dh
    B, T = r.shape
    Vp, D = A.shape
    g: dict[str, np.ndarray] = {}
    d = l2norm_backward(dfeat, caches["l2"])                               # inverts feat = l2norm(pooled)
    if cfg.proj_dim:
        d, g[f"{tower}.W_proj"], _ = ops.linear_backward(d, caches["proj"])    # inverts pooled @ W_proj
    dpool = d                                                              # [B, D] = d pooled
    W_O = params[f"{last}.attn.W_O"]                                       # [H, Dh, D]

    if n_layers == 1:
        AP, WQ, X_u, q, Vtab, C, O = (c[k] for k in ("AP", "WQ", "X_u", "q", "Vtab", "C", "O"))
        r_u, p_u, U = c["r_u"], c["p_u"], q.shape[0]
        VT = Vp + T
        HV = H * VT
        # inverts pooled = C @ O: dC of the pattern part (the one-hot part needs none) and dO
        dC = dpool @ O[:HV].T                                              # [B, H*(V'+T)]
        dO = C.T @ dpool                                                   # [H*(V'+T) + U, D]
        dX = dO[HV:].copy()                                                # [U, D] = d (X_u + b_O)
        g[f"{last}.attn.b_O"] = dX.sum(axis=0)
        # inverts O_h = Vtab_h W_O,h
        dO = dO[:HV].reshape(H, VT, D)
        g[f"{last}.attn.W_O"] = np.matmul(Vtab.transpose(0, 2, 1), dO)     # [H, Dh, D]
        HU = H * U
        dVS = np.empty((VT, HD + HU), dtype=AP.dtype)                     # [d Vtab | d S^T]
        dV = dVS[:, :HD]                                                   # [V'+T, HD]
        np.matmul(dO, W_O.transpose(0, 2, 1), out=dV.reshape(VT, H, Dh).transpose(1, 0, 2))
        # inverts Vtab = AP W_V (+ b_V on the position rows)
        g[f"{last}.attn.W_V"] = np.matmul(AP.T, dV.reshape(VT, H, Dh).transpose(1, 0, 2))   # [H, D, Dh]
        g[f"{last}.attn.b_V"] = dV[Vp:].sum(axis=0).reshape(H, Dh)
        # inverts pattern, C = softmax of the table scores (kernel)
        dS = table_attention_backward(dC, pattern, c["qi"], r, c["n_keys"], U, Dh)   # [H, U, V'+T]
        dVS[:, HD:] = dS.reshape(HU, VT).T
        # inverts S = AP Qt (+ c on the position rows), Qt_h = W_K,h q_h:
        #   dQt = dS AP, dW_K,h = dQt_h^T q_h, dq_h = dQt_h W_K,h (+ c's share)
        dQt = dS.reshape(HU, VT) @ AP                                      # [H*U, D]
        dq = np.empty_like(q)                                              # [U, HD]
        np.matmul(dQt.reshape(H, U, D), params[f"{last}.attn.W_K"], out=dq.reshape(U, H, Dh).transpose(1, 0, 2))
        g[f"{last}.attn.W_K"] = np.empty_like(params[f"{last}.attn.W_K"])  # [H, D, Dh]
        g[f"{last}.attn.b_K"] = np.empty_like(params[f"{last}.attn.b_K"])  # [H, Dh]
        _keys_backward_kernel(dQt.reshape(H, U, D), dVS[Vp:, HD:].sum(axis=0).reshape(H, U), q,
                              params[f"{last}.attn.b_K"], g[f"{last}.attn.W_K"], g[f"{last}.attn.b_K"], dq)
        # d AP^T = W_V dV^T + Qt dS (the V table's and the scores' share) in one GEMM
        dAPT = WQ @ dVS.T                                                  # [D, V'+T]
        # inverts q = X_u W_Q + b_Q: dW_Q, db_Q, and dX (= d X_u) gets the query's share
        g[f"{last}.attn.W_Q"] = np.empty_like(params[f"{last}.attn.W_Q"])   # [H, D, Dh]
        _query_backward_kernel(dq, X_u, params[f"{last}.attn.W_Q"], g[f"{last}.attn.W_Q"], dX)
        g[f"{last}.attn.b_Q"] = dq.sum(axis=0).reshape(H, Dh)
        dAP = dAPT.T                                                       # [V'+T, D] (a view)
        # inverts X_u = AP[r_u] + AP[V' + p_u] (the pooled rows: residual and query)
        _add_rows(dAP, r_u, dX)
        _add_rows(dAP, Vp + p_u, dX)
        dA, dP = dAP[:Vp], dAP[Vp:]                                        # [V', D], [T, D]
    else:
        kv, z, x2, q, r_pool, W_qkv = c["kv"], c["z"], c["x2"], c["q"], c["r_pool"], c["W_qkv"]
        g[f"{last}.attn.b_O"] = dpool.sum(axis=0)
        # inverts pooled = x_pool + z W_O + b_O  (the pooled row of the residual and of the output)
        g[f"{last}.attn.W_O"] = (z.reshape(B, HD).T @ dpool).reshape(H, Dh, D)
        dz = (dpool @ W_O.reshape(HD, D).T).reshape(B, H, Dh)
        # inverts z, pattern = attention of the pooled row
        dq, dkv = pooled_attention_backward(dz, q, kv, pattern, c["n_keys"])
        dkv = dkv.reshape(B * T, 2 * HD)                                   # [dk | dv] per row
        dq = dq.reshape(B, HD)
        # inverts kv = x2 W_kv + b_kv and q = x_pool W_Q + b_Q (plus the residual at the pooled row)
        dW_qkv = np.concatenate([c["x_pool"].T @ dq, x2.T @ dkv], axis=1)
        db_qkv = np.concatenate([dq.sum(axis=0), dkv.sum(axis=0)])
        _split_qkv_grads(g, last, dW_qkv, db_qkv, H, Dh)
        dx = (dkv @ W_qkv[:, HD:].T).reshape(B, T, D)
        dx[np.arange(B), pool] += dq @ W_qkv[:, :HD].T + dpool
        # layers L-2..0: the reference backward; inverts x = x + attn(x)
        for l in reversed(range(n_layers - 1)):
            dh, ga = ops.attention_backward(dx, c["layers"][l], model._attn_params(params, f"{tower}.blocks.{l}"))
            for n, gv in ga.items():
                g[f"{tower}.blocks.{l}.attn.{n}"] = gv
            dx = dx + dh
        # inverts x = A[r] + P
        dA = ops.scatter_add_rows(r.reshape(-1), dx.reshape(B * T, D), A.shape[0])
        dP = dx.sum(axis=0)
    # inverts A = [s W_E ; class_embedding] and P = W_pos[:T]
    V = params[f"{tower}.W_E"].shape[0]
    g[f"{tower}.W_E"] = dA[:V] * s if s != 1.0 else np.ascontiguousarray(dA[:V])
    if tower == "vision":
        g["vision.class_embedding"] = dA[V].copy()
    dW_pos = np.zeros_like(params[f"{tower}.W_pos"])
    dW_pos[:T] = dP
    g[f"{tower}.W_pos"] = dW_pos
    return g


# --------------------------------------------------------------------------------------------
# the step

def loss_and_grads_fast(params, images, tokens, eot, cfg):
    # images [B, L], tokens [B, Tt], eot [B] -> (loss float, grads {name: array like params})
    # the same as model.loss_and_grads (which dispatches here), computed with the rewrites above
    model._check_inputs(images, tokens, eot, cfg)
    if not supports(cfg):
        raise ValueError("fast path: layernorm and mlp are not supported (use model.loss_and_grads)")
    # the kernels do no bounds checks: ids are checked against the tables they index
    ops.check_ids("images", images, params["vision.W_E"].shape[0])
    ops.check_ids("tokens", tokens, params["text.W_E"].shape[0])
    return model.two_tower_loss_and_grads(params, images, tokens, eot, cfg,
                                          tower_forward_fast, tower_backward_fast, clip_loss_fast)
