"""The portable load check (`check="load"`): the pass's standard-op decode chains, end to end (issue 10.2).

The chain itself is compared bit for bit with the codec and the C kernel, on the normative
vectors and random tensors of every format and word size, in tests/test_standard_decode.py.
Here: what the pass writes (opset 26, no ai.oppass node, the metadata record), that plain
onnxruntime in a process that never imports oppass runs it and masks a flip, the opset
conversion and its failure, and inspect, strip and inject on such models, folded ones included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import cnn, weights
from onnx import TensorProto, helper, numpy_helper
from references import adjusted_reference, plain_options

from oppass import cli, codec, modelio, protect, protected_models, runtime, schema
from oppass.errors import OppassError
from oppass.standard_decode import IR_VERSION, OPSET

CNN_WEIGHTS = ("conv1.w", "conv2.w", "fc1.w", "fc2.w")


def feeds(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).standard_normal([batch, 3, 6, 6]).astype(np.float32)}


def packed(model: onnx.ModelProto, weight: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == protect.packed_name(weight))


def with_flipped_bit(model: onnx.ModelProto, weight: str, stream_bit: int) -> onnx.ModelProto:
    """A copy of `model` with one bit of a packed weight flipped (bit `stream_bit` of its little-endian bytes)."""
    faulty = onnx.ModelProto()
    faulty.CopyFrom(model)
    tensor = packed(faulty, weight)
    raw = bytearray(tensor.raw_data)
    raw[stream_bit // 8] ^= 1 << stream_bit % 8
    tensor.raw_data = bytes(raw)
    return faulty


@pytest.mark.parametrize(("fmt", "word"), [("keep", "64"), ("fp16", "weight"), ("bf16", "256"), ("int8", "32")])
def test_the_pass_emits_standard_ops_that_plain_onnxruntime_folds_to_the_reference(fmt: str, word: str) -> None:
    model = cnn()
    protected, report = protect.transform_with_report(model, format=fmt, word=word, check="load", report_faults=True)
    onnx.checker.check_model(protected, full_check=True)
    assert not [node.name for node in protected.graph.node if node.domain == schema.DOMAIN]
    assert [entry.domain for entry in protected.opset_import] == [""]
    assert protected.opset_import[0].version == OPSET and protected.ir_version == IR_VERSION
    assert [t.name for t in report.tensors] == list(CNN_WEIGHTS)
    # The fault-free decoded weights in the original graph (int8: with their DequantizeLinear, which onnxruntime
    # may fuse with the Conv once the weights are constants).
    reference = protected_models.strip(protect.transform(model, format=fmt, word=word))
    for options in (ort.SessionOptions(), plain_options(False)):  # folded at creation, or every node executed
        expected = ort.InferenceSession(reference.SerializeToString(), options).run(["y"], feeds())[0]
        session = ort.InferenceSession(protected.SerializeToString(), options)
        actual, masked = session.run(["y", schema.MASKED_WORDS_OUTPUT], feeds())
        assert actual.tobytes() == expected.tobytes() and int(masked) == 0


def test_onnxruntime_folds_every_chain_away_at_session_creation(tmp_path: Path) -> None:
    protected = protect.transform(cnn(), check="load", report_faults=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(protected.SerializeToString(), options)
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert not [node.name for node in optimized.graph.node if "::op_" in node.name]
    assert not [t.name for t in optimized.graph.initializer if t.name.endswith("::op_packed")]


@pytest.mark.parametrize("fmt", ["int8", "fp16"])  # largest step: the lane split, or the widened weights
def test_the_transform_warns_exactly_when_onnxruntime_would_leave_the_chain_unfolded(
        fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protect, "FOLDING_LIMIT", 1)
    with pytest.warns(UserWarning, match=r"\(([\d,]+) bytes in one step") as caught:
        protected = protect.transform(one_gemm(64), check="load", format=fmt)
    largest = int(str(caught[0].message).split("(")[1].split(" bytes")[0].replace(",", ""))
    for limit, decode_nodes_left in ((largest, False), (largest - 1, True)):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{limit}.onnx")
        options.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes", str(limit))
        ort.InferenceSession(protected.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(tmp_path / f"{limit}.onnx")
        assert any("::op_decode" in node.name for node in optimized.graph.node) == decode_nodes_left


@pytest.mark.parametrize(("fmt", "word"), [("keep", "64"), ("fp16", "weight"), ("bf16", "256"), ("int8", "32")])
def test_load_session_folds_standard_op_checks_with_the_kernel_whatever_the_folding_limit(
        fmt: str, word: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chains run once as their ParityCheckUnpack node (one weight at a time), not through onnxruntime's
    folding, which holds every intermediate and leaves chains above its limit (here 1 byte) to every run."""
    protected = protect.transform(cnn(), format=fmt, word=word, check="load", report_faults=True)
    faulty = with_flipped_bit(protected, "conv2.w", 8 * 5 + 6)
    names = ["y", schema.MASKED_WORDS_OUTPUT]
    expected = ort.InferenceSession(faulty.SerializeToString()).run(names, feeds())  # onnxruntime folds the chains
    assert int(expected[1]) == 1
    opened: list[onnx.GraphProto] = []  # the graph of the model the session opens (its folder goes after)
    monkeypatch.setattr(runtime, "session_from_file", lambda path, options: opened.append(
        onnx.load(path, load_external_data=False).graph) or ort.InferenceSession(str(path), options))
    limit = {"optimization.constant_folding_max_output_size_in_bytes": "1"}
    with pytest.warns(UserWarning, match="1 corrupted weight words were masked at load"):
        actual = runtime.load_session(faulty, config=limit).run(names, feeds())
    assert [a.tobytes() for a in actual] == [e.tobytes() for e in expected]
    assert not [node.name for node in opened[0].node if "::op_decode" in node.name or node.domain]
    assert not [t.name for t in opened[0].initializer if t.name.endswith("::op_packed")]


