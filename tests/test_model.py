"""The dual encoder: TransformerLens parameter names and shapes, both init schemes, unit-norm
features, float64 gradients against finite differences for every parameter, hooks, input
validation, for both training steps (minispatial/step.py: the reference model.loss_and_grads and
the fast one), and the two steps held equal."""

import dataclasses
import math

import numpy as np
import pytest

from minispatial.model import (
    ModelConfig,
    check_params,
    encode_images,
    encode_texts,
    init_params,
    loss_only,
    param_shapes,
    run_with_cache,
)
from minispatial.step import choose

# a tiny model with the paper's topology (attention-only, 1 layer per tower)
TINY = ModelConfig(d_model=8, n_heads=2, d_head=4, d_mlp=12, vision_vocab=5, text_vocab=7, vision_ctx=5,
                   text_ctx=6)
STEPS = ("reference", "fast")


def batch(cfg, B, seed=0):
    # -> images [B, vision_ctx - 1], tokens [B, text_ctx], eot [B]: random ids, every eot position
    rng = np.random.default_rng(seed)
    images = rng.integers(0, cfg.vision_vocab, size=(B, cfg.vision_ctx - 1))
    tokens = rng.integers(0, cfg.text_vocab, size=(B, cfg.text_ctx))
    eot = np.arange(B) % cfg.text_ctx
    return images, tokens, eot


def f64(cfg):
    return dataclasses.replace(cfg, dtype="float64")


def noisy_params(cfg, seed=0, std=0.1):
    # init + noise, so zero biases and unit LayerNorm weights do not hide a term of the gradient
    rng = np.random.default_rng(seed + 100)
    return {n: p + std * rng.standard_normal(p.shape) for n, p in init_params(cfg, seed).items()}


# --------------------------------------------------------------------------------------------
# names and shapes

def attn(prefix, H, D, Dh):
    return {f"{prefix}.attn.W_Q": (H, D, Dh), f"{prefix}.attn.b_Q": (H, Dh),
            f"{prefix}.attn.W_K": (H, D, Dh), f"{prefix}.attn.b_K": (H, Dh),
            f"{prefix}.attn.W_V": (H, D, Dh), f"{prefix}.attn.b_V": (H, Dh),
            f"{prefix}.attn.W_O": (H, Dh, D), f"{prefix}.attn.b_O": (D,)}


def test_default_param_names_and_shapes():
    want = {"vision.W_E": (21, 128), "vision.class_embedding": (128,), "vision.W_pos": (11, 128),
            **attn("vision.blocks.0", 4, 128, 32),
            "text.W_E": (30, 128), "text.W_pos": (8, 128),
            **attn("text.blocks.0", 4, 128, 32),
            "logit_scale": ()}
    got = param_shapes(ModelConfig())
    assert list(got.items()) == list(want.items())        # names, shapes and the fixed order


def test_layernorm_mlp_param_names_and_shapes():
    cfg = dataclasses.replace(TINY, layernorm=True, mlp=True)
    D, F = 8, 12
    got = param_shapes(cfg)
    want = {"vision.W_E": (5, D), "vision.class_embedding": (D,), "vision.W_pos": (5, D),
            "vision.blocks.0.ln1.w": (D,), "vision.blocks.0.ln1.b": (D,), **attn("vision.blocks.0", 2, D, 4),
            "vision.blocks.0.ln2.w": (D,), "vision.blocks.0.ln2.b": (D,),
            "vision.blocks.0.mlp.W_in": (D, F), "vision.blocks.0.mlp.b_in": (F,),
            "vision.blocks.0.mlp.W_out": (F, D), "vision.blocks.0.mlp.b_out": (D,),
            "vision.ln_final.w": (D,), "vision.ln_final.b": (D,),
            "text.W_E": (7, D), "text.W_pos": (6, D),
            "text.blocks.0.ln1.w": (D,), "text.blocks.0.ln1.b": (D,), **attn("text.blocks.0", 2, D, 4),
            "text.blocks.0.ln2.w": (D,), "text.blocks.0.ln2.b": (D,),
            "text.blocks.0.mlp.W_in": (D, F), "text.blocks.0.mlp.b_in": (F,),
            "text.blocks.0.mlp.W_out": (F, D), "text.blocks.0.mlp.b_out": (D,),
            "text.ln_final.w": (D,), "text.ln_final.b": (D,),
            "logit_scale": ()}
    assert got == want
    # the MLP without LayerNorm has no ln* tensors
    assert not [n for n in param_shapes(dataclasses.replace(TINY, mlp=True)) if ".ln" in n]


