"""ops.py against finite differences, hand-computed values, symmetries, masking and bad inputs.

Gradients are checked with minispatial.gradcheck (fourth-order central differences, float64,
max relative error |a-n|/max(|a|,|n|,1e-4) <= 1e-6) over hypothesis-drawn coupled shapes.
The attention core is checked in both implementations: ops.NUMPY_CORE and the fast step's
(`fast.ATTENTION_CORE`, numba kernels), passed as `attention_forward(core=...)`.
"""

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minispatial import gradcheck as gc
from minispatial import ops


@st.composite
def sizes(draw):
    """Coupled op shapes. V <= 6 < B*T for most draws, so ids repeat."""
    return gc.Sizes(B=draw(st.integers(1, 3)), T=draw(st.integers(1, 5)), H=draw(st.integers(1, 3)),
                    Dh=draw(st.integers(1, 4)), D=draw(st.integers(1, 6)), V=draw(st.integers(1, 6)),
                    F=draw(st.integers(1, 6)), E=draw(st.integers(1, 5)))


seeds = st.integers(0, 2**32 - 1)
CORES = ("numpy", "fast")


def core_named(name):
    """ops.NUMPY_CORE, or the fast step's attention core (imported only when asked for)."""
    if name == "numpy":
        return ops.NUMPY_CORE
    from minispatial import fast

    return fast.ATTENTION_CORE


def assert_case_passes(case):
    results = gc.check_case(case, np.random.default_rng(0), full_max=10**6)   # every element
    bad = [f"{r.op} {r.tensor} {list(r.shape)}: rel err {r.err:.2e}" for r in results if not r.passed]
    assert not bad, "gradient check failed:\n" + "\n".join(bad)
    assert {r.tensor for r in results} == set(case.inputs)


# --------------------------------------------------------------------------------------------
# every op's gradient, every input and parameter tensor

SIMPLE_CASES = {
    "embedding": gc.case_embedding, "pos_embedding": gc.case_pos_embedding,
    "prepend_cls": gc.case_prepend_cls, "linear": gc.case_linear,
    "linear (no bias)": lambda rng, s: gc.case_linear(rng, s, bias=False),
    "pool": gc.case_pool, "layernorm": gc.case_layernorm,
    "gelu": gc.case_gelu, "mlp": gc.case_mlp, "l2norm": gc.case_l2norm,
    "clip_loss": gc.case_clip_loss, "softmax": gc.case_softmax,
    "softmax (causal mask)": lambda rng, s: gc.case_softmax(rng, s, mask=ops.causal_mask(s.T)),
}


@pytest.mark.parametrize("name", list(SIMPLE_CASES))
@given(s=sizes(), seed=seeds)
def test_op_gradient_matches_finite_differences(name, s, seed):
    assert_case_passes(SIMPLE_CASES[name](np.random.default_rng(seed), s))


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("variant", ["bidirectional", "causal"])
@given(s=sizes(), seed=seeds)
def test_attention_gradient_matches_finite_differences(core, variant, s, seed):
    # x and all 8 parameters (b_K's true gradient is exactly zero: the floor makes noise pass)
    rng = np.random.default_rng(seed)
    case = gc.case_attention(rng, s, causal=variant == "causal", core=core_named(core))
    assert set(case.inputs) == {"x", *ops.ATTN_PARAMS}
    assert_case_passes(case)


def test_embedding_backward_adds_repeated_ids():
    W_E = np.zeros((3, 2))
    ids = np.array([[1, 1, 2]])
    _, cache = ops.embedding_forward(W_E, ids)
    dout = np.array([[[1.0, 2.0], [10.0, 20.0], [5.0, 5.0]]])
    np.testing.assert_array_equal(ops.embedding_backward(dout, cache), [[0, 0], [11, 22], [5, 5]])


# --------------------------------------------------------------------------------------------
# CLIP loss: hand-computed values and tower symmetry

