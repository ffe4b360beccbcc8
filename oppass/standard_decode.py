"""The load-time parity check as standard ONNX operators: what ParityCheckUnpack computes, with no custom op.

`standard_decode` returns the nodes (and their small constant initializers) that read a
packed initializer laid out as docs/FORMAT.md describes and produce the decoded weights,
every odd-parity word zeroed, plus optionally the number of masked words. Every input of
the chain is an initializer, so a runtime that constant-folds (onnxruntime does at session
creation) checks and decodes the weights once, when the model is loaded.

The chain, for W-bit words stored as `[n_words, L]` lanes of S bits (S = min(W, 64)):

1. parity: the L lanes of each word are XOR-ed by halving (Split, BitwiseXor), then the
   remaining S bits by shift-and-XOR folds (BitShift, BitwiseXor), and bit 0 is kept
   (BitwiseAnd): 1 for an odd word;
2. masking: the lanes are multiplied by `1 XOR parity` (Mul), which zeroes odd words;
3. weights: each lane is cut into S/b codes of the weight width b by repeated halving
   (Unsqueeze, BitShift by [0, S/2], Cast to the half-width unsigned type, which keeps the
   low bits), flattened in stream order (Reshape), the zero padding of the last word
   dropped (Slice) and reshaped to the weight shape (Reshape);
4. type: the unsigned codes are reinterpreted as the format's type (BitCast, opset 26);
   bf16 widens to float by moving its bits up (Cast to uint32, BitShift by 16, BitCast);
   fp16 widens with Cast, its NaNs rebuilt from their bits (BitwiseAnd/Or, BitShift,
   IsNaN, Where) because Cast may set a signalling NaN's quiet bit;
5. count: the parities, cast to int64, summed (ReduceSum, keepdims 0) into an int64 scalar.

Every op is used only on types onnxruntime 1.32 implements on CPU (BitShift, BitwiseXor,
BitwiseAnd/Or, Mul, Split, Slice, Reshape, Unsqueeze, Cast on uint8/16/32/64; Where on
uint32; ReduceSum on int64). Node, value and constant names all start with
`<weight>::op_decode_`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from oppass import codec
from oppass.errors import OppassError

# BitCast appeared in opset 26; models that use it need IR version 13 (onnx.helper.find_min_ir_version_for).
OPSET = 26
IR_VERSION = 13

# binary32 fields of a widened fp16 NaN: its sign (fp16 bit 15 moved up 16), an all-ones exponent,
# and its 10 mantissa bits (moved up 13) at the top of the binary32 mantissa.
_FP32_SIGN = 0x8000_0000
_FP32_EXPONENT = 0x7F80_0000
_FP32_MANTISSA_OF_FP16 = 0x007F_E000


@dataclass(frozen=True)
class StandardDecode:
    """The standard-op nodes that decode one packed weight, and the constant initializers they read."""

    nodes: list[onnx.NodeProto]
    initializers: list[TensorProto]


def standard_decode(
    name: str,
    packed: str,
    output: str,
    fmt: str,
    word_bits: int,
    shape: Sequence[int],
    output_type: int,
    masked_words: str | None = None,
) -> StandardDecode:
    """Standard ONNX nodes that compute ParityCheckUnpack (docs/FORMAT.md) on the initializer `packed`.

    `name` is the weight's name (every new node, value and constant is named `<name>::op_decode_*`),
    `output` receives the decoded weights of shape `shape` and type `output_type` (the format's
    own type, or FLOAT for bf16 and fp16), and `masked_words`, when given, the int64 scalar count
    of masked words. The nodes need opset `OPSET`.
    """
    weight_format = codec.FORMATS.get(fmt)
    if weight_format is None:
        raise OppassError(f"unknown weight format {fmt!r}: expected one of {', '.join(codec.FORMATS)}")
    width = codec.word_bits(fmt, word_bits)
    own_type = helper.np_dtype_to_tensor_dtype(weight_format.dtype)
    allowed_types = (own_type, TensorProto.FLOAT) if fmt in ("bf16", "fp16") else (own_type,)
    if output_type not in allowed_types:
        allowed = " or ".join(TensorProto.DataType.Name(allowed_type) for allowed_type in allowed_types)
        raise OppassError(f"cannot decode {fmt} weight {name!r} to output type {output_type}: expected {allowed}")
    dims = [int(dim) for dim in shape]
    n_weights = codec.element_count(dims)
    n_words, lanes = codec.packed_shape(n_weights, fmt, width)

    chain = _Chain(f"{name}::op_decode")
    lane_dtype = codec.storage_dtype(width)
    one = chain.constant("one", lane_dtype.type(1))
    parity = _parity(chain, packed, lanes, lane_dtype, one)
    even = chain.node("BitwiseXor", [parity, one], "even")
    kept = chain.node("Mul", [packed, even], "masked")
    codes = _split_lanes(chain, kept, lane_dtype, weight_format.bits)
    if n_words * (width // weight_format.bits) != n_weights:  # drop the last word's zero padding
        stream = chain.node("Reshape", [codes, chain.constant("stream_shape", np.array([-1], np.int64))], "stream")
        ends = chain.constant("weight_count", np.array([n_weights], np.int64))
        codes = chain.node("Slice", [stream, chain.constant("zero", np.array([0], np.int64)), ends], "unpadded")
    weight_shape = chain.constant("shape", np.array(dims, np.int64))
    if fmt == "uint8":  # the codes are the weights
        chain.node("Reshape", [codes, weight_shape], "weights", output=output, allowzero=1)
    else:
        shaped = chain.node("Reshape", [codes, weight_shape], "codes", allowzero=1)
        _convert(chain, shaped, fmt, own_type, output_type, output)
    if masked_words is not None:
        count = chain.node("Cast", [parity], "parity_int64", to=TensorProto.INT64)
        chain.node("ReduceSum", [count], "count", keepdims=0, output=masked_words)
    return StandardDecode(chain.nodes, chain.initializers)


@dataclass
class _Chain:
    """Builds a chain of nodes whose outputs and constants are named `<prefix>_<step>`."""

    prefix: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)

    def node(self, op_type: str, inputs: list[str], step: str, output: str | None = None, **attributes: Any) -> str:
        """Appends one node; returns the name of its output (`output`, or `<prefix>_<step>`)."""
        result = output if output is not None else f"{self.prefix}_{step}"
        self.nodes.append(helper.make_node(op_type, inputs, [result], name=f"{self.prefix}_{step}", **attributes))
        return result

    def constant(self, step: str, value: np.ndarray | np.generic) -> str:
        """Adds a constant initializer; returns its name."""
        tensor = numpy_helper.from_array(np.asarray(value), f"{self.prefix}_{step}")
        self.initializers.append(tensor)
        return tensor.name


def _parity(chain: _Chain, packed: str, lanes: int, lane_dtype: np.dtype, one: str) -> str:
    """[n_words, 1] lanes holding each word's parity (1: odd) in the lane type."""
    folded = packed
    while lanes > 1:
        lanes //= 2
        low, high = f"{chain.prefix}_lanes_{lanes}_low", f"{chain.prefix}_lanes_{lanes}_high"
        chain.nodes.append(helper.make_node("Split", [folded], [low, high], name=f"{chain.prefix}_split_{lanes}",
                                            axis=1, num_outputs=2))
        folded = chain.node("BitwiseXor", [low, high], f"lanes_{lanes}")
    shift = lane_dtype.itemsize * 8
    while shift > 1:
        shift //= 2
        shifted = chain.node("BitShift", [folded, chain.constant(f"fold_{shift}_by", lane_dtype.type(shift))],
                             f"fold_{shift}_shifted", direction="RIGHT")
        folded = chain.node("BitwiseXor", [folded, shifted], f"fold_{shift}")
    return chain.node("BitwiseAnd", [folded, one], "parity")


