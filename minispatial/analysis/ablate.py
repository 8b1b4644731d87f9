"""Inference-time ablations: score terms removed before the softmax, nothing retrained.

An `Ablation` removes (subtracts) chosen score terms (decompose.py) before the softmax, on every
query row, in the chosen heads, layers and towers, and optionally the value path's position
part ("VP": v = (h - P') W_V + b_V, P' the position part as in the decomposition). It works
through hooks on the reference (NumPy) forward: `hook_attn_scores` (recorded after the causal
mask: masked keys stay -inf) and `hook_v`. Every metric of `evaluate.evaluate_all` is then
recomputed by passing it the ablated encoders (`ablated_encoders`) as its `encoders` argument.
An empty ablation runs evaluate_all with the given encoders (default: the model's own), so it
reproduces that evaluation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minispatial import model
from minispatial.analysis.decompose import (ALL_TERMS, F64, POS_TERMS, TOWERS, attn_weights, layer_parts,
                                            score_terms)
from minispatial.evaluate import evaluate_all

DEFAULT_ABLATIONS = ("", "EP", "PE", "PP", "BP", "EP,VP")


@dataclass(frozen=True)
class Ablation:
    """Score terms removed before softmax, and/or the value path's position part (VP).

    towers: where (any of "vision", "text"); heads / layers: None = all of them."""

    terms: tuple[str, ...] = ()
    value_pos: bool = False
    towers: tuple[str, ...] = ("vision",)
    heads: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        bad = [t for t in self.terms if t not in ALL_TERMS]
        if bad:
            raise ValueError(f"Ablation.terms has {bad}: allowed {list(ALL_TERMS)} (and VP, POS)")
        bad = [t for t in self.towers if t not in TOWERS]
        if bad or not self.towers:
            raise ValueError(f"Ablation.towers={self.towers!r} is invalid: a non-empty subset of {TOWERS}")

    @property
    def empty(self) -> bool:
        return not self.terms and not self.value_pos

    @property
    def name(self) -> str:
        if self.empty:
            return "baseline"
        return "".join("-" + t for t in self.terms) + ("-VP" if self.value_pos else "")

    def check(self, cfg) -> None:
        """ValueError when a head or layer is out of range for the model."""
        for h in self.heads or ():
            if not 0 <= h < cfg.n_heads:
                raise ValueError(f"ablation head {h} is out of range: the model has heads 0..{cfg.n_heads - 1}")
        top = max(cfg.layers(t) for t in self.towers)
        for l in self.layers or ():
            if not 0 <= l < top:
                raise ValueError(f"ablation layer {l} is out of range: layers 0..{top - 1}")


def parse_ablation(text: str, towers=("vision",), heads=None, layers=None) -> Ablation:
    """"EP,VP" / "EP+VP" / "-EP-VP" -> Ablation. "" / "none" / "baseline": nothing removed;
    "POS": every score term with a position part (EP, PE, PP, BP, PR, RP)."""
    lookup = {t.upper(): t for t in ALL_TERMS}
    terms: list[str] = []
    vp = False
    for tok in text.replace("+", ",").replace("-", ",").split(","):
        tok = tok.strip().upper()
        if tok in ("", "NONE", "BASELINE"):
            continue
        if tok == "VP":
            vp = True
        elif tok == "POS":
            terms += [t for t in POS_TERMS if t not in terms]
        elif tok in lookup:
            if lookup[tok] not in terms:
                terms.append(lookup[tok])
        else:
            raise ValueError(f"--ablate {text!r}: unknown term {tok!r}; allowed {list(ALL_TERMS)}, VP, POS, none")
    return Ablation(tuple(terms), vp, tuple(towers), None if heads is None else tuple(heads),
                    None if layers is None else tuple(layers))


def as_ablation(a, towers, heads) -> Ablation:
    """An Ablation as is; a string parsed for `towers` and `heads`."""
    return a if isinstance(a, Ablation) else parse_ablation(a, towers, heads)


def ablation_hooks(params: dict, cfg, tower: str, ablation: Ablation, record: dict) -> dict:
    """Hooks for one forward pass of `tower` that apply `ablation`. They read the residual
    parts from `record`, which must be the record dict passed to that same forward pass."""
    if tower not in ablation.towers or ablation.empty:
        return {}
    heads = list(range(cfg.n_heads)) if ablation.heads is None else list(ablation.heads)
    layers = range(cfg.layers(tower)) if ablation.layers is None else [l for l in ablation.layers
                                                                        if l < cfg.layers(tower)]
    hooks = {}
    for l in layers:
        w = attn_weights(params, tower, l, heads)
        prefix = f"{tower}.blocks.{l}.attn."
        if ablation.terms:
            def remove_terms(scores, l=l, w=w):
                # scores [B, H, Tq, Tk] (masked keys -inf, and they stay so) -> scores minus the
                # removed terms in the chosen heads
                parts, ln_b = layer_parts(params, cfg, tower, l, record)
                terms = score_terms(parts, ln_b, w, ablation.terms)
                out = scores.astype(F64)
                if terms:
                    out[:, heads] -= sum(terms.values())
                return out
            hooks[prefix + "hook_attn_scores"] = remove_terms
        if ablation.value_pos:
            def remove_value_pos(v, l=l, w=w):
                # v [B, T, H, Dh] -> v computed from h - P' in the chosen heads
                parts, _ = layer_parts(params, cfg, tower, l, record)
                out = v.astype(F64)
                out[:, :, heads] -= np.einsum("btd,hde->bthe", parts["P"], w["W_V"])
                return out
            hooks[prefix + "hook_v"] = remove_value_pos
    return hooks


def encode_ablated(params: dict, cfg, tower: str, ids, eot, ablation: Ablation, record=None):
    # ids [B, ...] -> features [B, E] under the ablation (the reference forward when it does not apply)
    record = {} if record is None else record
    hooks = ablation_hooks(params, cfg, tower, ablation, record)
    if tower == "vision":
        return model.encode_images(params, ids, cfg, hooks=hooks, record=record)
    return model.encode_texts(params, ids, eot, cfg, hooks=hooks, record=record)


def ablated_encoders(ablation: Ablation):
    """The pair (encode_images_fn(params, images, cfg), encode_texts_fn(params, tokens, eot, cfg))
    that `evaluate.evaluate_all(..., encoders=)` takes, with `ablation` applied in both towers."""

    def encode_images_fn(params, images, cfg):
        return encode_ablated(params, cfg, "vision", images, None, ablation)

    def encode_texts_fn(params, tokens, eot, cfg):
        return encode_ablated(params, cfg, "text", tokens, eot, ablation)

    return encode_images_fn, encode_texts_fn


def evaluate_ablation(params: dict, testbed, cfg, ablation: Ablation, encoders=None) -> dict[str, float]:
    """Every metric of evaluate_all with `ablation` applied. An empty ablation is exactly
    evaluate_all with `encoders` (None: the model's own, e.g. step.choose("fast").encoders for
    what training reports); a non-empty one always runs the hooked reference forward."""
    ablation.check(cfg)
    if ablation.empty:
        return evaluate_all(params, testbed, cfg, encoders=encoders)
    return evaluate_all(params, testbed, cfg, encoders=ablated_encoders(ablation))
