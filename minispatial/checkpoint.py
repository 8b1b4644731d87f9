"""Checkpoints: one .npz holding params, AdamW moments, the step and the config as JSON.

    save_checkpoint(path, cfg, params, {"t", "m", "v"}, step)   written atomically (tmp + fsync + rename)
    load_checkpoint(path) -> (cfg, params, {"t", "m", "v"}, step)  every entry validated before use

Entries: meta/format, meta/step, meta/t (AdamW's step count, equal to meta/step),
meta/config (the RunConfig as JSON), param/NAME, adam_m/NAME, adam_v/NAME for every parameter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minispatial import config as config_mod
from minispatial.model import check_params

CHECKPOINT = "checkpoint.npz"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, cfg, params: dict, opt: dict, step: int) -> None:
    """Write atomically: a temporary file in the same directory, fsynced, then renamed over."""
    arrays = {"meta/format": np.array(FORMAT_VERSION), "meta/step": np.array(step),
              "meta/t": np.array(opt["t"]), "meta/config": np.array(config_mod.to_json(cfg))}
    for n, p in params.items():
        arrays[f"param/{n}"] = p
        arrays[f"adam_m/{n}"] = opt["m"][n]
        arrays[f"adam_v/{n}"] = opt["v"][n]
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:                    # a failed write (disk full, Ctrl-C): no torn .tmp left
        tmp.unlink(missing_ok=True)
        raise


ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")     # an .npz is a zip archive
META = ("meta/format", "meta/step", "meta/t", "meta/config")
MOMENTS = ("adam_m", "adam_v")


def load_checkpoint(path):
    """-> (cfg: RunConfig, params, opt_state, step). ValueError naming the file and the entry on a
    missing, corrupt or inconsistent file: every entry is validated (`validate_checkpoint`) before
    any of it is used."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    if head not in ZIP_SIGNATURES:
        raise ValueError(f"{path} is not a minispatial checkpoint: not an .npz (zip) archive, as "
                         f"`minispatial train` writes")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ValueError ...
        why = ("it holds pickled Python objects, which a minispatial checkpoint never does"
               if "pickle" in str(e) else f"{type(e).__name__}: {e}")
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({why})") from None
    try:
        cfg, step = validate_checkpoint(data)
    except ValueError as e:
        raise ValueError(f"checkpoint {path} is not a valid minispatial checkpoint: {e}") from None
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    opt = {"t": int(data["meta/t"]),
           "m": {n: data[f"adam_m/{n}"] for n in params},
           "v": {n: data[f"adam_v/{n}"] for n in params}}
    return cfg, params, opt, step


def _describe(a: np.ndarray) -> str:
    return f"{a.dtype} {'scalar' if a.shape == () else f'of shape {a.shape}'}"


def _int_entry(data: dict, key: str) -> int:
    a = data.get(key)
    if a is None:
        raise ValueError(f"{key} is missing")
    if a.shape != () or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{key} is {_describe(a)} {a.ravel()[:3].tolist()}: expected an integer scalar")
    return int(a)


def validate_checkpoint(data: dict) -> tuple:
    """The arrays of a checkpoint file {name: array} -> (cfg, step); ValueError naming the entry:
    meta/format, meta/config (a JSON object, a valid config), meta/step in [0, train.steps],
    meta/t == meta/step (AdamW counts one update per step), exactly param/X, adam_m/X, adam_v/X for
    each parameter X of the config's model, each of the parameter's shape and dtype, all finite,
    adam_v >= 0, and nothing else."""
    unknown = sorted(k for k in data if k not in META and k.split("/", 1)[0] not in ("param", *MOMENTS))
    if unknown:
        raise ValueError(f"unexpected entries {unknown[:5]}")
    fmt = _int_entry(data, "meta/format")
    if fmt != FORMAT_VERSION:
        raise ValueError(f"meta/format is {fmt}: this version reads format {FORMAT_VERSION}")
    c = data.get("meta/config")
    if c is None:
        raise ValueError("meta/config is missing")
    if c.shape != () or c.dtype.kind != "U":
        raise ValueError(f"meta/config is {_describe(c)}: expected a JSON string")
    try:
        d = json.loads(str(c))
    except ValueError as e:
        raise ValueError(f"meta/config is not JSON ({e})") from None
    try:
        cfg = config_mod.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"meta/config: {e}") from None
    step, t = _int_entry(data, "meta/step"), _int_entry(data, "meta/t")
    if not 0 <= step <= cfg.train.steps:
        raise ValueError(f"meta/step is {step}: must be in [0, {cfg.train.steps}] (train.steps of its config)")
    if t != step:
        raise ValueError(f"meta/t (the AdamW step count) is {t}: must equal meta/step = {step} "
                         f"(one AdamW update per training step)")
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    check_params(params, cfg.model)
    for kind in MOMENTS:
        names = {k[len(kind) + 1:] for k in data if k.startswith(kind + "/")}
        missing, extra = [n for n in params if n not in names], sorted(names - set(params))
        if missing or extra:
            raise ValueError(f"the {kind} entries do not match the params: missing "
                             f"{[f'{kind}/{n}' for n in missing][:5]}, unexpected {[f'{kind}/{n}' for n in extra][:5]}")
        for n, p in params.items():
            a = data[f"{kind}/{n}"]
            if a.shape != p.shape or a.dtype != p.dtype:
                raise ValueError(f"{kind}/{n} is {_describe(a)}: expected its param's {_describe(p)}")
    for kind in ("param", *MOMENTS):
        for n in params:
            a = data[f"{kind}/{n}"]
            finite = np.isfinite(a)
            if not finite.all():
                bad = a[~finite]
                raise ValueError(f"{kind}/{n} holds {int(np.isnan(bad).sum())} nan and "
                                 f"{int(np.isinf(bad).sum())} inf values")
            if kind == "adam_v" and (a < 0).any():
                raise ValueError(f"adam_v/{n} holds negative values (a second moment is >= 0)")
    return cfg, step


def write_atomic(path: Path, text: str) -> None:
    """path.write_text(text), but through a temporary file renamed over it: never half written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
