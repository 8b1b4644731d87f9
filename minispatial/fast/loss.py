"""The CLIP loss and the L2 normalisation of the fast training step.

Legend: B batch, E feature width.

`clip_loss` is ops.clip_loss_forward followed by ops.clip_loss_backward(1.0), and
`l2norm_forward/backward` are ops.l2norm_forward/backward: the same math, summed in another
order (tests/fast/test_loss.py holds them to the reference). The kernels are in kernels.py; the
exp is NumPy's (SIMD) and the row sums of the [B, B] exps a BLAS matrix-vector product (numba
does not vectorise a row reduction without fastmath, BLAS does: ~4x faster).
"""

from __future__ import annotations

import numpy as np

from minispatial.fast import kernels
from minispatial.fast.kernels import SAFE_SUM


def l2norm_forward(x):
    # x [B, E] -> y [B, E] (unit rows), cache          replaces ops.l2norm_forward
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    n = np.empty(x.shape[0], dtype=x.dtype)
    kernels.l2norm_forward_kernel(x, y, n)
    return y, (y, n)


def l2norm_backward(dy, cache):
    # dy [B, E] -> dx [B, E]                            replaces ops.l2norm_backward
    y, n = cache
    dx = np.empty_like(y)
    kernels.l2norm_backward_kernel(np.ascontiguousarray(dy), y, n, dx)
    return dx


def row_col_sums(er, ec):
    # er, ec [B, B] -> (rsum [B] = er.sum(axis=1), csum [B] = ec.sum(axis=0)); the row sums are a
    # BLAS matrix-vector product with ones, the column sums an elementwise numba pass
    csum = np.empty(ec.shape[1], dtype=ec.dtype)
    kernels.col_sum_kernel(ec, csum)
    return er @ np.ones(er.shape[1], dtype=er.dtype), csum


def two_exps(logits):
    # logits [B, B] -> (er = exp(logits - rmax[:, None]), ec = exp(logits - cmax[None, :]), rmax, cmax,
    #   rsum, csum): the reference's shifts (each row's and each column's max), and the row sums of
    #   er and column sums of ec. Rare (see clip_loss): plain NumPy
    rmax, cmax = logits.max(axis=1), logits.max(axis=0)
    er, ec = np.exp(logits - rmax[:, None]), np.exp(logits - cmax[None, :])
    return (er, ec, rmax, cmax) + row_col_sums(er, ec)


def clip_loss(img, txt, logit_scale):
    # img [B, E], txt [B, E] (unit rows), logit_scale 0-d -> (loss, dimg, dtxt, dtau)
    # ops.clip_loss_forward + clip_loss_backward(1.0) in one go, with fewer passes over [B, B]:
    #   - the scale s = exp(tau) multiplies img ([B, E]) before the GEMM, not the logits ([B, B]);
    #   - ONE exp for both softmaxes: the rows are unit vectors, so every logit is in [-s, s], and
    #     E = exp(logits - s) is in [exp(-2s), 1]: no overflow, and (while 2s stays below ~87 in
    #     float32) no underflow. Row i's softmax is E[i] / rsum[i], column j's E[:, j] / csum[j].
    #     The reference shifts each row and column by its own maximum and takes two exps; if a row
    #     or column sum comes out too small to trust (a large s, far from the data), this function
    #     does the same (`two_exps`);
    #   - dlogits carries the s of the logits and the 1/(2B) of the mean, so the GEMMs give dimg, dtxt;
    #   - dtau = sum(dlogits * logits) is summed in float64 in the same pass (its terms cancel).
    B = img.shape[0]
    dt = img.dtype
    s = np.exp(logit_scale)                                                # 0-d, the dtype of tau
    logits = (img * s) @ txt.T                                             # [B, B]
    er = np.subtract(logits, s)
    np.exp(er, out=er)                                                     # E = exp(logits - s)
    rsum, csum = row_col_sums(er, er)
    if min(rsum.min(), csum.min()) >= SAFE_SUM[dt] and max(rsum.max(), csum.max()) < np.inf:
        ec, rshift, cshift = er, s, s                                      # the one exp holds both
    else:
        er, ec, rshift, cshift, rsum, csum = two_exps(logits)
    diag = np.diagonal(logits)
    # loss = (mean_i[lse_row_i - diag_i] + mean_j[lse_col_j - diag_j]) / 2, lse = shift + log(sum)
    loss = 0.5 * ((rshift + np.log(rsum) - diag).mean() + (cshift + np.log(csum) - diag).mean())
    c = s * dt.type(1.0 / (2.0 * B))                                       # s / (2B)
    G = np.empty_like(logits)              # not er in place: aliasing would stop the vectorisation
    GL = kernels.dlogits_kernel(er, ec, rsum, csum, logits, c, G)          # G = s dlogits
    dimg = G @ txt                                                         # = s dlogits @ txt
    dtxt = G.T @ img                                                       # = s dlogits^T @ img
    dtau = np.asarray(GL / (2.0 * B), dtype=dt)                            # sum(dlogits * logits)
    return float(loss), dimg, dtxt, dtau
