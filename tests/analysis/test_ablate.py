"""analysis/ablate.py: ablations remove exactly the named terms, are what evaluate_all runs, leave
the un-ablated evaluation untouched, and without position terms the vision tower is mirror blind."""

import numpy as np
import pytest

from minispatial.analysis import ablate as ab
from minispatial.analysis.decompose import decompose
from minispatial.evaluate import evaluate_all
from minispatial.model import encode_images, encode_texts


@pytest.mark.parametrize("arch", ["2-layer", "layernorm", "ln+mlp+proj+sqrt_d"])
def test_ablation_subtracts_exactly_the_named_terms(arch, an_model):
    run, params, tb = an_model(arch=arch)
    cfg = run.model
    images = tb.splits["val_seen_pair"].images[:16]
    terms, scores, _, _ = decompose(params, cfg, "vision", 1, images)
    record = {}
    ab.encode_ablated(params, cfg, "vision", images, None,
                      ab.Ablation(("EP", "RR", "BR"), heads=(1,), layers=(1,)), record)
    got = record["vision.blocks.1.attn.hook_attn_scores"]
    assert np.allclose(got[:, 0], scores[:, 0], atol=1e-12)
    assert np.allclose(got[:, 1], (scores - terms["EP"] - terms["RR"] - terms["BR"])[:, 1], atol=1e-12)


def test_text_ablation_subtracts_the_terms_and_keeps_the_causal_mask(an_model):
    run, params, tb = an_model(arch="2-layer")
    cfg = run.model
    split = tb.splits["train"]
    tokens, eot = split.tokens[:16], split.eot[:16]
    for layer in (0, 1):
        terms, scores, _, _ = decompose(params, cfg, "text", layer, tokens, eot)
        record = {}
        abl = ab.parse_ablation("BP", towers=("text",), layers=[layer])
        ab.encode_ablated(params, cfg, "text", tokens, eot, abl, record)
        got = record[f"text.blocks.{layer}.attn.hook_attn_scores"]
        used = np.isfinite(scores)
        assert np.array_equal(np.isfinite(got), used)                     # masked keys stay -inf
        assert np.allclose(got[used], (scores - terms["BP"])[used], atol=1e-12)
        assert np.all(record[f"text.blocks.{layer}.attn.hook_pattern"][~used] == 0.0)


def test_ablated_encoders_are_what_evaluate_all_runs(an_model, an_same_metrics):
    run, params, tb = an_model()
    cfg = run.model
    abl = ab.parse_ablation("EP,VP", towers=("vision", "text"))
    enc_img, enc_txt = ab.ablated_encoders(abl)
    images, split = tb.splits["val_seen_pair"].images, tb.splits["train"]
    # each encoder is the hooked forward of its tower
    assert np.array_equal(enc_img(params, images, cfg),
                          ab.encode_ablated(params, cfg, "vision", images, None, abl))
    assert np.array_equal(enc_txt(params, split.tokens, split.eot, cfg),
                          ab.encode_ablated(params, cfg, "text", split.tokens, split.eot, abl))
    assert not np.allclose(enc_img(params, images, cfg), encode_images(params, images, cfg))
    # evaluate_ablation is evaluate_all with those encoders, and calls both of them
    calls = {"vision": 0, "text": 0}

    def img(p, ims, c):
        calls["vision"] += 1
        return enc_img(p, ims, c)

    def txt(p, tokens, eot, c):
        calls["text"] += 1
        return enc_txt(p, tokens, eot, c)

    got = evaluate_all(params, tb, cfg, encoders=(img, txt))
    assert calls["vision"] > 0 and calls["text"] > 0
    assert an_same_metrics(got, ab.evaluate_ablation(params, tb, cfg, abl))
    assert not an_same_metrics(got, evaluate_all(params, tb, cfg))


def test_removing_an_identically_zero_term_changes_nothing(an_model, an_same_metrics, an_cls_pattern):
    run, params, tb = an_model(vision_layers=2)
    cfg = run.model
    for n in params:
        if n.endswith("attn.b_Q"):
            params[n] = np.zeros_like(params[n])
    images = tb.splits["val_unseen_pair"].images
    abl = ab.Ablation(("BP", "BE"), towers=("vision", "text"))
    for layer in (0, 1):
        before, f0 = an_cls_pattern(params, cfg, images, ab.Ablation(), layer)
        after, f1 = an_cls_pattern(params, cfg, images, abl, layer)
        assert np.array_equal(before, after) and np.array_equal(f0, f1)
    # the hooked forward is the reference forward: equal to evaluate_all's default encoders
    assert an_same_metrics(ab.evaluate_ablation(params, tb, cfg, abl), evaluate_all(params, tb, cfg))


