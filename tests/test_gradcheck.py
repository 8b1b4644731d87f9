"""The gradient checker passes on the real code and, just as important, can fail."""

import math

import numpy as np
import pytest

from minispatial import gradcheck as gc
from minispatial import model, ops, step

STEPS = ("reference", "fast")


def test_quick_run_passes_for_both_steps(capsys):
    assert gc.main(["--quick"]) == 0                 # default: --step both
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.endswith(("PASS", "FAIL"))]
    assert lines and all(ln.endswith("PASS") for ln in lines)
    assert {ln.split()[0] for ln in lines} == set(STEPS)
    for name in STEPS:
        assert f"# step {name}: " in out
        for op in ("embedding", "pos_embedding", "prepend_cls", "linear", "linear (no bias)",
                   "attention (causal)", "attention (bidirectional)", "pool", "layernorm",
                   "gelu", "mlp", "l2norm", "clip_loss", "softmax", "model (paper)", "model (ln+mlp+proj)"):
            assert any(ln.startswith(name) and f" {op} " in ln for ln in lines), (name, op)
    # every parameter of the attention op and of the model, the logit scale included
    for name in ops.ATTN_PARAMS:
        assert any("attention (causal)" in ln and f" {name} " in ln for ln in lines), name
    assert any("model (paper)" in ln and " logit_scale " in ln for ln in lines)
    assert any(" directional " in ln for ln in lines)


def _scaled(fn, factor=1.01):
    """fn with every array it returns (also inside tuples and dicts) multiplied by factor."""
    def scale(x):
        if isinstance(x, np.ndarray):
            return x * factor
        if isinstance(x, tuple):
            return tuple(scale(a) for a in x)
        if isinstance(x, dict):
            return {k: scale(a) for k, a in x.items()}
        return x
    return lambda *a, **kw: scale(fn(*a, **kw))


