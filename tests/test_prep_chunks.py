"""data_prep.tokenizer._chunks: the linear-time cutter gives exactly the pieces of the old,
quadratic one (kept below as the reference)."""
from __future__ import annotations

import random

import pytest

from data_prep.tokenizer import MAX_PIECE_BYTES, _chunks

SPAN = MAX_PIECE_BYTES // 4


def reference_chunks(text: str) -> list[str]:
    """The algorithm as it was: re-encode the whole rest and slice it, every piece."""
    out = []
    while len(text.encode("utf-8")) > MAX_PIECE_BYTES:
        cut = text.rfind("\n", 0, SPAN)
        cut = cut + 1 if cut > 0 else SPAN
        out.append(text[:cut])
        text = text[cut:]
    if text:
        out.append(text)
    return out


# 1-, 2-, 3- and 4-byte characters and newlines, so both the byte limit and the newline rule bite
ALPHABET = ["a", "b", " ", "\n", "é", "ж", "東", "京", "🙂", "\U0001F9EA"]


def random_text(rng: random.Random, n: int) -> str:
    weights = [rng.random() for _ in ALPHABET]
    weights[3] *= rng.choice([0.0, 0.001, 0.05, 1.0])  # no newline at all .. many
    return "".join(rng.choices(ALPHABET, weights, k=n))


@pytest.mark.parametrize("seed", range(40))
def test_same_pieces_as_the_old_algorithm(seed):
    rng = random.Random(seed)
    text = random_text(rng, rng.choice([10, SPAN, 3 * SPAN, 9 * SPAN + 7, 40_000]))
    got = list(_chunks(text))
    assert got == reference_chunks(text)
    assert "".join(got) == text
    assert all(len(p.encode("utf-8")) <= MAX_PIECE_BYTES for p in got)


@pytest.mark.parametrize("text", [
    "",                                        # nothing: no piece at all
    "x",
    "x" * MAX_PIECE_BYTES,                     # exactly at the byte limit: one piece
    "x" * (MAX_PIECE_BYTES + 1),               # one byte over: cut at SPAN characters
    "é" * (MAX_PIECE_BYTES // 2),              # 2-byte characters, exactly at the limit
    "é" * (MAX_PIECE_BYTES // 2) + "a",
    "🙂" * (SPAN + 1),                          # 4-byte characters: SPAN of them is the limit
    "\n" + "x" * MAX_PIECE_BYTES,              # a newline at the span's start is no cut point
    "x\n" * MAX_PIECE_BYTES,                   # a newline at the span's very end
    "x" * (SPAN - 1) + "\n" + "y" * MAX_PIECE_BYTES,
    "x" * SPAN + "\n" + "y" * MAX_PIECE_BYTES,  # the newline just past the span: not used
    "\n" * (MAX_PIECE_BYTES + 5),
])
def test_edge_cases(text):
    assert list(_chunks(text)) == reference_chunks(text)


def test_cut_points_are_the_documented_ones():
    text = "a" * 100 + "\n" + "b" * (MAX_PIECE_BYTES + 1)
    # after the newline; then SPAN characters, as the rest is still over the limit; the rest
    assert [len(p) for p in _chunks(text)] == [101, SPAN, MAX_PIECE_BYTES + 1 - SPAN]
    assert list(_chunks("x" * MAX_PIECE_BYTES)) == ["x" * MAX_PIECE_BYTES]
    assert list(_chunks("")) == []
