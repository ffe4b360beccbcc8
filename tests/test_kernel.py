"""The ParityCheckUnpack onnxruntime kernel (custom_ops/) against docs/FORMAT.md.

Each test builds a one-node ONNX model (packed initializer -> ParityCheckUnpack -> weights,
masked_words) and runs it with the compiled library; outputs are compared bit for bit, as raw
bytes, with the normative vectors and with `oppass.codec`. Section (3) holds the node validation
rules' table of refused and valid nodes, run in one child interpreter (tests/kernel_cases.py).
Section (5) holds code=secded and the range check: code_vectors.json in every output type and check
mode, random tensors with faults against the codec, and the counts outputs.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kernel_cases import Case, Outcome, exact_session_options, run_cases
from onnx import TensorProto, helper, numpy_helper

from oppass import codec, formats, runtime, schema
from oppass.errors import OppassError

VECTORS = Path(__file__).parent / "vectors" / "format_vectors.json"
CODE_VECTORS = Path(__file__).parent / "vectors" / "code_vectors.json"
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
    session = ort.InferenceSession(model.SerializeToString(), exact_session_options())
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
        result = codec.decode(packed, fmt, width, shape)
        weights, masked = result.weights, result.masked_words
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
    session = ort.InferenceSession(model.SerializeToString(), exact_session_options())
    (decoded,) = session.run(None, {})
    np.testing.assert_array_equal(decoded, codec.decode(packed, "fp32", 64, [10]).weights)


def test_declared_output_type_is_accepted() -> None:
    weights = codec.to_format(np.linspace(-1, 1, 12, dtype=np.float32), "bf16")[0]
    encoded = codec.encode(weights, 32)
    model = decoder_model(
        encoded.packed,
        attributes=decode_attributes("bf16", 32, [3, 4], "runtime", TensorProto.FLOAT),
        weights_output=helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, [3, 4]),
    )
    session = ort.InferenceSession(model.SerializeToString(), exact_session_options())
    decoded, masked = session.run(None, {})
    np.testing.assert_array_equal(decoded, encoded.adjusted.astype(np.float32).reshape(3, 4))
    assert masked == 0


# ----------------------------------------------------------------------------- (3) node validation
#
# Table-driven variants of every rule of docs/FORMAT.md's "Validation" (VALIDATOR_SPEC.md), each a
# one-node model that must be refused naming the node, or must load and run. All cases run in one
# child interpreter (tests/kernel_cases.py) that reports each case; a case that crashes it fails
# alone and a new child takes the cases left.

GOOD_PACKED = codec.encode(np.arange(8, dtype=np.float32), 64).packed
SCALAR_PACKED = codec.encode(np.arange(1, dtype=np.float32), 64).packed
GOOD = decode_attributes("fp32", 64, [8], "runtime", TensorProto.FLOAT)
NODE = NODE_NAME.encode()
RUN_ERROR = "Non-zero status code returned while running"  # onnxruntime's prefix of an error at run time


@dataclass(frozen=True)
class Expect:
    """A case's verdict: it runs (`refusal` None), or it is refused with an error holding `refusal`.

    The kernel's errors start "ParityCheckUnpack node '<escaped name>': "; onnxruntime's own
    refusals (`by_kernel` False) name the node as it is, except those about the model's opset
    imports (`names_node` False).
    """

    refusal: str | None = None
    by_kernel: bool = True
    names_node: bool = True
    node_name: bytes = NODE


CASES: dict[str, Case] = {}
EXPECTED: dict[str, Expect] = {}


def escaped(name: bytes) -> str:
    """docs/FORMAT.md's escaping of a node name in errors: printable ASCII but backslash kept, 200 bytes at most."""
    text = "".join("\\\\" if byte == 0x5C else chr(byte) if 0x20 <= byte <= 0x7E else f"\\x{byte:02x}"
                   for byte in name[:200])
    return text + "..." if len(name) > 200 else text


def serialized_with_node_name(model: onnx.ModelProto, name: bytes) -> bytes:
    """The model's bytes with its node named `name`: any bytes, as a protobuf string may hold them."""
    for attempt in range(100):
        placeholder = (hashlib.sha256(str(attempt).encode()).hexdigest().encode() * 8)[: len(name)]
        model.graph.node[0].name = placeholder.decode()
        data = model.SerializeToString()
        if not name or data.count(placeholder) == 1:  # same length: the protobuf stays well formed
            return data.replace(placeholder, name) if name else data
    raise AssertionError(f"no unique placeholder for a node name of {len(name)} bytes")


def node_model(
    attributes: dict[str, object] | None = None,
    *,
    packed: np.ndarray | None = GOOD_PACKED,
    inputs: Sequence[str] = (PACKED,),
    outputs: Sequence[str] = OUTPUTS,
    opsets: Sequence[tuple[str, int]] = ((runtime.DOMAIN, 1),),
    packed_input: onnx.ValueInfoProto | None = None,
    weights_output: onnx.ValueInfoProto | None = None,
) -> onnx.ModelProto:
    """GOOD with `attributes` changed (None: removed; an AttributeProto: used as it is) and the node's wiring."""
    changed: dict[str, object] = dict(GOOD)
    changed.update(attributes or {})
    node = helper.make_node("ParityCheckUnpack", list(inputs), list(outputs), domain=runtime.DOMAIN, name=NODE_NAME)
    for name, value in changed.items():
        if isinstance(value, onnx.AttributeProto):
            node.attribute.append(value)
        elif value is not None:
            node.attribute.append(make_attribute(name, value))
    graph_outputs = []
    if outputs and outputs[0]:
        graph_outputs.append(weights_output or helper.make_empty_tensor_value_info(outputs[0]))
    graph_outputs += [helper.make_tensor_value_info(name, TensorProto.INT64, []) for name in outputs[1:3] if name]
    graph = helper.make_graph(
        [node], "parity_check_unpack_test", [packed_input] if packed_input is not None else [], graph_outputs,
        initializer=[numpy_helper.from_array(packed, PACKED)] if packed is not None else [],
    )
    imports = [helper.make_opsetid("", 17)] + [helper.make_opsetid(domain, version) for domain, version in opsets]
    return helper.make_model(graph, opset_imports=imports)


