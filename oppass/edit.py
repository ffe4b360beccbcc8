"""In-place edits of ONNX graphs shared by the pass and the protected-model tools."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

_TENSOR_NAME = onnx.TensorProto.DESCRIPTOR.fields_by_name["name"].number


def has_prefix(name: str | bytes, prefix: str) -> bool:
    """Whether a name starts with `prefix` (a name protobuf gives as bytes, not being UTF-8, never does)."""
    return isinstance(name, str) and name.startswith(prefix)


def remove_nodes(graph: onnx.GraphProto, doomed: Callable[[onnx.NodeProto], bool]) -> None:
    """Removes the nodes for which `doomed` is true, keeping the order of the others."""
    for index in reversed(range(len(graph.node))):
        if doomed(graph.node[index]):
            del graph.node[index]


def remove_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Removes the initializers with these names."""
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in names:
            del graph.initializer[index]


def remove_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Removes the value_info entries with these names."""
    for index in reversed(range(len(graph.value_info))):
        if graph.value_info[index].name in names:
            del graph.value_info[index]


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of `model`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def named_array(array: np.ndarray, name: str | bytes) -> onnx.TensorProto:
    """`numpy_helper.from_array(array, name)`, also for a name that is not UTF-8 (protobuf gives those as bytes,
    and refuses to assign them): such a name is merged in as its wire encoding."""
    if isinstance(name, str):
        return numpy_helper.from_array(array, name)
    tensor = numpy_helper.from_array(array)
    tensor.MergeFromString(_length_delimited(_TENSOR_NAME, bytes(name)))
    return tensor


def _length_delimited(number: int, payload: bytes) -> bytes:
    """The protobuf wire encoding of field `number` holding `payload`."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        encoded.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(encoded)
