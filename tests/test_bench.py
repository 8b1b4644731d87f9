"""The benchmark's bookkeeping (FLOP counts, report, JSON, errors), never its timings: performance
is measured by `minispatial bench` (benchmarks/README.md), not by tests."""

import dataclasses
import json

import numpy as np
import pytest

from minispatial import bench, model

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
    # vision: V' = 4 (with CLS), T = 3, VT = 7, H*VT = 14, one query (U = 1)
    #   forward: tables (K, V) 2*7*4*8 + (O) 2*2*7*2*4 = 672, query 2*1*4*4 = 32,
    #            scores 2*2*1*7*2 = 56, C @ O 2*2*15*4 = 240                          -> 1000
    #   backward: dC 2*2*14*4 = 224, dO 240, dW_O + dVtab 2*224 = 448, dq + dKtab 112,
    #             dW_Q + dX_u 64, dW_kv + dAP 2*448 = 896                              -> 1984
    # text: V' = 5, T = 3, VT = 8, H*VT = 16, queries (EOT, 1), (EOT, 2): U = 2
    #   forward: tables 512 + 256 = 768, query 64, scores 2*2*2*8*2 = 128, C @ O 2*2*18*4 = 288 -> 1248
    #   backward: dC 256, dO 288, 512, 256, 128, 1024                                 -> 2464
    # logits: 6 * B^2 * E = 96
    assert bench.fast_flops(TINY, TOKENS, EOT) == 1000 + 1984 + 1248 + 2464 + 96


def test_fast_count_of_the_paper_model_is_below_the_naive_one():
    cfg = model.ModelConfig()
    for B in (64, 512):
        images, tokens, eot = bench.make_batch(cfg, B)
        fast, naive = bench.fast_flops(cfg, tokens, eot), bench.naive_flops(cfg, B, tokens.shape[1])
        assert 0 < fast < naive / 8
    # the logits dominate the fast count at B 512: 6 * 512^2 * 128 of 0.34 GFLOP
    assert 6 * 512 ** 2 * 128 / fast > 0.5


def test_bench_json_runs_and_reports_every_row(capsys):
    rc = bench.main(["--batch", "8", "--repeat", "1", "--numpy-repeat", "1", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sgemm_gflops"] > 0
    rows = {(r["batch"], r["backend"]): r for r in res["rows"]}
    assert set(rows) == {(8, "numba"), (8, "numpy")}
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["samples_per_s"] == pytest.approx(8 / (r["ms_per_step"] / 1e3))
        _, tokens, eot = bench.make_batch(model.ModelConfig(), 8)
        assert r["fast_gflop"] == pytest.approx(bench.fast_flops(model.ModelConfig(), tokens, eot) / 1e9)
    assert rows[(8, "numba")]["frac_sgemm_fast"] > 0 and rows[(8, "numpy")]["frac_sgemm_fast"] is None


def test_bench_text_report_and_profile(capsys):
    rc = bench.main(["--batch", "8", "--repeat", "1", "--numpy-repeat", "1", "--profile"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "sgemm" in out and "ms/step" in out and "FLOP per step" in out
    assert "by function" in out and "fast.tower_forward_fast" in out and "optim.adamw_step" in out


def test_profile_charges_the_fast_path_and_the_optimizer():
    rows = bench.profile(8, repeat=2)
    functions = {fn for _, fn, _ in rows}
    assert {"fastloss.clip_loss_fast", "fast.tower_backward_fast", "optim.adamw_step"} <= functions
    assert all(ms >= 0 for _, _, ms in rows)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)


@pytest.mark.parametrize("args", [["--batch", "0"], ["--batch", "x"], ["--repeat", "0"]])
def test_bench_rejects_bad_arguments(args, capsys):
    assert bench.main(args) == 2
    assert "error" in capsys.readouterr().err


def test_parity_with_pytorch_when_installed():
    # optional: the benchmark's comparison model (benchmarks/torch_model.py) and the fast path
    pytest.importorskip("torch")
    tm = bench.load_torch_model()
    res = bench.parity(tm)
    for dtype in ("float32", "float64"):
        assert res[dtype]["pass"], res[dtype]