def add(case_id: str, model: onnx.ModelProto, expect: Expect = Expect(), feed: np.ndarray | None = None) -> None:
    """Registers a case; `feed` is fed as the packed graph input."""
    assert case_id not in CASES, case_id
    feeds = {PACKED: feed} if feed is not None else {}
    CASES[case_id] = Case(serialized_with_node_name(model, expect.node_name), feeds)
    EXPECTED[case_id] = expect


def refused(text: str, **options: object) -> Expect:
    return Expect(refusal=text, **options)  # type: ignore[arg-type]


def by_onnxruntime(text: str, names_node: bool = True) -> Expect:
    return Expect(refusal=text, by_kernel=False, names_node=names_node)


def fed_packed(dtype: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(PACKED, dtype, ["n_words", "lanes"])


def attribute_of_type(name: str, kind: int) -> onnx.AttributeProto:
    """An attribute of the given AttributeProto type holding a value in that type's field."""
    attribute = onnx.AttributeProto(name=name, type=kind)
    tensor = numpy_helper.from_array(np.array([8], np.int64))
    sparse = helper.make_sparse_tensor(tensor, numpy_helper.from_array(np.array([0], np.int64)), [1])
    type_proto = helper.make_tensor_type_proto(TensorProto.FLOAT, [1])
    fill = {
        onnx.AttributeProto.FLOAT: lambda: setattr(attribute, "f", 8.0),
        onnx.AttributeProto.INT: lambda: setattr(attribute, "i", 8),
        onnx.AttributeProto.STRING: lambda: setattr(attribute, "s", b"8"),
        onnx.AttributeProto.TENSOR: lambda: attribute.t.CopyFrom(tensor),
        onnx.AttributeProto.GRAPH: lambda: attribute.g.CopyFrom(helper.make_graph([], "empty", [], [])),
        onnx.AttributeProto.SPARSE_TENSOR: lambda: attribute.sparse_tensor.CopyFrom(sparse),
        onnx.AttributeProto.TYPE_PROTO: lambda: attribute.tp.CopyFrom(type_proto),
        onnx.AttributeProto.FLOATS: lambda: attribute.floats.extend([8.0]),
        onnx.AttributeProto.INTS: lambda: attribute.ints.extend([8]),
        onnx.AttributeProto.STRINGS: lambda: attribute.strings.extend([b"8"]),
        onnx.AttributeProto.TENSORS: lambda: attribute.tensors.extend([tensor]),
        onnx.AttributeProto.GRAPHS: lambda: attribute.graphs.extend([helper.make_graph([], "empty", [], [])]),
        onnx.AttributeProto.SPARSE_TENSORS: lambda: attribute.sparse_tensors.extend([sparse]),
        onnx.AttributeProto.TYPE_PROTOS: lambda: attribute.type_protos.extend([type_proto]),
    }
    if kind in fill:
        fill[kind]()
    return attribute


OWN_TYPES = {"format": onnx.AttributeProto.STRING, "word_bits": onnx.AttributeProto.INT,
             "shape": onnx.AttributeProto.INTS, "check": onnx.AttributeProto.STRING,
             "output_type": onnx.AttributeProto.INT}
# What the onnxruntime C API shows a kernel of `shape`'s type (see check_shape_is_ints in the kernel): other
# types read as an empty INTS. GRAPH is refused by onnxruntime itself, with an internal error naming no node.
SHAPE_TYPES_SEEN = (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING,
                    onnx.AttributeProto.TENSOR, onnx.AttributeProto.FLOATS)


def add_original_cases() -> None:
    """The hand-made hostile models (before the tables)."""
    cases = [
        ("unknown-format", "unknown format 'fp64'", {"format": "fp64"}),
        ("missing-format", "attribute 'format'", {"format": None}),
        ("word-bits-not-a-size", "word_bits 24", {"word_bits": 24}),
        ("word-bits-below-format", "word_bits 16 is not valid for fp32", {"word_bits": 16}),
        ("word-bits-8-for-bf16", "word_bits 8 is not valid for bf16",
         {"format": "bf16", "word_bits": 8, "output_type": TensorProto.BFLOAT16}),
        ("word-bits-negative", "word_bits -64", {"word_bits": -64}),
        ("missing-word-bits", "attribute 'word_bits'", {"word_bits": None}),
        ("word-bits-is-a-string", "attribute 'word_bits'", {"word_bits": "64"}),
        ("unknown-check", "unknown check 'sometimes'", {"check": "sometimes"}),
        ("missing-check", "attribute 'check'", {"check": None}),
        ("int64-output", "output_type 7 is not allowed for fp32", {"output_type": TensorProto.INT64}),
        ("float-output-for-int8", "output_type 1 is not allowed for int8",
         {"format": "int8", "word_bits": 64, "shape": [64]}),
        ("bf16-output-for-fp16", "output_type 16 is not allowed for fp16",
         {"format": "fp16", "output_type": TensorProto.BFLOAT16, "shape": [16]}),
        ("missing-output-type", "attribute 'output_type'", {"output_type": None}),
        ("negative-dim", "negative dimension -1", {"shape": [-1, 8]}),
        ("element-count-overflow", "2**58 weights or more", {"shape": [1 << 40, 1 << 40]}),
        ("byte-count-overflow", "2**58 weights or more", {"shape": [1 << 31, 1 << 31]}),
        ("missing-shape", "attribute 'shape'", {"shape": None}),
        ("fewer-words-than-shape", "expected [5, 1]", {"shape": [9]}),
        ("huge-shape-tiny-packed", "expected [1073741824, 1]", {"shape": [1 << 31]}),
        ("packed-lanes-mismatch", "expected [2, 2]", {"word_bits": 128}),
    ]
    for case_id, text, attributes in cases:
        add(case_id, node_model(attributes), refused(text))
    add("packed-dtype-mismatch", node_model(packed=GOOD_PACKED.view(np.uint32)),
        refused("element type UINT32, expected UINT64"))
    add("packed-rank-1", node_model(packed=GOOD_PACKED.reshape(-1)), refused("rank 1, expected 2"))
    fed = fed_packed(TensorProto.UINT64)
    add("load-check-on-fed-input", node_model({"check": "load"}, packed=None, packed_input=fed),
        refused("constant initializer"), feed=GOOD_PACKED)
    add("fed-input-wrong-dims", node_model(packed=None, packed_input=fed_packed(TensorProto.UINT64)),
        refused("expected [4, 1]"), feed=GOOD_PACKED[:3])
    add("fed-input-signed", node_model(packed=None, packed_input=fed_packed(TensorProto.INT64)),
        refused("element type INT64, expected UINT64"), feed=GOOD_PACKED.view(np.int64))
    add("declared-output-type-mismatch",
        node_model(weights_output=helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT16, [8])),
        by_onnxruntime("does not match"))


