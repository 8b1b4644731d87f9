"""Time one training step, the fast one and the reference (and, optionally, PyTorch's), and
relate it to the machine.

    minispatial bench [--batch 64,128,512] [--repeat N] [--torch] [--json] [--extras] [--profile]

Legend: B batch, T tokens (Tv = 11 vision rows with CLS, Tt = 8 text rows), D d_model, H heads,
Dh d_head, HD = H*Dh, E feature width, V' token-table rows (vocabulary, + CLS for vision).

A step is what `minispatial train` does per step on one batch, with the step chosen by
`step.choose`: `loss_and_grads`, the gradient norm (`global_norm`, always computed by the
trainer), one `optim.AdamW` update (the step's `adamw_update`) and the logit-scale clamp. Rows
are labelled by the step's backend: "numba" is the fast step (minispatial/fast/), "numpy" the
reference step (model.py + optim.py).
The batch is synthetic (B can exceed the testbed's 230 distinct training captions): random pixels,
random words, EOT at position 4 or 7 (single-object and pair captions), PAD after it.
Every timing is the median of 3 rounds of ceil(`--repeat`/3) steps, rounds in which minispatial and
PyTorch each run 2 warm-up steps and then their share of timed steps, so a change in machine load
hits both alike (the numpy reference, 4-5x slower, is timed once after them). Each framework's
turn starts with a 50 ms pause: without it PyTorch's just-idle OpenMP threads, still spinning,
took a core from the step that followed (measured: minispatial's B 512 step 5.7 ms right after
PyTorch, 3.9 ms without PyTorch in the process; PyTorch's B 64 step 11.5 vs 8.9 ms).

FLOPs (multiply-adds count 2; exp, softmax and the optimizer are not counted):
- naive: the dense step as written in model.py / PyTorch: per tower and layer
  2·B·T·D·3HD (Q, K, V) + 4·B·H·T²·Dh (scores, pattern @ V) + 2·B·T·HD·D (W_O), the projection
  2·B·D·E, the logits 2·B²·E; the backward is twice the forward: naive = 3 × forward.
- fast: the matrix products the fast step executes, as listed by minispatial/fast/products.py
  (`step_products`, summed by `fast_flops`; its docstring has the legend). The numba kernels' adds,
  exp and the softmaxes, the L2 norm and AdamW are not counted (they are not matrix products).
The efficiency figure (the fraction of the machine's float32 matmul throughput spent on the work
the step really needs) is the fast count divided by the step time, against the sgemm rate measured in this run
(a 2048 x 2048 float32 NumPy matmul). The naive count is reported too; it flatters the fast path.
Beside it the report gives a floor: the same products alone, back to back as NumPy matmuls on
contiguous operands with nothing between them (`products_alone`), against the time half of
sgemm allows for the whole step.

`--torch` needs PyTorch (minispatial/tools/torch_model.py, an independent eager implementation,
imported only then: the package itself never imports torch) and also checks that PyTorch and
minispatial compute the same loss and gradients from the same weights (float32 and float64).
`--extras` runs `minispatial train` in subprocesses: cold start of `--steps 1` with an empty and
with a warm numba cache, and the default training run's wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minispatial import memory, model, ops, optim, step
from minispatial.fast.products import fast_flops, step_products
from minispatial.reporting import format_table

TORCH_INSTALL = "pip install torch==2.13.0"


# --------------------------------------------------------------------------------------------
# inputs and FLOP counts

def make_batch(cfg, B: int, seed: int = 0):
    # -> images [B, L], tokens [B, Tt], eot [B]: random ids, EOT at 4 or 7, PAD (0) after it
    rng = np.random.default_rng([seed, B])
    images = rng.integers(0, cfg.vision_vocab, (B, cfg.vision_ctx - 1))
    tokens = rng.integers(2, cfg.text_vocab, (B, cfg.text_ctx))
    eot = rng.choice([min(4, cfg.text_ctx - 1), cfg.text_ctx - 1], size=B)
    tokens[np.arange(cfg.text_ctx)[None, :] > eot[:, None]] = 0
    tokens[np.arange(B), eot] = 1
    return images, tokens, eot


def naive_flops(cfg, B: int, Tt: int) -> float:
    """FLOPs of the dense step (forward + backward = 3 x forward), see the module docstring."""
    D, H, Dh = cfg.d_model, cfg.n_heads, cfg.d_head
    HD, E = H * Dh, (cfg.proj_dim or cfg.d_model)
    fwd = 0.0
    for tower, T in (("vision", cfg.vision_ctx), ("text", Tt)):
        layer = 2 * B * T * D * 3 * HD + 4 * B * H * T * T * Dh + 2 * B * T * HD * D
        fwd += cfg.layers(tower) * layer + (2 * B * D * E if cfg.proj_dim else 0)
    fwd += 2 * B * B * E
    return 3.0 * fwd


def products_alone(products, repeat: int = 100) -> float:
    """Seconds for the given matrix products alone, back to back as NumPy float32 matmuls on
    contiguous operands (one call per product, n > 1 batched): the median of `repeat` passes.
    No exp, no softmax, no optimizer, no kernel, no Python between them: a floor for the step."""
    rng = np.random.default_rng(0)
    ops_ = []
    for _, n, m, k, p in products:
        a = rng.standard_normal((n, m, k)).astype(np.float32)
        b = rng.standard_normal((n, k, p)).astype(np.float32)
        ops_.append((a, b, np.empty((n, m, p), dtype=np.float32)) if n > 1 else (a[0], b[0], np.empty((m, p), np.float32)))
    for _ in range(3):
        for a, b, o in ops_:
            np.matmul(a, b, out=o)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for a, b, o in ops_:
            np.matmul(a, b, out=o)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def sgemm_gflops(n: int = 2048, repeat: int = 5) -> float:
    """The machine's float32 matmul rate: median over `repeat` NumPy n x n matmuls."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / float(np.median(ts)) / 1e9


