"""The facts docs/GUARANTEES.md states for each code, recomputed on a smaller scale: they are exact."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

from oppass import codec, formats

TOOL = Path(__file__).resolve().parents[1] / "tools" / "measure_guarantees.py"
spec = importlib.util.spec_from_file_location("measure_guarantees", TOOL)
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)

CODE_WIDTHS = [(code, fmt, width) for code in formats.CODES for fmt in measure.FORMATS
               for width in formats.word_widths(fmt, code)]


@pytest.mark.parametrize(("code", "fmt", "width"), CODE_WIDTHS)
@pytest.mark.parametrize("k", measure.FLIPS)
def test_outcomes_of_k_flips_are_the_codes_math(code: str, fmt: str, width: int, k: int) -> None:
    """Parity: odd k detected, even k silent. SEC-DED: 1 corrected, 2 detected, 3 silent, 4 detected or silent."""
    corrected, detected, silent = measure.outcome_rates(fmt, width, code, k, 400, np.random.default_rng(k))
    if k < 4 or code == formats.PARITY:
        assert (corrected, detected, silent) == measure.predicted(code, width, k)
    else:
        assert corrected == 0.0 and detected + silent == 1.0 and detected > 0.5


@pytest.mark.parametrize(("fmt", "width"), [("fp16", 16), ("int8", 16), ("bf16", 32), ("fp32", 32), ("fp32", 64)])
def test_secded_misses_exactly_one_in_w_minus_3_of_all_four_bit_patterns(fmt: str, width: int) -> None:
    """Every set of 4 distinct bits of a word, flipped: silent exactly for the W(W-1)(W-2)/24 whose indices XOR
    to 0, a share of 1/(W-3); the others are detected."""
    offsets = np.array(list(itertools.combinations(range(width), 4)))
    found = measure.outcomes(fmt, width, formats.SECDED, offsets, np.random.default_rng(0))
    assert int(found["silent"].sum()) == width * (width - 1) * (width - 2) // 24
    assert int(found["silent"].sum()) * (width - 3) == offsets.shape[0]
    assert (found["silent"] | found["detected"]).all() and not found["corrected"].any()


@pytest.mark.parametrize("code", formats.CODES)
@pytest.mark.parametrize("fmt", measure.FORMATS)
def test_a_flip_in_the_padding_of_the_last_word_is_detected_or_corrected(code: str, fmt: str) -> None:
    weights = measure.random_weights(fmt, 5, np.random.default_rng(0))  # 5 weights: the last 64-bit word has padding
    encoded = codec.encode(weights, 64, code=code)
    padding_bit = 64 * encoded.packed.shape[0] - 1
    faulty = measure.flip(encoded.packed, np.array([padding_bit]))
    result = codec.decode(faulty, fmt, 64, weights.shape, code=code)
    first_in_last_word = (encoded.packed.shape[0] - 1) * (64 // formats.FORMATS[fmt].bits)
    if code == formats.PARITY:
        assert result.masked_words == 1
        assert not result.weights.view(np.uint8).reshape(5, -1)[first_in_last_word:].any()  # the last word zeroed
    else:
        assert (result.masked_words, result.corrected_words) == (0, 1)
        np.testing.assert_array_equal(measure.as_codes(result.weights), measure.as_codes(encoded.adjusted))


@pytest.mark.parametrize("code", formats.CODES)
@pytest.mark.parametrize("fmt", measure.FORMATS)
def test_an_all_zero_word_is_stored_as_zeros_and_any_single_flip_is_caught(code: str, fmt: str) -> None:
    zeros = np.zeros(64 // formats.FORMATS[fmt].bits, dtype=formats.FORMATS[fmt].dtype)
    encoded = codec.encode(zeros, 64, code=code)
    assert encoded.changed_words == 0 and not encoded.packed.any()
    for bit in range(64):
        result = codec.decode(measure.flip(encoded.packed, np.array([bit])), fmt, 64, zeros.shape, code=code)
        assert (result.masked_words, result.corrected_words) == ((1, 0) if code == formats.PARITY else (0, 1))
        assert not result.weights.any()
