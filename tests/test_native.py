"""The C encoder (custom_ops/encoder.c through oppass.native) against the numpy codec, its reference.

Every format, word size and flip strategy: the format vectors, random tensors rich in special
values, chunked as the pass chunks them; conversions on random and boundary bit patterns; counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from oppass import codec, encoder, formats, native
from oppass.errors import OppassError

VECTORS = [case for case in json.loads((Path(__file__).parent / "vectors" / "format_vectors.json").read_text())
           if case.get("code", "parity") == "parity"]
CONFIGS = [
    (fmt, word, flip)
    for fmt, weight_format in formats.FORMATS.items()
    for word in formats.WORD_SIZES
    if word == "weight" or word >= weight_format.bits
    for flip in formats.FLIP_STRATEGIES
]
SPECIAL_CODES = {
    "fp32": [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F800000, 0xFF800000, 0x7FC00000,
             0x7F800001, 0x7F7FFFFF, 0xFF800001],
    "bf16": [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x7F7F, 0xFF81],
    "fp16": [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x7BFF, 0xFC01],
    "int8": [0x00, 0x80, 0x7F, 0xFF, 0x81, 0x01],
    "uint8": [0x00, 0xFF, 0x80, 0x7F, 0x01],
}
SETTINGS = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True)
def _c_encoder(custom_op_library: str) -> None:
    if not native.available():
        pytest.fail(f"the library {custom_op_library} has no C encoder")


def weights_of(codes: np.ndarray, fmt: str) -> np.ndarray:
    return np.asarray(codes, dtype=formats.FORMATS[fmt].code_dtype).view(formats.FORMATS[fmt].dtype)


@st.composite
def weight_codes(draw: st.DrawFn, fmt: str, word_bits: int) -> np.ndarray:
    """Random codes, often special values, spanning up to 40 words, often ending inside a word."""
    per_word = word_bits // formats.FORMATS[fmt].bits
    count = draw(st.integers(0, 40 * per_word))
    elements = st.one_of(st.integers(0, 2 ** formats.FORMATS[fmt].bits - 1), st.sampled_from(SPECIAL_CODES[fmt]))
    return draw(hnp.arrays(formats.FORMATS[fmt].code_dtype, count, elements=elements))


def native_encoding(codes: np.ndarray, fmt: str, word_bits: int, flip: str,
                    split_words: int | None = None) -> tuple[np.ndarray, np.ndarray, int, float, int]:
    """(adjusted codes, changed indices, changed words, max relative change, stuck words) from the C encoder,
    the tensor cut into two chunks after `split_words` words when given."""
    per_word = word_bits // formats.FORMATS[fmt].bits
    weights = weights_of(codes.copy(), fmt)
    cut = weights.size if split_words is None else min(split_words * per_word, weights.size)
    changed, total, largest, stuck = [], 0, 0.0, 0
    for start, chunk in ((0, weights[:cut]), (cut, weights[cut:])):
        slots = np.full(max(-(-chunk.size // per_word), 1), -1, dtype=np.int64)
        summary = native.encode_parity(chunk, fmt, word_bits, flip, slots)
        changed.append(slots[:summary.changed_words] + start)
        total += summary.changed_words
        largest = max(largest, summary.max_relative_change)
        stuck += summary.stuck_words
    return weights.view(codes.dtype), np.concatenate(changed), total, largest, stuck


@pytest.mark.parametrize("case", VECTORS, ids=[case["name"] for case in VECTORS])
def test_c_encoder_matches_the_format_vectors(case):
    fmt = case["format"]
    codes = np.array(case["weights"], dtype=np.uint64).astype(formats.FORMATS[fmt].code_dtype)
    adjusted, _, changed_words, _, stuck = native_encoding(codes, fmt, case["word_bits"], case["flip"])
    if "error" in case:
        assert stuck > 0
        return
    assert stuck == 0
    np.testing.assert_array_equal(adjusted, case["adjusted"])
    assert changed_words == case["changed_words"]


@pytest.mark.parametrize(("fmt", "word", "flip"), CONFIGS)
@SETTINGS
@given(data=st.data())
def test_c_encoder_is_bit_identical_to_the_codec(fmt, word, flip, data):
    word_bits = codec.word_bits(fmt, word)
    codes = data.draw(weight_codes(fmt, word_bits))
    split = data.draw(st.integers(0, 40))
    adjusted, changed, changed_words, largest, stuck = native_encoding(codes, fmt, word_bits, flip, split)
    try:
        reference = codec.encode(weights_of(codes, fmt), word_bits, flip)
    except OppassError:
        assert stuck > 0
        return
    assert stuck == 0
    assert reference.adjusted is not None
    np.testing.assert_array_equal(adjusted, reference.adjusted.view(codes.dtype))
    np.testing.assert_array_equal(changed, reference.changed)
    assert changed_words == reference.changed_words
    before = weights_of(codes, fmt)[reference.changed]
    assert largest == encoder.max_relative_change(before, reference.changed_values)


@pytest.mark.parametrize(("fmt", "word"), [(fmt, word) for fmt, word, flip in CONFIGS if flip == "word-lsb"])
@SETTINGS
@given(data=st.data())
def test_word_lsb_fast_path_is_bit_identical_to_the_general_path_and_the_codec(fmt, word, data):
    """Without the changed indices word-lsb takes its own loop; with them, the general one."""
    word_bits = codec.word_bits(fmt, word)
    per_word = word_bits // formats.FORMATS[fmt].bits
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    plain = rng.integers(0, 2 ** formats.FORMATS[fmt].bits, data.draw(st.integers(0, 300 * per_word)))
    special = rng.random(plain.size) < data.draw(st.sampled_from([0.0, 0.001, 0.02, 0.3]))
    plain[special] = rng.choice(SPECIAL_CODES[fmt], int(special.sum()))
    codes = np.concatenate([data.draw(weight_codes(fmt, word_bits)), plain]).astype(formats.FORMATS[fmt].code_dtype)
    general = weights_of(codes.copy(), fmt)
    general_summary = native.encode_parity(general, fmt, word_bits, "word-lsb",
                                           np.zeros(max(-(-codes.size // per_word), 1), np.int64))
    fast = weights_of(codes.copy(), fmt)
    assert native.encode_parity(fast, fmt, word_bits, "word-lsb") == general_summary
    np.testing.assert_array_equal(fast.view(codes.dtype), general.view(codes.dtype))
    try:
        reference = codec.encode(weights_of(codes, fmt), word_bits, "word-lsb")
    except OppassError:
        assert general_summary.stuck_words > 0
        return
    assert reference.adjusted is not None
    np.testing.assert_array_equal(fast.view(codes.dtype), reference.adjusted.view(codes.dtype))
    assert general_summary.changed_words == reference.changed_words


@pytest.mark.parametrize(("fmt", "judged"), [(fmt, judged) for fmt in formats.FORMATS
                                             for judged in formats.FORMATS[fmt].output_dtypes])
@SETTINGS
@given(data=st.data())
def test_c_counts_equal_the_codec_counts(fmt, judged, data):
    codes = data.draw(weight_codes(fmt, formats.FORMATS[fmt].bits))
    weights = weights_of(codes, fmt)
    threshold = encoder._subnormal_threshold(fmt, judged)
    subnormals, nonfinite = native.count_weights(weights, fmt, threshold)
    assert subnormals == codec.subnormal_count(weights, judged)
    assert nonfinite == codec.nonfinite_count(weights)


def boundary_fp32_codes(target: str) -> np.ndarray:
    """fp32 codes at and around every rounding boundary of the target's binades, subnormals and overflow."""
    kept_bits = 16 if target == "bf16" else 13
    exponents = np.arange(0, 256, dtype=np.uint32) << 23
    mantissas = np.array([0, 1, (1 << kept_bits) - 1, 1 << (kept_bits - 1), (1 << (kept_bits - 1)) + 1,
                          (1 << (kept_bits - 1)) - 1, 3 << (kept_bits - 1), 0x7FFFFF, 0x7FE000, 0x400000],
                         dtype=np.uint32)
    codes = (exponents[:, None] | mantissas[None, :]).reshape(-1)
    # fp16 subnormals drop 14 to 25 bits of the significand: the points around each of those halves
    shifts = np.arange(13, 25, dtype=np.uint32)
    low = ((np.uint32(1) << shifts)[:, None] * np.array([0, 1, 1, 1, 3], np.uint32)
           + np.array([0, 0, -1, 1, 0], np.int64).astype(np.uint32))
    halves = (exponents[:, None] | (low.reshape(-1) & 0x7FFFFF)[None, :]).reshape(-1)
    codes = np.concatenate([codes, halves])
    return np.concatenate([codes, codes | 0x80000000])


