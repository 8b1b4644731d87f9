"""The CLIP loss and the L2 normalisation of the fast training step (numba backend).

Legend: B batch, E feature width.

`clip_loss_fast` is ops.clip_loss_forward followed by ops.clip_loss_backward(1.0), and
`l2norm_forward/backward` are ops.l2norm_forward/backward: the same math, summed in another
order (tests/test_fast.py holds them to the reference). fast.py's step uses them.

Kernels: `cache=True`, `error_model="numpy"` (IEEE division, so loops vectorise), no fastmath,
serial. Row reductions (sums, dot products, maxima) keep 8 partial results in 8 scalars, so LLVM
vectorises them without fastmath; column reductions add row after row, in order. With
NUMBA_DISABLE_JIT=1 the same loops run as Python.
"""

from __future__ import annotations

import numba
import numpy as np


# --------------------------------------------------------------------------------------------
# kernels

@numba.njit(cache=True, error_model="numpy", inline="always")
def _dot8(x, y):
    # x, y [N] -> sum_i x[i] y[i]
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


@numba.njit(cache=True, error_model="numpy", inline="always")
def _sum8(x):
    # x [N] -> sum_i x[i]
    n = x.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = x.dtype.type(0)
    for j in range(0, n8, 8):
        a0 += x[j]
        a1 += x[j + 1]
        a2 += x[j + 2]
        a3 += x[j + 3]
        a4 += x[j + 4]
        a5 += x[j + 5]
        a6 += x[j + 6]
        a7 += x[j + 7]
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for j in range(n8, n):
        s += x[j]
    return s


@numba.njit(cache=True, error_model="numpy", inline="always")
def _max8(x):
    # x [N], N >= 1 -> max_i x[i]   (max is exact: any order gives the same result)
    n = x.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = x[0]
    for j in range(0, n8, 8):
        a0 = max(a0, x[j])
        a1 = max(a1, x[j + 1])
        a2 = max(a2, x[j + 2])
        a3 = max(a3, x[j + 3])
        a4 = max(a4, x[j + 4])
        a5 = max(a5, x[j + 5])
        a6 = max(a6, x[j + 6])
        a7 = max(a7, x[j + 7])
    m = max(max(max(a0, a1), max(a2, a3)), max(max(a4, a5), max(a6, a7)))
    for j in range(n8, n):
        m = max(m, x[j])
    return m


@numba.njit(cache=True, error_model="numpy")
def _l2norm_forward_kernel(x, y, n):
    # x [B, E] -> fills y [B, E] = x / |x| row by row, n [B] = |x|      (ops.l2norm_forward)
    for b in range(x.shape[0]):
        nb = np.sqrt(_dot8(x[b], x[b]))
        n[b] = nb
        for i in range(x.shape[1]):
            y[b, i] = x[b, i] / nb


@numba.njit(cache=True, error_model="numpy")
def _l2norm_backward_kernel(dy, y, n, dx):
    # dy, y [B, E], n [B] -> fills dx [B, E] = (dy - y <dy, y>) / n       (ops.l2norm_backward)
    for b in range(y.shape[0]):
        dot = _dot8(dy[b], y[b])
        nb = n[b]
        for i in range(y.shape[1]):
            dx[b, i] = (dy[b, i] - y[b, i] * dot) / nb


@numba.njit(cache=True, error_model="numpy")
def _row_col_max_kernel(L, rmax, cmax):
    # L [B, B] -> fills rmax [B] (max of each row), cmax [B] (max of each column); one pass
    cmax[:] = L[0]
    for i in range(L.shape[0]):
        Li = L[i]
        rmax[i] = _max8(Li)
        for j in range(L.shape[1]):
            cmax[j] = max(cmax[j], Li[j])


@numba.njit(cache=True, error_model="numpy")
def _shift_kernel(L, rmax, cmax, er, ec):
    # fills er = L - rmax[:, None], ec = L - cmax[None, :]  (the arguments of the two softmaxes' exp)
    B = L.shape[0]
    for i in range(B):
        for j in range(B):
            er[i, j] = L[i, j] - rmax[i]
            ec[i, j] = L[i, j] - cmax[j]


@numba.njit(cache=True, error_model="numpy")
def _row_col_sum_kernel(er, ec, rsum, csum):
    # er, ec [B, B] -> rsum [B] = er.sum(axis=1), csum [B] = ec.sum(axis=0); one pass
    # (er and ec may be the same array)
    csum[:] = 0
    for i in range(er.shape[0]):
        rsum[i] = _sum8(er[i])
        eci = ec[i]
        for j in range(ec.shape[1]):
            csum[j] += eci[j]


@numba.njit(cache=True, error_model="numpy")
def _dlogits_kernel(er, ec, rsum, csum, L, G):
    # fills G [B, B] = er / rsum[:, None] + ec / csum[None, :] - 2 I
    #   (= 2B dlogits: softmax over rows minus I plus softmax over columns minus I)
    # -> returns sum(G * L) (= 2B dtau), each row's sum accumulated in float64 (the terms cancel)
    B = er.shape[0]
    two = er.dtype.type(2)
    total = 0.0
    for i in range(B):
        ri = rsum[i]
        eri = er[i]
        eci = ec[i]
        Gi = G[i]
        for j in range(B):
            Gi[j] = eri[j] / ri + eci[j] / csum[j]
        Gi[i] -= two
        total += np.float64(_dot8(Gi, L[i]))
    return total


