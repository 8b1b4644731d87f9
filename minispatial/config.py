"""One run's whole configuration: the testbed, the model and the training settings.

`RunConfig` nests three frozen dataclasses: `data` (TestbedConfig), `model` (ModelConfig) and
`train` (TrainConfig). On the command line every field is set by its flat name
(`--n_pair 5`, `--lr 3e-4`, `--text_layers 2`) or by its dotted name (`--data.seed 3`); the
flat name `seed` sets both the testbed seed and the training seed, and a dotted name given with it
wins in either order (`--data.seed 5 --seed 3`: data.seed 5, train.seed 3). The model fields that
follow from the testbed (vocabularies and context lengths) are derived, never set by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from minispatial.data import SAMPLERS, TestbedConfig
from minispatial.model import ModelConfig
from minispatial.text import FIRST_LABEL_ID, TEXT_LEN

SCHEDULES = ("cosine", "constant")
BATCH_WHY = (" (the contrastive loss scores each image against the other captions of its batch, "
             "its negatives: a batch of 1 has none, its loss is always 0 and nothing is learned)")
DERIVED_MODEL_FIELDS = ("vision_vocab", "text_vocab", "vision_ctx", "text_ctx")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the paper states none of them; these defaults are our choices,
    see reference_runs/README.md for the search behind them)."""

    steps: int = 1500
    batch_size: int = 128         # capped at the sampler's cap (data.sampler_cap) on the train split
    sampler: str = "distinct"     # "distinct": one example per distinct scene (no repeated caption);
                                  # "uniform": examples uniformly without replacement (plain CLIP)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.0
    decay_embeddings: bool = False
    warmup: int = 10
    schedule: str = "cosine"
    min_lr_frac: float = 0.0
    grad_clip: float = 0.0        # 0 = no clipping
    seed: int = 0                 # model initialisation and batch order
    log_every: int = 50
    checkpoint_every: int = 500

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

        for name, lo in (("steps", 1), ("batch_size", 2), ("warmup", 0), ("seed", 0),
                         ("log_every", 1), ("checkpoint_every", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                bad(name, f"an int >= {lo}" + (BATCH_WHY if name == "batch_size" else ""))
        for name, lo, hi, lo_open, hi_open in (("lr", 0, math.inf, True, True), ("beta1", 0, 1, False, True),
                                               ("beta2", 0, 1, False, True), ("eps", 0, math.inf, True, True),
                                               ("weight_decay", 0, math.inf, False, True),
                                               ("min_lr_frac", 0, 1, False, False),
                                               ("grad_clip", 0, math.inf, False, True)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                bad(name, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        if not isinstance(self.decay_embeddings, bool):
            bad("decay_embeddings", "true or false")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if self.sampler not in SAMPLERS:
            bad("sampler", f"one of {SAMPLERS}")


@dataclass(frozen=True)
class RunConfig:
    data: TestbedConfig = field(default_factory=TestbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        want = derived_model_fields(self.data)
        got = {k: getattr(self.model, k) for k in DERIVED_MODEL_FIELDS}
        if got != want:
            raise ValueError(f"model fields {got} do not match the testbed (expected {want}); "
                             "they are derived: build configs with make_config()")


def derived_model_fields(data: TestbedConfig) -> dict:
    return {"vision_vocab": data.n_labels + 1, "text_vocab": FIRST_LABEL_ID + data.n_labels,
            "vision_ctx": data.image_len + 1, "text_ctx": TEXT_LEN}


SECTIONS = {"data": TestbedConfig, "model": ModelConfig, "train": TrainConfig}

PRESETS: dict[str, dict[str, object]] = {
    # the paper's main setting: left-only captions, 1-layer towers
    "paper-left": {},
    # left+right captions need a 2-layer text tower (paper)
    "paper-leftright": {"caption_mode": "left+right", "text_layers": 2},
    # a seconds-long run for smoke tests
    "tiny": {"steps": 30, "d_model": 32, "d_head": 8, "batch_size": 32, "log_every": 10},
}


def all_keys() -> dict[str, list[str]]:
    """flat name -> the dotted names it sets (e.g. 'seed' -> ['data.seed', 'train.seed'])."""
    keys: dict[str, list[str]] = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if sec == "model" and f.name in DERIVED_MODEL_FIELDS:
                continue
            keys.setdefault(f.name, []).append(f"{sec}.{f.name}")
            keys[f"{sec}.{f.name}"] = [f"{sec}.{f.name}"]
    return keys


def _default(sec: str, name: str):
    return next(f.default for f in dataclasses.fields(SECTIONS[sec]) if f.name == name)


def parse_value(key: str, text: str, default):
    """Turn a command-line string into the type of the field's default; ValueError names key."""
    if isinstance(default, bool):
        low = str(text).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={text!r} is invalid: must be true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is invalid: must be an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is invalid: must be a number") from None
    return str(text)


def make_config(overrides: dict[str, object] | None = None, preset: str = "paper-left",
                base: dict | None = None) -> RunConfig:
    """Build a validated RunConfig from a preset, an optional nested base dict (a config.json)
    and overrides {flat-or-dotted key: value or string}. Unknown keys raise ValueError.

    Overrides that set several fields (`seed`: data.seed and train.seed) are applied before those
    that set one, whatever their order: `{"data.seed": 5, "seed": 3}` gives data.seed 5, train.seed 3."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown: allowed {sorted(PRESETS)}")
    if base is not None:
        check_object(base)
    keys = all_keys()
    values: dict[str, dict[str, object]] = {sec: {} for sec in SECTIONS}
    def apply(src):
        resolved = []
        for key, v in src.items():
            k = key.replace("-", "_")
            if k not in keys:
                raise ValueError(f"unknown config field {key!r}; run `minispatial train --help` for the list")
            resolved.append((keys[k], v))
        resolved.sort(key=lambda kv: -len(kv[0]))         # stable: the broad names first
        for dotted_names, v in resolved:
            for dotted in dotted_names:
                sec, name = dotted.split(".")
                default = _default(sec, name)
                values[sec][name] = parse_value(dotted, v, default) if isinstance(v, str) else v

    apply(PRESETS[preset])
    if base is not None:
        for sec, sub in base.items():
            if sec not in SECTIONS or not isinstance(sub, dict):
                raise ValueError(f"config section {sec!r} is unknown: allowed {list(SECTIONS)}")
            for name, v in sub.items():
                if sec == "model" and name in DERIVED_MODEL_FIELDS:
                    continue
                if f"{sec}.{name}" not in keys:
                    raise ValueError(f"config field {sec}.{name} is unknown")
                values[sec][name] = v
    apply(overrides or {})
    data = TestbedConfig(**values["data"])
    model = ModelConfig(**{**values["model"], **derived_model_fields(data)})
    train = TrainConfig(**values["train"])
    return RunConfig(data, model, train)


def to_dict(cfg: RunConfig) -> dict:
    return {sec: dataclasses.asdict(getattr(cfg, sec)) for sec in SECTIONS}


def from_dict(d: dict) -> RunConfig:
    """Inverse of to_dict (a config.json or a checkpoint's config); validates everything."""
    check_object(d)
    return make_config(base=d)


def check_object(d) -> None:
    """ValueError unless d is a dict (a config's top level is a JSON object)."""
    if not isinstance(d, dict):
        kind = "null" if d is None else type(d).__name__
        shown = "" if d is None else " " + json.dumps(d, default=repr)[:40]
        raise ValueError(f'a config must be a JSON object {{"data": {{...}}, "model": {{...}}, '
                         f'"train": {{...}}}}; got {kind}{shown}')


def to_json(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def field_help() -> list[tuple[str, str, object]]:
    """(flat key, section, default) for every settable field, for --help texts."""
    out = []
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if sec == "model" and f.name in DERIVED_MODEL_FIELDS:
                continue
            out.append((f.name, sec, f.default))
    return out
