"""Reading model files: the model without the bytes of its large weights, and those bytes one at a time.

`read_model` walks the file's protobuf fields (`wire`) and parses the model without the
raw data of its large main-graph initializers: each becomes ordinary ONNX external data
pointing into the model's own file (location = the file's name, offset, length), so the
skeleton, stored beside the model, is a model onnx's checker and loader and onnxruntime
read (tests/test_modelio.py). With `defer=True` those bytes stay in the file until asked
(`ModelFile`); otherwise they are read into the model one tensor at a time.

External data is opened relative to the model's folder with onnx's own checks (see
`_open_data_file`); the references `read_model` made itself are the one exception (see
`ModelFile`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import onnx
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from onnx.serialization import registry

from oppass import files
from oppass.errors import OppassError
from oppass.modelio import wire
from oppass.modelio.fields import all_tensors

# What onnx.load_model raises on a file that is not a model: binary, JSON, protobuf text and ONNX text formats.
# onnx's text parser lets C++ exceptions out: std::out_of_range as IndexError, others as RuntimeError.
_PARSE_ERRORS = (DecodeError, RuntimeWarning, ValueError, json_format.Error, text_format.Error, onnx.parser.ParseError,
                 IndexError, OverflowError, RuntimeError)
# Main-graph initializers with at least this many bytes of raw data are read from the file one at a time.
DEFER_THRESHOLD = 1024
COPY_CHUNK = 256 * 1024  # one write() of 16 MiB took over 10x longer per byte than 256 KiB ones (ext4)


@dataclass(frozen=True)
class ModelFile:
    """A model read from disk, with the path it came from and the external data files it used.

    With `deferred`, tensors may still have their bytes in the files, as ONNX external data:
    in a data file next to the model, or in the model file itself. Read them with
    `tensor_bytes`, load the remaining ones with `load_deferred`, or pass this object as
    `source` to `save_model`, which copies them from the files.

    A location equal to the model file's own name is read from `path`, the file `read_model`
    read, without onnx's path checks: `read_model` made most such references itself, from
    offsets it walked in that file, and checked the others (a model naming its own file in
    its external data) like any data file. So a model reached through a symlink or with
    several hard links, which onnx's checks refuse as external data, is still read; only
    for such a model (or a file name with `..`) onnx's tools refuse the deferred skeleton.
    """

    model: onnx.ModelProto
    path: Path
    data_files: tuple[Path, ...]
    deferred: bool = False

    def tensor_bytes(self, tensor: onnx.TensorProto) -> bytes | None:
        """The raw bytes of a tensor of this model, read from the files if still there; None if it has none."""
        if self.deferred and external_data_helper.uses_external_data(tensor):
            return self._read(tensor)
        return tensor.raw_data if tensor.HasField("raw_data") else None

    def load_deferred(self) -> onnx.ModelProto:
        """Loads every tensor still in the files into the model (one at a time) and returns the model."""
        if self.deferred:
            for tensor in all_tensors(self.model):
                if external_data_helper.uses_external_data(tensor):
                    self.load_stored(tensor)
        return self.model

    def load_stored(self, tensor: onnx.TensorProto) -> None:
        """Moves the bytes of an external tensor of this model from the files into the tensor."""
        raw = self._read(tensor)
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        tensor.raw_data = raw

    def stored_length(self, tensor: onnx.TensorProto) -> int:
        """How many bytes of an external tensor of this model are in the files (reading them checks they are)."""
        length = _external_info(tensor).length
        if length is not None:
            return length
        stored = self._open(tensor)
        stored.stream.close()
        return stored.length

    def copy_stored(self, tensor: onnx.TensorProto, target: BinaryIO) -> None:
        """Copies the bytes of an external tensor of this model from the files to `target`, in bounded chunks."""
        stored = self._open(tensor)
        with stored.stream as stream:
            stream.seek(stored.offset)
            left = stored.length
            while left:
                chunk = stream.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise _changed(stored.path, tensor)
                target.write(chunk)
                left -= len(chunk)

    def stored_chunks(self, tensor: onnx.TensorProto, chunk_bytes: int) -> Iterator[memoryview]:
        """The bytes of an external tensor of this model, in chunks of at most `chunk_bytes`.

        Every chunk is read into the same writable buffer: each is valid until the next is read.
        """
        stored = self._open(tensor)
        with stored.stream as stream:
            stream.seek(stored.offset)
            buffer = memoryview(bytearray(max(min(chunk_bytes, stored.length), 1)))
            left = stored.length
            while left:
                chunk = buffer[:min(left, len(buffer))]
                filled = 0
                while filled < len(chunk):
                    got = stream.readinto(chunk[filled:])  # type: ignore[attr-defined]  # an open() file
                    if not got:
                        raise _changed(stored.path, tensor)
                    filled += got
                yield chunk
                left -= len(chunk)

    def _read(self, tensor: onnx.TensorProto) -> bytes:
        stored = self._open(tensor)
        with stored.stream as stream:
            stream.seek(stored.offset)
            data = stream.read(stored.length)
        if len(data) != stored.length:
            raise _changed(stored.path, tensor)
        return data

    def _open(self, tensor: onnx.TensorProto) -> _Stored:
        info = _external_info(tensor)
        if info.location == self.path.name:
            path = self.path
            try:
                stream: BinaryIO = open(path, "rb")
            except OSError:
                raise _changed(path, tensor) from None
        else:
            root = self.path.parent.resolve()
            path = root / info.location
            stream = _open_data_file(root, info.location, tensor.name)
        try:
            offset, length = _span(os.fstat(stream.fileno()).st_size, path, info, tensor.name, "changed while read?")
        except BaseException:
            stream.close()
            raise
        return _Stored(stream, path, offset, length)


class _Stored(NamedTuple):
    """Where the bytes of an external tensor are: an open file, its path, the offset and length in it."""

    stream: BinaryIO
    path: Path
    offset: int
    length: int


def _changed(path: Path, tensor: onnx.TensorProto) -> OppassError:
    return OppassError(f"external data file {path} no longer holds tensor {tensor.name!r} (changed while read?)")


def read_model(path: str | os.PathLike, *, defer: bool = False) -> ModelFile:
    """Reads a model and its external data; unreadable or unsafe input raises OppassError.

    With `defer`, large tensors stay in the files until needed (see `ModelFile`).
    """
    model_path = Path(path)
    files.check_input(model_path, "model file")
    walked = _read_deferring_large_initializers(model_path) if is_protobuf_file(model_path) else None
    if walked is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "the onnxtxt format is experimental"
                model = onnx.load_model(str(model_path), load_external_data=False)
        except _PARSE_ERRORS as error:
            raise OppassError(f"{model_path} is not a valid ONNX model ({_short(_first_line(error))})") from None
        except OSError as error:
            raise OppassError(f"cannot read {model_path}: {(error.strerror or str(error)).lower()}") from None
        deferred: frozenset[int] = frozenset()
    else:
        model, deferred = walked
    if not model.HasField("graph") or not model.ir_version:
        raise OppassError(f"{model_path} is not a valid ONNX model (no graph or IR version: truncated file?)")
    data_files = _check_external_data(model, model_path, deferred)
    source = ModelFile(model, model_path, data_files, deferred=True)
    return source if defer else ModelFile(source.load_deferred(), model_path, data_files)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model stored at `path`, external data loaded."""
    return read_model(path).model