def test_proj_dim_and_two_text_layers_shapes():
    got = param_shapes(dataclasses.replace(TINY, proj_dim=3, text_layers=2))
    assert got["vision.W_proj"] == (8, 3) and got["text.W_proj"] == (8, 3)
    assert set(attn("text.blocks.1", 2, 8, 4).items()) <= set(got.items())
    assert not [n for n in got if n.startswith("vision.blocks.1")]
    assert len(got) == 3 + 8 + 2 + 8 + 8 + 2 + 1
    assert "vision.W_proj" not in param_shapes(TINY)


# --------------------------------------------------------------------------------------------
# initialisation

def test_init_is_deterministic_given_the_seed():
    for cfg in (TINY, dataclasses.replace(TINY, layernorm=True, mlp=True, proj_dim=3, init="clip")):
        a, b, c = init_params(cfg, 3), init_params(cfg, 3), init_params(cfg, 4)
        assert list(a) == list(param_shapes(cfg))
        for n, shape in param_shapes(cfg).items():
            assert a[n].shape == shape and a[n].dtype == np.float32 and a[n].flags.c_contiguous
            assert np.array_equal(a[n], b[n])
        assert not np.array_equal(a["vision.blocks.0.attn.W_Q"], c["vision.blocks.0.attn.W_Q"])
        check_params(a, cfg)
    p64 = init_params(f64(TINY), 3)
    assert all(p.dtype == np.float64 for p in p64.values())
    np.testing.assert_allclose(p64["text.W_E"], init_params(TINY, 3)["text.W_E"], rtol=1e-6)


# large enough for the statistics (W_Q has 4 * 128 * 32 = 16384 entries), with H * Dh != D so
# the fan-in of W_O is told apart from that of W_Q
STATS = ModelConfig(d_model=128, n_heads=4, d_head=16, mlp=True, layernorm=True, d_mlp=256, proj_dim=32,
                    text_layers=2)


def _uniform_bound_ok(a, bound):
    # U(-bound, bound): all inside, the extremes reached, std bound / sqrt(3). The sample std of
    # N uniforms has relative error ~0.45 / sqrt(N): allow 4 of those (biases have only 64 entries)
    n = a.size
    assert np.abs(a).max() <= bound * (1 + 1e-6)
    assert np.abs(a).max() > (1 - 6 / n) * bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=max(0.02, 1.8 / math.sqrt(n)))
    assert abs(a.mean()) < 4 * bound / math.sqrt(3 * n)


