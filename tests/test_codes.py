"""SEC-DED and the range check in the numpy codec (oppass/codec.py) against docs/FORMAT.md and code_vectors.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import as_codes, as_weights, code_dtype, value_class, weight_codes

from oppass import codec, faults, formats
from oppass.errors import OppassError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "code_vectors.json").read_text())
SECDED_CONFIGS = [(fmt, width) for fmt in formats.FORMATS for width in formats.word_widths(fmt, formats.SECDED)]
REFUSED_CONFIGS = [(fmt, width) for fmt in formats.FORMATS for width in formats.word_widths(fmt)
                   if width not in formats.word_widths(fmt, formats.SECDED)]


def padded_codes(weights: np.ndarray, n_words: int, word_bits: int) -> np.ndarray:
    """[n_words, k] codes of the weights, the tail padded with zero codes."""
    fmt = codec.format_of(weights.dtype)
    per_word = word_bits // formats.FORMATS[fmt].bits
    codes = np.zeros(n_words * per_word, dtype=code_dtype(fmt))
    codes[: weights.size] = as_codes(weights)
    return codes.reshape(n_words, per_word)


def bit_masks(word_bits: int) -> np.ndarray:
    """[W, L] packed lanes, row i a word with only bit i set."""
    return np.packbits(np.eye(word_bits, dtype=np.uint8), axis=1, bitorder="little").view(
        codec.storage_dtype(word_bits)).reshape(word_bits, -1)


def decode_rows(rows: np.ndarray, fmt: str, word_bits: int, **options) -> codec.Decoded:
    """Decodes [n, L] packed words as a tensor of n whole words."""
    per_word = word_bits // formats.FORMATS[fmt].bits
    return codec.decode(rows, fmt, word_bits, (rows.shape[0] * per_word,), code=formats.SECDED, **options)


def secded_encoded(data: st.DataObject, fmt: str, word_bits: int) -> tuple[np.ndarray, codec.Encoded]:
    weights = as_weights(data.draw(weight_codes(fmt, word_bits, nonempty=True)), fmt)
    return weights, codec.encode(weights, word_bits, code=formats.SECDED)


@pytest.mark.parametrize(("fmt", "word_bits"), SECDED_CONFIGS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_secded_corrects_every_single_flip_bit_for_bit(fmt, word_bits, data):
    """Every bit of every word (data, check and padding bits) flipped alone decodes to the fault-free weights."""
    weights, encoded = secded_encoded(data, fmt, word_bits)
    n_words = encoded.packed.shape[0]
    rows = (encoded.packed[:, None, :] ^ bit_masks(word_bits)[None, :, :]).reshape(n_words * word_bits, -1)

    decoded = decode_rows(rows, fmt, word_bits)

    expected = np.repeat(padded_codes(encoded.adjusted, n_words, word_bits), word_bits, axis=0)
    assert decoded.corrected_words == rows.shape[0] and decoded.masked_words == 0
    np.testing.assert_array_equal(as_codes(decoded.weights), expected.reshape(-1))


@pytest.mark.parametrize(("fmt", "word_bits"), SECDED_CONFIGS)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_secded_detects_every_double_flip(fmt, word_bits, data):
    """Every pair of distinct bits of a word flipped together masks the word (all its weights zero)."""
    _, encoded = secded_encoded(data, fmt, word_bits)
    word = encoded.packed[data.draw(st.integers(0, encoded.packed.shape[0] - 1))]
    first, second = np.triu_indices(word_bits, 1)
    masks = bit_masks(word_bits)
    rows = word[None, :] ^ masks[first] ^ masks[second]

    decoded = decode_rows(rows, fmt, word_bits)

    assert decoded.masked_words == rows.shape[0] and decoded.corrected_words == 0
    assert not as_codes(decoded.weights).any()


@pytest.mark.parametrize(("fmt", "word_bits"), SECDED_CONFIGS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_secded_fault_free_decode_and_unpack_return_the_rounded_weights(fmt, word_bits, data):
    weights, encoded = secded_encoded(data, fmt, word_bits)

    decoded = codec.decode(encoded.packed, fmt, word_bits, weights.shape, code=formats.SECDED)
    unpacked = codec.unpack(encoded.packed, fmt, word_bits, weights.shape, code=formats.SECDED)

    assert (decoded.masked_words, decoded.corrected_words) == (0, 0)
    np.testing.assert_array_equal(as_codes(decoded.weights), as_codes(encoded.adjusted))
    np.testing.assert_array_equal(as_codes(unpacked), as_codes(encoded.adjusted))
    assert not codec.odd_words(encoded.packed).any()  # the overall-parity bit makes every word even


@pytest.mark.parametrize(("fmt", "word_bits"), SECDED_CONFIGS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_secded_rounding_is_nearest_clears_the_stolen_bits_and_keeps_each_class(fmt, word_bits, data):
    """The rounded weight has its stolen bits 0 and is the nearest such value (floats: no farther than either
    neighbour; ties to even; never to infinity; integers: within half a step, clamped); a zero or a normal stays
    one, a NaN or an infinity stays one, the sign is kept; changed/changed_words say what changed."""
    weights, encoded = secded_encoded(data, fmt, word_bits)
    weight_format = formats.FORMATS[fmt]
    stolen = np.resize(np.array(formats.secded_stolen_bits(fmt, word_bits)), weights.size)
    codes, rounded = as_codes(weights).astype(np.int64), as_codes(encoded.adjusted).astype(np.int64)

    assert not (rounded & ((1 << stolen) - 1)).any()
    before, after = value_class(weights), value_class(encoded.adjusted)
    if weight_format.is_float:
        sign = 1 << (weight_format.bits - 1)
        np.testing.assert_array_equal(codes & sign, rounded & sign)
        kept = (before == after) | ((before == 1) & np.isin(after, (0, 2)))  # a subnormal may reach 0 or a normal
        np.testing.assert_array_equal(kept, True)
        with np.errstate(invalid="ignore"):  # signalling NaNs
            finite = np.isfinite(weights.astype(np.float64))
        magnitude = (codes & (sign - 1))[finite]
        down = magnitude >> stolen[finite] << stolen[finite]
        up = down + (1 << stolen[finite])
        chosen = (rounded & (sign - 1))[finite]
        infinity = ((1 << weight_format.exponent_bits) - 1) << weight_format.mantissa_bits
        rest, half = magnitude - down, (1 << stolen[finite]) >> 1
        wanted_up = (rest > half) | ((rest == half) & ((down >> stolen[finite]) & 1 == 1) & (stolen[finite] > 0))
        np.testing.assert_array_equal(chosen, np.where(wanted_up & (up < infinity), up, down))
    else:
        values = weights.astype(np.int64)
        step = 1 << stolen
        clamped = np.iinfo(weight_format.dtype).max >> stolen << stolen
        distance = np.abs(encoded.adjusted.astype(np.int64) - values)
        assert ((distance <= step // 2) | (encoded.adjusted.astype(np.int64) == clamped)).all()
    changed = np.flatnonzero(codes != rounded)
    np.testing.assert_array_equal(encoded.changed, changed)
    np.testing.assert_array_equal(as_codes(encoded.changed_values), rounded[changed])
    per_word = word_bits // weight_format.bits
    assert encoded.changed_words == np.unique(changed // per_word).size
    assert codec.subnormal_count(encoded.adjusted) <= codec.subnormal_count(weights)


CODE_CONFIGS = [(code, fmt, width) for code in formats.CODES for fmt in formats.FORMATS
                for width in formats.word_widths(fmt, code)]


@pytest.mark.parametrize(("code", "fmt", "word_bits"), CODE_CONFIGS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_range_check_zeroes_exactly_the_weights_outside_the_bound(code, fmt, word_bits, data):
    codes = data.draw(weight_codes(fmt, word_bits, nonempty=True))
    weights = as_weights(codes, fmt)
    with np.errstate(invalid="ignore"):  # signalling NaNs
        if code == formats.PARITY:
            weights = np.where(np.isfinite(weights.astype(np.float32)), weights, weights.dtype.type(0))
        encoded = codec.encode(weights, word_bits, code=code)
        decoded = codec.decode(encoded.packed, fmt, word_bits, weights.shape, code=code)
        magnitudes = np.abs(decoded.weights.astype(np.float32))
    bound = float(data.draw(st.sampled_from(magnitudes[np.isfinite(magnitudes)].tolist() + [0.0])))

    checked = codec.decode(encoded.packed, fmt, word_bits, weights.shape, code=code, range_max=bound)

    outside = ~(magnitudes <= np.float32(bound))
    expected = np.where(outside, 0, as_codes(decoded.weights))
    np.testing.assert_array_equal(as_codes(checked.weights), expected)
    assert checked.range_zeroed == int(outside.sum()) and checked.masked_words == decoded.masked_words


@pytest.mark.parametrize("code", formats.CODES)
@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_the_fault_free_maximum_leaves_a_fault_free_decode_unchanged(code, fmt):
    weights = as_weights(np.random.default_rng(3).integers(0, 2 ** formats.FORMATS[fmt].bits, 999), fmt)
    with np.errstate(invalid="ignore"):  # signalling NaNs
        weights = np.where(np.isfinite(weights.astype(np.float32)), weights, weights.dtype.type(1))
    encoded = codec.encode(weights, 64, code=code)
    bound = codec.max_magnitude(encoded.adjusted)

    checked = codec.decode(encoded.packed, fmt, 64, weights.shape, code=code, range_max=bound)

    assert checked.range_zeroed == 0
    np.testing.assert_array_equal(as_codes(checked.weights), as_codes(encoded.adjusted))


def test_max_magnitude_is_none_for_a_tensor_with_a_nan_or_an_infinity():
    assert codec.max_magnitude(np.array([1.0, np.inf], np.float32)) is None
    assert codec.max_magnitude(np.array([np.nan], np.float16)) is None
    assert codec.max_magnitude(np.array([-128, 5], np.int8)) == 128.0
    assert codec.max_magnitude(np.zeros(0, np.float32)) == 0.0


def vector_weights(case: dict) -> np.ndarray:
    return as_weights(np.array(case["weights"], dtype=np.uint64), case["format"]).reshape(case["shape"])


def vector_packed(case: dict) -> np.ndarray:
    shape = codec.packed_shape(len(case["weights"]), case["format"], case["word_bits"])
    lanes = [int(lane) for word in case["packed"] for lane in word]
    return np.array(lanes, dtype=np.uint64).astype(codec.storage_dtype(case["word_bits"])).reshape(shape)


ENCODABLE = [case for case in VECTORS if "error" not in case]


@pytest.mark.parametrize("case", ENCODABLE, ids=[case["name"] for case in ENCODABLE])
def test_codec_matches_code_vectors(case):
    fmt, word_bits = case["format"], case["word_bits"]
    expected_packed = vector_packed(case)

    encoded = codec.encode(vector_weights(case), word_bits, case.get("flip"), code=case["code"])
    faulty = expected_packed.copy()
    fault = case["decoded_after_faults"]
    faults.flip_bits([faulty], np.array(fault["flipped_bits"], dtype=np.int64))
    decoded = codec.decode(faulty, fmt, word_bits, case["shape"], code=case["code"], range_max=case.get("range_max"))

    assert codec.word_bits(fmt, case["word"], case["code"]) == word_bits
    np.testing.assert_array_equal(encoded.packed, expected_packed)
    np.testing.assert_array_equal(as_codes(encoded.adjusted), case["adjusted"])
    assert encoded.changed_words == case["changed_words"]
    np.testing.assert_array_equal(as_codes(decoded.weights), fault["decoded"])
    assert (decoded.masked_words, decoded.corrected_words, decoded.range_zeroed) == (
        fault["masked_words"], fault["corrected_words"], fault["range_zeroed"])


@pytest.mark.parametrize("case", [case for case in VECTORS if "error" in case], ids=lambda case: case["name"])
def test_codec_refuses_the_code_vectors_where_secded_does_not_fit(case):
    with pytest.raises(OppassError, match=f"secded does not fit {case['format']} in {case['word_bits']}-bit words"):
        codec.encode(vector_weights(case), case["word_bits"], code="secded")


def test_code_vectors_cover_every_supported_and_refused_secded_word_size():
    covered = {(case["format"], case["word_bits"]) for case in VECTORS if case["code"] == "secded"}
    assert set(SECDED_CONFIGS) | set(REFUSED_CONFIGS) <= covered
    ranged = {(case["format"], case["code"]) for case in VECTORS if "range_max" in case}
    assert {(fmt, code) for fmt in formats.FORMATS for code in formats.CODES} <= ranged


@pytest.mark.parametrize(("fmt", "word_bits"), REFUSED_CONFIGS)
def test_secded_refuses_word_sizes_where_it_does_not_fit_naming_those_that_do(fmt, word_bits):
    weights = np.zeros(4, formats.FORMATS[fmt].dtype)
    with pytest.raises(OppassError, match=r"over .* budget of 3; it fits .* in (16|32), .* or 512-bit words") as error:
        codec.encode(weights, word_bits, code="secded")
    assert "\n" not in str(error.value)
    packed = codec.encode(weights, word_bits).packed
    with pytest.raises(OppassError, match="secded does not fit"):
        codec.decode(packed, fmt, word_bits, weights.shape, code="secded")


@pytest.mark.parametrize(("call", "message"), [
    (lambda: codec.encode(np.zeros(2, np.float32), 64, "largest", code="secded"), "flip strategy applies to parity"),
    (lambda: codec.encode(np.zeros(2, np.float32), 64, code="hamming"), "unknown code 'hamming'"),
    (lambda: codec.decode(np.zeros((1, 1), np.uint64), "fp32", 64, [2], range_max=float("nan")), "range_max"),
    (lambda: codec.decode(np.zeros((1, 1), np.uint64), "fp32", 64, [2], range_max=-1.0), "finite number >= 0"),
    (lambda: codec.decode(np.zeros((1, 1), np.uint64), "fp32", 64, [2], range_max=float("inf")), "range_max"),
])
def test_bad_code_arguments_are_one_line_errors(call, message):
    with pytest.raises(OppassError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_negative_zero_bound_keeps_zeros():
    weights = np.array([0.0, -0.0, 1e-45], np.float32)
    packed = codec.encode(weights, 32, code="secded").packed
    checked = codec.decode(packed, "fp32", 32, weights.shape, code="secded", range_max=-0.0)
    np.testing.assert_array_equal(as_codes(checked.weights), [0, 0x80000000, 0])
