"""Every numba kernel of minispatial: loops that fill preallocated outputs, nothing else.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, HD = H*Dh, V' rows of the token table
A (vocabulary, + CLS for vision), VT = V' + T rows of [A ; P], U distinct pooled queries, E feature
width, N elements or rows. The Python around the kernels (checks, allocation, BLAS products) is in
the module that uses them: attention_core.py, one_layer.py, last_layer.py, loss.py, adamw.py.

ONE RULE FOR EVERY KERNEL: `numba.njit(cache=True, error_model="numpy")`, serial, no fastmath.
- Serial (no prange, no parallel=True). One call does 0.01-3 ms of work at the batch sizes this
  project trains with, and a parallel launch costs more on its machines (2 cores shared with other
  processes): numba's OpenMP layer took ~8-12 ms per launch while another process kept a core
  busy, and OpenBLAS's and OpenMP's spinning threads take the core from each other
  (benchmarks/README.md, "Under load"). Measured on the dense attention core at training
  size (B 128, T 11, H 4, Dh 32) on a loaded machine: serial 1.6 / 1.8 ms forward / backward,
  parallel 12 / 9 ms. The second core runs another process instead (`minispatial sweep`). Serial
  changes no sum: the loops that could be parallel run over indices that own their output.
- error_model="numpy": IEEE division, as NumPy (no zero check, whose branch stops vectorisation).
- No fastmath: LLVM may not reorder a float sum nor fuse a multiply-add, so each result is the one
  the loop order gives (AdamW is bitwise NumPy's; the rest is held to the NumPy reference at
  1e-10..1e-12). Elementwise loops vectorise, a reduction along a row does not: the ones that
  matter keep 8 partial sums (`dot8`).
- Arithmetic in the inputs' dtype (one compiled version per dtype), except the float64 sums of
  `dlogits_kernel` (dtau) and `sum_squares_kernel`.
- With NUMBA_DISABLE_JIT=1 every kernel runs as plain Python, with the same numbers.
"""

from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(cache=True, error_model="numpy")
jit_inline = numba.njit(cache=True, error_model="numpy", inline="always")

# The smallest trusted sum of N exps shifted by something other than their own maximum (the
# loss's E = exp(logits - s), one_layer.py's products of two exp tables): the entries that
# underflowed (each < tiny) add less than N tiny / sqrt(tiny) = N sqrt(tiny) relative to such a
# sum, so the softmax is as accurate as with the max shift. Below it the callers redo the max shift.
SAFE_SUM = {np.dtype(t): np.sqrt(np.finfo(t).tiny) for t in (np.float32, np.float64)}


# --------------------------------------------------------------------------------------------
# row helpers

@jit_inline
def softmax_row(p, n):
    # p [T], scores in p[:n] -> in place: p[:n] = softmax(p[:n]), p[n:] = 0 (masked keys)
    #   m = scores.max();  e = np.exp(scores - m);  pattern = e / e.sum()
    zero = p.dtype.type(0)
    m = p[0]
    for j in range(1, n):
        if p[j] > m:
            m = p[j]
    total = zero
    for j in range(n):
        e = np.exp(p[j] - m)
        p[j] = e
        total += e
    for j in range(n):
        p[j] = p[j] / total
    for j in range(n, p.shape[0]):
        p[j] = zero


@jit_inline
def dot8(x, y):
    # x, y [N] -> sum_i x[i] y[i], in 8 interleaved partial sums (8 independent chains)
    n = x.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = x.dtype.type(0)
    for j in range(0, n8, 8):
        a0 += x[j] * y[j]
        a1 += x[j + 1] * y[j + 1]
        a2 += x[j + 2] * y[j + 2]
        a3 += x[j + 3] * y[j + 3]
        a4 += x[j + 4] * y[j + 4]
        a5 += x[j + 5] * y[j + 5]
        a6 += x[j + 6] * y[j + 6]
        a7 += x[j + 7] * y[j + 7]
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for j in range(n8, n):
        s += x[j] * y[j]
    return s


# --------------------------------------------------------------------------------------------
# the dense attention core (ops.attention_core_forward/backward) and the embedding scatter-add

