"""Helpers shared by the trainer's tests (test_train.py, test_rundir.py): a small testbed, the
metrics of a run directory, and bit-for-bit checkpoint comparison. (pytest puts tests/ on the
import path: pyproject.toml, `pythonpath`.)"""

import json

import numpy as np

from minispatial import config
from minispatial.checkpoint import load_checkpoint

SMALL = {"n_pair": 4, "n_labels": 8, "n_heldout": 3, "image_len": 6, "n_layout": 10}
SMALL_ARGS = [a for k, v in SMALL.items() for a in (f"--{k}", str(v))]
TIMING_FIELDS = {"samples_per_s"}


def small_cfg(**overrides):
    return config.make_config({**SMALL, **overrides}, preset="tiny")


def metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def assert_same_checkpoint(a, b):
    """Params, AdamW moments, step count, step and config all bit-identical."""
    cfg_a, pa, oa, sa = load_checkpoint(a)
    cfg_b, pb, ob, sb = load_checkpoint(b)
    assert cfg_a == cfg_b and sa == sb and oa["t"] == ob["t"]
    assert list(pa) == list(pb)
    for n in pa:
        assert pa[n].dtype == pb[n].dtype
        assert np.array_equal(pa[n], pb[n]), f"param {n} differs"
        assert np.array_equal(oa["m"][n], ob["m"][n]), f"adam m of {n} differs"
        assert np.array_equal(oa["v"][n], ob["v"][n]), f"adam v of {n} differs"


def tamper(path, dst=None, **changes):
    """Rewrite the checkpoint at `path` (or write the result to `dst`) with arrays replaced (a
    value, or a function of all arrays) or removed (None); -> the path written."""
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v(data) if callable(v) else v
    dst = path if dst is None else dst
    with open(dst, "wb") as f:
        np.savez(f, **data)
    return dst
