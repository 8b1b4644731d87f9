"""Every layer of minispatial as a forward/backward pair, in plain NumPy (the reference).

Legend of dimension letters, used in every shape comment:
    B batch, T tokens (sequence), D d_model, H heads, Dh d_head, V vocabulary,
    F MLP hidden width, E feature (embedding) width, N rows (B*T flattened)

Conventions (llm.c style, NumPy spelling):
- `<op>_forward(...)` returns `(out, cache)`; `cache` holds what the backward needs.
- `<op>_backward(dout, cache)` *returns* gradients (never accumulates into buffers).
- Each backward comments the forward line it inverts.
- NumPy only. The attention core (the one O(T^2) operation) can be swapped for another
  implementation of the same sums (`AttentionCore`); minispatial/fast/ passes its numba kernels
  that way. Nothing here knows about them.

Weights follow TransformerLens shapes: W_Q, W_K, W_V [H, D, Dh]; W_O [H, Dh, D]; b_Q, b_K, b_V
[H, Dh]; b_O [D]. q, k, v and z are kept as [B, T, H, Dh] (TransformerLens `hook_q` layout).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

# --------------------------------------------------------------------------------------------
# input checks: clear errors instead of silent broadcasting deep inside NumPy

def check_array(name: str, a, ndim: int | None = None, shape: tuple | None = None,
                dtype=None) -> None:
    """Raise ValueError naming `name` when `a` is not an ndarray of the given ndim/shape/dtype.
    In `shape`, None matches any size."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} has shape {a.shape}: expected {ndim} dimensions")
    if shape is not None:
        if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} has shape {a.shape}: expected {want}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype}: expected {np.dtype(dtype)} (dtypes must match)")


def check_float(name: str, a) -> None:
    if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a float32 or float64 array, got {got}")


def check_ids(name: str, ids, V: int) -> None:
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got "
                         f"{ids.dtype if isinstance(ids, np.ndarray) else type(ids).__name__}")
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        bad = ids[(ids < 0) | (ids >= V)].ravel()[0]
        raise ValueError(f"{name} contains id {int(bad)} outside the vocabulary [0, {V - 1}]")


# --------------------------------------------------------------------------------------------
# token embedding

def embedding_forward(W_E, ids):
    # W_E [V, D], ids [B, T] int -> out [B, T, D]
    check_float("W_E", W_E)
    check_array("W_E", W_E, ndim=2)
    check_ids("ids", ids, W_E.shape[0])
    return W_E[ids], (ids, W_E.shape[0])


def embedding_backward(dout, cache):
    # dout [B, T, D] -> dW_E [V, D]
    # inverts: out = W_E[ids]  -> every occurrence of an id adds its row (repeated ids add up)
    ids, V = cache
    D = dout.shape[-1]
    return scatter_add_rows(ids.reshape(-1), dout.reshape(-1, D), V)


def scatter_add_rows(idx, src, V: int):
    # idx [N] int, src [N, D] -> out [V, D] with out[idx[n]] += src[n]
    out = np.zeros((V, src.shape[1]), dtype=src.dtype)
    np.add.at(out, idx, src)
    return out


# --------------------------------------------------------------------------------------------
# learned absolute position embedding (added to the first T rows of W_pos)

def pos_embedding_forward(x, W_pos):
    # x [B, T, D], W_pos [T_max, D] -> out [B, T, D]
    check_array("W_pos", W_pos, ndim=2, dtype=x.dtype)
    T = x.shape[1]
    if W_pos.shape[0] < T or W_pos.shape[1] != x.shape[2]:
        raise ValueError(f"W_pos has shape {W_pos.shape}: needs at least {T} rows of width {x.shape[2]}")
    return x + W_pos[:T], (T, W_pos.shape[0])


def pos_embedding_backward(dout, cache):
    # dout [B, T, D] -> dx [B, T, D], dW_pos [T_max, D]
    # inverts: out = x + W_pos[:T]  -> dx = dout, dW_pos[:T] = sum over the batch
    T, T_max = cache
    dW_pos = np.zeros((T_max, dout.shape[2]), dtype=dout.dtype)
    dW_pos[:T] = dout.sum(axis=0)
    return dout, dW_pos