def test_empty_ablation_reproduces_the_baseline_exactly(an_model, an_same_metrics):
    run, params, tb = an_model()
    base = evaluate_all(params, tb, run.model)
    assert an_same_metrics(ab.evaluate_ablation(params, tb, run.model, ab.Ablation()), base)
    assert an_same_metrics(ab.evaluate_ablation(params, tb, run.model, ab.parse_ablation("none")), base)
    # and a real ablation does change the metrics, and leaves the plain evaluation untouched
    ep = ab.evaluate_ablation(params, tb, run.model, ab.parse_ablation("EP,VP", towers=("vision", "text")))
    assert not an_same_metrics(ep, base)
    assert an_same_metrics(evaluate_all(params, tb, run.model), base)


def test_empty_ablation_evaluates_with_the_given_encoders(an_model, an_same_metrics):
    run, params, tb = an_model()
    calls = []

    def img(p, ims, c):
        calls.append("vision")
        return encode_images(p, ims, c)

    encoders = (img, encode_texts)
    got = ab.evaluate_ablation(params, tb, run.model, ab.Ablation(), encoders)
    assert calls and an_same_metrics(got, evaluate_all(params, tb, run.model))
    calls.clear()
    ab.evaluate_ablation(params, tb, run.model, ab.parse_ablation("EP"), encoders)
    assert not calls                                  # an ablation runs its own (hooked) encoders


@pytest.mark.parametrize("layers", [1, 2])
def test_without_position_terms_vision_is_mirror_symmetric(layers, an_model, an_cls_pattern):
    run, params, tb = an_model(vision_layers=layers)
    cfg = run.model
    images = tb.splits["val_seen_pair"].images
    mirrored = images[:, ::-1].copy()
    no_pos = ab.parse_ablation("POS,VP")
    assert set(no_pos.terms) == {"EP", "PE", "PP", "BP", "PR", "RP"} and no_pos.value_pos
    for layer in range(layers):
        p, f = an_cls_pattern(params, cfg, images, no_pos, layer)
        pm, fm = an_cls_pattern(params, cfg, mirrored, no_pos, layer)
        assert np.allclose(p[:, :, 0], pm[:, :, 0], atol=1e-12)            # CLS -> CLS
        assert np.allclose(p[:, :, 1:], pm[:, :, :0:-1], atol=1e-12)        # pixels, reversed
    assert np.allclose(f, fm, atol=1e-12)     # mirrored images get the same feature
    # controls: the intact model, and the scores without VP, still see the layout
    _, f0 = an_cls_pattern(params, cfg, images, ab.Ablation(), 0)
    _, fm0 = an_cls_pattern(params, cfg, mirrored, ab.Ablation(), 0)
    assert not np.allclose(f0, fm0, atol=1e-6)
    _, f1 = an_cls_pattern(params, cfg, images, ab.parse_ablation("POS"), 0)
    _, fm1 = an_cls_pattern(params, cfg, mirrored, ab.parse_ablation("POS"), 0)
    assert not np.allclose(f1, fm1, atol=1e-6)


def test_value_position_ablation_is_v_from_x_minus_p(an_model):
    run, params, tb = an_model()
    cfg = run.model
    images = tb.splits["val_single"].images
    rec0, rec1 = {}, {}
    ab.encode_ablated(params, cfg, "vision", images, None, ab.Ablation(), rec0)
    ab.encode_ablated(params, cfg, "vision", images, None, ab.Ablation(value_pos=True, heads=(1,)), rec1)
    x = rec0["vision.hook_embed"]                                           # E only
    W_V, b_V = params["vision.blocks.0.attn.W_V"], params["vision.blocks.0.attn.b_V"]
    want = np.einsum("btd,hde->bthe", x, W_V) + b_V
    v0, v1 = rec0["vision.blocks.0.attn.hook_v"], rec1["vision.blocks.0.attn.hook_v"]
    assert np.allclose(v1[:, :, 1], want[:, :, 1], atol=1e-12)
    assert np.array_equal(v1[:, :, 0], v0[:, :, 0])


def test_parse_ablation_and_errors(an_model):
    a = ab.parse_ablation("-EP-VP")
    assert a.terms == ("EP",) and a.value_pos and a.name == "-EP-VP"
    assert ab.parse_ablation("ep+pp").terms == ("EP", "PP")
    assert ab.parse_ablation("").empty and ab.parse_ablation("baseline").name == "baseline"
    with pytest.raises(ValueError, match="unknown term 'XY'"):
        ab.parse_ablation("EP,XY")
    with pytest.raises(ValueError, match="towers"):
        ab.Ablation(("EP",), towers=("audio",))
    run, params, tb = an_model()
    with pytest.raises(ValueError, match="head 5 is out of range"):
        ab.evaluate_ablation(params, tb, run.model, ab.parse_ablation("EP", heads=[5]))
