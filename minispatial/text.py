"""Word-level tokenizer and caption templates of the 1D testbed (docs/paper.md §2).

The vocabulary is fixed and tiny, so every id can be read off by hand:

    0 PAD     1 EOT     2..9 the eight words of WORDS     10..9+n_labels the labels "1".."n_labels"

A caption is its words, then EOT, then PAD up to `TEXT_LEN`. The text encoder reads the output at
the EOT index (CLIP's pooling), so `encode_batch` returns that index next to the tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD = 0
EOT = 1
WORDS = ("is", "in", "the", "image", "on", "left", "right", "of")
FIRST_WORD_ID = 2
FIRST_LABEL_ID = FIRST_WORD_ID + len(WORDS)  # = 10: label k has id 9 + k
TEXT_LEN = 8  # longest caption "{a} is on the left of {b}" is 7 words, plus EOT

_WORD_IDS = {w: FIRST_WORD_ID + i for i, w in enumerate(WORDS)}
_INT_RE = re.compile(r"[+-]?\d+")


def single_caption(a: int) -> str:
    """Caption of a one-object scene holding label `a`."""
    return f"{a} is in the image"


def left_caption(a: int, b: int) -> str:
    """Left form of the scene where `a` is left of `b`."""
    return f"{a} is on the left of {b}"


def right_caption(a: int, b: int) -> str:
    """Right form of the same scene (`a` left of `b`): it names `b` first."""
    return f"{b} is on the right of {a}"


@dataclass(frozen=True)
class Tokenizer:
    """Fixed word vocabulary plus the label tokens "1".."n_labels"."""

    n_labels: int

    def __post_init__(self) -> None:
        n = self.n_labels
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"Tokenizer.n_labels={n!r} is invalid: must be an int >= 1")
        object.__setattr__(self, "n_labels", int(n))

    @property
    def vocab_size(self) -> int:
        """PAD, EOT, the 8 words and the n_labels labels."""
        return FIRST_LABEL_ID + self.n_labels

    def token_id(self, word: str) -> int:
        """Id of one word or label; ValueError naming the word and what is allowed otherwise."""
        if word in _WORD_IDS:
            return _WORD_IDS[word]
        if _INT_RE.fullmatch(word):
            k = int(word)
            if word == str(k) and 1 <= k <= self.n_labels:
                return FIRST_LABEL_ID + k - 1
            raise ValueError(
                f"label {word!r} is out of range: labels are written 1..{self.n_labels} "
                f"(no sign, no leading zero)"
            )
        raise ValueError(
            f"unknown word {word!r}: allowed words are {', '.join(WORDS)} and the labels 1..{self.n_labels}"
        )

    def token_str(self, i: int) -> str:
        """Readable form of id `i`: '<pad>', '<eot>', a word or a label."""
        i = int(i)
        if i == PAD:
            return "<pad>"
        if i == EOT:
            return "<eot>"
        if FIRST_WORD_ID <= i < FIRST_LABEL_ID:
            return WORDS[i - FIRST_WORD_ID]
        if FIRST_LABEL_ID <= i < self.vocab_size:
            return str(i - FIRST_LABEL_ID + 1)
        raise ValueError(f"token id {i} is out of range: ids are 0..{self.vocab_size - 1}")

    def encode(self, caption: str) -> list[int]:
        """Caption -> its word ids followed by EOT (words split on whitespace)."""
        return [self.token_id(w) for w in caption.split()] + [EOT]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> caption: reads up to the first EOT (or the end), dropping trailing PAD.

        Exact inverse of `encode` for captions whose words are separated by single spaces.
        """
        words: list[str] = []
        n_pad = 0
        for i in np.asarray(ids, dtype=np.int64).reshape(-1):
            if i == EOT:
                break
            if i == PAD:
                n_pad += 1
                continue
            if n_pad:
                raise ValueError(f"PAD inside a caption before {self.token_str(i)!r}: ids {list(ids)}")
            words.append(self.token_str(i))
        return " ".join(words)

    def encode_batch(self, captions: Sequence[str], length: int = TEXT_LEN) -> tuple[np.ndarray, np.ndarray]:
        """[N] captions -> tokens int64 [N, length] (PAD-filled), eot int64 [N] (index of EOT)."""
        tokens = np.full((len(captions), length), PAD, dtype=np.int64)
        eot = np.zeros(len(captions), dtype=np.int64)
        for n, caption in enumerate(captions):
            ids = self.encode(caption)
            if len(ids) > length:
                raise ValueError(
                    f"caption {caption!r} needs {len(ids)} tokens with EOT but length={length}"
                )
            tokens[n, : len(ids)] = ids
            eot[n] = len(ids) - 1
        return tokens, eot

    def decode_batch(self, tokens: np.ndarray) -> list[str]:
        """tokens [N, T] -> N captions."""
        return [self.decode(row) for row in np.asarray(tokens)]
