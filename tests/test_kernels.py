"""The numba kernels equal their NumPy references (ops.py), jitted and with NUMBA_DISABLE_JIT=1.

Tolerances: rtol = 1e-10 in float64, 1e-5 in float32, and atol the same times the array's
largest magnitude (at least 1): a float32 gradient element that is a small difference of large
terms (sharp softmax, inputs ~ 4 sigma) legitimately differs by ~1e-5 of the array's scale.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minispatial import kernels, ops

TOL = {np.float64: 1e-10, np.float32: 1e-5}


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype == dtype
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@st.composite
def attention_inputs(draw):
    # -> dtype, causal, parallel, q, k, v, dz [B, T, H, Dh] (some non-contiguous views)
    B, T, H, Dh = (draw(st.integers(1, n)) for n in (4, 7, 3, 8))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))       # 4.0: sharp softmax, tiny probabilities

    def arr():
        if draw(st.booleans()):                          # a transposed view, as from a reshape
            return (scale * rng.standard_normal((B, H, T, Dh))).astype(dtype).transpose(0, 2, 1, 3)
        return (scale * rng.standard_normal((B, T, H, Dh))).astype(dtype)

    q, k, v, dz = arr(), arr(), arr(), arr()
    return dtype, draw(st.booleans()), draw(st.sampled_from([None, False, True])), q, k, v, dz


@given(attention_inputs())
def test_attention_core_kernels_match_numpy(inp):
    dtype, causal, parallel, q, k, v, dz = inp
    z, pattern = kernels.attention_core_forward(q, k, v, causal, parallel=parallel)
    z0, pattern0 = ops.attention_core_forward_np(q, k, v, causal)
    assert z.flags.c_contiguous
    assert_close(z, z0, dtype)
    assert_close(pattern, pattern0, dtype)
    if causal:                                           # masked keys: exactly zero
        T = q.shape[1]
        assert (pattern[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
    grads = kernels.attention_core_backward(dz, q, k, v, pattern0, parallel=parallel)
    grads0 = ops.attention_core_backward_np(dz, q, k, v, pattern0)
    for g, g0 in zip(grads, grads0):
        assert_close(g, g0, dtype)


@st.composite
def scatter_inputs(draw):
    N, D, V = draw(st.integers(0, 60)), draw(st.integers(1, 70)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = rng.integers(0, V, size=N).astype(draw(st.sampled_from([np.int64, np.int32])))
    return idx, rng.standard_normal((N, D)).astype(dtype), V, draw(st.sampled_from([None, False, True]))


@given(scatter_inputs())
def test_scatter_add_rows_matches_add_at(inp):
    idx, src, V, parallel = inp
    want = np.zeros((V, src.shape[1]), dtype=src.dtype)
    np.add.at(want, idx, src)
    got = kernels.scatter_add_rows(idx, src, V, parallel=parallel)
    assert_close(got, want, src.dtype.type)
    with ops.use_backend("numba"):
        assert_close(ops.scatter_add_rows(idx, src, V), want, src.dtype.type)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(B=st.integers(1, 3), T=st.integers(1, 6), H=st.integers(1, 3), Dh=st.integers(1, 5),
       D=st.integers(1, 6), causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_full_attention_agrees_across_backends(dtype, B, T, H, Dh, D, causal, seed):
    from minispatial import gradcheck as gc

    rng = np.random.default_rng(seed)
    inputs = {n: a.astype(dtype) for n, a in gc.attention_inputs(rng, gc.Sizes(B=B, T=T, H=H, Dh=Dh, D=D)).items()}
    p = {n: inputs[n] for n in ops.ATTN_PARAMS}
    dout = rng.standard_normal((B, T, D)).astype(dtype)
    res = {}
    for backend in ops.BACKENDS:
        with ops.use_backend(backend):
            out, cache = ops.attention_forward(inputs["x"], p, causal)
            res[backend] = (out, *ops.attention_backward(dout, cache, p))
    (out_np, dx_np, g_np), (out_nb, dx_nb, g_nb) = res["numpy"], res["numba"]
    assert_close(out_nb, out_np, dtype)
    assert_close(dx_nb, dx_np, dtype)
    assert set(g_nb) == set(g_np) == set(ops.ATTN_PARAMS)
    for n in ops.ATTN_PARAMS:
        assert_close(g_nb[n], g_np[n], dtype)


def test_embedding_backward_agrees_across_backends():
    rng = np.random.default_rng(0)
    W_E = rng.standard_normal((5, 8))
    ids = rng.integers(0, 5, size=(4, 9))
    dout = rng.standard_normal((4, 9, 8))
    _, cache = ops.embedding_forward(W_E, ids)
    with ops.use_backend("numpy"):
        want = ops.embedding_backward(dout, cache)
    with ops.use_backend("numba"):
        assert_close(ops.embedding_backward(dout, cache), want, np.float64)


# --------------------------------------------------------------------------------------------
# NUMBA_DISABLE_JIT=1: the same loops as plain Python give the same numbers

NOJIT_SCRIPT = r"""
import json, sys
import numpy as np
from minispatial import kernels
rng = np.random.default_rng(7)
out = {"jit_disabled": not hasattr(kernels._attention_forward_bh, "signatures")}
for dt in ("float64", "float32"):
    q, k, v, dz = (rng.standard_normal((2, 3, 2, 4)).astype(dt) for _ in range(4))
    for causal in (False, True):
        z, pattern = kernels.attention_core_forward(q, k, v, causal, parallel=True)
        dq, dk, dv = kernels.attention_core_backward(dz, q, k, v, pattern, parallel=True)
        out[f"attn {dt} {causal}"] = [a.tolist() for a in (q, k, v, dz, z, pattern, dq, dk, dv)]
    idx = rng.integers(0, 3, size=7)
    src = rng.standard_normal((7, 40)).astype(dt)
    out[f"scatter {dt}"] = [idx.tolist(), src.tolist(), kernels.scatter_add_rows(idx, src, 3, parallel=True).tolist()]
