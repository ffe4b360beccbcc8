"""The ParityCheckUnpack onnxruntime kernel (custom_ops/parity_check_unpack.c) against docs/FORMAT.md.

Each test builds a one-node ONNX model (packed initializer -> ParityCheckUnpack -> weights,
masked_words) and runs it with the compiled library; outputs are compared bit for bit, as raw
bytes, with the normative vectors and with `oppass.codec`.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from oppass import codec, formats, runtime, schema
from oppass.errors import OppassError

VECTORS = Path(__file__).parent / "vectors" / "format_vectors.json"
NODE_NAME = "decode_under_test"
PACKED = "packed"
OUTPUTS = ("weights", "masked_words")
CHECKS = ("runtime", "load", "none")

OUTPUT_TYPES = {
    "fp32": (TensorProto.FLOAT,),
    "bf16": (TensorProto.BFLOAT16, TensorProto.FLOAT),
    "fp16": (TensorProto.FLOAT16, TensorProto.FLOAT),
    "int8": (TensorProto.INT8,),
    "uint8": (TensorProto.UINT8,),
}
ORT_TYPE_NAMES = {
    TensorProto.FLOAT: "tensor(float)",
    TensorProto.BFLOAT16: "tensor(bfloat16)",
    TensorProto.FLOAT16: "tensor(float16)",
    TensorProto.INT8: "tensor(int8)",
    TensorProto.UINT8: "tensor(uint8)",
}


def valid_word_bits(fmt: str) -> list[int]:
    """Every distinct W allowed for the format."""
    widths = set()
    for word in formats.WORD_SIZES:
        try:
            widths.add(codec.word_bits(fmt, word))
        except OppassError:
            continue
    return sorted(widths)


LAYOUTS = [
    (fmt, width, output_type)
    for fmt in formats.FORMATS
    for width in valid_word_bits(fmt)
    for output_type in OUTPUT_TYPES[fmt]
]


def layout_id(layout: tuple[str, int, int]) -> str:
    fmt, width, output_type = layout
    return f"{fmt}-W{width}-{TensorProto.DataType.Name(output_type)}"


# ----------------------------------------------------------------------------- model building


def decoder_model(
    packed: np.ndarray | None,
    *,
    attributes: dict[str, object],
    packed_input: onnx.ValueInfoProto | None = None,
    weights_output: onnx.ValueInfoProto | None = None,
) -> onnx.ModelProto:
    """One ParityCheckUnpack node; `packed` becomes an initializer, or `packed_input` a graph input."""
    node = helper.make_node("ParityCheckUnpack", [PACKED], list(OUTPUTS), domain=schema.DOMAIN, name=NODE_NAME)
    node.attribute.extend(make_attribute(name, value) for name, value in attributes.items())
    graph = helper.make_graph(
        [node],
        "parity_check_unpack_test",
        inputs=[packed_input] if packed_input is not None else [],
        outputs=[
            weights_output if weights_output is not None else helper.make_empty_tensor_value_info(OUTPUTS[0]),
            helper.make_tensor_value_info(OUTPUTS[1], TensorProto.INT64, []),
        ],
        initializer=[numpy_helper.from_array(packed, PACKED)] if packed is not None else [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(schema.DOMAIN, 1)])


def make_attribute(name: str, value: object) -> onnx.AttributeProto:
    """An attribute; lists are INTS even when empty (a scalar's shape)."""
    if isinstance(value, (list, tuple)):
        return helper.make_attribute(name, list(value), attr_type=onnx.AttributeProto.INTS)
    return helper.make_attribute(name, value)


def decode_attributes(fmt: str, width: int, shape: Sequence[int], check: str, output_type: int) -> dict[str, object]:
    return {"format": fmt, "word_bits": width, "shape": list(shape), "check": check, "output_type": output_type}


def raw_bytes(value: ort.OrtValue) -> np.ndarray:
    """The tensor's bytes (bfloat16 has no numpy type, so outputs are compared as bytes)."""
    size = value.tensor_size_in_bytes()
    data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(data, dtype=np.uint8)


def run_decoder(session: ort.InferenceSession, feeds: dict | None = None) -> tuple[ort.OrtValue, int]:
    weights, masked = session.run_with_ort_values(list(OUTPUTS), feeds or {})
    return weights, int(masked.numpy())


def decode_with_kernel(
    packed: np.ndarray, fmt: str, width: int, shape: Sequence[int], check: str, output_type: int
) -> tuple[np.ndarray, int]:
    """Output codes (unsigned ints of the output element width) and masked count from the kernel."""
    model = decoder_model(packed, attributes=decode_attributes(fmt, width, shape, check, output_type))
    session = ort.InferenceSession(model.SerializeToString(), runtime.session_options())
    weights, masked = run_decoder(session)
    assert weights.data_type() == ORT_TYPE_NAMES[output_type]
    assert weights.shape() == list(shape)
    element_bytes = 4 if output_type == TensorProto.FLOAT else formats.FORMATS[fmt].bits // 8
    return raw_bytes(weights).view(f"<u{element_bytes}"), masked


# ----------------------------------------------------------------------------- expected values


def widened_fp16_bits(codes: np.ndarray) -> np.ndarray:
    """binary32 bits of binary16 codes: exact values, and NaNs keeping sign and payload."""
    codes32 = codes.astype(np.uint32)
    exact = codes.view(np.float16).astype(np.float32).view(np.uint32)
    is_nan = ((codes32 & 0x7C00) == 0x7C00) & ((codes32 & 0x3FF) != 0)
    nan_bits = ((codes32 & 0x8000) << 16) | 0x7F800000 | ((codes32 & 0x3FF) << 13)
    return np.where(is_nan, nan_bits, exact)


def output_codes(codes: np.ndarray, fmt: str, output_type: int) -> np.ndarray:
    """Raw output element bits for weight codes of `fmt` decoded to `output_type`."""
    codes = np.asarray(codes, dtype=f"u{formats.FORMATS[fmt].bits // 8}").reshape(-1)
    if output_type != TensorProto.FLOAT or fmt == "fp32":
        return codes
    if fmt == "bf16":
        return codes.astype(np.uint32) << 16
    return widened_fp16_bits(codes)


def codec_expectation(
    packed: np.ndarray, fmt: str, width: int, shape: Sequence[int], check: str, output_type: int
) -> tuple[np.ndarray, int]:
    if check == "none":
        weights, masked = codec.unpack(packed, fmt, width, shape), 0
    else:
        weights, masked = codec.decode(packed, fmt, width, shape)
    code_dtype = f"u{formats.FORMATS[fmt].bits // 8}"
    return output_codes(weights.reshape(-1).view(code_dtype), fmt, output_type), masked


def random_weights(rng: np.random.Generator, fmt: str, n: int) -> np.ndarray:
    """Arbitrary bit patterns: NaNs, infinities and subnormals included.

    Every infinity is the one of even parity, so no word is an odd word of infinities (which
    cannot be encoded, FORMAT.md).
    """
    weight_format = formats.FORMATS[fmt]
    codes = rng.integers(0, 1 << weight_format.bits, size=n, dtype=np.uint64).astype(weight_format.code_dtype)
    if weight_format.is_float:
        infinity = ((1 << weight_format.exponent_bits) - 1) << weight_format.mantissa_bits
        even_infinity = infinity if bin(infinity).count("1") % 2 == 0 else infinity | 1 << (weight_format.bits - 1)
        codes[(codes & ((1 << (weight_format.bits - 1)) - 1)) == infinity] = even_infinity
    return codes.view(weight_format.dtype)


def flip_stream_bits(packed: np.ndarray, positions: Sequence[int]) -> None:
    """Flips stream bits (bit s = bit s % 8 of byte s // 8) of a packed tensor in place."""
    stream = packed.reshape(-1).view(np.uint8)
    for position in positions:
        stream[position // 8] ^= np.uint8(1 << (position % 8))


def random_faults(rng: np.random.Generator, packed: np.ndarray, count: int) -> None:
    total_bits = packed.nbytes * 8
    if total_bits:
        flip_stream_bits(packed, rng.choice(total_bits, size=min(count, total_bits), replace=False).tolist())


# ----------------------------------------------------------------------------- (1) normative vectors


def load_vectors() -> list[dict]:
    """The vector cases that have a packed tensor to decode (the others pin encodings that must fail)."""
    return [case for case in json.loads(VECTORS.read_text()) if "packed" in case]


def vector_packed(case: dict) -> np.ndarray:
    dtype = codec.storage_dtype(case["word_bits"])
    lanes = max(1, case["word_bits"] // 64)
    return np.array([[int(lane) for lane in word] for word in case["packed"]], dtype=dtype).reshape(-1, lanes)


VECTOR_RUNS = [
    pytest.param(case, output_type, id=f"{case['name']}-{TensorProto.DataType.Name(output_type)}")
    for case in load_vectors()
    for output_type in OUTPUT_TYPES[case["format"]]
]


@pytest.mark.parametrize(("case", "output_type"), VECTOR_RUNS)
def test_vectors_decode_clean_words_unchanged(case: dict, output_type: int) -> None:
    fmt = case["format"]
    decoded, masked = decode_with_kernel(
        vector_packed(case), fmt, case["word_bits"], case["shape"], "runtime", output_type
    )
    np.testing.assert_array_equal(decoded, output_codes(case["adjusted"], fmt, output_type))
    assert masked == 0


@pytest.mark.parametrize(
    ("case", "output_type"), [run for run in VECTOR_RUNS if "decoded_after_faults" in run.values[0]]
)
@pytest.mark.parametrize("check", ["runtime", "load"])
def test_vectors_mask_faulty_words(case: dict, output_type: int, check: str) -> None:
    fmt = case["format"]
    faults = case["decoded_after_faults"]
    packed = vector_packed(case)
    flip_stream_bits(packed, faults["flipped_bits"])
    decoded, masked = decode_with_kernel(packed, fmt, case["word_bits"], case["shape"], check, output_type)
    np.testing.assert_array_equal(decoded, output_codes(faults["decoded"], fmt, output_type))
    assert masked == faults["masked_words"]


# ----------------------------------------------------------------------------- (2) random tensors vs the codec

SMALL_SHAPES = [(), (0, 5), (1,), (37,), (3, 7, 195)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("check", CHECKS)
def test_random_small_tensors_match_codec(layout: tuple[str, int, int], check: str) -> None:
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type, len(fmt), CHECKS.index(check)])
    for shape in SMALL_SHAPES:
        packed = codec.encode(random_weights(rng, fmt, int(np.prod(shape))).reshape(shape), width).packed.copy()
        for faults in (0, 1, 9):
            faulty = packed.copy()
            random_faults(rng, faulty, faults)
            decoded, masked = decode_with_kernel(faulty, fmt, width, shape, check, output_type)
            expected, expected_masked = codec_expectation(faulty, fmt, width, shape, check, output_type)
            np.testing.assert_array_equal(decoded, expected, err_msg=f"shape {shape}, {faults} faults")
            assert masked == expected_masked


LARGE_WEIGHTS = 1_000_003  # > 256 KiB of packed bytes for every format: several parallel tasks


@pytest.mark.parametrize("faults", [5, 3000], ids=["sparse-faults", "dense-faults"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_random_large_tensors_match_codec_in_parallel(layout: tuple[str, int, int], faults: int) -> None:
    """Sparse faults leave most of the kernel's 8 KiB scan chunks clean; dense ones hit every chunk."""
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type, len(fmt), LARGE_WEIGHTS, faults])
    shape = (LARGE_WEIGHTS,)
    packed = codec.encode(random_weights(rng, fmt, LARGE_WEIGHTS), width).packed.copy()
    random_faults(rng, packed, faults)
    decoded, masked = decode_with_kernel(packed, fmt, width, shape, "runtime", output_type)
    expected, expected_masked = codec_expectation(packed, fmt, width, shape, "runtime", output_type)
    np.testing.assert_array_equal(decoded, expected)
    assert masked == expected_masked > 0


@pytest.mark.parametrize("check", ["load", "none"])
@pytest.mark.parametrize("layout", [("fp32", 64, TensorProto.FLOAT), ("fp16", 512, TensorProto.FLOAT),
                                    ("int8", 8, TensorProto.INT8)], ids=layout_id)
def test_large_tensors_in_load_and_none_modes(layout: tuple[str, int, int], check: str) -> None:
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type, CHECKS.index(check)])
    shape = (1001, 999)
    packed = codec.encode(random_weights(rng, fmt, 1001 * 999).reshape(shape), width).packed.copy()
    random_faults(rng, packed, 500)
    decoded, masked = decode_with_kernel(packed, fmt, width, shape, check, output_type)
    expected, expected_masked = codec_expectation(packed, fmt, width, shape, check, output_type)
    np.testing.assert_array_equal(decoded, expected)
    assert masked == expected_masked


