"""analysis.py: the score decomposition is exact, ablations do what they say, and a gradient
planted by hand is found with its sign and slope. Untrained float64 models throughout (the
invariants do not need training), on a small testbed so each evaluation takes well under a second.
"""

import json
import math

import numpy as np
import pytest

from minispatial import analysis as an
from minispatial import ops
from minispatial.config import make_config
from minispatial.data import make_testbed
from minispatial.evaluate import evaluate_all
from minispatial.model import encode_images, init_params
from minispatial.optim import adamw_init
from minispatial.train import save_checkpoint

SMALL = dict(image_len=6, n_labels=8, n_heldout=3, n_pair=5, n_layout=5, n_single_layout=3,
             n_eval_layout=4, d_model=16, n_heads=2, d_head=8, dtype="float64")
ARCHS = {
    "1-layer": {},
    "2-layer": {"vision_layers": 2, "text_layers": 2},
    "layernorm": {"vision_layers": 2, "text_layers": 2, "layernorm": True},
    "ln+mlp+proj+sqrt_d": {"vision_layers": 2, "layernorm": True, "mlp": True, "d_mlp": 8,
                           "proj_dim": 6, "embed_scale": "sqrt_d"},
}


def small_model(seed=0, **kw):
    # -> (run config, params, testbed): an untrained float64 model; LayerNorm w/b randomised.
    # init "torch" (N(0, 1) embeddings) makes every term of the decomposition sizeable.
    run = make_config({"init": "torch", **SMALL, **kw}, preset="tiny")
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
    feats = an.encode_ablated(params, cfg, "vision", images, None, ablation, record)
    return record[f"vision.blocks.{layer}.attn.hook_pattern"][:, :, 0, :], feats


# ------------------------------------------------------------------------------- decomposition

@pytest.mark.parametrize("arch", ARCHS)
def test_terms_sum_to_the_models_scores(arch):
    run, params, tb = small_model(**ARCHS[arch])
    cfg = run.model
    images = tb.splits["val_seen_pair"].images[:20]
    split = tb.splits["train"]
    for tower, ids, eot in (("vision", images, None), ("text", split.tokens[-20:], split.eot[-20:])):
        for layer in range(cfg.layers(tower)):
            terms, scores, _, _ = an.decompose(params, cfg, tower, layer, ids, eot)
            want = an.term_names(("E", "P") if layer == 0 else ("E", "P", "R"))
            assert list(terms) == want
            err = np.abs(sum(terms.values()) - scores).max()
            assert err < 1e-10, (tower, layer, err)
            if layer > 0:   # R carries what earlier blocks wrote: not negligible
                assert np.abs(terms["RR"]).max() > 1e-3


def test_decompose_rejects_a_missing_layer():
    run, params, tb = small_model()
    with pytest.raises(ValueError, match="layer=1 is invalid"):
        an.decompose(params, run.model, "vision", 1, tb.splits["val_single"].images)


def test_const_term_is_row_constant_and_does_not_move_attention():
    run, params, tb = small_model(vision_layers=2)
    images = tb.splits["val_seen_pair"].images[:10]
    for layer in (0, 1):
        terms, _, _, _ = an.decompose(params, run.model, "vision", layer, images)
        c = terms["const"]
        assert np.allclose(c, c[..., :1])
        before, _ = cls_pattern(params, run.model, images, an.Ablation(), layer)
        after, _ = cls_pattern(params, run.model, images, an.Ablation(("const",)), layer)
        assert np.allclose(before, after, atol=1e-12)


# ------------------------------------------------------------------------------- planted gradient

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
def test_planted_ep_gradient_is_recovered(alpha):
    run, params, tb = small_model()
    cfg, L = run.model, run.data.image_len
    plant_ep_gradient(params, cfg, alpha)
    terms, _, _, _ = an.decompose(params, cfg, "vision", 0, tb.splits["val_single"].images)
    assert np.allclose(terms["EP"][:, 0, 0, 1:], alpha * np.arange(1, L + 1), atol=1e-12)
    res = an.analyze_vision(params, cfg, tb, n_images=64)[0]
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
    an.encode_ablated(params, cfg, "vision", tb.splits["val_single"].images, None,
                      an.Ablation(("EP",), heads=(0,)), record)
    s = record["vision.blocks.0.attn.hook_attn_scores"]
    assert np.allclose(s[:, 0], (sum(terms.values()) - terms["EP"])[:, 0], atol=1e-12)
    assert np.allclose(s[:, 1], sum(terms.values())[:, 1], atol=1e-12)   # head 1 untouched