json.dump(out, sys.stdout)
"""


def test_kernels_run_with_jit_disabled():
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    proc = subprocess.run([sys.executable, "-c", NOJIT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["jit_disabled"]
    for dtype in (np.float64, np.float32):
        dt = dtype.__name__
        for causal in (False, True):
            q, k, v, dz, *nojit = (np.array(a, dtype=dtype) for a in res[f"attn {dt} {causal}"])
            z0, pattern0 = ops.attention_core_forward_np(q, k, v, causal)
            ref = (z0, pattern0, *ops.attention_core_backward_np(dz, q, k, v, pattern0))
            z, pattern = kernels.attention_core_forward(q, k, v, causal)       # jitted, here
            jit = (z, pattern, *kernels.attention_core_backward(dz, q, k, v, pattern))
            for a_nojit, a_jit, a_ref in zip(nojit, jit, ref):
                assert_close(a_nojit, a_ref, dtype)
                assert_close(a_jit, a_nojit, dtype)
        idx, src, out = res[f"scatter {dt}"]
        idx, src, out = np.array(idx), np.array(src, dtype=dtype), np.array(out, dtype=dtype)
        want = np.zeros_like(out)
        np.add.at(want, idx, src)
        assert_close(out, want, dtype)
        assert_close(kernels.scatter_add_rows(idx, src, 3), out, dtype)


# --------------------------------------------------------------------------------------------
# the wrappers reject what the kernels could not handle safely (no bounds checks inside)

@pytest.mark.parametrize("call, pattern", [
    (lambda: kernels.scatter_add_rows(np.array([0, 3]), np.ones((2, 2)), 3), r"id 3 outside the vocabulary \[0, 2\]"),
    (lambda: kernels.scatter_add_rows(np.array([-1]), np.ones((1, 2)), 3), r"id -1 outside"),
    (lambda: kernels.scatter_add_rows(np.array([0.0]), np.ones((1, 2)), 3), r"idx must be an integer array"),
    (lambda: kernels.scatter_add_rows(np.array([0, 1]), np.ones((3, 2)), 3), r"must be \[N\] and \[N, D\]"),
    (lambda: kernels.scatter_add_rows(np.array([0]), np.ones((1, 2), np.int64), 3), r"src must be a float32 or float64"),
    (lambda: kernels.attention_core_forward(np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2), np.float32),
                                            np.ones((1, 2, 1, 2)), False), r"k has dtype float32"),
    (lambda: kernels.attention_core_forward(np.ones((1, 2, 1, 2)), np.ones((1, 3, 1, 2)),
                                            np.ones((1, 2, 1, 2)), False), r"share one shape"),
    (lambda: kernels.attention_core_backward(np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2)),
                                             np.ones((1, 2, 1, 2)), np.ones((1, 1, 2, 3))), r"pattern"),
])
def test_kernel_wrappers_reject_bad_inputs(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_warmup_compiles_every_signature():
    kernels.warmup()
    for fn in (kernels._attention_forward_serial, kernels._attention_forward_parallel,
               kernels._attention_backward_serial, kernels._attention_backward_parallel,
               kernels._scatter_add_serial, kernels._scatter_add_parallel):
        dtypes = {str(sig[1].dtype) for sig in fn.signatures}
        assert dtypes == {"float32", "float64"}, fn.__name__
