"""AdamW, the learning-rate schedule, gradient clipping and the logit-scale clamp, against
arithmetic written out by hand (float64, 1e-12), and the flat-buffer AdamW against a per-tensor
AdamW written plainly here (bit for bit). The fast step's AdamW and gradient-norm kernels are held
to optim.adamw_update / optim.global_norm in tests/fast/test_adamw.py."""

import math

import numpy as np
import pytest

from minispatial.model import ModelConfig, init_params, param_shapes
from minispatial.optim import (
    LOGIT_SCALE_MAX,
    AdamW,
    adamw_update,
    clamp_logit_scale,
    clip_grads,
    decayed,
    global_norm,
    lr_at,
)

# --------------------------------------------------------------------------------------------
# AdamW: two steps of a 2-element parameter, by hand

LR, B1, B2, EPS, WD = 0.1, 0.9, 0.99, 1e-8, 0.1
G1 = np.array([0.5, -1.0])
G2 = np.array([-0.25, 2.0])


def _two_steps(name, weight_decay=WD):
    opt = AdamW({name: np.array([1.0, -2.0])}, beta1=B1, beta2=B2, eps=EPS, weight_decay=weight_decay)
    opt.step({name: G1.copy()}, LR)
    after1 = opt.params[name].copy()
    opt.step({name: G2.copy()}, LR)
    return after1, opt.params[name], opt


