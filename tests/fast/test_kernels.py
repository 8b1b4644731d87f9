"""The dense attention core and the scatter-add (attention_core.py) equal their NumPy references
in ops.py, jitted and with NUMBA_DISABLE_JIT=1; every kernel of kernels.py follows its one rule.

Tolerances: rtol = 1e-10 in float64, 1e-5 in float32, and atol the same times the array's
largest magnitude (at least 1): a float32 gradient element that is a small difference of large
terms (sharp softmax, inputs ~ 4 sigma) legitimately differs by ~1e-5 of the array's scale.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minispatial import gradcheck as gc
from minispatial import ops
from minispatial.fast import ATTENTION_CORE, kernels
from minispatial.fast.attention_core import attention_core_backward, attention_core_forward, scatter_add_rows

TOL = {np.float64: 1e-10, np.float32: 1e-5}
FAST_DIR = Path(kernels.__file__).parent


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype == dtype
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@st.composite
def attention_inputs(draw):
    # -> dtype, causal, q, k, v, dz [B, T, H, Dh] (some non-contiguous views)
    B, T, H, Dh = (draw(st.integers(1, n)) for n in (4, 7, 3, 8))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))       # 4.0: sharp softmax, tiny probabilities

    def arr():
        if draw(st.booleans()):                          # a transposed view, as from a reshape
            return (scale * rng.standard_normal((B, H, T, Dh))).astype(dtype).transpose(0, 2, 1, 3)
        return (scale * rng.standard_normal((B, T, H, Dh))).astype(dtype)

    q, k, v, dz = arr(), arr(), arr(), arr()
    return dtype, draw(st.booleans()), q, k, v, dz


@given(attention_inputs())
def test_attention_core_kernels_match_numpy(inp):
    dtype, causal, q, k, v, dz = inp
    z, pattern = attention_core_forward(q, k, v, causal)
    z0, pattern0 = ops.attention_core_forward(q, k, v, causal)
    assert z.flags.c_contiguous
    assert_close(z, z0, dtype)
    assert_close(pattern, pattern0, dtype)
    if causal:                                           # masked keys: exactly zero
        T = q.shape[1]
        assert (pattern[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
    grads = attention_core_backward(dz, q, k, v, pattern0)
    grads0 = ops.attention_core_backward(dz, q, k, v, pattern0)
    for g, g0 in zip(grads, grads0):
        assert_close(g, g0, dtype)


@st.composite
def scatter_inputs(draw):
    N, D, V = draw(st.integers(0, 60)), draw(st.integers(1, 70)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = rng.integers(0, V, size=N).astype(draw(st.sampled_from([np.int64, np.int32])))
    return idx, rng.standard_normal((N, D)).astype(dtype), V


@given(scatter_inputs())
def test_scatter_add_rows_is_bitwise_add_at(inp):
    # the same adds in the same order as np.add.at (ops.scatter_add_rows): identical bits
    idx, src, V = inp
    got = scatter_add_rows(idx, src, V)
    want = ops.scatter_add_rows(idx, src, V)
    assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(B=st.integers(1, 3), T=st.integers(1, 6), H=st.integers(1, 3), Dh=st.integers(1, 5),
       D=st.integers(1, 6), causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_full_attention_agrees_across_cores(dtype, B, T, H, Dh, D, causal, seed):
    rng = np.random.default_rng(seed)
    inputs = {n: a.astype(dtype) for n, a in gc.attention_inputs(rng, gc.Sizes(B=B, T=T, H=H, Dh=Dh, D=D)).items()}
    p = {n: inputs[n] for n in ops.ATTN_PARAMS}
    dout = rng.standard_normal((B, T, D)).astype(dtype)
    res = {}
    for name, core in (("numpy", None), ("numba", ATTENTION_CORE)):
        out, cache = ops.attention_forward(inputs["x"], p, causal, core=core)
        res[name] = (out, *ops.attention_backward(dout, cache, p))
    (out_np, dx_np, g_np), (out_nb, dx_nb, g_nb) = res["numpy"], res["numba"]
    assert_close(out_nb, out_np, dtype)
    assert_close(dx_nb, dx_np, dtype)
    assert set(g_nb) == set(g_np) == set(ops.ATTN_PARAMS)
    for n in ops.ATTN_PARAMS:
        assert_close(g_nb[n], g_np[n], dtype)


# --------------------------------------------------------------------------------------------
# NUMBA_DISABLE_JIT=1: the same loops as plain Python give the same numbers

NOJIT_SCRIPT = r"""
import json, sys
import numpy as np
from minispatial.fast import kernels
from minispatial.fast.attention_core import attention_core_backward, attention_core_forward, scatter_add_rows
rng = np.random.default_rng(7)
out = {"jit_disabled": not hasattr(kernels.attention_forward_kernel, "signatures")}
for dt in ("float64", "float32"):
    q, k, v, dz = (rng.standard_normal((2, 3, 2, 4)).astype(dt) for _ in range(4))
    for causal in (False, True):
        z, pattern = attention_core_forward(q, k, v, causal)
        dq, dk, dv = attention_core_backward(dz, q, k, v, pattern)
        out[f"attn {dt} {causal}"] = [a.tolist() for a in (q, k, v, dz, z, pattern, dq, dk, dv)]
    idx = rng.integers(0, 3, size=7)
    src = rng.standard_normal((7, 40)).astype(dt)
    out[f"scatter {dt}"] = [idx.tolist(), src.tolist(), scatter_add_rows(idx, src, 3).tolist()]
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
            z0, pattern0 = ops.attention_core_forward(q, k, v, causal)
            ref = (z0, pattern0, *ops.attention_core_backward(dz, q, k, v, pattern0))
            z, pattern = attention_core_forward(q, k, v, causal)       # jitted, here
            jit = (z, pattern, *attention_core_backward(dz, q, k, v, pattern))
            for a_nojit, a_jit, a_ref in zip(nojit, jit, ref):
                assert_close(a_nojit, a_ref, dtype)
                assert_close(a_jit, a_nojit, dtype)
        idx, src, out = res[f"scatter {dt}"]
        idx, src, out = np.array(idx), np.array(src, dtype=dtype), np.array(out, dtype=dtype)
        assert np.array_equal(out, ops.scatter_add_rows(idx, src, 3))
        assert np.array_equal(scatter_add_rows(idx, src, 3), out)


