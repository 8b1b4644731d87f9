"""A multi-layer tower: the dense layers 0..L-2, then the last layer for the pooled row only
(rewrite 1): forward and backward.

Legend (every shape comment): B batch, T tokens, D d_model, H heads, Dh d_head, HD = H*Dh,
V' rows of the token table A, p_b the pooled row of sample b (0 for vision, eot[b] for text),
n_b the keys it attends to (T for vision; eot[b] + 1 for text: the causal mask of row eot).
    x [B, T, D]         the residual stream entering the last layer
    x_pool [B, D]       its pooled row, x[b, p_b]
    kv [B, T, 2, H, Dh] k (kv[:, :, 0]) and v (kv[:, :, 1]) of every row
    q [B, H, Dh]        the pooled row's query;  z [B, H, Dh];  pattern [B, H, T]

Layers 0..L-2 are model.py's: ops.attention_forward/backward with the numba attention core
(ATTENTION_CORE), so their numbers are the reference model's with that core.

1. Pooled row only, in the LAST layer. The feature reads one row of the last layer's output, so
   the last layer needs k and v of every row but q, the attention pattern, z, the output
   projection and the residual add of that one row only:
        q_b = x_pool[b] W_Q + b_Q                                 [B, HD]  (not [B, T, HD])
        pattern[b, h, :] = softmax(q_b,h . k[b, :, h] / sqrt(Dh)) over keys 0..n_b-1
        pooled_b = x_pool[b] + z_b W_O + b_O                      [B, D]
   Backward: only that row's gradient flows into W_O, W_Q and the softmax; k and v get
   gradients on every row the pooled query attends to.
`pooled_row_forward/backward` are rewrite 1, `forward/backward` the tower. products.py lists the
matrix products (`last_layer_products`); reference.py writes the same sums in plain NumPy
(`pooled_row_forward`, `pooled_row_backward`).
"""

from __future__ import annotations

import math

import numpy as np

from minispatial import model, ops
from minispatial.fast import kernels
from minispatial.fast.attention_core import scatter_add_rows


def pooled_attention_forward(q, kv, n_keys):
    # q [B, H, Dh], kv [B, T, 2, H, Dh] (k | v), n_keys [B] -> z [B, H, Dh], pattern [B, H, T]
    B, T, _, H, Dh = kv.shape
    scale = q.dtype.type(1.0 / math.sqrt(Dh))      # as the reference: python scale in the dtype
    z = np.empty((B, H, Dh), dtype=q.dtype)
    pattern = np.empty((B, H, T), dtype=q.dtype)
    kernels.pooled_attention_forward_kernel(q, kv, n_keys, scale, z, pattern)
    return z, pattern


def pooled_attention_backward(dz, q, kv, pattern, n_keys):
    # dz [B, H, Dh] -> dq [B, H, Dh], dkv [B, T, 2, H, Dh] (zero for keys the row does not see)
    Dh = q.shape[-1]
    scale = q.dtype.type(1.0 / math.sqrt(Dh))
    dq = np.empty_like(q)
    dkv = np.empty_like(kv)
    kernels.pooled_attention_backward_kernel(np.ascontiguousarray(dz), q, kv, pattern, n_keys, scale, dq, dkv)
    return dq, dkv


def qkv_weights(params, block: str):
    # -> W_qkv [D, 3HD] (Q | K | V, columns h-major as ops.attention_forward), b_qkv [3HD]
    Ws = [params[f"{block}.attn.W_{n}"] for n in "QKV"]                    # each [H, D, Dh]
    H, D, Dh = Ws[0].shape
    HD = H * Dh
    W = np.empty((D, 3 * HD), dtype=Ws[0].dtype)
    for i, w in enumerate(Ws):
        kernels.pack_weight_kernel(w, W[:, i * HD:(i + 1) * HD])
    bias = np.concatenate([params[f"{block}.attn.b_{n}"].reshape(-1) for n in "QKV"])
    return W, bias


def split_qkv_grads(g: dict, block: str, dW_qkv, db_qkv, H: int, Dh: int) -> None:
    # dW_qkv [D, 3HD], db_qkv [3HD] -> g[W_Q|W_K|W_V] [H, D, Dh], g[b_Q|b_K|b_V] [H, Dh]
    D, HD = dW_qkv.shape[0], H * Dh
    for i, n in enumerate("QKV"):
        g[f"{block}.attn.W_{n}"] = dW_qkv[:, i * HD:(i + 1) * HD].reshape(D, H, Dh).transpose(1, 0, 2).copy()
        g[f"{block}.attn.b_{n}"] = db_qkv[i * HD:(i + 1) * HD].reshape(H, Dh).copy()


