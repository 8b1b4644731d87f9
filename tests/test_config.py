"""RunConfig: presets, flat and dotted keys, validation naming the field, the JSON round trip and
the precedence preset < --config file < command-line overrides."""

import dataclasses
import json

import pytest

from minispatial import config
from minispatial.config import PRESETS, RunConfig, all_keys, from_dict, make_config, to_dict, to_json
from minispatial.data import TestbedConfig
from minispatial.model import ModelConfig
from minispatial.text import TEXT_LEN
from minispatial.train import main as train_main

SMALL = {"n_pair": 4, "n_labels": 8, "n_heldout": 3, "image_len": 6, "n_layout": 10}


def test_every_preset_builds():
    assert set(PRESETS) == {"paper-left", "paper-leftright", "tiny"}
    for name in PRESETS:
        cfg = make_config(preset=name)
        assert isinstance(cfg, RunConfig)
    assert make_config(preset="paper-left") == RunConfig()        # the defaults are the paper's
    lr = make_config(preset="paper-leftright")
    assert (lr.data.caption_mode, lr.model.text_layers) == ("left+right", 2)
    tiny = make_config(preset="tiny")
    assert (tiny.train.steps, tiny.model.d_model, tiny.model.d_head, tiny.train.batch_size) == (30, 32, 8, 32)
    with pytest.raises(ValueError, match="preset='huge'"):
        make_config(preset="huge")


def test_derived_model_fields_follow_the_testbed():
    cfg = make_config(SMALL, preset="tiny")
    m = cfg.model
    assert (m.vision_vocab, m.text_vocab, m.vision_ctx, m.text_ctx) == (9, 18, 7, TEXT_LEN)
    d = RunConfig().model
    assert (d.vision_vocab, d.text_vocab, d.vision_ctx, d.text_ctx) == (21, 30, 11, TEXT_LEN)


def test_flat_and_dotted_keys_and_string_values():
    a = make_config({"n_pair": "5", "lr": "3e-4", "layernorm": "true", "d_model": "64", "schedule": "constant"})
    b = make_config({"data.n_pair": 5, "train.lr": 3e-4, "model.layernorm": True, "model.d_model": 64,
                     "train.schedule": "constant"})
    assert a == b
    assert (a.data.n_pair, a.train.lr, a.model.layernorm, a.model.d_model) == (5, 3e-4, True, 64)
    assert type(a.train.lr) is float and type(a.model.d_model) is int
    assert make_config({"layernorm": "0"}).model.layernorm is False
    assert make_config({"decay-embeddings": "yes"}).train.decay_embeddings is True   # - or _


def test_seed_sets_both_data_and_train_seed():
    cfg = make_config({"seed": "7"})
    assert (cfg.data.seed, cfg.train.seed) == (7, 7)
    cfg = make_config({"data.seed": 3})
    assert (cfg.data.seed, cfg.train.seed) == (3, 0)
    cfg = make_config({"train.seed": 3})
    assert (cfg.data.seed, cfg.train.seed) == (0, 3)
    assert all_keys()["seed"] == ["data.seed", "train.seed"]


def test_all_keys_lists_every_settable_field_once():
    keys = all_keys()
    for sec, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            derived = sec == "model" and f.name in config.DERIVED_MODEL_FIELDS
            assert (f"{sec}.{f.name}" in keys) != derived
            assert (f.name in keys) != derived
    assert "vision_vocab" not in keys and "model.text_ctx" not in keys


