"""Layout draws of the testbed without materialising every (label pair, layout) combination.

The layouts of the label pair (a, b) are a random permutation of its C = C(image_len, 2) position
pairs: argsort of C uniform draws taken at block (a-1) n_labels + (b-1) of the testbed's random
stream. The testbed uses only the first few (training) and the last few (evaluation) entries of
each permutation, and only for the pairs it uses, so `layout_draws` skips the other pairs in the
stream and sorts only what it needs; the result is exactly what argsort of every block gave.
"""

from __future__ import annotations

import numpy as np


def layout_positions(layouts: np.ndarray, image_len: int) -> tuple[np.ndarray, np.ndarray]:
    """layouts [...] (numbers in np.triu_indices(image_len, k=1) order) -> pixels i [...], j [...], i < j.

    Decoded arithmetically (no [C] table): the layouts of left pixel i start at
    start[i] = i (L - 1) - i (i - 1) / 2."""
    L = image_len
    start = np.concatenate([[0], np.cumsum(np.arange(L - 1, 0, -1))]).astype(np.int64)  # [L]
    i = np.searchsorted(start, layouts, side="right") - 1
    return i, layouts - start[i] + i + 1


# Layout permutations of up to ROW_WISE_MIN - 1 layouts are drawn and argsorted in blocks of
# consecutive label pairs of at most BLOCK_ELEMS draws (as fast as one argsort of everything);
# longer ones one pair at a time, selecting only the used prefix and tail (`head_and_tail`).
# Both give exactly the permutation entries the materialised argsort gave (tested).
BLOCK_ELEMS = 1 << 20
ROW_WISE_MIN = 4096


def head_and_tail(row: np.ndarray, k_head: int, k_tail: int) -> tuple[np.ndarray, np.ndarray]:
    """row [C] -> (argsort(row)[:k_head], argsort(row)[C - k_tail:]), without sorting the whole row.

    argpartition picks the k_head smallest and k_tail largest values, each selection is sorted.
    Distinct values have a single sorted order, so this equals argsort's; where a selected value
    is tied (within the selection or with one left out), the order among equals is argsort's own
    choice, and argsort of the whole row is taken instead."""
    C = len(row)
    if k_head + k_tail >= C:
        full = np.argsort(row)
        return full[:k_head], full[C - k_tail:]
    if k_head == 0 and k_tail == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    kth = ([k_head - 1] if k_head else []) + ([C - k_tail] if k_tail else [])
    part = np.argpartition(row, kth)
    head, tail = part[:k_head], part[C - k_tail:]
    head, tail = head[np.argsort(row[head])], tail[np.argsort(row[tail])]
    hv, tv = row[head], row[tail]
    tied = bool(np.any(hv[1:] == hv[:-1]) or np.any(tv[1:] == tv[:-1])
                or (k_head and np.count_nonzero(row <= hv[-1]) != k_head)
                or (k_tail and np.count_nonzero(row >= tv[0]) != k_tail))
    if tied:
        full = np.argsort(row)
        return full[:k_head], full[C - k_tail:]
    return head.astype(np.int64), tail.astype(np.int64)


def skip_draws(rng: np.random.Generator, n: int) -> None:
    # as if n uniform doubles were drawn: Generator.random takes one 64-bit output per double
    if n > 0:
        rng.bit_generator.advance(n)


def layout_draws(
    rng: np.random.Generator, n_labels: int, C: int, rows: np.ndarray, k_head: int, k_tail: int
) -> tuple[np.ndarray, np.ndarray]:
    """rows [R] increasing pair numbers (a-1) n_labels + (b-1) -> heads int64 [R, k_head], tails
    int64 [R, k_tail]: the first k_head and the last k_tail entries of each pair's layout permutation.

    The permutation of pair (a, b) is argsort of the C uniform draws at block (a-1) n_labels + (b-1)
    of `rng`'s stream (labels 1..n_labels; module docstring). Pairs not wanted are skipped over
    in the stream; the generator is left somewhere after the last wanted block."""
    R = len(rows)
    heads = np.empty((R, k_head), dtype=np.int64)
    tails = np.empty((R, k_tail), dtype=np.int64)
    at = 0                                   # the stream position, in blocks of C draws
    if C < ROW_WISE_MIN:
        per = max(1, BLOCK_ELEMS // C)
        i = 0
        while i < R:
            first = int(rows[i])
            n = int(np.searchsorted(rows, first + per)) - i           # wanted rows in this block
            last = int(rows[i + n - 1])
            skip_draws(rng, (first - at) * C)
            perm = np.argsort(rng.random((last - first + 1, C)), axis=1)   # [rows, C]
            at = last + 1
            sel = rows[i:i + n] - first
            heads[i:i + n] = perm[sel, :k_head]
            tails[i:i + n] = perm[sel, C - k_tail:]
            i += n
    else:
        for i, r in enumerate(rows.tolist()):
            skip_draws(rng, (r - at) * C)
            heads[i], tails[i] = head_and_tail(rng.random(C), k_head, k_tail)
            at = r + 1
    return heads, tails
