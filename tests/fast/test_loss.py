"""loss.py: the fused CLIP loss and the L2 norm against ops.clip_loss_* and ops.l2norm_*."""

import numpy as np
import pytest

from minispatial import ops
from minispatial.fast import loss as fl


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("B", [1, 2, 7, 8, 9, 64, 130])
def test_clip_loss_equals_reference(dtype, rel, B):
    # the fused loss (numba passes + NumPy exp) against ops.clip_loss_forward/backward; B not a
    # multiple of 8 exercises the reductions' tails, large logit scales the softmax shifts
    rng = np.random.default_rng(B)
    for tau in (0.0, np.log(1 / 0.07), np.log(100.0)):
        img, _ = ops.l2norm_forward(rng.standard_normal((B, 16)).astype(dtype))
        txt, _ = ops.l2norm_forward((img + 0.5 * rng.standard_normal((B, 16))).astype(dtype))
        logit_scale = np.array(tau, dtype=dtype)
        loss, dimg, dtxt, dtau = fl.clip_loss(img, txt, logit_scale)
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
def test_clip_loss_one_exp_and_its_fallback(dtype, monkeypatch):
    # the one shared exp (E = exp(logits - s)) is used when every row and column sum of E is safe;
    # captions pointing away from their images at s = 100 make E underflow in float32, and then
    # the reference's per-row and per-column shifts (two_exps) must take over
    calls = []
    real = fl.two_exps
    monkeypatch.setattr(fl, "two_exps", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(3)
    img, _ = ops.l2norm_forward(rng.standard_normal((33, 16)).astype(dtype))
    txt, _ = ops.l2norm_forward((img + 0.5 * rng.standard_normal((33, 16))).astype(dtype))
    for txt, tau, fallback in ((txt, np.log(1 / 0.07), False), (-txt, np.log(100.0), dtype == "float32")):
        calls.clear()
        logit_scale = np.array(tau, dtype=dtype)
        loss, dimg, dtxt, dtau = fl.clip_loss(img, txt, logit_scale)
        assert bool(calls) == fallback
        want_loss, cache = ops.clip_loss_forward(img, txt, logit_scale)
        want = ops.clip_loss_backward(1.0, cache)
        assert np.isfinite(loss) and loss == pytest.approx(float(want_loss), rel=1e-5)
        for got, w in ((dimg, want[0]), (dtxt, want[1])):
            assert np.abs(got - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-3)


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-13), ("float32", 1e-6)])
@pytest.mark.parametrize("E", [1, 3, 8, 13, 128])
def test_l2norm_equals_reference(dtype, rel, E):
    rng = np.random.default_rng(E)
    x = rng.standard_normal((5, E)).astype(dtype)
    dy = rng.standard_normal((5, E)).astype(dtype)
    y, cache = fl.l2norm_forward(x)
    y_ref, cache_ref = ops.l2norm_forward(x)
    assert y.dtype == x.dtype and np.abs(y - y_ref).max() <= rel
    dx, dx_ref = fl.l2norm_backward(dy, cache), ops.l2norm_backward(dy, cache_ref)
    assert dx.dtype == x.dtype and np.abs(dx - dx_ref).max() <= rel * np.abs(dx_ref).max()