def test_masked_words_output_is_optional() -> None:
    weights = codec.to_format(np.arange(10, dtype=np.float32), "fp32")[0]
    packed = codec.encode(weights, 64).packed
    model = decoder_model(packed, attributes=decode_attributes("fp32", 64, [10], "runtime", TensorProto.FLOAT))
    del model.graph.node[0].output[1]
    del model.graph.output[1]
    session = ort.InferenceSession(model.SerializeToString(), runtime.session_options())
    (decoded,) = session.run(None, {})
    np.testing.assert_array_equal(decoded, codec.decode(packed, "fp32", 64, [10])[0])


def test_declared_output_type_is_accepted() -> None:
    weights = codec.to_format(np.linspace(-1, 1, 12, dtype=np.float32), "bf16")[0]
    encoded = codec.encode(weights, 32)
    model = decoder_model(
        encoded.packed,
        attributes=decode_attributes("bf16", 32, [3, 4], "runtime", TensorProto.FLOAT),
        weights_output=helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, [3, 4]),
    )
    session = ort.InferenceSession(model.SerializeToString(), runtime.session_options())
    decoded, masked = session.run(None, {})
    np.testing.assert_array_equal(decoded, encoded.adjusted.astype(np.float32).reshape(3, 4))
    assert masked == 0


