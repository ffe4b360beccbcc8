"""The ParityCheckUnpack operator (docs/FORMAT.md): its names, attributes, and the one decode-node validator.

The pass builds decode nodes with `make_decode_node`; everything that reads one (inspect,
strip, inject, load-time folding, campaigns) goes through `read_decode_node`, which accepts
exactly the nodes the C kernel accepts (FORMAT.md, "Validation") and refuses the rest with
an `OppassError` naming the node in plain ASCII (`escape`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import AttributeProto, TensorProto, helper

from oppass import codec, modelio
from oppass.errors import OppassError
from oppass.formats import FORMATS, WORD_BITS, WeightFormat

DOMAIN = "ai.oppass"
OP_TYPE = "ParityCheckUnpack"
DOMAIN_VERSION = 1
CHECK_MODES = ("runtime", "load", "none")
# The graph output summing the decode nodes' masked-word counts (`transform(report_faults=True)`).
MASKED_WORDS_OUTPUT = "oppass_masked_words"
# Prefix of the names of the nodes and partial sums that compute it.
MASKED_WORDS_SUM = f"{MASKED_WORDS_OUTPUT}::op_"
# The attributes of a decode node, each with the one AttributeProto type it may have.
ATTRIBUTE_TYPES: dict[str, int] = {
    "format": AttributeProto.STRING,
    "word_bits": AttributeProto.INT,
    "shape": AttributeProto.INTS,
    "check": AttributeProto.STRING,
    "output_type": AttributeProto.INT,
}
# prod(shape) stays below this, so that every bit and byte count of the tensor fits an int64.
WEIGHT_LIMIT = 2**58
# Bytes of a name kept in an error message.
NAME_LIMIT = 200

ONNX_TYPES: dict[str, int] = {
    name: helper.np_dtype_to_tensor_dtype(weight_format.dtype) for name, weight_format in FORMATS.items()
}
FORMAT_OF_ONNX_TYPE: dict[int, str] = {onnx_type: name for name, onnx_type in ONNX_TYPES.items()}
# The ONNX types output 0 may have, per format: its own, and FLOAT for bf16 and fp16.
OUTPUT_TYPES: dict[str, tuple[int, ...]] = {
    name: tuple(helper.np_dtype_to_tensor_dtype(dtype) for dtype in weight_format.output_dtypes)
    for name, weight_format in FORMATS.items()
}

_ESCAPED = tuple("\\\\" if byte == 0x5C else chr(byte) if 0x20 <= byte <= 0x7E else f"\\x{byte:02x}"
                 for byte in range(256))


@dataclass(frozen=True)
class DecodeNode:
    """A valid ParityCheckUnpack node: its name, input, outputs and attributes.

    `masked_output` is None when the node has no second output (or an empty one). A name read
    from a model is bytes when it is not UTF-8 (protobuf gives it so); `make_decode_node` takes str.
    """

    name: str
    packed: str
    output: str
    masked_output: str | None
    format: str
    word_bits: int
    shape: tuple[int, ...]
    check: str
    output_type: int

    @property
    def weight_format(self) -> WeightFormat:
        """The format's table entry."""
        return FORMATS[self.format]

    @property
    def weights(self) -> int:
        """Number of weights the node decodes: prod(shape) (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def packed_type(self) -> int:
        """ONNX element type of the packed input: UINT8/16/32 for W = 8/16/32, UINT64 for W >= 64."""
        return helper.np_dtype_to_tensor_dtype(codec.storage_dtype(self.word_bits).newbyteorder("="))

    @property
    def packed_shape(self) -> tuple[int, int]:
        """Dims [n_words, L] of the packed input."""
        return codec.packed_shape(self.weights, self.format, self.word_bits)


def escape(name: str | bytes) -> str:
    r"""A name (or a string attribute) as plain ASCII for an error message.

    Bytes 0x20..0x7E are kept except the backslash, written `\\`; every other byte is written
    `\xNN`; a name longer than NAME_LIMIT bytes is cut to them followed by `...`. Protobuf
    gives a string field that is not UTF-8 as bytes; a str is escaped as its UTF-8 bytes.
    """
    raw = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else bytes(name)
    text = "".join(_ESCAPED[byte] for byte in raw[:NAME_LIMIT])
    return f"{text}..." if len(raw) > NAME_LIMIT else text


def is_decode_node(node: onnx.NodeProto) -> bool:
    """Whether the node is a ParityCheckUnpack of domain ai.oppass (valid or not)."""
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def make_decode_node(decode: DecodeNode) -> onnx.NodeProto:
    """The NodeProto of a decode node; refuses attribute values `read_decode_node` would refuse."""
    _check_values(decode.name, decode.format.encode(), decode.word_bits, decode.shape, decode.check.encode(),
                  decode.output_type)
    outputs = [decode.output] if decode.masked_output is None else [decode.output, decode.masked_output]
    node = helper.make_node(OP_TYPE, [decode.packed], outputs, name=decode.name, domain=DOMAIN)
    values = {"format": decode.format, "word_bits": decode.word_bits, "shape": list(decode.shape),
              "check": decode.check, "output_type": decode.output_type}
    node.attribute.extend(helper.make_attribute(name, values[name], attr_type=ATTRIBUTE_TYPES[name])
                          for name in sorted(ATTRIBUTE_TYPES))
    return node


def read_decode_nodes(model: onnx.ModelProto) -> list[DecodeNode]:
    """The decode nodes of the model's main graph, validated; an ai.oppass node in a subgraph is refused."""
    for graph in list(modelio.all_graphs(model.graph))[1:]:
        for node in graph.node:
            if node.domain == DOMAIN:
                raise OppassError(f"ai.oppass node '{escape(node.name)}' inside a subgraph is not supported")
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    return [read_decode_node(node, model, initializers) for node in model.graph.node if node.domain == DOMAIN]


