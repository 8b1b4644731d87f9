"""The fast training step (minispatial/fast.py) against the reference (model.py + ops.py in NumPy).

The reference is called explicitly (model.tower_forward / tower_backward under
ops.use_backend("numpy")), never through model.loss_and_grads, which dispatches to the fast path.

Comparison: per tensor, max |fast - ref| <= rel * max(max |ref|, floor), with floor = 1e-3
(float64) or 1e-2 (float32) times the largest gradient entry of the whole model, i.e. an absolute
tolerance of 1e-13 or 1e-6 times that entry. The floor is for gradients that are sums of
cancelling terms: the key bias b_K's is exactly zero in theory (it shifts every score of a query
row equally, which the softmax cancels), and the logit scale's or a rare token's can be tiny;
both sides are rounding noise there (in float32, ~1e-7 relative to the other gradients).
In float32 some gradients are ill-conditioned sums: the logit scale's is a sum of B^2 terms
dlogits * logits that cancel (logits up to 100 in size), so a 1e-7 change of the features moves
it by more than 1e-4 relative -- in the float32 reference as much as in the fast path. There the
float32 test also compares both with the float64 gradient (see test_fast_equals_reference_float32).
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minispatial import fast, fastloss, gradcheck, model, ops

FLOOR = {"float64": 1e-3, "float32": 1e-2}   # times the largest gradient entry, see the docstring
FAST = settings(max_examples=int(os.environ.get("FAST_EXAMPLES", "25")), deadline=None)


def reference_loss_and_grads(params, images, tokens, eot, cfg):
    # the reference step, spelled out (model.loss_and_grads minus its dispatch), all in NumPy
    with ops.use_backend("numpy"):
        cls_idx = np.zeros(images.shape[0], dtype=np.int64)
        img, cache_v = model.tower_forward(params, "vision", images, cls_idx, cfg)
        txt, cache_t = model.tower_forward(params, "text", tokens, eot, cfg)
        loss, cache_l = ops.clip_loss_forward(img, txt, params["logit_scale"])
        dimg, dtxt, dtau = ops.clip_loss_backward(1.0, cache_l)
        grads = {"logit_scale": dtau}
        grads.update(model.tower_backward(dimg, cache_v, params, cfg))
        grads.update(model.tower_backward(dtxt, cache_t, params, cfg))
    return float(loss), {n: grads[n] for n in params}


def errors(got, want) -> dict:
    # -> {name: max |got - want| / max(max |want|, floor)} for every gradient (see the docstring)
    gmax = max(float(np.abs(g).max()) for g in want[1].values())
    floor = max(FLOOR[str(next(iter(got[1].values())).dtype)] * gmax, 1e-300)   # gmax = 0 at B = 1
    return {n: float(np.abs(got[1][n].astype(np.float64) - w).max()) / max(float(np.abs(w).max()), floor)
            for n, w in want[1].items()}


def assert_same(got, want, rel):
    loss_a, grads_a = got
    loss_b, grads_b = want
    assert abs(loss_a - loss_b) <= rel * max(1.0, abs(loss_b)), (loss_a, loss_b)
    assert list(grads_a) == list(grads_b)
    for n in grads_b:
        a, b = grads_a[n], grads_b[n]
        assert a.shape == b.shape and a.dtype == b.dtype, (n, a.shape, b.shape, a.dtype, b.dtype)
    for n, err in errors(got, want).items():
        assert err <= rel, f"{n}: relative error {err:.3g} > {rel}"


@st.composite
def cases(draw, dtype="float64"):
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
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    B = draw(st.integers(1, 9))
    Tt = draw(st.integers(1, cfg.text_ctx))                  # captions may be shorter than the context
    params = model.init_params(cfg, seed)
    params["logit_scale"][...] = rng.uniform(0.0, np.log(100.0))
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


@FAST
@given(cases("float64"))
def test_fast_equals_reference_float64(case):
    cfg, params, images, tokens, eot = case
    assert_same(fast.loss_and_grads_fast(params, images, tokens, eot, cfg),
                reference_loss_and_grads(params, images, tokens, eot, cfg), 1e-10)


@FAST
@given(cases("float32"))
def test_fast_equals_reference_float32(case):
    # float32 against float32 at 1e-4. A tensor that misses it must be as close to the exact
    # (float64) gradient as the float32 reference gets on this problem: within 1e-4 or 10x the
    # reference's worst error (ill-conditioned sums, see the docstring).
    cfg, params, images, tokens, eot = case
    got = fast.loss_and_grads_fast(params, images, tokens, eot, cfg)
    want = reference_loss_and_grads(params, images, tokens, eot, cfg)
    exact = reference_loss_and_grads({n: p.astype(np.float64) for n, p in params.items()},
                                     images, tokens, eot, dataclasses.replace(cfg, dtype="float64"))
    err_fast, err_ref, err_exact = errors(got, want), errors(want, exact), errors(got, exact)
    assert abs(got[0] - want[0]) <= 1e-4 * max(1.0, abs(want[0]))
    ref_worst = max(err_ref.values())
    for n, e in err_fast.items():
        assert e <= 1e-4 or err_exact[n] <= max(1e-4, 10 * ref_worst), (
            f"{n}: fast vs reference {e:.3g}; vs float64: fast {err_exact[n]:.3g}, reference {ref_worst:.3g}")


def _paper_batch(cfg, B, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, cfg.vision_vocab, (B, cfg.vision_ctx - 1))
    tokens = rng.integers(0, cfg.text_vocab, (B, cfg.text_ctx))
    eot = rng.integers(0, cfg.text_ctx, B)
    return images, tokens, eot


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("overrides", [{}, {"text_layers": 2, "embed_scale": "sqrt_d", "proj_dim": 64}])
def test_fast_equals_reference_paper_model(dtype, rel, overrides):
    # the paper's model (D 128, 4 heads) at batch 64, and the left+right variant (2 text layers)
    cfg = dataclasses.replace(model.ModelConfig(), dtype=dtype, **overrides)
    params = model.init_params(cfg, 3)
    images, tokens, eot = _paper_batch(cfg, 64)
    assert_same(fast.loss_and_grads_fast(params, images, tokens, eot, cfg),
                reference_loss_and_grads(params, images, tokens, eot, cfg), rel)


def test_dispatch():
    cfg = dataclasses.replace(model.ModelConfig(), d_model=8, n_heads=2, d_head=4, dtype="float64")
    params = model.init_params(cfg, 0)
    batch = _paper_batch(cfg, 5)
    with ops.use_backend("numba"):
        got = model.loss_and_grads(params, *batch, cfg)
    assert_same(got, fast.loss_and_grads_fast(params, *batch, cfg), 0.0)   # numba -> fast path
    with ops.use_backend("numpy"):
        got = model.loss_and_grads(params, *batch, cfg)
    assert_same(got, reference_loss_and_grads(params, *batch, cfg), 0.0)  # numpy -> reference


@pytest.mark.parametrize("option", [{"layernorm": True}, {"mlp": True, "d_mlp": 6},
                                    {"layernorm": True, "mlp": True, "d_mlp": 6}])
def test_unsupported_configs_fall_back(option):
    cfg = dataclasses.replace(model.ModelConfig(), d_model=8, n_heads=2, d_head=4, dtype="float64", **option)
    assert not fast.supports(cfg)
    params = model.init_params(cfg, 0)
    batch = _paper_batch(cfg, 5)
    with ops.use_backend("numba"):
        got = model.loss_and_grads(params, *batch, cfg)
    # the reference path with the numba kernels: equal to the NumPy reference up to rounding
    assert_same(got, reference_loss_and_grads(params, *batch, cfg), 1e-10)
    with pytest.raises(ValueError, match="layernorm and mlp"):
        fast.loss_and_grads_fast(params, *batch, cfg)


def test_bad_ids_are_rejected():
    cfg = dataclasses.replace(model.ModelConfig(), d_model=8, n_heads=2, d_head=4)
    params = model.init_params(cfg, 0)
    images, tokens, eot = _paper_batch(cfg, 3)
    images[1, 2] = cfg.vision_vocab
    with pytest.raises(ValueError, match="images contains id"):
        fast.loss_and_grads_fast(params, images, tokens, eot, cfg)
    # ids are checked against the tables the kernels index, not only against the config
    images[1, 2] = 0
    small = {**params, "text.W_E": params["text.W_E"][:2]}
    tokens[0, 0] = 2
    with pytest.raises(ValueError, match="tokens contains id 2"):
        fast.loss_and_grads_fast(small, images, tokens, eot, cfg)


@pytest.mark.parametrize("init", ["clip", "torch"])
def test_directional_finite_differences_float64(init):
    # every parameter tensor: <grad, u> against a central difference of the fast loss along u,
    # with gradcheck's difference, floor and tolerance (README: "How the gradients are checked")
    cfg = dataclasses.replace(model.ModelConfig(), d_model=6, n_heads=2, d_head=3, dtype="float64",
                              vision_vocab=4, text_vocab=5, vision_ctx=4, text_ctx=4,
                              text_layers=2, proj_dim=5, embed_scale="sqrt_d", init=init)
    params = model.init_params(cfg, 1)
    images, tokens, eot = _paper_batch(cfg, 6, seed=2)
    _, grads = fast.loss_and_grads_fast(params, images, tokens, eot, cfg)
    rng = np.random.default_rng(0)
    for n, p in params.items():
        def f(x, n=n):
            return fast.loss_and_grads_fast({**params, n: x}, images, tokens, eot, cfg)[0]
        err = gradcheck.directional_check(f, p, grads[n], rng)
        assert err <= gradcheck.REL_TOL, (n, err)


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("B", [1, 2, 7, 8, 9, 64, 130])
def test_clip_loss_fast_equals_reference(dtype, rel, B):
    # the fused loss (numba passes + NumPy exp) against ops.clip_loss_forward/backward; B not a
    # multiple of 8 exercises the reductions' tails, large logit scales the softmax shifts
    rng = np.random.default_rng(B)
    for tau in (0.0, np.log(1 / 0.07), np.log(100.0)):
        img, _ = ops.l2norm_forward(rng.standard_normal((B, 16)).astype(dtype))
        txt, _ = ops.l2norm_forward((img + 0.5 * rng.standard_normal((B, 16))).astype(dtype))
        logit_scale = np.array(tau, dtype=dtype)
        loss, dimg, dtxt, dtau = fastloss.clip_loss_fast(img, txt, logit_scale)
        want_loss, cache = ops.clip_loss_forward(img, txt, logit_scale)
        want_dimg, want_dtxt, want_dtau = ops.clip_loss_backward(1.0, cache)
        assert loss == pytest.approx(float(want_loss), rel=rel, abs=rel)
        # the gradients are differences of softmaxes and I, cancelling where the loss saturates
        # (small B, large s): each must be within rel of the reference (relative to the larger of
        # its entries and c = s / (2B), the size of the terms that cancel), or no more than 10x
        # further from a float64 evaluation than the reference is
        c = float(np.exp(tau)) / (2 * B)
        exact = ops.clip_loss_backward(1.0, ops.clip_loss_forward(img.astype(np.float64), txt.astype(np.float64),
                                                                  logit_scale.astype(np.float64))[1])
        for got, want, x in ((dimg, want_dimg, exact[0]), (dtxt, want_dtxt, exact[1])):
            assert got.dtype == want.dtype and got.shape == want.shape
            err, ref_err = np.abs(got - x).max(), np.abs(want - x).max()
            assert np.abs(got - want).max() <= rel * max(np.abs(want).max(), c) or err <= 10 * ref_err
        assert dtau.shape == () and dtau.dtype == want_dtau.dtype
        # dtau is a sum of B^2 cancelling terms: compare with a float64 evaluation
        assert abs(float(dtau) - float(exact[2])) <= max(10 * abs(float(want_dtau) - float(exact[2])), rel * B)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clip_loss_fast_one_exp_and_its_fallback(dtype, monkeypatch):
    # the one shared exp (E = exp(logits - s)) is used when every row and column sum of E is safe;
    # captions pointing away from their images at s = 100 make E underflow in float32, and then
    # the reference's per-row and per-column shifts (_two_exps) must take over
    calls = []
    real = fastloss._two_exps
    monkeypatch.setattr(fastloss, "_two_exps", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(3)
    img, _ = ops.l2norm_forward(rng.standard_normal((33, 16)).astype(dtype))
    txt, _ = ops.l2norm_forward((img + 0.5 * rng.standard_normal((33, 16))).astype(dtype))
    for txt, tau, fallback in ((txt, np.log(1 / 0.07), False), (-txt, np.log(100.0), dtype == "float32")):
        calls.clear()
        logit_scale = np.array(tau, dtype=dtype)
        loss, dimg, dtxt, dtau = fastloss.clip_loss_fast(img, txt, logit_scale)
        assert bool(calls) == fallback
        want_loss, cache = ops.clip_loss_forward(img, txt, logit_scale)
        want = ops.clip_loss_backward(1.0, cache)
        assert np.isfinite(loss) and loss == pytest.approx(float(want_loss), rel=1e-5)
        for got, w in ((dimg, want[0]), (dtxt, want[1])):
            assert np.abs(got - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-3)


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-13), ("float32", 1e-6)])
@pytest.mark.parametrize("E", [1, 3, 8, 13, 128])
def test_l2norm_fast_equals_reference(dtype, rel, E):
    rng = np.random.default_rng(E)
    x = rng.standard_normal((5, E)).astype(dtype)
    dy = rng.standard_normal((5, E)).astype(dtype)
    y, cache = fastloss.l2norm_forward(x)
    y_ref, cache_ref = ops.l2norm_forward(x)
    assert y.dtype == x.dtype and np.abs(y - y_ref).max() <= rel
    dx, dx_ref = fastloss.l2norm_backward(dy, cache), ops.l2norm_backward(dy, cache_ref)
    assert dx.dtype == x.dtype and np.abs(dx - dx_ref).max() <= rel * np.abs(dx_ref).max()


def _direct_softmax_and_bins(S, qi, r, n_keys, Dh):
    # the pattern and C of table_attention_forward, the slow way: each score, a masked softmax
    H, U, VT = S.shape
    B, T = r.shape
    Vp = VT - T
    pattern = np.zeros((B, H, T))
    C = np.zeros((B, H * VT + U))
    for b in range(B):
        n = n_keys[b]
        for h in range(H):
            s = np.array([S[h, qi[b], r[b, j]] + S[h, qi[b], Vp + j] for j in range(n)], dtype=np.float64)
            s = s / np.sqrt(Dh)
            p = np.exp(s - s.max())
            pattern[b, h, :n] = p / p.sum()
            for j in range(n):
                C[b, h * VT + r[b, j]] += pattern[b, h, j]
                C[b, h * VT + Vp + j] = pattern[b, h, j]
        C[b, H * VT + qi[b]] = 1.0
    return pattern, C


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_table_attention_forward_and_its_underflow_fallback(dtype):
    # exp(score - shift) is a product of two exp tables; a row whose products underflow (here: a
    # token row no sample uses scores 1e4 above the rest, so the token table's max is far above
    # every key's) must be recomputed with its own max, or it would come out 0 / 0
    rng = np.random.default_rng(5)
    H, U, Vp, T, B, Dh = 2, 3, 6, 5, 9, 4
    S = rng.standard_normal((H, U, Vp + T)).astype(dtype)
    qi = rng.integers(0, U, B)
    r = rng.integers(0, Vp - 1, (B, T))                 # row Vp - 1 is never used
    n_keys = rng.integers(1, T + 1, B)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for boost in (0.0, 1e4):
        S[:, :, Vp - 1] = boost
        pattern, C = fast.table_attention_forward(S, qi, r, n_keys, Dh)
        want_p, want_C = _direct_softmax_and_bins(S.astype(np.float64), qi, r, n_keys, Dh)
        assert pattern.dtype == C.dtype == np.dtype(dtype)
        assert np.abs(pattern - want_p).max() <= tol and np.abs(C - want_C).max() <= tol
    # with the fallback off (safe = 0): the products of the exp tables alone give the unboosted
    # case (so a threshold that always fell back would not hide a wrong product path), and get
    # the boosted case wrong (so the loop above did exercise the fallback)
    def products_only():
        ES = np.empty_like(S)
        scale = S.dtype.type(1 / np.sqrt(Dh))
        fast._exp_tables_kernel(S, Vp, scale, ES)
        pattern = np.empty((B, H, T), dtype=dtype)
        fast._table_pattern_kernel(ES, S, qi, r, n_keys, scale, S.dtype.type(0), pattern, np.empty_like(C))
        return pattern
    assert not np.allclose(products_only(), want_p, atol=tol)
    S[:, :, Vp - 1] = 0.0
    want_p = _direct_softmax_and_bins(S.astype(np.float64), qi, r, n_keys, Dh)[0]
    assert np.abs(products_only() - want_p).max() <= tol


def test_table_scores_are_the_models_attention_scores():
    # one-layer towers: S[h, qi[b], r[b, j]] + S[h, qi[b], V' + j] (keys through the query, with
    # b_K's share) is the pooled row's score of key j, as the reference computes it (its
    # hook_attn_scores are scaled by 1/sqrt(Dh)); b_K drawn non-zero, as it cancels in the softmax
    cfg = dataclasses.replace(model.ModelConfig(), d_model=8, n_heads=2, d_head=4, dtype="float64",
                              vision_vocab=5, text_vocab=6, vision_ctx=4, text_ctx=5)
    params = model.init_params(cfg, 1)
    rng = np.random.default_rng(1)
    for n in ("vision", "text"):
        params[f"{n}.blocks.0.attn.b_K"] = rng.standard_normal(params[f"{n}.blocks.0.attn.b_K"].shape)
    images, tokens, eot = _paper_batch(cfg, 7)
    record = {}
    with ops.use_backend("numpy"):
        model.tower_forward(params, "vision", images, np.zeros(7, dtype=np.int64), cfg, None, record)
        model.tower_forward(params, "text", tokens, eot, cfg, None, record)
    for tower, ids, pool in (("vision", images, np.zeros(7, dtype=np.int64)), ("text", tokens, eot)):
        _, (_, _, c, _) = fast.tower_forward_fast(params, tower, ids, pool, cfg)
        S, qi, r, n_keys = c["S"], c["qi"], c["r"], c["n_keys"]
        Vp = S.shape[2] - r.shape[1]
        want = record[f"{tower}.blocks.0.attn.hook_attn_scores"] * np.sqrt(cfg.d_head)   # [B, H, Tq, Tk]
        for b in range(7):
            n = n_keys[b]
            got = S[:, qi[b], r[b, :n]] + S[:, qi[b], Vp + np.arange(n)]                 # [H, n]
            assert np.abs(got - want[b, :, pool[b], :n]).max() <= 1e-12 * np.abs(want).max(), (tower, b)


def test_keys_backward_kernel_by_einsum():
    # dW_K, db_K and dq from dQt and sp (the gradients of Qt = W_K q and c = b_K . q), with a
    # random sp: in the step sp is ~0 (the softmax cancels c), which the model tests cannot see
    rng = np.random.default_rng(2)
    H, U, D, Dh = 3, 2, 8, 4
    dQt, sp = rng.standard_normal((H, U, D)), rng.standard_normal((H, U))
    q, b_K, W_K = rng.standard_normal((U, H * Dh)), rng.standard_normal((H, Dh)), rng.standard_normal((H, D, Dh))
    dq0 = np.einsum("hud,hde->uhe", dQt, W_K).reshape(U, H * Dh)       # what the caller puts in dq
    dq, dW_K, db_K = dq0.copy(), np.empty((H, D, Dh)), np.empty((H, Dh))
    fast._keys_backward_kernel(dQt, sp, q, b_K, dW_K, db_K, dq)
    qh = q.reshape(U, H, Dh)
    assert np.allclose(dW_K, np.einsum("hud,uhe->hde", dQt, qh), rtol=1e-12, atol=1e-12)
    assert np.allclose(db_K, np.einsum("hu,uhe->he", sp, qh), rtol=1e-12, atol=1e-12)
    assert np.allclose(dq, dq0 + np.einsum("hu,he->uhe", sp, b_K).reshape(U, H * Dh), rtol=1e-12, atol=1e-12)


def test_distinct_pairs():
    rows = np.array([3, 1, 3, 0, 1, 3])
    pos = np.array([2, 0, 2, 5, 4, 2])
    r_u, p_u, inv = fast.distinct_pairs(rows, pos, 6)
    # pairs in increasing order of row * T + pos: (0, 5), (1, 0), (1, 4), (3, 2)
    assert r_u.tolist() == [0, 1, 1, 3] and p_u.tolist() == [5, 0, 4, 2]
    assert inv.tolist() == [3, 1, 3, 0, 2, 3]
    assert np.array_equal(r_u[inv], rows) and np.array_equal(p_u[inv], pos)


def test_runs_without_jit():
    # the kernels are plain Python loops under NUMBA_DISABLE_JIT=1; same numbers as the reference
    code = """
