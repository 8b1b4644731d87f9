"""The CLIP loss and the L2 normalisation of the fast training step (numba backend).

Legend: B batch, E feature width.

`clip_loss_fast` is ops.clip_loss_forward followed by ops.clip_loss_backward(1.0), and
`l2norm_forward/backward` are ops.l2norm_forward/backward: the same math, summed in another
order (tests/test_fast.py holds them to the reference). fast.py's step uses them.

Kernels: `cache=True`, `error_model="numpy"` (IEEE division, so loops vectorise), no fastmath,
serial. Without fastmath LLVM may not reorder a float sum, so it vectorises elementwise loops
(column reductions, which add row after row, in order; the dlogits pass) but not a reduction
along a row: those (dot products, maxima) keep 8 partial results in 8 scalars, 8 independent
chains (~1 element per cycle, scalar), and the one that matters at B 512, the row sums of the
[B, B] exps, is a BLAS matrix-vector product. With NUMBA_DISABLE_JIT=1 the same loops run as
Python.
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
def _col_sum_kernel(ec, csum):
    # ec [B, B] -> fills csum [B] = ec.sum(axis=0): row after row, in order (an elementwise loop
    # over the columns, which LLVM vectorises)
    csum[:] = 0
    for i in range(ec.shape[0]):
        eci = ec[i]
        for j in range(ec.shape[1]):
            csum[j] += eci[j]


def _row_col_sums(er, ec):
    # er, ec [B, B] -> (rsum [B] = er.sum(axis=1), csum [B] = ec.sum(axis=0)). The row sums are
    # a BLAS matrix-vector product with ones: numba does not vectorise a row reduction without
    # fastmath (it may not reorder the sum), BLAS does, ~4x faster
    csum = np.empty(ec.shape[1], dtype=ec.dtype)
    _col_sum_kernel(ec, csum)
    return er @ np.ones(er.shape[1], dtype=er.dtype), csum


@numba.njit(cache=True, error_model="numpy")
def _dlogits_kernel(er, ec, rsum, csum, L, c, G):
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
    #     does the same (`_two_exps`). The exp is NumPy's (SIMD), the row sums BLAS's, column sums
    #     and dlogits are numba passes;
    #   - dlogits carries the s of the logits and the 1/(2B) of the mean, so the GEMMs give dimg, dtxt;
    #   - dtau = sum(dlogits * logits) is summed in float64 in the same pass (its terms cancel).
    B = img.shape[0]
    dt = img.dtype
    s = np.exp(logit_scale)                                                # 0-d, the dtype of tau
    logits = (img * s) @ txt.T                                             # [B, B]
    er = np.subtract(logits, s)
    np.exp(er, out=er)                                                     # E = exp(logits - s)
    rsum, csum = _row_col_sums(er, er)
    if min(rsum.min(), csum.min()) >= SAFE_SUM[dt] and max(rsum.max(), csum.max()) < np.inf:
        ec, rshift, cshift = er, s, s                                      # the one exp holds both
    else:
        er, ec, rshift, cshift, rsum, csum = _two_exps(logits)
    diag = np.diagonal(logits)
    # loss = (mean_i[lse_row_i - diag_i] + mean_j[lse_col_j - diag_j]) / 2, lse = shift + log(sum)
    loss = 0.5 * ((rshift + np.log(rsum) - diag).mean() + (cshift + np.log(csum) - diag).mean())
    c = s * dt.type(1.0 / (2.0 * B))                                       # s / (2B)
    G = np.empty_like(logits)              # not er in place: aliasing would stop the vectorisation
    GL = _dlogits_kernel(er, ec, rsum, csum, logits, c, G)             # G = s dlogits
    dimg = G @ txt                                                         # = s dlogits @ txt
    dtxt = G.T @ img                                                       # = s dlogits^T @ img
    dtau = np.asarray(GL / (2.0 * B), dtype=dt)                            # sum(dlogits * logits)
    return float(loss), dimg, dtxt, dtau


# The smallest trusted sum of N exps shifted by something other than their own maximum (here the
# loss's E = exp(logits - s), fast.py's products of two exp tables): the entries that underflowed
# (each < tiny) add less than N tiny / sqrt(tiny) = N sqrt(tiny) relative to such a sum, so the
# softmax is as accurate as with the max shift. Below it, the callers redo the max shift.
SAFE_SUM = {np.dtype(t): np.sqrt(np.finfo(t).tiny) for t in (np.float32, np.float64)}


def _two_exps(logits):
    # logits [B, B] -> (er = exp(logits - rmax[:, None]), ec = exp(logits - cmax[None, :]), rmax, cmax,
    #   rsum, csum): the reference's shifts, and the row sums of er and column sums of ec
    B = logits.shape[0]
    rmax, cmax = np.empty(B, dtype=logits.dtype), np.empty(B, dtype=logits.dtype)
    _row_col_max_kernel(logits, rmax, cmax)
    er, ec = np.empty_like(logits), np.empty_like(logits)
    _shift_kernel(logits, rmax, cmax, er, ec)
    np.exp(er, out=er)
    np.exp(ec, out=ec)
    return (er, ec, rmax, cmax) + _row_col_sums(er, ec)
