"""Reading and writing ONNX model files: external data, the 2 GB protobuf limit, atomic saves.

External data is resolved relative to the model's folder and must stay inside it. A
model is written with external data when its input had external data or when it would
not fit in one protobuf (2 GB); the data file is `<model file name>.data` next to it.
Every file is written to a temporary name in the destination folder and moved into
place with `os.replace`, the data file before the model, so a failed save leaves the
destination untouched.

Neither direction holds the weights twice. Reading parses the model without the bytes
of its large main-graph initializers, then reads each of those from the file on its
own; `read_model(..., defer=True)` leaves them in the file until asked (`ModelFile`).
Writing serialises the model without its main-graph initializers and streams each
initializer's bytes into the file, instead of serialising the whole model into one
buffer; a model read with `defer=True` has its untouched weights copied straight from
the input file. `lazy_copy` does in memory what `defer=True` does on disk: a copy whose
initializers take their bytes from the original until loaded.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, EncodeError, Message
from onnx import external_data_helper
from onnx.serialization import registry

from oppass.errors import OppassError

PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inside the model file when writing external data.
EXTERNAL_THRESHOLD = 1024
EXTERNAL_ALIGNMENT = 4096
# Main-graph initializers with at least this many bytes of raw data are read from the file one at a time.
DEFER_THRESHOLD = 1024
COPY_CHUNK = 16 * 2**20
# External-data location of a tensor whose bytes were left in the model file itself when reading
# (no file name contains NUL, so no model can mean another file by it).
IN_MODEL_FILE = "\0model file"
# Location of a LazyCopy's initializer whose bytes are still in the original model.
IN_ORIGINAL = "\0original model"

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_EXTERNAL_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["external_data"].number
_DATA_LOCATION = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_location"].number
_SEGMENT = onnx.TensorProto.DESCRIPTOR.fields_by_name["segment"].number
_EXTERNAL_FIELDS = ("raw_data", "external_data", "data_location")


@dataclass(frozen=True)
class ModelFile:
    """A model read from disk, with the path it came from and the external data files it used.

    With `deferred`, tensors may still have their bytes in the files, as ONNX external data:
    in a data file next to the model, or in the model file itself (location IN_MODEL_FILE).
    Read them with `tensor_bytes`, load the remaining ones with `load_deferred`, or pass
    this object as `source` to `save_model`, which copies them from the files.
    """

    model: onnx.ModelProto
    path: Path
    data_files: tuple[Path, ...]
    deferred: bool = False

    def tensor_bytes(self, tensor: onnx.TensorProto) -> bytes | None:
        """The raw bytes of a tensor of this model, read from the files if still there; None if it has none."""
        if self.deferred and external_data_helper.uses_external_data(tensor):
            return _read_external(self.path, tensor)
        return tensor.raw_data if tensor.HasField("raw_data") else None

    def load_deferred(self) -> onnx.ModelProto:
        """Loads every tensor still in the files into the model (one at a time) and returns the model."""
        if self.deferred:
            for tensor in all_tensors(self.model):
                if external_data_helper.uses_external_data(tensor):
                    _load_into(tensor, self.path)
        return self.model


@dataclass(frozen=True)
class LazyCopy:
    """A copy of `original` whose main-graph initializers read their bytes from `original` until loaded.

    Like a ModelFile read with `defer=True`, but in memory: a pass that replaces most
    weights copies only those it keeps (`load_deferred`), never the ones it replaces.
    """

    model: onnx.ModelProto
    original: onnx.ModelProto

    def tensor_bytes(self, tensor: onnx.TensorProto) -> bytes | None:
        """The raw bytes of a tensor of the copy, from the original if still there; None if it has none."""
        index = _in_original(tensor)
        if index is not None:
            return self.original.graph.initializer[index].raw_data
        return tensor.raw_data if tensor.HasField("raw_data") else None

    def load_deferred(self) -> onnx.ModelProto:
        """Copies the bytes of every initializer still in the original into the copy and returns the copy."""
        for tensor in self.model.graph.initializer:
            index = _in_original(tensor)
            if index is not None:
                raw = self.original.graph.initializer[index].raw_data
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                tensor.raw_data = raw
        return self.model


def lazy_copy(model: onnx.ModelProto) -> LazyCopy:
    """A copy of `model` that shares the raw bytes of its main-graph initializers until `load_deferred`."""
    copy = _skeleton(model)
    for index, tensor in enumerate(model.graph.initializer):
        stand_in = copy.graph.initializer.add()
        if not tensor.HasField("raw_data") or tensor.HasField("data_location") or len(tensor.external_data):
            stand_in.CopyFrom(tensor)
            continue
        _copy_fields(tensor, stand_in, _EXTERNAL_FIELDS)
        for key, value in (("location", IN_ORIGINAL), ("offset", str(index))):
            entry = stand_in.external_data.add()
            entry.key, entry.value = key, value
        stand_in.data_location = onnx.TensorProto.EXTERNAL
    return LazyCopy(copy, model)


def _in_original(tensor: onnx.TensorProto) -> int | None:
    """The index of the original initializer a LazyCopy stand-in takes its bytes from, or None."""
    if not external_data_helper.uses_external_data(tensor):
        return None
    entries = {entry.key: entry.value for entry in tensor.external_data}
    return int(entries["offset"]) if entries.get("location") == IN_ORIGINAL else None


def read_model(path: str | os.PathLike, *, defer: bool = False) -> ModelFile:
    """Reads a model and its external data; unreadable or unsafe input raises OppassError.

    With `defer`, large tensors stay in the files until needed (see `ModelFile`).
    """
    model_path = Path(path)
    if model_path.is_dir():
        raise OppassError(f"{model_path} is a directory, not a model file")
    if not model_path.is_file():
        raise OppassError(f"no such model file: {model_path}")
    model = _read_without_large_initializers(model_path) if is_protobuf_file(model_path) else None
    if model is None:
        try:
            model = onnx.load_model(str(model_path), load_external_data=False)
        except (DecodeError, RuntimeWarning, ValueError) as error:
            raise OppassError(f"{model_path} is not a valid ONNX model ({_first_line(error)})") from None
    if not model.HasField("graph") or not model.ir_version:
        raise OppassError(f"{model_path} is not a valid ONNX model (no graph or IR version: truncated file?)")
    data_files = _check_external_data(model, model_path)
    source = ModelFile(model, model_path, data_files, deferred=True)
    return source if defer else ModelFile(source.load_deferred(), model_path, data_files)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model stored at `path`, external data loaded."""
    return read_model(path).model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: ModelFile | None = None) -> None:
    """Writes `model` atomically; external data if `source` used it or the model exceeds 2 GB.

    A model read with `defer=True` must be saved with its `source`, which supplies the
    bytes of the tensors still in the input files.
    """
    destination = Path(path)
    check_destination(destination, source)
    reader = source if source is not None and source.deferred else None
    if any(_marker(tensor) == IN_ORIGINAL or reader is None and _marker(tensor) for tensor in all_tensors(model)):
        raise OppassError("the model still has deferred tensors: save a model read with defer=True with its "
                          "ModelFile as source, and load a LazyCopy's tensors first")
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


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and Constant-node tensor of the model, subgraphs included."""
    for graph in all_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and, depth first, every subgraph held by its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from all_graphs(subgraph)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------- external data


def _check_external_data(model: onnx.ModelProto, model_path: Path) -> tuple[Path, ...]:
    """The data files of the external tensors, after checking each is inside the model's folder and long enough."""
    root = model_path.parent.resolve()
    files = []
    for tensor in all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = _external_info(tensor)
        if info.location == IN_MODEL_FILE:
            if (info.offset or 0) + (info.length or 0) > model_path.stat().st_size:
                raise OppassError(f"{model_path} is too short for tensor {tensor.name!r} (truncated?)")
            continue
        data_path = _checked_data_path(root, info, tensor.name)
        if data_path not in files:
            files.append(data_path)
    return tuple(files)


