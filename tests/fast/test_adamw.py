"""adamw.py: the numba AdamW is bitwise optim.adamw_update (the NumPy reference, same signature);
the numba gradient norm is optim.global_norm summed in another order."""

import numpy as np
import pytest

from minispatial import optim
from minispatial.fast import adamw
from minispatial.model import ModelConfig, init_params


def random_run(update, dtype, weight_decay, steps=4):
    # AdamW over the paper model's parameters with `update`, random gradients spanning 8 decades
    opt = optim.AdamW(init_params(ModelConfig(dtype=dtype), 0), beta1=0.9, beta2=0.98, eps=1e-6,
                      weight_decay=weight_decay, update=update)
    rng = np.random.default_rng(1)
    norms = []
    for t in range(steps):
        opt.decayed = np.array([optim.decayed(n, bool(t % 2)) for n in opt.names])  # both embedding rules
        grads = {n: (rng.standard_normal(p.shape) * 10.0 ** rng.integers(-6, 2)).astype(p.dtype)
                 for n, p in opt.params.items()}
        norms.append((optim.global_norm(grads), adamw.global_norm(grads)))
        opt.step(grads, 1e-3 * (t + 1))
    return opt, norms


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_kernel_is_bitwise_the_numpy_code(dtype, weight_decay):
    # same operations in the same order, each rounded to the dtype: identical bits, every tensor
    # (the 0-d logit scale included), first and second moments included
    ref, _ = random_run(optim.adamw_update, dtype, weight_decay)
    got, _ = random_run(adamw.adamw_update, dtype, weight_decay)
    assert ref.t == got.t == 4
    for a, b in ((got.flat_p, ref.flat_p), (got.flat_m, ref.flat_m), (got.flat_v, ref.flat_v)):
        assert a.dtype == b.dtype == np.dtype(dtype) and np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_update_called_directly_on_segments(dtype):
    # uneven segments with their own decays (one of them 1.0), extreme moments and gradients
    rng = np.random.default_rng(0)
    N = 301
    ends, decays = np.array([1, 100, 101, 301]), np.array([0.999, 1.0, 0.5, 0.9])
    p, g, m, v = (rng.standard_normal(N).astype(dtype) * s for s in (1.0, 1e3, 1e-3, 1.0))
    v = np.abs(v)
    args = (ends, decays, 0.9, 0.999, 1e-8, 3e-4, 0.3)
    want = [a.copy() for a in (p, g, m, v)]
    optim.adamw_update(*want, *args)
    adamw.adamw_update(p, g, m, v, *args)
    for a, b in zip((p, g, m, v), want):
        assert a.dtype == dtype and np.array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_global_norm_agrees_with_numpy(dtype):
    # the kernel sums in float64 in another order than NumPy's pairwise sum
    _, norms = random_run(optim.adamw_update, dtype, 0.0, steps=2)
    for want, got in norms:
        assert got == pytest.approx(want, rel=1e-12) and want > 0


def test_sum_squares_handles_every_length():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000):
        x = rng.standard_normal(n).astype(np.float32)
        assert adamw.sum_squares(x) == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=1e-12, abs=0)
    assert adamw.sum_squares(np.float32(3.0)) == 9.0               # a 0-d gradient (the logit scale)


def test_adamw_update_rejects_mismatched_arrays_and_bad_layouts():
    p = np.zeros(5, dtype=np.float32)
    ends, decays, consts = np.array([2, 5]), np.ones(2), (0.9, 0.99, 1e-8, 1e-3, 1.0)
    with pytest.raises(ValueError, match="does not match the parameters"):
        adamw.adamw_update(p, np.zeros(4, np.float32), p.copy(), p.copy(), ends, decays, *consts)
    with pytest.raises(ValueError, match="does not match the parameters"):
        adamw.adamw_update(p, np.zeros(5, np.float64), p.copy(), p.copy(), ends, decays, *consts)
    with pytest.raises(ValueError, match="C-contiguous"):
        adamw.adamw_update(np.zeros(10, np.float32)[::2], p, p.copy(), p.copy(), ends, decays, *consts)
    with pytest.raises(ValueError, match="ends\\[-1\\] = len\\(p\\)"):
        adamw.adamw_update(p, p.copy(), p.copy(), p.copy(), np.array([2, 4]), decays, *consts)
    with pytest.raises(ValueError, match="of one length"):
        adamw.adamw_update(p, p.copy(), p.copy(), p.copy(), ends, np.ones(3), *consts)
