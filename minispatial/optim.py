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


def adamw_init(params: dict) -> dict:
    """Optimizer state: first and second moments (zeros like each param) and the step count t.
    Also `flatten`s params and moments (one array each, the dicts hold views of it)."""
    state = {"t": 0,
             "m": {n: np.zeros_like(p) for n, p in params.items()},
             "v": {n: np.zeros_like(p) for n, p in params.items()}}
    flatten(params, state)
    return state


def flatten(params: dict, state: dict) -> None:
    """Move every parameter and both moments into one flat array each: the dict entries become
    views of it (same shapes, same values), so that the numba backend's AdamW updates all
    tensors in one kernel call per step instead of one per tensor, with bitwise the same results.
    `adamw_init` calls it; so does the trainer after loading a checkpoint. A no-op if the tensors
    do not share one dtype. If an entry is later replaced by another array, `adamw_step` notices
    and updates tensor by tensor."""
    names = list(params)
    arrays = [d[n] for d in (params, state["m"], state["v"]) for n in names]
    if not names or len({a.dtype for a in arrays}) != 1:
        return
    ends = np.cumsum([params[n].size for n in names])
    flat = {"names": names, "ends": ends,
            "decayed": {de: np.array([decayed(n, de) for n in names]) for de in (False, True)},
            "g": np.empty(int(ends[-1]), dtype=arrays[0].dtype)}
    for key, d in (("p", params), ("m", state["m"]), ("v", state["v"])):
        buf = np.empty(int(ends[-1]), dtype=arrays[0].dtype)
        for n, e in zip(names, ends):
            shape = d[n].shape
            buf[e - d[n].size:e] = d[n].reshape(-1)
            d[n] = buf[e - d[n].size:e].reshape(shape)
        flat[key] = buf
    flat["views"] = [(params[n], state["m"][n], state["v"][n]) for n in names]
    state["flat"] = flat


def _flat_views(params: dict, state: dict, grads: dict):
    # -> state["flat"] if params and moments are still its views (and grads match them), else None
    flat = state.get("flat")
    if flat is None or len(params) != len(flat["names"]):
        return None
    m, v = state["m"], state["v"]
    for n, (pv, mv, vv) in zip(flat["names"], flat["views"]):
        g = grads.get(n)
        if (params.get(n) is not pv or m.get(n) is not mv or v.get(n) is not vv
                or not isinstance(g, (np.ndarray, np.generic)) or g.shape != pv.shape or g.dtype != pv.dtype):
            return None
    return flat


def _check_grads(params: dict, grads: dict, state: dict) -> None:
    # every parameter has a gradient and both moments of its own shape and dtype; raises before
    # adamw_step changes anything
    for n, p in params.items():
        for what, a in (("gradient", grads.get(n)), ("first moment", state["m"].get(n)),
                        ("second moment", state["v"].get(n))):
            ok = isinstance(a, (np.ndarray, np.generic))          # (a 0-d gradient may be a NumPy scalar)
            if not ok or a.shape != p.shape or a.dtype != p.dtype:
                got = f"shape {a.shape} dtype {a.dtype}" if ok else ("missing" if a is None else type(a).__name__)
                raise ValueError(f"adamw_step: the {what} of {n} is {got}; expected the parameter's "
                                 f"shape {p.shape} dtype {p.dtype}")


def adamw_step(params: dict, grads: dict, state: dict, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, decay_embeddings: bool = False) -> None:
    """One AdamW update of every parameter, in place (params and state).

    The NumPy lines below are the reference; with the "numba" backend, kernels.adamw_update does
    the same operations in one pass per tensor (bitwise the same results, tests/test_optim.py),
    and over all tensors in one call (kernels.adamw_update_flat) when they are `flatten`ed."""
    fused = _use_kernels()
    flat = _flat_views(params, state, grads) if fused else None
    if flat is None:
        _check_grads(params, grads, state)
    state["t"] += 1
    t = state["t"]
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    if flat is not None:
        g = flat["g"]
        np.concatenate([grads[n].reshape(-1) for n in flat["names"]], out=g)
        decays = np.where(flat["decayed"][decay_embeddings], 1.0 - lr * weight_decay, 1.0) if weight_decay \
            else np.ones(len(flat["names"]))
        consts = fused.adamw_constants(g.dtype, beta1, beta2, math.sqrt(bc2), eps, lr / bc1)
        fused.adamw_update_flat(flat["p"], g, flat["m"], flat["v"], flat["ends"], decays, consts)
        return
    consts = {}                                        # per dtype, for the kernel
    for n, p in params.items():
        g = grads[n]
        m, v = state["m"][n], state["v"][n]
        decay = 1.0 - lr * weight_decay if (weight_decay and decayed(n, decay_embeddings)) else 1.0
        if fused:
            if p.dtype not in consts:
                consts[p.dtype] = fused.adamw_constants(p.dtype, beta1, beta2, math.sqrt(bc2), eps, lr / bc1)
            fused.adamw_update(p, g, m, v, decay, consts[p.dtype])
            continue
        if decay != 1.0:
            p *= p.dtype.type(decay)
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * (g * g)
        denom = np.sqrt(v) / math.sqrt(bc2) + eps
        p -= (lr / bc1) * m / denom


def _use_kernels():
    # -> the kernels module when the backend is "numba", else None (the NumPy lines run)
    from minispatial import ops

    return ops._kernels() if ops.get_backend() == "numba" else None


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
    fused = _use_kernels()
    if fused:
        return math.sqrt(sum(fused.sum_squares(g) for g in grads.values()))
    return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))


def clip_grads(grads: dict, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm (0 = off); return the norm
    before clipping."""
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(scale)
    return norm


def clamp_logit_scale(params: dict) -> None:
    """Keep the learned log temperature in [0, ln 100] (open_clip does this after each step,
    outside the gradient)."""
    ls = params["logit_scale"]
    np.clip(ls, 0.0, LOGIT_SCALE_MAX, out=ls)
