"""minispatial/step.py: `choose` names the two implementations of the training step, refuses any
other name, and both are Steps with the same fields (what the trainer and evaluation call)."""

import pytest

from minispatial import model, ops, optim
from minispatial.step import REFERENCE, STEPS, Step, choose

FIELDS = ("name", "backend", "loss_and_grads", "adamw_update", "global_norm", "encoders", "attention_core")


def test_step_names():
    assert STEPS == ("fast", "reference")
    assert Step._fields == FIELDS
    assert choose("reference") is REFERENCE
    assert choose("fast").name == "fast"
    assert choose() is choose("fast")                      # the default: the fast step


@pytest.mark.parametrize("bad", ["numba", "numpy", "Fast", "", None])
def test_an_unknown_step_is_refused(bad):
    with pytest.raises(ValueError, match=rf"step={bad!r} is not allowed: must be one of \('fast', 'reference'\)"):
        choose(bad)


def test_the_reference_step_is_the_plain_numpy_code():
    assert REFERENCE == Step("reference", "numpy", model.loss_and_grads, optim.adamw_update,
                             optim.global_norm, (model.encode_images, model.encode_texts), ops.NUMPY_CORE)
    assert isinstance(REFERENCE.attention_core, ops.AttentionCore)
    assert REFERENCE.attention_core.forward is ops.attention_core_forward
    assert REFERENCE.attention_core.backward is ops.attention_core_backward


def test_the_fast_step_has_the_same_fields():
    fast = choose("fast")
    assert isinstance(fast, Step) and type(fast) is type(REFERENCE)
    assert fast.name == "fast" and fast.backend == "numba"    # summary.json's "backend"
    for f in ("loss_and_grads", "adamw_update", "global_norm"):
        assert callable(getattr(fast, f)), f
    assert len(fast.encoders) == 2 and all(callable(e) for e in fast.encoders)
    assert isinstance(fast.attention_core, ops.AttentionCore)
    assert callable(fast.attention_core.forward) and callable(fast.attention_core.backward)
    assert fast.attention_core != ops.NUMPY_CORE                # its own (numba) core


def test_the_mainline_imports_fast_only_in_choose():
    # plan: nothing under minispatial/ outside fast/ imports fast/, except step.choose (lazily)
    import subprocess
    import sys

    code = ("import sys; import minispatial.step, minispatial.train, minispatial.evaluate, "
            "minispatial.gradcheck, minispatial.model, minispatial.optim, minispatial.ops; "
            "print('minispatial.fast' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
