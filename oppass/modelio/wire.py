"""The protobuf wire format: walking the fields of serialised bytes, on disk or in memory, and writing them.

Just what the reader and the writer need to handle a model file's fields without parsing
the message they belong to: the field numbers of the ONNX messages they walk, tags,
varints and length-delimited fields (https://protobuf.dev/programming-guides/encoding/).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import onnx

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
EXTERNAL_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["external_data"].number
DATA_LOCATION = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_location"].number
SEGMENT = onnx.TensorProto.DESCRIPTOR.fields_by_name["segment"].number

# What protobuf accepts (its C parser, upb, which the Python package uses): a varint value of at most
# 10 bytes; a tag or a length of at most 5 bytes, a tag below 2**32 and a length below 2**31.
VARINT_BYTES = 10
SHORT_VARINT_BYTES = 5
LENGTH_LIMIT = 2**31 - 1

# A field as the walk gives it: (field number, wire type, field start, value start, field end).
Field = tuple[int, int, int, int, int]


class Malformed(Exception):
    """The bytes are not a protobuf this walk understands (the caller lets protobuf say why)."""


class FileBytes:
    """Positional reads of a file through a small window, for walking protobuf fields."""

    WINDOW = 2**16

    def __init__(self, descriptor: int, size: int) -> None:
        self.descriptor, self.size = descriptor, size
        self.start, self.window = 0, b""

    @classmethod
    def in_memory(cls, data: bytes) -> FileBytes:
        """The same walk over bytes already in memory."""
        walk = cls(-1, len(data))
        walk.window = data
        return walk

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; Malformed past the end."""
        if offset + length > self.size:
            raise Malformed
        if not self.start <= offset <= offset + length <= self.start + len(self.window):
            if length > self.WINDOW // 2:
                return _pread_exact(self.descriptor, offset, length)
            self.start, self.window = offset, os.pread(self.descriptor, self.WINDOW, offset)
        return self.window[offset - self.start:offset - self.start + length]

    def fields(self, start: int, end: int) -> Iterator[Field]:
        """Each field in [start, end); Malformed if they do not tile it exactly."""
        position = start
        while position < end:
            head = self.read(position, min(20, end - position))
            tag, used = varint(head, 0, SHORT_VARINT_BYTES)
            if tag >= 2**32:
                raise Malformed
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise Malformed
            value_start = position + used
            if wire == VARINT:
                _, after = varint(head, used)
                field_end = position + after
            elif wire == FIXED64:
                field_end = value_start + 8
            elif wire == FIXED32:
                field_end = value_start + 4
            elif wire == LENGTH:
                length, after = varint(head, used, SHORT_VARINT_BYTES)
                if length > LENGTH_LIMIT:
                    raise Malformed
                value_start = position + after
                field_end = value_start + length
            else:  # groups are not used by ONNX
                raise Malformed
            if field_end > end:
                raise Malformed
            yield number, wire, position, value_start, field_end
            position = field_end


def _pread_exact(descriptor: int, offset: int, length: int) -> bytes:
    parts = []
    while length:
        chunk = os.pread(descriptor, min(length, 2**30), offset)
        if not chunk:
            raise Malformed
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def varint(data: bytes, position: int, max_bytes: int = VARINT_BYTES) -> tuple[int, int]:
    """The varint at `position` of `data` (at most `max_bytes` long) and the position after it."""
    value = shift = 0
    end = min(len(data), position + max_bytes)
    while position < end:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
    raise Malformed


def encode_varint(value: int) -> bytes:
    """`value` (non-negative) as a varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire: int) -> bytes:
    """The tag that starts a field."""
    return encode_varint(number << 3 | wire)


def length_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field holding `payload`."""
    return tag(number, LENGTH) + encode_varint(len(payload)) + payload
