"""Tools for protected models: list their decode nodes (`inspect`), undo the pass (`strip`), flip stored bits
(`inject`).

Every decode node is read through `schema.read_decode_nodes`: a tampered one is refused with
one line that names it, exactly where the C kernel would refuse it.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from oppass import codec, edit, faults, modelio, tensorio
from oppass.errors import OppassError
from oppass.reports import ProtectedTensor
from oppass.schema import (
    CORRECTED_WORDS_OUTPUT,
    CORRECTED_WORDS_SUM,
    DOMAIN,
    MASKED_WORDS_OUTPUT,
    MASKED_WORDS_SUM,
    DecodeNode,
    read_decode_nodes,
)


def inspect(model: onnx.ModelProto | str | os.PathLike) -> list[ProtectedTensor]:
    """The protected tensors of a model, one per decode node."""
    proto = model if isinstance(model, onnx.ModelProto) else modelio.load_model(model)
    initializers = _initializers(proto)
    return [_describe(decode, initializers[decode.packed]) for decode in read_decode_nodes(proto)]


def strip(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A plain copy of a protected model: decoded (unchecked) weights back as initializers (SEC-DED: with their
    stolen bits cleared, as a fault-free decode gives them)."""
    result = _working_copy(model)
    decodes = read_decode_nodes(result)
    if not decodes:
        raise OppassError("model is not protected (it has no ParityCheckUnpack nodes)")
    graph = result.graph
    initializers = _initializers(result)
    decoded = [_decoded_initializer(decode, initializers[decode.packed]) for decode in decodes]
    counts = {name for decode in decodes for name in (decode.masked_output, decode.corrected_output) if name}
    _remove_count_sum(graph, MASKED_WORDS_OUTPUT, MASKED_WORDS_SUM)
    _remove_count_sum(graph, CORRECTED_WORDS_OUTPUT, CORRECTED_WORDS_SUM)
    edit.remove_nodes(graph, lambda node: node.domain == DOMAIN)
    edit.remove_initializers(graph, {decode.packed for decode in decodes})
    graph.initializer.extend(decoded)
    edit.remove_value_info(graph, counts)
    for index in reversed(range(len(result.opset_import))):
        if result.opset_import[index].domain == DOMAIN:
            del result.opset_import[index]
    return result


def inject(model: onnx.ModelProto | str | os.PathLike, ber: float, seed: int) -> tuple[onnx.ModelProto, int]:
    """A copy of a protected model with random bit flips in its packed weights, and the number of flips."""
    result = _working_copy(model)
    decodes = read_decode_nodes(result)
    if not decodes:
        raise OppassError("model is not protected: there are no packed weights to inject faults into")
    initializers = _initializers(result)
    names = list(dict.fromkeys(decode.packed for decode in decodes))
    buffers = [tensorio.to_array(initializers[name], "packed tensor").copy() for name in names]
    n_bits = sum(buffer.nbytes for buffer in buffers) * 8
    positions = faults.draw_flip_positions(np.random.default_rng(seed), n_bits, ber)
    faults.flip_bits(buffers, positions)
    for name, buffer in zip(names, buffers, strict=True):
        initializers[name].CopyFrom(edit.named_array(buffer, name))
    return result, int(positions.size)


def _working_copy(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A model the tools may modify: freshly read from disk, or a copy of the caller's proto."""
    return edit.copy_model(model) if isinstance(model, onnx.ModelProto) else modelio.load_model(model)


def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def _describe(decode: DecodeNode, packed: TensorProto) -> ProtectedTensor:
    return ProtectedTensor(
        name=decode.output,
        format=decode.format,
        word_bits=decode.word_bits,
        shape=decode.shape,
        check=decode.check,
        output_type=TensorProto.DataType.Name(decode.output_type),
        code=decode.code,
        range_max=decode.range_max,
        packed_dtype=str(helper.tensor_dtype_to_np_dtype(packed.data_type)),
        packed_shape=tuple(packed.dims),
    )


def _decoded_initializer(decode: DecodeNode, packed: TensorProto) -> TensorProto:
    """The weights a decode node holds, unpacked without a check, in its output type."""
    words = tensorio.to_array(packed, "packed tensor")
    weights = codec.unpack(words, decode.format, decode.word_bits, decode.shape, decode.code)
    output_dtype = helper.tensor_dtype_to_np_dtype(decode.output_type)
    return edit.named_array(weights.astype(output_dtype, copy=False), decode.output)


def _remove_count_sum(graph: onnx.GraphProto, total: str, prefix: str) -> None:
    """Undoes the pass's sum of a count (masked or corrected words): its nodes, partial sums and graph output."""
    edit.remove_nodes(graph, lambda node: edit.has_prefix(node.name, prefix))
    for index in reversed(range(len(graph.output))):
        if graph.output[index].name == total:
            del graph.output[index]
    edit.remove_value_info(graph, {info.name for info in graph.value_info if edit.has_prefix(info.name, prefix)})