def read_decode_node(
    node: onnx.NodeProto, model: onnx.ModelProto, initializers: Mapping[str, TensorProto] | None = None
) -> DecodeNode:
    """The decode node `node` of `model`, validated per docs/FORMAT.md ("Validation"), its packed input
    required to be an initializer of the main graph (`initializers`: those by name, if already at hand)."""
    if not is_decode_node(node):
        raise OppassError(f"node '{escape(node.name)}' of domain '{escape(node.domain)}' has op type "
                          f"'{escape(node.op_type)}': expected {OP_TYPE} of domain {DOMAIN}")
    _check_import(node, model)
    if len(node.input) != 1 or not node.input[0]:
        raise _invalid(node, f"must have exactly one input, with a name (it has {len(node.input)})")
    if not 1 <= len(node.output) <= 2 or not node.output[0]:
        raise _invalid(node, f"must have one or two outputs, the first with a name (it has {len(node.output)})")
    attributes = _attributes(node)
    fmt, check = attributes["format"].s, attributes["check"].s
    word_bits, output_type = attributes["word_bits"].i, attributes["output_type"].i
    shape = tuple(attributes["shape"].ints)
    _check_values(node.name, fmt, word_bits, shape, check, output_type)
    masked_output = node.output[1] if len(node.output) == 2 and node.output[1] else None
    decode = DecodeNode(node.name, node.input[0], node.output[0], masked_output, fmt.decode(), word_bits, shape,
                        check.decode(), output_type)
    by_name = {tensor.name: tensor for tensor in model.graph.initializer} if initializers is None else initializers
    _check_packed(decode, by_name.get(decode.packed))
    return decode


def _invalid(node: onnx.NodeProto | str, problem: str) -> OppassError:
    name = node.name if isinstance(node, onnx.NodeProto) else node
    return OppassError(f"decode node '{escape(name)}' {problem}")


def _check_import(node: onnx.NodeProto, model: onnx.ModelProto) -> None:
    versions = [entry.version for entry in model.opset_import if entry.domain == DOMAIN]
    if versions != [DOMAIN_VERSION]:
        found = f"imports it at version(s) {', '.join(map(str, versions))}" if versions else "does not import it"
        raise _invalid(node, f"needs the model to import domain {DOMAIN} at version {DOMAIN_VERSION}; the model "
                             f"{found}")