def add_node_wiring_cases() -> None:
    """Rules 1 and 2: the model's imports of ai.oppass, the node's inputs and outputs."""
    for version in (0, -1):
        add(f"domain-version-{version}", node_model(opsets=((runtime.DOMAIN, version),)),
            by_onnxruntime("is not a registered function/op", names_node=False))
    add("domain-version-1001", node_model(opsets=((runtime.DOMAIN, 1001),)), by_onnxruntime("Opset 1001", False))
    add("no-inputs", node_model(inputs=()), by_onnxruntime("has input size 0"))
    add("two-inputs", node_model(inputs=(PACKED, PACKED)), by_onnxruntime("has input size 2"))
    add("empty-input-name", node_model(inputs=("",)),
        by_onnxruntime("input 0 is marked single but has an empty string"))
    add("no-outputs", node_model(outputs=()), by_onnxruntime("has output size 0"))
    add("three-outputs-with-parity", node_model(outputs=(*OUTPUTS, "extra")),
        refused("3 outputs with code parity: output 2 (corrected_words) needs code secded"))
    add("four-outputs", node_model(outputs=(*OUTPUTS, "extra", "more")), by_onnxruntime("has output size 4"))
    add("empty-weights-name", node_model(outputs=("", OUTPUTS[1])),
        by_onnxruntime("output 0 is marked single but has an empty string"))
    add("only-the-weights-output", node_model(outputs=OUTPUTS[:1]))
    add("masked-words-output-omitted", node_model(outputs=(OUTPUTS[0], "")))


def add_attribute_type_cases() -> None:
    """Rule 3: every attribute missing, of every other type, with a data field that is not its type's, untyped."""
    messages = {"format": "attribute 'format' is missing or not of type STRING",
                "word_bits": "attribute 'word_bits' is missing or not of type INT",
                "check": "attribute 'check' is missing or not of type STRING",
                "output_type": "attribute 'output_type' is missing or not of type INT"}
    for name, own in OWN_TYPES.items():
        add(f"missing-attribute-{name}", node_model({name: None}), refused(f"attribute '{name}' is missing"))
        for kind in onnx.AttributeProto.AttributeType.values():
            if kind == own or (name == "shape" and kind not in SHAPE_TYPES_SEEN):
                continue
            kind_name = onnx.AttributeProto.AttributeType.Name(kind)
            text = messages.get(name, f"attribute 'shape' is of type {kind_name}, expected INTS")
            # a kernel that read `shape` as a scalar would run with SCALAR_PACKED
            packed = SCALAR_PACKED if name == "shape" else GOOD_PACKED
            model = node_model({name: attribute_of_type(name, kind)}, packed=packed)
            add(f"attribute-{name}-of-type-{kind_name}", model, refused(text))
        wrong_field = attribute_of_type(name, onnx.AttributeProto.FLOAT)
        wrong_field.type = own
        add(f"attribute-{name}-typed-{onnx.AttributeProto.AttributeType.Name(own)}-holding-a-float",
            node_model({name: wrong_field}), by_onnxruntime(f"type field and data field mismatch in attribute {name}"))
        untyped = make_attribute(name, GOOD[name])
        untyped.ClearField("type")
        add(f"attribute-{name}-untyped", node_model({name: untyped}),
            by_onnxruntime("Field 'type' of 'attr' is required"))
        undefined = make_attribute(name, GOOD[name])
        undefined.type = onnx.AttributeProto.UNDEFINED
        add(f"attribute-{name}-UNDEFINED-holding-its-value", node_model({name: undefined}),
            by_onnxruntime(f"type field and data field mismatch in attribute {name}"))
    duplicated = node_model()
    duplicated.graph.node[0].attribute.append(make_attribute("format", "bf16"))
    add("attribute-format-twice", duplicated, by_onnxruntime("Attribute 'format' appeared multiple times"))