@jit
def attention_forward_kernel(q, k, v, causal, scale, z, pattern):
    # q, k, v [B, T, H, Dh] -> fills pattern [B, H, T, T] and z [B, T, H, Dh]
    B, T, H, Dh = q.shape
    zero = q.dtype.type(0)
    for b in range(B):
        for h in range(H):                         # (b, h) owns pattern[b, h] and z[b, :, h]
            for i in range(T):                     # query position
                # causal: keys j > i are masked (exp(-inf) = 0 in the reference) -> keys 0..n-1
                n = i + 1 if causal else T
                p = pattern[b, h, i]               # one row [T]: scores, then probabilities
                for j in range(n):                 # scores = (q @ k^T) * (1 / sqrt(Dh))
                    acc = zero
                    for d in range(Dh):
                        acc += q[b, i, h, d] * k[b, j, h, d]
                    p[j] = acc * scale
                softmax_row(p, n)                  # masked keys: exactly zero probability
                zi = z[b, i, h]                    # z = pattern @ v
                for d in range(Dh):
                    zi[d] = zero
                for j in range(n):
                    pj = p[j]
                    for d in range(Dh):
                        zi[d] += pj * v[b, j, h, d]


@jit
def attention_backward_kernel(dz, q, k, v, pattern, scale, dq, dk, dv):
    # dz, q, k, v [B, T, H, Dh], pattern [B, H, T, T] -> adds into zeroed dq, dk, dv [B, T, H, Dh]
    B, T, H, Dh = q.shape
    zero = q.dtype.type(0)
    dp = np.empty(T, dtype=q.dtype)                # one row of dpattern
    for b in range(B):
        for h in range(H):                         # (b, h) owns dq, dk, dv[b, :, h]
            for i in range(T):
                p = pattern[b, h, i]
                dzi = dz[b, i, h]
                # inverts z = pattern @ v: dpattern[i, j] = dz[i] . v[j]; dv[j] += pattern[i, j] dz[i]
                # (rowdot: <dpattern, pattern>); a masked key (pattern 0) adds exactly 0
                rowdot = zero
                for j in range(T):
                    pj = p[j]
                    if pj == 0:
                        dp[j] = zero
                        continue
                    acc = zero
                    for d in range(Dh):
                        acc += dzi[d] * v[b, j, h, d]
                    dp[j] = acc
                    rowdot += acc * pj
                    for d in range(Dh):
                        dv[b, j, h, d] += pj * dzi[d]
                # inverts pattern = softmax(scores): dscores = pattern * (dpattern - rowdot) * scale;
                # scores = q @ k^T * scale: dq[i] += dscores[i, j] k[j]; dk[j] += dscores[i, j] q[i]
                for j in range(T):
                    pj = p[j]
                    if pj == 0:                    # dscores exactly 0: nothing to add
                        continue
                    ds = pj * (dp[j] - rowdot) * scale
                    for d in range(Dh):
                        dq[b, i, h, d] += ds * k[b, j, h, d]
                        dk[b, j, h, d] += ds * q[b, i, h, d]


@jit
def add_rows(dst, idx, src):
    # dst [N, D], idx [M], src [M, D] -> in place dst[idx[m]] += src[m] for m = 0..M-1 in order
    #   (np.add.at(dst, idx, src): repeated indices add up, in the same order)
    for m in range(idx.shape[0]):
        r = idx[m]
        for d in range(src.shape[1]):
            dst[r, d] += src[m, d]


@jit
def pack_weight_kernel(w, W):
    # w [H, D, Dh] -> W [D, H*Dh] (any strides) with W[k, h*Dh + d] = w[h, k, d], reading w in memory
    # order (NumPy's copy jumps through w: ~2x slower when w is not in cache, as after the optimizer)
    H, D, Dh = w.shape
    for h in range(H):
        for k in range(D):
            for d in range(Dh):
                W[k, h * Dh + d] = w[h, k, d]


# --------------------------------------------------------------------------------------------
# one-layer towers: rewrites 2 + 3 (one_layer.py)

@jit
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
    for key in range(K):
        if lookup[key] >= 0:
            lookup[key] = U
            U += 1
    rows_u, pos_u = np.empty(U, dtype=np.int64), np.empty(U, dtype=np.int64)
    for key in range(K):
        if lookup[key] >= 0:
            rows_u[lookup[key]] = key // T
            pos_u[lookup[key]] = key % T
    inverse = np.empty(B, dtype=np.int64)
    for b in range(B):
        inverse[b] = lookup[rows[b] * T + pos[b]]
    return rows_u, pos_u, inverse


