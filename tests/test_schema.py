"""The decode-node validator (oppass.schema) against the rules of docs/FORMAT.md ("Validation").

`spec_accepts` below is an independent reading of those ten rules, written with the literal
numbers of the spec (not the schema's tables); hypothesis generates decode nodes and models,
most of them tampered in one or several ways, and the validator must take the same decision.
The command-line side of the same cases (one line, exit 2, nothing written) is in
tests/test_hostile_models.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from oppass import codec, schema
from oppass.errors import OppassError
from oppass.formats import FORMATS

# ----------------------------------------------------------------------------- the spec, read independently

SPEC_FORMATS = {b"fp32": (32, {1}), b"bf16": (16, {16, 1}), b"fp16": (16, {10, 1}), b"int8": (8, {3}),
                b"uint8": (8, {2})}
SPEC_CHECKS = {b"runtime", b"load", b"none"}
SPEC_WORDS = {16, 32, 64, 128, 256, 512}
SPEC_ATTRIBUTE_TYPES = {"format": 3, "word_bits": 2, "shape": 7, "check": 3, "output_type": 2}  # STRING INT INTS
SPEC_OPTIONAL_TYPES = {"code": 3, "range_max": 1}  # STRING FLOAT
SPEC_CODES = {b"parity", b"secded"}
SPEC_SECDED_WORDS = {b"fp32": {32, 64, 128, 256, 512}, b"bf16": {32, 64, 128, 256, 512},
                     b"fp16": {16, 32, 64, 128, 256, 512}, b"int8": {16, 32, 64, 128, 256, 512},
                     b"uint8": {16, 32, 64, 128, 256, 512}}
SPEC_PACKED_TYPES = {8: 2, 16: 4, 32: 12}  # UINT8, UINT16, UINT32; UINT64 (13) for W >= 64


def spec_accepts(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    """Rules 1 to 8 and 10 of FORMAT.md's "Validation", plus: the packed input is an initializer of the main
    graph."""
    if node.domain != "ai.oppass" or node.op_type != "ParityCheckUnpack":
        return False
    if [entry.version for entry in model.opset_import if entry.domain == "ai.oppass"] != [1]:
        return False
    if len(node.input) != 1 or node.input[0] == "" or not 1 <= len(node.output) <= 3 or node.output[0] == "":
        return False
    named = [a for a in node.attribute if a.name in SPEC_ATTRIBUTE_TYPES or a.name in SPEC_OPTIONAL_TYPES]
    found = {a.name: a for a in named}
    if len(found) != len(named) or not set(SPEC_ATTRIBUTE_TYPES) <= set(found):  # each once (onnxruntime refuses
        return False  # a repeated attribute)
    if any(found[name].type != wanted for name, wanted in (SPEC_ATTRIBUTE_TYPES | SPEC_OPTIONAL_TYPES).items()
           if name in found):
        return False
    fmt, check, width = found["format"].s, found["check"].s, found["word_bits"].i
    dims, output_type = list(found["shape"].ints), found["output_type"].i
    code = found["code"].s if "code" in found else b"parity"
    if fmt not in SPEC_FORMATS or check not in SPEC_CHECKS or code not in SPEC_CODES:
        return False
    bits, outputs = SPEC_FORMATS[fmt]
    if not (width == bits or (width in SPEC_WORDS and width >= bits)):
        return False
    if code == b"secded" and width not in SPEC_SECDED_WORDS[fmt] or len(node.output) == 3 and code != b"secded":
        return False
    if "range_max" in found and not (math.isfinite(found["range_max"].f) and found["range_max"].f >= 0):
        return False
    if any(dim < 0 for dim in dims) or math.prod(dims) >= 2**58 or output_type not in outputs:
        return False
    packed = [t for t in model.graph.initializer if t.name == node.input[0]]
    if not packed:
        return False
    n_words = -(-math.prod(dims) * bits // width)
    return packed[0].data_type == SPEC_PACKED_TYPES.get(width, 13) and \
        list(packed[0].dims) == [n_words, max(1, width // 64)]


def unescape(text: str) -> bytes:
    """Inverse of the spec's escaping (rule 9), for names of at most 200 bytes."""
    return re.sub(rb"\\\\|\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]) if m[1] else b"\\",
                  text.encode("ascii"))


