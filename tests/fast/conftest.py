"""Shared helpers of the fast-path tests, in one fixture `fast_helpers` (fixtures are prefixed by
their area, tests/conftest.py); `cases` is a hypothesis strategy builder (draw with st.data()).

Comparison (`fast_assert_same`): per tensor, max |got - want| <= rel * max(max |want|, floor),
floor = 1e-3 (float64) or 1e-2 (float32) times the largest gradient entry of the whole model, i.e.
an absolute tolerance of 1e-13 or 1e-6 times that entry. The floor is for gradients that are sums
of cancelling terms: the key bias b_K's is exactly zero in theory (it shifts every score of a
query row equally, which the softmax cancels), and the logit scale's or a rare token's can be
tiny; both sides are rounding noise there (in float32, ~1e-7 relative to the other gradients).
"""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import strategies as st

from minispatial import model

FLOOR = {"float64": 1e-3, "float32": 1e-2}   # times the largest gradient entry, see the docstring


def errors(got, want) -> dict:
    # (loss, grads) pairs -> {name: max |got - want| / max(max |want|, floor)} for every gradient
    gmax = max(float(np.abs(g).max()) for g in want[1].values())
    floor = max(FLOOR[str(next(iter(got[1].values())).dtype)] * gmax, 1e-300)   # gmax = 0 at B = 1
    return {n: float(np.abs(got[1][n].astype(np.float64) - w).max()) / max(float(np.abs(w).max()), floor)
            for n, w in want[1].items()}


def assert_same(got, want, rel):
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    assert abs(loss_a - loss_b) <= rel * max(1.0, abs(loss_b)), (loss_a, loss_b)
    assert list(grads_a) == list(grads_b)
    for n in grads_b:
        a, b = grads_a[n], grads_b[n]
        assert a.shape == b.shape and a.dtype == b.dtype, (n, a.shape, b.shape, a.dtype, b.dtype)
    for n, err in errors(got, want).items():
        assert err <= rel, f"{n}: relative error {err:.3g} > {rel}"


@st.composite
def cases(draw, dtype="float64", random_biases=False):
    """A small config (any proj_dim, embed_scale, 1-2 layers per tower), params and a batch.
    Small vocabularies with a larger batch make repeated ids (the scatter-add) certain."""
    D = draw(st.integers(2, 12))
    cfg = model.ModelConfig(
        d_model=D, n_heads=draw(st.integers(1, 3)), d_head=draw(st.integers(1, 6)),
        vision_layers=draw(st.integers(1, 2)), text_layers=draw(st.integers(1, 2)),
        proj_dim=draw(st.sampled_from([0, 3])), embed_scale=draw(st.sampled_from(["none", "sqrt_d"])),
        init=draw(st.sampled_from(["torch", "clip"])), dtype=dtype,
        vision_vocab=draw(st.integers(2, 6)), text_vocab=draw(st.integers(2, 7)),
        vision_ctx=draw(st.integers(2, 5)), text_ctx=draw(st.integers(2, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    B = draw(st.integers(1, 9))
    Tt = draw(st.integers(1, cfg.text_ctx))                  # captions may be shorter than the context
    params = model.init_params(cfg, int(rng.integers(2**31)))
    params["logit_scale"][...] = rng.uniform(0.0, np.log(100.0))
    if random_biases:                                        # (init makes them 0 under "clip")
        for n in params:
            if ".attn.b_" in n:
                params[n] = (0.5 * rng.standard_normal(params[n].shape)).astype(dtype)
    images = rng.integers(0, cfg.vision_vocab, (B, cfg.vision_ctx - 1))
    tokens = rng.integers(0, cfg.text_vocab, (B, Tt))
    eot = rng.integers(0, Tt, B)
    # keep distinct images and distinct captions only (as data.sample_batch does): a batch of
    # identical pairs has all-equal logits and gradients that are rounding noise around zero
    seen_i, seen_t, keep = set(), set(), []
    for b in range(B):
        ki, kt = tuple(images[b]), tuple(tokens[b, :eot[b] + 1])
        if ki not in seen_i and kt not in seen_t:
            seen_i.add(ki), seen_t.add(kt), keep.append(b)
    return cfg, params, images[keep], tokens[keep], eot[keep]


def paper_batch(cfg, B, seed=0):
    # -> images [B, L], tokens [B, Tt], eot [B]: random ids
    rng = np.random.default_rng(seed)
    return (rng.integers(0, cfg.vision_vocab, (B, cfg.vision_ctx - 1)),
            rng.integers(0, cfg.text_vocab, (B, cfg.text_ctx)), rng.integers(0, cfg.text_ctx, B))


def small_config(**kw):
    return dataclasses.replace(model.ModelConfig(), d_model=8, n_heads=2, d_head=4, dtype="float64", **kw)


@pytest.fixture(scope="session")
def fast_helpers():
    """The helpers above: .cases (a strategy builder), .errors, .assert_same, .batch, .small_config."""
    return SimpleNamespace(cases=cases, errors=errors, assert_same=assert_same, batch=paper_batch,
                           small_config=small_config)
