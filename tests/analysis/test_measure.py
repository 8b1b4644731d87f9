"""analysis/measure.py: a gradient planted by hand is found with its sign and slope and makes a
relational head; a planted first-position bias shows in the text EOT attention; Procrustes
recovers a rotation; `analyze` evaluates the baseline with the encoders it is given."""

import math

import numpy as np
import pytest

from minispatial.analysis import measure as ms
from minispatial.analysis.ablate import Ablation, encode_ablated
from minispatial.analysis.decompose import decompose
from minispatial.evaluate import evaluate_all
from minispatial.model import encode_images, encode_texts


def plant_ep_gradient(params, cfg, alpha, head=0, seed=1):
    """Rewrite W_pos so that CLS W_Q W_Kᵀ P_k / sqrt(Dh) = alpha * k in `head` (other terms stay
    random): the component of each P_k along g = W_K (cls W_Q)ᵀ is set, the rest kept."""
    cls = params["vision.class_embedding"]
    Wq, Wk = params["vision.blocks.0.attn.W_Q"][head], params["vision.blocks.0.attn.W_K"][head]
    g = Wk @ (cls @ Wq)                                        # [D]: cls W_QK p = p . g
    P = np.random.default_rng(seed).standard_normal(params["vision.W_pos"].shape)
    P -= np.outer(P @ g, g) / (g @ g)
    k = np.arange(P.shape[0])
    P += np.outer(alpha * math.sqrt(cfg.d_head) * k, g / (g @ g))
    params["vision.W_pos"] = P
    return params


@pytest.mark.parametrize("alpha", [0.7, -0.4])
def test_planted_ep_gradient_is_recovered(alpha, an_model):
    run, params, tb = an_model()
    cfg, L = run.model, run.data.image_len
    plant_ep_gradient(params, cfg, alpha)
    terms, _, _, _ = decompose(params, cfg, "vision", 0, tb.splits["val_single"].images)
    assert np.allclose(terms["EP"][:, 0, 0, 1:], alpha * np.arange(1, L + 1), atol=1e-12)
    res = ms.analyze_vision(params, cfg, tb, n_images=64)[0]
    ep = res["heads"][0]["terms"]["EP"]
    assert ep["slope"] == pytest.approx(alpha, abs=1e-10)
    assert ep["right_left"] == pytest.approx(alpha * (L - 1), abs=1e-10)
    assert np.allclose(ep["curve"], ep["curve_batch"])       # EP on the CLS row ignores labels
    for t in ("EE", "PE", "BE"):                             # label terms: flat once label-averaged
        assert res["heads"][0]["terms"][t]["slope"] == pytest.approx(0.0, abs=1e-10)
    shares = [res["heads"][0]["terms"][t]["var_share"] for t in res["terms"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-10)
    # removing EP takes exactly that term out of the CLS row
    record = {}
    encode_ablated(params, cfg, "vision", tb.splits["val_single"].images, None,
                   Ablation(("EP",), heads=(0,)), record)
    s = record["vision.blocks.0.attn.hook_attn_scores"]
    assert np.allclose(s[:, 0], (sum(terms.values()) - terms["EP"])[:, 0], atol=1e-12)
    assert np.allclose(s[:, 1], sum(terms.values())[:, 1], atol=1e-12)   # head 1 untouched


def test_planted_gradient_makes_a_relational_head(an_model):
    run, params, tb = an_model()
    plant_ep_gradient(params, run.model, 3.0)
    heads = ms.analyze_vision(params, run.model, tb, n_images=16)[0]["heads"]
    assert heads[0]["class"] == "relational" and heads[0]["pos_frac"] > 0.9


def test_text_eot_attention_follows_a_planted_first_position_bias(an_model):
    run, params, tb = an_model()
    cfg = run.model
    d = np.zeros(cfg.d_model)
    d[0] = 1.0
    params["text.W_pos"][0] += 10.0 * d                       # position 0 = first label
    Wk = params["text.blocks.0.attn.W_K"][1]
    params["text.blocks.0.attn.b_Q"][1] = 5.0 * (d @ Wk) / ((d @ Wk) @ (d @ Wk))   # BP: 50/sqrt(Dh) at key 0
    res = ms.analyze_text(params, cfg, tb)[0]
    assert res["sum_max_abs_err"] < 1e-10
    h1 = res["eot_attention"]["left"][1]
    assert h1["att_first"] > 0.99 and h1["first_wins"] == 1.0 and h1["att_second"] < 0.01
    assert h1["heldout_att_first"] > 0.99
    assert res["heads"][1]["class"] == "relational"
    shares = {t: v["var_share"] for t, v in res["heads"][1]["terms"].items()}
    assert max(shares, key=shares.get) == "BP" and shares["BP"] > 0.5


def test_procrustes_recovers_a_rotation_on_held_out_labels():
    rng = np.random.default_rng(0)
    U = rng.standard_normal((8, 4))                           # 8 labels in 4 dims: seen labels span it
    R, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    s = ms.alignment_scores(U, U @ R, seen=[1, 2, 3, 4, 5], heldout=[6, 7, 8])
    assert s["fit_cos"] == pytest.approx(1.0) and s["heldout_cos"] == pytest.approx(1.0)
    assert s["heldout_top1"] == 1.0 and s["heldout_cos_identity"] < 0.9


def test_analyze_uses_the_given_encoders_for_the_baseline_and_the_features(an_model):
    run, params, tb = an_model()
    calls = {"vision": 0, "text": 0}

    def img(p, ims, c):
        calls["vision"] += 1
        return encode_images(p, ims, c)

    def txt(p, tokens, eot, c):
        calls["text"] += 1
        return encode_texts(p, tokens, eot, c)

    res = ms.analyze(params, run, ablations=["EP"], n_images=16, testbed=tb, encoders=(img, txt))
    assert calls["vision"] > 1 and calls["text"] > 1
    assert res == ms.analyze(params, run, ablations=["EP"], n_images=16, testbed=tb)   # the same sums
    base = evaluate_all(params, tb, run.model)
    assert res["ablations"][0]["metrics"] == {k: None if math.isnan(v) else v for k, v in base.items()}