# ----------------------------------------------------------------------------- (3) hostile models

HOSTILE_RUNNER = """
import sys
import numpy as np
import onnxruntime as ort
from oppass import runtime

feeds = dict(np.load(sys.argv[2])) if len(sys.argv) > 2 else {}
try:
    session = ort.InferenceSession(sys.argv[1], runtime.session_options())
    session.run(None, feeds)
except Exception as error:
    print(error)
    sys.exit(0)
sys.exit(3)
"""

GOOD_PACKED = codec.encode(np.arange(8, dtype=np.float32), 64).packed
GOOD = decode_attributes("fp32", 64, [8], "runtime", TensorProto.FLOAT)


def hostile(case_id: str, message: str, attributes: dict | None = None, packed: np.ndarray | None = GOOD_PACKED,
            feed: np.ndarray | None = None, **model_options: object) -> pytest.param:
    """A model that must be refused with an error naming the node and containing `message`."""
    changed = dict(GOOD)
    for name, value in (attributes or {}).items():
        if value is None:
            del changed[name]
        else:
            changed[name] = value
    model = decoder_model(packed, attributes=changed, **model_options)
    return pytest.param(model, feed, message, id=case_id)


def fed_packed(dtype: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(PACKED, dtype, ["n_words", "lanes"])


HOSTILE_CASES = [
    hostile("unknown-format", "unknown format 'fp64'", {"format": "fp64"}),
    hostile("missing-format", "attribute 'format'", {"format": None}),
    hostile("word-bits-not-a-size", "word_bits 24", {"word_bits": 24}),
    hostile("word-bits-below-format", "word_bits 16 is not valid for fp32", {"word_bits": 16}),
    hostile("word-bits-8-for-bf16", "word_bits 8 is not valid for bf16",
            {"format": "bf16", "word_bits": 8, "output_type": TensorProto.BFLOAT16}),
    hostile("word-bits-negative", "word_bits -64", {"word_bits": -64}),
    hostile("missing-word-bits", "attribute 'word_bits'", {"word_bits": None}),
    hostile("word-bits-is-a-string", "attribute 'word_bits'", {"word_bits": "64"}),
    hostile("unknown-check", "unknown check 'sometimes'", {"check": "sometimes"}),
    hostile("missing-check", "attribute 'check'", {"check": None}),
    hostile("int64-output", "output_type 7 is not allowed for fp32", {"output_type": TensorProto.INT64}),
    hostile("float-output-for-int8", "output_type 1 is not allowed for int8",
            {"format": "int8", "word_bits": 64, "shape": [64]}),
    hostile("bf16-output-for-fp16", "output_type 16 is not allowed for fp16",
            {"format": "fp16", "output_type": TensorProto.BFLOAT16, "shape": [16]}),
    hostile("missing-output-type", "attribute 'output_type'", {"output_type": None}),
    hostile("negative-dim", "negative dimension -1", {"shape": [-1, 8]}),
    hostile("element-count-overflow", "overflows", {"shape": [1 << 40, 1 << 40]}),
    hostile("byte-count-overflow", "overflow the addressable size", {"shape": [1 << 31, 1 << 31]}),
    hostile("missing-shape", "attribute 'shape'", {"shape": None}),
    hostile("fewer-words-than-shape", "expected [5, 1]", {"shape": [9]}),
    hostile("huge-shape-tiny-packed", "expected [1073741824, 1]", {"shape": [1 << 31]}),
    hostile("packed-dtype-mismatch", "element type UINT32, expected UINT64", packed=GOOD_PACKED.view(np.uint32)),
    hostile("packed-rank-1", "rank 1, expected 2", packed=GOOD_PACKED.reshape(-1)),
    hostile("packed-lanes-mismatch", "expected [2, 2]", {"word_bits": 128}),
    hostile("load-check-on-fed-input", "constant initializer", {"check": "load"}, packed=None,
            feed=GOOD_PACKED, packed_input=fed_packed(TensorProto.UINT64)),
    hostile("fed-input-wrong-dims", "expected [4, 1]", packed=None, feed=GOOD_PACKED[:3],
            packed_input=fed_packed(TensorProto.UINT64)),
    hostile("fed-input-signed", "element type INT64, expected UINT64", packed=None, feed=GOOD_PACKED.view(np.int64),
            packed_input=fed_packed(TensorProto.INT64)),
    hostile("declared-output-type-mismatch", "does not match",
            weights_output=helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT16, [8])),
]


