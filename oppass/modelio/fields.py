"""Copies of ONNX messages field by field, unknown fields included; the model's tensors; LazyCopy.

A model's bytes are nearly all in its main graph's initializers, so the reader and the
writer work on a skeleton, the model without them (`skeleton`), and handle those one at a
time. `lazy_copy` uses the same copies for a model in memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import onnx
from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import external_data_helper

from oppass.errors import OppassError
from oppass.modelio import wire

# The fields that say where a tensor's raw bytes are.
EXTERNAL_FIELDS = ("raw_data", "external_data", "data_location")
# Location of a LazyCopy's initializer whose bytes are still in the original model.
IN_ORIGINAL = "\0original model"

M = TypeVar("M", bound=Message)


def all_tensors(model: onnx.ModelProto, *, everywhere: bool = True) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model, each once: the one walk that checks, loads and copies tensor bytes.

    The main graph's initializers come first, in their order; then, graph by graph (the main
    graph, its subgraphs depth first), the values and indices of sparse initializers and the
    tensors of node attributes (a Constant's value or sparse value, TENSOR(S) and
    SPARSE_TENSOR(S) attributes, whatever type the attribute claims); then the same for the
    model's functions and its training graphs. With `everywhere` False, only the dense
    tensors of the main graph and its subgraphs: those onnx and onnxruntime read as external data.
    """
    graphs = list(all_graphs(model.graph))
    yield from graphs[0].initializer
    for graph in graphs:
        if graph is not graphs[0]:
            yield from graph.initializer
        if everywhere:
            yield from _sparse_parts(graph.sparse_initializer)
        yield from _attribute_tensors(graph.node, everywhere)
    if not everywhere:
        return
    for function in model.functions:
        yield from _attribute_tensors(function.node, everywhere)
        for node in function.node:
            for subgraph in _subgraphs(node):
                for graph in all_graphs(subgraph):
                    yield from graph.initializer
                    yield from _sparse_parts(graph.sparse_initializer)
                    yield from _attribute_tensors(graph.node, everywhere)
    for info in model.training_info:
        for root in (info.initialization, info.algorithm):
            for graph in all_graphs(root):
                yield from graph.initializer
                yield from _sparse_parts(graph.sparse_initializer)
                yield from _attribute_tensors(graph.node, everywhere)


def _attribute_tensors(nodes: Iterable[onnx.NodeProto], sparse: bool) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if sparse:
                if attribute.HasField("sparse_tensor"):
                    yield from _sparse_parts([attribute.sparse_tensor])
                yield from _sparse_parts(attribute.sparse_tensors)


def _sparse_parts(tensors: Iterable[onnx.SparseTensorProto]) -> Iterator[onnx.TensorProto]:
    for tensor in tensors:
        yield tensor.values
        yield tensor.indices


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and, depth first, every subgraph held by its nodes' attributes (whatever type they claim)."""
    yield graph
    for node in graph.node:
        for subgraph in _subgraphs(node):
            yield from all_graphs(subgraph)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the main graph's initializers (which hold nearly all its bytes)."""
    copy = copy_without(model, ("graph",))
    if model.HasField("graph"):
        copy.graph.SetInParent()
        copy_fields(model.graph, copy.graph, ("initializer",))
    return copy


def copy_without(message: M, skipped: tuple[str, ...]) -> M:
    """A copy of `message` without the `skipped` fields."""
    copy = type(message)()
    copy_fields(message, copy, skipped)
    return copy


