"""Writing model files: streamed, atomic, with external data when needed, model and data as one unit.

A model is written with external data when its input had external data or when it would
not fit in one protobuf (2 GB). Its data file is one of two slots next to it,
`<model file name>.data` and `<model file name>.1.data`: the one the model being replaced
does not name. Each file is written to a temporary name in the destination folder; then,
holding a lock on the folder (`files.folder_lock`), the data file is renamed into its slot
and the model into place, and the slot the old model named is removed. The model's rename
is the one step that switches from the old pair to the new one, so a failure or a kill at
any point leaves either the old pair or the new one, and two writers of one output take
turns: a model only ever names data written for it.

The model is serialised without its main-graph initializers, and each initializer's raw
bytes are streamed into the file in protobuf's field order, instead of serialising the
whole model into one buffer; a model read with `defer=True` has its untouched weights
copied straight from the input files. No tensor is ever written as a reference to an
input file: the bytes of every tensor still in the input go into the output.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import EncodeError
from onnx import external_data_helper

from oppass import files
from oppass.errors import OppassError
from oppass.modelio import wire
from oppass.modelio.fields import EXTERNAL_FIELDS, all_tensors, copy_without, in_original, point_to, skeleton
from oppass.modelio.reader import ModelFile, external_locations

PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inside the model file when writing external data.
EXTERNAL_THRESHOLD = 1024
EXTERNAL_ALIGNMENT = 4096


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: ModelFile | None = None,
               external_data: bool = False) -> None:
    """Writes `model` atomically; external data if asked, if `source` used it or if the model exceeds 2 GB.

    A model read with `defer=True` must be saved with its `source`, which supplies the
    bytes of the tensors still in the input files.
    """
    destination = Path(path)
    check_destination(destination, source)
    reader = source if source is not None and source.deferred else None
    _refuse_tensors_without_bytes(model, reader)
    if not external_data and (source is None or not source.data_files):
        layout = _inline_layout(model, reader)
        if layout is not None and layout.size <= PROTOBUF_LIMIT:
            _publish(destination, layout, None)
            return
    _save_with_external_data(model, destination, reader)


def check_destination(path: str | os.PathLike, source: ModelFile | None = None) -> None:
    """Refuses an output path in a missing folder, one that is (or whose data slots are) not a regular file,
    one whose name has a suffix of a text format, and one that would overwrite the input or its data."""
    destination = Path(path)
    if not destination.parent.is_dir():
        raise OppassError(f"output folder does not exist or is not a folder: {destination.parent}")
    if not is_protobuf_name(destination):
        raise OppassError(f"output {destination} has the suffix of a text format ({destination.suffix}): oppass "
                          "writes binary ONNX only, choose a name ending in .onnx")
    targets = (destination, *data_slots(destination))
    for target in targets:
        files.check_output(target)
    if source is None:
        return
    inputs = [existing.resolve() for existing in (source.path, *source.data_files)]
    for target in targets:
        if target.resolve() in inputs:
            raise OppassError(f"output {target} would overwrite the input {source.path}: choose another path")


def data_slots(destination: Path) -> tuple[Path, Path]:
    """The two names a model's data file may have: `<name>.data` and `<name>.1.data`."""
    return destination.with_name(destination.name + ".data"), destination.with_name(destination.name + ".1.data")


def is_protobuf_name(path: Path) -> bool:
    """Whether onnx reads a file of this name as binary protobuf (its suffix names no text format)."""
    from onnx.serialization import registry

    return registry.get_format_from_file_extension(path.suffix) in (None, "protobuf")


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


def _publish(destination: Path, layout: _Layout | Callable[[str | None], _Layout | None],
             data_temporary: Path | None) -> None:
    """Publishes the model (and the data file written to `data_temporary`) as one unit, under the folder lock.

    `layout` is the model's, or (with a data file) the function giving it for the data
    file's name. The slot the replaced model named, if any, is removed once the new model
    is in place; the new data file goes to the other one.
    """
    model_temporary: Path | None = None
    try:
        if isinstance(layout, _Layout):  # written before taking the lock: it may be large
            model_temporary = files.write_temporary(destination, layout.write)
        with files.folder_lock(destination.parent) as folder:
            old = {slot for slot in data_slots(destination) if slot.name in _named_locations(destination)}
            renames = []
            if not isinstance(layout, _Layout):  # the model holds only the small tensors
                slot = next(slot for slot in data_slots(destination) if slot not in old)
                built = layout(slot.name if data_temporary is not None else None)
                if built is None:
                    raise OppassError("the model is over 2 GB even without its large tensors: cannot save it")
                if data_temporary is not None:
                    renames.append((data_temporary, slot))
                model_temporary = files.write_temporary(destination, built.write)
            assert model_temporary is not None
            renames.append((model_temporary, destination))
            files.publish(folder, renames, obsolete=tuple(old))
    finally:
        for temporary in (data_temporary, model_temporary):
            if temporary is not None:
                temporary.unlink(missing_ok=True)


def _named_locations(destination: Path) -> set[str]:
    """The external-data locations of the model now at `destination` (none if there is none, or unreadable)."""
    if not destination.is_file():
        return set()
    return external_locations(destination)


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
    """Writes the bytes of the large tensors to a data file, then the model, published as one unit (`_publish`).

    `model` is left as it was.
    """
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
    moved.extend((tensor, tensor) for tensor in all_tensors(copy, everywhere=False)  # the rest stay inline
                 if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD)
    spans: list[tuple[onnx.TensorProto, int, int]] = []
    data_temporary = files.write_temporary(data_slots(destination)[0],
                                           lambda stream: spans.extend(_externalize(moved, stream, reader))) \
        if moved else None

    def layout(location: str | None) -> _Layout | None:
        for stand_in, offset, length in spans:
            point_to(stand_in, {"location": str(location), "offset": str(offset), "length": str(length)})
        return _layout(copy, [item if isinstance(item, _Initializer) else _whole(item) for item in items], reader)

    _publish(destination, layout, data_temporary)


def _externalize(moved: list[tuple[onnx.TensorProto, onnx.TensorProto]], stream: BinaryIO,
                 reader: ModelFile | None) -> list[tuple[onnx.TensorProto, int, int]]:
    """Writes each tensor's bytes to an aligned slot of `stream`; gives (stand-in, offset, length) of each."""
    spans = []
    for tensor, stand_in in moved:
        stream.write(b"\0" * (-stream.tell() % EXTERNAL_ALIGNMENT))
        offset = stream.tell()
        _write_raw(tensor, reader, stream)
        spans.append((stand_in, offset, stream.tell() - offset))
    return spans


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
