"""The load-time parity check as standard ONNX operators: what ParityCheckUnpack computes, with no custom op.

`standard_decode` returns the nodes (and their small constant initializers) that read a
packed initializer laid out as docs/FORMAT.md describes and produce the decoded weights,
every odd-parity word zeroed, plus optionally the number of masked words. Every input of
the chain is an initializer, so a runtime that constant-folds (onnxruntime does at session
creation) checks and decodes the weights once, when the model is loaded.

The chain, for `n_words` W-bit words stored as `[n_words, L]` lanes of S bits
(S = min(W, 64)) holding weights of b bits:

1. parity: the L lanes of each word are XOR-ed by halving (Split, BitwiseXor) and
   flattened (Reshape); then each fold XORs the upper half of the remaining bits into the
   lower half (BitShift, BitwiseXor) and keeps the lower half (Cast to the half-width
   unsigned type, which drops the high bits), down to one byte and then one bit
   (BitwiseAnd): uint8 `[n_words]`, 1 for odd;
2. weights and masking: the flat lanes are shifted right by `[[0], [b], [2b], ...]` (one
   BitShift broadcast to `[S / b, n_words * L]` planes) and cut to b bits (Cast); the
   planes are multiplied by `1 XOR parity` (Mul), which zeroes odd words, and transposed
   to stream order (Transpose). With several lanes per word, the `[n_words, L]` lanes are
   masked before they are cut. The zero padding of the last word is dropped (Reshape,
   Slice);
3. type: the unsigned codes are reinterpreted as the format's type (BitCast, opset 26);
   bf16 widens to float by moving its bits up (Cast to uint32, BitShift by 16, BitCast);
   fp16 widens with Cast, its NaNs rebuilt from their bits (Mul, BitwiseOr, IsNaN, Where),
   because Cast may set a signalling NaN's quiet bit; then the weights get their shape
   (Reshape);
4. count: the parities summed (Cast, ReduceSum) into an int64 scalar.

Every op is used only on types onnxruntime 1.32 implements on CPU: BitShift, BitwiseXor,
BitwiseAnd, Mul, Split, Slice, Reshape, Transpose, Unsqueeze and Cast on uint8/16/32/64,
BitCast, IsNaN on float16, Where, Mul and BitwiseOr on int32, ReduceSum on int32/int64.
Tensors are kept flat or with a long last axis: onnxruntime's broadcasting runs 10-30x
slower on an `[n, 1]` tensor. onnxruntime keeps every folded intermediate until folding
ends (about 14x the packed bytes for fp32 in 64-bit words), and folds no node whose output
exceeds `optimization.constant_folding_max_output_size_in_bytes` (1 GiB by default; the
largest output here is the BitShift's, S / b times the packed bytes). Node, value and
constant names all start with `<weight>::op_decode_`.
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

# A widened fp16 NaN: an all-ones binary32 exponent, and the 10 fp16 mantissa bits moved up 13 places
# to the top of the binary32 mantissa.
_FP32_EXPONENT = 0x7F80_0000
_FP16_TO_FP32_MANTISSA_SHIFT = 13
_BF16_TO_FP32_SHIFT = 16


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
    flat_shape = chain.constant("flat_shape", np.array([-1], np.int64))
    words = chain.node("Reshape", [packed, flat_shape], "lanes") if lanes == 1 else packed
    parity = _parity(chain, words, lanes, lane_dtype, flat_shape)
    even = chain.node("BitwiseXor", [parity, chain.constant("one", np.uint8(1))], "even")
    codes = _masked_codes(chain, words, even, lanes, lane_dtype, weight_format.bits, flat_shape)
    if n_words * (width // weight_format.bits) != n_weights:  # drop the last word's zero padding
        stream = chain.node("Reshape", [codes, flat_shape], "stream")
        ends = chain.constant("weight_count", np.array([n_weights], np.int64))
        codes = chain.node("Slice", [stream, chain.constant("zero", np.array([0], np.int64)), ends], "unpadded")
    weights = _convert(chain, codes, fmt, own_type, output_type)
    chain.node("Reshape", [weights, chain.constant("shape", np.array(dims, np.int64))], "weights", output=output,
               allowzero=1)
    if masked_words is not None:
        _count(chain, parity, n_words, masked_words)
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


def _unsigned(bits: int) -> np.dtype:
    return np.dtype(f"<u{bits // 8}")


def _onnx_type(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(dtype)


def _parity(chain: _Chain, words: str, lanes: int, lane_dtype: np.dtype, flat_shape: str) -> str:
    """uint8 [n_words]: each word's parity, 1 for odd, from the flat lanes (L = 1) or the [n_words, L] lanes.

    Every fold step reads half the bytes of the one before (onnxruntime keeps each folded
    intermediate until folding ends).
    """
    folded = words
    if lanes > 1:
        while lanes > 1:
            lanes //= 2
            low, high = f"{chain.prefix}_lanes_{lanes}_low", f"{chain.prefix}_lanes_{lanes}_high"
            chain.nodes.append(helper.make_node("Split", [folded], [low, high], name=f"{chain.prefix}_split_{lanes}",
                                                axis=1, num_outputs=2))
            folded = chain.node("BitwiseXor", [low, high], f"lanes_{lanes}")
        folded = chain.node("Reshape", [folded, flat_shape], "folded_lanes")
    bits = lane_dtype.itemsize * 8
    while bits > 1:
        half = bits // 2
        shift = _unsigned(max(bits, 8)).type(half)
        shifted = chain.node("BitShift", [folded, chain.constant(f"fold_{half}_by", shift)], f"fold_{half}_shifted",
                             direction="RIGHT")
        folded = chain.node("BitwiseXor", [folded, shifted], f"fold_{half}")
        if half >= 8:  # the parity is now in the low `half` bits: keep just those
            folded = chain.node("Cast", [folded], f"fold_{half}_narrow", to=_onnx_type(_unsigned(half)))
        bits = half
    return chain.node("BitwiseAnd", [folded, chain.constant("bit_0", np.uint8(1))], "parity")


def _masked_codes(
    chain: _Chain, words: str, even: str, lanes: int, lane_dtype: np.dtype, weight_bits: int, flat_shape: str
) -> str:
    """The unsigned b-bit codes of all lanes, odd words zeroed, in stream order ([m, S / b] or flat).

    With one lane per word the codes are masked as `[S / b, n_words]` planes, each multiplied
    by the `[n_words]` even flags; with several, the `[n_words, L]` lanes are masked first.
    """
    lane_bits = lane_dtype.itemsize * 8
    code_dtype = _unsigned(weight_bits)
    if lanes > 1:
        even = chain.node("Cast", [even], "even_lanes", to=_onnx_type(lane_dtype))
        per_word = chain.node("Unsqueeze", [even, chain.constant("word_axis", np.array([1], np.int64))], "even_words")
        masked = chain.node("Mul", [words, per_word], "masked_lanes")
        return _split(chain, chain.node("Reshape", [masked, flat_shape], "masked_flat"), lane_dtype, weight_bits)
    if code_dtype != np.uint8:
        even = chain.node("Cast", [even], "even_codes", to=_onnx_type(code_dtype))
    if lane_bits == weight_bits:
        return chain.node("Mul", [words, even], "masked")
    planes = _split(chain, words, lane_dtype, weight_bits, transpose=False)
    masked = chain.node("Mul", [planes, even], "masked_planes")
    return chain.node("Transpose", [masked], "masked", perm=[1, 0])


def _split(chain: _Chain, lanes: str, lane_dtype: np.dtype, weight_bits: int, transpose: bool = True) -> str:
    """Flat lanes cut into unsigned codes of `weight_bits`: [m, S / b] in stream order, or [S / b, m] planes.

    Row j of `lanes >> [[0], [b], [2b], ...]` holds code j of every lane in its low bits;
    Cast to b bits keeps just those, and the transpose puts each lane's codes side by side.
    """
    shifts = np.arange(0, lane_dtype.itemsize * 8, weight_bits, dtype=lane_dtype).reshape(-1, 1)
    shifted = chain.node("BitShift", [lanes, chain.constant("split_by", shifts)], "split_shifted", direction="RIGHT")
    planes = chain.node("Cast", [shifted], "split_planes", to=_onnx_type(_unsigned(weight_bits)))
    return chain.node("Transpose", [planes], "split", perm=[1, 0]) if transpose else planes


def _convert(chain: _Chain, codes: str, fmt: str, own_type: int, output_type: int) -> str:
    """Flat unsigned weight codes -> flat weights of `output_type`; returns their name."""
    if fmt == "uint8":  # the codes are the weights
        return codes
    if output_type == own_type:
        return chain.node("BitCast", [codes], "own_type", to=own_type)
    if fmt == "bf16":
        wide = chain.node("Cast", [codes], "codes_uint32", to=TensorProto.UINT32)
        bits = chain.node("BitShift", [wide, chain.constant("widen_by", np.uint32(_BF16_TO_FP32_SHIFT))],
                          "float_bits", direction="LEFT")
        return chain.node("BitCast", [bits], "float", to=TensorProto.FLOAT)
    return _widen_fp16(chain, codes)


def _widen_fp16(chain: _Chain, codes: str) -> str:
    """fp16 codes -> exact float values; a NaN keeps its sign and payload, signalling or quiet.

    Cast widens every other value exactly. A NaN's binary32 bits are built from its code:
    sign-extended to int32 and multiplied by 2**13, the code's exponent and mantissa move to
    bits 23-27 and 13-22 and its sign fills bits 28-31; OR-ing in the all-ones exponent
    (bits 23-30) leaves the sign in bit 31 alone.
    """
    half = chain.node("BitCast", [codes], "fp16", to=TensorProto.FLOAT16)
    widened = chain.node("Cast", [half], "widened", to=TensorProto.FLOAT)
    widened_bits = chain.node("BitCast", [widened], "widened_bits", to=TensorProto.INT32)
    signed = chain.node("BitCast", [codes], "codes_int16", to=TensorProto.INT16)
    extended = chain.node("Cast", [signed], "codes_int32", to=TensorProto.INT32)
    moved = chain.node("Mul", [extended, chain.constant("nan_scale", np.int32(1 << _FP16_TO_FP32_MANTISSA_SHIFT))],
                       "nan_moved")
    nan_bits = chain.node("BitwiseOr", [moved, chain.constant("exponent", np.int32(_FP32_EXPONENT))], "nan_bits")
    is_nan = chain.node("IsNaN", [half], "is_nan")
    bits = chain.node("Where", [is_nan, nan_bits, widened_bits], "float_bits")
    return chain.node("BitCast", [bits], "float", to=TensorProto.FLOAT)


def _count(chain: _Chain, parity: str, n_words: int, output: str) -> None:
    """The number of odd words as an int64 scalar in `output`, summed in int32 when that cannot overflow."""
    if n_words < 2**31:
        wide = chain.node("Cast", [parity], "parity_int32", to=TensorProto.INT32)
        total = chain.node("ReduceSum", [wide], "count_int32", keepdims=0)
        chain.node("Cast", [total], "count", output=output, to=TensorProto.INT64)
    else:
        wide = chain.node("Cast", [parity], "parity_int64", to=TensorProto.INT64)
        chain.node("ReduceSum", [wide], "count", output=output, keepdims=0)