# ----------------------------------------------------------------------------- building nodes and models


def wire_string(number: int, payload: bytes) -> bytes:
    """The protobuf encoding of a length-delimited field (a name that need not be UTF-8)."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def with_name(node: onnx.NodeProto, name: bytes) -> onnx.NodeProto:
    node.MergeFromString(wire_string(onnx.NodeProto.DESCRIPTOR.fields_by_name["name"].number, name))
    return node


def valid_parts(fmt: str, word: str | int, shape: tuple[int, ...], check: str = "runtime",
                widen: bool = False, code: str = "parity",
                range_max: float | None = None) -> tuple[onnx.NodeProto, TensorProto]:
    """A decode node and its packed initializer for random weights of `fmt` and `shape`."""
    weight_format = FORMATS[fmt]
    width = codec.word_bits(fmt, word, code)
    codes = np.random.default_rng(0).integers(0, 2**weight_format.bits, math.prod(shape), dtype=np.uint64)
    weights = codes.astype(weight_format.code_dtype).view(weight_format.dtype).reshape(shape)
    packed = codec.encode(weights, width, code=code).packed
    output_type = TensorProto.FLOAT if widen else schema.ONNX_TYPES[fmt]
    corrected = "w::op_corrected" if code == "secded" else None
    decode = schema.DecodeNode("w::op_decode", "w::op_packed", "w", "w::op_masked", fmt, width, shape, check,
                               output_type, code, range_max, corrected)
    return schema.make_decode_node(decode), numpy_helper.from_array(packed, "w::op_packed")


def model_of(node: onnx.NodeProto, initializers: list[TensorProto],
             imports: list[tuple[str, int]] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph([node], "decode", [], [helper.make_empty_tensor_value_info(n) for n in node.output if n],
                              initializers)
    opsets = [("", 17), ("ai.oppass", 1)] if imports is None else imports
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def attribute(name: str, attribute_type: int, payload: object) -> AttributeProto:
    """An attribute of any AttributeProto type (UNDEFINED included) whose value field holds `payload`."""
    made = AttributeProto(name=name, type=attribute_type)  # type: ignore[arg-type]
    if attribute_type == AttributeProto.STRING:
        made.s = payload if isinstance(payload, bytes) else str(payload).encode()
    elif attribute_type == AttributeProto.INT:
        made.i = int(payload) if isinstance(payload, int) else 0  # type: ignore[call-overload]
    elif attribute_type == AttributeProto.INTS:
        made.ints.extend(payload if isinstance(payload, list) else [1])  # type: ignore[arg-type]
    elif attribute_type == AttributeProto.FLOAT:
        made.f = payload if isinstance(payload, float) else 1.5
    elif attribute_type == AttributeProto.FLOATS:
        made.floats.extend([1.0, 2.0])
    elif attribute_type == AttributeProto.STRINGS:
        made.strings.extend([b"fp32"])
    elif attribute_type == AttributeProto.TENSOR:
        made.t.CopyFrom(numpy_helper.from_array(np.zeros(2, np.float32)))
    elif attribute_type == AttributeProto.UNDEFINED:  # the value is there, the type is not
        made.s, made.i = b"fp32", 64
    return made


# ----------------------------------------------------------------------------- strategies

VALID_TRIPLES = [(fmt, word) for fmt in FORMATS for word in ("weight", 16, 32, 64, 128, 256, 512)
                 if word == "weight" or word >= FORMATS[fmt].bits]
ATTRIBUTE_TYPES = [value for value in AttributeProto.AttributeType.values()]  # type: ignore[attr-defined]


def mutated_string(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(valid),
        st.sampled_from([valid + b"\0", valid + b"\0x", b" " + valid, valid + b" ", valid + b"\n", valid.upper(),
                         valid.capitalize(), valid[:-1], b"", b"fp64", b"runtime\0", b"\xff\xfe"]),
        st.binary(max_size=12),
    )


@st.composite
def tampered_models(draw: st.DrawFn) -> tuple[onnx.NodeProto, onnx.ModelProto]:
    fmt, word = draw(st.sampled_from(VALID_TRIPLES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    check = draw(st.sampled_from(["runtime", "load", "none"]))
    widen = draw(st.booleans()) and fmt in ("bf16", "fp16")
    fits = codec.word_bits(fmt, word) in SPEC_SECDED_WORDS[fmt.encode()]
    code = draw(st.sampled_from(["parity", "secded"] if fits else ["parity"]))
    range_max = draw(st.one_of(st.none(), st.sampled_from([0.0, 1.5, 3.0e38])))
    node, packed = valid_parts(fmt, word, shape, check, widen, code, range_max)
    values = {a.name: a for a in node.attribute}
    tamper = draw(st.integers(0, 2)) > 0  # else only what the spec ignores: extra attributes, order, the name
    attributes = []
    types = schema.ATTRIBUTE_TYPES | schema.OPTIONAL_ATTRIBUTE_TYPES
    for name, wanted in types.items():
        if name not in values:
            if tamper and draw(st.integers(0, 3)) == 0:  # an optional attribute the valid node does not have
                payload = b"secded" if name == "code" else 2.0
                values[name] = attribute(name, wanted, payload)
            else:
                continue
        kind = draw(st.sampled_from(["keep"] * 8 + ["value", "type", "missing", "twice"])) if tamper else "keep"
        if kind == "missing":
            continue
        if kind == "type":
            attributes.append(attribute(name, draw(st.sampled_from(ATTRIBUTE_TYPES)), helper.get_attribute_value(
                values[name])))
            continue
        if kind == "value":
            if name in ("format", "check", "code"):
                payload: object = draw(mutated_string(values[name].s))
            elif name == "range_max":
                payload = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-45, 3.4e38]))
            elif name == "shape":
                payload = draw(st.one_of(st.lists(st.integers(-3, 7), max_size=4),
                                         st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=3),
                                         st.just([2**20] * 3), st.just([2**31] * 40), st.just([0, 2**62, 2**62])))
            elif name == "word_bits":
                payload = draw(st.one_of(st.sampled_from([0, 1, 8, 16, 24, 32, 48, 64, 128, 256, 512, 1024, -64]),
                                         st.integers(-2**63, 2**63 - 1)))
            else:
                payload = draw(st.one_of(st.sampled_from([1, 2, 3, 10, 16, 0, 11, 13]), st.integers(-2**63, 2**63 - 1)))
            attributes.append(attribute(name, wanted, payload))
            continue
        attributes.append(values[name])
        if kind == "twice":
            attributes.append(values[name])
    attributes.extend(draw(st.lists(st.sampled_from([attribute("extra", AttributeProto.INT, 1),
                                                     attribute("Format", AttributeProto.STRING, b"fp64")]),
                                    max_size=2)))
    del node.attribute[:]
    node.attribute.extend(draw(st.permutations(attributes)))
    if not tamper:
        if draw(st.booleans()):
            with_name(node, draw(st.binary(max_size=300)))
        return node, model_of(node, [packed], draw(st.sampled_from([None, [("ai.oppass", 1)]])))
    if draw(st.integers(0, 9)) == 0:
        node.domain = draw(st.sampled_from(["", "ai.oppass.", "AI.OPPASS", "com.microsoft"]))
    if draw(st.integers(0, 9)) == 0:
        node.op_type = draw(st.sampled_from(["parityCheckUnpack", "Unpack", "ParityCheckUnpack2"]))
    if draw(st.integers(0, 5)) == 0:
        del node.input[:]
        node.input.extend(draw(st.lists(st.sampled_from(["w::op_packed", "", "other"]), max_size=3)))
    if draw(st.integers(0, 5)) == 0:
        del node.output[:]
        node.output.extend(draw(st.lists(st.sampled_from(["w", "", "w::op_masked", "w::op_corrected"]), max_size=4)))
    if draw(st.integers(0, 5)) == 0:
        packed.data_type = draw(st.sampled_from([TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32,
                                                 TensorProto.UINT64, TensorProto.INT64, TensorProto.FLOAT]))
    if draw(st.integers(0, 5)) == 0:
        del packed.dims[:]
        packed.dims.extend(draw(st.lists(st.integers(0, 70), max_size=3)))
    initializers = [] if draw(st.integers(0, 9)) == 0 else [packed]
    imports = draw(st.one_of(st.just(None), st.lists(st.sampled_from([("", 17), ("ai.oppass", 1), ("ai.oppass", 2),
                                                                      ("ai.oppass", 0), ("ai.oppass", 1000)]),
                                                     max_size=3)))
    if draw(st.booleans()):
        with_name(node, draw(st.binary(max_size=300)))
    return node, model_of(node, initializers, imports)


# ----------------------------------------------------------------------------- the validator decides as the spec


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tampered_models())
def test_the_validator_decides_as_the_spec(case: tuple[onnx.NodeProto, onnx.ModelProto]) -> None:
    node, model = case
    accepted = spec_accepts(node, model)
    event("accepted" if accepted else "refused")
    try:
        decode = schema.read_decode_node(node, model)
    except OppassError as error:
        assert not accepted, f"refused a node the spec accepts: {error}"
        message = str(error)
        assert all(0x20 <= ord(char) <= 0x7E for char in message), message
        assert schema.escape(node.name) in message
        return
    assert accepted, f"accepted a node the spec refuses: {node}"
    found = {a.name: a for a in node.attribute}
    assert decode == schema.DecodeNode(
        node.name, node.input[0], node.output[0], node.output[1] if len(node.output) >= 2 and node.output[1] else None,
        found["format"].s.decode(), found["word_bits"].i, tuple(found["shape"].ints), found["check"].s.decode(),
        found["output_type"].i, found["code"].s.decode() if "code" in found else "parity",
        found["range_max"].f if "range_max" in found else None,
        node.output[2] if len(node.output) == 3 and node.output[2] else None)


@pytest.mark.parametrize(("fmt", "word"), VALID_TRIPLES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 3), (2, 0, 5), (3, 3, 3, 3)])
def test_every_valid_node_is_read_back_as_made(fmt: str, word: str | int, shape: tuple[int, ...]) -> None:
    fits = codec.word_bits(fmt, word) in SPEC_SECDED_WORDS[fmt.encode()]
    for widen in (False, True) if fmt in ("bf16", "fp16") else (False,):
        for code, range_max in [("parity", None), ("parity", 0.0)] + ([("secded", None), ("secded", 2.5)] * fits):
            node, packed = valid_parts(fmt, word, shape, widen=widen, code=code, range_max=range_max)
            model = model_of(node, [packed])
            decode = schema.read_decode_node(node, model)
            assert schema.make_decode_node(decode).SerializeToString() == node.SerializeToString()
            assert (decode.weights, decode.packed_shape) == (math.prod(shape), tuple(packed.dims))
            assert (decode.code, decode.range_max) == (code, range_max)
            assert (decode.corrected_output is not None) == (code == "secded")
            assert schema.read_decode_nodes(model) == [decode]


def test_a_parity_node_has_no_code_attribute_and_outputs_as_before() -> None:
    node, _ = valid_parts("fp32", 64, (5,))
    assert "code" not in {a.name for a in node.attribute} and list(node.output) == ["w", "w::op_masked"]
    secded, _ = valid_parts("fp32", 64, (5,), code="secded", range_max=1.0)
    assert list(secded.output) == ["w", "w::op_masked", "w::op_corrected"]
    assert {a.name: a.type for a in secded.attribute if a.name in ("code", "range_max")} == {
        "code": AttributeProto.STRING, "range_max": AttributeProto.FLOAT}


@pytest.mark.parametrize(("fmt", "width"), [("bf16", 16), ("int8", 8), ("uint8", 8)])
def test_secded_where_it_does_not_fit_is_refused(fmt: str, width: int) -> None:
    node, packed = valid_parts(fmt, 32, (4,), code="secded")
    _set(node, attribute("word_bits", AttributeProto.INT, width))
    with pytest.raises(OppassError, match=f"has code secded with word_bits {width}, where it does not fit {fmt}"):
        schema.read_decode_node(node, model_of(node, [packed]))


@pytest.mark.parametrize(("change", "message"), [
    (lambda node, model: node.attribute.pop(), "lacks attribute 'word_bits'"),
    (lambda node, model: _set(node, attribute("format", AttributeProto.UNDEFINED, None)),
     "has attribute 'format' of type UNDEFINED, expected STRING"),
    (lambda node, model: _set(node, attribute("shape", AttributeProto.INT, 3)),
     "has attribute 'shape' of type INT, expected INTS"),
    (lambda node, model: node.attribute.append(node.attribute[0]), "has attribute 'check' more than once"),
    (lambda node, model: _set(node, attribute("format", AttributeProto.STRING, b"fp32\0x")),
     "has format 'fp32\\x00x'"),
    (lambda node, model: _set(node, attribute("check", AttributeProto.STRING, b"Runtime")), "has check 'Runtime'"),
    (lambda node, model: _set(node, attribute("word_bits", AttributeProto.INT, 16)),
     "has word_bits 16, expected one of 32, 64, 128, 256, 512 for fp32"),
    (lambda node, model: _set(node, attribute("shape", AttributeProto.INTS, [-1, 3])), "negative dimension"),
    (lambda node, model: _set(node, attribute("shape", AttributeProto.INTS, [2**29, 2**29])),
     "a shape of 2**58 weights or more"),
    (lambda node, model: _set(node, attribute("output_type", AttributeProto.INT, TensorProto.FLOAT16)),
     "has output_type 10, expected FLOAT for fp32"),
    (lambda node, model: node.input.append("p2"), "must have exactly one input"),
    (lambda node, model: node.output.append("third"), "has three outputs, but only code secded has the third"),
    (lambda node, model: node.output.extend(["third", "fourth"]), "must have one to three outputs"),
    (lambda node, model: _set(node, attribute("code", AttributeProto.STRING, b"SECDED")), "has code 'SECDED'"),
    (lambda node, model: _set(node, attribute("code", AttributeProto.INT, 1)),
     "has attribute 'code' of type INT, expected STRING"),
    (lambda node, model: _set(node, attribute("range_max", AttributeProto.FLOAT, -1.0)),
     "has range_max -1.0, expected a finite number >= 0"),
    (lambda node, model: _set(node, attribute("range_max", AttributeProto.FLOAT, math.nan)), "has range_max nan"),
    (lambda node, model: _set(node, attribute("range_max", AttributeProto.INTS, [1])),
     "has attribute 'range_max' of type INTS, expected FLOAT"),
    (lambda node, model: model.opset_import.pop(), "the model does not import it"),
    (lambda node, model: setattr(model.opset_import[1], "version", 2), "imports it at version(s) 2"),
    (lambda node, model: model.opset_import.append(helper.make_opsetid("ai.oppass", 1)),
     "imports it at version(s) 1, 1"),
    (lambda node, model: setattr(model.graph.initializer[0], "data_type", TensorProto.INT64),
     "does not match its packed tensor: INT64 [3, 1], expected UINT64 [3, 1]"),
    (lambda node, model: model.graph.initializer[0].dims.append(1), "does not match its packed tensor"),
    (lambda node, model: model.graph.initializer.pop(), "which is not an initializer of the main graph"),
])
def test_refusals_say_what_is_wrong(change, message: str) -> None:
    node, packed = valid_parts("fp32", 64, (5,))
    model = model_of(node, [packed])
    node = model.graph.node[0]
    change(node, model)
    with pytest.raises(OppassError, match=re.escape(f"decode node 'w::op_decode' {''}")) as raised:
        schema.read_decode_node(node, model)
    assert message in str(raised.value)


def _set(node: onnx.NodeProto, replacement: AttributeProto) -> None:
    kept = [a for a in node.attribute if a.name != replacement.name]
    del node.attribute[:]
    node.attribute.extend([*kept, replacement])


def test_other_op_types_of_the_domain_are_refused() -> None:
    node, packed = valid_parts("int8", "weight", (4,))
    node.op_type = "ParityCheck"
    with pytest.raises(OppassError, match="has op type 'ParityCheck': expected ParityCheckUnpack of domain ai.oppass"):
        schema.read_decode_nodes(model_of(node, [packed]))


def test_an_oppass_node_inside_a_subgraph_is_refused() -> None:
    node, packed = valid_parts("int8", "weight", (4,))
    branch = helper.make_graph([node], "branch", [], [helper.make_empty_tensor_value_info("w")], [packed])
    outer = helper.make_node("If", ["c"], ["w"], then_branch=branch, else_branch=branch, name="if")
    condition = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = helper.make_model(helper.make_graph([outer], "g", [condition], [helper.make_empty_tensor_value_info("w")]))
    with pytest.raises(OppassError, match="inside a subgraph"):
        schema.read_decode_nodes(model)


def test_make_decode_node_refuses_what_read_refuses() -> None:
    decode = schema.DecodeNode("n", "p", "y", None, "fp16", 8, (4,), "runtime", TensorProto.FLOAT16)
    with pytest.raises(OppassError, match="has word_bits 8"):
        schema.make_decode_node(decode)
    parity = schema.DecodeNode("n", "p", "y", None, "fp16", 64, (4,), "runtime", TensorProto.FLOAT16,
                               corrected_output="c")
    with pytest.raises(OppassError, match="corrected-words output, which only code secded has"):
        schema.make_decode_node(parity)
    with pytest.raises(OppassError, match="has range_max inf"):
        schema.make_decode_node(schema.DecodeNode("n", "p", "y", None, "fp16", 64, (4,), "runtime",
                                                  TensorProto.FLOAT16, range_max=math.inf))


# ----------------------------------------------------------------------------- names in errors (rule 9)


@pytest.mark.parametrize(("name", "escaped"), [
    ("conv1.w::op_decode", "conv1.w::op_decode"),
    ("a\\b", "a\\\\b"),
    ("tab\there\n", "tab\\x09here\\x0a"),
    ("poids_é", "poids_\\xc3\\xa9"),
    (b"\xff\x00'~\x7f", "\\xff\\x00'~\\x7f"),
    ("x" * 200, "x" * 200),
    ("x" * 201, "x" * 200 + "..."),
    (b"\\" * 201, "\\\\" * 200 + "..."),
])
def test_names_are_escaped_as_the_spec_says(name: str | bytes, escaped: str) -> None:
    assert schema.escape(name) == escaped


@given(st.binary(max_size=400))
@example(b"\\x41")
def test_escaping_is_printable_ascii_and_reversible(name: bytes) -> None:
    escaped = schema.escape(name)
    assert all(0x20 <= ord(char) <= 0x7E for char in escaped)
    if len(name) <= schema.NAME_LIMIT:
        assert unescape(escaped) == name
    else:
        assert escaped.endswith("...") and unescape(escaped[:-3]) == name[:schema.NAME_LIMIT]


# ----------------------------------------------------------------------------- tables derived from onnx and ml_dtypes


def test_onnx_types_derived_from_onnx_are_the_spec_s() -> None:
    assert schema.ONNX_TYPES == {"fp32": TensorProto.FLOAT, "bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16,
                                 "int8": TensorProto.INT8, "uint8": TensorProto.UINT8}
    assert schema.OUTPUT_TYPES == {"fp32": (TensorProto.FLOAT,), "bf16": (TensorProto.BFLOAT16, TensorProto.FLOAT),
                                   "fp16": (TensorProto.FLOAT16, TensorProto.FLOAT), "int8": (TensorProto.INT8,),
                                   "uint8": (TensorProto.UINT8,)}
    assert schema.ATTRIBUTE_TYPES == {"format": AttributeProto.STRING, "word_bits": AttributeProto.INT,
                                      "shape": AttributeProto.INTS, "check": AttributeProto.STRING,
                                      "output_type": AttributeProto.INT}
    assert schema.OPTIONAL_ATTRIBUTE_TYPES == {"code": AttributeProto.STRING, "range_max": AttributeProto.FLOAT}


def test_float_fields_derived_from_ml_dtypes_are_the_spec_s() -> None:
    fields = {name: (f.exponent_bits, f.mantissa_bits) for name, f in FORMATS.items() if f.is_float}
    assert fields == {"fp32": (8, 23), "bf16": (8, 7), "fp16": (5, 10)}
    assert {name: (f.bits, f.code_dtype) for name, f in FORMATS.items()} == {
        "fp32": (32, np.uint32), "bf16": (16, np.uint16), "fp16": (16, np.uint16), "int8": (8, np.uint8),
        "uint8": (8, np.uint8)}
    with pytest.raises(TypeError):
        FORMATS["int8"].mantissa_bits  # noqa: B018
