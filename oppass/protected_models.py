"""Tools for protected models: list their decode nodes (`inspect`), undo the pass (`strip`), flip stored bits
(`inject`), tell a model whose load checks were constant-folded away (`folded_checks`).

Every decode node is read through `schema.read_decode_nodes`: a tampered one is refused with
one line that names it, exactly where the C kernel would refuse it. Standard-op decode chains
are read through `schema.read_standard_decodes`, which validates them the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

from oppass import codec, edit, faults, modelio, tensorio
from oppass.errors import OppassError
from oppass.reports import ProtectedTensor
from oppass.schema import (
    CORRECTED_WORDS_OUTPUT,
    CORRECTED_WORDS_SUM,
    DOMAIN,
    MASKED_WORDS_OUTPUT,
    MASKED_WORDS_SUM,
    STANDARD_DECODES_KEY,
    DecodeNode,
    read_decode_nodes,
    read_standard_decodes,
)

STANDARD_OPS = "standard ops"
CUSTOM_OP = "ParityCheckUnpack"


def inspect(model: onnx.ModelProto | str | os.PathLike) -> list[ProtectedTensor]:
    """The protected tensors of a model, one per decode node or standard-op chain (of a file, only the
    attributes and dims are read)."""
    proto = model if isinstance(model, onnx.ModelProto) else modelio.read_model(model, defer=True).model
    initializers = _initializers(proto)
    return [_describe(decode, initializers[decode.packed]) for decode in _all_decodes(proto)]


def folded_checks(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """The weights whose standard-op load check was constant-folded away: the model's metadata lists them as
    protected, but their packed tensors and chains are gone (onnxsim, Polygraphy sanitize, a saved
    onnxruntime-optimised model): they are unchecked plain weights now."""
    proto = model if isinstance(model, onnx.ModelProto) else modelio.load_model(model)
    return read_standard_decodes(proto).folded


def strip(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A plain copy of a protected model: decoded (unchecked) weights back as initializers (SEC-DED: with their
    stolen bits cleared, as a fault-free decode gives them)."""
    result = _working_copy(model)
    initializers = _initializers(result)
    decoded = [_decoded_initializer(decode, initializers[decode.packed]) for decode in _stripped_decodes(result)]
    _strip_graph(result)
    result.graph.initializer.extend(decoded)
    return result


def strip_file(source: modelio.ModelFile, output: str | os.PathLike) -> None:
    """`strip` of a model read with `defer=True`, saved to `output`: each weight is decoded, chunk by chunk, as
    the save writes it (memory: a chunk of one weight, not the model)."""
    initializers = _initializers(source.model)
    packed = {decode.output: (decode, _detached(initializers[decode.packed]))
              for decode in _stripped_decodes(source.model)}
    _strip_graph(source.model)
    produced: dict[str, modelio.Producer] = {}
    for name, (decode, tensor) in packed.items():
        modelio.add_placeholder(source.model.graph, name, decode.output_type, decode.shape)
        produced[name] = _Unpacked(source, tensor, decode)
    modelio.save_model(source.model, output, source=_producing(source, produced))


def _stripped_decodes(model: onnx.ModelProto) -> list[DecodeNode]:
    decodes = [*read_decode_nodes(model), *read_standard_decodes(model).decodes]
    if not decodes:
        raise OppassError("model is not protected (it has no ParityCheckUnpack nodes or standard-op load checks)")
    return decodes


def _strip_graph(result: onnx.ModelProto) -> None:
    """Removes the decode nodes, standard-op chains, packed tensors, count sums, domain import and metadata."""
    standard = read_standard_decodes(result)
    decodes = [*read_decode_nodes(result), *standard.decodes]
    graph = result.graph
    counts = {name for decode in decodes for name in (decode.masked_output, decode.corrected_output) if name}
    remove_count_sums(graph, counts)
    edit.remove_nodes(graph, lambda node: node.domain == DOMAIN or node.name in standard.nodes)
    edit.remove_initializers(graph, {decode.packed for decode in decodes} | standard.constants)
    for index in reversed(range(len(result.opset_import))):
        if result.opset_import[index].domain == DOMAIN:
            del result.opset_import[index]
    for index in reversed(range(len(result.metadata_props))):
        if result.metadata_props[index].key == STANDARD_DECODES_KEY:
            del result.metadata_props[index]


