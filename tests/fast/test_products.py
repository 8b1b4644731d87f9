"""products.py: the fast step's matrix products, counted by hand on a tiny model."""

import dataclasses

import numpy as np
import pytest

from minispatial import model
from minispatial.fast import products

TINY = dataclasses.replace(model.ModelConfig(), d_model=4, n_heads=2, d_head=2, vision_vocab=3,
                           text_vocab=5, vision_ctx=3, text_ctx=3)
TOKENS = np.array([[2, 1, 0], [3, 4, 1]])        # EOT (id 1) at positions 1 and 2
EOT = np.array([1, 2])


def flops(prods):
    return sum(2 * n * m * k * p for _, n, m, k, p in prods)


def test_fast_flops_by_hand():
    # D = 4, H = 2, Dh = 2, HD = 4, B = 2, E = 4; each product [m, k] x [k, p] is 2 m k p FLOPs
    # vision: V' = 4 (with CLS), T = 3, VT = 7, H*VT = 14, one query (U = 1), H*U = 2
    #   forward: q 2*1*4*4 = 32, Qt 2*2*4*2*1 = 32, [Vtab | S^T] 2*7*4*6 = 336,
    #            O 2*2*7*2*4 = 224, C @ O 2*2*15*4 = 240                               -> 864
    #   backward: dC 2*2*4*14 = 224, dO 240, dW_O 224, dVtab 224, dW_V 224, dQt 2*2*7*4 = 112,
    #             dq 32, dW_K 32, dW_Q 32, dX_u 32, dAP^T 2*4*6*7 = 336                  -> 1712
    # text: V' = 5, T = 3, VT = 8, H*VT = 16, queries (EOT, 1), (EOT, 2): U = 2, H*U = 4
    #   forward: q 64, Qt 64, [Vtab | S^T] 2*8*4*8 = 512, O 256, C @ O 2*2*18*4 = 288    -> 1184
    #   backward: dC 256, dO 288, dW_O 256, dVtab 256, dW_V 256, dQt 2*4*8*4 = 256,
    #             dq 64, dW_K 64, dW_Q 64, dX_u 64, dAP^T 2*4*8*8 = 512                 -> 2336
    # logits: 6 * B^2 * E = 96
    assert products.fast_flops(TINY, TOKENS, EOT) == 864 + 1712 + 1184 + 2336 + 96
    assert products.n_queries("text", TOKENS, EOT) == 2 and products.n_queries("vision", TOKENS, EOT) == 1


def test_multi_layer_flops_by_hand():
    # text with 2 layers (B = 2, T = 3, N = 6, keys K = (1 + 1) + (2 + 1) = 5):
    #   dense layer 0: qkv 2*6*4*12 = 576, scores 2*4*3*2*3 = 144, z 144, W_O 2*6*4*4 = 192 -> 1056,
    #                  backward twice that -> 3168 in all
    #   last layer: kv 2*6*4*8 = 384, q 2*2*4*4 = 64, scores 2*2*2*5 = 40, z 40, W_O 64 -> 592;
    #               backward dW_O 64, dz 64, dpattern 40, dv 40, dq 40, dk 40, dW_kv 384,
    #               dx 384, dW_Q 64, dx_pool 64 -> 1184
    cfg = dataclasses.replace(TINY, text_layers=2)
    vision = 864 + 1712
    assert products.fast_flops(cfg, TOKENS, EOT) == vision + 3168 + 592 + 1184 + 96
    # a dense layer's backward is twice its forward
    dense = products.dense_layer_products(cfg, 2, 3)
    assert flops(dense[4:]) == 2 * flops(dense[:4])


def test_step_products_are_the_fast_count():
    cfg = model.ModelConfig()
    for overrides in ({}, {"text_layers": 2, "proj_dim": 64}):
        c = dataclasses.replace(cfg, **overrides)
        for B in (8, 64):
            rng = np.random.default_rng(B)
            tokens, eot = rng.integers(2, c.text_vocab, (B, c.text_ctx)), rng.choice([4, 7], B)
            assert flops(products.step_products(c, tokens, eot)) == products.fast_flops(c, tokens, eot)
    with pytest.raises(ValueError, match="LayerNorm/MLP"):
        products.step_products(dataclasses.replace(TINY, mlp=True), TOKENS, EOT)
