"""The wire reader accepts exactly what protobuf accepts (issue 14.15).

`read_model` walks the file's fields itself to leave large weights in the file; whatever bytes
it is given, it must either read the very model protobuf reads or refuse the file in one line,
never "repair" an encoding protobuf refuses (an over-long tag or length varint, a tag beyond 32
bits). Generated cases: every tag and length of a model (top level, graph, initializers and
their fields) re-encoded with 1 to 11 bytes, and random byte mutations.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import cnn
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oppass import modelio
from oppass.errors import OppassError
from oppass.modelio import wire

MODEL = cnn().SerializeToString()


def padded_varint(value: int, size: int) -> bytes:
    """`value` as a varint of exactly `size` bytes (continuation bytes of zero bits where it needs fewer)."""
    out = bytearray()
    for index in range(size):
        out.append(value & 0x7F | (0x80 if index < size - 1 else 0))
        value >>= 7
    assert value == 0
    return bytes(out)


def varint_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, value) of every tag and length varint the reader walks: model, graph, initializers."""
    spans = []

    def walk(start: int, end: int, depth: int) -> None:
        for number, wire_type, field_start, value_start, field_end in wire.FileBytes.in_memory(data).fields(start,
                                                                                                          end):
            tag, after = wire.varint(data, field_start)
            spans.append((field_start, after, tag))
            if wire_type == wire.LENGTH:
                length, length_end = wire.varint(data, after)
                spans.append((after, length_end, length))
                nested = (depth == 0 and number == wire.GRAPH) or (depth == 1 and number == wire.INITIALIZER)
                if nested:
                    walk(value_start, field_end, depth + 1)

    walk(0, len(data), 0)
    return spans


def protobuf_reads(data: bytes) -> onnx.ModelProto | None:
    try:
        return onnx.ModelProto.FromString(data)
    except DecodeError:
        return None


def assert_reads_as_protobuf(data: bytes, folder: Path) -> None:
    """read_model gives the model protobuf gives, or refuses a file protobuf refuses (one OppassError)."""
    path = folder / "model.onnx"
    path.write_bytes(data)
    expected = protobuf_reads(data)
    try:
        ours = modelio.read_model(path).model
    except OppassError:
        if expected is not None:  # refused for another reason: no graph, IR version or external data
            assert not expected.HasField("graph") or not expected.ir_version or any(
                len(t.external_data) for t in modelio.all_tensors(expected)), "a model protobuf reads was refused"
        return
    assert expected is not None, "the reader accepted bytes protobuf refuses"
    assert ours.SerializeToString() == expected.SerializeToString()


def resized(data: bytes, start: int, end: int, value: int, size: int) -> bytes:
    """`data` with the varint at [start, end) re-encoded in `size` bytes, and the lengths enclosing it fixed."""
    body = data[:start] + padded_varint(value, size) + data[end:]
    growth = size - (end - start)
    return _fix_enclosing_lengths(data, body, start, growth)


def _fix_enclosing_lengths(original: bytes, body: bytes, position: int, growth: int) -> bytes:
    """Adds `growth` to the length of every field of `original` (model, graph, initializer) containing `position`."""
    enclosing = []

    def walk(start: int, end: int, depth: int) -> None:
        for number, wire_type, field_start, value_start, field_end in wire.FileBytes.in_memory(original).fields(
                start, end):
            if wire_type == wire.LENGTH and value_start <= position < field_end:
                nested = (depth == 0 and number == wire.GRAPH) or (depth == 1 and number == wire.INITIALIZER)
                if nested:
                    enclosing.append((field_start, value_start, field_end))
                    walk(value_start, field_end, depth + 1)

    walk(0, len(original), 0)
    for field_start, value_start, field_end in reversed(enclosing):  # innermost first: earlier bytes unchanged
        tag_end = wire.varint(original, field_start)[1]
        length = field_end - value_start + growth
        header = original[field_start:tag_end] + wire.encode_varint(length)
        old_header = original[field_start:value_start]
        body = body[:field_start] + header + body[value_start:]
        growth += len(header) - len(old_header)
    return body


SPANS = varint_spans(MODEL)


@pytest.fixture(autouse=True)
def defer_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every initializer is left in the file, so the walk (not protobuf) reads every field it passes."""
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)


@pytest.mark.parametrize("size", range(1, 12))
@pytest.mark.parametrize("span", range(0, len(SPANS), max(1, len(SPANS) // 24)))
def test_a_tag_or_length_of_any_size_is_read_as_protobuf_reads_it(span: int, size: int, tmp_path: Path) -> None:
    start, end, value = SPANS[span]
    if value >= 2 ** (7 * size):
        pytest.skip("the value needs more bytes")
    assert_reads_as_protobuf(resized(MODEL, start, end, value, size), tmp_path)


@pytest.mark.parametrize("value", [2**32 + 0x0A, 2**35 - 1, 2**31, 2**31 + 3, 2**64 - 1])
def test_a_tag_or_length_beyond_protobuf_limits_is_refused(value: int, tmp_path: Path) -> None:
    for start, end, _ in SPANS[:6]:
        size = max(5, (value.bit_length() + 6) // 7)
        assert_reads_as_protobuf(MODEL[:start] + padded_varint(value, size) + MODEL[end:], tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, len(MODEL) - 1), st.integers(0, 255),
                                st.sampled_from(["set", "insert", "delete"])), min_size=1, max_size=4))
def test_mutated_bytes_are_read_as_protobuf_reads_them(edits: list[tuple[int, int, str]], tmp_path: Path) -> None:
    data = bytearray(MODEL)
    for position, byte, kind in edits:
        position %= len(data)
        if kind == "set":
            data[position] = byte
        elif kind == "insert":
            data.insert(position, byte)
        else:
            del data[position]
    assert_reads_as_protobuf(bytes(data), tmp_path)