@pytest.mark.parametrize("target", ["bf16", "fp16"])
@settings(max_examples=40, deadline=None)
@given(random_codes=hnp.arrays(np.uint32, st.integers(0, 3000)))
def test_c_conversion_rounds_like_the_codec(target, random_codes):
    codes = np.concatenate([boundary_fp32_codes(target), random_codes])
    weights = codes.view(np.float32)
    out = np.zeros(weights.size, formats.FORMATS[target].dtype)
    summary = native.convert_fp32(weights, out, target)
    with np.errstate(over="ignore", invalid="ignore"):
        reference = weights.astype(formats.FORMATS[target].dtype)
    finite = np.isfinite(weights)
    overflow = finite & ~np.isfinite(reference)
    converted = finite & ~overflow
    np.testing.assert_array_equal(out.view(np.uint16)[converted], reference.view(np.uint16)[converted])
    assert summary.nonfinite_inputs == int((~finite).sum())
    assert summary.overflows == int(overflow.sum())
    original64 = weights[converted].astype(np.float64)
    assert summary.max_difference == float(np.abs(reference[converted].astype(np.float64) - original64)
                                           .max(initial=0.0))
    assert summary.max_magnitude == float(np.abs(weights[finite].astype(np.float64)).max(initial=0.0))


def test_c_conversion_agrees_on_every_fp16_halfway_point():
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    steps = np.nextafter(halves[1:], np.float32(np.inf)) - halves[1:]  # any value between two fp16 values
    points = np.concatenate([(halves[:-1] + halves[1:]) / 2, halves, halves[1:] + steps, -halves])
    out = np.zeros(points.size, np.float16)
    native.convert_fp32(points, out, "fp16")
    np.testing.assert_array_equal(out.view(np.uint16), points.astype(np.float16).view(np.uint16))


