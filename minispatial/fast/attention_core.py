"""The dense attention core in numba (`ATTENTION_CORE`, an ops.AttentionCore) and the scatter-add
of rows: the operations the fast path runs where it keeps the reference model's dense layers
(the layers before the last of a multi-layer tower; configs with LayerNorm or the MLP; encoding
for evaluation).

Legend: B batch, T tokens, H heads, Dh d_head, V rows of the output table, D row width, N rows.

    attention_core_forward   <->  ops.attention_core_forward   (without hooks: those stay NumPy)
    attention_core_backward  <->  ops.attention_core_backward
    scatter_add_rows         <->  ops.scatter_add_rows (np.add.at): the same adds in the same order

Each function checks its inputs (the kernels do no bounds checks), makes them C-contiguous,
allocates the outputs and runs one kernel of kernels.py. tests/fast/test_kernels.py holds them
to the NumPy reference (1e-10 in float64, 1e-5 in float32).
"""

from __future__ import annotations

import math

import numpy as np

from minispatial import ops
from minispatial.fast import kernels

FLOATS = (np.float32, np.float64)


def as_float_c(name: str, a, dtype=None) -> np.ndarray:
    """C-contiguous float32/float64 copy-or-view of `a`; ValueError naming `name` otherwise."""
    if not isinstance(a, np.ndarray) or a.dtype not in FLOATS:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a float32 or float64 array, got {got}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype}: expected {np.dtype(dtype)} (dtypes must match)")
    return np.ascontiguousarray(a)


def check_qkv(q, k, v):
    # -> q, k, v C-contiguous, of one float dtype and one shape [B, T, H, Dh]
    q = as_float_c("q", q)
    k = as_float_c("k", k, q.dtype)
    v = as_float_c("v", v, q.dtype)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, T, H, Dh]: got {q.shape}, {k.shape}, {v.shape}")
    return q, k, v


def attention_core_forward(q, k, v, causal: bool):
    # q, k, v [B, T, H, Dh] -> z [B, T, H, Dh] (C-contiguous), pattern [B, H, T, T]
    q, k, v = check_qkv(q, k, v)
    B, T, H, Dh = q.shape
    scale = q.dtype.type(1.0 / math.sqrt(Dh))      # as the reference: python scale cast to dtype
    z = np.empty_like(q)
    pattern = np.empty((B, H, T, T), dtype=q.dtype)
    kernels.attention_forward_kernel(q, k, v, bool(causal), scale, z, pattern)
    return z, pattern


def attention_core_backward(dz, q, k, v, pattern):
    # dz [B, T, H, Dh], q, k, v [B, T, H, Dh], pattern [B, H, T, T] -> dq, dk, dv [B, T, H, Dh]
    q, k, v = check_qkv(q, k, v)
    B, T, H, Dh = q.shape
    dz = as_float_c("dz", dz, q.dtype)
    pattern = as_float_c("pattern", pattern, q.dtype)
    if dz.shape != q.shape or pattern.shape != (B, H, T, T):
        raise ValueError(f"dz {dz.shape} / pattern {pattern.shape} do not match q {q.shape} "
                         f"(expected dz {q.shape}, pattern {(B, H, T, T)})")
    scale = q.dtype.type(1.0 / math.sqrt(Dh))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(q)
    kernels.attention_backward_kernel(dz, q, k, v, pattern, scale, dq, dk, dv)
    return dq, dk, dv


ATTENTION_CORE = ops.AttentionCore(attention_core_forward, attention_core_backward)


def scatter_add_rows(idx, src, V: int):
    # idx [N] int, src [N, D] -> out [V, D] with out[idx[n]] += src[n], n in order  (== np.add.at)
    if not isinstance(idx, np.ndarray) or idx.dtype.kind not in "iu":
        raise ValueError(f"idx must be an integer array, got "
                         f"{idx.dtype if isinstance(idx, np.ndarray) else type(idx).__name__}")
    src = as_float_c("src", src)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.ndim != 1 or src.ndim != 2 or src.shape[0] != idx.shape[0]:
        raise ValueError(f"idx {idx.shape} and src {src.shape} must be [N] and [N, D]")
    if idx.size and (idx.min() < 0 or idx.max() >= V):    # the kernel does no bounds checks
        bad = idx[(idx < 0) | (idx >= V)][0]
        raise ValueError(f"idx contains id {int(bad)} outside the vocabulary [0, {V - 1}]")
    out = np.zeros((V, src.shape[1]), dtype=src.dtype)
    kernels.add_rows(out, idx, src)
    return out