@jit
def query_kernel(AP, r_u, p_u, Vp, W_Q, b_Q, b_K, X_u, q, bk_q):
    # AP [VT, D] (the table rows [A ; P]), r_u, p_u [U], W_Q [H, D, Dh], b_Q, b_K [H, Dh] -> fills
    #   X_u [U, D] = AP[r_u] + AP[V' + p_u]   (query u's row of the residual stream)
    #   q [U, HD]  = X_u W_Q + b_Q            (its query)
    #   bk_q [H, U] = b_K,h . q_u,h           (the key bias's share of every score of query u)
    U, D = X_u.shape
    H, _, Dh = W_Q.shape
    zero = q.dtype.type(0)
    for u in range(U):
        for k in range(D):
            X_u[u, k] = AP[r_u[u], k] + AP[Vp + p_u[u], k]
        for h in range(H):
            qh = q[u, h * Dh:(h + 1) * Dh]
            for d in range(Dh):
                qh[d] = zero
            for k in range(D):
                x = X_u[u, k]
                for d in range(Dh):
                    qh[d] += x * W_Q[h, k, d]
            for d in range(Dh):
                qh[d] += b_Q[h, d]
            bk_q[h, u] = dot8(b_K[h], qh)


@jit
def query_backward_kernel(dq, X_u, W_Q, dW_Q, dX_u):
    # dq [U, HD], X_u [U, D], W_Q [H, D, Dh] -> fills dW_Q [H, D, Dh] = sum_u X_u[u]^T dq_u,h and
    # adds into dX_u [U, D] the query's share dq_u W_Q^T (inverts query_kernel's q = X_u W_Q + b_Q)
    U, D = X_u.shape
    H, _, Dh = W_Q.shape
    zero = dq.dtype.type(0)
    for h in range(H):
        for k in range(D):
            w = dW_Q[h, k]
            for d in range(Dh):
                w[d] = zero
            for u in range(U):
                x = X_u[u, k]
                for d in range(Dh):
                    w[d] += x * dq[u, h * Dh + d]
    for u in range(U):
        for k in range(D):
            acc = zero
            for h in range(H):
                acc += dot8(dq[u, h * Dh:(h + 1) * Dh], W_Q[h, k])
            dX_u[u, k] += acc


@jit
def keys_backward_kernel(dQt, dbk_q, q, b_K, dW_K, db_K, dq):
    # dQt [H, U, D] (gradient of Qt_u,h = W_K,h q_u,h), dbk_q [H, U] (gradient of bk_q[h, u] =
    # b_K,h . q_u,h), q [U, HD], b_K [H, Dh], dq [U, HD] holding dQt_u,h W_K,h
    #   -> fills dW_K [H, D, Dh] = sum_u dQt_u,h (outer) q_u,h, db_K [H, Dh] = sum_u dbk_q[h, u] q_u,h
    #      and adds dbk_q[h, u] b_K,h into dq
    # (dbk_q is ~0: bk_q shifts every score of a query row alike, which the softmax cancels)
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
            su = dbk_q[h, u]
            for d in range(Dh):
                dq[u, o + d] += su * b_K[h, d]
                db_K[h, d] += su * qu[d]


@jit
def exp_tables_kernel(S, Vp, scale, ES):
    # S [H, U, VT] (the scores of query u against the table rows) -> fills ES [H, U, VT] with the
    # two factors of the softmax's exp: exp(scale S - max), the max taken separately over the token
    # rows (< V') and the position rows (>= V'), so exp(score - shift) = ES[h, u, r] * ES[h, u, V' + j]
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


@jit
def table_pattern_kernel(ES, S, qi, r, n_keys, scale, safe, pattern, C):
    # ES, S [H, U, VT], qi [B] (sample b's query u = qi[b]), r [B, T] (table rows), n_keys [B],
    # safe: the smallest trusted sum of a row's exps
    #   -> fills pattern [B, H, T] = softmax of the scores (0 for keys >= n_keys[b]) and the binned
    #      pattern C [B, H*VT + U]:
    #      C[b, h*VT + v]      = sum_{j: r[b, j] = v} pattern[b, h, j]   (v < V': binned by table row)
    #      C[b, h*VT + V' + j] = pattern[b, h, j]                          (kept per position)
    #      C[b, H*VT + u]      = 1 if u = qi[b] else 0                     (picks the residual row)
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