def test_planted_gradient_makes_a_relational_head():
    run, params, tb = small_model()
    plant_ep_gradient(params, run.model, 3.0)
    heads = an.analyze_vision(params, run.model, tb, n_images=16)[0]["heads"]
    assert heads[0]["class"] == "relational" and heads[0]["pos_frac"] > 0.9


# ------------------------------------------------------------------------------- ablations

@pytest.mark.parametrize("arch", ["2-layer", "layernorm", "ln+mlp+proj+sqrt_d"])
def test_ablation_subtracts_exactly_the_named_terms(arch):
    run, params, tb = small_model(**ARCHS[arch])
    cfg = run.model
    images = tb.splits["val_seen_pair"].images[:16]
    terms, scores, _, _ = an.decompose(params, cfg, "vision", 1, images)
    record = {}
    an.encode_ablated(params, cfg, "vision", images, None,
                      an.Ablation(("EP", "RR", "BR"), heads=(1,), layers=(1,)), record)
    got = record["vision.blocks.1.attn.hook_attn_scores"]
    assert np.allclose(got[:, 0], scores[:, 0], atol=1e-12)
    assert np.allclose(got[:, 1], (scores - terms["EP"] - terms["RR"] - terms["BR"])[:, 1], atol=1e-12)


def test_ablated_encoders_are_what_evaluate_all_runs():
    run, params, tb = small_model()
    cfg = run.model
    abl = an.parse_ablation("EP,VP", towers=("vision", "text"))
    enc_img, enc_txt = an.ablated_encoders(abl)
    images, split = tb.splits["val_seen_pair"].images, tb.splits["train"]
    # each encoder is the hooked forward of its tower
    assert np.array_equal(enc_img(params, images, cfg),
                          an.encode_ablated(params, cfg, "vision", images, None, abl))
    assert np.array_equal(enc_txt(params, split.tokens, split.eot, cfg),
                          an.encode_ablated(params, cfg, "text", split.tokens, split.eot, abl))
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
    assert same_metrics(got, an.evaluate_ablation(params, tb, cfg, abl))
    assert not same_metrics(got, evaluate_all(params, tb, cfg))


def test_removing_an_identically_zero_term_changes_nothing():
    run, params, tb = small_model(vision_layers=2)
    cfg = run.model
    for n in params:
        if n.endswith("attn.b_Q"):
            params[n] = np.zeros_like(params[n])
    images = tb.splits["val_unseen_pair"].images
    abl = an.Ablation(("BP", "BE"), towers=("vision", "text"))
    with ops.use_backend("numpy"):     # the hooked forward always runs the NumPy core
        for layer in (0, 1):
            before, f0 = cls_pattern(params, cfg, images, an.Ablation(), layer)
            after, f1 = cls_pattern(params, cfg, images, abl, layer)
            assert np.array_equal(before, after) and np.array_equal(f0, f1)
        assert same_metrics(an.evaluate_ablation(params, tb, cfg, abl), evaluate_all(params, tb, cfg))


def test_empty_ablation_reproduces_the_baseline_exactly():
    run, params, tb = small_model()
    base = evaluate_all(params, tb, run.model)
    assert same_metrics(an.evaluate_ablation(params, tb, run.model, an.Ablation()), base)
    assert same_metrics(an.evaluate_ablation(params, tb, run.model, an.parse_ablation("none")), base)
    # and a real ablation does change the metrics, and leaves the plain evaluation untouched
    ep = an.evaluate_ablation(params, tb, run.model, an.parse_ablation("EP,VP", towers=("vision", "text")))
    assert not same_metrics(ep, base)
    assert same_metrics(evaluate_all(params, tb, run.model), base)


