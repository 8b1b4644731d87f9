"""The fast path: the reference training step's sums in another order, with less work.
minispatial/step.py bundles these functions into the fast Step (`step.choose("fast")`).

    loss_and_grads  model.loss_and_grads with the rewrites (step.py; `supports(cfg)`: no LayerNorm,
                    no MLP; those configs run the reference model with ATTENTION_CORE)
    adamw_update    optim.adamw_update in one numba pass, bitwise equal (adamw.py)
    global_norm     optim.global_norm in float64 lanes (adamw.py)
    encode_images, encode_texts   model.encode_images/encode_texts with ATTENTION_CORE (evaluation)
    ATTENTION_CORE  the numba attention core, an ops.AttentionCore (attention_core.py)

Read in this order: step.py (the towers and the loss), one_layer.py and last_layer.py (the
rewrites), loss.py, adamw.py, kernels.py (every numba kernel, and the one rule they follow),
reference.py (the rewrites in plain NumPy, which the kernels are held to), products.py (the
matrix products of the step, which the benchmark counts). Tests: tests/fast/.
"""

from __future__ import annotations

from minispatial import model
from minispatial.fast.adamw import adamw_update, global_norm
from minispatial.fast.attention_core import ATTENTION_CORE
from minispatial.fast.step import loss_and_grads, supports


def encode_images(params, images, cfg):
    # images [B, L] -> features [B, E]: model.encode_images with the numba attention core
    return model.encode_images(params, images, cfg, core=ATTENTION_CORE)


def encode_texts(params, tokens, eot, cfg):
    # tokens [B, Tt], eot [B] -> features [B, E]: model.encode_texts with the numba attention core
    return model.encode_texts(params, tokens, eot, cfg, core=ATTENTION_CORE)


__all__ = ["ATTENTION_CORE", "adamw_update", "encode_images", "encode_texts", "global_norm",
           "loss_and_grads", "supports"]
