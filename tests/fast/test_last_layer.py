"""last_layer.py (rewrite 1) on raw arrays: the pooled row's attention kernels and the weight
packing against the reference model's dense attention, for every pooled row and key count."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minispatial import ops
from minispatial.fast import last_layer, reference


@st.composite
def streams(draw):
    # -> x [B, T, D], attention weights p, pool [B], n_keys [B] (causal or all keys), dtype
    B, T, D, H, Dh = (draw(st.integers(1, n)) for n in (5, 6, 7, 3, 5))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = {n: (0.7 * rng.standard_normal(s)).astype(dtype) for n, s in (
        ("W_Q", (H, D, Dh)), ("b_Q", (H, Dh)), ("W_K", (H, D, Dh)), ("b_K", (H, Dh)),
        ("W_V", (H, D, Dh)), ("b_V", (H, Dh)), ("W_O", (H, Dh, D)), ("b_O", (D,)))}
    pool = rng.integers(0, T, B)
    causal = draw(st.booleans())
    n_keys = pool + 1 if causal else np.full(B, T)
    return rng.standard_normal((B, T, D)).astype(dtype), p, pool, n_keys, causal


@settings(deadline=None)
@given(streams())
def test_pooled_row_equals_the_dense_layer_at_the_pooled_row(inp):
    # the dense layer (ops.attention_forward/backward, NumPy) read at the pooled row, with its
    # gradient entering at that row only, is what rewrite 1 computes
    x, p, pool, n_keys, causal = inp
    B = x.shape[0]
    rel = 1e-10 if x.dtype == np.float64 else 1e-4
    params = {f"blk.attn.{n}": a for n, a in p.items()}
    pooled, saved = last_layer.pooled_row_forward(x, params, "blk", pool, n_keys)
    out, cache = ops.attention_forward(x, p, causal)          # causal: row p_b sees keys 0..p_b
    want = (x + out)[np.arange(B), pool]
    assert np.abs(pooled - want).max() <= rel * max(1.0, np.abs(want).max())
    dpool = np.random.default_rng(0).standard_normal(pooled.shape).astype(x.dtype)
    g = {}
    dx = last_layer.pooled_row_backward(dpool, saved, params, "blk", g)
    dfull = np.zeros_like(x)
    dfull[np.arange(B), pool] = dpool
    dx_want, g_want = ops.attention_backward(dfull, cache, p)
    dx_want = dx_want + dfull
    scale = max(1.0, max(np.abs(v).max() for v in g_want.values()))
    assert np.abs(dx - dx_want).max() <= rel * scale
    for n, v in g_want.items():
        assert g[f"blk.attn.{n}"].dtype == v.dtype
        assert np.abs(g[f"blk.attn.{n}"] - v).max() <= rel * scale, n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooled_attention_kernels_equal_the_reference(dtype):
    # the kernels against reference.pooled_row_* at every key count 1..T (keys beyond n_b: zero)
    rng = np.random.default_rng(4)
    B, T, D, H, Dh = 6, 5, 8, 2, 4
    x = rng.standard_normal((B, T, D))
    p = {n: 0.5 * rng.standard_normal(s) for n, s in (
        ("W_Q", (H, D, Dh)), ("b_Q", (H, Dh)), ("W_K", (H, D, Dh)), ("b_K", (H, Dh)),
        ("W_V", (H, D, Dh)), ("b_V", (H, Dh)), ("W_O", (H, Dh, D)), ("b_O", (D,)))}
    pool, n_keys = np.array([0, 4, 2, 1, 3, 4]), np.array([1, 5, 3, 2, 4, 2])
    want, ref = reference.pooled_row_forward(x, p, pool, n_keys)
    q, k, v = (ref[n].astype(dtype) for n in ("q", "k", "v"))
    kv = np.ascontiguousarray(np.stack([k, v], axis=2))                   # [B, T, 2, H, Dh]
    z, pattern = last_layer.pooled_attention_forward(q, kv, n_keys)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert z.dtype == pattern.dtype == dtype
    assert np.abs(pattern - ref["pattern"]).max() <= tol and np.abs(z - ref["z"]).max() <= tol
    beyond = np.broadcast_to(np.arange(T)[None, None, :] >= n_keys[:, None, None], pattern.shape)
    assert (pattern[beyond] == 0).all()
    dz = rng.standard_normal(z.shape)
    dq, dkv = last_layer.pooled_attention_backward(dz.astype(dtype), q, kv, pattern, n_keys)
    dpattern = np.einsum("bhe,bthe->bht", dz, ref["v"])
    ds = reference.softmax_backward(dpattern, ref["pattern"], Dh)
    assert np.abs(dq - np.einsum("bht,bthe->bhe", ds, ref["k"])).max() <= tol * 10
    assert np.abs(dkv[:, :, 0] - np.einsum("bht,bhe->bthe", ds, ref["q"])).max() <= tol * 10
    assert np.abs(dkv[:, :, 1] - np.einsum("bht,bhe->bthe", ref["pattern"], dz)).max() <= tol * 10


def test_qkv_weights_pack_as_the_dense_layer_and_split_back():
    rng = np.random.default_rng(0)
    H, D, Dh = 3, 5, 2
    params = {f"b.attn.{n}": rng.standard_normal((H, D, Dh)) for n in ("W_Q", "W_K", "W_V")}
    params.update({f"b.attn.{n}": rng.standard_normal((H, Dh)) for n in ("b_Q", "b_K", "b_V")})
    W, bias = last_layer.qkv_weights(params, "b")
    want = np.concatenate([params[f"b.attn.W_{n}"].transpose(1, 0, 2).reshape(D, H * Dh) for n in "QKV"], axis=1)
    assert np.array_equal(W, want)                 # ops.attention_forward's W_qkv
    assert np.array_equal(bias, np.concatenate([params[f"b.attn.b_{n}"].reshape(-1) for n in "QKV"]))
    g = {}
    last_layer.split_qkv_grads(g, "b", W, bias, H, Dh)
    assert all(np.array_equal(g[n], params[n]) for n in params)
