"""Inputs that used to end in a traceback, a MemoryError or a late failure, and the checks that
now refuse them up front (exit 2, one line naming the field or path, no traceback).

1. memory: sizes whose testbed or model would not fit are refused with an estimate and the limit;
   the testbed only builds the layouts it uses (and stays bit-identical to the recorded ones);
2. MINISPATIAL_BACKEND, no longer read (the step is the --step flag): refused whatever its value;
   MINISPATIAL_MEMORY_LIMIT with a value that is not allowed (the limit itself: test_memory.py);
3. output paths of `minispatial analyze` (and `bench --extras`' temporary directory) checked
   before the work; a stdout whose reader went away (`| head -1`) ends quietly with 141;
4. `minispatial gradcheck --quick` is quick and still covers every op and parameter name.
"""

import hashlib
import os
import subprocess
import sys
import tracemalloc
from math import comb
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minispatial.analysis import cli as an
from minispatial.analysis import measure as an_measure
from minispatial import cli, data, layouts, model
from minispatial.tools import bench
from minispatial import gradcheck as gc
from minispatial.data import SPLIT_NAMES, TestbedConfig, make_testbed
from minispatial.model import ModelConfig

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args, env_extra=None, timeout=120):
    """`python -m minispatial ARGS` in a subprocess -> CompletedProcess (text)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "minispatial", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(err: str, cmd: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(f"minispatial {cmd}: error: "), err
    return lines[0]


# =============================================================================== 1. memory
# ------------------------------------------------------------------ the testbed is unchanged

def digest_of(tb) -> str:
    """First 16 hex digits of a sha256 over every array and caption of every split."""
    h = hashlib.sha256()
    for name in SPLIT_NAMES:
        s = tb.splits[name]
        for a in ("images", "labels", "positions", "tokens", "eot", "scene_key", "form"):
            arr = np.ascontiguousarray(getattr(s, a))
            h.update(f"{name}.{a} {arr.dtype} {arr.shape}".encode())
            h.update(arr.tobytes())
        h.update("\n".join(s.captions).encode())
    return h.hexdigest()[:16]


# recorded with the materialising make_testbed (every (pair, layout) permutation built) before
# it was changed to draw only the layouts it uses: the testbeds must stay bit-identical
RECORDED_DIGESTS = [
    ({}, "28f88a75d84e0892"),
    ({"n_pair": 5, "caption_mode": "left+right", "unseen_mode": "one", "seed": 3}, "cfa4b127f42012f9"),
    ({"image_len": 40, "n_layout": 700, "n_eval_layout": 90, "n_labels": 9, "n_heldout": 3, "n_pair": 6,
      "seed": 11}, "4ea83ef285a3ee61"),
]


@pytest.mark.parametrize("kw, digest", RECORDED_DIGESTS)
def test_testbed_is_bit_identical_to_the_recorded_one(kw, digest):
    assert digest_of(make_testbed(TestbedConfig(**kw))) == digest


def materialised_layout_perm(cfg):
    """The previous make_testbed's draws: every label pair's whole layout permutation at once.
    -> (pos_perm [n_labels, L], layout_perm [n_labels+1, n_labels+1, C])."""
    L, n, C = cfg.image_len, cfg.n_labels, comb(cfg.image_len, 2)
    rng = np.random.default_rng(cfg.seed)
    pos_perm = np.argsort(rng.random((n, L)), axis=1)
    layout_perm = np.zeros((n + 1, n + 1, C), dtype=np.int64)
    layout_perm[1:, 1:] = np.argsort(rng.random((n, n, C)), axis=2)
    return pos_perm, layout_perm


def reference_pair_examples(cfg, split):
    """The two-object (labels, positions) a split must hold, from the materialised draws."""
    C = comb(cfg.image_len, 2)
    _, perm = materialised_layout_perm(cfg)
    i, j = np.triu_indices(cfg.image_len, k=1)
    pairs = data._ordered_pairs(cfg.pair_labels, cfg.pair_labels)
    if split == "train":
        lo, hi = 0, cfg.n_layout
    elif split == "val_seen_pair":
        lo, hi = C - min(cfg.n_eval_layout, C - cfg.n_layout), C
    else:
        pairs, lo, hi = data._unseen_pairs(cfg), C - min(cfg.n_eval_layout, C), C
    lay = perm[pairs[:, 0], pairs[:, 1], lo:hi]
    return np.repeat(pairs, lay.shape[1], axis=0), np.stack([i[lay.ravel()], j[lay.ravel()]], 1)


@st.composite
def small_configs(draw):
    unseen_mode = draw(st.sampled_from(["both", "one"]))
    image_len = draw(st.integers(2, 14))
    n_labels = draw(st.integers(4, 9))
    n_heldout = draw(st.integers(2, n_labels - 2))
    C = comb(image_len, 2)
    return TestbedConfig(image_len=image_len, n_labels=n_labels, n_heldout=n_heldout,
                         n_pair=draw(st.integers(2, n_labels - n_heldout)), n_layout=draw(st.integers(1, C)),
                         n_single_layout=draw(st.integers(1, image_len)),
                         n_eval_layout=draw(st.integers(1, C + 2)), unseen_mode=unseen_mode,
                         caption_mode=draw(st.sampled_from(["left", "left+right"])),
                         seed=draw(st.integers(0, 2**32)))


DRAW_MODES = {"blocks": {}, "one pair per block": {"BLOCK_ELEMS": 1},
              "pair by pair (argpartition)": {"ROW_WISE_MIN": 1}}


@pytest.mark.parametrize("mode", DRAW_MODES)
@settings(max_examples=25, deadline=None)
@given(cfg=small_configs())
def test_layouts_are_those_of_the_materialised_permutation(cfg, mode):
    # every way of drawing (blocks of whole permutations; one pair at a time with argpartition)
    # gives exactly the layouts the materialised permutation gave
    saved = {k: getattr(layouts, k) for k in DRAW_MODES[mode]}
    for k, v in DRAW_MODES[mode].items():
        setattr(layouts, k, v)
    try:
        tb = make_testbed(cfg)
    finally:
        for k, v in saved.items():
            setattr(layouts, k, v)
    for split in ("train", "val_seen_pair", "val_unseen_pair"):
        s = tb.splits[split]
        labels, positions = reference_pair_examples(cfg, split)
        forms = 2 if (split == "train" and cfg.caption_mode == "left+right") else 1
        n = len(labels)
        for f in range(forms):
            got = slice(len(s) - forms * n + f * n, len(s) - forms * n + (f + 1) * n)
            assert np.array_equal(s.labels[got], labels) and np.array_equal(s.positions[got], positions)


def test_head_and_tail_of_a_row_equal_argsort_even_with_ties():
    rng = np.random.default_rng(0)
    for C in (5, 50, 3000):
        for row in (rng.random(C), np.round(rng.random(C), 1), np.zeros(C), rng.integers(0, 3, C) / 4):
            full = np.argsort(row)
            for k_head, k_tail in ((1, 1), (3, 0), (0, 4), (C // 3, C // 5), (C, 0), (0, C)):
                head, tail = layouts.head_and_tail(row, k_head, k_tail)
                assert np.array_equal(head, full[:k_head]), (C, k_head)
                assert np.array_equal(tail, full[C - k_tail:]), (C, k_tail)


def test_testbed_builds_only_the_layouts_it_uses():
    # image_len 300: C = 44850 layouts; every (pair, layout) of 20 labels was 3 arrays of
    # 400 x 44850 (~430 MB); one layout per pair needs a few MB
    cfg = TestbedConfig(image_len=300, n_layout=1, n_eval_layout=1, n_single_layout=290)
    tracemalloc.start()
    try:
        make_testbed(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 60e6, peak
    assert data.estimate_testbed_bytes(cfg) < 100e6


@pytest.mark.parametrize("kw", [
    {},
    {"image_len": 400, "n_single_layout": 1},
    {"image_len": 60, "n_layout": 300, "caption_mode": "left+right"},
    {"n_labels": 300, "n_heldout": 150, "n_pair": 30, "unseen_mode": "one"},
])
def test_testbed_estimate_covers_the_measured_peak(kw):
    cfg = TestbedConfig(**kw)
    tracemalloc.start()
    try:
        make_testbed(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    est = data.estimate_testbed_bytes(cfg)
    assert peak <= est <= 4 * peak + 20e6, (peak, est)


# ------------------------------------------------------------------ refused up front

@pytest.mark.parametrize("kw, field", [
    ({"image_len": 10**6}, "image_len=1000000"),
    ({"image_len": 3000, "n_single_layout": 1}, "image_len=3000"),
    ({"n_labels": 10**7}, "n_labels=10000000"),
    ({"image_len": 5000, "n_layout": 10**7}, "image_len=5000, n_layout=10000000"),
    ({"image_len": 300, "n_eval_layout": 40000}, "image_len=300, n_eval_layout=40000"),
])
def test_testbed_too_large_for_memory_is_refused(kw, field, monkeypatch):
    # the message names the size fields above their defaults, the estimate and the limit
    monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", "1G")
    with pytest.raises(ValueError) as e:
        TestbedConfig(**kw)
    msg = str(e.value)
    assert msg.startswith(f"TestbedConfig.{field} is too large: the testbed (") and "estimated" in msg
    assert "limit of 1.0 GiB (set by MINISPATIAL_MEMORY_LIMIT)" in msg


def test_testbed_limit_names_every_size_field_when_none_is_above_its_default(monkeypatch):
    monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", "1K")
    with pytest.raises(ValueError, match=r"^TestbedConfig.image_len=10, n_labels=20, .* is too large"):
        TestbedConfig()


def test_data_command_refuses_a_huge_image_len_in_one_line():
    r = run_cli(["data", "--image_len", "100000"])
    assert r.returncode == 2 and r.stdout == ""
    line = one_line_error(r.stderr, "data")
    assert "image_len=100000" in line and "estimated" in line and "limit" in line


@pytest.mark.parametrize("kw, field", [
    ({"d_model": 10**6}, "d_model=1000000"),
    ({"vision_layers": 10**6}, "vision_layers=1000000"),
    ({"text_layers": 10**6}, "text_layers=1000000"),
    ({"n_heads": 10**6}, "n_heads=1000000"),
    ({"mlp": True, "d_mlp": 10**8}, "d_mlp=100000000"),
    ({"vision_ctx": 10**5}, "vision_ctx=100000"),
])
def test_model_too_large_for_memory_is_refused(kw, field, monkeypatch):
    monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", "4G")
    with pytest.raises(ValueError) as e:
        ModelConfig(**kw)
    msg = str(e.value)
    assert msg.startswith(f"ModelConfig.{field} is too large") and "estimated" in msg
    assert "limit of 4.0 GiB" in msg


@pytest.mark.parametrize("opts", [{}, {"layernorm": True}, {"mlp": True}, {"layernorm": True, "mlp": True,
                                   "proj_dim": 7, "text_layers": 3, "vision_layers": 2, "n_heads": 3}])
def test_n_params_formula_counts_param_shapes(opts):
    cfg = ModelConfig(**opts)
    assert model.n_params(cfg) == sum(int(np.prod(s)) for s in model.param_shapes(cfg).values())


def test_model_estimate_grows_as_documented():
    base = ModelConfig()
    est = model.estimate_model_bytes
    assert est(base, 256) > est(base, 128) > est(base, 1) > 0
    # the parameters: 7 copies (params and their flat copy, gradients and theirs, 2 AdamW moments,...)
    n_params = sum(int(np.prod(s)) for s in model.param_shapes(base).values())
    assert est(base, 1) >= 7 * 4 * n_params
    # attention scores: batch x heads x ctx^2 dominate at a long context
    long = ModelConfig(vision_ctx=2001)
    assert est(long, 128) > 128 * 4 * 2001 ** 2 * 4
    assert est(ModelConfig(vision_layers=4), 128) > est(base, 128)
    assert est(ModelConfig(dtype="float64"), 128) > est(base, 128)


@pytest.mark.parametrize("opts", [{}, {"layernorm": True, "mlp": True, "proj_dim": 8, "text_layers": 2}])
def test_model_estimate_covers_the_measured_peak_of_a_step(opts):
    # (the reference step: NumPy allocations are what tracemalloc sees)
    from minispatial.optim import AdamW
    cfg = ModelConfig(dtype="float64", vision_ctx=41, **opts)
    params = model.init_params(cfg, 0)
    images, tokens, eot = gc.model_batch(cfg, 96, np.random.default_rng(0))
    model.loss_and_grads(params, images, tokens, eot, cfg)               # warm: lazy imports
    tracemalloc.start()
    try:
        opt = AdamW(params, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.0)   # its flat copy
        _, grads = model.loss_and_grads(opt.params, images, tokens, eot, cfg)
        opt.step(grads, 1e-3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n_params = sum(p.nbytes for p in params.values())
    est = model.estimate_model_bytes(cfg, 96)
    assert peak + n_params <= est <= 4 * (peak + n_params), (peak, est)


def test_run_memory_check_names_the_batch_or_the_sizes(monkeypatch):
    monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", "1G")
    d = TestbedConfig(n_labels=120, n_pair=110, n_layout=1)            # 12110 distinct scenes
    m = ModelConfig(vision_vocab=121, text_vocab=130)
    model.check_run_memory(d, m, 128)
    with pytest.raises(ValueError, match=r"^TrainConfig.batch_size=8000 is too large: .*estimated.*"
                                         r"limit of 1.0 GiB"):
        model.check_run_memory(d, m, 8000)                              # the [B, B] logits
    # evaluation encodes 1024 images at a time: a long context is too large whatever the batch
    d, m = TestbedConfig(image_len=200), ModelConfig(vision_ctx=201)
    with pytest.raises(ValueError, match=r"^ModelConfig.vision_ctx=201 with TestbedConfig.image_len=200 "
                                         r"is too large"):
        model.check_run_memory(d, m, 2)
    # the batch is capped at the distinct training scenes: 20 singles + 15 * 14 pairs
    assert data.n_train_scenes(TestbedConfig()) == 230
    assert model.estimate_run_bytes(TestbedConfig(), ModelConfig(), 10**6) == \
        model.estimate_run_bytes(TestbedConfig(), ModelConfig(), 230)


def test_bench_refuses_a_huge_batch_before_timing_anything(monkeypatch, capsys):
    monkeypatch.setattr(bench, "sgemm_gflops", lambda *a, **k: pytest.fail("timed before refusing"))
    assert bench.main(["--batch", "64,100000000"]) == 2
    line = one_line_error(capsys.readouterr().err, "bench")
    assert "--batch 100000000" in line and "estimated" in line and "limit" in line


# =============================================================================== 2. backend

@pytest.mark.parametrize("args", [["train", "--preset", "tiny", "--out", "{tmp}/run"], ["data"],
                                  ["eval", "{tmp}/run"], ["gradcheck", "--quick"], ["bench"],
                                  ["analyze", "{tmp}/run"], ["sweep", "--grid", "n_pair=5", "--out", "{tmp}/s"]])
@pytest.mark.parametrize("value", ["bogus", "numba", "numpy"])
def test_minispatial_backend_is_a_one_line_error_for_every_command(args, value, tmp_path):
    # no longer read: any value (the old valid ones too) is refused, pointing to --step
    args = [a.format(tmp=tmp_path) for a in args]
    r = run_cli(args, {"MINISPATIAL_BACKEND": value})
    assert r.returncode == 2 and r.stdout == ""
    line = one_line_error(r.stderr, args[0])
    assert f"MINISPATIAL_BACKEND={value!r} is no longer read" in line
    assert "--step fast" in line and "--step reference" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


def test_minispatial_backend_in_process_through_cli_main(monkeypatch, capsys):
    monkeypatch.setenv("MINISPATIAL_BACKEND", "bogus")
    assert cli.main(["data"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "MINISPATIAL_BACKEND='bogus'" in one_line_error(captured.err, "data")


def test_the_library_ignores_minispatial_backend():
    # only the commands refuse it; importing and running the library is unaffected
    code = ("import numpy as np\n"
            "from minispatial import model, ops, step, train\n"
            "cfg = model.ModelConfig(d_model=8, n_heads=2, d_head=4, dtype='float64')\n"
            "p = model.init_params(cfg, 0)\n"
            "images = np.zeros((2, cfg.vision_ctx - 1), dtype=np.int64)\n"
            "tokens = np.zeros((2, cfg.text_ctx), dtype=np.int64)\n"
            "loss, _ = step.choose('reference').loss_and_grads(p, images, tokens, np.array([0, 1]), cfg)\n"
            "print('ok', np.isfinite(loss))\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MINISPATIAL_BACKEND": "bogus"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok True"


def test_bogus_memory_limit_is_a_one_line_error():
    r = run_cli(["data"], {"MINISPATIAL_MEMORY_LIMIT": "lots"})
    assert r.returncode == 2
    assert "MINISPATIAL_MEMORY_LIMIT='lots'" in one_line_error(r.stderr, "data")


# =============================================================================== 3. output paths

@pytest.fixture(scope="module")
def faults_checkpoint(tmp_path_factory):
    """A tiny untrained run directory holding a checkpoint."""
    from minispatial.checkpoint import save_checkpoint
    from minispatial.config import make_config

    run = make_config({"image_len": 6, "n_labels": 8, "n_heldout": 3, "n_pair": 5, "n_layout": 5,
                       "n_single_layout": 3, "n_eval_layout": 4, "d_model": 16, "n_heads": 2,
                       "d_head": 8}, preset="tiny")
    d = tmp_path_factory.mktemp("faults_run")
    params = model.init_params(run.model, 0)
    zeros = {n: np.zeros_like(p) for n, p in params.items()}       # AdamW's moments before a step
    save_checkpoint(d / "checkpoint.npz", run, params, {"t": 0, "m": zeros, "v": zeros}, 0)
    return d


@pytest.fixture
def no_analysis(monkeypatch):
    """Fail the test if the (slow) analysis starts."""
    monkeypatch.setattr(an_measure, "analyze", lambda *a, **k: pytest.fail("the analysis ran before the path check"))


def bad_paths(tmp_path):
    """-> {kind: (path for --out FILE, path for --plots DIR)} that cannot be written."""
    regular = tmp_path / "regular"
    regular.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    return {
        "beneath a regular file": (regular / "a.json", regular / "plots"),
        "deep beneath a regular file": (regular / "x" / "a.json", regular / "x" / "plots"),
        "a directory / a regular file": (folder, regular),
    }


@pytest.mark.parametrize("kind", ["beneath a regular file", "deep beneath a regular file",
                                  "a directory / a regular file"])
@pytest.mark.parametrize("option", ["--out", "--plots"])
def test_analyze_checks_output_paths_before_the_work(kind, option, faults_checkpoint, tmp_path,
                                                      no_analysis, capsys):
    out_path, plots_path = bad_paths(tmp_path)[kind]
    path = out_path if option == "--out" else plots_path
    assert an.main([str(faults_checkpoint), option, str(path)]) == 2
    line = one_line_error(capsys.readouterr().err, "analyze")
    assert f"{option} {path}" in line


def test_analyze_output_path_checks_in_a_subprocess(faults_checkpoint, tmp_path):
    regular = tmp_path / "regular"
    regular.write_text("x")
    r = run_cli(["analyze", str(faults_checkpoint), "--plots", str(regular)])
    assert r.returncode == 2 and str(regular) in one_line_error(r.stderr, "analyze")
    r = run_cli(["analyze", str(faults_checkpoint), "--out", str(tmp_path)])
    assert r.returncode == 2 and str(tmp_path) in one_line_error(r.stderr, "analyze")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root ignores permission bits, not a read-only mount); skip if not allowed."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_analyze_refuses_a_read_only_directory(read_only_dir, faults_checkpoint, no_analysis, capsys):
    for option, path in (("--out", read_only_dir / "a.json"), ("--plots", read_only_dir / "plots"),
                         ("--plots", read_only_dir)):
        assert an.main([str(faults_checkpoint), option, str(path)]) == 2
        line = one_line_error(capsys.readouterr().err, "analyze")
        assert f"{option} {path}" in line and "not writable" in line


def test_analyze_still_writes_to_good_paths_it_has_to_create(faults_checkpoint, tmp_path, capsys):
    out, plots = tmp_path / "new" / "deeper" / "a.json", tmp_path / "more" / "plots"
    assert an.main([str(faults_checkpoint), "--n-images", "8", "--ablate", "EP", "--out", str(out),
                    "--plots", str(plots)]) == 0
    assert out.is_file()
    capsys.readouterr()


def test_check_output_helpers(tmp_path):
    regular = tmp_path / "f"
    regular.write_text("x")
    cli.check_output_file(tmp_path / "a" / "b.json", "--out")       # creatable
    cli.check_output_file(regular, "--out")                          # overwritable
    cli.check_output_dir(tmp_path / "a" / "b", "--plots")
    cli.check_output_dir(tmp_path, "--plots")
    with pytest.raises(ValueError, match=r"--out .* is a directory"):
        cli.check_output_file(tmp_path, "--out")
    with pytest.raises(ValueError, match=r"--plots .* is not a directory"):
        cli.check_output_dir(regular, "--plots")
    with pytest.raises(ValueError, match=r"is not a directory"):
        cli.check_output_dir(regular / "sub", "--plots")
    assert not (tmp_path / "a").exists()                            # nothing was created


# (only a command that prints far more than a pipe buffer, 64 KB: a shorter output may be written
# in full before the reader closes, and the command rightly exits 0)
@pytest.mark.parametrize("args", [["data", "--image_len", "12", "--show", "30000"]])
def test_output_into_a_closed_pipe_is_not_a_traceback(args):
    # `minispatial data ... | head -1`: the reader goes away; exit quietly as SIGPIPE would (141)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "minispatial", *args], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == "", err


def test_bench_extras_without_a_temporary_directory_is_refused_up_front(monkeypatch, capsys):
    def no_tmp():
        raise FileNotFoundError("No usable temporary directory found in ['/tmp']")
    monkeypatch.setattr(bench.tempfile, "gettempdir", no_tmp)
    monkeypatch.setattr(bench, "sgemm_gflops", lambda *a, **k: pytest.fail("timed before the check"))
    assert bench.main(["--extras", "--batch", "8"]) == 2
    assert "No usable temporary directory" in one_line_error(capsys.readouterr().err, "bench")


# =============================================================================== 4. gradcheck --quick

def full_check_parameter_names() -> set[str]:
    return {n for cfg, _ in gc.model_configs(quick=False).values() for n in model.param_shapes(cfg)}


def test_quick_gradcheck_covers_every_op_and_parameter_name_with_far_fewer_evaluations(monkeypatch, capsys):
    calls = {"n": 0}
    real = model.loss_only

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(model, "loss_only", counting)
    assert gc.main(["--quick"]) == 0
    quick_calls = calls["n"]
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.endswith(("PASS", "FAIL"))]
    assert lines and all(ln.endswith("PASS") for ln in lines)
    for case in gc.op_cases(np.random.default_rng(0), gc.QUICK_SIZES):
        for name in case.inputs:
            assert any(f" {case.op} " in ln and f" {name} " in ln for ln in lines), (case.op, name)
    for name in full_check_parameter_names():
        assert any(" model (" in ln and f" {name} " in ln for ln in lines), name
    assert "skipped" in out and "model (paper size)" in out
    # the full check's loss evaluations for both steps (reference, fast): 4 per element of a
    # tensor checked element by element, 4 per direction of the others
    full_calls = 2 * sum(4 * int(np.prod(s)) if np.prod(s) <= full_max else 4 * gc.N_DIRS
                                         for cfg, full_max in gc.model_configs(quick=False).values()
                                         for s in model.param_shapes(cfg).values())
    assert quick_calls * 10 < full_calls, (quick_calls, full_calls)