def string_variants(name: bytes) -> dict[str, bytes]:
    """Near misses of a valid string value."""
    return {"nul": name + b"\0", "nul-junk": name + b"\0junk", "trailing-space": name + b" ",
            "leading-space": b" " + name, "upper": name.upper(), "capitalised": name.capitalize(),
            "shortened": name[:-1], "doubled-last": name + name[-1:], "newline": name + b"\n", "tab": b"\t" + name,
            "repeated": name + name}


def add_string_value_cases() -> None:
    """Rule 4: `format` and `check` are exactly one of their names: no NUL, space, other case or extra byte."""
    values = {"format": [fmt.encode() for fmt in codec.FORMATS], "check": [check.encode() for check in CHECKS]}
    extra = {"empty": b"", "invalid-utf8": b"\xff\xfe", "long": b"fp32" * 80, "backslash": b"fp32\\"}
    for attribute, names in values.items():
        variants = {f"{name.decode()}-{kind}": value for name in names for kind, value in string_variants(name).items()}
        variants.update(extra)
        for variant, value in variants.items():
            text = f"unknown {attribute} '{escaped(value)}'"
            add(f"{attribute}-value-{variant}", node_model({attribute: helper.make_attribute(attribute, value)}),
                refused(text))


def add_value_cases() -> None:
    """Rules 5-7: word_bits, shape and output_type values."""
    odd_values = [0, -1, 1, 4, 7, 12, 24, 48, 96, 1024, 2048, 1 << 31, (1 << 63) - 1, -(1 << 63)]
    for fmt, spec in codec.FORMATS.items():
        below = [width for width in (8, 16) if width < spec.bits]
        for width in odd_values + below:
            attributes = {"format": fmt, "word_bits": width, "output_type": OUTPUT_TYPES[fmt][0]}
            add(f"word-bits-value-{width}-for-{fmt}", node_model(attributes),
                refused(f"word_bits {width} is not valid for {fmt}"))
        for output_type in [*range(-1, 24), 1 << 31, (1 << 63) - 1]:
            if output_type in OUTPUT_TYPES[fmt]:
                continue
            attributes = {"format": fmt, "word_bits": spec.bits, "output_type": output_type}
            add(f"output-type-{output_type}-for-{fmt}", node_model(attributes),
                refused(f"output_type {output_type} is not allowed for {fmt}"))
    negative = {"first": [-1], "second": [8, -1], "third": [2, 2, -2], "most": [-(1 << 63)]}
    for where, dims in negative.items():
        axis = next(i for i, dim in enumerate(dims) if dim < 0)
        add(f"shape-negative-{where}", node_model({"shape": dims}),
            refused(f"negative dimension {dims[axis]} at axis {axis}"))
    too_large = {"2**58": [1 << 58], "2**29-squared": [1 << 29, 1 << 29], "3-times-2**57": [3, 1 << 57],
                 "2**20-cubed": [1 << 20] * 3, "wraps-64-bits": [1 << 62, 1 << 62], "2**58-then-1": [1 << 58, 1]}
    for what, dims in too_large.items():
        add(f"shape-too-large-{what}", node_model({"shape": dims}), refused("2**58 weights or more"))
    # below the limit the shape is valid: the packed input (4 words, not 2**57) is what is refused
    add("shape-just-below-2**58", node_model({"shape": [(1 << 58) - 1]}),
        refused(f"packed input has dims [4, 1], expected [{1 << 57}, 1]"))


