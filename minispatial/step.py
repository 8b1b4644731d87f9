"""The training step, two ways: the reference and the fast one.

    REFERENCE   model.loss_and_grads + optim.adamw_update + optim.global_norm: plain NumPy, every
                op a forward/backward pair of ops.py. Read this one.
    fast        minispatial/fast/: the same sums in another order, with less work (only the pooled
                row of the last layer, tables instead of per-token projections, numba kernels).
                Tests hold it to the reference (1e-10 in float64). The default for training.

A Step bundles what the trainer calls each step and what evaluation encodes with, so that a run
uses one implementation throughout. `choose` is the only place in the mainline that imports
minispatial/fast/.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from minispatial import model, ops, optim

STEPS = ("fast", "reference")


class Step(NamedTuple):
    name: str                   # "fast" or "reference"
    backend: str                # recorded in summary.json: "numba" (fast) or "numpy" (reference)
    loss_and_grads: Callable    # (params, images, tokens, eot, model_cfg) -> (loss, grads)
    adamw_update: Callable      # optim.adamw_update's signature, over AdamW's flat buffer
    global_norm: Callable       # grads -> float
    encoders: tuple             # (encode_images(params, images, cfg), encode_texts(params, tokens, eot, cfg))
    attention_core: ops.AttentionCore   # the attention core it runs where it runs ops.attention_*


REFERENCE = Step("reference", "numpy", model.loss_and_grads, optim.adamw_update, optim.global_norm,
                 (model.encode_images, model.encode_texts), ops.NUMPY_CORE)


def choose(name: str = "fast") -> Step:
    """The Step called `name` ("fast" or "reference"); ValueError naming the allowed values."""
    if name == "reference":
        return REFERENCE
    if name == "fast":
        return fast_step()
    raise ValueError(f"step={name!r} is not allowed: must be one of {STEPS}")


@functools.lru_cache(maxsize=1)
def fast_step() -> Step:
    """The fast Step (one object per process), built from minispatial/fast/'s functions."""
    from minispatial import fast              # the mainline's only import of fast/
    return Step("fast", "numba", fast.loss_and_grads, fast.adamw_update, fast.global_norm,
                (fast.encode_images, fast.encode_texts), fast.ATTENTION_CORE)