@jit
def table_attention_backward_kernel(dC, pattern, qi, r, n_keys, scale, dS):
    # dC [B, H*VT] (gradient of C's pattern part), pattern [B, H, T], qi [B], r [B, T], n_keys [B]
    #   -> adds into zeroed dS [H, U, VT] the gradient of S (inverts table_pattern_kernel): the
    #      samples that share a query add into its row, in order b = 0..B-1
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
            # scores = S[u, r[b, j]] + S[u, V' + j]: ds goes back to its table row and position
            ds_row = dS[h, qi[b]]
            for j in range(n):
                ds = p[j] * (dp[j] - rowdot) * scale
                ds_row[r[b, j]] += ds
                ds_row[Vp + j] += ds


# --------------------------------------------------------------------------------------------
# the pooled row of a dense stream: rewrite 1 (last_layer.py)

@jit
def pooled_attention_forward_kernel(q, kv, n_keys, scale, z, pattern):
    # q [B, H, Dh] (the pooled row's query), kv [B, T, 2, H, Dh] (k = kv[:, :, 0], v = kv[:, :, 1]),
    # n_keys [B] -> fills z [B, H, Dh], pattern [B, H, T] (zero for keys >= n_keys[b]: the causal
    # mask of the EOT row); the dense kernel above for one query row per sample
    B, _, _, H, Dh = kv.shape
    zero = q.dtype.type(0)
    for b in range(B):                             # b owns z[b], pattern[b]
        n = n_keys[b]
        for h in range(H):
            p = pattern[b, h]
            for j in range(n):                     # scores = q . k^T * (1 / sqrt(Dh))
                acc = zero
                for d in range(Dh):
                    acc += q[b, h, d] * kv[b, j, 0, h, d]
                p[j] = acc * scale
            softmax_row(p, n)
            for d in range(Dh):                    # z = pattern @ v
                z[b, h, d] = zero
            for j in range(n):
                pj = p[j]
                for d in range(Dh):
                    z[b, h, d] += pj * kv[b, j, 1, h, d]


@jit
def pooled_attention_backward_kernel(dz, q, kv, pattern, n_keys, scale, dq, dkv):
    # dz [B, H, Dh], q [B, H, Dh], kv [B, T, 2, H, Dh], pattern [B, H, T]
    #   -> fills dq [B, H, Dh] and dkv [B, T, 2, H, Dh] (dk | dv; zero for keys the row does not see)
    B, T, _, H, Dh = kv.shape
    zero = q.dtype.type(0)
    dp = np.empty(T, dtype=q.dtype)
    for b in range(B):                             # b owns dq[b], dkv[b]
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
            # inverts pattern = softmax(scores): ds = pattern * (dpattern - rowdot) * scale;
            # scores = q . k^T * scale:  dq = sum_j ds[j] k[j];  dk[j] = ds[j] q
            for d in range(Dh):
                dq[b, h, d] = zero
            for j in range(n):
                ds = p[j] * (dp[j] - rowdot) * scale
                for d in range(Dh):
                    dq[b, h, d] += ds * kv[b, j, 0, h, d]
                    dkv[b, j, 0, h, d] = ds * q[b, h, d]


# --------------------------------------------------------------------------------------------
# CLIP loss and L2 norm (loss.py)

@jit
def l2norm_forward_kernel(x, y, n):
    # x [B, E] -> fills y [B, E] = x / |x| row by row, n [B] = |x|      (ops.l2norm_forward)
    for b in range(x.shape[0]):
        nb = np.sqrt(dot8(x[b], x[b]))
        n[b] = nb
        for i in range(x.shape[1]):
            y[b, i] = x[b, i] / nb


@jit
def l2norm_backward_kernel(dy, y, n, dx):
    # dy, y [B, E], n [B] -> fills dx [B, E] = (dy - y <dy, y>) / n       (ops.l2norm_backward)
    for b in range(y.shape[0]):
        dot = dot8(dy[b], y[b])
        nb = n[b]
        for i in range(y.shape[1]):
            dx[b, i] = (dy[b, i] - y[b, i] * dot) / nb


