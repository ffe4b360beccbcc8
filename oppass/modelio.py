"""Reading and writing ONNX model files: external data, the 2 GB protobuf limit, atomic saves.

External data is resolved relative to the model's folder and must stay inside it. A
model is written with external data when its input had external data or when it would
not fit in one protobuf (2 GB); the data file is `<model file name>.data` next to it.
Every file is written to a temporary name in the destination folder and moved into
place with `os.replace`, the data file before the model, so a failed save leaves the
destination untouched.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper, helper

from oppass.errors import OppassError

PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inside the model file when writing external data.
EXTERNAL_THRESHOLD = 1024
EXTERNAL_ALIGNMENT = 4096


@dataclass(frozen=True)
class ModelFile:
    """A model read from disk, with the path it came from and the external data files it used."""

    model: onnx.ModelProto
    path: Path
    data_files: tuple[Path, ...]


def read_model(path: str | os.PathLike) -> ModelFile:
    """Reads a model and its external data; unreadable or unsafe input raises OppassError."""
    model_path = Path(path)
    if model_path.is_dir():
        raise OppassError(f"{model_path} is a directory, not a model file")
    if not model_path.is_file():
        raise OppassError(f"no such model file: {model_path}")
    try:
        model = onnx.load_model(str(model_path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as error:
        raise OppassError(f"{model_path} is not a valid ONNX model ({_first_line(error)})") from None
    if not model.HasField("graph") or not model.ir_version:
        raise OppassError(f"{model_path} is not a valid ONNX model (no graph or IR version: truncated file?)")
    data_files = _load_external_data(model, model_path.parent)
    return ModelFile(model, model_path, data_files)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model stored at `path`, external data loaded."""
    return read_model(path).model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: ModelFile | None = None) -> None:
    """Writes `model` atomically; external data if `source` used it or the model exceeds 2 GB."""
    destination = Path(path)
    check_destination(destination, source)
    payload = None if source is not None and source.data_files else _serialized_if_small(model)
    if payload is None:
        _save_with_external_data(model, destination)
    else:
        _write_atomically(destination, lambda stream: stream.write(payload))


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


def _load_external_data(model: onnx.ModelProto, folder: Path) -> tuple[Path, ...]:
    """Loads every external tensor after checking its file is inside `folder` and long enough."""
    root = folder.resolve()
    files = []
    for tensor in all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        data_path = _checked_data_path(root, info, tensor.name)
        external_data_helper.load_external_data_for_tensor(tensor, str(root))
        if data_path not in files:
            files.append(data_path)
    return tuple(files)


def _checked_data_path(root: Path, info: external_data_helper.ExternalDataInfo, tensor_name: str) -> Path:
    location = info.location
    data_path = (root / location).resolve()
    if not location or Path(location).is_absolute() or not data_path.is_relative_to(root):
        raise OppassError(f"external data of tensor {tensor_name!r} points outside the model folder: {location!r}")
    if not data_path.is_file():
        raise OppassError(f"external data file of tensor {tensor_name!r} is missing: {data_path}")
    end = (info.offset or 0) + (info.length or 0)
    if end > data_path.stat().st_size:
        raise OppassError(f"external data file {data_path} is too short for tensor {tensor_name!r} (truncated?)")
    return data_path


def _serialized_if_small(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when it does not fit in one protobuf."""
    try:
        payload = model.SerializeToString()
    except EncodeError:  # what protobuf raises beyond 2 GB
        return None
    return payload if len(payload) <= PROTOBUF_LIMIT else None


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


def _save_with_external_data(model: onnx.ModelProto, destination: Path) -> None:
    """Writes the bytes of the large tensors to `<destination>.data`, then the model; restores `model`."""
    data_path = _data_file(destination)
    moved = [t for t in all_tensors(model) if t.HasField("raw_data") and _raw_size(t) >= EXTERNAL_THRESHOLD]
    if not moved:  # only small tensors: no data file
        _write_atomically(destination, lambda stream: stream.write(model.SerializeToString()))
        return
    stashed: list[bytes] = []
    try:
        _write_atomically(data_path, lambda stream: _externalize(moved, data_path.name, stream, stashed))
        _write_atomically(destination, lambda stream: stream.write(model.SerializeToString()))
    finally:
        for tensor, raw in zip(moved, stashed):
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


def _raw_size(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's raw data, from its type and shape (reading raw_data would copy it)."""
    return helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * math.prod(tensor.dims)


def _externalize(tensors: list[onnx.TensorProto], location: str, stream: BinaryIO, stashed: list[bytes]) -> None:
    """Writes each tensor's bytes to an aligned slot of `stream` and points the tensor there.

    The bytes removed from each tensor are appended to `stashed`, so the caller can restore them.
    """
    for tensor in tensors:
        raw = tensor.raw_data
        stream.write(b"\0" * (-stream.tell() % EXTERNAL_ALIGNMENT))
        offset = stream.tell()
        stream.write(raw)
        stashed.append(raw)
        external_data_helper.set_external_data(tensor, location, offset, len(raw))
        tensor.ClearField("raw_data")