def copy_fields(source: Message, target: Message, skipped: tuple[str, ...]) -> None:
    """Copies every field of `source` but the `skipped` ones into `target`, unknown fields included."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skipped:
            continue
        if descriptor.type == FieldDescriptor.TYPE_STRING and _any_bytes(value, descriptor.is_repeated):
            # protobuf gives a string that is not UTF-8 as bytes and refuses to set it: copy its wire form
            values = value if descriptor.is_repeated else [value]
            target.MergeFromString(b"".join(wire.length_field(descriptor.number, item if isinstance(item, bytes)
                                                              else item.encode()) for item in values))
        elif descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)
    unknown = _unknown_fields(source)
    if unknown:
        target.MergeFromString(unknown)


def _any_bytes(value: object, repeated: bool) -> bool:
    return any(isinstance(item, bytes) for item in value) if repeated else isinstance(value, bytes)  # type: ignore[attr-defined]


def _unknown_fields(message: Message) -> bytes:
    """The wire bytes of the fields of `message` that this onnx version does not know."""
    parts = []
    for field in unknown_fields.UnknownFieldSet(message):
        tag = wire.tag(field.field_number, field.wire_type)
        if field.wire_type == wire.VARINT:
            parts.append(tag + wire.encode_varint(field.data))
        elif field.wire_type == wire.FIXED64:
            parts.append(tag + struct.pack("<Q", field.data))
        elif field.wire_type == wire.FIXED32:
            parts.append(tag + struct.pack("<I", field.data))
        elif field.wire_type == wire.LENGTH:
            parts.append(tag + wire.encode_varint(len(field.data)) + field.data)
        else:
            raise OppassError(f"cannot save a {type(message).__name__} with unknown group fields")
    return b"".join(parts)


def point_to(tensor: onnx.TensorProto, entries: dict[str, str]) -> None:
    """Makes `tensor` external data described by `entries` (location, offset, length), its raw data removed."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


# ----------------------------------------------------------------------------- copies in memory


@dataclass(frozen=True)
class LazyCopy:
    """A copy of `original` whose main-graph initializers read their bytes from `original` until loaded.

    Like a ModelFile read with `defer=True`, but in memory: a pass that replaces most
    weights copies only those it keeps (`load_deferred`), never the ones it replaces.
    A stand-in is marked as external data at location IN_ORIGINAL, offset = the index of
    its original initializer. ONNX has no standard way to say "these bytes are in another
    message in memory", so the marker is ours; it starts with NUL, which no file name and
    no location oppass reads (the reader refuses NUL) contains, so no file can forge it,
    and `save_model` refuses a model that still has one.
    """

    model: onnx.ModelProto
    original: onnx.ModelProto

    def tensor_bytes(self, tensor: onnx.TensorProto) -> bytes | None:
        """The raw bytes of a tensor of the copy, from the original if still there; None if it has none."""
        index = in_original(tensor)
        if index is not None:
            return self.original.graph.initializer[index].raw_data
        return tensor.raw_data if tensor.HasField("raw_data") else None

    def load_deferred(self) -> onnx.ModelProto:
        """Copies the bytes of every initializer still in the original into the copy and returns the copy."""
        for tensor in self.model.graph.initializer:
            index = in_original(tensor)
            if index is not None:
                raw = self.original.graph.initializer[index].raw_data
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                tensor.raw_data = raw
        return self.model


def lazy_copy(model: onnx.ModelProto) -> LazyCopy:
    """A copy of `model` that shares the raw bytes of its main-graph initializers until `load_deferred`."""
    copy = skeleton(model)
    for index, tensor in enumerate(model.graph.initializer):
        stand_in = copy.graph.initializer.add()
        if not tensor.HasField("raw_data") or tensor.HasField("data_location") or len(tensor.external_data):
            stand_in.CopyFrom(tensor)
            continue
        copy_fields(tensor, stand_in, EXTERNAL_FIELDS)
        point_to(stand_in, {"location": IN_ORIGINAL, "offset": str(index)})
    return LazyCopy(copy, model)


def in_original(tensor: onnx.TensorProto) -> int | None:
    """The index of the original initializer a LazyCopy stand-in takes its bytes from, or None."""
    if not external_data_helper.uses_external_data(tensor):
        return None
    entries = {entry.key: entry.value for entry in tensor.external_data}
    return int(entries["offset"]) if entries.get("location") == IN_ORIGINAL else None
