"""Writing model files: streamed, atomic, with external data when needed.

A model is written with external data when its input had external data or when it would
not fit in one protobuf (2 GB); the data file is `<model file name>.data` next to it.
Every file is written to a temporary name in the destination folder and moved into place
with `os.replace`, the data file before the model, so a failed save leaves the
destination untouched.

The model is serialised without its main-graph initializers, and each initializer's raw
bytes are streamed into the file in protobuf's field order, instead of serialising the
whole model into one buffer; a model read with `defer=True` has its untouched weights
copied straight from the input files. No tensor is ever written as a reference to an
input file: the bytes of every tensor still in the input go into the output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import EncodeError
from onnx import external_data_helper

from oppass.errors import OppassError
from oppass.modelio import wire
from oppass.modelio.fields import EXTERNAL_FIELDS, all_tensors, copy_without, in_original, point_to, skeleton
from oppass.modelio.reader import ModelFile

PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inside the model file when writing external data.
EXTERNAL_THRESHOLD = 1024
EXTERNAL_ALIGNMENT = 4096


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: ModelFile | None = None) -> None:
    """Writes `model` atomically; external data if `source` used it or the model exceeds 2 GB.

    A model read with `defer=True` must be saved with its `source`, which supplies the
    bytes of the tensors still in the input files.
    """
    destination = Path(path)
    check_destination(destination, source)
    reader = source if source is not None and source.deferred else None
    _refuse_tensors_without_bytes(model, reader)
    if source is None or not source.data_files:
        layout = _inline_layout(model, reader)
        if layout is not None and layout.size <= PROTOBUF_LIMIT:
            _write_atomically(destination, layout.write)
            return
    _save_with_external_data(model, destination, reader)


def check_destination(path: str | os.PathLike, source: ModelFile | None = None) -> None:
    """Refuses an output path in a missing folder or one that would overwrite the input or its data."""
    destination = Path(path)
    if not destination.parent.is_dir():
        raise OppassError(f"output folder does not exist or is not a folder: {destination.parent}")
    if destination.is_dir():
        raise OppassError(f"output {destination} is a directory")
    if source is None:
        return
    inputs = [existing.resolve() for existing in (source.path, *source.data_files)]
    for target in (destination, _data_file(destination)):
        if target.resolve() in inputs:
            raise OppassError(f"output {target} would overwrite the input {source.path}: choose another path")


def _refuse_tensors_without_bytes(model: onnx.ModelProto, reader: ModelFile | None) -> None:
    """Refuses a model with a tensor whose bytes only `reader` (or a LazyCopy's original) has.

    Without a reader, an external tensor's location would be written as it is, naming a file
    next to the output: perhaps the output itself, if it has the input's name.
    """
    for tensor in all_tensors(model):
        if in_original(tensor) is not None or reader is None and external_data_helper.uses_external_data(tensor):
            raise OppassError(f"the model still has deferred tensors ({tensor.name!r} is external data): save a "
                              "model read with defer=True with its ModelFile as source, and load a LazyCopy's "
                              "tensors first")


def _data_file(destination: Path) -> Path:
    return destination.with_name(destination.name + ".data")


def _write_atomically(destination: Path, write: Callable[[BinaryIO], object]) -> None:
    """Lets `write` fill a temporary file next to `destination`, then renames it into place."""
    descriptor, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())  # the rename must never publish a file whose bytes are not on disk
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode of a new file
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_INITIALIZER_TAG = wire.tag(wire.INITIALIZER, wire.LENGTH)


@dataclass
class _Initializer:
    """One main-graph initializer as written: `head`, the raw bytes of `tensor` (if set), `tail`."""

    head: bytes
    tensor: onnx.TensorProto | None = None
    tail: bytes = b""
    raw_size: int = 0

    @property
    def size(self) -> int:
        return len(self.head) + self.raw_size + len(self.tail)


@dataclass
class _Layout:
    """A model file: the serialised model without its main-graph initializers, with those spliced in."""

    before: bytes
    initializers: list[_Initializer]
    after: bytes
    reader: ModelFile | None

    @property
    def size(self) -> int:
        return len(self.before) + sum(item.size for item in self.initializers) + len(self.after)

    def write(self, stream: BinaryIO) -> None:
        stream.write(self.before)
        for item in self.initializers:
            stream.write(item.head)
            if item.tensor is not None:
                _write_raw(item.tensor, self.reader, stream)
            stream.write(item.tail)
        stream.write(self.after)
        if stream.tell() != self.size:
            raise OppassError("the model changed while it was being written")


def _stored_by(tensor: onnx.TensorProto, reader: ModelFile | None) -> ModelFile | None:
    """`reader`, if it holds the bytes of `tensor` (an external tensor of a deferred model); else None."""
    return reader if reader is not None and external_data_helper.uses_external_data(tensor) else None


def _write_raw(tensor: onnx.TensorProto, reader: ModelFile | None, stream: BinaryIO) -> None:
    stored = _stored_by(tensor, reader)
    if stored is not None:
        stored.copy_stored(tensor, stream)
    else:
        stream.write(tensor.raw_data)


def _raw_size(tensor: onnx.TensorProto, reader: ModelFile | None) -> int | None:
    """Bytes of a tensor's raw data, in the model or still in the input files; None if it has none."""
    stored = _stored_by(tensor, reader)
    if stored is not None:
        return stored.stored_length(tensor)
    return len(tensor.raw_data) if tensor.HasField("raw_data") else None


def _skeleton_with_loaded_tensors(model: onnx.ModelProto, reader: ModelFile | None) -> onnx.ModelProto:
    """`skeleton(model)`, its tensors still in the input files (outside the main initializers) loaded."""
    copy = skeleton(model)
    for tensor in all_tensors(copy):
        stored = _stored_by(tensor, reader)
        if stored is not None:
            stored.load_stored(tensor)
    return copy


def _inline_layout(model: onnx.ModelProto, reader: ModelFile | None) -> _Layout | None:
    """How to write `model` as one protobuf, every tensor inline; None if it cannot be one (over 2 GB)."""
    copy = _skeleton_with_loaded_tensors(model, reader)
    return _layout(copy, [_inline_initializer(tensor, reader) for tensor in model.graph.initializer], reader)


def _layout(model: onnx.ModelProto, items: list[_Initializer], reader: ModelFile | None) -> _Layout | None:
    """The file holding `model` (a skeleton) with `items` as its main graph's initializers, in protobuf's order."""
    try:
        serialized = model.SerializeToString()
    except EncodeError:  # what protobuf raises beyond 2 GB
        return None
    if not model.HasField("graph"):
        return _Layout(serialized, [], b"", reader)
    graph_start, graph_value, graph_end = _only_field(serialized, wire.GRAPH)
    insert = next((start for number, _, start, _, _ in _fields(serialized, graph_value, graph_end)
                   if number > wire.INITIALIZER), graph_end)
    graph_size = graph_end - graph_value + sum(item.size for item in items)
    before = serialized[:graph_start] + wire.tag(wire.GRAPH, wire.LENGTH) + wire.encode_varint(graph_size) \
        + serialized[graph_value:insert]
    return _Layout(before, items, serialized[insert:], reader)


def _whole(tensor: onnx.TensorProto) -> _Initializer:
    serialized = tensor.SerializeToString()
    return _Initializer(_INITIALIZER_TAG + wire.encode_varint(len(serialized)) + serialized)


def _inline_initializer(tensor: onnx.TensorProto, reader: ModelFile | None) -> _Initializer:
    """A main-graph initializer, its raw bytes streamed (from the model or the input file) when large."""
    raw_size = _raw_size(tensor, reader)
    stored = _stored_by(tensor, reader) is not None
    if raw_size is None or raw_size < EXTERNAL_THRESHOLD and not stored:
        return _whole(tensor)
    serialized = copy_without(tensor, EXTERNAL_FIELDS if stored else ("raw_data",)).SerializeToString()
    split = next((start for number, _, start, _, _ in _fields(serialized, 0, len(serialized))
                  if number > wire.RAW_DATA), len(serialized))
    raw_head = wire.tag(wire.RAW_DATA, wire.LENGTH) + wire.encode_varint(raw_size)
    size = len(serialized) + len(raw_head) + raw_size
    head = _INITIALIZER_TAG + wire.encode_varint(size) + serialized[:split] + raw_head
    return _Initializer(head, tensor, serialized[split:], raw_size)


def _save_with_external_data(model: onnx.ModelProto, destination: Path, reader: ModelFile | None) -> None:
    """Writes the bytes of the large tensors to `<destination>.data`, then the model; `model` is left as it was."""
    data_path = _data_file(destination)
    copy = _skeleton_with_loaded_tensors(model, reader)
    items: list[_Initializer | onnx.TensorProto] = []  # a TensorProto: the stand-in of a moved initializer
    moved = []  # (tensor whose bytes go to the data file, tensor that gets the reference to them)
    for tensor in model.graph.initializer:
        raw_size = _raw_size(tensor, reader)
        if raw_size is None or raw_size < EXTERNAL_THRESHOLD:
            items.append(_inline_initializer(tensor, reader))
            continue
        stand_in = copy_without(tensor, EXTERNAL_FIELDS if _stored_by(tensor, reader) else ("raw_data",))
        moved.append((tensor, stand_in))
        items.append(stand_in)
    moved.extend((tensor, tensor) for tensor in all_tensors(copy)
                 if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD)
    if moved:
        _write_atomically(data_path, lambda stream: _externalize(moved, data_path.name, stream, reader))
    layout = _layout(copy, [item if isinstance(item, _Initializer) else _whole(item) for item in items], reader)
    if layout is None:
        raise OppassError("the model is over 2 GB even without its large tensors: cannot save it")
    _write_atomically(destination, layout.write)


def _externalize(moved: list[tuple[onnx.TensorProto, onnx.TensorProto]], location: str, stream: BinaryIO,
                 reader: ModelFile | None) -> None:
    """Writes each tensor's bytes to an aligned slot of `stream` and points its stand-in there."""
    for tensor, stand_in in moved:
        stream.write(b"\0" * (-stream.tell() % EXTERNAL_ALIGNMENT))
        offset = stream.tell()
        _write_raw(tensor, reader, stream)
        point_to(stand_in, {"location": location, "offset": str(offset), "length": str(stream.tell() - offset)})


def _fields(data: bytes, start: int, end: int) -> Iterator[wire.Field]:
    """The fields of bytes protobuf serialised."""
    try:
        yield from wire.FileBytes.in_memory(data).fields(start, end)
    except wire.Malformed:
        raise OppassError("protobuf produced bytes this writer cannot read") from None


def _only_field(data: bytes, wanted: int) -> tuple[int, int, int]:
    found = [(field_start, value_start, field_end)
             for number, wire_type, field_start, value_start, field_end in _fields(data, 0, len(data))
             if number == wanted and wire_type == wire.LENGTH]
    if len(found) != 1:
        raise OppassError("protobuf produced bytes this writer cannot read")
    return found[0]