def pooled_row_forward(x, params, block: str, pool, n_keys):
    # x [B, T, D] (the stream entering the block), pool [B], n_keys [B] -> pooled [B, D], saved
    #   rewrite 1: the block's attention and residual add for the pooled row only
    B, T, D = x.shape
    H, _, Dh = params[f"{block}.attn.W_Q"].shape
    HD = H * Dh
    W_qkv, b_qkv = qkv_weights(params, block)
    x2 = x.reshape(B * T, D)
    kv = (x2 @ W_qkv[:, HD:] + b_qkv[HD:]).reshape(B, T, 2, H, Dh)        # k, v of every row
    x_pool = x[np.arange(B), pool]                                         # [B, D]
    q = (x_pool @ W_qkv[:, :HD] + b_qkv[:HD]).reshape(B, H, Dh)            # q of the pooled row
    z, pattern = pooled_attention_forward(q, kv, n_keys)
    W_O2 = params[f"{block}.attn.W_O"].reshape(HD, D)
    pooled = x_pool + (z.reshape(B, HD) @ W_O2 + params[f"{block}.attn.b_O"])   # [B, D]
    saved = dict(W_qkv=W_qkv, x2=x2, kv=kv, x_pool=x_pool, q=q, z=z, pattern=pattern, pool=pool,
                 n_keys=n_keys)
    return pooled, saved


def pooled_row_backward(dpool, saved, params, block: str, g: dict):
    # dpool [B, D] -> dx [B, T, D] (the stream entering the block); the block's gradients go into g
    kv, z, x2, q, W_qkv, pool = (saved[k] for k in ("kv", "z", "x2", "q", "W_qkv", "pool"))
    B, T, _, H, Dh = kv.shape
    HD = H * Dh
    D = x2.shape[1]
    W_O = params[f"{block}.attn.W_O"]                                      # [H, Dh, D]
    g[f"{block}.attn.b_O"] = dpool.sum(axis=0)
    # inverts pooled = x_pool + z W_O + b_O  (the pooled row of the residual and of the output)
    g[f"{block}.attn.W_O"] = (z.reshape(B, HD).T @ dpool).reshape(H, Dh, D)
    dz = (dpool @ W_O.reshape(HD, D).T).reshape(B, H, Dh)
    # inverts z, pattern = attention of the pooled row
    dq, dkv = pooled_attention_backward(dz, q, kv, saved["pattern"], saved["n_keys"])
    dkv = dkv.reshape(B * T, 2 * HD)                                       # [dk | dv] per row
    dq = dq.reshape(B, HD)
    # inverts kv = x2 W_kv + b_kv and q = x_pool W_Q + b_Q (plus the residual at the pooled row)
    dW_qkv = np.concatenate([saved["x_pool"].T @ dq, x2.T @ dkv], axis=1)
    db_qkv = np.concatenate([dq.sum(axis=0), dkv.sum(axis=0)])
    split_qkv_grads(g, block, dW_qkv, db_qkv, H, Dh)
    dx = (dkv @ W_qkv[:, HD:].T).reshape(B, T, D)
    dx[np.arange(B), pool] += dq @ W_qkv[:, :HD].T + dpool
    return dx


def forward(params, tower: str, n_layers: int, tables, core):
    # tables (step.Tables), core: the dense layers' attention core -> pooled [B, D], saved
    # layers 0..L-2: the reference blocks, dense x [B, T, D]
    x = tables.A[tables.r] + tables.P
    layer_caches = []
    for l in range(n_layers - 1):
        a, ac = ops.attention_forward(x, model.attn_params(params, f"{tower}.blocks.{l}"),
                                      tower == "text", core=core)
        layer_caches.append(ac)
        x = x + a
    pooled, saved = pooled_row_forward(x, params, f"{tower}.blocks.{n_layers - 1}", tables.pool, tables.n_keys)
    return pooled, dict(saved, tables=tables, layers=layer_caches)


def backward(dpool, saved, params, tower: str, n_layers: int, g: dict):
    # dpool [B, D] -> (dA [V', D], dP [T, D]); the layers' gradients go into g
    dx = pooled_row_backward(dpool, saved, params, f"{tower}.blocks.{n_layers - 1}", g)
    # layers L-2..0: the reference backward; inverts x = x + attn(x)
    for l in reversed(range(n_layers - 1)):
        dh, ga = ops.attention_backward(dx, saved["layers"][l], model.attn_params(params, f"{tower}.blocks.{l}"))
        for n, gv in ga.items():
            g[f"{tower}.blocks.{l}.attn.{n}"] = gv
        dx = dx + dh
    # inverts x = A[r] + P
    tables = saved["tables"]
    B, T, D = dx.shape
    dA = scatter_add_rows(tables.r.reshape(-1), dx.reshape(B * T, D), tables.A.shape[0])
    return dA, dx.sum(axis=0)