def test_c_encoder_refuses_what_the_format_does_not_define():
    weights = np.zeros(4, np.float32)
    for fmt, word_bits, flip in [("fp64", 64, "word-lsb"), ("fp32", 8, "word-lsb"), ("fp32", 48, "word-lsb"),
                                 ("fp32", 64, "smallest"), ("bf16", 1024, "largest")]:
        with pytest.raises(OppassError, match="refused its arguments"):
            native.encode_parity(weights, fmt, word_bits, flip)
    with pytest.raises(OppassError, match="refused its arguments"):
        native.convert_fp32(weights, np.zeros(4, np.uint16), "int8")
    with pytest.raises(ValueError, match="writable"):
        native.encode_parity(np.frombuffer(bytes(16), np.float32), "fp32", 64, "word-lsb")


# ----------------------------------------------------------------------------- the tensor encoder


ENCODINGS = [
    ("fp32", "fp32", "64", "word-lsb", True),
    ("fp32", "fp32", "weight", "largest", True),
    ("fp32", "bf16", "512", "min-error", True),
    ("fp32", "fp16", "128", "word-lsb", True),
    ("fp32", "bf16", "64", "word-lsb", False),
    ("fp32", "int8", "64", "largest", True),
    ("fp16", "fp16", "32", "min-error", True),
    ("bf16", "bf16", "weight", "word-lsb", True),
    ("int8", "int8", "256", "largest", True),
    ("uint8", "uint8", "16", "min-error", True),
]


def encode_tensor(weights: np.ndarray, target: str, word: str, flip: str | None, checked: bool,
                  reference: bool, code: str = "parity", measure_range: bool = False) -> tuple[bytes, encoder.Figures]:
    source = codec.format_of(weights.dtype)
    width = codec.word_bits(target, word, code)
    output = formats.FORMATS[target].output_dtypes[-1 if target in ("bf16", "fp16") else 0]
    flat = weights.reshape(-1)
    axis = flat.size % weights.ndim  # varied with the shape: runs of one or more weights per channel
    scales = None
    if target == "int8" and source != "int8":  # measured chunk by chunk, as the pass measures them
        scales = codec.int8_scales((flat[start:start + 5] for start in range(0, flat.size, 5)), weights.shape, axis)
    tensor = encoder.TensorEncoder(name="w", source_format=source, target_format=target, word_bits=width, code=code,
                                   flip=flip, checked=checked, output_dtype=output, shape=weights.shape, axis=axis,
                                   scales=scales, measure_range=measure_range, reference=reference)
    parts = [encoder_output.tobytes() for encoder_output in
             (tensor.encode(flat[start:start + tensor.chunk_weights].copy())
              for start in range(0, max(flat.size, 1), tensor.chunk_weights))]
    return b"".join(parts) + tensor.tail, tensor.figures()