import dataclasses, numpy as np
from minispatial import fast, model
from tests.test_fast import assert_same, reference_loss_and_grads, _paper_batch
for layers in (1, 2):
    cfg = dataclasses.replace(model.ModelConfig(), d_model=4, n_heads=2, d_head=2, dtype="float64",
                              text_layers=layers, vision_vocab=3, text_vocab=4, vision_ctx=3, text_ctx=3)
    params = model.init_params(cfg, 0)
    batch = _paper_batch(cfg, 3)
    assert_same(fast.loss_and_grads_fast(params, *batch, cfg), reference_loss_and_grads(params, *batch, cfg), 1e-10)
# the optimizer's kernels too: bitwise the NumPy AdamW
from minispatial import ops, optim
_, grads = fast.loss_and_grads_fast(params, *batch, cfg)
runs = []
for backend in ("numpy", "numba"):
    p = {n: v.copy() for n, v in params.items()}
    state = optim.adamw_init(p)
    with ops.use_backend(backend):
        norm = optim.global_norm(grads)
        optim.adamw_step(p, grads, state, 1e-2, 0.9, 0.98, 1e-6, 0.1)
    runs.append((p, norm))
assert all(np.array_equal(runs[0][0][n], runs[1][0][n]) for n in params)
assert abs(runs[0][1] - runs[1][1]) <= 1e-12 * runs[0][1]
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
