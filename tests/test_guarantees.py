"""The parity facts docs/GUARANTEES.md states, recomputed on a smaller scale: they are exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from oppass import codec, formats

TOOL = Path(__file__).resolve().parents[1] / "tools" / "measure_guarantees.py"
spec = importlib.util.spec_from_file_location("measure_guarantees", TOOL)
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)

FORMAT_WORDS = [(fmt, word) for fmt in measure.FORMATS for word in formats.WORD_SIZES
                if word == "weight" or word >= formats.FORMATS[fmt].bits]


@pytest.mark.parametrize(("fmt", "word"), FORMAT_WORDS)
@pytest.mark.parametrize("k", measure.FLIPS)
def test_odd_flip_counts_are_always_detected_and_even_ones_never(fmt: str, word: str | int, k: int) -> None:
    rate = measure.detection_rate(fmt, word, k, 500, np.random.default_rng(k))
    assert rate == (1.0 if k % 2 else 0.0)


@pytest.mark.parametrize("fmt", measure.FORMATS)
def test_a_flip_in_the_padding_of_the_last_word_is_detected(fmt: str) -> None:
    weights = measure.random_weights(fmt, 5, np.random.default_rng(0))  # 5 weights: the last 64-bit word has padding
    encoded = codec.encode(weights, 64)
    padding_bit = 64 * encoded.packed.shape[0] - 1
    faulty = measure.flip(encoded.packed, np.array([padding_bit]))
    result = codec.decode(faulty, fmt, 64, weights.shape)
    decoded, masked = result.weights, result.masked_words
    first_in_last_word = (encoded.packed.shape[0] - 1) * (64 // formats.FORMATS[fmt].bits)
    assert masked == 1
    assert not decoded.view(np.uint8).reshape(5, -1)[first_in_last_word:].any()  # the whole last word is zeroed


@pytest.mark.parametrize("fmt", measure.FORMATS)
def test_an_all_zero_word_needs_no_adjustment_and_any_single_flip_is_detected(fmt: str) -> None:
    zeros = np.zeros(64 // formats.FORMATS[fmt].bits, dtype=formats.FORMATS[fmt].dtype)
    encoded = codec.encode(zeros, 64)
    assert encoded.changed_words == 0 and not encoded.packed.any()
    for bit in range(64):
        assert codec.decode(measure.flip(encoded.packed, np.array([bit])), fmt, 64, zeros.shape).masked_words == 1
