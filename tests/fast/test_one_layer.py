"""one_layer.py (rewrites 2 + 3) and its kernels, piece by piece: the table softmax and its
underflow fallback, the scores through the query, the keys' backward, the distinct queries."""

import numpy as np
import pytest

from minispatial import model
from minispatial.fast import kernels, one_layer, reference, step


def direct_softmax_and_bins(S, qi, r, n_keys, Dh):
    # the pattern and C of table_attention_forward, the slow way: each score, a masked softmax
    H, U, VT = S.shape
    B, T = r.shape
    Vp = VT - T
    pattern = np.zeros((B, H, T))
    C = np.zeros((B, H * VT + U))
    for b in range(B):
        n = n_keys[b]
        for h in range(H):
            s = np.array([S[h, qi[b], r[b, j]] + S[h, qi[b], Vp + j] for j in range(n)], dtype=np.float64)
            s = s / np.sqrt(Dh)
            p = np.exp(s - s.max())
            pattern[b, h, :n] = p / p.sum()
            for j in range(n):
                C[b, h * VT + r[b, j]] += pattern[b, h, j]
                C[b, h * VT + Vp + j] = pattern[b, h, j]
        C[b, H * VT + qi[b]] = 1.0
    return pattern, C


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_table_attention_forward_and_its_underflow_fallback(dtype):
    # exp(score - shift) is a product of two exp tables; a row whose products underflow (here: a
    # token row no sample uses scores 1e4 above the rest, so the token table's max is far above
    # every key's) must be recomputed with its own max, or it would come out 0 / 0
    rng = np.random.default_rng(5)
    H, U, Vp, T, B, Dh = 2, 3, 6, 5, 9, 4
    S = rng.standard_normal((H, U, Vp + T)).astype(dtype)
    qi = rng.integers(0, U, B)
    r = rng.integers(0, Vp - 1, (B, T))                 # row Vp - 1 is never used
    n_keys = rng.integers(1, T + 1, B)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for boost in (0.0, 1e4):
        S[:, :, Vp - 1] = boost
        pattern, C = one_layer.table_attention_forward(S, qi, r, n_keys, Dh)
        want_p, want_C = direct_softmax_and_bins(S.astype(np.float64), qi, r, n_keys, Dh)
        assert pattern.dtype == C.dtype == np.dtype(dtype)
        assert np.abs(pattern - want_p).max() <= tol and np.abs(C - want_C).max() <= tol

    # with the fallback off (safe = 0): the products of the exp tables alone give the unboosted
    # case (so a threshold that always fell back would not hide a wrong product path), and get
    # the boosted case wrong (so the loop above did exercise the fallback)
    def products_only():
        ES = np.empty_like(S)
        scale = S.dtype.type(1 / np.sqrt(Dh))
        kernels.exp_tables_kernel(S, Vp, scale, ES)
        pattern = np.empty((B, H, T), dtype=dtype)
        kernels.table_pattern_kernel(ES, S, qi, r, n_keys, scale, S.dtype.type(0), pattern, np.empty_like(C))
        return pattern
    assert not np.allclose(products_only(), want_p, atol=tol)
    S[:, :, Vp - 1] = 0.0
    want_p = direct_softmax_and_bins(S.astype(np.float64), qi, r, n_keys, Dh)[0]
    assert np.abs(products_only() - want_p).max() <= tol


def test_table_attention_backward_is_the_reference_softmax_backward():
    # dS from dC: the kernel against reference.table_backward's einsum lines on random inputs
    rng = np.random.default_rng(3)
    H, U, Vp, T, B, Dh = 2, 3, 5, 4, 8, 4
    S = rng.standard_normal((H, U, Vp + T))
    qi, r, n_keys = rng.integers(0, U, B), rng.integers(0, Vp, (B, T)), rng.integers(1, T + 1, B)
    pattern, _ = one_layer.table_attention_forward(S, qi, r, n_keys, Dh)
    dC = rng.standard_normal((B, H * (Vp + T)))
    got = one_layer.table_attention_backward(dC, pattern, qi, r, n_keys, U, Dh)
    R, Qb, dCh = reference.one_hot(r, Vp, S.dtype), reference.one_hot(qi, U, S.dtype), dC.reshape(B, H, -1)
    ds = reference.softmax_backward(np.einsum("bhv,bjv->bhj", dCh[:, :, :Vp], R) + dCh[:, :, Vp:], pattern, Dh)
    want = np.concatenate([np.einsum("bhj,bjv,bu->huv", ds, R, Qb), np.einsum("bhj,bu->huj", ds, Qb)], axis=2)
    assert np.abs(got - want).max() <= 1e-13 * np.abs(want).max()