def test_clip_loss_hand_computed_2x2():
    eye = np.eye(2)
    # logits = 2 I: every row and column is CE([2, 0], target 0) = log(1 + e^-2)
    loss, _ = ops.clip_loss_forward(eye, eye, np.array(math.log(2.0)))
    assert loss == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-14)
    # swapped captions: logits [[0, 2], [2, 0]], targets on the diagonal: log(1 + e^2)
    loss, _ = ops.clip_loss_forward(eye, eye[::-1].copy(), np.array(math.log(2.0)))
    assert loss == pytest.approx(math.log(1 + math.exp(2)), rel=1e-14)
    # rows differ from columns: img = [[1,0],[1,0]], txt = I, s = 1 -> logits [[1,0],[1,0]]
    #   image->text rows: log(1 + e^-1), log(1 + e)       -> mean log(2 + e + 1/e) / 2
    #   text->image cols: [1, 1] -> log 2, [0, 0] -> log 2 -> mean log 2
    loss, _ = ops.clip_loss_forward(np.array([[1.0, 0.0], [1.0, 0.0]]), eye, np.array(0.0))
    want = 0.5 * (math.log(2 + math.e + 1 / math.e) / 2 + math.log(2))
    assert loss == pytest.approx(want, rel=1e-14)


@given(B=st.integers(1, 6), E=st.integers(1, 5), seed=seeds)
def test_clip_loss_symmetric_under_swapping_towers(B, E, seed):
    rng = np.random.default_rng(seed)
    img = ops.l2norm_forward(rng.standard_normal((B, E)))[0]
    txt = ops.l2norm_forward(rng.standard_normal((B, E)))[0]
    tau = np.array(rng.uniform(0, math.log(100)))
    loss_a, cache_a = ops.clip_loss_forward(img, txt, tau)
    loss_b, cache_b = ops.clip_loss_forward(txt, img, tau)
    assert loss_a == pytest.approx(loss_b, rel=1e-13, abs=1e-13)
    dimg_a, dtxt_a, dtau_a = ops.clip_loss_backward(1.0, cache_a)
    dtxt_b, dimg_b, dtau_b = ops.clip_loss_backward(1.0, cache_b)
    np.testing.assert_allclose(dimg_a, dimg_b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dtxt_a, dtxt_b, rtol=1e-12, atol=1e-12)
    assert float(dtau_a) == pytest.approx(float(dtau_b), rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------------------------
# masking: a masked key gets exactly zero attention and exactly zero gradient

@pytest.mark.parametrize("core", CORES)
@given(s=sizes(), seed=seeds, data=st.data())
def test_causal_masked_keys_get_exactly_zero(core, s, seed, data):
    rng = np.random.default_rng(seed)
    B, T, H, Dh = s.B, s.T, s.H, s.Dh
    q, k, v = (rng.standard_normal((B, T, H, Dh)) for _ in range(3))
    impl = core_named(core)
    z, pattern = impl.forward(q, k, v, True)
    assert (pattern[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
    # later keys/values do not change earlier outputs, bit for bit
    t = data.draw(st.integers(1, T), label="first changed position")
    k2, v2 = k.copy(), v.copy()
    k2[:, t:] += 100 * rng.standard_normal(k2[:, t:].shape)
    v2[:, t:] += 100 * rng.standard_normal(v2[:, t:].shape)
    z2, pattern2 = impl.forward(q, k2, v2, True)
    np.testing.assert_array_equal(z2[:, :t], z[:, :t])
    np.testing.assert_array_equal(pattern2[:, :, :t], pattern[:, :, :t])
    # an upstream gradient on queries < t reaches no key/value at positions >= t, exactly
    dz = rng.standard_normal(z.shape)
    dz[:, t:] = 0
    dq, dk, dv = impl.backward(dz, q, k, v, pattern)
    assert (dk[:, t:] == 0).all() and (dv[:, t:] == 0).all()
    assert (dq[:, t:] == 0).all()
    # dscores of masked entries are exactly zero
    dscores = ops.softmax_backward(rng.standard_normal(pattern.shape), pattern)
    assert (dscores[pattern == 0] == 0).all()


@given(s=sizes(), seed=seeds)
def test_recorded_scores_are_masked_with_minus_infinity(s, seed):
    # hook_attn_scores is recorded after the causal mask, as in TransformerLens: -inf on every
    # masked key, q.k / sqrt(Dh) on the others; the pattern is exactly 0 where the score is -inf
    rng = np.random.default_rng(seed)
    inputs = gc.attention_inputs(rng, s)
    p = {n: inputs[n] for n in ops.ATTN_PARAMS}
    upper = ~ops.causal_mask(s.T)
    for causal in (True, False):
        record = {}
        ops.attention_forward(inputs["x"], p, causal, record=record)
        scores, pattern = record["hook_attn_scores"], record["hook_pattern"]
        want = np.einsum("bqhd,bkhd->bhqk", record["hook_q"], record["hook_k"]) / math.sqrt(s.Dh)
        masked = upper if causal else np.zeros_like(upper)
        assert (scores[..., masked] == -np.inf).all() and np.isfinite(scores[..., ~masked]).all()
        np.testing.assert_allclose(scores[..., ~masked], want[..., ~masked], rtol=1e-12, atol=1e-12)
        assert (pattern[..., masked] == 0).all()
        np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-12)


def test_a_hook_on_the_scores_cannot_unmask_a_key():
    # the softmax applies the causal mask again after the hook: a hook that overwrites every
    # score (the -inf of masked keys too) gives a uniform pattern over the allowed keys only
    s = gc.Sizes(B=2, T=4, H=2, Dh=3, D=5)
    inputs = gc.attention_inputs(np.random.default_rng(0), s)
    p = {n: inputs[n] for n in ops.ATTN_PARAMS}
    record = {}
    ops.attention_forward(inputs["x"], p, True, hooks={"hook_attn_scores": np.zeros_like},
                          record=record)
    T = s.T
    want = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    np.testing.assert_allclose(record["hook_pattern"], np.broadcast_to(want, (2, 2, T, T)), rtol=1e-15)


def spy_core(calls):
    """ops.NUMPY_CORE, counting its forward and backward calls in `calls`."""
    def forward(q, k, v, causal):
        calls.append("forward")
        return ops.NUMPY_CORE.forward(q, k, v, causal)

    def backward(dz, q, k, v, pattern):
        calls.append("backward")
        return ops.NUMPY_CORE.backward(dz, q, k, v, pattern)

    return ops.AttentionCore(forward, backward)


def test_attention_runs_the_given_core_unless_hooks_are_asked_for():
    s = gc.Sizes(B=2, T=4, H=2, Dh=3, D=5)
    rng = np.random.default_rng(0)
    inputs = gc.attention_inputs(rng, s)
    p = {n: inputs[n] for n in ops.ATTN_PARAMS}
    dout = rng.standard_normal((s.B, s.T, s.D))
    want_out, cache = ops.attention_forward(inputs["x"], p, True)          # default: NumPy
    want_grads = ops.attention_backward(dout, cache, p)
    calls = []
    out, cache = ops.attention_forward(inputs["x"], p, True, core=spy_core(calls))
    assert calls == ["forward"]
    grads = ops.attention_backward(dout, cache, p)                         # the cache keeps the core
    assert calls == ["forward", "backward"]
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(grads[0], want_grads[0])
    for n in ops.ATTN_PARAMS:
        np.testing.assert_array_equal(grads[1][n], want_grads[1][n], err_msg=n)
    # with a hook or a record the NumPy core runs (only it has the hook points), both ways
    for kw in ({"record": {}}, {"hooks": {"hook_z": lambda z: z}}):
        calls.clear()
        out, cache = ops.attention_forward(inputs["x"], p, True, core=spy_core(calls), **kw)
        ops.attention_backward(dout, cache, p)
        assert calls == [] and np.array_equal(out, want_out), kw


# --------------------------------------------------------------------------------------------
# bad inputs: ValueError naming the problem, never a silent broadcast

X = np.ones((2, 3, 4))
X32 = X.astype(np.float32)


def attn_params(dtype=np.float64, H=2, D=4, Dh=3):
    shapes = {"W_Q": (H, D, Dh), "W_K": (H, D, Dh), "W_V": (H, D, Dh), "W_O": (H, Dh, D),
              "b_Q": (H, Dh), "b_K": (H, Dh), "b_V": (H, Dh), "b_O": (D,)}
    return {n: np.full(s, 0.1, dtype=dtype) for n, s in shapes.items()}


P = attn_params()

BAD_INPUTS = {
    # wrong shapes
    "linear x/W": (lambda: ops.linear_forward(X, np.ones((5, 6))), r"linear: x has shape"),
    "attention W_K": (lambda: ops.attention_forward(X, {**P, "W_K": np.ones((2, 4, 2))}, True),
                      r"W_K has shape \(2, 4, 2\): expected \[2, 4, 3\]"),
    "attention b_O": (lambda: ops.attention_forward(X, {**P, "b_O": np.ones(1)}, True), r"b_O has shape"),
    "attention x 2-D": (lambda: ops.attention_forward(X[0], P, True), r"x has shape \(3, 4\)"),
    "pos_embedding short": (lambda: ops.pos_embedding_forward(X, np.ones((2, 4))), r"W_pos has shape"),
    "clip features": (lambda: ops.clip_loss_forward(np.ones((2, 3)), np.ones((3, 3)), np.array(1.0)),
                      r"clip loss: image features"),
    "pool idx shape": (lambda: ops.pool_forward(X, np.array([0])), r"pool idx has shape"),
    "pool idx range": (lambda: ops.pool_forward(X, np.array([0, 3])), r"pool idx must be integer positions in \[0, 2\]"),
    # ids out of vocabulary
    "id too large": (lambda: ops.embedding_forward(np.ones((3, 4)), np.array([[0, 3]])),
                     r"ids contains id 3 outside the vocabulary \[0, 2\]"),
    "id negative": (lambda: ops.embedding_forward(np.ones((3, 4)), np.array([[-1, 0]])),
                    r"ids contains id -1 outside the vocabulary"),
    "float ids": (lambda: ops.embedding_forward(np.ones((3, 4)), np.array([[0.0]])),
                  r"ids must be an integer array"),
    # mismatched dtypes
    "attention f32 x, f64 weights": (lambda: ops.attention_forward(X32, P, True), r"dtype"),
    "attention f64 x, one f32 weight": (lambda: ops.attention_forward(
        X, {**P, "b_V": P["b_V"].astype(np.float32)}, True), r"b_V has dtype float32"),
    "linear f32 x, f64 W": (lambda: ops.linear_forward(X32, np.ones((4, 5))), r"dtype"),
    "clip dtypes": (lambda: ops.clip_loss_forward(np.ones((2, 3)), np.ones((2, 3), np.float32),
                                                  np.array(1.0)), r"dtypes"),
}

# Silent broadcasts / dtype promotions: each must be a clear ValueError, not a NumPy broadcast.
GAPS = {
    "prepend_cls cls [1]": (lambda: ops.prepend_cls_forward(X, np.ones(1)), r"cls has shape"),
    "prepend_cls f64 cls into f32": (lambda: ops.prepend_cls_forward(X32, np.ones(4)), r"dtype"),
    "layernorm w [1]": (lambda: ops.layernorm_forward(X, np.ones(1), np.zeros(4)), r"w has shape"),
    "layernorm f32 x, f64 w": (lambda: ops.layernorm_forward(X32, np.ones(4), np.zeros(4)), r"dtype"),
    "linear b [1]": (lambda: ops.linear_forward(X, np.ones((4, 5)), np.ones(1)), r"b has shape"),
    "linear f64 b with f32": (lambda: ops.linear_forward(X32, np.ones((4, 5), np.float32), np.ones(5)), r"dtype"),
    "pos_embedding f32 x, f64 W_pos": (lambda: ops.pos_embedding_forward(X32, np.ones((5, 4))), r"dtype"),
    "clip logit_scale [2]": (lambda: ops.clip_loss_forward(np.ones((2, 3)), np.ones((2, 3)), np.ones(2)),
                             r"logit_scale has shape"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_value_error(name):
    fn, pattern = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=pattern):
        fn()


@pytest.mark.parametrize("name", list(GAPS))
def test_no_silent_broadcast_or_promotion(name):
    fn, pattern = GAPS[name]
    try:
        fn()
    except ValueError as e:
        assert re.search(pattern, str(e)), f"unclear message: {e}"
        return
    raise AssertionError(f"{name}: accepted silently")