def _split_lanes(chain: _Chain, lanes: str, lane_dtype: np.dtype, weight_bits: int) -> str:
    """The lanes cut into unsigned codes of `weight_bits`, in stream order along new trailing axes.

    Each step doubles the element count and halves the element width, so no intermediate
    tensor holds more than twice the packed bytes.
    """
    codes, bits = lanes, lane_dtype.itemsize * 8
    if bits == weight_bits:
        return codes
    last_axis = chain.constant("last_axis", np.array([-1], np.int64))
    while bits > weight_bits:
        half = bits // 2
        column = chain.node("Unsqueeze", [codes, last_axis], f"split_{half}_column")
        shifts = chain.constant(f"split_{half}_shifts", np.array([0, half], dtype=f"<u{bits // 8}"))
        halves = chain.node("BitShift", [column, shifts], f"split_{half}_shifted", direction="RIGHT")
        half_type = helper.np_dtype_to_tensor_dtype(np.dtype(f"<u{half // 8}"))
        codes = chain.node("Cast", [halves], f"split_{half}", to=half_type)  # keeps the low bits (Cast spec)
        bits = half
    return codes


def _convert(chain: _Chain, codes: str, fmt: str, own_type: int, output_type: int, output: str) -> None:
    """Unsigned weight codes -> weights of `output_type` in `output`."""
    if output_type == own_type:
        chain.node("BitCast", [codes], "weights", output=output, to=own_type)
    elif fmt == "bf16":
        wide = chain.node("Cast", [codes], "codes_uint32", to=TensorProto.UINT32)
        bits = chain.node("BitShift", [wide, chain.constant("by_16", np.uint32(16))], "float_bits", direction="LEFT")
        chain.node("BitCast", [bits], "weights", output=output, to=TensorProto.FLOAT)
    else:
        _widen_fp16(chain, codes, output)


def _widen_fp16(chain: _Chain, codes: str, output: str) -> None:
    """fp16 codes -> exact float values in `output`; a NaN keeps its sign and payload, signalling or quiet."""
    half = chain.node("BitCast", [codes], "fp16", to=TensorProto.FLOAT16)
    widened = chain.node("Cast", [half], "widened", to=TensorProto.FLOAT)
    widened_bits = chain.node("BitCast", [widened], "widened_bits", to=TensorProto.UINT32)
    wide = chain.node("Cast", [codes], "codes_uint32", to=TensorProto.UINT32)
    nan_fields = []
    for field_name, shift, mask in (("sign", 16, _FP32_SIGN), ("mantissa", 13, _FP32_MANTISSA_OF_FP16)):
        moved = chain.node("BitShift", [wide, chain.constant(f"by_{shift}", np.uint32(shift))],
                           f"nan_{field_name}_moved", direction="LEFT")
        nan_fields.append(chain.node("BitwiseAnd", [moved, chain.constant(f"{field_name}_mask", np.uint32(mask))],
                                     f"nan_{field_name}"))
    sign_mantissa = chain.node("BitwiseOr", nan_fields, "nan_sign_mantissa")
    nan_bits = chain.node("BitwiseOr", [sign_mantissa, chain.constant("exponent", np.uint32(_FP32_EXPONENT))],
                          "nan_bits")
    is_nan = chain.node("IsNaN", [half], "is_nan")
    bits = chain.node("Where", [is_nan, nan_bits, widened_bits], "float_bits")
    chain.node("BitCast", [bits], "weights", output=output, to=TensorProto.FLOAT)