# --------------------------------------------------------------------------------------------
# steps

def minispatial_step(cfg, name: str, seed: int = 0):
    """-> step(images, tokens, eot) -> loss: one `minispatial train` step of the Step called
    `name` ("fast" or "reference", `step.choose`)."""
    impl = step.choose(name)
    opt = optim.AdamW(model.init_params(cfg, seed), beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.0,
                      update=impl.adamw_update)
    params = opt.params

    def train_step(images, tokens, eot) -> float:
        loss, grads = impl.loss_and_grads(params, images, tokens, eot, cfg)
        optim.clip_grads(grads, 0.0, impl.global_norm(grads))      # the trainer always computes the norm
        opt.step(grads, 1e-3)
        optim.clamp_logit_scale(params)
        return loss

    return train_step


def load_torch_model():
    """minispatial.tools.torch_model (it imports PyTorch); ImportError saying how to install
    PyTorch when it is missing."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--torch needs PyTorch ({TORCH_INSTALL}): {e}") from None
    from minispatial.tools import torch_model

    return torch_model


def time_steps(steps: dict, inputs: dict, repeat: int, rounds: int = 3, warmup: int = 2) -> dict:
    # steps {name: step}, inputs {step: batch} -> {name: median seconds per step}
    # In each of `rounds` rounds every step runs `warmup` untimed then ~repeat/rounds timed times,
    # so a change of machine load affects all of them; the warm-up steps also absorb threads
    # left spinning by the previous framework (PyTorch's OpenMP pool, OpenBLAS).
    per_round = max(1, -(-repeat // rounds))
    times = {n: [] for n in steps}
    for _ in range(rounds):
        for n, f in steps.items():
            batch = inputs[f]
            time.sleep(0.05)                          # let the other framework's idle threads sleep
            for _ in range(warmup):
                f(*batch)
            for _ in range(per_round):
                t0 = time.perf_counter()
                f(*batch)
                times[n].append(time.perf_counter() - t0)
    return {n: float(np.median(ts)) for n, ts in times.items()}


def parity(tm, seed: int = 0, B: int = 64) -> dict:
    """PyTorch vs minispatial (fast path) loss and gradients from the same weights: max relative
    difference over tensors (each relative to its largest entry, floor 1e-3 x the largest gradient
    entry of the model: b_K's gradient is zero in theory, rounding noise on both sides)."""
    fast = step.choose("fast")
    out = {}
    for dtype in ("float32", "float64"):
        cfg = dataclasses.replace(model.ModelConfig(), dtype=dtype)
        params = model.init_params(cfg, seed)
        batch = make_batch(cfg, B, seed)
        lt, gt = tm.loss_and_grads(params, *batch, cfg)
        lm, gm = fast.loss_and_grads(params, *batch, cfg)
        gmax = max(float(np.abs(g).max()) for g in gm.values())
        errs = {n: float(np.abs(gt[n].astype(np.float64) - gm[n]).max()) / max(float(np.abs(gm[n]).max()), 1e-3 * gmax)
                for n in gm}
        worst = max(errs, key=errs.get)
        out[dtype] = {"loss_torch": lt, "loss_minispatial": lm, "loss_rel_diff": abs(lt - lm) / abs(lm),
                      "grad_max_rel_diff": errs[worst], "worst_tensor": worst,
                      "pass": bool(abs(lt - lm) / abs(lm) <= 1e-4 and errs[worst] <= 1e-4)}
    return out


# --------------------------------------------------------------------------------------------
# extras: subprocess runs of the trainer

# The child reports its peak RSS as VmHWM (kB) from /proc/self/status: on Linux, getrusage's
# ru_maxrss survives exec, so a child would report the (larger) RSS of this benchmark process.
_CHILD = """
import resource, sys, time
t0 = time.perf_counter()
from minispatial.cli import main
rc = main(["train", *sys.argv[1:]])            # as `minispatial train` (thread and malloc settings)
secs = time.perf_counter() - t0
try:
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH", secs, hwm, rc)
"""


def run_train(args: list[str], env: dict) -> dict:
    # -> {"wall_s": whole process, "in_process_s": after interpreter start, "peak_rss_mb"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"minispatial train {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    _, secs, rss_kb, rc = line[-1].split()
    return {"wall_s": wall, "in_process_s": float(secs), "peak_rss_mb": int(rss_kb) / 1024.0}


def extras() -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / "numba_cache")}
        one = ["--steps", "1", "--quiet", "--overwrite"]
        res["cold_start_no_cache"] = run_train(one + ["--out", str(Path(tmp) / "a")], env)
        res["cold_start_with_cache"] = run_train(one + ["--out", str(Path(tmp) / "b")], env)
        res["default_train"] = run_train(["--quiet", "--overwrite", "--out", str(Path(tmp) / "c")], env)
    return res


