"""Tokenizer and caption templates: ids, round trips, and rejection of anything outside the vocabulary."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minispatial.text import (
    EOT,
    PAD,
    TEXT_LEN,
    WORDS,
    Tokenizer,
    left_caption,
    right_caption,
    single_caption,
)

FAST = settings(max_examples=40, deadline=None)


@st.composite
def captions(draw):
    """(n_labels, caption) with every template and labels anywhere in 1..n_labels."""
    n = draw(st.integers(2, 40))
    a, b = draw(st.lists(st.integers(1, n), min_size=2, max_size=2, unique=True))
    make = draw(st.sampled_from([lambda: single_caption(a), lambda: left_caption(a, b), lambda: right_caption(a, b)]))
    return n, make()


def test_templates_are_exact():
    assert single_caption(3) == "3 is in the image"
    assert left_caption(3, 7) == "3 is on the left of 7"
    assert right_caption(3, 7) == "7 is on the right of 3"


def test_ids_and_vocab_size():
    tok = Tokenizer(20)
    assert (PAD, EOT) == (0, 1)
    assert WORDS == ("is", "in", "the", "image", "on", "left", "right", "of")
    assert [tok.token_id(w) for w in WORDS] == list(range(2, 10))
    assert [tok.token_id(str(k)) for k in range(1, 21)] == list(range(10, 30))
    assert tok.vocab_size == 30
    assert [tok.token_str(i) for i in range(tok.vocab_size)] == ["<pad>", "<eot>", *WORDS, *map(str, range(1, 21))]
    with pytest.raises(ValueError, match="30"):
        tok.token_str(30)


def test_encode_example():
    tok = Tokenizer(20)
    assert tok.encode("3 is on the left of 7") == [12, 2, 6, 4, 7, 9, 16, EOT]
    assert len(tok.encode(left_caption(20, 19))) == TEXT_LEN  # the longest caption fills TEXT_LEN exactly


@FAST
@given(captions())
def test_round_trip(nc):
    n, caption = nc
    tok = Tokenizer(n)
    ids = tok.encode(caption)
    assert ids[-1] == EOT and EOT not in ids[:-1] and PAD not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == caption
    assert tok.decode(ids + [PAD] * 3) == caption


@FAST
@given(st.lists(captions(), min_size=0, max_size=6))
def test_encode_batch(items):
    tok = Tokenizer(40)
    caps = [c for _, c in items]
    tokens, eot = tok.encode_batch(caps)
    assert tokens.shape == (len(caps), TEXT_LEN) and tokens.dtype == np.int64
    assert eot.shape == (len(caps),) and eot.dtype == np.int64
    for row, e, c in zip(tokens, eot, caps):
        assert row[e] == EOT and (row[e + 1 :] == PAD).all() and (row[:e] > EOT).all()
        assert e == len(c.split())
        assert tok.decode(row) == c
    assert tok.decode_batch(tokens) == caps


@pytest.mark.parametrize("word", ["0", "21", "-3", "01", "+4", "1000"])
def test_labels_out_of_range_rejected(word):
    with pytest.raises(ValueError, match=rf"'{word.replace('+', '[+]')}'.*1\.\.20"):
        Tokenizer(20).encode(f"{word} is in the image")


@pytest.mark.parametrize("word", ["banana", "Left", "left,", "a", "<eot>"])
def test_unknown_words_rejected(word):
    with pytest.raises(ValueError) as e:
        Tokenizer(20).encode(f"3 is on the {word} of 7")
    assert repr(word) in str(e.value) and "is, in, the, image" in str(e.value)


def test_too_long_rejected():
    tok = Tokenizer(20)
    with pytest.raises(ValueError, match="length=8"):
        tok.encode_batch(["3 is on the left of 7 is"])
    with pytest.raises(ValueError, match="length=5"):
        tok.encode_batch([left_caption(1, 2)], length=5)
    tokens, eot = tok.encode_batch([single_caption(1)], length=6)  # 5 words + EOT fits exactly
    assert eot.tolist() == [5]


def test_decode_rejects_bad_ids():
    tok = Tokenizer(5)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([2, 15, EOT])
    with pytest.raises(ValueError, match="PAD inside"):
        tok.decode([10, PAD, 2, EOT])
    assert tok.decode([10, 2, EOT, 11, 11]) == "1 is"  # stops at EOT


@pytest.mark.parametrize("n", [0, -1, True, 2.0, "5"])
def test_bad_n_labels(n):
    with pytest.raises(ValueError, match="n_labels"):
        Tokenizer(n)