@pytest.mark.parametrize("layers", [1, 2])
def test_without_position_terms_vision_is_mirror_symmetric(layers):
    run, params, tb = small_model(vision_layers=layers)
    cfg = run.model
    images = tb.splits["val_seen_pair"].images
    mirrored = images[:, ::-1].copy()
    no_pos = an.parse_ablation("POS,VP")
    assert set(no_pos.terms) == {"EP", "PE", "PP", "BP", "PR", "RP"} and no_pos.value_pos
    for layer in range(layers):
        p, f = cls_pattern(params, cfg, images, no_pos, layer)
        pm, fm = cls_pattern(params, cfg, mirrored, no_pos, layer)
        assert np.allclose(p[:, :, 0], pm[:, :, 0], atol=1e-12)            # CLS -> CLS
        assert np.allclose(p[:, :, 1:], pm[:, :, :0:-1], atol=1e-12)        # pixels, reversed
    assert np.allclose(f, fm, atol=1e-12)     # mirrored images get the same feature
    # controls: the intact model, and the scores without VP, still see the layout
    _, f0 = cls_pattern(params, cfg, images, an.Ablation(), 0)
    _, fm0 = cls_pattern(params, cfg, mirrored, an.Ablation(), 0)
    assert not np.allclose(f0, fm0, atol=1e-6)
    _, f1 = cls_pattern(params, cfg, images, an.parse_ablation("POS"), 0)
    _, fm1 = cls_pattern(params, cfg, mirrored, an.parse_ablation("POS"), 0)
    assert not np.allclose(f1, fm1, atol=1e-6)


def test_value_position_ablation_is_v_from_x_minus_p():
    run, params, tb = small_model()
    cfg = run.model
    images = tb.splits["val_single"].images
    rec0, rec1 = {}, {}
    an.encode_ablated(params, cfg, "vision", images, None, an.Ablation(), rec0)
    an.encode_ablated(params, cfg, "vision", images, None, an.Ablation(value_pos=True, heads=(1,)), rec1)
    x = rec0["vision.hook_embed"]                                           # E only
    W_V, b_V = params["vision.blocks.0.attn.W_V"], params["vision.blocks.0.attn.b_V"]
    want = np.einsum("btd,hde->bthe", x, W_V) + b_V
    v0, v1 = rec0["vision.blocks.0.attn.hook_v"], rec1["vision.blocks.0.attn.hook_v"]
    assert np.allclose(v1[:, :, 1], want[:, :, 1], atol=1e-12)
    assert np.array_equal(v1[:, :, 0], v0[:, :, 0])


def test_parse_ablation_and_errors():
    a = an.parse_ablation("-EP-VP")
    assert a.terms == ("EP",) and a.value_pos and a.name == "-EP-VP"
    assert an.parse_ablation("ep+pp").terms == ("EP", "PP")
    assert an.parse_ablation("").empty and an.parse_ablation("baseline").name == "baseline"
    with pytest.raises(ValueError, match="unknown term 'XY'"):
        an.parse_ablation("EP,XY")
    with pytest.raises(ValueError, match="towers"):
        an.Ablation(("EP",), towers=("audio",))
    run, params, tb = small_model()
    with pytest.raises(ValueError, match="head 5 is out of range"):
        an.evaluate_ablation(params, tb, run.model, an.parse_ablation("EP", heads=[5]))


# ------------------------------------------------------------------------------- text, alignment

def test_text_eot_attention_follows_a_planted_first_position_bias():
    run, params, tb = small_model()
    cfg = run.model
    d = np.zeros(cfg.d_model)
    d[0] = 1.0
    params["text.W_pos"][0] += 10.0 * d                       # position 0 = first label
    Wk = params["text.blocks.0.attn.W_K"][1]
    params["text.blocks.0.attn.b_Q"][1] = 5.0 * (d @ Wk) / ((d @ Wk) @ (d @ Wk))   # BP: 50/sqrt(Dh) at key 0
    res = an.analyze_text(params, cfg, tb)[0]
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
    s = an.alignment_scores(U, U @ R, seen=[1, 2, 3, 4, 5], heldout=[6, 7, 8])
    assert s["fit_cos"] == pytest.approx(1.0) and s["heldout_cos"] == pytest.approx(1.0)
    assert s["heldout_top1"] == 1.0 and s["heldout_cos_identity"] < 0.9


# ------------------------------------------------------------------------------- end to end

