"""AdamW, the learning-rate schedule, gradient clipping and the logit-scale clamp, against
arithmetic written out by hand (float64, 1e-12)."""

import math

import numpy as np
import pytest

from minispatial.model import ModelConfig, init_params, param_shapes
from minispatial.optim import (
    LOGIT_SCALE_MAX,
    adamw_init,
    adamw_step,
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
    params = {name: np.array([1.0, -2.0])}
    state = adamw_init(params)
    adamw_step(params, {name: G1.copy()}, state, LR, B1, B2, EPS, weight_decay)
    after1 = params[name].copy()
    adamw_step(params, {name: G2.copy()}, state, LR, B1, B2, EPS, weight_decay)
    return after1, params[name], state


def test_adamw_two_steps_by_hand_with_weight_decay():
    after1, after2, state = _two_steps("blocks.0.attn.W_Q")  # a decayed matrix
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
    assert state["t"] == 2
    np.testing.assert_allclose(state["m"]["blocks.0.attn.W_Q"], m2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(state["v"]["blocks.0.attn.W_Q"], v2, rtol=0, atol=1e-15)


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


def test_adamw_is_in_place_and_keeps_dtype():
    cfg = ModelConfig(d_model=8, n_heads=2, d_head=4, vision_vocab=5, text_vocab=7, vision_ctx=4, text_ctx=5)
    params = init_params(cfg, 0)
    values = {n: p.copy() for n, p in params.items()}
    state = adamw_init(params)                # flattens: the entries become views, same values
    ids = {n: id(p) for n, p in params.items()}
    assert state["t"] == 0
    for n, p in params.items():
        assert p.flags.c_contiguous and np.array_equal(p, values[n]) and p.dtype == values[n].dtype
    for n, p in params.items():
        assert state["m"][n].shape == p.shape and not state["m"][n].any() and not state["v"][n].any()
        assert not np.shares_memory(state["m"][n], p)
    grads = {n: np.ones_like(p) for n, p in params.items()}
    before = {n: p.copy() for n, p in params.items()}
    adamw_step(params, grads, state, 1e-2, 0.9, 0.98, 1e-6, 0.1)
    for n, p in params.items():
        assert id(p) == ids[n] and p.dtype == np.float32 and p.shape == before[n].shape
        # with g = 1 everywhere the first step moves every element down by ~lr (Adam's unit step)
        np.testing.assert_allclose(p, before[n] * (1 - 1e-3 if decayed(n, False) else 1.0) - 1e-2,
                                   rtol=0, atol=1e-6, err_msg=n)
    assert params["logit_scale"].shape == ()


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
    state = adamw_init(params)
    zero = {n: np.zeros_like(p) for n, p in params.items()}   # g = 0: Adam moves nothing
    adamw_step(params, zero, state, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5,
               decay_embeddings=decay_embeddings)
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

def test_clip_grads_scales_to_max_norm_and_returns_the_norm_before():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}        # global norm 5
    assert global_norm(grads) == 5.0
    assert clip_grads(grads, 1.0) == 5.0
    np.testing.assert_allclose(grads["a"], [3.0 / (5 + 1e-6), 0.0], rtol=1e-15)
    np.testing.assert_allclose(grads["b"], [[4.0 / (5 + 1e-6)]], rtol=1e-15)
    assert global_norm(grads) == pytest.approx(1.0, rel=1e-6) and global_norm(grads) <= 1.0


def test_clip_grads_leaves_small_norms_and_zero_max_norm_alone():
    for max_norm in (10.0, 0.0):                      # above the norm, and 0 = off
        grads = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
        assert clip_grads(grads, max_norm) == 5.0
        assert grads["a"].tolist() == [3.0, 0.0] and grads["b"].tolist() == [[4.0]]
    grads = {"a": np.array([30.0, 40.0], np.float32)}
    assert clip_grads(grads, 5.0) == 50.0
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
# the numba AdamW (backend "numba") is the NumPy code above, one pass per tensor

def _random_run(backend, dtype, weight_decay, steps=4, layout="flat"):
    # layout "flat": as adamw_init leaves it (one kernel call per step with numba); "per-tensor":
    # no flat arrays; "replaced": flat, but after two steps one entry is replaced by a copy, so
    # adamw_step must notice and go tensor by tensor
    from minispatial import ops

    params = init_params(ModelConfig(dtype=dtype), 0)
    state = adamw_init(params)
    if layout == "per-tensor":
        del state["flat"]
    rng = np.random.default_rng(1)
    with ops.use_backend(backend):
        for t in range(steps):
            if layout == "replaced" and t == 2:
                params["text.blocks.0.attn.W_K"] = params["text.blocks.0.attn.W_K"].copy()
            grads = {n: (rng.standard_normal(p.shape) * 10.0 ** rng.integers(-6, 2)).astype(p.dtype)
                     for n, p in params.items()}
            norm = global_norm(grads)
            adamw_step(params, grads, state, 1e-3 * (t + 1), 0.9, 0.98, 1e-6, weight_decay,
                       decay_embeddings=bool(t % 2))
    return params, state, norm


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("layout", ["flat", "per-tensor", "replaced"])
def test_adamw_kernel_is_bitwise_the_numpy_code(dtype, weight_decay, layout):
    # same operations in the same order, each rounded to the dtype: identical bits, every tensor
    # (the 0-d logit scale included), first and second moments included; whether the kernel
    # runs once over the flat arrays or once per tensor
    p_np, s_np, _ = _random_run("numpy", dtype, weight_decay)
    p_nb, s_nb, _ = _random_run("numba", dtype, weight_decay, layout=layout)
    assert s_np["t"] == s_nb["t"] == 4
    for n in p_np:
        assert p_nb[n].dtype == p_np[n].dtype and p_nb[n].shape == p_np[n].shape
        assert np.array_equal(p_nb[n], p_np[n]), n
        assert np.array_equal(s_nb["m"][n], s_np["m"][n]), n
        assert np.array_equal(s_nb["v"][n], s_np["v"][n]), n


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_global_norm_backends_agree(dtype):
    # the kernel sums in float64 in another order than NumPy's pairwise sum
    _, _, n_np = _random_run("numpy", dtype, 0.0, steps=1)
    _, _, n_nb = _random_run("numba", dtype, 0.0, steps=1)
    assert n_nb == pytest.approx(n_np, rel=1e-12) and n_np > 0


def test_sum_squares_handles_every_length():
    from minispatial import kernels

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 1000):
        x = rng.standard_normal(n).astype(np.float32)
        assert kernels.sum_squares(x) == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=1e-12, abs=0)