def inject(model: onnx.ModelProto | str | os.PathLike, ber: float, seed: int) -> tuple[onnx.ModelProto, int]:
    """A copy of a protected model with random bit flips in its packed weights, and the number of flips."""
    _check_seed(seed)
    result = _working_copy(model)
    names, initializers = _packed_names(result), _initializers(result)
    buffers = [tensorio.to_array(initializers[name], "packed tensor").copy() for name in names]
    flips = _flips([buffer.nbytes for buffer in buffers], ber, seed)
    for index, (name, buffer) in enumerate(zip(names, buffers, strict=True)):
        flips.flip(index, buffer)
        initializers[name].CopyFrom(edit.named_array(buffer, name))
    return result, flips.count


def inject_file(source: modelio.ModelFile, output: str | os.PathLike, ber: float, seed: int) -> int:
    """`inject` of a model read with `defer=True`, saved to `output`; the number of flips. Each packed tensor is
    read, flipped and written as the save reaches it (memory: about one packed tensor, whatever the rate)."""
    _check_seed(seed)
    names, initializers = _packed_names(source.model), _initializers(source.model)
    tensors = [_detached(initializers[name]) for name in names]
    flips = _flips([_nbytes(tensor.data_type, tensor.dims, tensor.name) for tensor in tensors], ber, seed)
    edit.remove_initializers(source.model.graph, set(names))
    produced: dict[str, modelio.Producer] = {}
    for index, tensor in enumerate(tensors):
        modelio.add_placeholder(source.model.graph, tensor.name, tensor.data_type, tuple(tensor.dims))
        produced[tensor.name] = _Flipped(source, tensor, flips, index)
    modelio.save_model(source.model, output, source=_producing(source, produced))
    return flips.count


def _packed_names(model: onnx.ModelProto) -> list[str]:
    """The packed tensors of a protected model, each once, in the order of its decode nodes."""
    decodes = _all_decodes(model)
    if not decodes:
        raise OppassError("model is not protected: there are no packed weights to inject faults into")
    return list(dict.fromkeys(decode.packed for decode in decodes))


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise OppassError(f"the seed must be a non-negative integer, got {seed!r}")


def _flips(sizes: list[int], ber: float, seed: int) -> faults.SegmentFlips:
    """The flips of `inject` over packed tensors of `sizes` bytes."""
    return faults.SegmentFlips(np.random.default_rng(seed), sizes, ber)


def _nbytes(data_type: int, dims: Sequence[int], name: str) -> int:
    """Bytes of a tensor of this type and shape."""
    try:
        dtype = helper.tensor_dtype_to_np_dtype(data_type)
    except KeyError:
        raise OppassError(f"tensor {name!r} has unknown data type {data_type}") from None
    return math.prod(dims) * dtype.itemsize


def _detached(tensor: TensorProto) -> TensorProto:
    copy = TensorProto()
    copy.CopyFrom(tensor)
    return copy


def _producing(source: modelio.ModelFile, produced: dict[str, modelio.Producer]) -> modelio.ProducingModelFile:
    return modelio.ProducingModelFile(source.model, source.path, source.data_files, deferred=True, produced=produced)


def _stored_array(source: modelio.ModelFile, tensor: TensorProto) -> np.ndarray:
    """A packed tensor's values (read-only), from the files if they are still there."""
    stored = source.tensor_bytes(tensor) if external_data_helper.uses_external_data(tensor) else None
    return tensorio.to_array(tensor, "packed tensor", stored)