# --------------------------------------------------------------------------------------------
# CLS token prepended to the vision sequence

def prepend_cls_forward(x, cls):
    # x [B, T, D], cls [D] -> out [B, 1+T, D]
    B, T, D = x.shape
    check_array("cls", cls, shape=(D,), dtype=x.dtype)
    out = np.empty((B, T + 1, D), dtype=x.dtype)
    out[:, 0] = cls
    out[:, 1:] = x
    return out, None


def prepend_cls_backward(dout, cache):
    # dout [B, 1+T, D] -> dx [B, T, D], dcls [D]
    # inverts: out[:, 0] = cls; out[:, 1:] = x
    return dout[:, 1:], dout[:, 0].sum(axis=0)


# --------------------------------------------------------------------------------------------
# linear layer  y = x W + b  over the last axis

def linear_forward(x, W, b=None):
    # x [..., Din], W [Din, Dout], b [Dout] or None -> y [..., Dout]
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"linear: x has shape {x.shape} but W has shape {W.shape}")
    if x.dtype != W.dtype:
        raise ValueError(f"linear: x has dtype {x.dtype} but W has dtype {W.dtype} (dtypes must match)")
    y = x.reshape(-1, W.shape[0]) @ W
    if b is not None:
        check_array("b", b, shape=(W.shape[1],), dtype=x.dtype)
        y += b
    return y.reshape(*x.shape[:-1], W.shape[1]), (x, W, b is not None)


def linear_backward(dy, cache):
    # dy [..., Dout] -> dx [..., Din], dW [Din, Dout], db [Dout] or None
    # inverts: y = x @ W + b
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, W.shape[1])
    dx = (dy2 @ W.T).reshape(x.shape)
    dW = x.reshape(-1, W.shape[0]).T @ dy2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dW, db


# --------------------------------------------------------------------------------------------
# pooling (CLS / EOT gather)

def pool_forward(x, idx):
    # x [B, T, D], idx [B] int (row to keep per batch element) -> out [B, D]
    B, T, _ = x.shape
    check_array("pool idx", idx, shape=(B,))
    if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= T)):
        raise ValueError(f"pool idx must be integer positions in [0, {T - 1}], got {idx}")
    return x[np.arange(B), idx], (x.shape, idx)


def pool_backward(dout, cache):
    # dout [B, D] -> dx [B, T, D]
    # inverts: out = x[arange(B), idx]  -> the gathered rows get dout, the others zero
    shape, idx = cache
    dx = np.zeros(shape, dtype=dout.dtype)
    dx[np.arange(shape[0]), idx] = dout
    return dx


# --------------------------------------------------------------------------------------------
# LayerNorm (eps 1e-5) over the last axis

LN_EPS = 1e-5


def layernorm_forward(x, w, b):
    # x [..., D], w [D], b [D] -> y [..., D]
    check_array("w", w, shape=(x.shape[-1],), dtype=x.dtype)
    check_array("b", b, shape=(x.shape[-1],), dtype=x.dtype)
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    # dy [..., D] -> dx [..., D], dw [D], db [D]
    # inverts: y = (x - mean) * rstd * w + b
    xhat, rstd, w = cache
    lead = tuple(range(dy.ndim - 1))
    dw = (dy * xhat).sum(axis=lead)
    db = dy.sum(axis=lead)
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# GELU (tanh approximation, as GPT-2) and the MLP block  x -> gelu(x W_in + b_in) W_out + b_out

_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    # x [...] -> y [...]
    t = np.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    # inverts: y = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
    x, t = cache
    dt = _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt)


def mlp_forward(x, W_in, b_in, W_out, b_out):
    # x [B, T, D], W_in [D, F], b_in [F], W_out [F, D], b_out [D] -> y [B, T, D]
    h, c1 = linear_forward(x, W_in, b_in)
    a, c2 = gelu_forward(h)
    y, c3 = linear_forward(a, W_out, b_out)
    return y, (c1, c2, c3)