def _attributes(node: onnx.NodeProto) -> dict[str, AttributeProto]:
    """The node's five attributes by name, each present once with its type; other names are ignored."""
    found: dict[str, AttributeProto] = {}
    for attribute in node.attribute:
        if attribute.name in ATTRIBUTE_TYPES:
            if attribute.name in found:
                raise _invalid(node, f"has attribute '{attribute.name}' more than once")
            found[attribute.name] = attribute
    for name, wanted in ATTRIBUTE_TYPES.items():
        if name not in found:
            raise _invalid(node, f"lacks attribute '{name}'")
        if found[name].type != wanted:
            raise _invalid(node, f"has attribute '{name}' of type {_type_name(found[name].type)}, expected "
                                 f"{_type_name(wanted)}")
    return found


def _type_name(attribute_type: int) -> str:
    try:
        return AttributeProto.AttributeType.Name(attribute_type)
    except ValueError:
        return str(attribute_type)


def _check_values(name: str, fmt: bytes, word_bits: int, shape: Sequence[int], check: bytes, output_type: int) -> None:
    """Refuses attribute values outside docs/FORMAT.md (items 4 to 7 of "Validation")."""
    known = {name.encode(): name for name in FORMATS}
    if fmt not in known:
        raise _invalid(name, f"has format '{escape(fmt)}', expected one of {', '.join(FORMATS)}")
    if check not in {mode.encode() for mode in CHECK_MODES}:
        raise _invalid(name, f"has check '{escape(check)}', expected one of {', '.join(CHECK_MODES)}")
    weight_format = FORMATS[known[fmt]]
    allowed = [weight_format.bits] + [width for width in WORD_BITS if width > weight_format.bits]
    if word_bits not in allowed:
        raise _invalid(name, f"has word_bits {word_bits}, expected one of {', '.join(map(str, allowed))} for "
                             f"{weight_format.name}")
    if any(dim < 0 for dim in shape):
        raise _invalid(name, f"has a negative dimension in shape ({min(shape)})")
    if _product_reaches(shape, WEIGHT_LIMIT):
        raise _invalid(name, f"has a shape of 2**{math.log2(WEIGHT_LIMIT):.0f} weights or more")
    if output_type not in OUTPUT_TYPES[weight_format.name]:
        expected = ", ".join(TensorProto.DataType.Name(t) for t in OUTPUT_TYPES[weight_format.name])
        raise _invalid(name, f"has output_type {output_type}, expected {expected} for {weight_format.name}")


def _product_reaches(dims: Sequence[int], limit: int) -> bool:
    """Whether the product of non-negative `dims` is at least `limit`, without computing a huge product."""
    if 0 in dims:
        return False
    product = 1
    for dim in dims:
        product *= dim
        if product >= limit:
            return True
    return False


def _check_packed(decode: DecodeNode, tensor: TensorProto | None) -> None:
    """Refuses a packed input that is not a main-graph initializer of the type and dims the attributes imply."""
    if tensor is None:
        raise _invalid(decode.name, f"reads '{escape(decode.packed)}', which is not an initializer of the main graph")
    wanted_type, wanted_dims = decode.packed_type, list(decode.packed_shape)
    if tensor.data_type != wanted_type or list(tensor.dims) != wanted_dims:
        raise _invalid(decode.name, f"does not match its packed tensor: {tensor_type_name(tensor.data_type)} "
                                    f"{list(tensor.dims)}, expected {tensor_type_name(wanted_type)} {wanted_dims} for "
                                    f"shape {list(decode.shape)} of {decode.format} in {decode.word_bits}-bit words")


def tensor_type_name(data_type: int) -> str:
    """The name of an ONNX tensor data type (FLOAT, ...), or `type N` for a number ONNX does not define."""
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"type {data_type}"