def test_table_scores_are_the_models_attention_scores(fast_helpers):
    # S[h, qi[b], r[b, j]] + S[h, qi[b], V' + j] (keys through the query, with b_K's share) is the
    # pooled row's score of key j, as the reference computes it (its hook_attn_scores are scaled
    # by 1/sqrt(Dh)); b_K drawn non-zero, as it cancels in the softmax
    cfg = fast_helpers.small_config(vision_vocab=5, text_vocab=6, vision_ctx=4, text_ctx=5)
    params = model.init_params(cfg, 1)
    rng = np.random.default_rng(1)
    for n in ("vision", "text"):
        params[f"{n}.blocks.0.attn.b_K"] = rng.standard_normal(params[f"{n}.blocks.0.attn.b_K"].shape)
    images, tokens, eot = fast_helpers.batch(cfg, 7)
    record = {}
    zeros = np.zeros(7, dtype=np.int64)
    model.tower_forward(params, "vision", images, zeros, cfg, None, record)
    model.tower_forward(params, "text", tokens, eot, cfg, None, record)
    for tower, ids, pool in (("vision", images, zeros), ("text", tokens, eot)):
        tables = step.input_tables(params, tower, ids, pool, model.embed_scale(cfg))
        _, saved = one_layer.forward(params, f"{tower}.blocks.0", tables)
        S, qi, r, n_keys = saved["S"], saved["qi"], tables.r, tables.n_keys
        Vp = S.shape[2] - r.shape[1]
        want = record[f"{tower}.blocks.0.attn.hook_attn_scores"] * np.sqrt(cfg.d_head)   # [B, H, Tq, Tk]
        scale = np.abs(want[np.isfinite(want)]).max()
        for b in range(7):
            n = n_keys[b]
            got = S[:, qi[b], r[b, :n]] + S[:, qi[b], Vp + np.arange(n)]                 # [H, n]
            assert np.abs(got - want[b, :, pool[b], :n]).max() <= 1e-12 * scale, (tower, b)


def test_keys_backward_kernel_by_einsum():
    # dW_K, db_K and dq from dQt and dbk_q (the gradients of Qt = W_K q and bk_q = b_K . q), with a
    # random dbk_q: in the step it is ~0 (the softmax cancels bk_q), which the model tests cannot see
    rng = np.random.default_rng(2)
    H, U, D, Dh = 3, 2, 8, 4
    dQt, dbk_q = rng.standard_normal((H, U, D)), rng.standard_normal((H, U))
    q, b_K, W_K = rng.standard_normal((U, H * Dh)), rng.standard_normal((H, Dh)), rng.standard_normal((H, D, Dh))
    dq0 = np.einsum("hud,hde->uhe", dQt, W_K).reshape(U, H * Dh)       # what the caller puts in dq
    dq, dW_K, db_K = dq0.copy(), np.empty((H, D, Dh)), np.empty((H, Dh))
    kernels.keys_backward_kernel(dQt, dbk_q, q, b_K, dW_K, db_K, dq)
    qh = q.reshape(U, H, Dh)
    assert np.allclose(dW_K, np.einsum("hud,uhe->hde", dQt, qh), rtol=1e-12, atol=1e-12)
    assert np.allclose(db_K, np.einsum("hu,uhe->he", dbk_q, qh), rtol=1e-12, atol=1e-12)
    assert np.allclose(dq, dq0 + np.einsum("hu,he->uhe", dbk_q, b_K).reshape(U, H * Dh), rtol=1e-12, atol=1e-12)


def test_distinct_pairs():
    rows = np.array([3, 1, 3, 0, 1, 3])
    pos = np.array([2, 0, 2, 5, 4, 2])
    r_u, p_u, inv = kernels.distinct_pairs(rows, pos, 6)
    # pairs in increasing order of row * T + pos: (0, 5), (1, 0), (1, 4), (3, 2)
    assert r_u.tolist() == [0, 1, 1, 3] and p_u.tolist() == [5, 0, 4, 2]
    assert inv.tolist() == [3, 1, 3, 0, 2, 3]
    assert np.array_equal(r_u[inv], rows) and np.array_equal(p_u[inv], pos)
    # the reference's np.unique gives the same order
    assert all(np.array_equal(a, b) for a, b in zip(reference.distinct_queries(rows, pos), (r_u, p_u, inv)))