# --------------------------------------------------------------------------------------------
# L2 norm and loss

def l2norm_forward(x):
    # x [B, E] -> y [B, E] (unit rows), cache          replaces ops.l2norm_forward
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    n = np.empty(x.shape[0], dtype=x.dtype)
    _l2norm_forward_kernel(x, y, n)
    return y, (y, n)


def l2norm_backward(dy, cache):
    # dy [B, E] -> dx [B, E]                            replaces ops.l2norm_backward
    y, n = cache
    dx = np.empty_like(y)
    _l2norm_backward_kernel(np.ascontiguousarray(dy), y, n, dx)
    return dx


def clip_loss_fast(img, txt, logit_scale):
    # img [B, E], txt [B, E] (unit rows), logit_scale 0-d -> (loss, dimg, dtxt, dtau)
    # ops.clip_loss_forward + clip_loss_backward(1.0) in one go, with fewer passes over [B, B]:
    #   - the scale s = exp(tau) multiplies img ([B, E]) before the GEMM, not the logits ([B, B]);
    #   - ONE exp for both softmaxes: the rows are unit vectors, so every logit is in [-s, s], and
    #     E = exp(logits - s) is in [exp(-2s), 1]: no overflow, and (while 2s stays below ~87 in
    #     float32) no underflow. Row i's softmax is E[i] / rsum[i], column j's E[:, j] / csum[j].
    #     The reference shifts each row and column by its own maximum and takes two exps; if a row
    #     or column sum comes out too small to trust (a large s, far from the data), this function
    #     does the same (`_two_exps`). The exp is NumPy's (SIMD); sums and dlogits are numba passes;
    #   - dlogits is left unscaled: its 1/(2B) and the s of the logits multiply the [B, E] GEMM outputs;
    #   - dtau = sum(dlogits * logits) is summed in float64 in the same pass (its terms cancel).
    B = img.shape[0]
    dt = img.dtype
    s = np.exp(logit_scale)                                                # 0-d, the dtype of tau
    logits = (img * s) @ txt.T                                             # [B, B]
    er = np.subtract(logits, s)
    np.exp(er, out=er)                                                     # E = exp(logits - s)
    rsum, csum = np.empty(B, dtype=dt), np.empty(B, dtype=dt)
    _row_col_sum_kernel(er, er, rsum, csum)
    if min(rsum.min(), csum.min()) >= SAFE_SUM[dt] and max(rsum.max(), csum.max()) < np.inf:
        ec, rshift, cshift = er, s, s                                      # the one exp holds both
    else:
        er, ec, rshift, cshift = _two_exps(logits, rsum, csum)
    diag = np.diagonal(logits)
    # loss = (mean_i[lse_row_i - diag_i] + mean_j[lse_col_j - diag_j]) / 2, lse = shift + log(sum)
    loss = 0.5 * ((rshift + np.log(rsum) - diag).mean() + (cshift + np.log(csum) - diag).mean())
    G = np.empty_like(logits)              # not er in place: aliasing would stop the vectorisation
    GL = _dlogits_kernel(er, ec, rsum, csum, logits, G)                # G = 2B dlogits
    c = s * dt.type(1.0 / (2.0 * B))                                       # s / (2B)
    dimg = (G @ txt) * c                                                   # = s dlogits @ txt
    dtxt = (G.T @ img) * c                                                 # = s dlogits^T @ img
    dtau = np.asarray(GL / (2.0 * B), dtype=dt)                            # sum(dlogits * logits)
    return float(loss), dimg, dtxt, dtau


# The smallest trusted sum of N exps shifted by something other than their own maximum (here the
# loss's E = exp(logits - s), fast.py's products of two exp tables): the entries that underflowed
# (each < tiny) add less than N tiny / sqrt(tiny) = N sqrt(tiny) relative to such a sum, so the
# softmax is as accurate as with the max shift. Below it, the callers redo the max shift.
SAFE_SUM = {np.dtype(t): np.sqrt(np.finfo(t).tiny) for t in (np.float32, np.float64)}


def _two_exps(logits, rsum, csum):
    # logits [B, B] -> (er = exp(logits - rmax[:, None]), ec = exp(logits - cmax[None, :]), rmax, cmax),
    #   and refills rsum, csum with their row and column sums: the reference's shifts
    B = logits.shape[0]
    rmax, cmax = np.empty(B, dtype=logits.dtype), np.empty(B, dtype=logits.dtype)
    _row_col_max_kernel(logits, rmax, cmax)
    er, ec = np.empty_like(logits), np.empty_like(logits)
    _shift_kernel(logits, rmax, cmax, er, ec)
    np.exp(er, out=er)
    np.exp(ec, out=ec)
    _row_col_sum_kernel(er, ec, rsum, csum)
    return er, ec, rmax, cmax