def mlp_backward(dy, cache):
    # dy [B, T, D] -> dx, dW_in, db_in, dW_out, db_out
    c1, c2, c3 = cache
    da, dW_out, db_out = linear_backward(dy, c3)   # inverts y = a W_out + b_out
    dh = gelu_backward(da, c2)                      # inverts a = gelu(h)
    dx, dW_in, db_in = linear_backward(dh, c1)      # inverts h = x W_in + b_in
    return dx, dW_in, db_in, dW_out, db_out


# --------------------------------------------------------------------------------------------
# multi-head self-attention

def causal_mask(T: int):
    # -> mask [T, T] bool, True where query q may attend to key k (k <= q)
    return np.tril(np.ones((T, T), dtype=bool))


def run_hook(hooks, record, name, value):
    """Let a caller read (`record[name]`) or replace (`hooks[name](value)`) an intermediate."""
    if hooks is not None and name in hooks:
        new = hooks[name](value)
        if new is not None:
            if new.shape != value.shape:
                raise ValueError(f"hook {name} returned shape {new.shape}, expected {value.shape}")
            value = new.astype(value.dtype, copy=False)
    if record is not None:
        record[name] = value
    return value


def softmax_forward(scores, mask=None):
    # scores [..., Tq, Tk], mask [Tq, Tk] bool or None -> pattern [..., Tq, Tk]
    # masked keys get exactly zero probability (exp(-inf) = 0)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - m)
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dpattern, pattern):
    # dpattern [..., Tq, Tk], pattern [..., Tq, Tk] -> dscores [..., Tq, Tk]
    # inverts: p = exp(s) / sum(exp(s))  ->  ds = p * (dp - <dp, p>_row); masked: p = 0 -> ds = 0
    return pattern * (dpattern - (dpattern * pattern).sum(axis=-1, keepdims=True))


