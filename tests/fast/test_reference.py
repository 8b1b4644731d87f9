"""reference.py (the rewrites in plain NumPy) is held both ways: to the reference model
(model.loss_and_grads, 1e-10 in float64) and to the kernels (one_layer.py, last_layer.py: every
intermediate and gradient of a tower, 1e-12 in float64)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minispatial import model
from minispatial.fast import last_layer, one_layer, reference, step
from minispatial.fast.attention_core import ATTENTION_CORE

REL = 1e-12


def close(got, want, rel=REL, floor=0.0):
    # max |got - want| <= rel * max(max |want|, floor)
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max(initial=0.0)) <= rel * max(float(np.abs(want).max(initial=0.0)), floor)


@settings(deadline=None)
@given(data=st.data())
def test_reference_equals_the_model(data, fast_helpers):
    # (the "torch" init draws non-zero biases; the same cases as the fast step's test)
    cfg, params, images, tokens, eot = data.draw(fast_helpers.cases("float64"))
    fast_helpers.assert_same(reference.loss_and_grads(params, images, tokens, eot, cfg),
                     model.loss_and_grads(params, images, tokens, eot, cfg), 1e-10)


def towers(case):
    # -> [(tower, n_layers, tables)] of a drawn case
    cfg, params, images, tokens, eot = case
    s = model.embed_scale(cfg)
    return [(tower, cfg.layers(tower), step.input_tables(params, tower, ids, pool, s))
            for tower, ids, pool in (("vision", images, np.zeros(len(images), dtype=np.int64)),
                                     ("text", tokens, eot))]


@settings(deadline=None)
@given(data=st.data())
def test_kernels_equal_the_reference(data, fast_helpers):
    # tower by tower, from the same tables: forward intermediates, then the backward of a random
    # dpool (every gradient, and dA, dP of the tables)
    case = data.draw(fast_helpers.cases("float64", random_biases=True))
    cfg, params = case[0], case[1]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    for tower, L, tables in towers(case):
        last = f"{tower}.blocks.{L - 1}"
        p = model.attn_params(params, last)
        dpool = rng.standard_normal((tables.r.shape[0], cfg.d_model))
        g_fast, g_ref = {}, {}
        if L == 1:
            pooled, saved = one_layer.forward(params, last, tables)
            want, ref = reference.table_forward(p, tables)
            U, H, Dh = len(ref["r_u"]), cfg.n_heads, cfg.d_head
            pairs = [(pooled, want), (saved["S"], ref["S"]), (saved["pattern"], ref["pattern"]),
                     (saved["C"], ref["C"]), (saved["O"], ref["O"]), (saved["X_u"], ref["X_u"]),
                     (saved["q"], ref["q"].reshape(U, H * Dh)), (saved["Vtab"], ref["Vtab"])]
            dA, dP = one_layer.backward(dpool, saved, params, last, g_fast)
            dA_ref, dP_ref, ga = reference.table_backward(dpool, ref, p)
        else:
            x = last_layer.forward(params, tower, L, tables, ATTENTION_CORE)[1]["x2"]
            x = x.reshape(tables.r.shape + (cfg.d_model,))                 # the stream entering the last layer
            pooled, saved = last_layer.pooled_row_forward(x, params, last, tables.pool, tables.n_keys)
            want, ref = reference.pooled_row_forward(x, p, tables.pool, tables.n_keys)
            pairs = [(pooled, want), (saved["pattern"], ref["pattern"]), (saved["z"], ref["z"]),
                     (saved["q"], ref["q"])]
            dA = last_layer.pooled_row_backward(dpool, saved, params, last, g_fast)   # (dx)
            dA_ref, ga = reference.pooled_row_backward(dpool, ref, p, tables.pool)
            dP = dP_ref = np.zeros(0)
        for i, (a, b) in enumerate(pairs):
            assert close(a, b), (tower, L, i)
        g_ref = {f"{last}.attn.{n}": v for n, v in ga.items()}
        gmax = max(np.abs(v).max() for v in g_ref.values())
        assert set(g_fast) == set(g_ref)
        for n, v in g_ref.items():
            assert close(g_fast[n], v, floor=1e-3 * gmax), (tower, L, n)
        assert close(dA, dA_ref, floor=1e-3 * gmax) and close(dP, dP_ref, floor=1e-3 * gmax), (tower, L)


def test_reference_rejects_what_it_does_not_rewrite(fast_helpers):
    cfg = fast_helpers.small_config(layernorm=True)
    with pytest.raises(ValueError, match="LayerNorm or the MLP"):
        reference.loss_and_grads(model.init_params(cfg, 0), *fast_helpers.batch(cfg, 3), cfg)