def external_locations(path: Path) -> set[str]:
    """The external-data locations the model file at `path` names itself; none if it is not a readable model.

    Reads only the model's skeleton. Used on a model about to be replaced, to learn which
    data file it uses: a file no tool can read as a model uses none.
    """
    try:
        walked = _read_deferring_large_initializers(path) if is_protobuf_file(path) else None
        if walked is None:
            model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever reading raises, the file is no model that names data
        return set()
    if walked is None:
        deferred: frozenset[int] = frozenset()
    else:
        model, deferred = walked
    return {entry.value for index, tensor in enumerate(all_tensors(model)) if index not in deferred
            for entry in tensor.external_data if entry.key == "location"}


def is_protobuf_file(path: str | os.PathLike) -> bool:
    """Whether onnx.load_model reads the file as binary protobuf (its extension names no text format)."""
    return registry.get_format_from_file_extension(Path(path).suffix) in (None, "protobuf")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _short(text: str, limit: int = 300) -> str:
    """`text` without a final full stop, cut to `limit` characters (a location may be as long as a file)."""
    text = text.rstrip(".")
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- external data


def _check_external_data(model: onnx.ModelProto, model_path: Path, deferred: frozenset[int]) -> tuple[Path, ...]:
    """The data files of the model's external tensors, after checking each file and each tensor's span in it.

    `deferred`: the main-graph initializers (by index) that `read_model` itself made
    external data in the model file; every other external tensor is the file's own claim
    and is checked with `_open_data_file` (once per location) and `_span`, whatever its location.
    """
    root = model_path.parent.resolve()
    files: dict[str, tuple[Path, int]] = {}  # location: the file, resolved, and its size
    for index, tensor in enumerate(all_tensors(model)):  # the main graph's initializers come first
        if index in deferred or not external_data_helper.uses_external_data(tensor):
            continue
        info = _external_info(tensor)
        if info.location not in files:
            with _open_data_file(root, info.location, tensor.name) as stream:
                # onnx's checks allowed no symlink on the way: resolving only makes the path canonical
                files[info.location] = (root / info.location).resolve(), os.fstat(stream.fileno()).st_size
        data_path, size = files[info.location]
        _span(size, data_path, info, tensor.name, "truncated?")
    return tuple(dict.fromkeys(path for path, _ in files.values()))


