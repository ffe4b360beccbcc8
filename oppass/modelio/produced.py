"""Tensors whose bytes are produced while the model is saved: each encoded as the writer reaches it.

A placeholder is a main-graph initializer marked as external data at location PRODUCED, its
name the key of its producer. Like LazyCopy's marker the location starts with NUL, which no file
name has and the reader refuses, so no file can forge one, and `save_model` saved without the
producers refuses it. `ProducingModelFile` is the source `save_model` copies such tensors from:
it has each producer write its bytes straight into the output when the writer gets there, in
the file's order, so no two produced tensors are ever in memory at once.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import onnx
from onnx import external_data_helper

from oppass.errors import OppassError
from oppass.modelio.fields import point_to
from oppass.modelio.reader import ModelFile

PRODUCED = "\0produced when saved"


class Producer(Protocol):
    """The bytes of one placeholder: how many, and how to write them."""

    @property
    def nbytes(self) -> int:
        """How many bytes `write` writes."""
        ...

    def write(self, stream: BinaryIO) -> None:
        """Writes the tensor's raw bytes to `stream`."""
        ...


def add_placeholder(graph: onnx.GraphProto, name: str, data_type: int, dims: tuple[int, ...]) -> onnx.TensorProto:
    """Appends to `graph`'s initializers a tensor whose bytes the producer keyed `name` will write."""
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(dims)
    point_to(tensor, {"location": PRODUCED})
    return tensor


def is_placeholder(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` is a placeholder (`add_placeholder`)."""
    return external_data_helper.uses_external_data(tensor) and \
        any(entry.key == "location" and entry.value == PRODUCED for entry in tensor.external_data)


def fill_placeholder(tensor: onnx.TensorProto, producer: Producer) -> None:
    """Makes a placeholder an ordinary tensor holding the bytes `producer` writes."""
    tensor.raw_data = _produce(tensor, producer)
    del tensor.external_data[:]
    tensor.ClearField("data_location")


@dataclass(frozen=True)
class ProducingModelFile(ModelFile):
    """A model read with `defer=True` whose placeholders get their bytes from `produced` (by tensor name)."""

    produced: Mapping[str, Producer] = field(default_factory=dict)

    def stored_length(self, tensor: onnx.TensorProto) -> int:
        """As `ModelFile.stored_length`; a placeholder's length is its producer's."""
        producer = self._producer(tensor)
        return super().stored_length(tensor) if producer is None else producer.nbytes

    def copy_stored(self, tensor: onnx.TensorProto, target: BinaryIO) -> None:
        """As `ModelFile.copy_stored`; a placeholder's producer writes its bytes to `target` there and then."""
        producer = self._producer(tensor)
        if producer is None:
            super().copy_stored(tensor, target)
            return
        start = target.tell()
        producer.write(target)
        if target.tell() - start != producer.nbytes:
            raise OppassError(f"tensor {tensor.name!r} was written with {target.tell() - start} bytes, "
                              f"expected {producer.nbytes}")

    def _read(self, tensor: onnx.TensorProto) -> bytes:
        producer = self._producer(tensor)
        return super()._read(tensor) if producer is None else _produce(tensor, producer)

    def _producer(self, tensor: onnx.TensorProto) -> Producer | None:
        if not is_placeholder(tensor):
            return None
        if tensor.name not in self.produced:
            raise OppassError(f"tensor {tensor.name!r} is a placeholder with no producer")
        return self.produced[tensor.name]


def _produce(tensor: onnx.TensorProto, producer: Producer) -> bytes:
    buffer = io.BytesIO()
    producer.write(buffer)
    if buffer.tell() != producer.nbytes:
        raise OppassError(f"tensor {tensor.name!r} was produced with {buffer.tell()} bytes, expected {producer.nbytes}")
    return buffer.getvalue()