def _marker(tensor: onnx.TensorProto) -> str | None:
    """IN_MODEL_FILE or IN_ORIGINAL for a tensor whose bytes were deferred (ModelFile, LazyCopy); else None."""
    if not external_data_helper.uses_external_data(tensor):
        return None
    return next((entry.value for entry in tensor.external_data
                 if entry.key == "location" and entry.value in (IN_MODEL_FILE, IN_ORIGINAL)), None)


def _external_info(tensor: onnx.TensorProto) -> external_data_helper.ExternalDataInfo:
    try:
        return external_data_helper.ExternalDataInfo(tensor)
    except ValueError as error:
        raise OppassError(f"external data of tensor {tensor.name!r} is invalid ({_first_line(error)})") from None


def _checked_data_path(root: Path, info: external_data_helper.ExternalDataInfo, tensor_name: str) -> Path:
    location = info.location
    if not location or "\0" in location:
        raise OppassError(f"external data of tensor {tensor_name!r} has an invalid location: {location!r}")
    data_path = (root / location).resolve()
    if Path(location).is_absolute() or not data_path.is_relative_to(root):
        raise OppassError(f"external data of tensor {tensor_name!r} points outside the model folder: {location!r}")
    if not data_path.is_file():
        raise OppassError(f"external data file of tensor {tensor_name!r} is missing: {data_path}")
    end = (info.offset or 0) + (info.length or 0)
    if end > data_path.stat().st_size:
        raise OppassError(f"external data file {data_path} is too short for tensor {tensor_name!r} (truncated?)")
    return data_path