# --------------------------------------------------------------------------------------------
# the wrappers reject what the kernels could not handle safely (no bounds checks inside)

@pytest.mark.parametrize("call, pattern", [
    (lambda: scatter_add_rows(np.array([0, 3]), np.ones((2, 2)), 3), r"id 3 outside the vocabulary \[0, 2\]"),
    (lambda: scatter_add_rows(np.array([-1]), np.ones((1, 2)), 3), r"id -1 outside"),
    (lambda: scatter_add_rows(np.array([0.0]), np.ones((1, 2)), 3), r"idx must be an integer array"),
    (lambda: scatter_add_rows(np.array([0, 1]), np.ones((3, 2)), 3), r"must be \[N\] and \[N, D\]"),
    (lambda: scatter_add_rows(np.array([0]), np.ones((1, 2), np.int64), 3), r"src must be a float32 or float64"),
    (lambda: attention_core_forward(np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2), np.float32),
                                    np.ones((1, 2, 1, 2)), False), r"k has dtype float32"),
    (lambda: attention_core_forward(np.ones((1, 2, 1, 2)), np.ones((1, 3, 1, 2)),
                                    np.ones((1, 2, 1, 2)), False), r"share one shape"),
    (lambda: attention_core_backward(np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2)),
                                     np.ones((1, 2, 1, 2)), np.ones((1, 1, 2, 3))), r"pattern"),
])
def test_kernel_wrappers_reject_bad_inputs(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# --------------------------------------------------------------------------------------------
# the rules of the fast/ package

def test_every_kernel_follows_the_one_rule():
    # kernels.py's docstring: cache=True, error_model="numpy", serial, no fastmath; and every
    # numba function of fast/ is defined in kernels.py
    tree = ast.parse((FAST_DIR / "kernels.py").read_text())
    decorators = {}                                        # jit = numba.njit(cache=True, ...)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                ast.unparse(node.value.func) == "numba.njit":
            decorators[node.targets[0].id] = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
    assert set(decorators) == {"jit", "jit_inline"}
    for opts in decorators.values():
        assert opts["cache"] is True and opts["error_model"] == "numpy"
        assert set(opts) <= {"cache", "error_model", "inline"}            # no parallel, no fastmath
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert len(functions) >= 20
    for f in functions:
        assert [ast.unparse(d) for d in f.decorator_list] in (["jit"], ["jit_inline"]), f.name
        assert isinstance(getattr(kernels, f.name), numba.core.registry.CPUDispatcher), f.name
    assert not any(getattr(n, "id", getattr(n, "attr", None)) == "prange" for n in ast.walk(tree))
    for path in FAST_DIR.glob("*.py"):                     # no numba outside kernels.py
        imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert ("numba" in imported) == (path.name == "kernels.py"), path.name


def test_no_private_name_crosses_a_module_boundary():
    # `from x import _y` and `module._y` for another module of the project: not in fast/
    for path in FAST_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minispatial"):
                assert not any(a.name.startswith("_") for a in node.names), (path.name, node.lineno)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert isinstance(node.value, ast.Name) and node.value.id == "self", (path.name, node.lineno)