def test_analyze_command_end_to_end(tmp_path, capsys):
    run, params, tb = small_model(dtype="float32", vision_layers=2)
    ckpt = tmp_path / "checkpoint.npz"
    save_checkpoint(ckpt, run, params, adamw_init(params), 0)
    assert an.main([str(tmp_path), "--json", "--n-images", "32", "--ablate", "EP", "--ablate",
                    "PP,VP", "--heads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in res["ablations"]] == ["baseline", "-EP", "-PP-VP"]
    assert res["ablations"][1]["heads"] == [1]
    base = evaluate_all(params, tb, run.model)
    got = res["ablations"][0]["metrics"]
    assert all(got[k] == (None if math.isnan(v) else v) for k, v in base.items())
    assert all(e["sum_max_abs_err"] < 1e-10 for e in res["vision"] + res["text"])   # float64 copy
    json.dumps(res, allow_nan=False)
    assert an.main([str(ckpt), "--n-images", "32", "--ablate", "EP", "--ablate", "PP,VP", "--heads", "1",
                    "--out", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text()) == {**res, "checkpoint": str(ckpt)}
    capsys.readouterr()
    assert an.main([str(tmp_path), "--ablate", "EP", "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "-EP" in out and "alignment" in out and "sum check" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "vision_layer1_cls_curves.png").is_file()
    assert an.main([str(tmp_path / "missing")]) == 2
    assert an.main([str(tmp_path), "--ablate", "QQ"]) == 2


# ------------------------------------------------------------------------------- many runs

def fake_report(name, lr_acc, ep_slopes, ep_curve, classes, text_classes, n_heads=2):
    """A hand-made `analyze` report: one vision layer (terms EP, PP), one text layer, two ablations."""
    def term(slope, curve):
        return {"slope": slope, "right_left": 2 * slope, "std_ratio": abs(slope), "var_share": None,
                "curve": curve}
    heads = [{"head": h, "class": c, "terms": {"EP": term(s, ep_curve), "PP": term(0.0, [0.0, 0.0, 0.0])}}
             for h, (s, c) in enumerate(zip(ep_slopes, classes))]
    return {"checkpoint": name, "step": 20,
            "model": {"n_heads": n_heads, "vision_layers": 1, "text_layers": 1, "vision_ctx": 4},
            "ablations": [{"name": n, "terms": t, "value_pos": False, "towers": ["vision"], "heads": None,
                           "metrics": {"val_unseen_pair.lr_acc": v, "val_single.lr_acc": None}}
                          for n, t, v in (("baseline", [], lr_acc), ("-EP", ["EP"], 0.5))],
            "vision": [{"layer": 0, "terms": ["EP", "PP"], "heads": heads}],
            "text": [{"layer": 0, "heads": [{"head": h, "class": c} for h, c in enumerate(text_classes)]}]}


def test_aggregate_reports_means_and_sample_stds():
    a = fake_report("a", 0.9, [0.3, -0.1], [0.0, 1.0, 2.0], ["relational", "relational"], ["relational", "x"])
    b = fake_report("b", 0.7, [0.1, 0.5], [2.0, 3.0, 4.0], ["label-specific"] * 2, ["x", "relational"])
    agg = an.aggregate_reports([a, b])
    json.dumps(agg, allow_nan=False)
    r2 = math.sqrt(2)
    assert agg["n_runs"] == 2 and [r["checkpoint"] for r in agg["runs"]] == ["a", "b"]
    base, ep = (ab["metrics"]["val_unseen_pair.lr_acc"] for ab in agg["ablations"])
    assert [ab["name"] for ab in agg["ablations"]] == ["baseline", "-EP"]
    assert base["mean"] == pytest.approx(0.8) and base["std"] == pytest.approx(0.1 * r2)   # ddof=1
    assert base["n"] == 2 and base["values"] == [0.9, 0.7]
    assert ep == {"mean": 0.5, "std": 0.0, "n": 2, "values": [0.5, 0.5]}
    undefined = agg["ablations"][0]["metrics"]["val_single.lr_acc"]
    assert undefined["mean"] is None and undefined["std"] is None and undefined["n"] == 0
    v = agg["vision"][0]
    h0, h1 = (h["terms"]["EP"] for h in v["heads"])
    assert h0["slope"]["mean"] == pytest.approx(0.2) and h0["slope"]["std"] == pytest.approx(0.1 * r2)
    assert h1["right_left"]["mean"] == pytest.approx(0.4) and h1["right_left"]["std"] == pytest.approx(0.6 * r2)
    assert h0["var_share"]["n"] == 0
    assert h0["curve"]["mean"] == pytest.approx([1.0, 2.0, 3.0]) and h0["curve"]["std"] == pytest.approx([r2] * 3)
    # over heads within each run first (a: mean 0.1, max 0.3; b: mean 0.3, max 0.5), then over runs
    assert v["head_mean"]["EP"]["slope"]["mean"] == pytest.approx(0.2)
    assert v["head_max"]["EP"]["slope"]["mean"] == pytest.approx(0.4)
    assert v["head_max"]["EP"]["slope"]["std"] == pytest.approx(0.1 * r2)
    assert v["head_max"]["EP"]["std_ratio"]["values"] == pytest.approx([0.3, 0.5])
    assert v["n_relational"]["values"] == [2, 0] and v["n_relational"]["std"] == pytest.approx(r2)
    assert agg["text"][0]["n_relational"] == {"mean": 1.0, "std": 0.0, "n": 2, "values": [1, 1]}
    # one run: means, no std
    one = an.aggregate_reports([a])["ablations"][0]["metrics"]["val_unseen_pair.lr_acc"]
    assert one["mean"] == 0.9 and one["std"] is None
    text = an.format_aggregate(agg)
    assert "2 runs" in text and "0.800±0.141" in text and "+0.400±0.141" in text
    assert ["vision", "0", "1.00±1.41", "2", "0"] in [ln.split() for ln in text.splitlines()]


def test_aggregate_reports_refuses_runs_that_do_not_match():
    a = fake_report("a", 0.9, [0.3, -0.1], [0.0, 1.0, 2.0], ["relational"] * 2, ["x"] * 2)
    b = fake_report("b", 0.7, [0.1], [2.0, 3.0, 4.0], ["relational"], ["x"], n_heads=1)
    with pytest.raises(ValueError, match="model.n_heads is 2 in a, 1 in b"):
        an.aggregate_reports([a, b])
    c = fake_report("c", 0.7, [0.1, 0.5], [2.0, 3.0, 4.0], ["relational"] * 2, ["x"] * 2)
    c["ablations"] = c["ablations"][:1]
    with pytest.raises(ValueError, match="different ablations"):
        an.aggregate_reports([a, c])
    with pytest.raises(ValueError, match="at least one"):
        an.aggregate_reports([])


@pytest.fixture(scope="module")
def an_two_runs(tmp_path_factory):
    """Two tiny trained runs (seeds 0 and 1) -> their run directories."""
    from minispatial.train import train

    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for seed in (0, 1):
        cfg = make_config({"n_labels": 8, "n_heldout": 3, "n_pair": 4, "image_len": 6, "n_layout": 5,
                           "n_single_layout": 3, "steps": 20, "seed": seed}, preset="tiny")
        train(cfg, root / f"seed={seed}", verbose=False)
        dirs.append(root / f"seed={seed}")
    return dirs


def test_analyze_command_on_several_checkpoints(an_two_runs, tmp_path, capsys):
    runs = [str(d) for d in an_two_runs]
    out = tmp_path / "ref" / "analysis.json"
    argv = ["--n-images", "16", "--ablate", "EP", "--out", str(out)]
    assert an.main(runs + argv + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    doc = json.loads(out.read_text())
    assert printed == doc
    assert [r["checkpoint"] for r in doc["runs"]] == runs
    agg = doc["aggregate"]
    assert agg == an.aggregate_reports(doc["runs"])
    for i, ab in enumerate(agg["ablations"]):
        for k in an.KEY_METRICS:
            vals = [r["ablations"][i]["metrics"][k] for r in doc["runs"]]
            assert ab["metrics"][k]["values"] == vals
            assert ab["metrics"][k]["mean"] == pytest.approx(np.mean(vals))
            assert ab["metrics"][k]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert [ab["name"] for ab in agg["ablations"]] == ["baseline", "-EP"]
    # text, and plots of the aggregate
    assert an.main(runs + argv + ["--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "2 runs" in text and "±" in text and "relational heads per run" in text
    assert f"wrote {out}" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "vision_layer0_EP_curve_runs.png").is_file()
    assert (tmp_path / "plots" / "ablations_runs.png").is_file()


def test_analyze_command_refuses_a_checkpoint_given_twice(an_two_runs, capsys):
    run = an_two_runs[0]
    assert an.main([str(run), str(run / "checkpoint.npz")]) == 2
    assert "given twice" in capsys.readouterr().err