def _external_info(tensor: onnx.TensorProto) -> external_data_helper.ExternalDataInfo:
    if any(not isinstance(entry.key, str) or not isinstance(entry.value, str) for entry in tensor.external_data):
        raise OppassError(f"external data of tensor {tensor.name!r} has a key or value that is not UTF-8 text")
    try:
        return external_data_helper.ExternalDataInfo(tensor)
    except ValueError as error:
        raise OppassError(f"external data of tensor {tensor.name!r} is invalid ({_first_line(error)})") from None


def _open_data_file(root: Path, location: str, tensor_name: str) -> BinaryIO:
    """The external data file `location` of the model folder `root`, opened with onnx's checks.

    onnx (the same function its loader uses) refuses an empty or absolute location, one
    whose normal form has `..` anywhere (even `w..data`), a symlink as the file (and, with
    openat2, anywhere below `root`), a file outside `root` once resolved, one that is not a
    regular file (missing, a folder, a FIFO) and one with several hard links, then opens it
    without following symlinks and checks the open file is the one it checked. That is all
    the hand-written checks did and more, but for NUL: onnx's C++ side stops the path at the
    first NUL (`w.data` NUL `x` opens `w.data`) where Python refuses such a path, so a location
    with NUL names different files to different tools, and oppass refuses it. The bounds of a
    tensor in the file are `_span`'s.
    """
    if "\0" in location:
        raise OppassError(f"external data of tensor {tensor_name!r} has an invalid location: {_short(repr(location))}")
    # protobuf gives a name that is not UTF-8 as bytes; onnx's C++ side wants text for its messages
    name = tensor_name if isinstance(tensor_name, str) else bytes(tensor_name).decode("utf-8", "backslashreplace")
    try:
        descriptor = external_data_helper._open_external_data_fd(str(root), location, name, True)
    except (onnx.checker.ValidationError, OSError, RuntimeError, ValueError) as error:
        raise OppassError(f"external data of tensor {tensor_name!r} is refused ({_short(_first_line(error))}): "
                          "it must be a regular file inside the model's folder") from None
    return os.fdopen(descriptor, "rb")