def test_adamw_update_rejects_mismatched_arrays():
    from minispatial import kernels

    p = np.zeros(4, dtype=np.float32)
    consts = kernels.adamw_constants(np.float32, 0.9, 0.99, 1.0, 1e-8, 1e-3)
    with pytest.raises(ValueError, match="does not match the parameter"):
        kernels.adamw_update(p, np.zeros(3, dtype=np.float32), p.copy(), p.copy(), 1.0, consts)
    with pytest.raises(ValueError, match="does not match the parameter"):
        kernels.adamw_update(p, np.zeros(4, dtype=np.float64), p.copy(), p.copy(), 1.0, consts)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.adamw_update(np.zeros(8, dtype=np.float32)[::2], p, p.copy(), p.copy(), 1.0, consts)


def test_flatten_puts_params_and_moments_in_one_array_each():
    params = init_params(ModelConfig(d_model=8, n_heads=2, d_head=4), 0)
    values = {n: p.copy() for n, p in params.items()}
    state = adamw_init(params)
    flat = state["flat"]
    assert flat["p"].size == flat["m"].size == flat["v"].size == sum(p.size for p in values.values())
    for n, p in params.items():
        assert np.array_equal(p, values[n]) and np.shares_memory(p, flat["p"])
        assert np.shares_memory(state["m"][n], flat["m"]) and np.shares_memory(state["v"][n], flat["v"])
    # a step through the flat arrays is seen through the dict's views
    from minispatial import ops

    with ops.use_backend("numba"):
        adamw_step(params, {n: np.ones_like(p) for n, p in params.items()}, state, 1e-2, 0.9, 0.98, 1e-6, 0.0)
    for n, p in params.items():                                     # g = 1: a step of ~lr
        np.testing.assert_allclose(p, values[n] - 1e-2, rtol=0, atol=1e-6, err_msg=n)
    assert np.array_equal(flat["g"], np.ones_like(flat["g"]))       # the flat path ran
    # mixed dtypes: nothing to flatten, the dicts keep their arrays
    mixed = {"a.W_Q": np.zeros(3, np.float32), "b.W_Q": np.zeros(2, np.float64)}
    state = adamw_init(mixed)
    assert "flat" not in state and mixed["a.W_Q"].dtype == np.float32


def test_adamw_update_flat_rejects_bad_layouts():
    from minispatial import kernels

    p = np.zeros(5, dtype=np.float32)
    consts = kernels.adamw_constants(np.float32, 0.9, 0.99, 1.0, 1e-8, 1e-3)
    ends, decays = np.array([2, 5]), np.ones(2)
    with pytest.raises(ValueError, match="does not match the parameters"):
        kernels.adamw_update_flat(p, np.zeros(4, np.float32), p.copy(), p.copy(), ends, decays, consts)
    with pytest.raises(ValueError, match="ends\\[-1\\] = len\\(p\\)"):
        kernels.adamw_update_flat(p, p.copy(), p.copy(), p.copy(), np.array([2, 4]), decays, consts)
    with pytest.raises(ValueError, match="of one length"):
        kernels.adamw_update_flat(p, p.copy(), p.copy(), p.copy(), ends, np.ones(3), consts)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_adamw_step_rejects_bad_gradients_before_changing_anything(backend):
    from minispatial import ops

    params = init_params(ModelConfig(d_model=8, n_heads=2, d_head=4), 0)
    state = adamw_init(params)
    good = {n: np.ones_like(p) for n, p in params.items()}
    before = {n: p.copy() for n, p in params.items()}
    bad_cases = [
        ({**good, "text.W_E": good["text.W_E"].astype(np.float64)}, "gradient of text.W_E is shape .* dtype float64"),
        ({**good, "vision.W_pos": good["vision.W_pos"][:-1]}, "gradient of vision.W_pos is shape"),
        ({n: g for n, g in good.items() if n != "logit_scale"}, "gradient of logit_scale is missing"),
    ]
    with ops.use_backend(backend):
        for grads, msg in bad_cases:
            with pytest.raises(ValueError, match=msg):
                adamw_step(params, grads, state, 1e-2, 0.9, 0.98, 1e-6, 0.0)
            assert state["t"] == 0
            assert all(np.array_equal(p, before[n]) for n, p in params.items())
        adamw_step(params, good, state, 1e-2, 0.9, 0.98, 1e-6, 0.0)     # and the good one still runs
    assert state["t"] == 1 and not np.array_equal(params["text.W_E"], before["text.W_E"])
