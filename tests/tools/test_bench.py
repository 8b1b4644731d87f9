"""The benchmark's bookkeeping (FLOP counts, report, JSON, errors), never its timings: performance
is measured by `minispatial bench` (benchmarks/README.md), not by tests (minispatial/tools/bench.py;
its fast count is minispatial/fast/products.py)."""

import dataclasses
import json

import numpy as np
import pytest

from minispatial import model
from minispatial.fast import products
from minispatial.tools import bench

TINY = dataclasses.replace(model.ModelConfig(), d_model=4, n_heads=2, d_head=2, vision_vocab=3,
                           text_vocab=5, vision_ctx=3, text_ctx=3)
TOKENS = np.array([[2, 1, 0], [3, 4, 1]])        # EOT (id 1) at positions 1 and 2
EOT = np.array([1, 2])


def test_naive_flops_by_hand():
    # per tower (T = 3, B = 2, D = 4, H = 2, Dh = 2, HD = 4):
    #   Q, K, V 2*2*3*4*12 = 576; scores + pattern @ V 4*2*2*9*2 = 288; W_O 2*2*3*4*4 = 192 -> 1056
    # logits 2*B^2*E = 32; forward 2*1056 + 32 = 2144; step = 3 x forward
    assert bench.naive_flops(TINY, 2, 3) == 3 * 2144


def test_fast_flops_by_hand():
    # D = 4, H = 2, Dh = 2, HD = 4, B = 2, E = 4; each product [m, k] x [k, p] is 2 m k p FLOPs
    # vision: V' = 4 (with CLS), T = 3, VT = 7, H*VT = 14, one query (U = 1), H*U = 2
    #   forward: q 2*1*4*4 = 32, Qt 2*2*4*2*1 = 32, [Vtab | S^T] 2*7*4*6 = 336,
    #            O 2*2*7*2*4 = 224, C @ O 2*2*15*4 = 240                               -> 864
    #   backward: dC 2*2*4*14 = 224, dO 240, dW_O 224, dVtab 224, dW_V 224, dQt 2*2*7*4 = 112,
    #             dq 32, dW_K 32, dW_Q 32, dX_u 32, dAP^T 2*4*6*7 = 336                  -> 1712
    # text: V' = 5, T = 3, VT = 8, H*VT = 16, queries (EOT, 1), (EOT, 2): U = 2, H*U = 4
    #   forward: q 64, Qt 64, [Vtab | S^T] 2*8*4*8 = 512, O 256, C @ O 2*2*18*4 = 288    -> 1184
    #   backward: dC 256, dO 288, dW_O 256, dVtab 256, dW_V 256, dQt 2*4*8*4 = 256,
    #             dq 64, dW_K 64, dW_Q 64, dX_u 64, dAP^T 2*4*8*8 = 512                 -> 2336
    # logits: 6 * B^2 * E = 96
    assert bench.fast_flops(TINY, TOKENS, EOT) == 864 + 1712 + 1184 + 2336 + 96


def test_step_products_are_the_fast_count():
    prods = bench.step_products(TINY, TOKENS, EOT)
    assert sum(2 * n * m * k * p for _, n, m, k, p in prods) == bench.fast_flops(TINY, TOKENS, EOT)
    cfg = model.ModelConfig()
    for B in (8, 64, 512):
        _, tokens, eot = bench.make_batch(cfg, B)
        prods = bench.step_products(cfg, tokens, eot)
        assert sum(2 * n * m * k * p for _, n, m, k, p in prods) == bench.fast_flops(cfg, tokens, eot)
    two = dataclasses.replace(TINY, text_layers=2)               # dense layer + the pooled last layer
    prods = bench.step_products(two, TOKENS, EOT)
    assert sum(2 * n * m * k * p for _, n, m, k, p in prods) == bench.fast_flops(two, TOKENS, EOT)
    assert bench.fast_flops(two, TOKENS, EOT) > bench.fast_flops(TINY, TOKENS, EOT)
    with pytest.raises(ValueError, match="LayerNorm"):
        bench.step_products(dataclasses.replace(TINY, layernorm=True), TOKENS, EOT)
    assert bench.step_products is products.step_products and bench.fast_flops is products.fast_flops
    assert bench.products_alone(prods[:3], repeat=2) > 0