def one_gemm(side: int) -> onnx.ModelProto:
    """A model computing Gemm(x, w) with one side x side fp32 weight w."""
    weight = np.random.default_rng(1).standard_normal((side, side), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def optimized_graph(model: onnx.ModelProto, folder: Path, tag: str) -> tuple[list[tuple[str, str]], list[bytes]]:
    """The node types and the initializers' bytes (sorted) of the model as onnxruntime optimises it."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / f"{tag}.onnx")
    ort.InferenceSession(model.SerializeToString(), options)
    optimized = onnx.load(folder / f"{tag}.onnx")
    nodes = sorted((node.domain, node.op_type) for node in optimized.graph.node)
    constants = sorted(str(list(t.dims)).encode() + numpy_helper.to_array(t).tobytes()
                       for t in optimized.graph.initializer)
    return nodes, constants


@pytest.mark.parametrize("model_name", ["cnn", "digits"])
def test_onnxruntime_optimises_the_protected_model_into_the_graph_of_the_unprotected_one(
    model_name: str, tmp_path: Path
) -> None:
    """After folding, the graph onnxruntime runs is the unprotected model's with the decoded weights: same nodes,
    same constants (why load mode costs nothing per run)."""
    digits = Path(protect.__file__).parent / "examples" / "digits_cnn.onnx"
    model = cnn(OPSET) if model_name == "cnn" else onnx.load(digits)
    protected = protect.transform(model, check="load")
    reference = protected_models.strip(protected)  # the decoded weights in the converted graph, no check
    assert optimized_graph(protected, tmp_path, "protected") == optimized_graph(reference, tmp_path, "reference")


# Runs a model with plain onnxruntime (no custom-op library, no oppass) and reports what it imported.
PLAIN_RUNNER = """
import json, sys
import numpy as np
import onnxruntime as ort

x = np.load(sys.argv[1])
results = []
for path in sys.argv[2:]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y, masked = session.run(["y", "oppass_masked_words"], {"x": x})
    results.append({"y": y.tolist(), "masked": int(masked)})
imported = sorted(name for name in sys.modules if name.split(".")[0] == "oppass")
print(json.dumps({"results": results, "oppass_modules": imported}))
"""


def test_a_plain_onnxruntime_process_runs_the_command_line_output_and_masks_a_flip(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(cnn(), source)
    protected_path = tmp_path / "protected.onnx"
    assert cli.main(["transform", str(source), str(protected_path), "--check", "load", "--report-faults"]) == 0
    protected = onnx.load(protected_path)
    bad_word, width = 2, 64
    faulty_path = tmp_path / "faulty.onnx"
    onnx.save_model(with_flipped_bit(protected, "conv2.w", bad_word * width + 30), faulty_path)
    x = feeds()["x"]
    np.save(tmp_path / "x.npy", x)
    # -I: isolated mode, so neither PYTHONPATH nor the working folder can supply oppass.
    command = [sys.executable, "-I", "-c", PLAIN_RUNNER, str(tmp_path / "x.npy"), str(protected_path),
               str(faulty_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["oppass_modules"] == []
    clean, masked_run = report["results"]

    reference = adjusted_reference(cnn(), CNN_WEIGHTS, "keep", "64", "word-lsb")
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(reference)
    conv2 = next(t for t in zeroed.graph.initializer if t.name == "conv2.w")
    values = numpy_helper.to_array(conv2).copy()
    values.reshape(-1)[bad_word * 2:(bad_word + 1) * 2] = 0  # two fp32 weights per 64-bit word
    conv2.CopyFrom(numpy_helper.from_array(values, "conv2.w"))
    for outcome, model, masked in ((clean, reference, 0), (masked_run, zeroed, 1)):
        expected = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
        np.testing.assert_array_equal(np.array(outcome["y"], dtype=np.float32), expected)
        assert outcome["masked"] == masked
    assert clean["y"] != masked_run["y"]


# ----------------------------------------------------------------------------- opsets


@pytest.mark.parametrize("opset", [11, 13, 21, 26])
def test_models_of_any_convertible_opset_are_lifted_to_opset_26(opset: int) -> None:
    model = cnn(opset)
    model.metadata_props.add(key="author", value="someone")
    protected = protect.transform(model, check="load")
    assert protected.opset_import[0].version == OPSET and protected.ir_version >= IR_VERSION
    assert {entry.key: entry.value for entry in protected.metadata_props}["author"] == "someone"
    reference = adjusted_reference(model, CNN_WEIGHTS, "keep", "64", "word-lsb")
    expected = ort.InferenceSession(reference.SerializeToString()).run(["y"], feeds())[0]
    assert ort.InferenceSession(protected.SerializeToString()).run(["y"], feeds())[0].tobytes() == expected.tobytes()


def test_a_file_whose_weights_stay_in_it_until_read_converts_to_what_the_proto_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version converter copies the deferred tensors' references: the pass still reads them one at a time."""
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 0)
    source = tmp_path / "model.onnx"
    onnx.save_model(cnn(), source)
    read = modelio.read_model(source, defer=True)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in read.model.graph.initializer)
    protected = protect.transform(read, check="load")
    assert protected is read.model and protected.opset_import[0].version == OPSET
    modelio.save_model(protected, tmp_path / "out.onnx", source=read)
    expected = protect.transform(cnn(), check="load").SerializeToString()
    assert (tmp_path / "out.onnx").read_bytes() == expected