@pytest.mark.parametrize(("source", "target", "word", "flip", "checked"), ENCODINGS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_chunked_c_encoding_gives_the_codec_bytes_and_figures(source, target, word, flip, checked, data,
                                                              monkeypatch_module):
    monkeypatch_module.setattr(encoder, "CHUNK_WEIGHTS", 64 * data.draw(st.integers(1, 4)))
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    codes = data.draw(hnp.arrays(formats.FORMATS[source].code_dtype, shape, elements=st.one_of(
        st.integers(0, 2 ** formats.FORMATS[source].bits - 1), st.sampled_from(SPECIAL_CODES[source]))))
    weights = weights_of(codes, source)
    if target != source:  # conversions refuse NaN (int8) and out-of-range values: keep to the common case
        weights = np.random.default_rng(int(codes.sum())).standard_normal(shape).astype(np.float32)
        weights.reshape(-1)[:: 7] = 0
    try:
        numpy_bytes, numpy_figures = encode_tensor(weights, target, word, flip, checked, reference=True)
    except OppassError:  # a word of infinities
        with pytest.raises(encoder.ReferenceNeeded):
            encode_tensor(weights, target, word, flip, checked, reference=False)
        return
    c_bytes, c_figures = encode_tensor(weights, target, word, flip, checked, reference=False)
    assert c_bytes == numpy_bytes
    assert c_figures == numpy_figures


SECDED_ENCODINGS = [  # (source, target, word, checked)
    ("fp32", "fp32", "64", True),
    ("fp32", "bf16", "128", True),
    ("fp32", "fp16", "32", False),
    ("fp16", "fp16", "16", True),
    ("int8", "int8", "512", True),
    ("fp32", "int8", "64", True),
]


@pytest.mark.parametrize("code", ["secded", "parity"])
@pytest.mark.parametrize(("source", "target", "word", "checked"), SECDED_ENCODINGS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_chunked_codec_encoding_gives_the_whole_tensor_bytes_figures_and_range(code, source, target, word, checked,
                                                                               data):
    shape = tuple(data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)))
    if target != source:
        weights = np.random.default_rng(data.draw(st.integers(0, 99))).standard_normal(shape).astype(np.float32)
    else:
        codes = data.draw(hnp.arrays(formats.FORMATS[source].code_dtype, shape,
                                     elements=st.integers(0, 2 ** formats.FORMATS[source].bits - 1)))
        weights = weights_of(codes, source)
    flip = None if code == "secded" else "min-error"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "available", lambda: False)  # the numpy codec, chunk by chunk
        patch.setattr(encoder, "CHUNK_WEIGHTS", 64 * data.draw(st.integers(1, 4)))
        try:
            whole_bytes, whole_figures = encode_tensor(weights, target, word, flip, checked, reference=True,
                                                       code=code, measure_range=True)
        except OppassError:  # a parity word of infinities
            with pytest.raises(encoder.ReferenceNeeded):
                encode_tensor(weights, target, word, flip, checked, reference=False, code=code)
            return
        chunked_bytes, chunked_figures = encode_tensor(weights, target, word, flip, checked, reference=False,
                                                       code=code, measure_range=True)
    assert chunked_bytes == whole_bytes
    assert chunked_figures == whole_figures
    if not checked and code == "parity":
        return  # odd words left odd: a decode would mask them
    width = codec.word_bits(target, word, code)
    packed = np.frombuffer(whole_bytes, codec.storage_dtype(width)).reshape(
        codec.packed_shape(weights.size, target, width))
    decoded = codec.decode(packed, target, width, shape, code=code)
    assert decoded.masked_words == 0 and whole_figures.fault_free_max == codec.max_magnitude(decoded.weights)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_errors_the_c_encoder_meets_go_to_the_codec():
    infinities = np.full(3, -np.inf, np.float32)  # the last word: one -inf, of odd parity
    tensor = encoder.TensorEncoder(name="w", source_format="fp32", target_format="fp32", word_bits=64,
                                   flip="word-lsb", checked=True, output_dtype=np.float32, shape=(3,))
    with pytest.raises(encoder.ReferenceNeeded):
        tensor.encode(infinities.copy())
    tensor = encoder.TensorEncoder(name="w", source_format="fp32", target_format="bf16", word_bits=64,
                                   flip="word-lsb", checked=True, output_dtype=np.float32, shape=(2,))
    with pytest.raises(encoder.ReferenceNeeded):
        tensor.encode(np.array([1.0, 3.4e38], np.float32))


def test_c_conversion_keeps_the_codecs_nan_and_infinity_bits():
    weights = np.array([np.nan, -np.inf, np.inf, 1.5, -0.0], np.float32)
    weights.view(np.uint32)[0] = 0x7F800001  # a signalling NaN: its payload is the codec's business
    c_bytes, c_figures = encode_tensor(weights, "bf16", "64", "word-lsb", True, reference=False)
    numpy_bytes, numpy_figures = encode_tensor(weights, "bf16", "64", "word-lsb", True, reference=True)
    assert c_bytes == numpy_bytes
    assert c_figures == numpy_figures
    assert np.isnan(np.frombuffer(c_bytes, ml_dtypes.bfloat16)[0])