def test_fast_count_of_the_paper_model_is_below_the_naive_one():
    cfg = model.ModelConfig()
    for B in (64, 512):
        images, tokens, eot = bench.make_batch(cfg, B)
        fast, naive = bench.fast_flops(cfg, tokens, eot), bench.naive_flops(cfg, B, tokens.shape[1])
        assert 0 < fast < naive / 8
    # the logits dominate the fast count at B 512: 6 * 512^2 * 128 of 0.33 GFLOP
    assert 6 * 512 ** 2 * 128 / fast > 0.5


def test_bench_json_runs_and_reports_every_row(capsys):
    rc = bench.main(["--batch", "8", "--repeat", "1", "--numpy_repeat", "1", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sgemm_gflops"] > 0
    rows = {(r["batch"], r["backend"]): r for r in res["rows"]}
    assert set(rows) == {(8, "numba"), (8, "numpy")}
    assert (rows[(8, "numba")]["step"], rows[(8, "numpy")]["step"]) == ("fast", "reference")
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["samples_per_s"] == pytest.approx(8 / (r["ms_per_step"] / 1e3))
        _, tokens, eot = bench.make_batch(model.ModelConfig(), 8)
        assert r["fast_gflop"] == pytest.approx(bench.fast_flops(model.ModelConfig(), tokens, eot) / 1e9)
    assert rows[(8, "numba")]["frac_sgemm_fast"] > 0 and rows[(8, "numpy")]["frac_sgemm_fast"] is None
    (floor,) = res["floor"]
    assert floor["batch"] == 8 and floor["gflop"] == pytest.approx(rows[(8, "numba")]["fast_gflop"])
    assert floor["ms_products_alone"] > 0 and floor["ms_half_sgemm"] > 0


def test_bench_text_report_and_profile(capsys):
    rc = bench.main(["--batch", "8", "--repeat", "1", "--numpy-repeat", "1", "--profile"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "sgemm" in out and "ms/step" in out and "FLOP per step" in out and "products alone" in out
    assert "by function" in out and "fast.one_layer.forward" in out and "optim.AdamW.step" in out


def test_profile_charges_the_fast_path_and_the_optimizer():
    rows = bench.profile(8, repeat=2)
    functions = {fn for _, fn, _ in rows}
    assert {"fast.loss.clip_loss", "fast.one_layer.backward", "fast.adamw.adamw_update",
            "optim.AdamW.step"} <= functions
    assert all(op.startswith(("ops.py:", "model.py:", "optim.py:", "fast/")) for op, _, _ in rows)
    assert all(ms >= 0 for _, _, ms in rows)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)


@pytest.mark.parametrize("args", [["--batch", "0"], ["--batch", "x"], ["--repeat", "0"]])
def test_bench_rejects_bad_arguments(args, capsys):
    assert bench.main(args) == 2
    assert "error" in capsys.readouterr().err


def test_torch_is_imported_only_for_torch(monkeypatch, capsys):
    import subprocess
    import sys

    # importing the benchmark (and the whole package) does not import torch
    code = ("import sys, minispatial.tools.bench, minispatial.tools.sweep.cli, minispatial.cli; "
            "assert 'torch' not in sys.modules and 'minispatial.tools.torch_model' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    # without PyTorch, --torch is a one-line error naming how to install it
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        bench.load_torch_model()
    assert bench.main(["--batch", "8", "--torch"]) == 2
    assert "--torch needs PyTorch (pip install torch" in capsys.readouterr().err


def test_parity_with_pytorch_when_installed():
    # optional: the benchmark's comparison model (minispatial/tools/torch_model.py) and the fast path
    pytest.importorskip("torch")
    tm = bench.load_torch_model()
    res = bench.parity(tm)
    for dtype in ("float32", "float64"):
        assert res[dtype]["pass"], res[dtype]
