"""Tests of the numpy codec (oppass/codec.py) against docs/FORMAT.md and its test vectors."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from oppass import codec, formats
from oppass.errors import OppassError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "format_vectors.json").read_text())
CONFIGS = [
    (fmt, word, flip)
    for fmt, weight_format in formats.FORMATS.items()
    for word in formats.WORD_SIZES
    if word == "weight" or word >= weight_format.bits
    for flip in formats.FLIP_STRATEGIES
]
SPECIAL_CODES = {
    "fp32": [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F800000, 0xFF800000, 0x7FC00000,
             0x7F800001, 0x7F7FFFFF],
    "bf16": [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x7F7F],
    "fp16": [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x7BFF],
    "int8": [0x00, 0x80, 0x7F, 0xFF, 0x81],
    "uint8": [0x00, 0xFF, 0x80, 0x7F],
}
PROPERTY_SETTINGS = settings(max_examples=12, deadline=None)


def code_dtype(fmt: str) -> np.dtype:
    return np.dtype(f"u{formats.FORMATS[fmt].bits // 8}")


def as_weights(codes: np.ndarray, fmt: str) -> np.ndarray:
    return np.asarray(codes, dtype=code_dtype(fmt)).view(formats.FORMATS[fmt].dtype)


def as_codes(weights: np.ndarray) -> np.ndarray:
    return weights.reshape(-1).view(f"u{weights.dtype.itemsize}")


@st.composite
def weight_codes(draw: st.DrawFn, fmt: str, word_bits: int, nonempty: bool = False) -> np.ndarray:
    """Random weight codes (often special values) spanning a few words, often with a padded tail."""
    per_word = word_bits // formats.FORMATS[fmt].bits
    count = draw(st.integers(int(nonempty), 4 * per_word))
    elements = st.one_of(st.integers(0, 2 ** formats.FORMATS[fmt].bits - 1), st.sampled_from(SPECIAL_CODES[fmt]))
    return draw(hnp.arrays(code_dtype(fmt), count, elements=elements))


def stream_bits(weights: np.ndarray, n_words: int, word_bits: int) -> np.ndarray:
    """The weights' little-endian bit stream padded to whole words, as a [n_words, W] 0/1 array."""
    stream = np.zeros(n_words * word_bits // 8, dtype=np.uint8)
    raw = np.frombuffer(as_codes(weights).astype(as_codes(weights).dtype.newbyteorder("<")).tobytes(), np.uint8)
    stream[: raw.size] = raw
    return np.unpackbits(stream, bitorder="little").reshape(n_words, word_bits)


def packed_bits(packed: np.ndarray, word_bits: int) -> np.ndarray:
    """A packed tensor's bytes as a [n_words, W] 0/1 array (bit s of the stream at [s // W, s % W])."""
    raw = np.frombuffer(np.ascontiguousarray(packed).tobytes(), np.uint8)
    return np.unpackbits(raw, bitorder="little").reshape(packed.shape[0], word_bits)


def codes_of_bits(bits: np.ndarray, n_weights: int, fmt: str) -> np.ndarray:
    """Native codes of the first n weights of a [n_words, W] 0/1 stream."""
    raw = np.packbits(bits.reshape(-1), bitorder="little")
    return raw.view(code_dtype(fmt).newbyteorder("<"))[:n_weights].astype(code_dtype(fmt))


def with_flipped_bits(packed: np.ndarray, word_bits: int, stream_positions: list[int]) -> np.ndarray:
    """A copy of a packed tensor with the given stream bits inverted."""
    bits = packed_bits(packed, word_bits).reshape(-1).copy()
    bits[stream_positions] ^= 1
    return np.packbits(bits, bitorder="little").view(packed.dtype).reshape(packed.shape)


def reference_flip(word_codes: np.ndarray, fmt: str, flip: str) -> tuple[int, int]:
    """The weight (index in the word) and the bit mask the encoder flips in an odd word, by the spec's wording."""
    with np.errstate(invalid="ignore"):  # signalling NaNs
        values = as_weights(word_codes, fmt).astype(np.float64)
        flipped = as_weights(word_codes ^ 1, fmt).astype(np.float64)
    is_float = formats.FORMATS[fmt].is_float
    if is_float and (values == 0).any():
        return int(np.flatnonzero(values == 0)[0]), 1 << (formats.FORMATS[fmt].bits - 1)
    candidates = [index for index, value in enumerate(values) if not (is_float and math.isinf(value))]
    if flip == "word-lsb":
        index = candidates[0]
    elif flip == "largest":
        keys = {index: (1, 0.0) if math.isnan(values[index]) else (0, abs(values[index])) for index in candidates}
        index = max(candidates, key=lambda candidate: (keys[candidate], -candidate))
    else:
        errors = [(abs(flipped[index] - values[index]), index) for index in candidates if math.isfinite(flipped[index])]
        index = min(errors)[1] if errors else candidates[0]
    return index, 0b10 if is_float and math.isinf(flipped[index]) else 1


def can_encode(codes: np.ndarray, fmt: str, word_bits: int) -> bool:
    """Whether no odd word holds only infinite weights (padding aside)."""
    if not formats.FORMATS[fmt].is_float:
        return True
    per_word = word_bits // formats.FORMATS[fmt].bits
    for start in range(0, codes.size, per_word):
        word = codes[start:start + per_word]
        odd = sum(bin(int(code)).count("1") for code in word) % 2
        if odd and np.isinf(as_weights(word, fmt).astype(np.float32)).all():
            return False
    return True


@pytest.mark.parametrize(("fmt", "word", "flip"), CONFIGS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_encode_gives_even_words_and_flips_only_the_chosen_bit(fmt, word, flip, data):
    word_bits = codec.word_bits(fmt, word)
    codes = data.draw(weight_codes(fmt, word_bits))
    assume(can_encode(codes, fmt, word_bits))
    weights = as_weights(codes, fmt)
    encoded = codec.encode(weights, word_bits, flip)
    n_words, lanes = codec.packed_shape(codes.size, fmt, word_bits)

    assert encoded.packed.shape == (n_words, lanes) and encoded.packed.dtype == codec.storage_dtype(word_bits)
    assert (packed_bits(encoded.packed, word_bits).sum(axis=1) % 2 == 0).all()
    assert not codec.odd_words(encoded.packed).any()

    source_parity = stream_bits(weights, n_words, word_bits).sum(axis=1) % 2
    per_word = word_bits // formats.FORMATS[fmt].bits
    changed = as_codes(encoded.adjusted) ^ codes
    assert encoded.changed_words == int(source_parity.sum())
    for index in range(n_words):
        word_codes = codes[index * per_word:(index + 1) * per_word]
        word_changes = changed[index * per_word:(index + 1) * per_word]
        expected = np.zeros_like(word_changes)
        if source_parity[index]:
            weight, bit = reference_flip(word_codes, fmt, flip)
            expected[weight] = bit
        np.testing.assert_array_equal(word_changes, expected)


def value_class(weights: np.ndarray) -> np.ndarray:
    """Per weight: 0 zero, 1 subnormal, 2 normal, 3 infinite, 4 NaN (integers: 2)."""
    fmt = codec.format_of(weights.dtype)
    if not formats.FORMATS[fmt].is_float:
        return np.full(weights.size, 2)
    with np.errstate(invalid="ignore"):
        values = weights.reshape(-1).astype(np.float64)
    magnitude = np.abs(values)
    return np.select(
        [values == 0, magnitude < formats.FORMATS[fmt].smallest_normal, np.isinf(values), np.isnan(values)],
        [0, 1, 3, 4], default=2)


@pytest.mark.parametrize(("fmt", "word", "flip"), CONFIGS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_encoding_keeps_every_weights_class_and_makes_no_subnormal(fmt, word, flip, data):
    """Zeros stay zeros, normals normal, infinities and NaNs what they are; a subnormal may only become another
    subnormal or a zero; every word's parity is even."""
    word_bits = codec.word_bits(fmt, word)
    codes = data.draw(weight_codes(fmt, word_bits))
    assume(can_encode(codes, fmt, word_bits))
    weights = as_weights(codes, fmt)
    encoded = codec.encode(weights, word_bits, flip)

    before, after = value_class(weights), value_class(encoded.adjusted)
    kept = before == after
    subnormal_to_zero = (before == 1) & (after == 0)
    np.testing.assert_array_equal(kept | subnormal_to_zero, True)
    assert codec.subnormal_count(encoded.adjusted) <= codec.subnormal_count(weights)
    assert not codec.odd_words(encoded.packed).any()
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(np.signbit(encoded.adjusted.astype(np.float32))[after != 0],
                                      np.signbit(weights.astype(np.float32))[after != 0])


@pytest.mark.parametrize("fmt", formats.FLOAT_FORMATS)
@pytest.mark.parametrize("word", ["weight", 64])
def test_an_odd_word_of_infinities_is_an_error_naming_the_tensor(fmt, word):
    word_bits = codec.word_bits(fmt, word)
    infinities = np.array([np.inf, -np.inf], np.float32).astype(formats.FORMATS[fmt].dtype)
    odd = [value for value in infinities if bin(int(as_codes(np.array([value])).item())).count("1") % 2]
    weights = np.array(odd if word == "weight" else infinities, dtype=formats.FORMATS[fmt].dtype)
    with pytest.raises(OppassError, match="tensor 'conv.w' has 1 word.* only infinite weights") as error:
        codec.encode(weights, word_bits, name="conv.w")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("fmt", "word", "flip"), CONFIGS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_unfaulted_decode_returns_adjusted_bit_for_bit(fmt, word, flip, data):
    word_bits = codec.word_bits(fmt, word)
    codes = data.draw(weight_codes(fmt, word_bits))
    assume(can_encode(codes, fmt, word_bits))
    weights = as_weights(codes, fmt)
    shape = (1, weights.size)
    encoded = codec.encode(weights.reshape(shape), word_bits, flip)

    result = codec.decode(encoded.packed, fmt, word_bits, shape)
    decoded, masked = result.weights, result.masked_words
    unpacked = codec.unpack(encoded.packed, fmt, word_bits, shape)

    assert masked == 0
    assert decoded.dtype == formats.FORMATS[fmt].dtype and decoded.shape == shape
    np.testing.assert_array_equal(as_codes(decoded), as_codes(encoded.adjusted))
    np.testing.assert_array_equal(as_codes(unpacked), as_codes(encoded.adjusted))


@st.composite
def bits_in_word(draw: st.DrawFn, word_bits: int) -> list[int]:
    """Distinct bit offsets inside one word: a few, or a random subset of any size."""
    few = st.lists(st.integers(0, word_bits - 1), min_size=1, max_size=min(word_bits, 7), unique=True)
    mask = hnp.arrays(np.bool_, word_bits).map(lambda chosen: np.flatnonzero(chosen).tolist()).filter(bool)
    return draw(st.one_of(few, mask))


@pytest.mark.parametrize(("fmt", "word"), sorted({(fmt, word) for fmt, word, _ in CONFIGS}, key=str))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_odd_flip_counts_mask_the_word_and_even_counts_pass(fmt, word, data):
    word_bits = codec.word_bits(fmt, word)
    codes = data.draw(weight_codes(fmt, word_bits, nonempty=True))
    assume(can_encode(codes, fmt, word_bits))
    weights = as_weights(codes, fmt)
    encoded = codec.encode(weights, word_bits, data.draw(st.sampled_from(formats.FLIP_STRATEGIES)))
    n_words = encoded.packed.shape[0]
    hit_word = data.draw(st.integers(0, n_words - 1))
    offsets = data.draw(bits_in_word(word_bits))
    positions = [hit_word * word_bits + offset for offset in offsets]

    faulted = with_flipped_bits(encoded.packed, word_bits, positions)
    result = codec.decode(faulted, fmt, word_bits, weights.shape)
    decoded, masked = result.weights, result.masked_words

    expected_bits = stream_bits(encoded.adjusted, n_words, word_bits)
    if len(offsets) % 2:
        expected_bits[hit_word] = 0
    else:
        expected_bits.reshape(-1)[positions] ^= 1
    assert masked == len(offsets) % 2
    np.testing.assert_array_equal(as_codes(decoded), codes_of_bits(expected_bits, weights.size, fmt))
    np.testing.assert_array_equal(codec.odd_words(faulted), np.arange(n_words) == hit_word if masked else False)


def vector_weights(case: dict) -> np.ndarray:
    return as_weights(np.array(case["weights"], dtype=np.uint64), case["format"]).reshape(case["shape"])


def vector_packed(case: dict) -> np.ndarray:
    shape = codec.packed_shape(len(case["weights"]), case["format"], case["word_bits"])
    lanes = [int(lane) for word in case["packed"] for lane in word]
    return np.array(lanes, dtype=np.uint64).astype(codec.storage_dtype(case["word_bits"])).reshape(shape)


ENCODABLE = [case for case in VECTORS if "error" not in case]


@pytest.mark.parametrize("case", ENCODABLE, ids=[case["name"] for case in ENCODABLE])
def test_codec_matches_format_vectors(case):
    fmt = case["format"]
    word_bits = codec.word_bits(fmt, case["word"])
    expected_packed = vector_packed(case)
    encoded = codec.encode(vector_weights(case), word_bits, case["flip"])

    assert word_bits == case["word_bits"]
    assert encoded.packed.dtype == expected_packed.dtype
    np.testing.assert_array_equal(encoded.packed, expected_packed)
    np.testing.assert_array_equal(as_codes(encoded.adjusted), case["adjusted"])
    assert encoded.changed_words == case["changed_words"]
    np.testing.assert_array_equal(codec.pack(encoded.adjusted, word_bits), expected_packed)


@pytest.mark.parametrize("case", [case for case in VECTORS if "error" in case], ids=lambda case: case["name"])
def test_codec_refuses_the_vectors_that_cannot_be_encoded(case):
    with pytest.raises(OppassError, match="only infinite weights"):
        codec.encode(vector_weights(case), case["word_bits"], case["flip"])


@pytest.mark.parametrize(
    "case", [case for case in VECTORS if "decoded_after_faults" in case], ids=lambda case: case["name"]
)
def test_decode_matches_format_vector_faults(case):
    faults = case["decoded_after_faults"]
    faulted = with_flipped_bits(vector_packed(case), case["word_bits"], faults["flipped_bits"])

    result = codec.decode(faulted, case["format"], case["word_bits"], case["shape"])
    decoded, masked = result.weights, result.masked_words

    assert masked == faults["masked_words"]
    assert list(decoded.shape) == case["shape"]
    np.testing.assert_array_equal(as_codes(decoded), faults["decoded"])


def test_vectors_cover_every_format_word_size_and_strategy():
    covered = {(case["format"], case["word"], case["flip"]) for case in VECTORS}
    assert set(CONFIGS) <= covered


def bf16_reference(fp32_codes: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even of fp32 codes to bf16 codes, in integer arithmetic."""
    wide = fp32_codes.astype(np.uint64)
    return ((wide + 0x7FFF + ((wide >> 16) & 1)) >> 16).astype(np.uint16)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 64), elements=st.one_of(
    st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF).map(lambda upper: upper << 16 | 0x8000))))
def test_bf16_conversion_rounds_to_nearest_even(fp32_codes):
    weights = fp32_codes.view(np.float32)
    finite = np.isfinite(weights)
    expected = bf16_reference(fp32_codes)
    assume(not (finite & ((expected & 0x7F80) == 0x7F80)).any())

    converted, scales = codec.to_format(weights, "bf16")

    assert scales is None and converted.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(converted.view(np.uint16)[finite], expected[finite])
    np.testing.assert_array_equal(np.isnan(converted.astype(np.float32)), np.isnan(weights))
    np.testing.assert_array_equal(np.isinf(converted.astype(np.float32)), np.isinf(weights))


def fp16_midpoint(code: int) -> float:
    """The fp32 number exactly halfway between fp16 code and its successor (a rounding tie)."""
    low, high = (struct.unpack("<e", struct.pack("<H", c))[0] for c in (code, code + 1))
    return (low + high) / 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.floats(-65519.0, 65519.0, width=32),
    st.floats(-(2.0**-13), 2.0**-13, width=32),
    st.integers(0, 0x7BFE).map(fp16_midpoint),
    st.sampled_from([math.inf, -math.inf, math.nan, -0.0]),
), max_size=64))
def test_fp16_conversion_rounds_to_nearest_even(numbers):
    weights = np.array(numbers, dtype=np.float32)
    expected = [struct.unpack("<H", struct.pack("<e", float(number)))[0] for number in weights]

    converted, scales = codec.to_format(weights, "fp16")

    finite = np.isfinite(weights)
    assert scales is None and converted.dtype == np.float16
    np.testing.assert_array_equal(converted.view(np.uint16)[finite], np.array(expected, dtype=np.uint16)[finite])
    np.testing.assert_array_equal(np.isnan(converted), np.isnan(weights))


@pytest.mark.parametrize(("fmt", "number"), [("fp16", 65520.0), ("fp16", -1e6), ("bf16", 3.4028235e38)])
def test_float_overflow_names_the_tensor(fmt, number):
    weights = np.array([1.0, number], dtype=np.float32)
    with pytest.raises(OppassError, match="conv1.weight"):
        codec.to_format(weights, fmt, name="conv1.weight")


def test_fp16_largest_values_below_the_rounding_threshold_stay_finite():
    converted, _ = codec.to_format(np.array([65519.0, -65519.0, np.inf], dtype=np.float32), "fp16")
    np.testing.assert_array_equal(converted, np.array([65504.0, -65504.0, np.inf], dtype=np.float16))


def int8_reference(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric quantization written channel by channel, element by element."""
    channels = np.moveaxis(weights, axis, 0)
    scales, quantized = [], np.zeros(channels.shape, dtype=np.int8)
    for index, channel in enumerate(channels):
        largest = max((abs(float(value)) for value in channel.reshape(-1)), default=0.0)
        scale = np.float32(largest) / np.float32(127)
        scale = scale if scale > 0 else np.float32(1.0)
        scales.append(scale)
        for position, value in np.ndenumerate(channel):
            quantized[(index, *position)] = min(127, max(-127, round(float(np.float32(value) / scale))))
    return np.moveaxis(quantized, 0, axis), np.array(scales, dtype=np.float32)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_int8_quantization_is_symmetric_per_channel(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    elements = st.one_of(st.floats(-8.0, 8.0, width=32), st.just(0.0), st.integers(-4, 4).map(lambda n: n / 2))
    weights = data.draw(hnp.arrays(np.float32, shape, elements=elements))

    quantized, scales = codec.to_format(weights, "int8", axis=axis)

    expected_codes, expected_scales = int8_reference(weights, axis)
    assert quantized.dtype == np.int8 and scales.dtype == np.float32
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(quantized, expected_codes)


def test_int8_channel_extremes_map_to_127_and_zero_channels_get_unit_scale():
    weights = np.array([[0.5, -2.0, 1.2], [0.0, 0.0, 0.0], [3.0, 1.0, -0.6], [1e-44, 0.0, -1e-45]], np.float32)
    quantized, scales = codec.to_format(weights, "int8", axis=0)
    np.testing.assert_array_equal(scales, [np.float32(2) / np.float32(127), 1.0, np.float32(3) / np.float32(127), 1.0])
    np.testing.assert_array_equal(quantized, [[32, -127, 76], [0, 0, 0], [127, 42, -25], [0, 0, 0]])


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_weights_already_in_the_format_pass_through(fmt):
    weights = as_weights(np.arange(6) * 37, fmt)
    converted, scales = codec.to_format(weights, fmt)
    assert converted is weights and scales is None


@pytest.mark.parametrize(
    ("weights", "fmt", "options", "message"),
    [
        (np.ones(3, np.float32), "uint8", {}, "cannot convert w from float32 to uint8"),
        (np.ones(3, np.float64), "fp16", {}, "cannot convert w from float64 to fp16"),
        (np.ones((2, 2), np.float32), "int8", {"axis": 2}, "axis 2 is out of range"),
        (np.array([1.0, np.nan], np.float32), "int8", {}, "NaN or infinity"),
        (np.ones(3, np.float32), "fp8", {}, "unknown weight format 'fp8'"),
    ],
)
def test_to_format_rejects_bad_input(weights, fmt, options, message):
    with pytest.raises(OppassError, match=message):
        codec.to_format(weights, fmt, name="w", **options)


@pytest.mark.parametrize(
    ("fmt", "word", "expected"),
    [("fp32", "weight", 32), ("bf16", "weight", 16), ("int8", "weight", 8), ("fp32", 32, 32), ("fp16", 16, 16),
     ("int8", 8, 8), ("uint8", "64", 64), ("fp32", np.int64(512), 512), ("int8", "16", 16)],
)
def test_word_bits_accepts_weight_ints_and_numeric_strings(fmt, word, expected):
    assert codec.word_bits(fmt, word) == expected


@pytest.mark.parametrize(
    ("fmt", "word", "message"),
    [("fp32", 16, "invalid word size 16 for fp32"), ("fp32", 8, "invalid word size 8"),
     ("bf16", 8, "invalid word size 8"), ("int8", 24, "invalid word size 24"), ("fp16", 1024, "1024"),
     ("int8", "sixty-four", "invalid word size 'sixty-four'"), ("fp32", True, "invalid word size True"),
     ("fp32", 64.0, "invalid word size 64.0"), ("int4", 64, "unknown weight format 'int4'")],
)
def test_word_bits_rejects_bad_words_in_one_line(fmt, word, message):
    with pytest.raises(OppassError, match=message) as error:
        codec.word_bits(fmt, word)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("n_weights", "fmt", "word_bits", "shape", "dtype"),
    [(0, "fp32", 64, (0, 1), "<u8"), (3, "fp32", 64, (2, 1), "<u8"), (33, "int8", 512, (1, 8), "<u8"),
     (5, "uint8", 8, (5, 1), "<u1"), (5, "fp16", 32, (3, 1), "<u4"), (9, "bf16", 128, (2, 2), "<u8"),
     (4, "bf16", 16, (4, 1), "<u2")],
)
def test_packed_shape_and_storage_dtype(n_weights, fmt, word_bits, shape, dtype):
    assert codec.packed_shape(n_weights, fmt, word_bits) == shape
    assert codec.storage_dtype(word_bits) == np.dtype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int8, np.uint8])
def test_format_of_names_each_format(dtype):
    assert formats.FORMATS[codec.format_of(dtype)].dtype == np.dtype(dtype)


def test_format_of_rejects_other_dtypes():
    with pytest.raises(OppassError, match="no weight format for dtype float64"):
        codec.format_of(np.float64)


def test_encode_rejects_unknown_flip_strategy():
    with pytest.raises(OppassError, match="unknown flip strategy 'smallest'"):
        codec.encode(np.ones(4, np.float32), 64, "smallest")


@pytest.mark.parametrize(
    ("packed", "shape", "message"),
    [(np.zeros((2, 1), np.uint32), (3,), "dtype uint32, expected uint64"),
     (np.zeros((3, 1), np.uint64), (3,), r"shape \[3, 1\], expected \[2, 1\]"),
     (np.zeros((2, 2), np.uint64), (3,), r"shape \[2, 2\], expected \[2, 1\]"),
     (np.zeros((0, 1), np.uint64), (2, -1), "must be non-negative")],
)
def test_decode_rejects_mismatched_packed_tensors(packed, shape, message):
    with pytest.raises(OppassError, match=message):
        codec.decode(packed, "fp32", 64, shape)


def test_zero_size_tensors_have_zero_words():
    encoded = codec.encode(np.zeros((0, 3), np.float16), 128, "min-error")
    result = codec.decode(encoded.packed, "fp16", 128, (0, 3))
    decoded, masked = result.weights, result.masked_words
    assert encoded.packed.shape == (0, 2) and encoded.changed_words == 0
    assert decoded.shape == (0, 3) and masked == 0


def test_byte_order_of_inputs_does_not_change_the_result():
    weights = np.linspace(-3, 3, 11, dtype=np.float32)
    native = codec.encode(weights, 128, "largest")
    swapped = codec.encode(weights.astype(">f4"), 128, "largest")
    result = codec.decode(native.packed.astype(">u8"), "fp32", 128, weights.shape)
    decoded, masked = result.weights, result.masked_words
    np.testing.assert_array_equal(swapped.packed, native.packed)
    np.testing.assert_array_equal(as_codes(decoded), as_codes(native.adjusted))
    assert masked == 0


@pytest.mark.parametrize(("fmt", "word", "flip"), CONFIGS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_changed_lists_the_changed_weights_and_adjusted_can_be_skipped(fmt, word, flip, data):
    word_bits = codec.word_bits(fmt, word)
    codes = data.draw(weight_codes(fmt, word_bits))
    assume(can_encode(codes, fmt, word_bits))
    weights = as_weights(codes, fmt)
    encoded = codec.encode(weights, word_bits, flip)
    lean = codec.encode(weights, word_bits, flip, adjusted=False)

    changed = np.flatnonzero(as_codes(encoded.adjusted).reshape(-1) != as_codes(weights).reshape(-1))
    np.testing.assert_array_equal(encoded.changed, changed)
    assert encoded.changed.size == encoded.changed_words
    assert lean.adjusted is None
    np.testing.assert_array_equal(lean.packed, encoded.packed)
    np.testing.assert_array_equal(lean.changed, encoded.changed)
    np.testing.assert_array_equal(as_codes(lean.changed_values), as_codes(encoded.adjusted.reshape(-1)[changed]))
    assert lean.changed_values.dtype == weights.dtype


@pytest.mark.parametrize(
    ("codes", "fmt", "as_dtype", "subnormals", "nonfinite"),
    [([0x00000001, 0x80000000, 0x007FFFFF, 0x00800000, 0x7F800000, 0x7FC00000], "fp32", None, 2, 2),
     ([0x0001, 0x03FF, 0x0400, 0x8000, 0x7C00], "fp16", None, 2, 1),
     ([0x0001, 0x03FF, 0x0400, 0x8000, 0x7C00], "fp16", np.float32, 0, 1),
     ([0x0001, 0x807F, 0x0080, 0xFF81], "bf16", np.float32, 2, 1),
     ([0x00, 0x01, 0xFF], "int8", None, 0, 0)],
)
def test_subnormal_and_nonfinite_counts(codes, fmt, as_dtype, subnormals, nonfinite):
    weights = as_weights(np.array(codes), fmt)
    assert codec.subnormal_count(weights, as_dtype) == subnormals
    assert codec.nonfinite_count(weights) == nonfinite


def test_vector_files_are_the_generators_output(tmp_path):
    generator = Path(__file__).resolve().parent.parent / "tools" / "make_format_vectors.py"
    subprocess.run([sys.executable, str(generator), str(tmp_path)], check=True, capture_output=True)

    for name in ("format_vectors.json", "code_vectors.json"):
        assert (tmp_path / name).read_bytes() == (Path(__file__).parent / "vectors" / name).read_bytes(), name
