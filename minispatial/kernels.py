"""numba kernels for the three hot operations of `minispatial.ops` (backend "numba").

Legend: B batch, T tokens, H heads, Dh d_head, V vocabulary, D row width, N rows.

Each kernel is the loop form of a NumPy reference in ops.py, and tests/test_kernels.py holds
them equal (1e-10 in float64, 1e-5 in float32):

    attention_core_forward   <->  ops.attention_core_forward_np   (no mask/hooks: those stay NumPy)
    attention_core_backward  <->  ops.attention_core_backward_np
    scatter_add_rows         <->  np.add.at(out, idx, src)

Rules (STYLE.md): `@njit(cache=True, error_model="numpy")` (IEEE division, as NumPy: no
zero-division check, whose branch would stop LLVM from vectorising the loops); no fastmath (it lets LLVM reassociate sums and assume
no inf/NaN, so results would drift from the reference); `prange` only over indices that own
their output: one (b, h) pair owns pattern[b, h], z[b, :, h] and dq/dk/dv[b, :, h]; one
column block owns out[:, cols] in the scatter-add. Arithmetic stays in the input dtype
(float32 or float64; numba compiles one specialisation per dtype). With NUMBA_DISABLE_JIT=1
the same loops run as plain Python (slowly), which tests/test_kernels.py checks.

Layout: each public function (the Python wrapper) validates its inputs, makes them
C-contiguous, allocates the outputs and calls a driver; the math of one owner (one (b, h), one
column block) is a `_..._bh` / `_..._cols` function, called by a `_parallel` driver (prange)
or a `_serial` driver (range), chosen by the amount of work (`PARALLEL_MIN_WORK`) unless the
caller passes `parallel=`. `warmup()` compiles every signature on tiny inputs.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

FLOATS = (np.float32, np.float64)


def _as_float_c(name: str, a, dtype=None) -> np.ndarray:
    """C-contiguous float32/float64 copy-or-view of `a`; ValueError naming `name` otherwise."""
    if not isinstance(a, np.ndarray) or a.dtype not in FLOATS:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a float32 or float64 array, got {got}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype}: expected {np.dtype(dtype)} (dtypes must match)")
    return np.ascontiguousarray(a)


def _check_qkv(q, k, v):
    q = _as_float_c("q", q)
    k = _as_float_c("k", k, q.dtype)
    v = _as_float_c("v", v, q.dtype)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, T, H, Dh]: got {q.shape}, {k.shape}, {v.shape}")
    return q, k, v


# Below this much work (multiply-adds) a kernel runs on one thread: waking the thread pool
# costs more than it saves, and on a loaded machine a parallel region waits for a descheduled
# thread (measured: 16 ms per call with 2 threads on 2 busy cores). Training-sized attention
# (B 128, T 11, H 4, Dh 32: 2e6) runs in parallel. `parallel=True/False` overrides per call.
PARALLEL_MIN_WORK = 1 << 18


def _use_parallel(parallel: bool | None, work: int) -> bool:
    if parallel is not None:
        return bool(parallel)
    return work >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1


# --------------------------------------------------------------------------------------------
# attention core forward: scores -> (causal mask) -> softmax -> z = pattern @ v

def attention_core_forward(q, k, v, causal: bool, parallel: bool | None = None):
    # q, k, v [B, T, H, Dh] -> z [B, T, H, Dh] (C-contiguous), pattern [B, H, T, T]
    q, k, v = _check_qkv(q, k, v)
    B, T, H, Dh = q.shape
    scale = q.dtype.type(1.0 / math.sqrt(Dh))      # as the reference: python scale cast to dtype
    z = np.empty_like(q)
    pattern = np.empty((B, H, T, T), dtype=q.dtype)
    parallel = _use_parallel(parallel, B * H * T * T * Dh)
    run = _attention_forward_parallel if parallel else _attention_forward_serial
    run(q, k, v, bool(causal), scale, z, pattern)
    return z, pattern


@numba.njit(cache=True, error_model="numpy", inline="always")
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


@numba.njit(cache=True, error_model="numpy")
def _attention_forward_bh(q, k, v, causal, scale, z, pattern, b, h):
    # one (b, h): q, k, v [B, T, H, Dh] -> fills pattern[b, h] [T, T] and z[b, :, h] [T, Dh]
    T, Dh = q.shape[1], q.shape[3]
    zero = q.dtype.type(0)
    for i in range(T):                             # query position
        # causal: keys j > i are masked (exp(-inf) = 0 in the reference) -> keys 0..n_keys-1
        n_keys = i + 1 if causal else T
        p = pattern[b, h, i]                       # one row [T]: scores, then probabilities
        # scores = (q @ k^T) * (1 / sqrt(Dh))
        for j in range(n_keys):
            acc = zero
            for d in range(Dh):
                acc += q[b, i, h, d] * k[b, j, h, d]
            p[j] = acc * scale
        softmax_row(p, n_keys)                     # masked keys: exactly zero probability
        # z = pattern @ v:  z[b, i, h] = sum_j pattern[i, j] v[b, j, h]
        zi = z[b, i, h]
        for d in range(Dh):
            zi[d] = zero
        for j in range(n_keys):
            pj = p[j]
            for d in range(Dh):
                zi[d] += pj * v[b, j, h, d]


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _attention_forward_parallel(q, k, v, causal, scale, z, pattern):
    B, H = q.shape[0], q.shape[2]
    for bh in prange(B * H):                       # (b, h) owns pattern[b, h] and z[b, :, h]
        _attention_forward_bh(q, k, v, causal, scale, z, pattern, bh // H, bh % H)


@numba.njit(cache=True, error_model="numpy")
def _attention_forward_serial(q, k, v, causal, scale, z, pattern):
    B, H = q.shape[0], q.shape[2]
    for bh in range(B * H):
        _attention_forward_bh(q, k, v, causal, scale, z, pattern, bh // H, bh % H)


# --------------------------------------------------------------------------------------------
# attention core backward

def attention_core_backward(dz, q, k, v, pattern, parallel: bool | None = None):
    # dz [B, T, H, Dh], q, k, v [B, T, H, Dh], pattern [B, H, T, T] -> dq, dk, dv [B, T, H, Dh]
    q, k, v = _check_qkv(q, k, v)
    B, T, H, Dh = q.shape
    dz = _as_float_c("dz", dz, q.dtype)
    pattern = _as_float_c("pattern", pattern, q.dtype)
    if dz.shape != q.shape or pattern.shape != (B, H, T, T):
        raise ValueError(f"dz {dz.shape} / pattern {pattern.shape} do not match q {q.shape} "
                         f"(expected dz {q.shape}, pattern {(B, H, T, T)})")
    scale = q.dtype.type(1.0 / math.sqrt(Dh))
    dq = np.zeros_like(q)
    dk = np.zeros_like(q)
    dv = np.zeros_like(q)
    parallel = _use_parallel(parallel, B * H * T * T * Dh)
    run = _attention_backward_parallel if parallel else _attention_backward_serial
    run(dz, q, k, v, pattern, scale, dq, dk, dv)
    return dq, dk, dv


@numba.njit(cache=True, error_model="numpy")
def _attention_backward_bh(dz, q, k, v, pattern, scale, dq, dk, dv, b, h):
    # one (b, h): dz, q, k, v [B, T, H, Dh], pattern [B, H, T, T]
    #   -> adds into the zeroed dq[b, :, h], dk[b, :, h], dv[b, :, h] [T, Dh]
    T, Dh = q.shape[1], q.shape[3]
    zero = q.dtype.type(0)
    dp = np.empty(T, dtype=q.dtype)                # one row of dpattern
    for i in range(T):                             # query position
        p = pattern[b, h, i]
        dzi = dz[b, i, h]
        # inverts z = pattern @ v:
        #   dpattern[i, j] = dz[b, i, h] . v[b, j, h];   dv[b, j, h] += pattern[i, j] dz[b, i, h]
        # with the row sum <dpattern, pattern> that the softmax backward needs.
        # A masked (or underflowed) key has pattern exactly 0: it adds exactly 0 in the reference.
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
        # inverts pattern = softmax(scores):  dscores = pattern * (dpattern - rowdot) * scale
        # inverts scores = q @ k^T * scale:   dq[i] += dscores[i, j] k[j];  dk[j] += dscores[i, j] q[i]
        for j in range(T):
            pj = p[j]
            if pj == 0:                            # dscores exactly 0: nothing to add
                continue
            ds = pj * (dp[j] - rowdot) * scale
            for d in range(Dh):
                dq[b, i, h, d] += ds * k[b, j, h, d]
                dk[b, j, h, d] += ds * q[b, i, h, d]


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _attention_backward_parallel(dz, q, k, v, pattern, scale, dq, dk, dv):
    B, H = q.shape[0], q.shape[2]
    for bh in prange(B * H):                       # (b, h) owns dq, dk, dv[b, :, h]
        _attention_backward_bh(dz, q, k, v, pattern, scale, dq, dk, dv, bh // H, bh % H)


@numba.njit(cache=True, error_model="numpy")
def _attention_backward_serial(dz, q, k, v, pattern, scale, dq, dk, dv):
    B, H = q.shape[0], q.shape[2]
    for bh in range(B * H):
        _attention_backward_bh(dz, q, k, v, pattern, scale, dq, dk, dv, bh // H, bh % H)


# --------------------------------------------------------------------------------------------
# scatter-add of rows (the embedding backward)

SCATTER_BLOCK = 32   # columns per parallel task


def scatter_add_rows(idx, src, V: int, parallel: bool | None = None):
    # idx [N] int, src [N, D] -> out [V, D] with out[idx[n]] += src[n]  (== np.add.at)
    if not isinstance(idx, np.ndarray) or idx.dtype.kind not in "iu":
        raise ValueError(f"idx must be an integer array, got "
                         f"{idx.dtype if isinstance(idx, np.ndarray) else type(idx).__name__}")
    src = _as_float_c("src", src)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.ndim != 1 or src.ndim != 2 or src.shape[0] != idx.shape[0]:
        raise ValueError(f"idx {idx.shape} and src {src.shape} must be [N] and [N, D]")
    if idx.size and (idx.min() < 0 or idx.max() >= V):    # the kernel does no bounds checks
        bad = idx[(idx < 0) | (idx >= V)][0]
        raise ValueError(f"idx contains id {int(bad)} outside the vocabulary [0, {V - 1}]")
    out = np.zeros((V, src.shape[1]), dtype=src.dtype)
    run = _scatter_add_parallel if _use_parallel(parallel, src.size) else _scatter_add_serial
    run(idx, src, out)
    return out


@numba.njit(cache=True, error_model="numpy")
def _scatter_add_cols(idx, src, out, c0, c1):
    # idx [N], src [N, D] -> adds src[:, c0:c1] into the rows idx of out[:, c0:c1]
    for n in range(idx.shape[0]):                  # rows in order, as np.add.at: the same sums
        r = idx[n]
        for c in range(c0, c1):
            out[r, c] += src[n, c]


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _scatter_add_parallel(idx, src, out):
    D = src.shape[1]
    for blk in prange((D + SCATTER_BLOCK - 1) // SCATTER_BLOCK):   # a block owns out[:, c0:c1]
        c0 = blk * SCATTER_BLOCK
        _scatter_add_cols(idx, src, out, c0, min(c0 + SCATTER_BLOCK, D))


@numba.njit(cache=True, error_model="numpy")
def _scatter_add_serial(idx, src, out):
    _scatter_add_cols(idx, src, out, 0, src.shape[1])


# --------------------------------------------------------------------------------------------
# the optimizer (optim.py): one pass over each tensor instead of NumPy's ten

@numba.njit(cache=True, error_model="numpy")
def _adamw_kernel(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                  sqrt_bc2, eps, step_size):
    # p, g, m, v [N] (flat views), scalars in their dtype -> updates p, m, v in place with the
    # operations of optim.adamw_step in the same order, each rounded to the dtype as NumPy does
    # (so float32 results are bitwise those of the NumPy code; tests/test_optim.py checks)
    for i in range(p.shape[0]):
        pi = p[i] * decay
        gi = g[i]
        mi = m[i] * beta1 + one_minus_beta1 * gi
        vi = v[i] * beta2 + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = pi - (step_size * mi) / (np.sqrt(vi) / sqrt_bc2 + eps)


@numba.njit(cache=True, error_model="numpy")
def _adamw_segments_kernel(p, g, m, v, ends, decays, beta1, one_minus_beta1, beta2, one_minus_beta2,
                           sqrt_bc2, eps, step_size):
    # p, g, m, v [N]: every tensor one after the other, tensor s in [ends[s-1], ends[s]) with its
    # own decay -> the per-tensor kernel above on each segment (the same operations per element)
    start = 0
    for s in range(ends.shape[0]):
        _adamw_kernel(p[start:ends[s]], g[start:ends[s]], m[start:ends[s]], v[start:ends[s]], decays[s],
                      beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size)
        start = ends[s]


def adamw_constants(dtype, beta1: float, beta2: float, sqrt_bc2: float, eps: float,
                    step_size: float) -> tuple:
    """The scalars of `adamw_update`, rounded to `dtype` once per step (as NumPy rounds them)."""
    t = np.dtype(dtype).type
    return (t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2), t(sqrt_bc2), t(eps), t(step_size))


def adamw_update(p, g, m, v, decay: float, consts: tuple) -> None:
    """In place: p *= decay; m, v <- moments; p -= step_size * m / (sqrt(v) / sqrt_bc2 + eps),
    consts = adamw_constants(p.dtype, ...)."""
    for a in (g, m, v):
        if a.shape != p.shape or a.dtype != p.dtype or not a.flags.c_contiguous:
            raise ValueError(f"adamw_update: an array {a.shape} {a.dtype} does not match the parameter "
                             f"{p.shape} {p.dtype} or is not C-contiguous")
    if not p.flags.c_contiguous:
        raise ValueError("adamw_update: the parameter must be C-contiguous (it is updated in place)")
    _adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), p.dtype.type(decay), *consts)


def adamw_update_flat(p, g, m, v, ends, decays, consts: tuple) -> None:
    """`adamw_update` of every tensor in one call: p, g, m, v [N] hold the tensors one after the
    other, tensor s ends at ends[s] (int64, increasing, the last = N) and has decays[s]."""
    for a in (g, m, v):
        if a.shape != p.shape or a.dtype != p.dtype or not a.flags.c_contiguous:
            raise ValueError(f"adamw_update_flat: an array {a.shape} {a.dtype} does not match the "
                             f"parameters {p.shape} {p.dtype} or is not C-contiguous")
    if p.ndim != 1 or not p.flags.c_contiguous or ends.shape != decays.shape or ends[-1] != p.shape[0]:
        raise ValueError("adamw_update_flat: p must be flat and C-contiguous, ends and decays of one "
                         "length, ends[-1] = len(p)")
    _adamw_segments_kernel(p, g, m, v, ends, decays.astype(p.dtype), *consts)


SUM_LANES = 64


@numba.njit(cache=True, error_model="numpy")
def _sum_squares_kernel(x):
    # x [N] -> sum of x^2 in float64. Lane j (of SUM_LANES) sums elements j, j + 64, j + 128, ...
    # in order, then the tail and the lanes are added in order: the lane update is an elementwise
    # loop, which LLVM vectorises (a plain running sum it may not reorder, so it would stay scalar)
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


def sum_squares(x) -> float:
    """sum(x ** 2) in float64 (a different order of the same sum as NumPy's pairwise sum)."""
    return float(_sum_squares_kernel(np.ascontiguousarray(x).reshape(-1)))


# --------------------------------------------------------------------------------------------

def warmup() -> None:
    """Compile (or load from the numba cache) every kernel, serial and parallel, for float32
    and float64."""
    rng = np.random.default_rng(0)
    for dt in FLOATS:
        q, k, v = (rng.standard_normal((1, 3, 2, 2)).astype(dt) for _ in range(3))
        for parallel in (False, True):
            for causal in (False, True):
                z, pattern = attention_core_forward(q, k, v, causal, parallel=parallel)
                attention_core_backward(z, q, k, v, pattern, parallel=parallel)
            scatter_add_rows(np.array([0, 1, 0]), rng.standard_normal((3, 2)).astype(dt), 2,
                             parallel=parallel)
        p, g, m, v = (np.ones(3, dtype=dt) for _ in range(4))
        adamw_update(p, g, m, v, 1.0, adamw_constants(dt, 0.9, 0.99, 1.0, 1e-8, 1e-3))
        adamw_update_flat(p, g, m, v, np.array([1, 3]), np.ones(2), adamw_constants(dt, 0.9, 0.99, 1.0, 1e-8, 1e-3))
        sum_squares(g)
