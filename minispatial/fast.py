"""The fast training step: the same loss and gradients as `model.loss_and_grads`, less work.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, HD = H*Dh, V vocabulary,
V' = rows of the token table A (V, plus the CLS row for vision), E feature width.

`model.loss_and_grads` calls `loss_and_grads_fast` when the backend is "numba" and `supports(cfg)`
(no LayerNorm, no MLP; any number of layers, proj_dim and embed_scale). Everything else (and the
hooks of `run_with_cache`) stays on the reference path in model.py / ops.py, which is what this
file is tested against (tests/test_fast.py: 1e-10 in float64, 1e-4 in float32).

Two exact rewrites, both "the same sums in another order":

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

2. Factorised layer 0 (when a tower has ONE layer, so layer 0 is also the last layer).
   The input is X[b, t] = A[r[b, t]] + P[t] with A = [s W_E ; class_embedding] (the CLS row is
   row V of A, used at t = 0 by every image) and P = W_pos[:T]. Projections are linear, so
        X W + b = (A W)[r] + (P W + b)                          (A W: V' x 3HD, tiny)
   i.e. two small GEMMs on the tables and a gather, instead of a [B*T, D] x [D, 3HD] GEMM.
   Backward: gradients of q/k/v are scatter-added by table row (dtab [V', 3HD]) and summed per
   position (dpos [T, 3HD]); then dW = A^T dtab + P^T dpos, db = sum(dpos), and the gradient of
   the input tables is dA = dtab W^T, dP = dpos W^T (+ the residual's gradient at the pooled row).

With more than one layer, layers 0..L-2 run the reference ops (numba attention core) and only
the last layer uses rewrite 1 on the dense residual stream.

Numba kernels: `cache=True`, no fastmath, serial (see the note above the kernels); the
scatter-add into the shared tables adds rows in order, as np.add.at does. Arithmetic stays in the
input dtype. With NUMBA_DISABLE_JIT=1 the same loops run as Python.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from minispatial import model, ops


def supports(cfg) -> bool:
    """Can `loss_and_grads_fast` compute this config? (LayerNorm and the MLP are not fused.)"""
    return not cfg.layernorm and not cfg.mlp


# --------------------------------------------------------------------------------------------
# kernels

# The kernels are serial. Each call does a millisecond or less of work, and on this project's
# 2-core machines, shared with other processes, a parallel launch can cost more than that: numba's
# default OpenMP layer took ~10 ms per `prange` launch while another process kept the cores busy.
# (On an idle machine `prange` over b halves the two attention kernels, 0.56 -> 0.29 ms at B 512;
# see benchmarks/README.md.) Each loop over the batch is written so that iteration b writes only
# rows b of its outputs, so it can become a `prange` without changing any sum.


@numba.njit(cache=True)
def _gather_add_kernel(tab, rows, pos, posidx, out):
    # tab [V', C], rows [N] int, pos [T, C], posidx [N] int -> fills out [N, C]
    #   out[n] = tab[rows[n]] + pos[posidx[n]]        (X W + b = (A W)[r] + (P W + b), rewrite 2)
    N, C = out.shape
    for n in range(N):                             # row n owns out[n]
        r = rows[n]
        t = posidx[n]
        for c in range(C):
            out[n, c] = tab[r, c] + pos[t, c]


@numba.njit(cache=True)
def _pooled_attention_forward_kernel(q, kv, n_keys, scale, z, pattern):
    # q [B, H, Dh] (the pooled row), kv [B, T, 2, H, Dh] (k = kv[:, :, 0], v = kv[:, :, 1]),
    # n_keys [B] -> fills z [B, H, Dh],
    # pattern [B, H, T] (zero for keys >= n_keys[b]: the causal mask of the EOT row)
    # replaces, for the pooled row only, ops.attention_core_forward (model.py: ops.attention_forward)
    B, T, _, H, Dh = kv.shape
    zero = q.dtype.type(0)
    for b in range(B):                             # b owns z[b], pattern[b]
        n = n_keys[b]
        for h in range(H):
            p = pattern[b, h]
            # scores = q . k^T * (1 / sqrt(Dh));  m = max
            m = zero
            for j in range(n):
                acc = zero
                for d in range(Dh):
                    acc += q[b, h, d] * kv[b, j, 0, h, d]
                s = acc * scale
                p[j] = s
                if j == 0 or s > m:
                    m = s
            # pattern = exp(scores - m) / sum
            total = zero
            for j in range(n):
                e = np.exp(p[j] - m)
                p[j] = e
                total += e
            for j in range(n):
                p[j] = p[j] / total
            for j in range(n, T):
                p[j] = zero
            # z = pattern @ v
            for d in range(Dh):
                z[b, h, d] = zero
            for j in range(n):
                pj = p[j]
                for d in range(Dh):
                    z[b, h, d] += pj * kv[b, j, 1, h, d]


@numba.njit(cache=True)
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


@numba.njit(cache=True)
def _scatter_rows_pos_kernel(rows, posidx, src, tab, pos):
    # rows [N] int, posidx [N] int, src [N, C] -> adds into zeroed tab [V', C] and pos [T, C]:
    #   tab[rows[n]] += src[n];  pos[posidx[n]] += src[n]      (backward of the gather above)
    # Serial (a few hundred microseconds at B = 512): rows are added in order n = 0..N-1, the
    # order np.add.at uses, and whole contiguous rows at a time so the inner loops vectorise.
    N, C = src.shape
    for n in range(N):
        tr = tab[rows[n]]
        pr = pos[posidx[n]]
        sr = src[n]
        for c in range(C):
            tr[c] += sr[c]
        for c in range(C):
            pr[c] += sr[c]


def gather_add(tab, rows, pos, posidx):
    # tab [V', C], rows [N], pos [T, C], posidx [N] -> out [N, C] = tab[rows] + pos[posidx]
    out = np.empty((rows.shape[0], tab.shape[1]), dtype=tab.dtype)
    _gather_add_kernel(np.ascontiguousarray(tab), rows, np.ascontiguousarray(pos), posidx, out)
    return out


def scatter_rows_pos(rows, posidx, src, n_rows: int, n_pos: int):
    # rows [N], posidx [N], src [N, C] -> dtab [n_rows, C], dpos [n_pos, C]
    tab = np.zeros((n_rows, src.shape[1]), dtype=src.dtype)
    pos = np.zeros((n_pos, src.shape[1]), dtype=src.dtype)
    _scatter_rows_pos_kernel(rows, posidx, np.ascontiguousarray(src), tab, pos)
    return tab, pos


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

def _qkv_weights(params, b: str):
    # -> W_qkv [D, 3HD] (Q | K | V, columns h-major as ops.attention_forward), b_qkv [3HD]
    Ws = [params[f"{b}.attn.W_{n}"] for n in ("Q", "K", "V")]               # each [H, D, Dh]
    W = np.concatenate([w.transpose(1, 0, 2).reshape(w.shape[1], -1) for w in Ws], axis=1)
    bias = np.concatenate([params[f"{b}.attn.b_{n}"].reshape(-1) for n in ("Q", "K", "V")])
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
    W_qkv, b_qkv = _qkv_weights(params, last)
    c = {"A": A, "r": r, "P": P, "pool": pool, "r_pool": r_pool, "n_keys": n_keys, "W_qkv": W_qkv}

    if n_layers == 1:
        # rewrite 2: q, k, v from the tables (model.py: ops.attention_forward's qkv = x2 @ W_qkv)
        AW = A @ W_qkv                                                     # [V', 3HD]
        PW = P @ W_qkv + b_qkv                                             # [T, 3HD], bias folded in
        kv = gather_add(AW[:, HD:], r.reshape(-1), PW[:, HD:], np.tile(np.arange(T), B))
        q = gather_add(AW[:, :HD], r_pool, PW[:, :HD], pool)               # [B, HD]
        x_pool = A[r_pool] + P[pool]                                       # x[b, p_b]  [B, D]
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
        x2 = x.reshape(B * T, D)
        kv = x2 @ W_qkv[:, HD:] + b_qkv[HD:]                               # [B*T, 2HD]
        x_pool = x[np.arange(B), pool]                                     # [B, D]
        q = x_pool @ W_qkv[:, :HD] + b_qkv[:HD]                            # [B, HD]
        c["x2"] = x2
    kv = kv.reshape(B, T, 2, H, Dh)                                        # k = kv[:, :, 0], v = kv[:, :, 1]
    q = q.reshape(B, H, Dh)
    # rewrite 1: the pooled row's attention, output projection and residual
    z, pattern = pooled_attention_forward(q, kv, n_keys)                 # [B, H, Dh], [B, H, T]
    W_O2 = params[f"{last}.attn.W_O"].reshape(HD, D)
    pooled = x_pool + (z.reshape(B, HD) @ W_O2 + params[f"{last}.attn.b_O"])   # [B, D]
    c.update(q=q, kv=kv, z=z, pattern=pattern, x_pool=x_pool)
    caches = {}
    if cfg.proj_dim:
        pooled, caches["proj"] = ops.linear_forward(pooled, params[f"{tower}.W_proj"])   # [B, E]
    feat, caches["l2"] = ops.l2norm_forward(pooled)
    return feat, (tower, s, c, caches)


def tower_backward_fast(dfeat, cache, params, cfg) -> dict:
    # dfeat [B, E] -> grads {name: array} of this tower          replaces model.tower_backward
    tower, s, c, caches = cache
    n_layers = cfg.layers(tower)
    last = f"{tower}.blocks.{n_layers - 1}"
    q, kv, z, pattern = c["q"], c["kv"], c["z"], c["pattern"]
    H, Dh = q.shape[1], q.shape[2]
    HD = H * Dh
    A, r, P, pool, r_pool, W_qkv = c["A"], c["r"], c["P"], c["pool"], c["r_pool"], c["W_qkv"]
    B, T = r.shape
    D = A.shape[1]
    g: dict[str, np.ndarray] = {}
    d = ops.l2norm_backward(dfeat, caches["l2"])                           # inverts feat = l2norm(pooled)
    if cfg.proj_dim:
        d, g[f"{tower}.W_proj"], _ = ops.linear_backward(d, caches["proj"])    # inverts pooled @ W_proj
    dpool = d                                                              # [B, D] = d pooled
    # inverts pooled = x_pool + z W_O + b_O  (the pooled row of the residual and of the output)
    g[f"{last}.attn.b_O"] = dpool.sum(axis=0)
    g[f"{last}.attn.W_O"] = (z.reshape(B, HD).T @ dpool).reshape(H, Dh, D)
    dz = (dpool @ params[f"{last}.attn.W_O"].reshape(HD, D).T).reshape(B, H, Dh)
    # inverts z, pattern = attention of the pooled row
    dq, dkv = pooled_attention_backward(dz, q, kv, pattern, c["n_keys"])
    dkv = dkv.reshape(B * T, 2 * HD)                                       # [dk | dv] per row
    dq = dq.reshape(B, HD)

    if n_layers == 1:
        # inverts kv = (A W_kv)[r] + (P W_kv + b_kv): scatter by table row, sum per position
        dkv_tab, dkv_pos = scatter_rows_pos(r.reshape(-1), np.tile(np.arange(T), B), dkv, A.shape[0], T)
        # inverts q = (A W_Q)[r_pool] + (P W_Q + b_Q) and the residual x_pool = A[r_pool] + P[pool]:
        # one scatter of [dq | dpool] by the pooled row's table row and position
        dqp_tab, dqp_pos = scatter_rows_pos(r_pool, pool, np.concatenate([dq, dpool], axis=1), A.shape[0], T)
        dtab = np.concatenate([dqp_tab[:, :HD], dkv_tab], axis=1)          # [V', 3HD]
        dpos = np.concatenate([dqp_pos[:, :HD], dkv_pos], axis=1)          # [T, 3HD]
        # inverts AW = A W_qkv, PW = P W_qkv + b_qkv
        _split_qkv_grads(g, last, A.T @ dtab + P.T @ dpos, dpos.sum(axis=0), H, Dh)
        dA = dtab @ W_qkv.T + dqp_tab[:, HD:]                              # [V', D]
        dP = dpos @ W_qkv.T + dqp_pos[:, HD:]                              # [T, D]
    else:
        x2 = c["x2"]
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
                                          tower_forward_fast, tower_backward_fast)


def warmup(dtypes=("float32", "float64")) -> None:
    """Compile (or load from the numba cache) every kernel of this file for each dtype."""
    import dataclasses

    for dt in dtypes:
        cfg = dataclasses.replace(model.ModelConfig(), d_model=4, n_heads=2, d_head=2, dtype=dt,
                                  vision_vocab=3, text_vocab=4, vision_ctx=3, text_ctx=3)
        params = model.init_params(cfg, 0)
        loss_and_grads_fast(params, np.array([[1, 2], [0, 1]]), np.array([[2, 1, 3], [3, 1, 0]]),
                            np.array([2, 1]), cfg)