def test_torch_init_statistics():
    p = init_params(dataclasses.replace(STATS, init="torch"), 0)
    D, HDh, F = 128, 64, 256
    for tower in ("vision", "text"):
        b = f"{tower}.blocks.0"
        for n in ("W_Q", "W_K", "W_V"):
            _uniform_bound_ok(p[f"{b}.attn.{n}"], 1 / math.sqrt(D))
            _uniform_bound_ok(p[f"{b}.attn.b_{n[-1]}"], 1 / math.sqrt(D))
        _uniform_bound_ok(p[f"{b}.attn.W_O"], 1 / math.sqrt(HDh))
        _uniform_bound_ok(p[f"{b}.attn.b_O"], 1 / math.sqrt(HDh))
        _uniform_bound_ok(p[f"{b}.mlp.W_in"], 1 / math.sqrt(D))
        _uniform_bound_ok(p[f"{b}.mlp.W_out"], 1 / math.sqrt(F))
        _uniform_bound_ok(p[f"{tower}.W_proj"], 1 / math.sqrt(D))
        for n in ("W_E", "W_pos"):                            # nn.Embedding: N(0, 1)
            assert p[f"{tower}.{n}"].std() == pytest.approx(1.0, rel=0.1)
            assert abs(p[f"{tower}.{n}"].mean()) < 0.1
        for ln in ("blocks.0.ln1", "blocks.0.ln2", "ln_final"):
            assert (p[f"{tower}.{ln}.w"] == 1).all() and (p[f"{tower}.{ln}.b"] == 0).all()
    assert p["vision.class_embedding"].std() == pytest.approx(1.0, rel=0.2)
    assert float(p["logit_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-7)


def test_clip_init_statistics():
    p = init_params(dataclasses.replace(STATS, init="clip"), 0)
    D = 128

    def std_ok(a, std, rel=0.06):
        assert a.std() == pytest.approx(std, rel=rel) and abs(a.mean()) < 0.1 * std

    for tower, L in (("vision", 1), ("text", 2)):
        b = f"{tower}.blocks.0"
        std_ok(p[f"{tower}.W_E"], 0.02, rel=0.1)
        std_ok(p[f"{tower}.W_pos"], 0.01, rel=0.15)
        for n in ("W_Q", "W_K", "W_V"):
            std_ok(p[f"{b}.attn.{n}"], D ** -0.5)
        std_ok(p[f"{b}.attn.W_O"], D ** -0.5 * (2 * L) ** -0.5)    # depends on the tower's depth
        std_ok(p[f"{b}.mlp.W_in"], (2 * D) ** -0.5)
        std_ok(p[f"{b}.mlp.W_out"], D ** -0.5 * (2 * L) ** -0.5)
        std_ok(p[f"{tower}.W_proj"], D ** -0.5)
        for n in ("b_Q", "b_K", "b_V", "b_O"):
            assert (p[f"{b}.attn.{n}"] == 0).all()
        assert (p[f"{b}.mlp.b_in"] == 0).all() and (p[f"{b}.mlp.b_out"] == 0).all()
    std_ok(p["vision.class_embedding"], D ** -0.5, rel=0.25)      # only 128 entries


# --------------------------------------------------------------------------------------------
# features

@pytest.mark.parametrize("opts", [{}, {"proj_dim": 3}, {"layernorm": True, "mlp": True, "text_layers": 2}])
def test_features_are_unit_norm(opts):
    cfg = dataclasses.replace(TINY, **opts)
    p = init_params(cfg, 0)
    images, tokens, eot = batch(cfg, 6)
    E = opts.get("proj_dim") or cfg.d_model
    img, txt = encode_images(p, images, cfg), encode_texts(p, tokens, eot, cfg)
    assert img.shape == (6, E) and txt.shape == (6, E) and img.dtype == txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(img[0], img[1])                   # different inputs, different features


def test_text_feature_depends_only_on_tokens_up_to_eot():
    # causal attention + EOT pooling: tokens after eot[b] cannot change the feature
    p = init_params(f64(TINY), 0)
    _, tokens, _ = batch(TINY, 4)
    eot = np.array([2, 2, 2, 2])
    changed = tokens.copy()
    changed[:, 3:] = (changed[:, 3:] + 1) % TINY.text_vocab
    np.testing.assert_array_equal(encode_texts(p, tokens, eot, f64(TINY)),
                                  encode_texts(p, changed, eot, f64(TINY)))
    changed[:, 2] = (changed[:, 2] + 1) % TINY.text_vocab
    assert not np.allclose(encode_texts(p, tokens, eot, f64(TINY)), encode_texts(p, changed, eot, f64(TINY)))


# --------------------------------------------------------------------------------------------
# gradients against finite differences (float64)

GRAD_CONFIGS = {
    "paper": TINY,
    "proj+2 text layers+sqrt_d": dataclasses.replace(TINY, proj_dim=3, text_layers=2, embed_scale="sqrt_d"),
    "ln+mlp+proj": dataclasses.replace(TINY, layernorm=True, mlp=True, proj_dim=3, d_mlp=6),
}


def directional_errors(cfg, B=4, seed=0, n_dirs=2, h=3e-4, floor=1e-4, step="reference"):
    """Independent of gradcheck.py: for every parameter tensor, the analytic directional
    derivative a = <g, u> along random unit directions u against the fourth-order central
    difference n = [8 (f(h) - f(-h)) - (f(2h) - f(-2h))] / 12h of the loss along u.
    (The plain central difference is too coarse for 1e-6: measured up to 9e-7 at h = 1e-5,
    and at h = 1e-6 its round-off, ~1e-16 / h = 1e-10, is already 1e-6 of the floor.)
    The floor 1e-4 covers b_K, whose gradient is exactly zero: there |n| is round-off (~1e-12).
    -> {name: max relative error |a - n| / max(|a|, |n|, floor)}, for the gradients of `step`."""
    cfg = f64(cfg)
    params = noisy_params(cfg, seed)
    images, tokens, eot = batch(cfg, B, seed)
    _, grads = choose(step).loss_and_grads(params, images, tokens, eot, cfg)
    assert list(grads) == list(params)
    rng = np.random.default_rng(seed)
    errs = {}
    for name, x in params.items():
        assert grads[name].shape == x.shape and grads[name].dtype == np.float64
        e = 0.0
        for _ in range(n_dirs):
            u = rng.standard_normal(x.shape)
            u /= np.linalg.norm(u)
            f = {t: loss_only({**params, name: x + t * h * u}, images, tokens, eot, cfg) for t in (-2, -1, 1, 2)}
            n = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
            a = float(np.sum(grads[name] * u))
            e = max(e, abs(a - n) / max(abs(a), abs(n), floor))
        errs[name] = e
    return errs


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradients_match_finite_differences(name, step):
    cfg = GRAD_CONFIGS[name]
    errs = directional_errors(cfg, step=step)
    assert set(errs) == set(param_shapes(cfg))               # every tensor of both towers
    bad = {n: e for n, e in errs.items() if not e <= 1e-6}
    assert not bad, bad


@pytest.mark.parametrize("step", STEPS)
def test_gradcheck_check_model_passes_every_tensor(step):
    from minispatial import gradcheck

    for name in ("paper", "ln+mlp+proj"):
        cfg = GRAD_CONFIGS[name]
        results = gradcheck.check_model(cfg, seed=1, B=3, step=step)
        assert {r.tensor for r in results} == set(param_shapes(cfg))
        assert {r.step for r in results} == {step}
        failed = [(r.tensor, r.err) for r in results if not r.passed]
        assert not failed, (name, failed)


@pytest.mark.parametrize("step", STEPS)
def test_key_bias_gradient_is_exactly_zero(step):
    # b_K adds the same number to every score of a query row, which the softmax cancels
    cfg = f64(dataclasses.replace(TINY, text_layers=2))
    params = noisy_params(cfg)
    _, grads = choose(step).loss_and_grads(params, *batch(cfg, 5), cfg)
    for n in ("vision.blocks.0.attn.b_K", "text.blocks.0.attn.b_K", "text.blocks.1.attn.b_K"):
        assert np.abs(grads[n]).max() < 1e-14, n
    assert np.abs(grads["text.blocks.0.attn.b_Q"]).max() > 1e-6       # the query bias is not


@pytest.mark.parametrize("step", STEPS)
def test_loss_and_grads_agrees_with_loss_only(step):
    cfg = f64(TINY)
    params = noisy_params(cfg)
    b = batch(cfg, 5)
    assert choose(step).loss_and_grads(params, *b, cfg)[0] == pytest.approx(loss_only(params, *b, cfg), rel=1e-13)



# --------------------------------------------------------------------------------------------
# hooks

def test_run_with_cache_records_scores_and_patterns():
    cfg = f64(dataclasses.replace(TINY, text_layers=2))
    params = noisy_params(cfg)
    images, tokens, eot = batch(cfg, 3)
    img, txt, rec = run_with_cache(params, images, tokens, eot, cfg)
    # recording changes nothing: the same NumPy forward as encode_*, bit for bit
    np.testing.assert_array_equal(img, encode_images(params, images, cfg))
    np.testing.assert_array_equal(txt, encode_texts(params, tokens, eot, cfg))
    B, H, Dh = 3, cfg.n_heads, cfg.d_head
    for tower, T, layers in (("vision", cfg.vision_ctx, 1), ("text", cfg.text_ctx, 2)):
        for l in range(layers):
            pre = f"{tower}.blocks.{l}.attn."
            scores, pattern = rec[pre + "hook_attn_scores"], rec[pre + "hook_pattern"]
            assert scores.shape == pattern.shape == (B, H, T, T)
            assert rec[pre + "hook_q"].shape == (B, T, H, Dh)
            np.testing.assert_allclose(pattern.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
            # scores = q . k / sqrt(Dh), in TransformerLens' [batch, head, query_pos, key_pos],
            # recorded after the causal mask (as TransformerLens does): -inf on masked keys
            want = np.einsum("bqhd,bkhd->bhqk", rec[pre + "hook_q"], rec[pre + "hook_k"]) / math.sqrt(Dh)
            upper = np.triu(np.ones((T, T), dtype=bool), k=1)
            masked = upper if tower == "text" else np.zeros_like(upper)
            assert (scores[..., masked] == -np.inf).all()
            np.testing.assert_allclose(scores[..., ~masked], want[..., ~masked], rtol=1e-12, atol=1e-12)
            if tower == "text":                            # causal: nothing above the diagonal
                assert (pattern[..., upper] == 0).all()
                np.testing.assert_allclose(pattern[:, :, 0, 0], 1.0)
            else:                                          # bidirectional: every key gets weight
                assert (pattern > 0).all()
    assert rec["vision.hook_embed"].shape == (B, cfg.vision_ctx, cfg.d_model)
    # hook_pos_embed is [B, T, D] (W_pos[:T] broadcast over the batch), as in TransformerLens
    for tower, T in (("vision", cfg.vision_ctx), ("text", cfg.text_ctx)):
        pos = rec[f"{tower}.hook_pos_embed"]
        assert pos.shape == (B, T, cfg.d_model)
        np.testing.assert_array_equal(pos, np.broadcast_to(params[f"{tower}.W_pos"][:T], pos.shape))
    assert rec["text.hook_pooled"].shape == (B, cfg.d_model)
    np.testing.assert_array_equal(rec["text.hook_pooled"],
                                  rec["text.blocks.1.hook_resid_post"][np.arange(B), eot])


def test_hooks_can_edit_the_forward_pass():
    cfg = f64(TINY)
    params = noisy_params(cfg)
    images, tokens, eot = batch(cfg, 3)
    # zeroing the attention output leaves the residual stream = embeddings: feature = l2norm(x[eot])
    hooks = {"text.blocks.0.hook_attn_out": lambda a: np.zeros_like(a)}
    _, txt, rec = run_with_cache(params, images, tokens, eot, cfg, hooks=hooks)
    x = params["text.W_E"][tokens] + params["text.W_pos"][: tokens.shape[1]]
    pooled = x[np.arange(3), eot]
    np.testing.assert_allclose(txt, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), rtol=1e-12)
    with pytest.raises(ValueError, match="hook_attn_out"):
        run_with_cache(params, images, tokens, eot, cfg, hooks={"text.blocks.0.hook_attn_out": lambda a: a[:1]})
    # an edited position embedding is the one the tower adds: zeroing it is a model without W_pos
    no_pos = {**params, "text.W_pos": np.zeros_like(params["text.W_pos"])}
    _, txt, _ = run_with_cache(params, images, tokens, eot, cfg, hooks={"text.hook_pos_embed": np.zeros_like})
    np.testing.assert_allclose(txt, encode_texts(no_pos, tokens, eot, cfg), rtol=1e-13, atol=1e-15)
    assert not np.allclose(txt, encode_texts(params, tokens, eot, cfg))


# --------------------------------------------------------------------------------------------
# validation

def _bad_inputs(cfg):
    images, tokens, eot = batch(cfg, 3)
    return {
        "image length": ((images[:, :-1], tokens, eot), "images have length"),
        "tokens too long": ((images, np.zeros((3, cfg.text_ctx + 1), dtype=np.int64), eot), "tokens have length"),
        "eot out of range": ((images, tokens, np.array([0, 1, cfg.text_ctx])), "eot"),
        "negative eot": ((images, tokens, np.array([0, -1, 0])), "eot"),
        "eot batch size": ((images, tokens, np.array([0, 1])), "eot"),
        "pixel out of vocab": ((np.full_like(images, cfg.vision_vocab), tokens, eot), "outside the vocabulary"),
        "token out of vocab": ((images, np.full_like(tokens, cfg.text_vocab), eot), "outside the vocabulary"),
        "float images": ((images.astype(np.float64), tokens, eot), "integer"),
        "1-d images": ((images[0], tokens, eot), "images"),
        "batch sizes differ": ((images[:2], tokens, eot), "batch size"),
    }


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("case", list(_bad_inputs(TINY)))
def test_bad_inputs_raise_value_error(step, case):
    params = init_params(TINY, 0)
    (images, tokens, eot), match = _bad_inputs(TINY)[case]
    impl = choose(step)
    enc_images, enc_texts = impl.encoders
    with pytest.raises(ValueError, match=match):
        impl.loss_and_grads(params, images, tokens, eot, TINY)
    if case != "batch sizes differ":               # each tower alone checks its own input
        with pytest.raises(ValueError, match=match):
            enc_images(params, images, TINY)
            enc_texts(params, tokens, eot, TINY)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("name, shape", [
    ("vision.blocks.0.attn.W_Q", (2, 8, 3)),
    ("text.W_E", (6, 8)),                 # one row short: numba would read/write out of bounds
    ("text.blocks.0.attn.b_O", (7,)),
    ("vision.W_pos", (4, 8)),
    ("logit_scale", (1,)),
])
def test_params_with_a_wrong_shape_raise_value_error(step, name, shape):
    params = init_params(TINY, 0)
    params[name] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError, match=name):
        check_params(params, TINY)
    with pytest.raises(ValueError, match=name):
        choose(step).loss_and_grads(params, *batch(TINY, 3), TINY)


def test_check_params_missing_extra_and_dtype():
    params = init_params(TINY, 0)
    check_params(params, TINY)
    with pytest.raises(ValueError, match="text.W_pos"):
        check_params({n: p for n, p in params.items() if n != "text.W_pos"}, TINY)
    with pytest.raises(ValueError, match="vision.W_proj"):
        check_params({**params, "vision.W_proj": np.zeros((8, 3), np.float32)}, TINY)
    with pytest.raises(ValueError, match="float32"):
        check_params({**params, "text.W_E": params["text.W_E"].astype(np.float64)}, TINY)


def test_model_config_validation_names_the_field():
    for field, value in (("d_model", 0), ("n_heads", 1.5), ("layernorm", 1), ("init", "xavier"),
                         ("dtype", "float16"), ("embed_scale", "sqrt"), ("logit_scale_init", 5.0),
                         ("proj_dim", -1)):
        with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
            ModelConfig(**{field: value})


# --------------------------------------------------------------------------------------------
# the two steps

@pytest.mark.parametrize("opts", [{}, {"layernorm": True, "mlp": True, "proj_dim": 16}])
def test_reference_and_fast_steps_agree(opts):
    cfg = f64(dataclasses.replace(ModelConfig(), **opts))     # the paper's shapes (D 128, 4 x 32)
    params = noisy_params(cfg, seed=2, std=0.02)
    b = batch(cfg, 6, seed=2)
    ref, fast = choose("reference"), choose("fast")
    loss_ref, g_ref = ref.loss_and_grads(params, *b, cfg)
    loss_fast, g_fast = fast.loss_and_grads(params, *b, cfg)
    assert loss_fast == pytest.approx(loss_ref, rel=1e-10)
    assert list(g_ref) == list(g_fast) == list(params)
    # an absolute floor of 1e-10 x the largest gradient entry: b_K's gradient is exactly zero in
    # theory, so both steps return rounding noise (~1e-18) there
    gmax = max(float(np.abs(g).max()) for g in g_ref.values())
    for n in params:
        np.testing.assert_allclose(g_fast[n], g_ref[n], rtol=1e-10, atol=1e-10 * gmax, err_msg=n)
    # and their encoders (evaluation) give the same features
    images, tokens, eot = b
    for enc_ref, enc_fast, args in zip(ref.encoders, fast.encoders, ((images,), (tokens, eot))):
        np.testing.assert_allclose(enc_fast(params, *args, cfg), enc_ref(params, *args, cfg),
                                   rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# init="scaled": stds between the clip and torch schemes

# sha256 over (name, bytes) of init_params(default config, seed 0), recorded before "scaled" existed
INIT_DIGESTS = {"clip": "cb77c20d4162ba46cda8b5af9583a82bcffc5872712efc3c608f1ce990e52abc",
                "torch": "951a20ea39f0c1179197427ae78a94cf16dea7ca0956bf9b1906f5ae52f3a0ee"}


def _digest(params):
    import hashlib
    h = hashlib.sha256()
    for k, v in params.items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def _paper_model(**kw):
    from minispatial.config import make_config
    return dataclasses.replace(make_config().model, **kw)


@pytest.mark.parametrize("init", ["clip", "torch"])
def test_clip_and_torch_inits_unchanged(init):
    assert _digest(init_params(_paper_model(init=init), 0)) == INIT_DIGESTS[init]


def test_scaled_init_at_zero_is_bit_identical_to_clip():
    assert _digest(init_params(_paper_model(init="scaled", init_scale=0.0), 0)) == INIT_DIGESTS["clip"]


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("extras", [{}, {"mlp": True, "layernorm": True, "proj_dim": 64}])
def test_scaled_init_stds_follow_the_formula(a, extras):
    from minispatial.model import init_std
    cfg = _paper_model(init="scaled", init_scale=a, dtype="float64", **extras)
    D, HD = cfg.d_model, cfg.n_heads * cfg.d_head
    params = init_params(cfg, 1)
    checked = 0
    for name, arr in params.items():
        leaf = name.rsplit(".", 1)[-1]
        std = init_std(cfg, name)
        if std is None:                                    # LayerNorm, logit_scale: as today
            assert name == "logit_scale" or np.all(arr == (1.0 if leaf == "w" else 0.0))
            continue
        # the formula, written out per kind of tensor
        if leaf in ("W_E", "W_pos", "class_embedding"):
            clip = {"W_E": 0.02, "W_pos": 0.01, "class_embedding": D ** -0.5}[leaf]
            want = clip ** (1 - a)
        else:
            fan_in = HD if leaf in ("W_O", "b_O") else cfg.d_mlp if leaf in ("W_out", "b_out") else D
            torch_std = fan_in ** -0.5 / math.sqrt(3)
            L = cfg.layers(name.split(".")[0])
            clip = {"W_Q": D ** -0.5, "W_K": D ** -0.5, "W_V": D ** -0.5, "W_proj": D ** -0.5,
                    "W_O": (D * 2 * L) ** -0.5, "W_out": (D * 2 * L) ** -0.5, "W_in": (2 * D) ** -0.5}.get(leaf)
            want = a * torch_std if clip is None else clip ** (1 - a) * torch_std ** a
        assert std == pytest.approx(want, rel=1e-12), name
        if want == 0.0:
            assert np.all(arr == 0.0), name
            continue
        n = arr.size                                       # sample std within 5 standard errors
        assert abs(arr.std() / want - 1) < 5 / math.sqrt(2 * n), (name, arr.std(), want)
        assert abs(arr.mean()) < 5 * want / math.sqrt(n), name
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, "0.5", True, None])
def test_init_scale_is_validated(bad):
    with pytest.raises(ValueError, match=r"ModelConfig\.init_scale=.* finite number in \[0, 1\]"):
        _paper_model(init="scaled", init_scale=bad)


def test_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match=r"ModelConfig\.init='xavier'.*scaled"):
        _paper_model(init="xavier")
