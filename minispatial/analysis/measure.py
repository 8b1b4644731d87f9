"""Per-model measurements (all per tower, layer and head) and `analyze`, the report of one model.

curve, slope, right_left (vision CLS row, query 0): each term's value at the key of pixel j,
    j = 0..L-1, averaged over the labels: on the "grid" probe (n x L single-object images, every
    label at every pixel) curve[j] = mean over labels v of term(CLS, key of pixel j) in the image
    holding v at j. (EP on the CLS row does not depend on the key's label at layer 0 without
    LayerNorm, so there it is exact; EE, PE, BE do, hence the label average.)
    `slope` is the least-squares slope of curve against j (logit units per pixel) and
    `right_left` = curve[L-1] - curve[0]. `curve_batch` is the same term averaged over the pair
    probe images at every key (objects and background alike).
std_ratio, var_share (CLS row over the L pixel keys; EOT row over the keys 0..eot in text):
    on the "pair" probe (up to n_images two-object images from val_seen_pair + val_unseen_pair,
    or every two-object left-form caption in text), d_t = term t minus its mean over the row's
    keys, d = the same for the total score, pooled over images:
        std_ratio_t = sqrt(sum d_t^2) / sqrt(sum d^2)   (the term's std as a fraction of the total's)
        var_share_t = sum d_t d / sum d^2               (its share of the variance; sums to 1)
head class (relational vs label-specific): S[v, k] = total score minus `const` at the key of the
    object with label v in key slot k, averaged over images. Vision: the CLS row, slots = the L
    pixels, from the grid probe. Text: the EOT row, slots = first- and second-mentioned label,
    from every left-form two-object caption.
        pos_var = mean over v of Var over k of S;   label_var = mean over k of Var over v of S
    A head is "relational" when pos_var > label_var, "label-specific" otherwise
    (pos_frac = pos_var / (pos_var + label_var)).
text EOT attention: per text layer and head, the EOT query's attention probability on the
    first- and second-mentioned label token, averaged over captions; `first_wins` = fraction of
    captions with more on the first. Left-form captions (first = left object) and, in left+right
    mode, right-form captions (first = right object) separately; also on held-out pairs only.
alignment: label embeddings u_v (image side) and t_v (text side), unit-normalised.
    "features": u_v = mean over pixels of the image features of the grid images of label v;
                t_v = the text feature of "{v} is in the image".
    "embeddings": u_v = vision.W_E[v], t_v = text.W_E[token of v] (requires equal widths: both D).
    An orthogonal R (Procrustes: R = U Vᵀ from the SVD of U_seenᵀ T_seen, no centring) is fitted on
    the seen labels (the pair labels 1..n_pair). Reported: mean cos(u_v R, t_v) on seen labels
    (`fit_cos`) and held-out labels (`heldout_cos`), the same without rotation (`*_identity`),
    the mean cos(u_v R, t_w) over held-out v and w != v (`heldout_cos_other`, a floor), and the
    fraction of held-out labels whose nearest t among all n labels is their own (`heldout_top1`).

The decomposition runs the hooked reference forward of a float64 copy of the model. The
un-ablated encoders (the alignment features, the baseline evaluation) are a parameter, `encoders`
(None: the model's reference encoders); `minispatial analyze` passes those of its --step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from minispatial import model
from minispatial.data import make_testbed
from minispatial.analysis.ablate import DEFAULT_ABLATIONS, Ablation, as_ablation, evaluate_ablation
from minispatial.analysis.decompose import F64, TOWERS, decompose, float64_model, sum_error
from minispatial.text import FIRST_LABEL_ID, left_caption, right_caption, single_caption
from minispatial.reporting import clean_json


# --------------------------------------------------------------------------------------------
# probes and statistics

def grid_images(n_labels: int, image_len: int) -> np.ndarray:
    # -> images [n * L, L]: image (v - 1) * L + j holds label v at pixel j, background elsewhere
    images = np.zeros((n_labels * image_len, image_len), dtype=np.int64)
    v = np.repeat(np.arange(1, n_labels + 1), image_len)
    j = np.tile(np.arange(image_len), n_labels)
    images[np.arange(len(v)), j] = v
    return images


def pair_images(testbed, n_images: int) -> np.ndarray:
    # -> images [N, L]: up to n_images two-object images of val_seen_pair + val_unseen_pair
    ims = np.concatenate([testbed.splits[s].images for s in ("val_seen_pair", "val_unseen_pair")])
    if len(ims) > n_images:
        ims = ims[np.sort(np.random.default_rng(0).choice(len(ims), n_images, replace=False))]
    return ims


def pair_captions(testbed, form: str):
    # -> tokens [N, Tt], eot [N], first/second label [N], first/second token index [N]
    n = testbed.config.n_labels
    a, b = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1), indexing="ij")
    keep = a != b
    a, b = a[keep], b[keep]                                   # scene: a left of b
    if form == "left":
        caps, first, second = [left_caption(x, y) for x, y in zip(a, b)], a, b
    else:
        caps, first, second = [right_caption(x, y) for x, y in zip(a, b)], b, a
    tokens, eot = testbed.tokenizer.encode_batch(caps)
    is_label = tokens >= FIRST_LABEL_ID
    i_first = np.argmax(is_label, axis=1)
    i_second = tokens.shape[1] - 1 - np.argmax(is_label[:, ::-1], axis=1)
    return tokens, eot, first, second, i_first, i_second


def slope_of(curve: np.ndarray) -> np.ndarray:
    # curve [..., L] -> least-squares slope against 0..L-1 [...]
    x = np.arange(curve.shape[-1], dtype=F64)
    x -= x.mean()
    return (curve - curve.mean(axis=-1, keepdims=True)) @ x / (x @ x)


def row_shares(terms: dict, keymask: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # terms {name: [B, h, K]} one query row each, keymask [B, K] bool -> {name: (std_ratio [h], var_share [h])}
    m = keymask[:, None, :].astype(F64)
    cnt = m.sum(axis=-1, keepdims=True)

    def dev(a):
        return (a - (a * m).sum(axis=-1, keepdims=True) / cnt) * m

    d = dev(sum(terms.values()))
    tot = (d * d).sum(axis=(0, 2))
    out = {}
    for n, a in terms.items():
        dt = dev(a)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[n] = (np.sqrt((dt * dt).sum(axis=(0, 2)) / tot), (dt * d).sum(axis=(0, 2)) / tot)
    return out


def head_class(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # S [H, n_labels, slots] score by label and slot -> pos_var [H], label_var [H]
    return S.var(axis=2).mean(axis=1), S.var(axis=1).mean(axis=1)


def heads_table(pos_var, label_var) -> list[dict]:
    # pos_var, label_var [H] -> one dict per head: pos_var, label_var, pos_frac, class
    out = []
    for h, (pv, lv) in enumerate(zip(pos_var, label_var)):
        out.append({"head": h, "pos_var": float(pv), "label_var": float(lv),
                    "pos_frac": float(pv / (pv + lv)) if pv + lv > 0 else math.nan,
                    "class": "relational" if pv > lv else "label-specific"})
    return out


# --------------------------------------------------------------------------------------------
# vision: CLS row

def analyze_vision(params: dict, cfg, testbed, n_images: int = 512) -> list[dict]:
    """Per vision layer: the CLS-row terms of every head (curves, slopes, shares), the head
    classes and the sum check. `params`/`cfg` should be float64 (float64_model)."""
    n, L = testbed.config.n_labels, testbed.config.image_len
    grid = grid_images(n, L)
    pairs = pair_images(testbed, n_images)
    js = np.tile(np.arange(L), n)                                # pixel of each grid image
    out = []
    for layer in range(cfg.vision_layers):
        tg, sg, _, _ = decompose(params, cfg, "vision", layer, grid)
        tp, sp, pattern, _ = decompose(params, cfg, "vision", layer, pairs)
        err = max(sum_error(tg, sg), sum_error(tp, sp))
        # object key of each grid image: curve[t][h, j] = mean over v
        obj = {t: a[np.arange(len(grid)), :, 0, 1 + js].reshape(n, L, -1).transpose(2, 0, 1)
               for t, a in tg.items()}                                              # [H, n, L]
        cls_rows = {t: a[:, :, 0, 1:] for t, a in tp.items()}                       # [B, H, L]
        shares = row_shares(cls_rows, np.ones((len(pairs), L), dtype=bool))
        pos_var, label_var = head_class(sum(obj.values()) - obj["const"])
        heads = heads_table(pos_var, label_var)
        for h, head in enumerate(heads):
            head["terms"] = {}
            for t in tg:
                curve = obj[t][h].mean(axis=0)                                      # [L]
                head["terms"][t] = {
                    "slope": float(slope_of(curve)), "right_left": float(curve[-1] - curve[0]),
                    "std_ratio": float(shares[t][0][h]), "var_share": float(shares[t][1][h]),
                    "curve": curve.tolist(), "curve_batch": cls_rows[t][:, h].mean(axis=0).tolist()}
        out.append({"layer": layer, "terms": list(tg), "sum_max_abs_err": err, "n_grid": len(grid),
                    "n_pair_images": len(pairs), "heads": heads,
                    "mean_terms": {t: a.mean(axis=0).tolist() for t, a in tp.items()},
                    "mean_pattern": pattern.mean(axis=0).tolist()})
    return out


# --------------------------------------------------------------------------------------------
# text: EOT row

def analyze_text(params: dict, cfg, testbed) -> list[dict]:
    """Per text layer: EOT-row term shares, head classes, EOT attention to the first- vs
    second-mentioned label, and the sum check. `params`/`cfg` should be float64."""
    held = np.isin(np.arange(testbed.config.n_labels + 1), testbed.heldout_labels)
    n = testbed.config.n_labels
    forms = ["left"] + (["right"] if testbed.config.caption_mode == "left+right" else [])
    data = {f: pair_captions(testbed, f) for f in forms}
    out = []
    for layer in range(cfg.text_layers):
        entry = {"layer": layer, "sum_max_abs_err": 0.0, "eot_attention": {}}
        for f in forms:
            tokens, eot, first, second, i1, i2 = data[f]
            terms, scores, pattern, _ = decompose(params, cfg, "text", layer, tokens, eot)
            entry["sum_max_abs_err"] = max(entry["sum_max_abs_err"], sum_error(terms, scores))
            rows = np.arange(len(tokens))
            p1, p2 = pattern[rows, :, eot, i1], pattern[rows, :, eot, i2]           # [N, H]
            both_held = held[first] & held[second]
            stats = []
            for h in range(cfg.n_heads):
                s = {"head": h, "att_first": float(p1[:, h].mean()), "att_second": float(p2[:, h].mean()),
                     "first_wins": float((p1[:, h] > p2[:, h]).mean())}
                if both_held.any():
                    s["heldout_att_first"] = float(p1[both_held, h].mean())
                    s["heldout_att_second"] = float(p2[both_held, h].mean())
                stats.append(s)
            entry["eot_attention"][f] = stats
            if f != "left":
                continue
            T = tokens.shape[1]
            eot_rows = {t: a[rows, :, eot, :] for t, a in terms.items()}           # [N, H, T]
            shares = row_shares(eot_rows, np.arange(T)[None, :] <= eot[:, None])
            S = np.zeros((cfg.n_heads, n, 2))
            cnt = np.zeros((n, 2))
            noconst = sum(terms.values()) - terms["const"]
            for slot, (lab, idx) in enumerate(((first, i1), (second, i2))):
                np.add.at(S[:, :, slot].T, lab - 1, noconst[rows, :, eot, idx])
                np.add.at(cnt[:, slot], lab - 1, 1)
            heads = heads_table(*head_class(S / cnt[None]))
            for h, head in enumerate(heads):
                head["terms"] = {t: {"std_ratio": float(shares[t][0][h]), "var_share": float(shares[t][1][h])}
                                 for t in terms}
            entry.update({"terms": list(terms), "heads": heads,
                          "mean_terms": {t: a.mean(axis=0).tolist() for t, a in terms.items()},
                          "mean_pattern": pattern.mean(axis=0).tolist()})
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# alignment of image-side and text-side label embeddings

def procrustes(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    # U [k, E], V [k, E] -> orthogonal R [E, E] minimising |U R - V|_F
    A, _, Bt = np.linalg.svd(U.T @ V)
    return A @ Bt


def unit_rows(x: np.ndarray) -> np.ndarray:
    # x [n, E] -> each row divided by its L2 norm
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def alignment_scores(U: np.ndarray, V: np.ndarray, seen, heldout) -> dict[str, float]:
    # U, V [n, E] label embeddings (row v-1 = label v), seen / heldout label lists -> metrics
    U, V = unit_rows(U), unit_rows(V)
    s, h = np.asarray(seen) - 1, np.asarray(heldout) - 1
    R = procrustes(U[s], V[s])
    cos = (U @ R) @ V.T                                      # [n, n] cos(u_v R, t_w)
    cos0 = U @ V.T
    off = ~np.eye(len(U), dtype=bool)[h]
    return {"fit_cos": float(np.diag(cos)[s].mean()), "heldout_cos": float(np.diag(cos)[h].mean()),
            "fit_cos_identity": float(np.diag(cos0)[s].mean()),
            "heldout_cos_identity": float(np.diag(cos0)[h].mean()),
            "heldout_cos_other": float(cos[h][off].mean()),
            "heldout_top1": float((cos[h].argmax(axis=1) == h).mean()),
            "heldout_top1_identity": float((cos0[h].argmax(axis=1) == h).mean())}


def analyze_alignment(params: dict, cfg, testbed, encoders=None) -> dict:
    """Procrustes alignment on seen (pair) labels, tested on held-out labels (module docstring).
    `encoders` (evaluate.py's pair; None: the model's reference encoders) compute the features."""
    encode_images, encode_texts = (model.encode_images, model.encode_texts) if encoders is None else encoders
    n, L = testbed.config.n_labels, testbed.config.image_len
    seen, held = testbed.pair_labels, testbed.heldout_labels
    img = encode_images(params, grid_images(n, L), cfg).reshape(n, L, -1).mean(axis=1)
    tokens, eot = testbed.tokenizer.encode_batch([single_caption(v) for v in range(1, n + 1)])
    txt = encode_texts(params, tokens, eot, cfg)
    out = {"seen_labels": list(seen), "heldout_labels": list(held),
           "features": alignment_scores(img, txt, seen, held)}
    vis_E = params["vision.W_E"][1:n + 1]
    txt_E = params["text.W_E"][FIRST_LABEL_ID:FIRST_LABEL_ID + n]
    out["embeddings"] = alignment_scores(vis_E, txt_E, seen, held)
    return out


# --------------------------------------------------------------------------------------------
# everything for one model

def analyze(params: dict, run_cfg, ablations=DEFAULT_ABLATIONS, heads=None, tower: str = "vision",
            n_images: int = 512, testbed=None, encoders=None) -> dict:
    """Every measurement and ablation of one model -> JSON-serialisable dict.

    ablations: Ablation objects or strings ("EP,VP"); strings apply to `tower` ("vision",
    "text" or "both") and `heads` (None = all). The baseline is always evaluated first.
    encoders: the un-ablated encoders, for the baseline and the alignment features (None: the
    model's reference encoders; step.choose(name).encoders for a step's)."""
    if tower not in (*TOWERS, "both"):
        raise ValueError(f"tower={tower!r} is invalid: must be vision, text or both")
    towers = TOWERS if tower == "both" else (tower,)
    cfg = run_cfg.model
    testbed = make_testbed(run_cfg.data) if testbed is None else testbed
    abls = [as_ablation(a, towers, heads) for a in ablations]
    abls = [Ablation(towers=towers)] + [a for a in abls if not a.empty]
    for a in abls:
        a.check(cfg)
    p64, c64 = float64_model(params, cfg)
    result = {"model": dataclasses.asdict(cfg),
              "vision": analyze_vision(p64, c64, testbed, n_images),
              "text": analyze_text(p64, c64, testbed),
              "alignment": analyze_alignment(p64, c64, testbed, encoders),
              "ablations": []}
    for a in abls:
        metrics = evaluate_ablation(params, testbed, cfg, a, encoders)
        result["ablations"].append({"name": a.name, "terms": list(a.terms), "value_pos": a.value_pos,
                                    "towers": list(a.towers),
                                    "heads": None if a.heads is None else list(a.heads),
                                    "metrics": metrics})
    return clean_json(result)