@pytest.mark.parametrize(("model", "feed", "message"), HOSTILE_CASES)
def test_hostile_models_fail_cleanly_naming_the_node(
    model: onnx.ModelProto, feed: np.ndarray | None, message: str, tmp_path: Path
) -> None:
    model_path = tmp_path / "hostile.onnx"
    model_path.write_bytes(model.SerializeToString())
    arguments = [sys.executable, "-c", HOSTILE_RUNNER, str(model_path)]
    if feed is not None:
        np.savez(tmp_path / "feeds.npz", **{PACKED: feed})
        arguments.append(str(tmp_path / "feeds.npz"))
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=120)
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {result.stderr}"
    assert result.returncode == 0, f"no error raised (exit {result.returncode}): {result.stderr}"
    assert NODE_NAME in result.stdout
    assert message in result.stdout


# ----------------------------------------------------------------------------- (4) runtime vs load


def session_over_user_buffer(packed: np.ndarray, check: str) -> tuple[ort.InferenceSession, ort.OrtValue]:
    """A session whose packed initializer is `packed`'s own memory (add_initializer, no copy)."""
    shape = [packed.shape[0] * 2]
    model = decoder_model(packed, attributes=decode_attributes("fp32", 64, shape, check, TensorProto.FLOAT))
    value = ort.OrtValue.ortvalue_from_numpy(packed)
    options = runtime.session_options()
    options.add_initializer(PACKED, value)
    return ort.InferenceSession(model.SerializeToString(), options), value


@pytest.mark.parametrize(("check", "masks_late_fault"), [("runtime", True), ("load", False)])
def test_corruption_after_session_creation(check: str, masks_late_fault: bool) -> None:
    weights = np.linspace(-3, 3, 16, dtype=np.float32)
    encoded = codec.encode(weights, 64)
    packed = encoded.packed.copy()
    session, value = session_over_user_buffer(packed, check)
    before, masked_before = run_decoder(session)
    np.testing.assert_array_equal(before.numpy(), encoded.adjusted)
    assert masked_before == 0

    flip_stream_bits(packed, [64 * 3 + 5])  # one bit of word 3 = weights 6 and 7
    after, masked_after = run_decoder(session)
    expected = encoded.adjusted.copy()
    if masks_late_fault:
        expected[6:8] = 0
    np.testing.assert_array_equal(after.numpy(), expected)
    assert masked_after == int(masks_late_fault)
    assert value.data_ptr() == packed.ctypes.data
