"""Finite-difference checks of every hand-written backward in minispatial (ops and whole model).

    minispatial gradcheck [--step reference|fast|both] [--seed S] [--quick] [--only NAMES] [--no_model]

--quick (a second or two) checks every op and every parameter name of the full check at least once,
the model tensors along QUICK_DIRS random directions, and prints what it skips.

What is checked, for each step (minispatial/step.py: "reference" is ops.py and
model.loss_and_grads; "fast" swaps in the fast step's attention core and its loss_and_grads):
every input and parameter tensor of every op in ops.py (`op_cases`: embedding with repeated ids,
position embedding, CLS prepend, linear with and without bias, attention bidirectional / causal
with its 8 parameters, pool, LayerNorm, GELU, MLP, L2 norm, CLIP loss with the logit scale,
softmax), then every parameter of whole models (`model_configs`, `check_model`).
It prints one table per step and returns 1 if any tensor FAILs.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, V vocabulary, F MLP width, E feature.

How one tensor is checked (float64; the full reasoning and the measured errors are in
docs/gradcheck.md): f(inputs) = sum(out * R) with a fixed random R; tensors of at most
`full_max` elements element by element, larger ones along `n_dirs` random directions; the
fourth-order central difference with h = H_STEP; per element rel = |a - n| / max(|a|, |n|, FLOOR),
PASS iff its maximum is <= REL_TOL.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from minispatial import ops

ORDER = 4           # central difference of order 4 (default) or 2, see the module docstring
H_STEP = 3e-4       # step of the fourth-order difference
H_STEP_ORDER2 = 1e-5  # a good step for the plain central difference (order=2)
FLOOR = 1e-4        # denominator floor of the relative error
REL_TOL = 1e-6      # PASS iff max relative error <= REL_TOL
FULL_MAX = 300      # tensors with at most this many elements are checked element by element
N_DIRS = 3          # random directions per large tensor


# --------------------------------------------------------------------------------------------
# the primitives

def rel_error(a, n, floor: float = FLOOR) -> np.ndarray:
    # a [...], n [...] -> rel [...] = |a - n| / max(|a|, |n|, floor)
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return np.abs(a - n) / np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)


def _default_h(h, order):
    if order not in (2, 4):
        raise ValueError(f"order={order!r} is not allowed: must be 2 or 4")
    return (H_STEP if order == 4 else H_STEP_ORDER2) if h is None else h


def central_difference(f: Callable[[float], float], h: float, order: int = ORDER) -> float:
    """Derivative at t = 0 of the scalar function g(t) = f(t) by a central difference."""
    if order == 2:
        return (f(h) - f(-h)) / (2.0 * h)
    return (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h)


def numeric_grad(f: Callable[[np.ndarray], float], x, h: float | None = None,
                 order: int = ORDER) -> np.ndarray:
    # x [...] -> grad [...] (float64): central difference of f along every element of x
    h = _default_h(h, order)
    xp = np.array(x, dtype=np.float64)           # a private copy, perturbed in place
    grad = np.empty(xp.shape, dtype=np.float64)
    for i in range(xp.size):
        old = xp.flat[i]

        def g(t):
            xp.flat[i] = old + t
            return f(xp)

        grad.flat[i] = central_difference(g, h, order)
        xp.flat[i] = old
    return grad


def directional_check(f: Callable[[np.ndarray], float], x, analytic, rng: np.random.Generator,
                      h: float | None = None, n_dirs: int = N_DIRS, floor: float = FLOOR,
                      order: int = ORDER) -> float:
    # x [...], analytic [...] -> max over n_dirs random unit directions u of
    #   rel_error(<analytic, u>, d/dt f(x + t u) at t = 0 by a central difference)
    h = _default_h(h, order)
    x = np.asarray(x, dtype=np.float64)
    analytic = np.asarray(analytic, dtype=np.float64)
    errs = []
    for _ in range(n_dirs):
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u)
        a = float(np.sum(analytic * u))
        n = central_difference(lambda t: f(x + t * u), h, order)
        errs.append(float(rel_error(a, n, floor)))
    return float(np.max(errs))          # NaN propagates (and fails)


# --------------------------------------------------------------------------------------------
# results

@dataclass
class Result:
    op: str
    tensor: str
    shape: tuple
    method: str          # "full" | "directional"
    err: float           # max relative error
    step: str = ""       # "reference" or "fast"
    tol: float = REL_TOL

    @property
    def passed(self) -> bool:
        return bool(self.err <= self.tol)     # NaN fails


@dataclass
class Case:
    """One op projected to a scalar: loss(inputs) = sum(out * R), and its analytic gradients."""
    op: str
    inputs: dict                      # name -> float64 array (each one is checked)
    loss: Callable[[dict], float]     # inputs -> scalar
    grads: dict                       # name -> analytic gradient, same shapes as inputs


def check_tensor(f, x, analytic, rng, h: float | None = None,
                 full_max: int = FULL_MAX, n_dirs: int = N_DIRS) -> tuple[str, float]:
    # x [...], analytic [...] -> (method "full" | "directional", max relative error)
    analytic = np.asarray(analytic)
    if analytic.shape != np.shape(x):
        raise ValueError(f"analytic gradient has shape {analytic.shape}, its tensor {np.shape(x)}")
    if np.size(x) <= full_max:
        return "full", float(rel_error(analytic, numeric_grad(f, x, h)).max(initial=0.0))
    return "directional", directional_check(f, x, analytic, rng, h, n_dirs)


def check_case(case: Case, rng: np.random.Generator, h: float | None = None,
               full_max: int = FULL_MAX, step: str = "") -> list[Result]:
    """Check every input tensor of one case; one Result per tensor."""
    results = []
    for name, x in case.inputs.items():
        def f(t, name=name):
            return float(case.loss({**case.inputs, name: t}))
        results.append(check_named(case.op, name, f, x, case.grads.get(name), rng, h, full_max,
                                   step=step))
    return results


def check_named(op: str, name: str, f, x, analytic, rng, h: float | None = None,
                full_max: int = FULL_MAX, n_dirs: int = N_DIRS, step: str = "") -> Result:
    """`check_tensor` as a Result; a missing gradient or one of the wrong shape is a FAIL
    (error NaN, method "missing" / "shape [...]") rather than an exception."""
    shape = tuple(np.shape(x))
    if analytic is None or np.shape(analytic) != shape:
        method = "missing" if analytic is None else f"shape {list(np.shape(analytic))}"
        return Result(op, name, shape, method, math.nan, step)
    method, err = check_tensor(f, x, analytic, rng, h, full_max, n_dirs)
    return Result(op, name, shape, method, err, step)


# --------------------------------------------------------------------------------------------
# the op cases (coupled shapes, random float64 values)

@dataclass(frozen=True)
class Sizes:
    B: int = 2       # batch
    T: int = 4       # tokens
    H: int = 2       # heads
    Dh: int = 3      # d_head
    D: int = 5       # d_model
    V: int = 4       # vocabulary (smaller than B*T: ids repeat)
    F: int = 6       # MLP width
    E: int = 4       # feature width


def _normal(rng, *shape, std=1.0):
    return rng.standard_normal(shape) * std


def _redraw_rows(rng, x, stat, lo):
    # x [..., n] -> x with every row whose stat(row) < lo redrawn from N(0, 1)
    # (a finite difference of step h cannot follow a function that curves on a scale ~h:
    #  LayerNorm of a near-constant row curves on sqrt(var + eps), L2 norm on |x|)
    while (bad := stat(x) < lo).any():
        x[bad] = rng.standard_normal((int(bad.sum()), x.shape[-1]))
    return x


def _projected(out_shape, rng):
    # -> R ~ N(0, 1) shaped like the op's output: the random upstream gradient
    return rng.standard_normal(out_shape)


def case_embedding(rng, s: Sizes) -> Case:
    W_E = _normal(rng, s.V, s.D)
    ids = rng.integers(0, s.V, size=(s.B, s.T))
    ids.flat[-1] = ids.flat[0]                          # at least one repeated id
    R = _projected((s.B, s.T, s.D), rng)
    out, cache = ops.embedding_forward(W_E, ids)
    return Case("embedding", {"W_E": W_E},
                lambda p: np.sum(ops.embedding_forward(p["W_E"], ids)[0] * R),
                {"W_E": ops.embedding_backward(R, cache)})


def case_pos_embedding(rng, s: Sizes) -> Case:
    x, W_pos = _normal(rng, s.B, s.T, s.D), _normal(rng, s.T + 1, s.D)   # one unused row
    R = _projected((s.B, s.T, s.D), rng)
    _, cache = ops.pos_embedding_forward(x, W_pos)
    dx, dW_pos = ops.pos_embedding_backward(R, cache)
    return Case("pos_embedding", {"x": x, "W_pos": W_pos},
                lambda p: np.sum(ops.pos_embedding_forward(p["x"], p["W_pos"])[0] * R),
                {"x": dx, "W_pos": dW_pos})


def case_prepend_cls(rng, s: Sizes) -> Case:
    x, cls = _normal(rng, s.B, s.T, s.D), _normal(rng, s.D)
    R = _projected((s.B, s.T + 1, s.D), rng)
    _, cache = ops.prepend_cls_forward(x, cls)
    dx, dcls = ops.prepend_cls_backward(R, cache)
    return Case("prepend_cls", {"x": x, "cls": cls},
                lambda p: np.sum(ops.prepend_cls_forward(p["x"], p["cls"])[0] * R),
                {"x": dx, "cls": dcls})


def case_linear(rng, s: Sizes, bias: bool = True) -> Case:
    x, W = _normal(rng, s.B, s.T, s.D), _normal(rng, s.D, s.F, std=s.D ** -0.5)
    inputs = {"x": x, "W": W}
    if bias:
        inputs["b"] = _normal(rng, s.F)
    R = _projected((s.B, s.T, s.F), rng)
    _, cache = ops.linear_forward(x, W, inputs.get("b"))
    dx, dW, db = ops.linear_backward(R, cache)
    grads = {"x": dx, "W": dW, "b": db}
    return Case("linear" if bias else "linear (no bias)", inputs,
                lambda p: np.sum(ops.linear_forward(p["x"], p["W"], p.get("b"))[0] * R),
                {n: grads[n] for n in inputs})


def attention_inputs(rng, s: Sizes) -> dict:
    # -> {"x": [B, T, D], "W_Q": [H, D, Dh], ..., "b_O": [D]} with O(1) attention scores
    w = s.D ** -0.5
    shapes = {"W_Q": (s.H, s.D, s.Dh), "b_Q": (s.H, s.Dh), "W_K": (s.H, s.D, s.Dh),
              "b_K": (s.H, s.Dh), "W_V": (s.H, s.D, s.Dh), "b_V": (s.H, s.Dh),
              "W_O": (s.H, s.Dh, s.D), "b_O": (s.D,)}
    inputs = {"x": _normal(rng, s.B, s.T, s.D)}
    for n in ops.ATTN_PARAMS:
        inputs[n] = _normal(rng, *shapes[n], std=w if n.startswith("W") else 0.5)
    return inputs


def case_attention(rng, s: Sizes, causal: bool, core=None) -> Case:
    # core: the attention core to check (ops.AttentionCore; None = ops.NUMPY_CORE)
    inputs = attention_inputs(rng, s)
    R = _projected((s.B, s.T, s.D), rng)

    def fwd(p):
        return ops.attention_forward(p["x"], {n: p[n] for n in ops.ATTN_PARAMS}, causal, core=core)

    _, cache = fwd(inputs)
    dx, g = ops.attention_backward(R, cache, {n: inputs[n] for n in ops.ATTN_PARAMS})
    op = "attention (" + ("causal" if causal else "bidirectional") + ")"
    return Case(op, inputs, lambda p: np.sum(fwd(p)[0] * R), {"x": dx, **g})


def case_pool(rng, s: Sizes) -> Case:
    x = _normal(rng, s.B, s.T, s.D)
    idx = rng.integers(0, s.T, size=s.B)
    R = _projected((s.B, s.D), rng)
    _, cache = ops.pool_forward(x, idx)
    return Case("pool", {"x": x}, lambda p: np.sum(ops.pool_forward(p["x"], idx)[0] * R),
                {"x": ops.pool_backward(R, cache)})


def case_layernorm(rng, s: Sizes) -> Case:
    x = _normal(rng, s.B, s.T, s.D)
    if s.D > 1:                                # (with D = 1 the output is b, whatever x)
        x = _redraw_rows(rng, x, lambda a: a.var(axis=-1), 0.01)
    w, b = 1.0 + _normal(rng, s.D, std=0.3), _normal(rng, s.D, std=0.3)
    R = _projected((s.B, s.T, s.D), rng)
    _, cache = ops.layernorm_forward(x, w, b)
    dx, dw, db = ops.layernorm_backward(R, cache)
    return Case("layernorm", {"x": x, "w": w, "b": b},
                lambda p: np.sum(ops.layernorm_forward(p["x"], p["w"], p["b"])[0] * R),
                {"x": dx, "w": dw, "b": db})


def case_gelu(rng, s: Sizes) -> Case:
    x = _normal(rng, s.B, s.T, s.F, std=2.0)
    R = _projected(x.shape, rng)
    _, cache = ops.gelu_forward(x)
    return Case("gelu", {"x": x}, lambda p: np.sum(ops.gelu_forward(p["x"])[0] * R),
                {"x": ops.gelu_backward(R, cache)})


def case_mlp(rng, s: Sizes) -> Case:
    inputs = {"x": _normal(rng, s.B, s.T, s.D),
              "W_in": _normal(rng, s.D, s.F, std=s.D ** -0.5), "b_in": _normal(rng, s.F, std=0.5),
              "W_out": _normal(rng, s.F, s.D, std=s.F ** -0.5), "b_out": _normal(rng, s.D, std=0.5)}
    names = ("x", "W_in", "b_in", "W_out", "b_out")
    R = _projected((s.B, s.T, s.D), rng)
    _, cache = ops.mlp_forward(*(inputs[n] for n in names))
    grads = dict(zip(names, ops.mlp_backward(R, cache)))
    return Case("mlp", inputs, lambda p: np.sum(ops.mlp_forward(*(p[n] for n in names))[0] * R), grads)


def case_l2norm(rng, s: Sizes) -> Case:
    x = _redraw_rows(rng, _normal(rng, s.B, s.E), lambda a: np.abs(a).max(axis=-1), 0.1)
    R = _projected(x.shape, rng)
    _, cache = ops.l2norm_forward(x)
    return Case("l2norm", {"x": x}, lambda p: np.sum(ops.l2norm_forward(p["x"])[0] * R),
                {"x": ops.l2norm_backward(R, cache)})


def case_clip_loss(rng, s: Sizes) -> Case:
    img = ops.l2norm_forward(_normal(rng, s.B, s.E))[0]
    txt = ops.l2norm_forward(_normal(rng, s.B, s.E))[0]
    tau = np.array(math.log(1 / 0.07) + rng.uniform(-0.5, 0.5))
    r = float(rng.standard_normal())                     # the upstream gradient of a scalar
    _, cache = ops.clip_loss_forward(img, txt, tau)
    dimg, dtxt, dtau = ops.clip_loss_backward(r, cache)
    return Case("clip_loss", {"img": img, "txt": txt, "logit_scale": tau},
                lambda p: r * ops.clip_loss_forward(p["img"], p["txt"], p["logit_scale"])[0],
                {"img": dimg, "txt": dtxt, "logit_scale": dtau})


def case_softmax(rng, s: Sizes, mask=None) -> Case:
    scores = _normal(rng, s.B, s.H, s.T, s.T)
    R = _projected(scores.shape, rng)
    pattern = ops.softmax_forward(scores, mask)
    return Case("softmax" + (" (mask)" if mask is not None else ""), {"scores": scores},
                lambda p: np.sum(ops.softmax_forward(p["scores"], mask) * R),
                {"scores": ops.softmax_backward(R, pattern)})


def op_cases(rng: np.random.Generator, s: Sizes = Sizes(), core=None) -> list[Case]:
    """Every op of ops.py as a Case, with shapes coupled through `s`; `core`: the attention core
    the attention cases run (None = NumPy)."""
    return [
        case_embedding(rng, s), case_pos_embedding(rng, s), case_prepend_cls(rng, s),
        case_linear(rng, s, bias=True), case_linear(rng, s, bias=False),
        case_attention(rng, s, causal=False, core=core), case_attention(rng, s, causal=True, core=core),
        case_pool(rng, s), case_layernorm(rng, s), case_gelu(rng, s),
        case_mlp(rng, s), case_l2norm(rng, s), case_clip_loss(rng, s),
        case_softmax(rng, s), case_softmax(rng, s, mask=ops.causal_mask(s.T)),
    ]


# --------------------------------------------------------------------------------------------
# the whole model

QUICK_DIRS = 2       # --quick: random directions per model tensor (instead of every element)


def model_configs(quick: bool = False) -> dict:
    """name -> (float64 ModelConfig, full_max) checked by `run_all`:
    - "model (paper)": tiny attention-only towers (the paper's topology), every element;
    - "model (ln+mlp+proj)": tiny, every option on (LayerNorm, MLP, projection, 2 text layers,
      sqrt(D) embedding scale), every element;
    - "model (paper size)": the paper's widths (D 128, 4 heads of 32), directional checks for
      the tensors over full_max elements.
    quick: the two tiny models only (between them they have every parameter name of the three),
    every tensor along QUICK_DIRS random directions (full_max 0); see QUICK_SKIPS."""
    from minispatial.model import ModelConfig

    tiny = ModelConfig(d_model=6, n_heads=2, d_head=3, d_mlp=8, dtype="float64", vision_vocab=5,
                       text_vocab=7, vision_ctx=5, text_ctx=4)
    configs = {"model (paper)": (tiny, 0 if quick else FULL_MAX),
               "model (ln+mlp+proj)": (replace(tiny, layernorm=True, mlp=True, proj_dim=4, text_layers=2,
                                               embed_scale="sqrt_d"), 0 if quick else FULL_MAX)}
    if not quick:
        configs["model (paper size)"] = (ModelConfig(dtype="float64"), 128)
    return configs


# what --quick leaves out, printed by `main`
QUICK_SKIPS = (
    "model (paper size) (the same parameter names and code as model (paper), at D 128)",
    f"element-by-element checks of the model tensors (each is checked along {QUICK_DIRS} random "
    f"directions instead)",
    "the larger op shapes (B 3, T 5, H 2, Dh 4, D 6; --quick: B 2, T 4, H 2, Dh 3, D 5)",
)


def model_batch(cfg, B: int, rng: np.random.Generator):
    # -> images [B, vision_ctx - 1] in [0, vision_vocab), tokens [B, text_ctx] in
    #    [0, text_vocab), eot [B] in [0, text_ctx)   (random ints, no caption grammar needed)
    images = rng.integers(0, cfg.vision_vocab, size=(B, cfg.vision_ctx - 1))
    tokens = rng.integers(0, cfg.text_vocab, size=(B, cfg.text_ctx))
    eot = rng.integers(0, cfg.text_ctx, size=B)
    return images, tokens, eot


def check_model(cfg=None, seed: int = 0, B: int = 4, full_max: int = FULL_MAX,
                h: float | None = None, name: str = "model", n_dirs: int = N_DIRS,
                step: str = "reference") -> list[Result]:
    """Check the gradients of `step`'s loss_and_grads (minispatial/step.py; "reference" is
    `model.loss_and_grads`) against differences of `model.loss_only` for every parameter tensor of `cfg` (default: the tiny
    attention-only config; any config is switched to float64) on a random batch (`model_batch`).
    Parameters start from `init_params(cfg, seed)` plus N(0, 0.1) noise, so that zero biases
    and unit LayerNorm weights do not hide a term. One Result per parameter tensor; a tensor
    without a gradient, or with a gradient of the wrong shape, gets error NaN (FAIL). Tensors
    over full_max elements are checked along n_dirs random directions."""
    from minispatial import model
    from minispatial.step import choose

    cfg = model_configs()["model (paper)"][0] if cfg is None else cfg
    if cfg.dtype != "float64":
        cfg = replace(cfg, dtype="float64")
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, seed)
    for n in params:
        params[n] = params[n] + 0.1 * rng.standard_normal(params[n].shape)
    images, tokens, eot = model_batch(cfg, B, rng)
    _, grads = choose(step).loss_and_grads(params, images, tokens, eot, cfg)
    results = []
    for pname, x in params.items():
        def f(t, pname=pname):
            return model.loss_only({**params, pname: t}, images, tokens, eot, cfg)
        results.append(check_named(name, pname, f, x, grads.get(pname), rng, h, full_max, n_dirs, step))
    return results


# --------------------------------------------------------------------------------------------
# command line

QUICK_SIZES = Sizes()
FULL_SIZES = Sizes(B=3, T=5, H=2, Dh=4, D=6, V=5, F=8, E=5)


def run_all(seed: int = 0, quick: bool = False, only: list[str] | None = None,
            with_models: bool = True, step: str = "reference") -> list[Result]:
    """Every op case, then the model configs, for one step ("reference" or "fast"). `only`:
    substrings of op names (e.g. ["attention", "model (paper)"]); empty or None = everything."""
    from minispatial.step import choose

    rng = np.random.default_rng(seed)
    core = choose(step).attention_core

    def wanted(op):
        return not only or any(w in op for w in only)

    results = []
    for case in op_cases(rng, QUICK_SIZES if quick else FULL_SIZES, core):
        if wanted(case.op):
            results += check_case(case, rng, step=step)
    if with_models:
        for i, (name, (cfg, full_max)) in enumerate(model_configs(quick).items()):
            if wanted(name):
                results += check_model(cfg, seed=seed + i, B=3 if quick else 4, full_max=full_max,
                                       name=name, n_dirs=QUICK_DIRS if quick else N_DIRS, step=step)
    return results


def format_table(results: list[Result]) -> str:
    rows = [("step", "op", "tensor", "shape", "method", "max rel err", "")]
    for r in results:
        rows.append((r.step, r.op, r.tensor, str(list(r.shape)), r.method, f"{r.err:.2e}",
                     "PASS" if r.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="minispatial gradcheck",
        description="Finite-difference check (float64, central differences) of every op's "
                    f"backward and of every model parameter's gradient; PASS iff the max "
                    f"relative error |a-n|/max(|a|,|n|,{FLOOR:g}) <= {REL_TOL:g}.")
    ap.add_argument("--step", choices=("reference", "fast", "both"), default="both",
                    help="the training step to check (minispatial/step.py; default: both)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random input (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="a second or two: every op and every parameter name at least once, "
                         "model tensors along random directions (prints what it skips)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings of op names to check (default: all)")
    ap.add_argument("--no_model", "--no-model", action="store_true", help="skip the whole-model checks")
    args = ap.parse_args(argv)

    steps = ("reference", "fast") if args.step == "both" else (args.step,)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    results: list[Result] = []
    for step in steps:
        t0 = time.perf_counter()
        res = run_all(args.seed, args.quick, only, with_models=not args.no_model, step=step)
        results += res
        print(f"# step {step}: {len(res)} tensors in {time.perf_counter() - t0:.1f} s")
        print(format_table(res))
    failed = [r for r in results if not r.passed]
    worst = float(np.max([r.err for r in results])) if results else 0.0
    print(f"# {len(results) - len(failed)} PASS, {len(failed)} FAIL; max rel err {worst:.2e} "
          f"(tolerance {REL_TOL:g}; order-{ORDER} central differences, h {H_STEP:g}; floor {FLOOR:g})")
    if args.quick:
        print("# --quick skipped: " + "; ".join(QUICK_SKIPS))
    if not results:
        print("# nothing was checked: --only matched no op")
        return 1
    return 1 if failed else 0