def _span(size: int, path: Path, info: external_data_helper.ExternalDataInfo, tensor_name: str,
          hint: str) -> tuple[int, int]:
    """Offset and length of a tensor's bytes in the file `path` of `size` bytes, after checking it holds them.

    The rule onnx's loader applies while it reads a tensor, here also before reading and
    before streaming a copy; `hint` ends the message.
    """
    offset = info.offset or 0
    length = max(size - offset, 0) if info.length is None else info.length
    if offset + length > size:
        raise OppassError(f"external data file {path} is too short for tensor {tensor_name!r} ({hint})")
    return offset, length


# ----------------------------------------------------------------------------- the model without its weights


def _read_deferring_large_initializers(path: Path) -> tuple[onnx.ModelProto, frozenset[int]] | None:
    """The model at `path`, each large main-graph initializer made external data in the model file itself.

    Also gives the indices of those initializers. None when the file is not a protobuf
    this walk understands, or its name cannot be an ONNX location (not UTF-8): then
    onnx.load_model reads it whole.
    """
    try:
        location = path.name.encode()
    except UnicodeEncodeError:
        return None
    with open(path, "rb") as stream:
        data = wire.FileBytes(stream.fileno(), os.fstat(stream.fileno()).st_size)
        deferred: list[int] = []
        try:
            skeleton = _model_skeleton(data, location, deferred)
        except wire.Malformed:
            return None
    try:
        return onnx.ModelProto.FromString(skeleton), frozenset(deferred)
    except (DecodeError, RuntimeWarning, ValueError):
        return None


def _model_skeleton(data: wire.FileBytes, location: bytes, deferred: list[int]) -> bytes:
    """The model's bytes with each large main-graph initializer's raw data replaced by an external reference."""
    parts, graphs = [], 0
    for number, wire_type, start, value_start, end in data.fields(0, data.size):
        if number == wire.GRAPH and wire_type == wire.LENGTH:
            graphs += 1
            parts.append(wire.length_field(wire.GRAPH, _graph_skeleton(data, value_start, end, location, deferred)))
        else:
            parts.append(data.read(start, end - start))
    if graphs != 1:  # repeated graph fields merge: leave that to protobuf
        raise wire.Malformed
    return b"".join(parts)


def _graph_skeleton(data: wire.FileBytes, start: int, end: int, location: bytes, deferred: list[int]) -> bytes:
    parts, index = [], 0
    for number, wire_type, field_start, value_start, field_end in data.fields(start, end):
        if number == wire.INITIALIZER and wire_type == wire.LENGTH:
            tensor = _tensor_skeleton(data, value_start, field_end, location)
            if tensor is None:
                tensor = data.read(value_start, field_end - value_start)
            else:
                deferred.append(index)
            parts.append(wire.length_field(wire.INITIALIZER, tensor))
            index += 1
        else:
            parts.append(data.read(field_start, field_end - field_start))
    return b"".join(parts)


def _tensor_skeleton(data: wire.FileBytes, start: int, end: int, location: bytes) -> bytes | None:
    """A tensor's bytes, its raw data replaced by an external reference; None unless it is large and alone."""
    fields = list(data.fields(start, end))
    raw = [field for field in fields if field[0] == wire.RAW_DATA]
    numbers = {field[0] for field in fields}
    deferrable = len(raw) == 1 and raw[0][1] == wire.LENGTH and raw[0][4] - raw[0][3] >= max(DEFER_THRESHOLD, 1) \
        and not numbers & {wire.EXTERNAL_DATA, wire.DATA_LOCATION, wire.SEGMENT}
    if not deferrable:
        return None
    kept = [data.read(field_start, field_end - field_start)
            for number, _, field_start, _, field_end in fields if number != wire.RAW_DATA]
    _, _, _, offset, raw_end = raw[0]
    entries = {b"location": location, b"offset": str(offset).encode(), b"length": str(raw_end - offset).encode()}
    kept.extend(wire.length_field(wire.EXTERNAL_DATA, wire.length_field(1, key) + wire.length_field(2, value))
                for key, value in entries.items())
    kept.append(wire.tag(wire.DATA_LOCATION, wire.VARINT) + wire.encode_varint(onnx.TensorProto.EXTERNAL))
    return b"".join(kept)
