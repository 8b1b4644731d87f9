"""analysis/decompose.py: the score decomposition is exact (every architecture, both towers),
`const` does not move attention, and the causal mask is left out of the sum check."""

import dataclasses

import numpy as np
import pytest

from minispatial.analysis import decompose as dc
from minispatial.analysis.ablate import Ablation


@pytest.mark.parametrize("arch", ["1-layer", "2-layer", "layernorm", "ln+mlp+proj+sqrt_d"])
def test_terms_sum_to_the_models_scores(arch, an_model):
    run, params, tb = an_model(arch=arch)
    cfg = run.model
    images = tb.splits["val_seen_pair"].images[:20]
    split = tb.splits["train"]
    for tower, ids, eot in (("vision", images, None), ("text", split.tokens[-20:], split.eot[-20:])):
        for layer in range(cfg.layers(tower)):
            terms, scores, _, _ = dc.decompose(params, cfg, tower, layer, ids, eot)
            want = dc.term_names(("E", "P") if layer == 0 else ("E", "P", "R"))
            assert list(terms) == want
            used = np.isfinite(scores)                       # the text tower's causal mask: -inf
            err = np.abs(sum(terms.values()) - scores)[used].max()
            assert err < 1e-10, (tower, layer, err)
            assert dc.sum_error(terms, scores) == err
            if layer > 0:   # R carries what earlier blocks wrote: not negligible
                assert np.abs(terms["RR"]).max() > 1e-3


def test_causal_scores_are_masked_and_the_terms_are_not(an_model):
    run, params, tb = an_model()
    split = tb.splits["train"]
    terms, scores, pattern, _ = dc.decompose(params, run.model, "text", 0, split.tokens[:10], split.eot[:10])
    T = scores.shape[-1]
    future = ~np.tril(np.ones((T, T), dtype=bool))
    assert np.all(scores[..., future] == -np.inf) and np.all(np.isfinite(scores[..., ~future]))
    assert np.all(pattern[..., future] == 0.0)
    assert all(np.all(np.isfinite(a)) for a in terms.values())
    assert np.isfinite(dc.sum_error(terms, scores))


def test_decompose_rejects_a_missing_layer(an_model):
    run, params, tb = an_model()
    with pytest.raises(ValueError, match="layer=1 is invalid"):
        dc.decompose(params, run.model, "vision", 1, tb.splits["val_single"].images)


def test_const_term_is_row_constant_and_does_not_move_attention(an_model, an_cls_pattern):
    run, params, tb = an_model(vision_layers=2)
    images = tb.splits["val_seen_pair"].images[:10]
    for layer in (0, 1):
        terms, _, _, _ = dc.decompose(params, run.model, "vision", layer, images)
        c = terms["const"]
        assert np.allclose(c, c[..., :1])
        before, _ = an_cls_pattern(params, run.model, images, Ablation(), layer)
        after, _ = an_cls_pattern(params, run.model, images, Ablation(("const",)), layer)
        assert np.allclose(before, after, atol=1e-12)


def test_float64_model_copies_a_float32_model_only(an_model):
    run, params, _ = an_model()
    assert dc.float64_model(params, run.model)[0] is params
    cfg32 = dataclasses.replace(run.model, dtype="float32")
    p32 = {n: p.astype(np.float32) for n, p in params.items()}
    p64, c64 = dc.float64_model(p32, cfg32)
    assert c64.dtype == "float64" and all(p64[n].dtype == np.float64 for n in p64)
    assert all(np.array_equal(p64[n], p32[n]) for n in p32)
