"""Sessions and inspection without needless copies (issue 14.7, 14.8).

`inspect` reads attributes and dims only, never a weight's bytes; N load-mode decode nodes that
decode one packed tensor with the same attributes are decoded once, by `load_session` and by the
kernel in a plain onnxruntime session; `load_session` and the campaign open models beyond one
protobuf's 2 GB (here: with the limit lowered) by path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import cnn, make_model, weights
from onnx import helper, numpy_helper

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


def shared_gemm_decodes(copies: int, rows: int, columns: int, fmt: str = "fp32") -> onnx.ModelProto:
    """`copies` load-custom decodes of one packed [rows, columns] weight (with int8's DequantizeLinear), each
    feeding its own Gemm of x [1, rows]; output y sums every Gemm."""
    node = helper.make_node("Gemm", ["x", "w"], ["y"])
    model = protect.transform(make_model([node], {"w": weights([rows, columns], 2)},
                                         inputs=[helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                               [1, rows])],
                                         output_shape=[1, columns]), check="load-custom", format=fmt)
    graph = model.graph
    templates = list(graph.node)
    made = {output for template in templates for output in template.output if output}
    del graph.node[:]
    for index in range(copies):
        for template in templates:
            copy = graph.node.add()
            copy.CopyFrom(template)
            copy.name = f"{template.name}{index}"
            renamed = [f"{name}{index}" if name in made else name for name in template.input]
            del copy.input[:]
            copy.input.extend(renamed)
            del copy.output[:]
            copy.output.extend(f"{name}{index}" if name else "" for name in template.output)
    graph.node.append(helper.make_node("Sum", [f"y{index}" for index in range(copies)], ["y"]))
    return model


PLAIN_SESSION_PEAK = """
import sys
import numpy as np
import onnxruntime as ort
options = ort.SessionOptions()
options.register_custom_ops_library(sys.argv[2])
session = ort.InferenceSession(sys.argv[1], options)
session.run(None, {"x": np.ones((1, int(sys.argv[3])), np.float32)})
print("peak", next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def test_a_plain_session_decodes_a_packed_tensor_shared_by_many_load_nodes_once(tmp_path: Path,
                                                                                 library: str) -> None:
    rows, columns = 1024, 4096  # 16 MiB of fp32 weights
    peaks = {}
    for copies in (1, 16):
        path = tmp_path / f"shared{copies}.onnx"
        modelio.save_model(shared_gemm_decodes(copies, rows, columns), path)
        result = subprocess.run([sys.executable, "-P", "-c", PLAIN_SESSION_PEAK, str(path), library, str(rows)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        peaks[copies] = int(result.stdout.split("peak")[-1])
    weight_bytes = rows * columns * 4
    # One decoded copy per node held 15 more weights (240 MiB); shared, the 15 nodes add run-time outputs only.
    assert peaks[16] - peaks[1] < 3 * weight_bytes, \
        f"16 nodes peaked {(peaks[16] - peaks[1]) / 2**20:.0f} MiB above one for a 16 MiB weight"


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_shared_load_decodes_follow_the_bytes_of_the_packed_buffer(fmt: str, library: str) -> None:
    """Two sessions given one packed buffer (add_initializer) decode it as it is when each is created, as the
    numpy codec decodes it (the stripped model, run with unpacked weights as the decoded ones are)."""
    rows, columns = 64, 48
    model = shared_gemm_decodes(3, rows, columns, fmt)
    decode = protected_models.read_decode_nodes(model)[0]
    packed = next(t for t in model.graph.initializer if t.name == decode.packed)
    stored = numpy_helper.to_array(packed).copy()
    held = ort.OrtValue.ortvalue_from_numpy(stored)  # shares `stored`'s memory; replaces the model's copy
    x = np.random.default_rng(3).standard_normal([1, rows]).astype(np.float32)

    def session_output() -> tuple[np.ndarray, ort.InferenceSession]:
        options = runtime.session_options()
        options.add_initializer(packed.name, held)
        session = ort.InferenceSession(model.SerializeToString(), options)
        return session.run(None, {"x": x})[0], session

    def codec_output(words: np.ndarray) -> np.ndarray:
        faulty = onnx.ModelProto()
        faulty.CopyFrom(model)
        next(t for t in faulty.graph.initializer if t.name == packed.name).CopyFrom(
            numpy_helper.from_array(words, packed.name))
        stripped = protected_models.strip(faulty)
        options = runtime.session_options(library=False, config={"session.disable_prepacking": "1"})
        return ort.InferenceSession(stripped.SerializeToString(), options).run(None, {"x": x})[0]

    clean, first = session_output()
    np.testing.assert_array_equal(clean, codec_output(stored))
    stored.view(np.uint8)[5] ^= 0x10  # one flip in word 0 of the shared buffer, while `first` lives
    faulty, second = session_output()
    np.testing.assert_array_equal(faulty, codec_output(stored))
    assert not np.array_equal(faulty, clean), "the flipped word was not masked anew"
    np.testing.assert_array_equal(first.run(None, {"x": x})[0], clean)  # as decoded when it was created
    del first, second


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