@dataclasses.dataclass(frozen=True)
class _Flipped:
    """Producer of a packed tensor with its flips."""

    source: modelio.ModelFile
    tensor: TensorProto
    flips: faults.SegmentFlips
    index: int

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensor."""
        return _nbytes(self.tensor.data_type, self.tensor.dims, self.tensor.name)

    def write(self, stream: BinaryIO) -> None:
        """Writes the flipped words."""
        words = _stored_array(self.source, self.tensor).copy()
        self.flips.flip(self.index, words)
        stream.write(words.reshape(-1).view(np.uint8).data)  # little-endian: `_stored_array` reads it so


@dataclasses.dataclass(frozen=True)
class _Unpacked:
    """Producer of the weights a decode node holds, unpacked without a check, written a chunk at a time."""

    source: modelio.ModelFile
    packed: TensorProto
    decode: DecodeNode

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded weights."""
        return _nbytes(self.decode.output_type, self.decode.shape, self.decode.output)

    def write(self, stream: BinaryIO) -> None:
        """Writes the weights, a chunk of words at a time."""
        words = _stored_array(self.source, self.packed)
        output_dtype = helper.tensor_dtype_to_np_dtype(self.decode.output_type).newbyteorder("<")
        d = self.decode
        for chunk in codec.unpack_chunks(words, d.format, d.word_bits, d.shape, d.code):
            stream.write(np.ascontiguousarray(chunk.astype(output_dtype, copy=False)).reshape(-1).view(np.uint8).data)


def _working_copy(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A model the tools may modify: freshly read from disk, or a copy of the caller's proto."""
    return edit.copy_model(model) if isinstance(model, onnx.ModelProto) else modelio.load_model(model)


def _all_decodes(model: onnx.ModelProto) -> list[DecodeNode]:
    """The model's decode nodes, then its standard-op chains, validated."""
    return [*read_decode_nodes(model), *read_standard_decodes(model).decodes]


def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def _describe(decode: DecodeNode, packed: TensorProto) -> ProtectedTensor:
    return ProtectedTensor(
        name=decode.output,
        format=decode.format,
        word_bits=decode.word_bits,
        shape=decode.shape,
        check=decode.mode,
        output_type=TensorProto.DataType.Name(decode.output_type),
        code=decode.code,
        range_max=decode.range_max,
        packed_dtype=str(helper.tensor_dtype_to_np_dtype(packed.data_type)),
        packed_shape=tuple(packed.dims),
        decoded_by=STANDARD_OPS if decode.standard_ops else CUSTOM_OP,
    )


def _decoded_initializer(decode: DecodeNode, packed: TensorProto) -> TensorProto:
    """The weights a decode node holds, unpacked without a check, in its output type."""
    words = tensorio.to_array(packed, "packed tensor")
    weights = codec.unpack(words, decode.format, decode.word_bits, decode.shape, decode.code)
    output_dtype = helper.tensor_dtype_to_np_dtype(decode.output_type)
    return edit.named_array(weights.astype(output_dtype, copy=False), decode.output)


def _named_with_prefix(prefix: str, node: onnx.NodeProto) -> bool:
    return edit.has_prefix(node.name, prefix)


def remove_count_sums(graph: onnx.GraphProto, counts: set[str]) -> None:
    """Undoes the pass's sums of the masked- and corrected-word counts (nodes, partial sums, graph outputs) and
    drops the value infos of the decode nodes' own counts `counts`."""
    for total, prefix in ((MASKED_WORDS_OUTPUT, MASKED_WORDS_SUM), (CORRECTED_WORDS_OUTPUT, CORRECTED_WORDS_SUM)):
        edit.remove_nodes(graph, functools.partial(_named_with_prefix, prefix))
        for index in reversed(range(len(graph.output))):
            if graph.output[index].name == total:
                del graph.output[index]
        edit.remove_value_info(graph, {info.name for info in graph.value_info if edit.has_prefix(info.name, prefix)})
    edit.remove_value_info(graph, counts)