def image_scaler_model() -> onnx.ModelProto:
    """Conv then ImageScaler, an experimental op onnx's version converter has no schema for (opset 9)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("ImageScaler", ["c"], ["y"], scale=2.0)]
    graph = helper.make_graph(nodes, "image_scaler", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights([2, 3, 3, 3], 1), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


def test_a_model_the_converter_cannot_lift_is_one_line_naming_the_alternative(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(image_scaler_model(), source)
    before = source.read_bytes()
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx"), "--check", "load"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("oppass: error: onnx's version converter cannot lift the model from opset 9 to 26")
    assert "--check load-custom" in error and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"] and source.read_bytes() == before
    assert protected_models.inspect(protect.transform(image_scaler_model(), check="load-custom"))


@pytest.mark.parametrize("check", ["load", "load-custom"])
def test_optimize_for_cpu_with_a_load_check_is_refused(check: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(cnn(), source)
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx"), "--check", check,
                     "--optimize-for-cpu"]) == 2
    assert capsys.readouterr().err.startswith("oppass: error: --optimize-for-cpu is for --check runtime")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# ----------------------------------------------------------------------------- inspect, strip, inject


def test_inspect_reports_standard_op_checks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    protected = protect.transform(cnn(), format="fp16", word="256", check="load")
    tensors = protected_models.inspect(protected)
    assert [(t.name, t.check, t.decoded_by) for t in tensors] == [(name, "load", "standard ops")
                                                                  for name in CNN_WEIGHTS]
    assert tensors[0].packed_shape == codec.packed_shape(4 * 3 * 3 * 3, "fp16", 256)
    custom = protected_models.inspect(protect.transform(cnn(), check="load-custom"))
    assert {(t.check, t.decoded_by) for t in custom} == {("load-custom", "ParityCheckUnpack")}
    path = tmp_path / "protected.onnx"
    onnx.save_model(protected, path)
    assert cli.main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3] load standard ops FLOAT" in " ".join(lines[1].split()) and len(lines) == 5


def test_inspect_tells_a_constant_folded_model_from_a_protected_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A saved onnxruntime-optimised model stands for onnxsim and Polygraphy: the chains folded to initializers."""
    protected = protect.transform(cnn(), check="load")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(protected.SerializeToString(), options)
    folded = onnx.load(tmp_path / "folded.onnx")
    assert any(entry.key == schema.STANDARD_DECODES_KEY for entry in folded.metadata_props)
    assert protected_models.inspect(folded) == []
    assert protected_models.folded_checks(folded) == list(CNN_WEIGHTS)
    assert protected_models.folded_checks(protected) == []
    assert cli.main(["inspect", str(tmp_path / "folded.onnx")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("oppass: error: model is not protected any more: the load checks of 4 weights "
                            "(conv1.w, ...) were constant-folded away") and error.count("\n") == 1
    assert protect.transform(folded, check="load")  # the folded weights can be protected again


def test_strip_of_a_standard_op_model_gives_the_weights_of_a_runtime_one() -> None:
    stripped = protected_models.strip(protect.transform(cnn(), format="bf16", word="128", check="load",
                                                        report_faults=True))
    assert not [node.name for node in stripped.graph.node if "::op_" in node.name]
    assert not [t.name for t in stripped.graph.initializer if "::op_" in t.name]
    assert not [o.name for o in stripped.graph.output if o.name == schema.MASKED_WORDS_OUTPUT]
    assert not [e.key for e in stripped.metadata_props if e.key == schema.STANDARD_DECODES_KEY]
    runtime_stripped = protected_models.strip(protect.transform(cnn(), format="bf16", word="128"))
    by_name = {t.name: t.SerializeToString() for t in runtime_stripped.graph.initializer}
    assert {t.name: t.SerializeToString() for t in stripped.graph.initializer} == by_name
    onnx.checker.check_model(stripped, full_check=True)


def test_inject_flips_packed_bits_that_the_chain_then_masks() -> None:
    protected = protect.transform(cnn(), check="load", report_faults=True)
    faulty, flips = protected_models.inject(protected, 0.002, 11)
    assert flips > 0
    differing = sum(int(np.unpackbits(np.frombuffer(packed(faulty, name).raw_data, np.uint8)
                                      ^ np.frombuffer(packed(protected, name).raw_data, np.uint8)).sum())
                    for name in CNN_WEIGHTS)
    assert differing == flips
    masked = ort.InferenceSession(faulty.SerializeToString()).run([schema.MASKED_WORDS_OUTPUT], feeds())[0]
    assert 0 < int(masked) <= flips


def test_an_already_protected_model_is_refused() -> None:
    with pytest.raises(OppassError, match="already protected .*standard-op load checks"):
        protect.transform(protect.transform(cnn(), check="load"))


def _set_record(model: onnx.ModelProto, change: object) -> onnx.ModelProto:
    entry = next(e for e in model.metadata_props if e.key == schema.STANDARD_DECODES_KEY)
    records = json.loads(entry.value)
    change(records)  # type: ignore[operator]
    entry.value = json.dumps(records)
    return model


def _set_constant(model: onnx.ModelProto) -> onnx.ModelProto:
    tensor = next(t for t in model.graph.initializer if t.name == "conv1.w::op_decode_bit_0")
    tensor.CopyFrom(numpy_helper.from_array(np.uint8(3), tensor.name))
    return model


def _drop_node(model: onnx.ModelProto) -> onnx.ModelProto:
    index = next(i for i, node in enumerate(model.graph.node) if node.name == "conv2.w::op_decode_even")
    del model.graph.node[index]
    return model


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda m: _set_record(m, lambda r: r[0].update(word_bits=48)), "'conv1.w::op_decode' has word_bits 48"),
    (lambda m: _set_record(m, lambda r: r[1].update(shape=[8, 4, 3, 3])), "does not match its packed tensor"),
    (lambda m: _set_record(m, lambda r: r[0].update(format="fp64")), "has format 'fp64'"),
    (lambda m: _set_record(m, lambda r: r[0].pop("masked")), "each needs the fields"),
    (lambda m: _set_record(m, lambda r: r.append(r[0])), "is listed more than once"),
    (lambda m: _set_record(m, lambda r: r[0].update(word_bits=True)), "field word_bits of weight 'conv1.w'"),
    (_set_constant, "constant 'conv1.w::op_decode_bit_0' is missing or differs"),
    (_drop_node, "node 'conv2.w::op_decode_even' is missing or differs"),
])
@pytest.mark.parametrize("command", ["inspect", "strip", "inject"])
def test_tampered_standard_op_checks_are_one_line_errors(tamper: object, message: str, command: str,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tamper(protect.transform(cnn(), check="load"))  # type: ignore[operator]
    path = tmp_path / "tampered.onnx"
    modelio.save_model(model, path)
    arguments = {"inspect": [], "strip": [str(tmp_path / "out.onnx")],
                 "inject": [str(tmp_path / "out.onnx"), "--ber", "0.01", "--seed", "1"]}[command]
    assert cli.main([command, str(path), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("oppass: error: ") and error.count("\n") == 1 and message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered.onnx"]