def attention_core_forward(q, k, v, causal: bool, hooks=None, record=None, prefix=""):
    # q, k, v [B, T, H, Dh] -> z [B, T, H, Dh], pattern [B, H, T, T]
    # hook_attn_scores is recorded after the causal mask (masked keys -inf), as in TransformerLens
    Dh = q.shape[-1]
    T = q.shape[1]
    qh = q.transpose(0, 2, 1, 3)                                   # [B, H, T, Dh]
    kh = k.transpose(0, 2, 3, 1)                                   # [B, H, Dh, T]
    scores = (qh @ kh) * (1.0 / math.sqrt(Dh))                     # [B, H, Tq, Tk]
    mask = causal_mask(T) if causal else None
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    scores = run_hook(hooks, record, prefix + "hook_attn_scores", scores)
    pattern = softmax_forward(scores, mask)                        # (the mask again: a hook may
    pattern = run_hook(hooks, record, prefix + "hook_pattern", pattern)   # have edited masked keys)
    z = (pattern @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # [B, T, H, Dh]
    return np.ascontiguousarray(z), pattern


def attention_core_backward(dz, q, k, v, pattern):
    # dz [B, T, H, Dh] -> dq, dk, dv [B, T, H, Dh]
    scale = 1.0 / math.sqrt(q.shape[-1])
    dzh = dz.transpose(0, 2, 1, 3)                                 # [B, H, T, Dh]
    # inverts: z = pattern @ v
    dpattern = dzh @ v.transpose(0, 2, 3, 1)                       # [B, H, Tq, Tk]
    dv = (pattern.transpose(0, 1, 3, 2) @ dzh).transpose(0, 2, 1, 3)
    # inverts: pattern = softmax(scores)   (masked entries have pattern 0, so dscores 0)
    dscores = softmax_backward(dpattern, pattern) * scale
    # inverts: scores = q @ k^T * scale
    dq = (dscores @ k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    dk = (dscores.transpose(0, 1, 3, 2) @ q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    return (np.ascontiguousarray(dq), np.ascontiguousarray(dk), np.ascontiguousarray(dv))


class AttentionCore(NamedTuple):
    """An implementation of the attention core pair above: forward(q, k, v, causal) -> (z,
    pattern) and backward(dz, q, k, v, pattern) -> (dq, dk, dv), the same sums (minispatial/fast/
    has one in numba kernels). attention_forward(core=...) uses it when no hook is asked for."""
    forward: Callable
    backward: Callable


NUMPY_CORE = AttentionCore(attention_core_forward, attention_core_backward)


ATTN_PARAMS = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")


def check_attention_params(x, p: dict) -> None:
    """Shapes and dtypes of an attention block's weights against its input x [B, T, D]."""
    check_float("x", x)
    check_array("x", x, ndim=3)
    D = x.shape[2]
    H, _, Dh = p["W_Q"].shape if p["W_Q"].ndim == 3 else (None, None, None)
    if H is None:
        raise ValueError(f"W_Q has shape {p['W_Q'].shape}: expected [H, D, Dh]")
    want = {"W_Q": (H, D, Dh), "W_K": (H, D, Dh), "W_V": (H, D, Dh), "W_O": (H, Dh, D),
            "b_Q": (H, Dh), "b_K": (H, Dh), "b_V": (H, Dh), "b_O": (D,)}
    for name, shape in want.items():
        check_array(name, p[name], shape=shape, dtype=x.dtype)


def attention_forward(x, p: dict, causal: bool, hooks=None, record=None, prefix="", core=None):
    # x [B, T, D], p: W_Q/W_K/W_V [H, D, Dh], W_O [H, Dh, D], b_Q/b_K/b_V [H, Dh], b_O [D]
    #   -> out [B, T, D], cache
    # `hooks`/`record` (dicts keyed by f"{prefix}hook_q" ... "hook_attn_scores", "hook_pattern",
    # "hook_z") read or edit intermediates. `core` (an AttentionCore, default NUMPY_CORE) computes
    # z and the pattern; with hooks the NumPy core runs, since only it has them.
    check_attention_params(x, p)
    B, T, D = x.shape
    H, _, Dh = p["W_Q"].shape
    x2 = x.reshape(B * T, D)
    # one GEMM for the three projections: [N, D] @ [D, 3*H*Dh]
    W_qkv = np.concatenate([p[n].transpose(1, 0, 2).reshape(D, H * Dh) for n in ("W_Q", "W_K", "W_V")], axis=1)
    qkv = x2 @ W_qkv
    q = (qkv[:, :H * Dh].reshape(B, T, H, Dh) + p["b_Q"])          # [B, T, H, Dh]
    k = (qkv[:, H * Dh:2 * H * Dh].reshape(B, T, H, Dh) + p["b_K"])
    v = (qkv[:, 2 * H * Dh:].reshape(B, T, H, Dh) + p["b_V"])
    if hooks is not None or record is not None or core is None:
        core = NUMPY_CORE
        q = run_hook(hooks, record, prefix + "hook_q", q)
        k = run_hook(hooks, record, prefix + "hook_k", k)
        v = run_hook(hooks, record, prefix + "hook_v", v)
        z, pattern = attention_core_forward(q, k, v, causal, hooks, record, prefix)
        z = run_hook(hooks, record, prefix + "hook_z", z)
    else:
        z, pattern = core.forward(q, k, v, causal)
    W_O2 = p["W_O"].reshape(H * Dh, D)
    out = (z.reshape(B * T, H * Dh) @ W_O2 + p["b_O"]).reshape(B, T, D)
    return out, (x2, W_qkv, q, k, v, z, pattern, core, (B, T, D, H, Dh))


def attention_backward(dout, cache, p: dict) -> tuple[np.ndarray, dict]:
    # dout [B, T, D] -> dx [B, T, D], grads {W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O}
    x2, W_qkv, q, k, v, z, pattern, core, (B, T, D, H, Dh) = cache
    dout2 = dout.reshape(B * T, D)
    g = {}
    # inverts: out = z W_O + b_O
    g["b_O"] = dout2.sum(axis=0)
    g["W_O"] = (z.reshape(B * T, H * Dh).T @ dout2).reshape(H, Dh, D)
    dz = (dout2 @ p["W_O"].reshape(H * Dh, D).T).reshape(B, T, H, Dh)
    # inverts: z, pattern = attention core(q, k, v)
    dq, dk, dv = core.backward(dz, q, k, v, pattern)
    # inverts: q = x W_Q + b_Q (and k, v): one GEMM each way on the stacked [N, 3*H*Dh]
    dqkv = np.concatenate([dq.reshape(B * T, H * Dh), dk.reshape(B * T, H * Dh),
                           dv.reshape(B * T, H * Dh)], axis=1)
    dW_qkv = x2.T @ dqkv                                            # [D, 3*H*Dh]
    for i, n in enumerate(("Q", "K", "V")):
        g["W_" + n] = dW_qkv[:, i * H * Dh:(i + 1) * H * Dh].reshape(D, H, Dh).transpose(1, 0, 2).copy()
    g["b_Q"] = dq.sum(axis=(0, 1))
    g["b_K"] = dk.sum(axis=(0, 1))
    g["b_V"] = dv.sum(axis=(0, 1))
    dx = (dqkv @ W_qkv.T).reshape(B, T, D)
    return dx, g


# --------------------------------------------------------------------------------------------
# L2 normalisation of feature rows

def l2norm_forward(x):
    # x [B, E] -> y [B, E], each row of unit length
    n = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    y = x / n
    return y, (y, n)


def l2norm_backward(dy, cache):
    # dy [B, E] -> dx [B, E]
    # inverts: y = x / |x|  ->  dx = (dy - y <dy, y>) / |x|
    y, n = cache
    return (dy - y * (dy * y).sum(axis=-1, keepdims=True)) / n


# --------------------------------------------------------------------------------------------
# symmetric CLIP (InfoNCE) loss

def _logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def clip_loss_forward(img, txt, logit_scale):
    # img [B, E], txt [B, E] (unit rows), logit_scale: 0-d array tau -> loss scalar
    #   logits = exp(tau) * img @ txt^T        [B, B]; the matching pairs are on the diagonal
    #   loss   = ( CE(image->text rows) + CE(text->image columns) ) / 2
    if img.shape != txt.shape:
        raise ValueError(f"clip loss: image features {img.shape} and text features {txt.shape} differ")
    if img.dtype != txt.dtype:
        raise ValueError(f"clip loss: dtypes {img.dtype} and {txt.dtype} differ")
    check_array("logit_scale", np.asarray(logit_scale), shape=())
    s = np.exp(logit_scale)
    logits = s * (img @ txt.T)
    diag = np.diagonal(logits)
    loss_i2t = (_logsumexp(logits, 1) - diag).mean()
    loss_t2i = (_logsumexp(logits, 0) - diag).mean()
    loss = 0.5 * (loss_i2t + loss_t2i)
    return loss, (img, txt, s, logits)


def clip_loss_backward(dloss, cache):
    # dloss scalar -> dimg [B, E], dtxt [B, E], dlogit_scale scalar
    img, txt, s, logits = cache
    B = logits.shape[0]
    eye = np.eye(B, dtype=logits.dtype)
    # inverts: loss = (mean_i[lse_row_i - diag_i] + mean_j[lse_col_j - diag_j]) / 2
    p_rows = np.exp(logits - logits.max(axis=1, keepdims=True))
    p_rows /= p_rows.sum(axis=1, keepdims=True)
    p_cols = np.exp(logits - logits.max(axis=0, keepdims=True))
    p_cols /= p_cols.sum(axis=0, keepdims=True)
    dlogits = dloss * ((p_rows - eye) + (p_cols - eye)) / (2.0 * B)
    # inverts: logits = s * img @ txt^T  (d logits / d tau = logits, since s = exp(tau))
    dimg = s * (dlogits @ txt)
    dtxt = s * (dlogits.T @ img)
    dtau = (dlogits * logits).sum()
    return dimg, dtxt, np.asarray(dtau, dtype=logits.dtype)
