"""The fast step (minispatial/fast/step.py and step.choose("fast")) against the reference step,
model.loss_and_grads in NumPy: 1e-10 in float64, 1e-4 in float32 (tolerances: conftest.py).

In float32 some gradients are ill-conditioned sums: the logit scale's is a sum of B^2 terms
dlogits * logits that cancel (logits up to 100 in size), so a 1e-7 change of the features moves
it by more than 1e-4 relative -- in the float32 reference as much as in the fast path. There the
float32 test also compares both with the float64 gradient.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minispatial import fast, gradcheck, model, step

FAST = settings(max_examples=int(os.environ.get("FAST_EXAMPLES", "25")), deadline=None)


@FAST
@given(data=st.data())
def test_fast_equals_reference_float64(data, fast_helpers):
    cfg, params, images, tokens, eot = data.draw(fast_helpers.cases("float64"))
    fast_helpers.assert_same(fast.loss_and_grads(params, images, tokens, eot, cfg),
                     model.loss_and_grads(params, images, tokens, eot, cfg), 1e-10)


@FAST
@given(data=st.data())
def test_fast_equals_reference_float32(data, fast_helpers):
    # float32 against float32 at 1e-4. A tensor that misses it must be as close to the exact
    # (float64) gradient as the float32 reference gets on this problem: within 1e-4 or 10x the
    # reference's worst error (ill-conditioned sums, see the docstring).
    cfg, params, images, tokens, eot = data.draw(fast_helpers.cases("float32"))
    got = fast.loss_and_grads(params, images, tokens, eot, cfg)
    want = model.loss_and_grads(params, images, tokens, eot, cfg)
    exact = model.loss_and_grads({n: p.astype(np.float64) for n, p in params.items()},
                                 images, tokens, eot, dataclasses.replace(cfg, dtype="float64"))
    errors = fast_helpers.errors
    err_fast, err_ref, err_exact = errors(got, want), errors(want, exact), errors(got, exact)
    assert abs(got[0] - want[0]) <= 1e-4 * max(1.0, abs(want[0]))
    ref_worst = max(err_ref.values())
    for n, e in err_fast.items():
        assert e <= 1e-4 or err_exact[n] <= max(1e-4, 10 * ref_worst), (
            f"{n}: fast vs reference {e:.3g}; vs float64: fast {err_exact[n]:.3g}, reference {ref_worst:.3g}")


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("overrides", [{}, {"text_layers": 2, "embed_scale": "sqrt_d", "proj_dim": 64}])
def test_fast_equals_reference_paper_model(dtype, rel, overrides, fast_helpers):
    # the paper's model (D 128, 4 heads) at batch 64, and the left+right variant (2 text layers)
    cfg = dataclasses.replace(model.ModelConfig(), dtype=dtype, **overrides)
    params = model.init_params(cfg, 3)
    batch = fast_helpers.batch(cfg, 64)
    fast_helpers.assert_same(fast.loss_and_grads(params, *batch, cfg),
                             model.loss_and_grads(params, *batch, cfg), rel)


@pytest.mark.parametrize("option", [{"layernorm": True}, {"mlp": True, "d_mlp": 6},
                                    {"layernorm": True, "mlp": True, "d_mlp": 6}])
def test_layernorm_and_mlp_run_the_model_with_the_numba_core(option, fast_helpers):
    cfg = fast_helpers.small_config(**option)
    assert not fast.supports(cfg)
    params = model.init_params(cfg, 0)
    batch = fast_helpers.batch(cfg, 5)
    got = fast.loss_and_grads(params, *batch, cfg)
    # exactly the reference model with the numba attention core; equal to NumPy up to rounding
    fast_helpers.assert_same(got, model.loss_and_grads(params, *batch, cfg, core=fast.ATTENTION_CORE), 0.0)
    fast_helpers.assert_same(got, model.loss_and_grads(params, *batch, cfg), 1e-10)


def test_step_bundles_the_fast_functions(fast_helpers):
    fast_step = step.choose("fast")
    assert step.choose("fast") is fast_step
    assert (fast_step.name, fast_step.backend) == ("fast", "numba")
    assert fast_step.loss_and_grads is fast.loss_and_grads and fast_step.adamw_update is fast.adamw_update
    assert fast_step.global_norm is fast.global_norm and fast_step.attention_core is fast.ATTENTION_CORE
    # the encoders are the model's with the numba core: what evaluation computes
    cfg = fast_helpers.small_config(text_layers=2)
    params = model.init_params(cfg, 0)
    images, tokens, eot = fast_helpers.batch(cfg, 6)
    enc_i, enc_t = fast_step.encoders
    assert np.array_equal(enc_i(params, images, cfg),
                          model.encode_images(params, images, cfg, core=fast.ATTENTION_CORE))
    assert np.array_equal(enc_t(params, tokens, eot, cfg),
                          model.encode_texts(params, tokens, eot, cfg, core=fast.ATTENTION_CORE))
    assert np.allclose(enc_t(params, tokens, eot, cfg), model.encode_texts(params, tokens, eot, cfg),
                       rtol=0, atol=1e-12)


def test_bad_ids_are_rejected(fast_helpers):
    cfg = dataclasses.replace(model.ModelConfig(), d_model=8, n_heads=2, d_head=4)
    params = model.init_params(cfg, 0)
    images, tokens, eot = fast_helpers.batch(cfg, 3)
    images[1, 2] = cfg.vision_vocab
    with pytest.raises(ValueError, match="images contains id"):
        fast.loss_and_grads(params, images, tokens, eot, cfg)
    # ids are checked against the tables the kernels index, not only against the config
    images[1, 2] = 0
    small = {**params, "text.W_E": params["text.W_E"][:2]}
    tokens[0, 0] = 2
    with pytest.raises(ValueError, match="text.W_E"):      # the params check sees the shape first
        fast.loss_and_grads(small, images, tokens, eot, cfg)


@pytest.mark.parametrize("init", ["clip", "torch"])
def test_directional_finite_differences_float64(init, fast_helpers):
    # every parameter tensor: <grad, u> against a central difference of the fast loss along u,
    # with gradcheck's difference, floor and tolerance (README: "How the gradients are checked")
    cfg = dataclasses.replace(model.ModelConfig(), d_model=6, n_heads=2, d_head=3, dtype="float64",
                              vision_vocab=4, text_vocab=5, vision_ctx=4, text_ctx=4,
                              text_layers=2, proj_dim=5, embed_scale="sqrt_d", init=init)
    params = model.init_params(cfg, 1)
    images, tokens, eot = fast_helpers.batch(cfg, 6, seed=2)
    _, grads = fast.loss_and_grads(params, images, tokens, eot, cfg)
    rng = np.random.default_rng(0)
    for n, p in params.items():
        def f(x, n=n):
            return fast.loss_and_grads({**params, n: x}, images, tokens, eot, cfg)[0]
        err = gradcheck.directional_check(f, p, grads[n], rng)
        assert err <= gradcheck.REL_TOL, (n, err)


NOJIT_STEP = """
import dataclasses, numpy as np
from minispatial import fast, model, optim
from minispatial.fast import kernels
assert not hasattr(kernels.table_pattern_kernel, "signatures")      # plain Python functions
for layers in (1, 2):
    cfg = dataclasses.replace(model.ModelConfig(), d_model=4, n_heads=2, d_head=2, dtype="float64",
                              text_layers=layers, vision_vocab=3, text_vocab=4, vision_ctx=3, text_ctx=3)
    params = model.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 3, (3, 2)), rng.integers(0, 4, (3, 3)), np.array([0, 2, 1]))
    (la, ga), (lb, gb) = fast.loss_and_grads(params, *batch, cfg), model.loss_and_grads(params, *batch, cfg)
    assert abs(la - lb) <= 1e-10 * max(1, abs(lb))
    for n in gb:
        assert np.abs(ga[n] - gb[n]).max() <= 1e-10 * max(np.abs(gb[n]).max(), 1e-3), n
# the optimizer: bitwise the NumPy AdamW; the norm to rounding
runs = []
for update in (optim.adamw_update, fast.adamw_update):
    opt = optim.AdamW(params, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.1, update=update)
    opt.step(ga, 1e-2)
    runs.append(opt.flat_p)
assert np.array_equal(runs[0], runs[1])
assert abs(fast.global_norm(ga) - optim.global_norm(ga)) <= 1e-12 * optim.global_norm(ga)
print("ok")
"""


def test_runs_without_jit():
    # the kernels are plain Python loops under NUMBA_DISABLE_JIT=1; same numbers as the reference
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", NOJIT_STEP], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