def test_wrong_linear_backward_fails(monkeypatch, capsys):
    monkeypatch.setattr(ops, "linear_backward", _scaled(ops.linear_backward))
    assert gc.main(["--quick", "--step", "reference", "--only", "linear", "--no_model"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    fails = [ln for ln in out.splitlines() if ln.endswith("FAIL")]
    assert any(" linear " in ln and " W " in ln for ln in fails)


def test_wrong_fast_attention_core_backward_fails_only_for_the_fast_step(monkeypatch, capsys):
    from minispatial import step

    fast_step = step.choose("fast")
    core = fast_step.attention_core

    def wrong_backward(dz, q, k, v, pattern):
        dq, dk, dv = core.backward(dz, q, k, v, pattern)
        return 1.01 * dq, dk, dv

    wrong = fast_step._replace(attention_core=ops.AttentionCore(core.forward, wrong_backward))
    monkeypatch.setattr(step, "fast_step", lambda: wrong)
    assert gc.main(["--quick", "--only", "attention (causal)", "--no_model"]) == 1
    fails = [ln for ln in capsys.readouterr().out.splitlines() if ln.endswith("FAIL")]
    assert fails and all(ln.startswith("fast") for ln in fails)
    assert any(" W_Q " in ln for ln in fails)     # dq reaches W_Q, b_Q and x


def test_wrong_model_gradient_fails(monkeypatch):
    monkeypatch.setattr(ops, "attention_backward", _scaled(ops.attention_backward, 1.001))
    results = gc.check_model(B=3)                         # the reference step
    failed = {r.tensor for r in results if not r.passed}
    assert "text.blocks.0.attn.W_Q" in failed and "vision.blocks.0.attn.W_V" in failed
    assert "logit_scale" not in failed


def test_missing_model_gradient_fails(monkeypatch):
    real = model.loss_and_grads

    def drop_one(*a, **kw):
        loss, grads = real(*a, **kw)
        grads.pop("vision.W_pos")
        return loss, grads

    monkeypatch.setattr(step, "REFERENCE", step.REFERENCE._replace(loss_and_grads=drop_one))
    results = {r.tensor: r for r in gc.check_model(B=2, step="reference")}
    assert not results["vision.W_pos"].passed and math.isnan(results["vision.W_pos"].err)
    assert results["text.W_pos"].passed


# --------------------------------------------------------------------------------------------
# the primitives

def test_rel_error_floor():
    # a true zero against round-off noise passes; a 1e-6-relative mistake on a normal element
    # (>= the floor) does not pass with room to spare; NaN fails
    assert gc.rel_error(0.0, 1e-11) <= gc.REL_TOL / 10
    assert gc.rel_error(1e-17, -3e-11) <= gc.REL_TOL
    assert gc.rel_error(2.0, 2.0 * (1 + 3e-6)) > gc.REL_TOL
    assert gc.rel_error(gc.FLOOR, gc.FLOOR * (1 + 3e-6)) > gc.REL_TOL
    assert not gc.Result("op", "t", (), "full", float("nan")).passed


@pytest.mark.parametrize("order", [2, 4])
def test_numeric_grad_of_a_known_function(order):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    x0 = x.copy()

    def f(t):
        return float(np.sum(np.sin(t) * t ** 2))

    want = np.cos(x) * x ** 2 + 2 * x * np.sin(x)
    got = gc.numeric_grad(f, x, order=order)
    assert gc.rel_error(want, got).max() <= gc.REL_TOL
    assert np.array_equal(x, x0)                                        # x left untouched
    with pytest.raises(ValueError, match="order"):
        gc.numeric_grad(f, x, order=3)


def test_numeric_grad_of_0d_array():
    got = gc.numeric_grad(lambda t: float(np.exp(t)), np.array(0.5))
    assert got.shape == () and abs(got - math.exp(0.5)) < 1e-10


def test_directional_check_passes_right_and_fails_wrong_gradients():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 30))
    A = rng.standard_normal((30, 30))

    def f(t):
        return float(np.sum(np.tanh(t @ A)))

    right = (1 - np.tanh(x @ A) ** 2) @ A.T
    assert gc.directional_check(f, x, right, rng) <= gc.REL_TOL
    assert gc.directional_check(f, x, right * 1.001, rng) > gc.REL_TOL
    wrong = right.copy()
    wrong[3] = 0.0                                          # one row missing
    assert gc.directional_check(f, x, wrong, rng) > gc.REL_TOL
    method, err = gc.check_tensor(f, x, right, rng, full_max=100)
    assert method == "directional" and err <= gc.REL_TOL


def test_check_tensor_rejects_a_gradient_of_the_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        gc.check_tensor(lambda t: 0.0, np.zeros(3), np.zeros(4), np.random.default_rng(0))


def test_cli_dispatch_and_only_matching_nothing(capsys):
    from minispatial import cli

    assert cli.main(["gradcheck", "--quick", "--step", "reference", "--only", "gelu", "--no_model"]) == 0
    out = capsys.readouterr().out
    assert "gelu" in out and "# step reference: " in out and "# step fast" not in out
    assert gc.main(["--step", "reference", "--only", "no-such-op", "--no-model"]) == 1   # (old spelling)


def test_results_name_their_step():
    for name in STEPS:
        results = gc.run_all(quick=True, only=["gelu", "attention (causal)"], with_models=False, step=name)
        assert results and {r.step for r in results} == {name}
        assert {r.op for r in results} == {"gelu", "attention (causal)"}
        assert gc.format_table(results).splitlines()[0].split()[0] == "step"


def test_wrong_shaped_op_gradient_is_a_fail_not_a_crash(monkeypatch, capsys):
    real = ops.prepend_cls_backward
    monkeypatch.setattr(ops, "prepend_cls_backward", lambda dout, cache: (real(dout, cache)[0], dout[:, 0]))
    assert gc.main(["--quick", "--step", "reference", "--only", "prepend_cls", "--no_model"]) == 1
    fails = [ln for ln in capsys.readouterr().out.splitlines() if ln.endswith("FAIL")]
    assert len(fails) == 1 and " cls " in fails[0] and "shape [2, 5]" in fails[0]