def add_packed_cases() -> None:
    """Rule 8: the packed input's element type, rank and dims for every word size, at run time and at load."""
    layouts = {8: "int8", 16: "fp16", 32: "fp32", 64: "fp32", 128: "fp32", 256: "fp32", 512: "fp32"}
    rng = np.random.default_rng(8)
    for width, fmt in layouts.items():
        n_weights = 13
        packed = codec.encode(random_weights(rng, fmt, n_weights), width).packed
        n_words, lanes = packed.shape
        expected_type = {8: "UINT8", 16: "UINT16", 32: "UINT32"}.get(width, "UINT64")
        attributes = {"format": fmt, "word_bits": width, "shape": [n_weights], "output_type": OUTPUT_TYPES[fmt][0]}
        raw = np.resize(packed.reshape(-1).view(np.uint8), -(-packed.nbytes // 8) * 8)  # whole elements of any type
        wrong_types = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64, np.float32]
        type_text = f"expected {expected_type} for {width}-bit"
        variants: dict[str, tuple[np.ndarray, str]] = {
            f"type-{np.dtype(dtype).name}": (raw.view(dtype).reshape(-1, 1), type_text)
            for dtype in wrong_types if np.dtype(dtype) != packed.dtype
        }
        variants.update({
            "rank-1": (packed.reshape(-1), "rank 1, expected 2"),
            "rank-3": (packed.reshape(n_words, lanes, 1), "rank 3, expected 2"),
            "one-word-short": (packed[:-1], f"expected [{n_words}, {lanes}]"),
            "one-word-more": (np.concatenate([packed, packed[:1]]), f"expected [{n_words}, {lanes}]"),
            "one-lane-more": (np.concatenate([packed, packed[:, :1]], axis=1), f"expected [{n_words}, {lanes}]"),
        })
        for variant, (bad, text) in variants.items():
            for check in CHECKS:
                add(f"packed-W{width}-{variant}-{check}", node_model({**attributes, "check": check}, packed=bad),
                    refused(text))
        feed_type = helper.np_dtype_to_tensor_dtype(packed.dtype)
        add(f"packed-W{width}-fed-one-word-short",
            node_model(attributes, packed=None, packed_input=fed_packed(feed_type)),
            refused(f"expected [{n_words}, {lanes}]"), feed=packed[:-1])


def add_node_name_cases() -> None:
    """Rule 9: the node's name in errors, escaped to plain ASCII and cut after 200 bytes."""
    names = {"empty": b"", "backslash": b"a\\b", "tab": b"tab\there", "newline": b"new\nline",
             "quotes": b"it's \"quoted\"", "utf8": "café-ß".encode(), "invalid-utf8": b"\xff\xfe\x80",
             "nul": b"nul\0byte", "delete": b"\x7f", "control": bytes(range(32)),
             "200-bytes": b"n" * 200, "201-bytes": b"n" * 201, "250-odd-bytes": bytes(range(6, 256)),
             "201-backslashes": b"\\" * 201}
    for label, name in names.items():
        add(f"node-name-{label}", node_model({"format": "fp64"}), Expect("unknown format 'fp64'", node_name=name))
        add(f"node-name-{label}-valid-node", node_model(), Expect(node_name=name))


def add_valid_edge_cases() -> None:
    """Valid nodes that must load and run: every layout and check mode, scalars and empty tensors."""
    rng = np.random.default_rng(9)
    for fmt, width, output_type in LAYOUTS:
        for check in CHECKS:
            packed = codec.encode(random_weights(rng, fmt, 13), width).packed
            add(f"valid-{layout_id((fmt, width, output_type))}-{check}",
                node_model(decode_attributes(fmt, width, [13], check, output_type), packed=packed))
    for fmt in codec.FORMATS:
        for shape in ([], [0], [0, 5], [3, 0, 2], [0, 1 << 62], [1 << 62, 0]):
            for width in sorted({codec.FORMATS[fmt].bits, 512}):
                count = int(np.prod(shape, dtype=object))
                weights = random_weights(rng, fmt, count).reshape([0] if count == 0 else shape)
                packed = codec.encode(weights, width).packed
                for check in CHECKS:
                    add(f"valid-{fmt}-W{width}-shape-{'x'.join(map(str, shape)) or 'scalar'}-{check}",
                        node_model(decode_attributes(fmt, width, shape, check, OUTPUT_TYPES[fmt][0]), packed=packed))


def add_code_cases() -> None:
    """The optional attributes `code` and `range_max` (rules 3, 4, 5, 10) and output 2 (rule 2)."""
    add("code-absent-is-parity", node_model({"code": None}))
    add("code-parity", node_model({"code": "parity"}))
    for check in CHECKS:
        add(f"code-secded-{check}", node_model({"code": "secded", "check": check}))
        add(f"code-secded-range-{check}", node_model({"code": "secded", "check": check, "range_max": 2.5}))
    for kind in onnx.AttributeProto.AttributeType.values():
        if kind in (onnx.AttributeProto.UNDEFINED, onnx.AttributeProto.GRAPH):
            continue  # onnxruntime refuses both itself (see add_attribute_type_cases)
        kind_name = onnx.AttributeProto.AttributeType.Name(kind)
        if kind != onnx.AttributeProto.STRING:
            add(f"attribute-code-of-type-{kind_name}", node_model({"code": attribute_of_type("code", kind)}),
                refused("attribute 'code' is not of type STRING"))
        if kind != onnx.AttributeProto.FLOAT:
            add(f"attribute-range_max-of-type-{kind_name}",
                node_model({"range_max": attribute_of_type("range_max", kind)}),
                refused("attribute 'range_max' is not of type FLOAT"))
    variants = {f"{name.decode()}-{kind}": value for name in (b"parity", b"secded")
                for kind, value in string_variants(name).items()}
    variants.update({"empty": b"", "hamming": b"hamming", "invalid-utf8": b"\xff\xfe"})
    for variant, value in variants.items():
        add(f"code-value-{variant}", node_model({"code": helper.make_attribute("code", value)}),
            refused(f"unknown code '{escaped(value)}'"))
    unfit = {"bf16": (16, TensorProto.BFLOAT16, "32, 64, 128, 256, 512"),
             "int8": (8, TensorProto.INT8, "16, 32, 64, 128, 256, 512"),
             "uint8": (8, TensorProto.UINT8, "16, 32, 64, 128, 256, 512")}
    for fmt, (width, output_type, fitting) in unfit.items():
        attributes = {"format": fmt, "word_bits": width, "output_type": output_type, "code": "secded"}
        add(f"code-secded-does-not-fit-{fmt}-W{width}", node_model(attributes),
            refused(f"code secded does not fit {fmt} in {width}-bit words"))
        add(f"code-secded-does-not-fit-{fmt}-W{width}-names-the-fitting-sizes", node_model(attributes),
            refused(f"expected word_bits {fitting}"))
    for label, value in {"nan": float("nan"), "inf": float("inf"), "minus-inf": float("-inf"), "minus-one": -1.0,
                         "minus-smallest-subnormal": -1e-45}.items():
        add(f"range-max-{label}", node_model({"range_max": value}),
            refused("is not valid: expected a finite value >= 0"))
    for label, value in {"zero": 0.0, "minus-zero": -0.0, "largest-float": 3.4028234663852886e38,
                         "smallest-subnormal": 1e-45}.items():
        add(f"range-max-{label}", node_model({"range_max": value}))
        add(f"range-max-{label}-secded", node_model({"range_max": value, "code": "secded"}))
    add("secded-three-outputs", node_model({"code": "secded"}, outputs=CODE_OUTPUTS))
    add("secded-masked-words-omitted", node_model({"code": "secded"}, outputs=(OUTPUTS[0], "", CODE_OUTPUTS[2])))
    add("secded-corrected-words-omitted", node_model({"code": "secded"}, outputs=(*OUTPUTS, "")))
    add("parity-three-outputs-corrected-named", node_model({"code": "parity"}, outputs=CODE_OUTPUTS),
        refused("3 outputs with code parity: output 2 (corrected_words) needs code secded"))
    add("secded-four-outputs", node_model({"code": "secded"}, outputs=(*CODE_OUTPUTS, "more")),
        by_onnxruntime("has output size 4"))


CODE_OUTPUTS = (*OUTPUTS, "corrected_words")
add_original_cases()
add_node_wiring_cases()
add_attribute_type_cases()
add_string_value_cases()
add_value_cases()
add_packed_cases()
add_node_name_cases()
add_valid_edge_cases()
add_code_cases()
REFUSED = [case_id for case_id, expect in EXPECTED.items() if expect.refusal is not None]
LOADING = [case_id for case_id, expect in EXPECTED.items() if expect.refusal is None]


@pytest.fixture(scope="module")
def case_outcomes(request: pytest.FixtureRequest) -> dict[str, Outcome]:
    """Outcomes of the selected cases, all run in one child."""
    selected = {item.callspec.params["case_id"] for item in request.session.items
                if hasattr(item, "callspec") and "case_id" in item.callspec.params}
    return run_cases({case_id: CASES[case_id] for case_id in CASES if case_id in selected})


def check_outcome(case_id: str, outcome: Outcome) -> None:
    expect = EXPECTED[case_id]
    assert outcome.crash is None, outcome.crash
    if expect.refusal is None:
        assert outcome.error is None, f"refused: {outcome.error}"
        return
    assert outcome.error is not None, f"ran, but must be refused with {expect.refusal!r}"
    assert expect.refusal in outcome.error
    if expect.by_kernel:
        assert f"ParityCheckUnpack node '{escaped(expect.node_name)}': " in outcome.error
        if RUN_ERROR not in outcome.error:  # onnxruntime's own text at run time names the node unescaped
            assert outcome.error.isascii() and "\n" not in outcome.error.strip(), outcome.error
    elif expect.names_node:
        assert expect.node_name.decode() in outcome.error


@pytest.mark.parametrize("case_id", REFUSED)
def test_hostile_models_fail_cleanly_naming_the_node(case_id: str, case_outcomes: dict[str, Outcome]) -> None:
    check_outcome(case_id, case_outcomes[case_id])


@pytest.mark.parametrize("case_id", LOADING)
def test_valid_edge_cases_load_and_run(case_id: str, case_outcomes: dict[str, Outcome]) -> None:
    check_outcome(case_id, case_outcomes[case_id])


def test_a_case_that_kills_the_child_fails_alone() -> None:
    """The child that dies in a case is replaced: the cases before and after it still get their outcomes."""
    chosen = [REFUSED[0], LOADING[0], REFUSED[1], LOADING[1]]
    outcomes = run_cases({case_id: CASES[case_id] for case_id in chosen}, abort_in={chosen[1]})
    assert set(outcomes) == set(chosen)
    crash = outcomes[chosen[1]].crash
    assert crash is not None and "the child died in this case (exit status -6)" in crash
    for case_id in (chosen[0], *chosen[2:]):
        check_outcome(case_id, outcomes[case_id])


# ----------------------------------------------------------------------------- (4) runtime vs load


def session_over_user_buffer(packed: np.ndarray, check: str) -> tuple[ort.InferenceSession, ort.OrtValue]:
    """A session whose packed initializer is `packed`'s own memory (add_initializer, no copy)."""
    shape = [packed.shape[0] * 2]
    model = decoder_model(packed, attributes=decode_attributes("fp32", 64, shape, check, TensorProto.FLOAT))
    value = ort.OrtValue.ortvalue_from_numpy(packed)
    options = exact_session_options()
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


# ----------------------------------------------------------------------------- (5) SEC-DED and the range check


@pytest.fixture(params=["one-pass", "word-by-word"])
def secded_decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each SEC-DED decoder of the kernel: the one-pass AVX-512 decode (on CPUs that have it: otherwise the
    portable one again) and the portable one, which OPPASS_DECODER_AVX512=0 (read when a kernel is planned) picks."""
    monkeypatch.setenv("OPPASS_DECODER_AVX512", "1" if request.param == "one-pass" else "0")


def code_model(packed: np.ndarray, attributes: dict[str, object], outputs: Sequence[str] = CODE_OUTPUTS) -> bytes:
    """One decode node with `attributes` (code, range_max among them) and `outputs`, all graph outputs."""
    node = helper.make_node("ParityCheckUnpack", [PACKED], list(outputs), domain=schema.DOMAIN, name=NODE_NAME)
    node.attribute.extend(make_attribute(name, value) for name, value in attributes.items())
    graph_outputs = [helper.make_empty_tensor_value_info(outputs[0])]
    graph_outputs += [helper.make_tensor_value_info(name, TensorProto.INT64, []) for name in outputs[1:] if name]
    graph = helper.make_graph([node], "code_test", [], graph_outputs, [numpy_helper.from_array(packed, PACKED)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(schema.DOMAIN, 1)])
    return model.SerializeToString()


def code_attributes(fmt: str, width: int, shape: Sequence[int], check: str, output_type: int, code: str,
                    range_max: float | None) -> dict[str, object]:
    attributes = {**decode_attributes(fmt, width, shape, check, output_type), "code": code}
    if range_max is not None:
        attributes["range_max"] = range_max
    return attributes


def decode_code_with_kernel(packed: np.ndarray, attributes: dict[str, object]) -> tuple[np.ndarray, int, int | None]:
    """Output codes, masked_words and (secded) corrected_words from the kernel."""
    secded = attributes["code"] == "secded"
    session = ort.InferenceSession(code_model(packed, attributes, CODE_OUTPUTS if secded else OUTPUTS),
                                   exact_session_options())
    values = session.run_with_ort_values(list(CODE_OUTPUTS if secded else OUTPUTS), {})
    output_type = int(attributes["output_type"])  # type: ignore[call-overload]
    assert values[0].data_type() == ORT_TYPE_NAMES[output_type]
    assert values[0].shape() == list(attributes["shape"])  # type: ignore[call-overload]
    element_bytes = 4 if output_type == TensorProto.FLOAT else formats.FORMATS[str(attributes["format"])].bits // 8
    corrected = int(values[2].numpy()) if secded else None
    return raw_bytes(values[0]).view(f"<u{element_bytes}"), int(values[1].numpy()), corrected


def code_codec_expectation(packed: np.ndarray, attributes: dict[str, object]) -> tuple[np.ndarray, int, int | None]:
    fmt, width, shape = str(attributes["format"]), int(attributes["word_bits"]), list(attributes["shape"])  # type: ignore
    code, output_type = str(attributes["code"]), int(attributes["output_type"])  # type: ignore[call-overload]
    if attributes["check"] == "none":
        weights, masked, corrected = codec.unpack(packed, fmt, width, shape, code=code), 0, 0
    else:
        range_max = attributes.get("range_max")
        decoded = codec.decode(packed, fmt, width, shape, code=code,
                               range_max=None if range_max is None else float(range_max))  # type: ignore[arg-type]
        weights, masked, corrected = decoded.weights, decoded.masked_words, decoded.corrected_words
    code_dtype = f"u{formats.FORMATS[fmt].bits // 8}"
    return (output_codes(weights.reshape(-1).view(code_dtype), fmt, output_type), masked,
            corrected if code == "secded" else None)


def load_code_vectors() -> list[dict]:
    return [case for case in json.loads(CODE_VECTORS.read_text()) if "packed" in case]


CODE_VECTOR_RUNS = [
    pytest.param(case, output_type, id=f"{case['name']}-{TensorProto.DataType.Name(output_type)}")
    for case in load_code_vectors()
    for output_type in OUTPUT_TYPES[case["format"]]
]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize(("case", "output_type"), CODE_VECTOR_RUNS)
@pytest.mark.usefixtures("secded_decoder")
def test_code_vectors_in_every_output_type_and_check(case: dict, output_type: int, check: str) -> None:
    """Runtime and load: the decode after the faults; none: the faulty words unpacked, stolen bits cleared."""
    fmt = case["format"]
    faults = case["decoded_after_faults"]
    packed = vector_packed(case)
    flip_stream_bits(packed, faults["flipped_bits"])
    attributes = code_attributes(fmt, case["word_bits"], case["shape"], check, output_type, case["code"],
                                 case.get("range_max"))
    decoded, masked, corrected = decode_code_with_kernel(packed, attributes)
    secded = case["code"] == "secded"
    if check == "none":
        expected, _, _ = code_codec_expectation(packed, attributes)
        np.testing.assert_array_equal(decoded, expected)
        assert masked == 0 and corrected == (0 if secded else None)
        return
    np.testing.assert_array_equal(decoded, output_codes(faults["decoded"], fmt, output_type))
    assert masked == faults["masked_words"]
    assert corrected == (faults["corrected_words"] if secded else None)


SECDED_LAYOUTS = [layout for layout in LAYOUTS if layout[1] in formats.word_widths(layout[0], "secded")]


def max_magnitude(weights: np.ndarray) -> float:
    """A range bound that some weights exceed: the median finite |w| as binary32."""
    values = np.abs(weights.astype(np.float32))
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else 1.0


@pytest.mark.parametrize("layout", SECDED_LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("range_check", [False, True], ids=["no-range", "range"])
@pytest.mark.usefixtures("secded_decoder")
def test_secded_random_small_tensors_match_codec(layout: tuple[str, int, int], check: str, range_check: bool) -> None:
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type, len(fmt), CHECKS.index(check), range_check])
    for shape in SMALL_SHAPES:
        weights = random_weights(rng, fmt, int(np.prod(shape))).reshape(shape)
        packed = codec.encode(weights, width, code="secded").packed.copy()
        range_max = max_magnitude(weights) if range_check else None
        for faults in (0, 1, 2, 9):
            faulty = packed.copy()
            random_faults(rng, faulty, faults)
            attributes = code_attributes(fmt, width, shape, check, output_type, "secded", range_max)
            decoded, masked, corrected = decode_code_with_kernel(faulty, attributes)
            expected, expected_masked, expected_corrected = code_codec_expectation(faulty, attributes)
            np.testing.assert_array_equal(decoded, expected, err_msg=f"shape {shape}, {faults} faults")
            assert (masked, corrected) == (expected_masked, expected_corrected)


@pytest.mark.parametrize("faults", [5, 3000], ids=["sparse-faults", "dense-faults"])
@pytest.mark.parametrize("layout", SECDED_LAYOUTS, ids=layout_id)
@pytest.mark.usefixtures("secded_decoder")
def test_secded_random_large_tensors_match_codec_in_parallel(layout: tuple[str, int, int], faults: int) -> None:
    """Several parallel tasks; sparse faults leave most 256-byte scan blocks clean, dense ones hit most."""
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type, len(fmt), LARGE_WEIGHTS, faults])
    weights = random_weights(rng, fmt, LARGE_WEIGHTS)
    packed = codec.encode(weights, width, code="secded").packed.copy()
    random_faults(rng, packed, faults)
    attributes = code_attributes(fmt, width, [LARGE_WEIGHTS], "runtime", output_type, "secded",
                                 max_magnitude(weights))
    decoded, masked, corrected = decode_code_with_kernel(packed, attributes)
    expected, expected_masked, expected_corrected = code_codec_expectation(packed, attributes)
    np.testing.assert_array_equal(decoded, expected)
    assert (masked, corrected) == (expected_masked, expected_corrected)
    assert corrected is not None and corrected > 0


@pytest.mark.usefixtures("secded_decoder")
def test_secded_output_of_16_mib_and_more_matches_codec() -> None:
    """An output of 16 MiB and more, which the one-pass decode writes with non-temporal stores, faults in it."""
    weights = codec.to_format(np.random.default_rng(16).standard_normal((16 << 20) // 4 + 9, np.float32), "bf16")[0]
    packed = codec.encode(weights, 128, code="secded").packed.copy()
    random_faults(np.random.default_rng(17), packed, 60)
    attributes = code_attributes("bf16", 128, [weights.size], "runtime", TensorProto.FLOAT, "secded",
                                 max_magnitude(weights))
    decoded, masked, corrected = decode_code_with_kernel(packed, attributes)
    expected, expected_masked, expected_corrected = code_codec_expectation(packed, attributes)
    np.testing.assert_array_equal(decoded, expected)
    assert (masked, corrected) == (expected_masked, expected_corrected)


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout[1] == 64], ids=layout_id)
@pytest.mark.parametrize("check", CHECKS)
def test_parity_with_range_check_matches_codec(layout: tuple[str, int, int], check: str) -> None:
    fmt, width, output_type = layout
    rng = np.random.default_rng([width, output_type, len(fmt), CHECKS.index(check), 7])
    weights = random_weights(rng, fmt, 3001)
    packed = codec.encode(weights, width).packed.copy()
    random_faults(rng, packed, 40)
    attributes = code_attributes(fmt, width, [3001], check, output_type, "parity", max_magnitude(weights))
    decoded, masked, corrected = decode_code_with_kernel(packed, attributes)
    expected, expected_masked, _ = code_codec_expectation(packed, attributes)
    np.testing.assert_array_equal(decoded, expected)
    assert masked == expected_masked and corrected is None


@pytest.mark.usefixtures("secded_decoder")
def test_secded_counts_outputs_are_optional() -> None:
    """Output 1 omitted ("") with output 2 kept, and output 2 alone dropped: the other count is still right."""
    weights = codec.to_format(np.linspace(-2, 2, 40, dtype=np.float32), "fp32")[0]
    packed = codec.encode(weights, 64, code="secded").packed.copy()
    flip_stream_bits(packed, [3, 64 * 5 + 1, 64 * 5 + 9])  # word 0 corrected, word 5 masked
    attributes = code_attributes("fp32", 64, [40], "runtime", TensorProto.FLOAT, "secded", None)
    expected = codec.decode(packed, "fp32", 64, [40], code="secded")
    session = ort.InferenceSession(code_model(packed, attributes, (OUTPUTS[0], "", CODE_OUTPUTS[2])),
                                   exact_session_options())
    decoded, corrected = session.run(None, {})
    np.testing.assert_array_equal(decoded, expected.weights)
    assert int(corrected) == expected.corrected_words == 1
    session = ort.InferenceSession(code_model(packed, attributes, OUTPUTS), exact_session_options())
    decoded, masked = session.run(None, {})
    np.testing.assert_array_equal(decoded, expected.weights)
    assert int(masked) == expected.masked_words == 1