@jit
def col_sum_kernel(ec, csum):
    # ec [B, B] -> fills csum [B] = ec.sum(axis=0): row after row, in order (an elementwise loop
    # over the columns, which LLVM vectorises)
    csum[:] = 0
    for i in range(ec.shape[0]):
        eci = ec[i]
        for j in range(ec.shape[1]):
            csum[j] += eci[j]


@jit
def dlogits_kernel(er, ec, rsum, csum, L, c, G):
    # fills G [B, B] = c (er / rsum[:, None] + ec / csum[None, :] - 2 I)
    #   (c times 2B dlogits: softmax over rows minus I plus softmax over columns minus I)
    # -> returns sum((G / c) * L) (= 2B dtau) summed in float64 (its terms cancel): one float64
    #    sum per column, row after row (elementwise over the columns, so the loop vectorises),
    #    then the columns' sums in order
    # The two divisions are one, (er cj + ec ri) / (ri cj): the sums are >= SAFE_SUM, so ri cj does
    # not underflow; with B = 1 the entry is 2p / p = 2 exactly, and the gradient exactly 0.
    B = er.shape[0]
    two = er.dtype.type(2)
    acc = np.zeros(B)                              # float64, one per column
    for i in range(B):
        ri = rsum[i]
        eri = er[i]
        eci = ec[i]
        Li = L[i]
        Gi = G[i]
        for j in range(B):
            cj = csum[j]
            g = (eri[j] * cj + eci[j] * ri) / (ri * cj)
            acc[j] += np.float64(g) * np.float64(Li[j])
            Gi[j] = g * c
        # the diagonal minus 2 (I): its term in acc was g L_ii, it is (g - 2) L_ii
        g = (eri[i] * csum[i] + eci[i] * ri) / (ri * csum[i]) - two
        acc[i] -= 2.0 * np.float64(Li[i])
        Gi[i] = g * c
    total = 0.0
    for j in range(B):
        total += acc[j]
    return total


# --------------------------------------------------------------------------------------------
# the optimizer (adamw.py)

@jit
def adamw_segment(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, lr_bc1):
    # p, g, m, v [N] (one tensor), scalars in their dtype -> updates p, m, v in place with the
    # operations of optim.adamw_update in the same order, each rounded to the dtype as NumPy does.
    # (A function of its own, called on slices: the same loop inlined into adamw_kernel's loop
    # over the tensors does not vectorise, 5x slower.)
    for i in range(p.shape[0]):
        pi = p[i] * decay
        gi = g[i]
        mi = m[i] * beta1 + one_minus_beta1 * gi
        vi = v[i] * beta2 + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = pi - (lr_bc1 * mi) / (np.sqrt(vi) / sqrt_bc2 + eps)


@jit
def adamw_kernel(p, g, m, v, ends, decays, *scalars):
    # p, g, m, v [N]: every tensor one after the other, tensor s in [ends[s-1], ends[s]) with
    # decays[s] -> adamw_segment on each (scalars: beta1, 1 - beta1, beta2, 1 - beta2, sqrt_bc2, eps, lr_bc1)
    start = 0
    for s in range(ends.shape[0]):
        e = ends[s]
        adamw_segment(p[start:e], g[start:e], m[start:e], v[start:e], decays[s], *scalars)
        start = e


SUM_LANES = 64


@jit
def sum_squares_kernel(x):
    # x [N] -> sum of x^2 in float64: lane j sums elements j, j + 64, ... in order, then the tail and
    # the lanes in order (an elementwise lane update vectorises; a plain running sum would not)
    n = x.shape[0]
    m = n // SUM_LANES
    total = 0.0
    for i in range(m * SUM_LANES, n):
        xi = np.float64(x[i])
        total += xi * xi
    if m == 0:
        return total
    acc = np.zeros(SUM_LANES)
    for i in range(m):
        xs = x[i * SUM_LANES:(i + 1) * SUM_LANES]
        for j in range(SUM_LANES):
            xj = np.float64(xs[j])
            acc[j] += xj * xj
    for j in range(SUM_LANES):
        total += acc[j]
    return total