@pytest.mark.parametrize("overrides, field", [
    ({"n_pairs": 5}, "n_pairs"),                        # unknown key
    ({"train.n_pair": 5}, "train.n_pair"),              # a real field in the wrong section
    ({"lr": "abc"}, "lr"),
    ({"lr": "-1"}, "lr"),
    ({"lr": "inf"}, "lr"),
    ({"steps": "-1"}, "steps"),
    ({"steps": "1.5"}, "steps"),
    ({"d_model": "0"}, "d_model"),
    ({"layernorm": "maybe"}, "layernorm"),
    ({"n_pair": "99"}, "n_pair"),
    ({"caption_mode": "up"}, "caption_mode"),
    ({"schedule": "linear"}, "schedule"),
    ({"dtype": "float16"}, "dtype"),
    ({"init": "xavier"}, "init"),
    ({"min_lr_frac": "1.5"}, "min_lr_frac"),
    ({"beta2": "1"}, "beta2"),
    ({"logit_scale_init": "9"}, "logit_scale_init"),
    ({"vision_vocab": 5}, "vision_vocab"),              # derived: never set by hand
    ({"model.text_ctx": 4}, "text_ctx"),
])
def test_bad_fields_are_rejected_by_name(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_config(overrides)


def test_derived_fields_cannot_be_inconsistent():
    cfg = RunConfig()
    with pytest.raises(ValueError, match="vision_vocab"):
        RunConfig(cfg.data, dataclasses.replace(cfg.model, vision_vocab=5), cfg.train)
    with pytest.raises(ValueError, match="vision_ctx"):    # a testbed change without make_config
        RunConfig(TestbedConfig(image_len=6, n_layout=10), ModelConfig(), cfg.train)


def test_bad_base_dicts_are_rejected_by_name():
    with pytest.raises(ValueError, match="optim"):
        from_dict({"optim": {"lr": 1}})
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        from_dict({"train": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="steps"):
        from_dict({"train": {"steps": "5"}})              # JSON values are not parsed from strings
    with pytest.raises(ValueError, match="n_pair"):
        from_dict({"data": {"n_pair": 40}})


@pytest.mark.parametrize("cfg", [
    RunConfig(),
    make_config(SMALL, preset="tiny"),
    make_config({"caption_mode": "left+right", "text_layers": 2, "layernorm": True, "mlp": True, "proj_dim": 16,
                 "lr": "3e-4", "beta2": "0.95", "weight_decay": "0.1", "decay_embeddings": "true",
                 "schedule": "constant", "min_lr_frac": "0.1", "init": "clip", "embed_scale": "sqrt_d",
                 "dtype": "float64", "seed": "11", "unseen_mode": "one", "n_heldout": "3"}),
])
def test_to_dict_from_dict_round_trip(cfg):
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(json.loads(to_json(cfg))) == cfg
    d = to_dict(cfg)
    assert set(d) == {"data", "model", "train"}
    assert d["model"]["vision_vocab"] == cfg.data.n_labels + 1   # derived fields are written too
    assert json.loads(to_json(from_dict(d))) == d


def test_precedence_preset_then_config_file_then_overrides():
    # the file sets some fields; the preset fills the others; the overrides win over both
    base = {"train": {"steps": 7, "lr": 0.5, "log_every": 3}, "model": {"d_model": 48}}
    cfg = make_config({"lr": "0.01", "log_every": 2}, preset="tiny", base=base)
    assert cfg.train.steps == 7 and cfg.model.d_model == 48                 # file > preset
    assert cfg.train.lr == 0.01 and cfg.train.log_every == 2                # overrides > file
    assert cfg.model.d_head == 8 and cfg.train.batch_size == 32             # preset kept
    assert cfg.train.warmup == 10                                           # default kept


def test_precedence_on_the_command_line(tmp_path):
    """`train --preset tiny --config FILE --key value`: the written config.json shows who won."""
    f = tmp_path / "partial.json"
    f.write_text(json.dumps({"train": {"steps": 9, "lr": 0.5}, "model": {"d_model": 16, "vision_vocab": 999},
                             "data": {**SMALL, "seed": 4}}))
    out = tmp_path / "run"
    rc = train_main(["--out", str(out), "--preset", "tiny", "--config", str(f), "--lr", "0.02",
                     "--image_len", "7", "--stop_after", "1", "--step", "reference", "--quiet"])
    assert rc == 0
    cfg = from_dict(json.loads((out / "config.json").read_text()))
    assert cfg.train.steps == 9 and cfg.model.d_model == 16 and cfg.data.seed == 4   # file > preset
    assert cfg.train.lr == 0.02 and cfg.data.image_len == 7                           # CLI > file
    assert cfg.model.vision_ctx == 8 and cfg.model.vision_vocab == 9                  # re-derived
    assert cfg.model.d_head == 8 and cfg.train.log_every == 10                        # preset kept
    # a full config.json from a run, given back with --config, reproduces that run's config
    out2 = tmp_path / "run2"
    assert train_main(["--out", str(out2), "--config", str(out / "config.json"), "--stop_after", "1",
                       "--step", "reference", "--quiet"]) == 0
    assert (out2 / "config.json").read_text() == (out / "config.json").read_text()


def test_cli_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    assert train_main(["--out", str(tmp_path / "r"), "--config", str(bad)]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert train_main(["--out", str(tmp_path / "r"), "--config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_training_step_is_not_a_config_field(tmp_path):
    # --step chooses how the same sums are computed, not what is trained: config.json (and so a
    # checkpoint's meta/config) is the same for both steps, and "step" is no config key
    assert "step" not in all_keys()
    with pytest.raises(ValueError, match="step"):
        make_config({"step": "fast"})
    texts = []
    for step in ("fast", "reference"):
        out = tmp_path / step
        assert train_main(["--out", str(out), "--preset", "tiny", "--stop_after", "1", "--step", step,
                           "--quiet"]) == 0
        texts.append((out / "config.json").read_text())
    assert texts[0] == texts[1]


@pytest.mark.parametrize("overrides", [{"data.seed": "5", "seed": "3"}, {"seed": "3", "data.seed": "5"},
                                       {"seed": 3, "data.seed": 5}])
def test_a_dotted_name_wins_over_seed_in_either_order(overrides):
    cfg = make_config(overrides)
    assert (cfg.data.seed, cfg.train.seed) == (5, 3)
    for pairs in ([("train.seed", "9"), ("seed", "2")], [("seed", "2"), ("train.seed", "9")]):
        cfg = make_config(dict(pairs))
        assert (cfg.data.seed, cfg.train.seed) == (2, 9)


def test_a_dotted_name_wins_on_the_command_line(tmp_path):
    for i, order in enumerate((["--data.seed", "5", "--seed", "3"], ["--seed", "3", "--data.seed", "5"])):
        out = tmp_path / f"run{i}"
        assert train_main(["--out", str(out), "--preset", "tiny", *order, "--stop_after", "1", "--step",
                           "reference", "--quiet"]) == 0
        cfg = from_dict(json.loads((out / "config.json").read_text()))
        assert (cfg.data.seed, cfg.train.seed) == (5, 3)


@pytest.mark.parametrize("bs", ["1", "0"])
def test_batch_size_below_two_is_refused_with_the_reason(bs):
    # a batch of one image has no negative: the contrastive loss is 0 and nothing is learned
    with pytest.raises(ValueError, match=r"batch_size=.*>= 2.*(negative|other)"):
        make_config({"batch_size": bs})
    assert make_config({"batch_size": "2"}).train.batch_size == 2


@pytest.mark.parametrize("content, named", [
    ("[1, 2]", "list"), ("7", "int"), ('"text"', "str"), ("null", "null"), ("{oops", "JSON"),
])
def test_cli_config_file_must_be_a_json_object(tmp_path, capsys, content, named):
    f = tmp_path / "cfg.json"
    f.write_text(content)
    assert train_main(["--out", str(tmp_path / "r"), "--config", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "minispatial train: error:" in err and str(f) in err and named in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("base", [[1, 2], 7, "x"])
def test_make_config_refuses_a_base_that_is_not_a_dict(base):
    with pytest.raises(ValueError, match="JSON object"):
        make_config(base=base)
    with pytest.raises(ValueError, match="JSON object"):
        from_dict(base)