# --------------------------------------------------------------------------------------------
# per-operation profile of one fast step

def traced_files() -> dict[str, str]:
    """The source files `profile` traces -> their module names relative to the package: ops.py,
    model.py, optim.py and every file of minispatial/fast/ ("ops", "fast.one_layer", ...)."""
    import minispatial.fast

    root = Path(model.__file__).resolve().parent
    paths = [Path(m.__file__).resolve() for m in (ops, model, optim)]
    paths += sorted(Path(minispatial.fast.__file__).resolve().parent.glob("*.py"))
    return {str(p): ".".join(p.relative_to(root).with_suffix("").parts) for p in paths}


def profile(B: int, repeat: int = 20) -> list[tuple[str, str, float]]:
    """-> [(source line, function, ms per step)] self time of every line of `traced_files` over
    `repeat` fast steps, largest first ("fast/one_layer.py:80  <the line>", "fast.one_layer.forward").
    A line's time includes the untraced work it starts (numba kernels, NumPy, BLAS) but not the
    traced lines of functions it calls. Tracing adds about a microsecond per executed line (a
    few hundred lines per step)."""
    import linecache

    cfg = model.ModelConfig()
    train_step = minispatial_step(cfg, "fast")
    batch = make_batch(cfg, B)
    for _ in range(3):
        train_step(*batch)
    modules = traced_files()
    files = set(modules)
    acc: dict[tuple[str, int], float] = {}
    last = [None, 0.0]                                # (file, line) being timed, since when

    def tracer(frame, event, arg):
        now = time.perf_counter()
        if last[0] is not None:
            acc[last[0]] = acc.get(last[0], 0.0) + now - last[1]
        if event == "return":                         # back in the caller's current line
            back = frame.f_back
            last[0] = ((back.f_code.co_filename, back.f_lineno, back.f_code.co_qualname)
                       if back is not None and back.f_code.co_filename in files else None)
        else:
            last[0] = (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_qualname)
        last[1] = time.perf_counter()
        return tracer

    def global_tracer(frame, event, arg):
        if frame.f_code.co_filename in files:
            return tracer(frame, event, arg)
        return None

    time.sleep(0.05)                                  # as time_steps: idle threads of PyTorch sleep
    sys.settrace(global_tracer)
    try:
        for _ in range(repeat):
            train_step(*batch)
    finally:
        sys.settrace(None)
    rows = [(f"{modules[f].replace('.', '/')}.py:{ln:<4} {linecache.getline(f, ln).strip()[:90]}",
             f"{modules[f]}.{fn}", 1e3 * t / repeat) for (f, ln, fn), t in acc.items()]
    return sorted(rows, key=lambda r: -r[2])


# --------------------------------------------------------------------------------------------
# command line

