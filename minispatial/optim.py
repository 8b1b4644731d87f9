"""AdamW, the learning-rate schedule, gradient clipping and the logit-scale clamp.

AdamW as in PyTorch (decoupled weight decay, Loshchilov & Hutter):
    p <- p * (1 - lr * wd)                    (only for decayed tensors, see `decayed`)
    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""

from __future__ import annotations

import math

import numpy as np

LOGIT_SCALE_MAX = math.log(100.0)

# weight matrices (decayed); embeddings are decayed only if asked; biases, LayerNorm and the
# logit scale never are
_MATRICES = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_proj")
_EMBEDDINGS = ("W_E", "W_pos", "class_embedding")


def decayed(name: str, decay_embeddings: bool) -> bool:
    """Is weight decay applied to the parameter called `name`?"""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in _MATRICES or (decay_embeddings and leaf in _EMBEDDINGS)


def adamw_update(p, g, m, v, ends, decays, beta1: float, beta2: float, eps: float, lr_bc1: float,
                 sqrt_bc2: float) -> None:
    # p, g, m, v [N]: every tensor one after the other (tensor s ends at ends[s], has decays[s])
    #   -> p, m, v updated in place (the formula in the module docstring, t folded into lr_bc1 =
    #   lr / (1 - b1^t) and sqrt_bc2 = sqrt(1 - b2^t)); fast/adamw.py does the same in one pass
    start = 0
    for end, decay in zip(ends, decays):
        if decay != 1.0:
            p[start:end] *= p.dtype.type(decay)
        start = end
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    p -= lr_bc1 * m / (np.sqrt(v) / sqrt_bc2 + eps)


class AdamW:
    """AdamW over one flat buffer it owns: the parameters, both moments and the gradient are each
    one array, and `params`, `m`, `v` are dicts of views into them ({name: array of the param's
    shape}); the model reads and the trainer clamps `opt.params`. The caller's dict is copied,
    never changed. `update` is `adamw_update` above or another implementation of the same
    operations (minispatial/fast/adamw.py)."""

    def __init__(self, params: dict, *, beta1: float, beta2: float, eps: float, weight_decay: float,
                 decay_embeddings: bool = False, update=adamw_update):
        dtypes = {np.asarray(a).dtype for a in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"AdamW: the parameters have several dtypes {sorted(map(str, dtypes))}: "
                             "one is needed for one flat buffer")
        self.names = list(params)
        self.shapes = [np.shape(params[n]) for n in self.names]
        self.ends = np.cumsum([int(np.prod(s, dtype=np.int64)) for s in self.shapes], dtype=np.int64)
        self.decayed = np.array([decayed(n, decay_embeddings) for n in self.names])
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.update = update
        dt = dtypes.pop()
        self.flat_p = np.concatenate([np.asarray(params[n], dtype=dt).reshape(-1) for n in self.names])
        self.flat_m, self.flat_v = np.zeros_like(self.flat_p), np.zeros_like(self.flat_p)
        self.flat_g = np.empty_like(self.flat_p)
        self.params, self.m, self.v = (self._views(a) for a in (self.flat_p, self.flat_m, self.flat_v))
        self.t = 0

    def _views(self, flat: np.ndarray) -> dict:
        starts = np.concatenate([[0], self.ends[:-1]])
        return {n: flat[a:b].reshape(s) for n, s, a, b in zip(self.names, self.shapes, starts, self.ends)}

    def load(self, m: dict, v: dict, t: int) -> None:
        """Restore the moments and the step count (from a validated checkpoint)."""
        for src, dst in ((m, self.m), (v, self.v)):
            for n in self.names:
                dst[n][...] = src[n]
        self.t = int(t)

    def step(self, grads: dict, lr: float) -> None:
        """One AdamW update of every parameter with `grads` {name: array of the param's shape}.
        Every gradient is checked before anything changes."""
        for n, s in zip(self.names, self.shapes):
            g = grads.get(n)
            if not isinstance(g, (np.ndarray, np.generic)) or g.shape != s or g.dtype != self.flat_p.dtype:
                got = f"shape {g.shape} dtype {g.dtype}" if isinstance(g, (np.ndarray, np.generic)) else \
                    ("missing" if g is None else type(g).__name__)
                raise ValueError(f"AdamW.step: the gradient of {n} is {got}; expected the parameter's "
                                 f"shape {s} dtype {self.flat_p.dtype}")
        np.concatenate([grads[n].reshape(-1) for n in self.names], out=self.flat_g)
        self.t += 1
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        decays = (np.where(self.decayed, 1.0 - lr * self.weight_decay, 1.0) if self.weight_decay
                  else np.ones(len(self.names)))
        self.update(self.flat_p, self.flat_g, self.flat_m, self.flat_v, self.ends, decays,
                    self.beta1, self.beta2, self.eps, lr / bc1, math.sqrt(bc2))


def lr_at(step: int, lr: float, warmup: int, steps: int, schedule: str, min_lr_frac: float) -> float:
    """Learning rate for 0-based `step`: linear warmup over `warmup` steps, then cosine decay to
    lr * min_lr_frac at the last step, or constant."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - 1 - warmup)     # 1 at the last step, steps - 1
    lo = lr * min_lr_frac
    return lo + 0.5 * (lr - lo) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def global_norm(grads: dict) -> float:
    """sqrt(sum of every gradient entry squared), summed in float64."""
    return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))


def clip_grads(grads: dict, max_norm: float, norm: float) -> None:
    """Scale all gradients so their global L2 norm `norm` (from global_norm) is at most max_norm
    (0 = off)."""
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(scale)


def clamp_logit_scale(params: dict) -> None:
    """Keep the learned log temperature in [0, ln 100] (open_clip does this after each step,
    outside the gradient)."""
    ls = params["logit_scale"]
    np.clip(ls, 0.0, LOGIT_SCALE_MAX, out=ls)
