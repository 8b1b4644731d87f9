"""Shared setup of the analysis tests: small untrained float64 models (the invariants do not need
training) on a small testbed, so each evaluation takes well under a second. Fixtures are prefixed
an_ (tests/conftest.py); each returns a helper function."""

import math

import numpy as np
import pytest

from minispatial.analysis.ablate import encode_ablated
from minispatial.config import make_config
from minispatial.data import make_testbed
from minispatial.model import init_params

SMALL = dict(image_len=6, n_labels=8, n_heldout=3, n_pair=5, n_layout=5, n_single_layout=3,
             n_eval_layout=4, d_model=16, n_heads=2, d_head=8, dtype="float64")
ARCHS = {
    "1-layer": {},
    "2-layer": {"vision_layers": 2, "text_layers": 2},
    "layernorm": {"vision_layers": 2, "text_layers": 2, "layernorm": True},
    "ln+mlp+proj+sqrt_d": {"vision_layers": 2, "layernorm": True, "mlp": True, "d_mlp": 8,
                           "proj_dim": 6, "embed_scale": "sqrt_d"},
}


def small_model(seed=0, arch="1-layer", **kw):
    # -> (run config, params, testbed): an untrained float64 model of ARCHS[arch] (+ overrides);
    # LayerNorm w/b randomised. init "torch" (N(0, 1) embeddings) makes every term of the
    # decomposition sizeable.
    run = make_config({"init": "torch", **SMALL, **ARCHS[arch], **kw}, preset="tiny")
    params = init_params(run.model, seed)
    rng = np.random.default_rng(seed + 100)
    for n in params:
        if ".ln" in n:
            params[n] = params[n] + 0.3 * rng.standard_normal(params[n].shape)
    return run, params, make_testbed(run.data)


def same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def cls_pattern(params, cfg, images, ablation, layer=0):
    # -> (CLS-row attention pattern [B, H, T], image features [B, E]) under an ablation
    record = {}
    feats = encode_ablated(params, cfg, "vision", images, None, ablation, record)
    return record[f"vision.blocks.{layer}.attn.hook_pattern"][:, :, 0, :], feats


@pytest.fixture
def an_model():
    """small_model(seed=0, arch="1-layer", **config overrides) -> (run config, params, testbed);
    arch: one of "1-layer", "2-layer", "layernorm", "ln+mlp+proj+sqrt_d"."""
    return small_model


@pytest.fixture
def an_same_metrics():
    """same_metrics(a, b): two metric dicts equal, NaN equal to NaN."""
    return same_metrics


@pytest.fixture
def an_cls_pattern():
    """cls_pattern(params, cfg, images, ablation, layer=0) -> (CLS-row pattern, features)."""
    return cls_pattern