def _load_into(tensor: onnx.TensorProto, model_path: Path) -> None:
    """Moves the bytes of an external tensor (checked by `_check_external_data`) into the tensor."""
    raw = _read_external(model_path, tensor)
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = raw


def _external_span(model_path: Path, tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """File, offset and length of the bytes of an external tensor of the model at `model_path`."""
    info = _external_info(tensor)
    data_path = model_path if info.location == IN_MODEL_FILE else model_path.parent.resolve() / info.location
    offset = info.offset or 0
    length = info.length or max(data_path.stat().st_size - offset, 0)
    return data_path, offset, length


def _read_external(model_path: Path, tensor: onnx.TensorProto) -> bytes:
    data_path, offset, length = _external_span(model_path, tensor)
    with open(data_path, "rb") as stream:
        stream.seek(offset)
        data = stream.read(length)
    if len(data) != length:
        raise OppassError(f"external data file {data_path} is too short for tensor {tensor.name!r} "
                          "(changed while read?)")
    return data


def _copy_external(model_path: Path, tensor: onnx.TensorProto, stream: BinaryIO) -> None:
    """Copies an external tensor's bytes to `stream` in bounded chunks."""
    data_path, offset, length = _external_span(model_path, tensor)
    with open(data_path, "rb") as source:
        source.seek(offset)
        while length:
            chunk = source.read(min(length, COPY_CHUNK))
            if not chunk:
                raise OppassError(f"external data file {data_path} is too short for tensor {tensor.name!r} "
                                  "(changed while read?)")
            stream.write(chunk)
            length -= len(chunk)


# ----------------------------------------------------------------------------- reading


class _Malformed(Exception):
    """The file is not a protobuf this reader walks: it is parsed the usual way, which reports why."""


def is_protobuf_file(path: str | os.PathLike) -> bool:
    """Whether onnx.load_model reads the file as binary protobuf (its extension names no text format)."""
    return registry.get_format_from_file_extension(Path(path).suffix) in (None, "protobuf")


class _FileBytes:
    """Positional reads of a file through a small window, for walking protobuf fields."""

    WINDOW = 2**16

    def __init__(self, descriptor: int, size: int) -> None:
        self.descriptor, self.size = descriptor, size
        self.start, self.window = 0, b""

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > self.size:
            raise _Malformed
        if not self.start <= offset <= offset + length <= self.start + len(self.window):
            if length > self.WINDOW // 2:
                return _pread_exact(self.descriptor, offset, length)
            self.start, self.window = offset, os.pread(self.descriptor, self.WINDOW, offset)
        return self.window[offset - self.start:offset - self.start + length]

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(field number, wire type, field start, value start, field end) of each field in [start, end)."""
        position = start
        while position < end:
            head = self.read(position, min(20, end - position))
            tag, used = _varint(head, 0)
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise _Malformed
            value_start = position + used
            if wire == _VARINT:
                _, after = _varint(head, used)
                field_end = position + after
            elif wire == _FIXED64:
                field_end = value_start + 8
            elif wire == _FIXED32:
                field_end = value_start + 4
            elif wire == _LENGTH:
                length, after = _varint(head, used)
                value_start = position + after
                field_end = value_start + length
            else:  # groups are not used by ONNX
                raise _Malformed
            if field_end > end:
                raise _Malformed
            yield number, wire, position, value_start, field_end
            position = field_end


def _pread_exact(descriptor: int, offset: int, length: int) -> bytes:
    parts = []
    while length:
        chunk = os.pread(descriptor, min(length, 2**30), offset)
        if not chunk:
            raise _Malformed
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
    raise _Malformed


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH) + _encode_varint(len(payload)) + payload


def _read_without_large_initializers(path: Path) -> onnx.ModelProto | None:
    """The model at `path`, each large main-graph initializer marked as external data in the model file itself.

    None when the file is not a protobuf this walk understands (then onnx.load_model reads it).
    """
    with open(path, "rb") as stream:
        data = _FileBytes(stream.fileno(), os.fstat(stream.fileno()).st_size)
        try:
            skeleton = _model_skeleton(data, IN_MODEL_FILE)
        except _Malformed:
            return None
    try:
        return onnx.ModelProto.FromString(skeleton)
    except (DecodeError, RuntimeWarning, ValueError):
        return None


def _model_skeleton(data: _FileBytes, location: str) -> bytes:
    """The model's bytes with each large main-graph initializer's raw data replaced by an external reference."""
    parts, graphs = [], 0
    for number, wire, start, value_start, end in data.fields(0, data.size):
        if number == _GRAPH and wire == _LENGTH:
            graphs += 1
            parts.append(_length_field(_GRAPH, _graph_skeleton(data, value_start, end, location)))
        else:
            parts.append(data.read(start, end - start))
    if graphs != 1:  # repeated graph fields merge: leave that to protobuf
        raise _Malformed
    return b"".join(parts)


def _graph_skeleton(data: _FileBytes, start: int, end: int, location: str) -> bytes:
    parts = []
    for number, wire, field_start, value_start, field_end in data.fields(start, end):
        if number == _INITIALIZER and wire == _LENGTH:
            parts.append(_length_field(_INITIALIZER, _tensor_skeleton(data, value_start, field_end, location)))
        else:
            parts.append(data.read(field_start, field_end - field_start))
    return b"".join(parts)


def _tensor_skeleton(data: _FileBytes, start: int, end: int, location: str) -> bytes:
    """A tensor's bytes, its raw data replaced by an external reference when it is large and alone."""
    fields = list(data.fields(start, end))
    raw = [field for field in fields if field[0] == _RAW_DATA]
    numbers = {field[0] for field in fields}
    deferrable = len(raw) == 1 and raw[0][1] == _LENGTH and raw[0][4] - raw[0][3] >= max(DEFER_THRESHOLD, 1) \
        and not numbers & {_EXTERNAL_DATA, _DATA_LOCATION, _SEGMENT}
    if not deferrable:
        return data.read(start, end - start)
    kept = [data.read(field_start, field_end - field_start)
            for number, _, field_start, _, field_end in fields if number != _RAW_DATA]
    _, _, _, offset, raw_end = raw[0]
    entries = {"location": location, "offset": str(offset), "length": str(raw_end - offset)}
    kept.extend(_length_field(_EXTERNAL_DATA, _length_field(1, key.encode()) + _length_field(2, value.encode()))
                for key, value in entries.items())
    kept.append(_encode_varint(_DATA_LOCATION << 3 | _VARINT) + _encode_varint(onnx.TensorProto.EXTERNAL))
    return b"".join(kept)


# ----------------------------------------------------------------------------- writing


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


_INITIALIZER_TAG = _encode_varint(_INITIALIZER << 3 | _LENGTH)


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


def _is_deferred(tensor: onnx.TensorProto, reader: ModelFile | None) -> bool:
    return reader is not None and external_data_helper.uses_external_data(tensor)


def _write_raw(tensor: onnx.TensorProto, reader: ModelFile | None, stream: BinaryIO) -> None:
    if _is_deferred(tensor, reader):
        _copy_external(reader.path, tensor, stream)
    else:
        stream.write(tensor.raw_data)


def _raw_size(tensor: onnx.TensorProto, reader: ModelFile | None) -> int | None:
    """Bytes of a tensor's raw data, in the model or still in the input files; None if it has none."""
    if _is_deferred(tensor, reader):
        return _external_span(reader.path, tensor)[2]
    return len(tensor.raw_data) if tensor.HasField("raw_data") else None


def _skeleton_with_loaded_tensors(model: onnx.ModelProto, reader: ModelFile | None) -> onnx.ModelProto:
    """`_skeleton(model)`, its tensors still in the input files (outside the main initializers) loaded."""
    skeleton = _skeleton(model)
    for tensor in all_tensors(skeleton):
        if _is_deferred(tensor, reader):
            _load_into(tensor, reader.path)
    return skeleton


def _inline_layout(model: onnx.ModelProto, reader: ModelFile | None) -> _Layout | None:
    """How to write `model` as one protobuf, every tensor inline; None if it cannot be one (over 2 GB)."""
    skeleton = _skeleton_with_loaded_tensors(model, reader)
    return _layout(skeleton, [_inline_initializer(tensor, reader) for tensor in model.graph.initializer], reader)


def _layout(skeleton: onnx.ModelProto, items: list[_Initializer], reader: ModelFile | None) -> _Layout | None:
    """The file holding `skeleton` with `items` as its main graph's initializers, in protobuf's field order."""
    try:
        serialized = skeleton.SerializeToString()
    except EncodeError:  # what protobuf raises beyond 2 GB
        return None
    if not skeleton.HasField("graph"):
        return _Layout(serialized, [], b"", reader)
    graph_start, graph_value, graph_end = _only_field(serialized, _GRAPH)
    insert = next((start for number, _, start, _, _ in _fields(serialized, graph_value, graph_end)
                   if number > _INITIALIZER), graph_end)
    graph_size = graph_end - graph_value + sum(item.size for item in items)
    before = serialized[:graph_start] + _encode_varint(_GRAPH << 3 | _LENGTH) + _encode_varint(graph_size) \
        + serialized[graph_value:insert]
    return _Layout(before, items, serialized[insert:], reader)


def _whole(tensor: onnx.TensorProto) -> _Initializer:
    serialized = tensor.SerializeToString()
    return _Initializer(_INITIALIZER_TAG + _encode_varint(len(serialized)) + serialized)


def _inline_initializer(tensor: onnx.TensorProto, reader: ModelFile | None) -> _Initializer:
    """A main-graph initializer, its raw bytes streamed (from the model or the input file) when large."""
    raw_size = _raw_size(tensor, reader)
    deferred = _is_deferred(tensor, reader)
    if raw_size is None or raw_size < EXTERNAL_THRESHOLD and not deferred:
        return _whole(tensor)
    serialized = _copy_without(tensor, _EXTERNAL_FIELDS if deferred else ("raw_data",)).SerializeToString()
    split = next((start for number, _, start, _, _ in _fields(serialized, 0, len(serialized)) if number > _RAW_DATA),
                 len(serialized))
    raw_head = _encode_varint(_RAW_DATA << 3 | _LENGTH) + _encode_varint(raw_size)
    size = len(serialized) + len(raw_head) + raw_size
    head = _INITIALIZER_TAG + _encode_varint(size) + serialized[:split] + raw_head
    return _Initializer(head, tensor, serialized[split:], raw_size)


def _save_with_external_data(model: onnx.ModelProto, destination: Path, reader: ModelFile | None) -> None:
    """Writes the bytes of the large tensors to `<destination>.data`, then the model; `model` is left as it was."""
    data_path = _data_file(destination)
    skeleton = _skeleton_with_loaded_tensors(model, reader)
    items: list[_Initializer | onnx.TensorProto] = []  # a TensorProto: the stand-in of a moved initializer
    moved = []  # (tensor whose bytes go to the data file, tensor that gets the reference to them)
    for tensor in model.graph.initializer:
        raw_size = _raw_size(tensor, reader)
        if raw_size is None or raw_size < EXTERNAL_THRESHOLD:
            items.append(_inline_initializer(tensor, reader))
            continue
        stand_in = _copy_without(tensor, _EXTERNAL_FIELDS if _is_deferred(tensor, reader) else ("raw_data",))
        moved.append((tensor, stand_in))
        items.append(stand_in)
    moved.extend((tensor, tensor) for tensor in all_tensors(skeleton)
                 if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD)
    if moved:
        _write_atomically(data_path, lambda stream: _externalize(moved, data_path.name, stream, reader))
    layout = _layout(skeleton, [item if isinstance(item, _Initializer) else _whole(item) for item in items], reader)
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
        length = stream.tell() - offset
        stand_in.ClearField("raw_data")
        del stand_in.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = stand_in.external_data.add()
            entry.key, entry.value = key, value
        stand_in.data_location = onnx.TensorProto.EXTERNAL


# ----------------------------------------------------------------------------- copies without the weights


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the main graph's initializers (which hold nearly all its bytes)."""
    skeleton = _copy_without(model, ("graph",))
    if model.HasField("graph"):
        skeleton.graph.SetInParent()
        _copy_fields(model.graph, skeleton.graph, ("initializer",))
    return skeleton


def _copy_without(message: Message, skipped: tuple[str, ...]) -> Message:
    copy = type(message)()
    _copy_fields(message, copy, skipped)
    return copy


def _copy_fields(source: Message, target: Message, skipped: tuple[str, ...]) -> None:
    """Copies every field of `source` but the `skipped` ones into `target`, unknown fields included."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skipped:
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)
    unknown = _unknown_fields(source)
    if unknown:
        target.MergeFromString(unknown)


def _unknown_fields(message: Message) -> bytes:
    """The wire bytes of the fields of `message` that this onnx version does not know."""
    parts = []
    for field in unknown_fields.UnknownFieldSet(message):
        tag = _encode_varint(field.field_number << 3 | field.wire_type)
        if field.wire_type == _VARINT:
            parts.append(tag + _encode_varint(field.data))
        elif field.wire_type == _FIXED64:
            parts.append(tag + struct.pack("<Q", field.data))
        elif field.wire_type == _FIXED32:
            parts.append(tag + struct.pack("<I", field.data))
        elif field.wire_type == _LENGTH:
            parts.append(tag + _encode_varint(len(field.data)) + field.data)
        else:
            raise OppassError(f"cannot save a {type(message).__name__} with unknown group fields")
    return b"".join(parts)


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The fields of serialised bytes in memory, as `_FileBytes.fields` gives them."""
    reader = _FileBytes(-1, len(data))
    reader.window = data
    try:
        yield from reader.fields(start, end)
    except _Malformed:
        raise OppassError("protobuf produced bytes this writer cannot read") from None


def _only_field(data: bytes, wanted: int) -> tuple[int, int, int]:
    found = [(field_start, value_start, field_end)
             for number, wire, field_start, value_start, field_end in _fields(data, 0, len(data))
             if number == wanted and wire == _LENGTH]
    if len(found) != 1:
        raise OppassError("protobuf produced bytes this writer cannot read")
    return found[0]