def test_adamw_two_steps_by_hand_with_weight_decay():
    after1, after2, opt = _two_steps("blocks.0.attn.W_Q")  # a decayed matrix
    # step 1 (t = 1): bias corrections 1 - 0.9 = 0.1 and 1 - 0.99 = 0.01
    #   decay   p = [1, -2] * (1 - 0.1 * 0.1)            = [0.99, -1.98]
    #   m = 0.1 * [0.5, -1]                               = [0.05, -0.1]
    #   v = 0.01 * [0.25, 1]                              = [0.0025, 0.01]
    #   m_hat = m / 0.1 = [0.5, -1];  sqrt(v_hat) = sqrt(v / 0.01) = [0.5, 1]
    #   p -= 0.1 * m_hat / (sqrt(v_hat) + 1e-8)
    want1 = np.array([0.99 - 0.1 * 0.5 / (0.5 + 1e-8), -1.98 + 0.1 * 1.0 / (1.0 + 1e-8)])
    np.testing.assert_allclose(after1, want1, rtol=0, atol=1e-12)
    # step 2 (t = 2): bias corrections 1 - 0.81 = 0.19 and 1 - 0.9801 = 0.0199
    #   decay   p = want1 * 0.99
    #   m = 0.9 * [0.05, -0.1] + 0.1 * [-0.25, 2]         = [0.02, 0.11]
    #   v = 0.99 * [0.0025, 0.01] + 0.01 * [0.0625, 4]    = [0.0031, 0.0499]
    #   p -= 0.1 * (m / 0.19) / (sqrt(v / 0.0199) + 1e-8)
    m2 = np.array([0.02, 0.11])
    v2 = np.array([0.0031, 0.0499])
    want2 = want1 * 0.99 - 0.1 * (m2 / 0.19) / (np.sqrt(v2 / 0.0199) + 1e-8)
    np.testing.assert_allclose(after2, want2, rtol=0, atol=1e-12)
    # by hand: 0.8811 - 0.1 * 0.105263 / 0.394688 and -1.8612 - 0.1 * 0.578947 / 1.583521
    np.testing.assert_allclose(want2, [0.854430059748, -1.897760772093], rtol=0, atol=1e-11)
    assert opt.t == 2
    np.testing.assert_allclose(opt.m["blocks.0.attn.W_Q"], m2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(opt.v["blocks.0.attn.W_Q"], v2, rtol=0, atol=1e-15)


def test_adamw_two_steps_by_hand_without_decay():
    # a bias is never decayed: the same updates without the factors 0.99
    after1, after2, _ = _two_steps("blocks.0.attn.b_Q")
    want1 = np.array([1.0 - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 + 0.1 * 1.0 / (1.0 + 1e-8)])
    want2 = want1 - 0.1 * (np.array([0.02, 0.11]) / 0.19) / (np.sqrt(np.array([0.0031, 0.0499]) / 0.0199) + 1e-8)
    np.testing.assert_allclose(after1, want1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(after2, want2, rtol=0, atol=1e-12)
    # and weight_decay = 0 gives the same for a matrix
    _, after2_nowd, _ = _two_steps("blocks.0.attn.W_Q", weight_decay=0.0)
    np.testing.assert_allclose(after2_nowd, want2, rtol=0, atol=1e-12)


SMALL = ModelConfig(d_model=8, n_heads=2, d_head=4, vision_vocab=5, text_vocab=7, vision_ctx=4, text_ctx=5)


def make_adamw(params, **kw):
    return AdamW(params, **{"beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "weight_decay": 0.1, **kw})


def test_adamw_is_in_place_and_keeps_dtype():
    params = init_params(SMALL, 0)
    opt = make_adamw(params)                  # its own flat buffer: views of the same values
    views = {n: id(p) for n, p in opt.params.items()}
    assert opt.t == 0 and list(opt.params) == list(params)
    for n, p in opt.params.items():
        assert p.flags.c_contiguous and np.array_equal(p, params[n]) and p.dtype == params[n].dtype
        assert p.shape == params[n].shape
    for n, p in opt.params.items():
        assert opt.m[n].shape == p.shape and not opt.m[n].any() and not opt.v[n].any()
        assert not np.shares_memory(opt.m[n], p) and not np.shares_memory(opt.v[n], opt.m[n])
    grads = {n: np.ones_like(p) for n, p in params.items()}
    before = {n: p.copy() for n, p in opt.params.items()}
    opt.step(grads, 1e-2)
    assert opt.t == 1
    for n, p in opt.params.items():
        assert id(p) == views[n] and p.dtype == np.float32 and p.shape == before[n].shape
        # with g = 1 everywhere the first step moves every element down by ~lr (Adam's unit step)
        np.testing.assert_allclose(p, before[n] * (1 - 1e-3 if decayed(n, False) else 1.0) - 1e-2,
                                   rtol=0, atol=1e-6, err_msg=n)
    assert opt.params["logit_scale"].shape == ()


def test_adamw_does_not_change_the_callers_dict():
    params = init_params(SMALL, 0)
    arrays = dict(params)                               # the caller's dict and its arrays
    values = {n: p.copy() for n, p in params.items()}
    opt = make_adamw(params)
    for _ in range(2):
        opt.step({n: np.ones_like(p) for n, p in params.items()}, 1e-2)
    clamp_logit_scale(opt.params)
    assert list(params) == list(arrays) and all(params[n] is arrays[n] for n in params)
    for n, p in params.items():
        assert np.array_equal(p, values[n]), n                          # values untouched
        assert not np.shares_memory(p, opt.params[n]), n                # AdamW holds a copy
        assert not np.array_equal(opt.params[n], values[n]), n         # which did move


# --------------------------------------------------------------------------------------------
# which tensors are decayed

FULL = ModelConfig(d_model=8, n_heads=2, d_head=4, layernorm=True, mlp=True, d_mlp=6, proj_dim=3,
                   text_layers=2, vision_vocab=5, text_vocab=7, vision_ctx=4, text_ctx=5)
MATRICES = {"W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_proj"}
EMBEDDINGS = {"W_E", "W_pos", "class_embedding"}


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_applies_to_matrices_only(decay_embeddings):
    params = {n: p.astype(np.float64) for n, p in init_params(FULL, 1).items()}
    for n in params:                      # LayerNorm w = 1, biases 0: make every tensor non-trivial
        params[n] = params[n] + 0.5
    before = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5, decay_embeddings=decay_embeddings)
    zero = {n: np.zeros_like(p) for n, p in params.items()}   # g = 0: Adam moves nothing
    opt.step(zero, lr=0.1)
    params = opt.params
    names = set(param_shapes(FULL))
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert {"b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "w", "b", "logit_scale"} | MATRICES | EMBEDDINGS == leaves
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        want_decay = leaf in MATRICES or (decay_embeddings and leaf in EMBEDDINGS)
        factor = 1.0 - 0.1 * 0.5 if want_decay else 1.0
        np.testing.assert_allclose(params[n], before[n] * factor, rtol=1e-15, atol=0, err_msg=n)
        assert decayed(n, decay_embeddings) == want_decay, n


def test_decayed_names():
    assert decayed("vision.blocks.0.attn.W_Q", False) and decayed("text.blocks.1.attn.W_O", False)
    assert decayed("text.W_proj", False) and decayed("vision.blocks.0.mlp.W_in", False)
    assert not decayed("vision.blocks.0.attn.b_Q", True)
    assert not decayed("vision.blocks.0.ln1.w", True) and not decayed("text.ln_final.b", True)
    assert not decayed("logit_scale", True)
    for emb in ("vision.W_E", "text.W_pos", "vision.class_embedding"):
        assert not decayed(emb, False) and decayed(emb, True)


# --------------------------------------------------------------------------------------------
# the learning-rate schedule

def test_lr_warmup_is_linear_to_the_peak():
    got = [lr_at(s, 2.0, 4, 20, "cosine", 0.0) for s in range(5)]
    assert got == [0.5, 1.0, 1.5, 2.0, 2.0]       # (s + 1) / warmup, then the peak


def test_lr_cosine_ends_at_min_lr_frac_on_the_last_step():
    lr, warmup, steps, frac = 1.0, 4, 15, 0.1
    sched = [lr_at(s, lr, warmup, steps, "cosine", frac) for s in range(steps)]
    assert sched[warmup] == lr                                 # cosine starts at the peak
    assert sched[-1] == pytest.approx(lr * frac, abs=1e-15)    # ... and ends at lr * min_lr_frac
    # the middle of the decay (step 4 + 10/2 = 9): lo + (lr - lo) / 2
    assert sched[9] == pytest.approx(0.1 + 0.5 * 0.9, abs=1e-15)
    # a quarter of the way (step 4 + 10/4 is not an integer; step 6 is progress 0.2)
    assert sched[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)), abs=1e-15)
    assert all(a >= b for a, b in zip(sched[warmup:], sched[warmup + 1:]))   # non-increasing
    assert lr_at(steps - 1, 3e-4, 0, steps, "cosine", 0.0) == pytest.approx(0.0, abs=1e-20)
    assert lr_at(0, 3e-4, 0, steps, "cosine", 0.0) == 3e-4


def test_lr_constant_schedule():
    assert [lr_at(s, 0.5, 2, 10, "constant", 0.1) for s in range(10)] == [0.25] + [0.5] * 9
    assert lr_at(0, 0.5, 0, 1, "cosine", 0.0) == 0.5       # a one-step run uses the full lr


# --------------------------------------------------------------------------------------------
# gradient clipping and the logit-scale clamp

def test_clip_grads_scales_to_max_norm_given_the_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}        # global norm 5
    assert global_norm(grads) == 5.0
    assert clip_grads(grads, 1.0, global_norm(grads)) is None
    np.testing.assert_allclose(grads["a"], [3.0 / (5 + 1e-6), 0.0], rtol=1e-15)
    np.testing.assert_allclose(grads["b"], [[4.0 / (5 + 1e-6)]], rtol=1e-15)
    assert global_norm(grads) == pytest.approx(1.0, rel=1e-6) and global_norm(grads) <= 1.0


def test_clip_grads_leaves_small_norms_and_zero_max_norm_alone():
    for max_norm in (10.0, 0.0):                      # above the norm, and 0 = off
        grads = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
        assert global_norm(grads) == 5.0
        clip_grads(grads, max_norm, global_norm(grads))
        assert grads["a"].tolist() == [3.0, 0.0] and grads["b"].tolist() == [[4.0]]
    grads = {"a": np.array([30.0, 40.0], np.float32)}
    assert global_norm(grads) == 50.0                 # summed in float64: exact
    clip_grads(grads, 5.0, global_norm(grads))
    assert grads["a"].dtype == np.float32
    np.testing.assert_allclose(grads["a"], [3.0, 4.0], rtol=1e-6)


def test_clamp_logit_scale_to_0_ln100_in_place():
    assert LOGIT_SCALE_MAX == math.log(100.0)
    for value, want in ((-1.0, 0.0), (5.0, math.log(100.0)), (2.0, 2.0), (0.0, 0.0)):
        params = {"logit_scale": np.array(value)}
        arr = params["logit_scale"]
        clamp_logit_scale(params)
        assert params["logit_scale"] is arr and arr.shape == () and float(arr) == want
    params = {"logit_scale": np.array(9.0, dtype=np.float32)}
    clamp_logit_scale(params)
    assert params["logit_scale"].dtype == np.float32
    assert float(params["logit_scale"]) == float(np.float32(math.log(100.0)))


# --------------------------------------------------------------------------------------------
# AdamW over one flat buffer is bitwise a per-tensor AdamW

def plain_adamw(params, grads_seq, lrs, beta1, beta2, eps, weight_decay, decay_embeddings):
    """AdamW tensor by tensor, written plainly (the module docstring's formula, in the order
    optim.adamw_update computes it) -> (params, m, v), new arrays."""
    p = {n: a.copy() for n, a in params.items()}
    m = {n: np.zeros_like(a) for n, a in params.items()}
    v = {n: np.zeros_like(a) for n, a in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        for n in p:
            g = grads[n]
            if weight_decay and decayed(n, decay_embeddings):
                p[n] *= p[n].dtype.type(1.0 - lr * weight_decay)
            m[n] *= beta1
            m[n] += (1.0 - beta1) * g
            v[n] *= beta2
            v[n] += (1.0 - beta2) * (g * g)
            p[n] -= (lr / bc1) * m[n] / (np.sqrt(v[n]) / math.sqrt(bc2) + eps)
    return p, m, v


def random_grads(params, steps, seed=1):
    # gradients over many magnitudes (1e-6 .. 10), in the params' dtype
    rng = np.random.default_rng(seed)
    return [{n: (rng.standard_normal(p.shape) * 10.0 ** rng.integers(-6, 2)).astype(p.dtype)
             for n, p in params.items()} for _ in range(steps)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_flat_adamw_is_bitwise_a_per_tensor_adamw(dtype, weight_decay, decay_embeddings):
    # the same operations in the same order, each rounded to the dtype: identical bits for every
    # tensor (the 0-d logit scale included), first and second moments included
    params = init_params(ModelConfig(dtype=dtype), 0)
    grads_seq = random_grads(params, 4)
    lrs = [1e-3 * (t + 1) for t in range(4)]
    want_p, want_m, want_v = plain_adamw(params, grads_seq, lrs, 0.9, 0.98, 1e-6, weight_decay,
                                         decay_embeddings)
    opt = AdamW(params, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=weight_decay,
                decay_embeddings=decay_embeddings)
    for grads, lr in zip(grads_seq, lrs):
        opt.step(grads, lr)
    assert opt.t == 4
    for n in params:
        assert opt.params[n].dtype == np.dtype(dtype) and opt.params[n].shape == params[n].shape
        assert np.array_equal(opt.params[n], want_p[n]), n
        assert np.array_equal(opt.m[n], want_m[n]), n
        assert np.array_equal(opt.v[n], want_v[n]), n


def test_loaded_adamw_continues_as_if_it_had_never_stopped():
    # what resuming from a checkpoint does: a new AdamW from the saved params, `load` of the
    # saved moments and step count, then the remaining steps: bit for bit the uninterrupted run
    params = init_params(SMALL, 0)
    grads_seq = random_grads(params, 5)
    straight = make_adamw(params)
    for t, grads in enumerate(grads_seq):
        straight.step(grads, 1e-3 * (t + 1))
        if t == 1:
            saved = ({n: p.copy() for n, p in straight.params.items()},
                     {n: a.copy() for n, a in straight.m.items()},
                     {n: a.copy() for n, a in straight.v.items()}, straight.t)
    resumed = make_adamw(saved[0])
    resumed.load(saved[1], saved[2], saved[3])
    assert resumed.t == 2
    for t, grads in enumerate(grads_seq[2:], start=2):
        resumed.step(grads, 1e-3 * (t + 1))
    assert resumed.t == straight.t == 5
    for n in params:
        assert np.array_equal(resumed.params[n], straight.params[n]), n
        assert np.array_equal(resumed.m[n], straight.m[n]) and np.array_equal(resumed.v[n], straight.v[n]), n


def test_adamw_puts_params_and_moments_in_one_array_each():
    params = init_params(SMALL, 0)
    opt = make_adamw(params, weight_decay=0.0)
    total = sum(p.size for p in params.values())
    assert opt.flat_p.shape == opt.flat_m.shape == opt.flat_v.shape == (total,)
    assert opt.ends[-1] == total and len(opt.ends) == len(params)
    for n, p in opt.params.items():
        assert np.array_equal(p, params[n]) and np.shares_memory(p, opt.flat_p)
        assert np.shares_memory(opt.m[n], opt.flat_m) and np.shares_memory(opt.v[n], opt.flat_v)
    # one update call per step, over the whole flat buffer; its results are seen through the views
    calls = []

    def update(p, g, m, v, ends, decays, *rest):
        calls.append((p, g, m, v, ends, decays))
        adamw_update(p, g, m, v, ends, decays, *rest)

    opt.update = update
    opt.step({n: np.ones_like(p) for n, p in params.items()}, 1e-2)
    assert len(calls) == 1
    p, g, m, v, ends, decays = calls[0]
    assert p is opt.flat_p and m is opt.flat_m and v is opt.flat_v and g.shape == (total,)
    assert np.array_equal(g, np.ones(total, np.float32)) and list(ends) == list(opt.ends)
    assert np.array_equal(decays, np.ones(len(params)))                 # weight_decay 0
    for n, p in opt.params.items():                                     # g = 1: a step of ~lr
        np.testing.assert_allclose(p, params[n] - 1e-2, rtol=0, atol=1e-6, err_msg=n)
    # mixed dtypes cannot share one flat buffer: refused, naming them
    with pytest.raises(ValueError, match=r"several dtypes \['float32', 'float64'\]"):
        make_adamw({"a.W_Q": np.zeros(3, np.float32), "b.W_Q": np.zeros(2, np.float64)})


@pytest.mark.parametrize("step", ["reference", "fast"])
def test_adamw_step_rejects_bad_gradients_before_changing_anything(step):
    # whichever update function runs (the NumPy one, or the fast step's), the gradients are
    # checked first
    from minispatial.step import choose

    params = init_params(SMALL, 0)
    opt = make_adamw(params, weight_decay=0.0, update=choose(step).adamw_update)
    good = {n: np.ones_like(p) for n, p in params.items()}
    flat_before = [a.copy() for a in (opt.flat_p, opt.flat_m, opt.flat_v)]
    bad_cases = [
        ({**good, "text.W_E": good["text.W_E"].astype(np.float64)}, "gradient of text.W_E is shape .* dtype float64"),
        ({**good, "vision.W_pos": good["vision.W_pos"][:-1]}, "gradient of vision.W_pos is shape"),
        ({n: g for n, g in good.items() if n != "logit_scale"}, "gradient of logit_scale is missing"),
        ({**good, "text.W_pos": good["text.W_pos"].tolist()}, "gradient of text.W_pos is list"),
    ]
    for grads, msg in bad_cases:
        with pytest.raises(ValueError, match=msg):
            opt.step(grads, 1e-2)
        assert opt.t == 0
        for a, b in zip((opt.flat_p, opt.flat_m, opt.flat_v), flat_before):
            assert np.array_equal(a, b)
    opt.step(good, 1e-2)                                                # and the good one still runs
    assert opt.t == 1 and not np.array_equal(opt.params["text.W_E"], params["text.W_E"])
