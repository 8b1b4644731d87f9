"""AdamW over the flat buffer and the gradient norm, in one numba pass each.

Legend: N elements of the flat buffer (every tensor one after the other), S tensors.

`adamw_update` is optim.adamw_update (the NumPy reference, same signature) with the operations
of one element in one loop instead of NumPy's ten passes: the same operations in the same order,
each rounded to the dtype, so the results are bitwise NumPy's (tests/fast/test_adamw.py).
`global_norm` is optim.global_norm summed in another order (64 float64 lanes): equal to ~1e-15.
"""

from __future__ import annotations

import math

import numpy as np

from minispatial.fast import kernels


def adamw_update(p, g, m, v, ends, decays, beta1: float, beta2: float, eps: float, lr_bc1: float,
                 sqrt_bc2: float) -> None:
    """In place, per element of p, g, m, v [N] (flat, C-contiguous, one dtype; tensor s ends at
    ends[s] (increasing, the last = N) and has decays[s] = 1 - lr * wd or 1):
        p *= decay;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
        p -= lr_bc1 m / (sqrt(v) / sqrt_bc2 + eps)        (lr_bc1 = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t))
    Every scalar is rounded to the dtype once, as NumPy rounds a Python float against an array."""
    for a in (g, m, v):
        if a.shape != p.shape or a.dtype != p.dtype or not a.flags.c_contiguous:
            raise ValueError(f"adamw_update: an array {a.shape} {a.dtype} does not match the "
                             f"parameters {p.shape} {p.dtype} or is not C-contiguous")
    ends = np.asarray(ends, dtype=np.int64)
    decays = np.asarray(decays)
    if (p.ndim != 1 or not p.flags.c_contiguous or ends.shape != decays.shape or ends.ndim != 1
            or not ends.size or ends[-1] != p.shape[0]):
        raise ValueError("adamw_update: p must be flat and C-contiguous, ends and decays of one "
                         "length, ends[-1] = len(p)")
    t = p.dtype.type
    kernels.adamw_kernel(p, g, m, v, ends, decays.astype(p.dtype), t(beta1), t(1.0 - beta1), t(beta2),
                         t(1.0 - beta2), t(sqrt_bc2), t(eps), t(lr_bc1))


def sum_squares(x) -> float:
    """sum(x ** 2) in float64 (a different order of the same sum as NumPy's pairwise sum)."""
    return float(kernels.sum_squares_kernel(np.ascontiguousarray(x).reshape(-1)))


def global_norm(grads: dict) -> float:
    """sqrt(sum of every gradient entry squared), summed in float64 (optim.global_norm)."""
    return math.sqrt(sum(sum_squares(g) for g in grads.values()))
