"""Sessions and inspection without needless copies (issue 14.7, 14.8).

`inspect` reads attributes and dims only, never a weight's bytes; N load-mode decode nodes that
decode one packed tensor with the same attributes are decoded once; `load_session` and the
campaign open models beyond one protobuf's 2 GB (here: with the limit lowered) by path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import cnn, make_model, weights
from onnx import helper

from oppass import modelio, protect, protected_models, runtime


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library


def test_inspect_reads_no_weight_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)
    path = tmp_path / "protected.onnx"
    modelio.save_model(protect.transform(cnn()), path)
    read: list[str] = []
    original = modelio.ModelFile._read

    def reading(self: modelio.ModelFile, tensor: onnx.TensorProto) -> bytes:
        read.append(tensor.name)
        return original(self, tensor)

    monkeypatch.setattr(modelio.ModelFile, "_read", reading)
    described = protected_models.inspect(path)
    assert [t.name for t in described] == [t.name for t in protected_models.inspect(protect.transform(cnn()))]
    assert read == []


def shared_decodes(copies: int) -> onnx.ModelProto:
    """A protected Conv (load mode) and `copies` more decode nodes of its packed tensor, each feeding a Conv;
    output y sums every Conv."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    model = protect.transform(make_model([node], {"w": weights([2, 3, 3, 3], 1)},
                                         output_shape=["batch", 2, 6, 6]), check="load-custom")
    graph = model.graph
    decode, conv = graph.node[0], graph.node[1]
    conv.output[0] = "c"
    for index in range(copies):
        for template, inputs, output in ((decode, list(decode.input), f"w{index}"),
                                         (conv, ["x", f"w{index}"], f"c{index}")):
            copy = graph.node.add()
            copy.CopyFrom(template)
            copy.name = f"{template.name}{index}"
            del copy.input[:]
            copy.input.extend(inputs)
            copy.output[0] = output
    graph.node.append(helper.make_node("Sum", ["c", *[f"c{index}" for index in range(copies)]], ["y"]))
    return model


@pytest.mark.parametrize("copies", [1, 2, 16])
def test_load_mode_decode_nodes_sharing_a_packed_tensor_are_decoded_once(copies: int, tmp_path: Path) -> None:
    model = shared_decodes(copies)
    modelio.save_model(model, tmp_path / "shared.onnx")
    source = modelio.read_model(tmp_path / "shared.onnx", defer=True)
    decodes = protected_models.read_decode_nodes(source.model)
    assert len(decodes) == copies + 1
    folded = runtime._Fold(source, decodes, None, lambda decode: decode.check == "load")
    assert [t.name for t in folded.model.graph.initializer] == [decodes[0].output]
    assert len(folded.runs) == 1
    x = np.random.default_rng(0).standard_normal([1, 3, 6, 6]).astype(np.float32)
    plain = ort.InferenceSession(model.SerializeToString(), runtime.session_options())
    expected = plain.run(None, {"x": x})
    actual = runtime.load_session(model).run(None, {"x": x})
    for value, wanted in zip(actual, expected, strict=True):  # constant weights: onnxruntime's prepacked Conv
        np.testing.assert_allclose(value, wanted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check", ["runtime", "load"])
@pytest.mark.parametrize("given", ["proto", "path"])
def test_a_model_beyond_the_protobuf_limit_opens_by_path(check: str, given: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    protected = protect.transform(cnn(), check=check)
    path = tmp_path / "protected.onnx"
    modelio.save_model(protected, path)
    x = np.random.default_rng(1).standard_normal([2, 3, 6, 6]).astype(np.float32)
    expected = runtime.load_session(protected).run(None, {"x": x})
    limit = protected.ByteSize() - 1  # the model is "over 2 GB"
    monkeypatch.setattr(runtime, "PROTOBUF_LIMIT", limit)
    monkeypatch.setattr(modelio.writer, "PROTOBUF_LIMIT", limit)
    serialised = []
    original = onnx.ModelProto.SerializeToString

    def serialise(self: onnx.ModelProto, **options: object) -> bytes:
        serialised.append(self.ByteSize())
        return original(self, **options)

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", serialise)
    session = runtime.load_session(protected if given == "proto" else path)
    assert [a.tobytes() for a in session.run(None, {"x": x})] == [e.tobytes() for e in expected]
    assert all(size <= limit for size in serialised), f"a model over the limit was serialised whole: {serialised}"