def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}"
    except (OSError, IndexError):
        pass
    import numba

    return (f"{cpu}, {platform.system()} {platform.machine()}, Python {platform.python_version()}, "
            f"NumPy {np.__version__}, numba {numba.__version__} ({numba.get_num_threads()} threads)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minispatial bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="64,128,512", help="comma-separated batch sizes (default 64,128,512)")
    p.add_argument("--repeat", type=int, default=20, help="timed steps of the fast step (and PyTorch) per batch (median)")
    p.add_argument("--numpy_repeat", "--numpy-repeat", type=int, default=5,
                   help="timed steps of the slow reference step (rows `numpy`)")
    p.add_argument("--torch", action="store_true", help="also time PyTorch eager and check parity")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--extras", action="store_true", help="cold start, default training time and peak RSS")
    p.add_argument("--profile", action="store_true", help="per-operation profile of one fast step")
    args = p.parse_args(argv)
    from minispatial.cli import keep_freed_memory

    keep_freed_memory()                        # as every `minispatial` command (cli.py)
    try:
        batches = [int(b) for b in args.batch.split(",")]
        if not batches or min(batches) < 1 or args.repeat < 1 or args.numpy_repeat < 1:
            raise ValueError
    except ValueError:
        print(f"minispatial bench: error: --batch {args.batch!r} / --repeat must be positive integers",
              file=sys.stderr)
        return 2

    cfg = model.ModelConfig()
    try:                                       # refuse what cannot work before timing anything
        for B in batches:
            memory.check_memory(f"--batch {B}", model.estimate_model_bytes(cfg, B),
                                f"a training step of the paper model on a batch of {B}")
        if args.extras:                        # its trainings write into a temporary directory
            from minispatial.cli import check_output_dir

            check_output_dir(tempfile.gettempdir(), "--extras: the temporary directory")
    except (ValueError, OSError) as e:
        print(f"minispatial bench: error: {e}", file=sys.stderr)
        return 2
    tm = None
    if args.torch:
        try:
            tm = load_torch_model()
        except ImportError:
            print(f"minispatial bench: error: --torch needs PyTorch ({TORCH_INSTALL})", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(2)
    res = {"machine": machine_line(), "load_before": os.getloadavg()[0],
           "config": "paper model: D 128, H 4, Dh 32, 1 layer, float32",
           "sgemm_gflops": sgemm_gflops(), "rows": []}
    if tm is not None:
        import torch

        res["machine"] += f", PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"
        res["parity"] = parity(tm)
    fast, ref = step.choose("fast"), step.choose("reference")
    for B in batches:
        batch = make_batch(cfg, B)
        Tt = batch[1].shape[1]
        fast_step = minispatial_step(cfg, fast.name)
        steps = {fast.backend: fast_step}
        inputs = {fast_step: batch}
        if tm is not None:
            torch_step = tm.make_trainer(model.init_params(cfg, 0), cfg, threads=2)
            steps["torch"] = torch_step
            inputs[torch_step] = tm.as_tensors(*batch)
        t = time_steps(steps, inputs, args.repeat)
        ref_step = minispatial_step(cfg, ref.name)
        t.update(time_steps({ref.backend: ref_step}, {ref_step: batch}, args.numpy_repeat, rounds=1, warmup=1))
        nf, ff = naive_flops(cfg, B, Tt), fast_flops(cfg, batch[1], batch[2])
        for name, backend in [(fast.name, fast.backend), (ref.name, ref.backend)] + \
                ([("torch", "torch")] if tm is not None else []):
            s = t[backend]
            is_fast = name == fast.name
            row = {"batch": B, "backend": backend, "step": name, "ms_per_step": 1e3 * s, "samples_per_s": B / s,
                   "naive_gflop": nf / 1e9, "fast_gflop": ff / 1e9,
                   "gflops_naive": nf / s / 1e9,
                   "gflops_fast": (ff / s / 1e9) if is_fast else None,
                   "frac_sgemm_fast": (ff / s / 1e9 / res["sgemm_gflops"]) if is_fast else None,
                   "frac_sgemm_naive": nf / s / 1e9 / res["sgemm_gflops"]}
            if tm is not None:
                row["speedup_vs_torch"] = t["torch"] / s
            res["rows"].append(row)
        prods = step_products(cfg, batch[1], batch[2])
        alone = products_alone(prods, repeat=max(20, min(200, 20000 // B)))
        res.setdefault("floor", []).append(
            {"batch": B, "gflop": sum(2 * n * m * k * p for _, n, m, k, p in prods) / 1e9,
             "ms_half_sgemm": 2 * ff / 1e9 / res["sgemm_gflops"] * 1e3,
             "ms_products_alone": 1e3 * alone, "frac_sgemm_products_alone": ff / alone / 1e9 / res["sgemm_gflops"]})
    if args.profile:
        res["profile_batch"] = batches[-1]
        res["profile"] = [{"op": op, "function": fn, "ms_per_step": ms}
                          for op, fn, ms in profile(batches[-1]) if ms >= 0.001]
    if args.extras:
        res["extras"] = extras()

    res["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_report(res)
    return 0


def print_report(res: dict) -> None:
    print(res["machine"])
    print(f"1-minute load average {res['load_before']:.2f} before, {res['load_after']:.2f} after "
          f"(other processes share the 2 cores; timings are only comparable within one run)")
    print(res["config"] + f"; sgemm (2048^2 float32 NumPy matmul): {res['sgemm_gflops']:.1f} GFLOP/s")
    print()
    has_torch = any("speedup_vs_torch" in r for r in res["rows"])
    header = ["B", "backend", "ms/step", "samples/s", "GFLOP/s", "%sgemm", "GFLOP/s", "%sgemm"]
    widths = [5, 8, 9, 10, 8, 7, 8, 7]
    rows = []
    for r in res["rows"]:
        fast = ([f"{r['gflops_fast']:.1f}", f"{100 * r['frac_sgemm_fast']:.1f}%"] if r["gflops_fast"] is not None
                else ["-", "-"])
        rows.append([r["batch"], r["backend"], f"{r['ms_per_step']:.2f}", f"{r['samples_per_s']:.0f}", *fast,
                     f"{r['gflops_naive']:.1f}", f"{100 * r['frac_sgemm_naive']:.1f}%"]
                    + ([f"{r['speedup_vs_torch']:.2f}x"] if has_torch else []))
    if has_torch:
        header, widths = header + ["torch/this"], widths + [10]
    print(f"{'':>25}{'':>10} {'-- fast count --':>16} {'-- naive count --':>17}")
    print(format_table(header, rows, min_width=widths, sep=" ", rule=False))
    B0 = {r["batch"]: (r["naive_gflop"], r["fast_gflop"]) for r in res["rows"]}
    print("\nFLOP per step (GFLOP, naive / fast): " + ", ".join(f"B {b}: {n:.3f} / {f:.3f}" for b, (n, f) in B0.items()))
    if res.get("floor"):
        print("\nthe fast count's products alone (NumPy matmuls on contiguous operands, nothing else between"
              "\nthem; minispatial/fast/products.py) against the step time that half of sgemm allows:")
        for f in res["floor"]:
            print(f"  B {f['batch']:>4}: {f['gflop']:.4f} GFLOP; half of sgemm allows {f['ms_half_sgemm']:.3f} ms; "
                  f"the products alone take {f['ms_products_alone']:.3f} ms "
                  f"({100 * f['frac_sgemm_products_alone']:.1f}% of sgemm)")
    if "parity" in res:
        for dt, p in res["parity"].items():
            print(f"parity PyTorch vs minispatial ({dt}, B 64): loss rel diff {p['loss_rel_diff']:.2e}, "
                  f"max grad rel diff {p['grad_max_rel_diff']:.2e} ({p['worst_tensor']}) -> "
                  f"{'PASS' if p['pass'] else 'FAIL'} (<= 1e-4)")
    if "profile" in res:
        print(f"\nprofile of one fast step, B {res['profile_batch']} (self time, ms/step):")
        total = sum(r["ms_per_step"] for r in res["profile"])
        by_fn: dict[str, float] = {}
        for r in res["profile"]:
            by_fn[r["function"]] = by_fn.get(r["function"], 0.0) + r["ms_per_step"]
        print(f"  by function (traced total {total:.2f} ms/step; both towers together):")
        for fn, ms in sorted(by_fn.items(), key=lambda kv: -kv[1]):
            print(f"  {ms:7.3f}  {100 * ms / total:5.1f}%  {fn}")
        print("  by source line (lines under 0.05 ms not shown):")
        for r in res["profile"]:
            if r["ms_per_step"] < 0.05:
                break
            print(f"  {r['ms_per_step']:7.3f}  {r['op']}")
    if "extras" in res:
        e = res["extras"]
        print()
        for name, label in (("cold_start_no_cache", "train --steps 1, empty numba cache"),
                            ("cold_start_with_cache", "train --steps 1, warm numba cache"),
                            ("default_train", "default minispatial train")):
            print(f"{label:<38} {e[name]['wall_s']:7.2f} s wall, peak RSS {e[name]['peak_rss_mb']:6.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
