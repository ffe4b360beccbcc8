"""Hostile and unusual models through the command line (issue 5).

Each case gets what a user would want: either one line `oppass: error: ...` on stderr, exit
status 2, no new file and every existing file untouched, or a correct result. Cases already
covered elsewhere (garbage, truncated and missing files, same input and output path, already
protected models, external data escaping its folder, zero-size and float64 weights, Constant
nodes, shared weights, If subgraphs) live in tests/test_cli.py and tests/test_graph.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import INPUT_SHAPE, make_model, weights
from onnx import TensorProto, helper, numpy_helper
from references import adjusted_reference, plain_options

import oppass
from oppass import cli, modelio, protect, protected_models


def conv_model(opset: int, weight_shape: tuple[int, ...] = (2, 3, 3, 3)) -> onnx.ModelProto:
    pad = (weight_shape[2] - 1) // 2
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[pad] * 4)
    return make_model([node], {"w": weights(list(weight_shape), 1)}, output_shape=["batch", weight_shape[0], 6, 6],
                      opset=opset)


def loop_model() -> onnx.ModelProto:
    """A Loop whose body runs a Conv on the loop-carried tensor with an outer-scope weight."""
    body = helper.make_graph(
        [helper.make_node("Conv", ["carried_in", "loop.w"], ["carried_out"], pads=[1, 1, 1, 1]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, None)],
    )
    nodes = [helper.make_node("Constant", [], ["trips"], value=numpy_helper.from_array(np.array(2, np.int64))),
             helper.make_node("Constant", [], ["go"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)]
    return make_model(nodes, {"loop.w": weights([3, 3, 3, 3], 2)}, output_shape=INPUT_SHAPE)


def duplicate_initializer_model() -> onnx.ModelProto:
    model = conv_model(17)
    model.graph.initializer.append(numpy_helper.from_array(weights([2, 3, 3, 3], 9), "w"))
    return model


def empty_graph_model() -> onnx.ModelProto:
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([], "empty", [value], [value]),
                             opset_imports=[helper.make_opsetid("", 17)])


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def assert_user_error(arguments: list[str], folder: Path, capsys: pytest.CaptureFixture, message: str) -> None:
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert cli.main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("oppass: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(("case", "message"), [
    ("empty file", "not a valid ONNX model"),
    ("directory as input", "is a directory, not a model file"),
    ("output inside a file", "is not a folder"),
    ("output is a directory", "is a directory"),
    ("same file through a symlink", "would overwrite the input"),
])
def test_bad_paths_are_one_line_errors(case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = write(conv_model(17), tmp_path / "model.onnx")
    empty = tmp_path / "empty.onnx"
    empty.touch()
    (tmp_path / "folder").mkdir()
    (tmp_path / "alias.onnx").symlink_to(model)
    source, destination = {
        "empty file": (empty, tmp_path / "out.onnx"),
        "directory as input": (tmp_path / "folder", tmp_path / "out.onnx"),
        "output inside a file": (model, model / "out.onnx"),
        "output is a directory": (model, tmp_path / "folder"),
        "same file through a symlink": (model, tmp_path / "alias.onnx"),
    }[case]
    assert_user_error(["transform", str(source), str(destination), "--no-verify"], tmp_path, capsys, message)


def set_attribute(node: onnx.NodeProto, name: str, attribute_type: int | None, value: object = None) -> None:
    """Replaces (attribute_type None: removes) the node's attribute `name` by one of that AttributeProto type."""
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    if attribute_type is None:
        return
    made = onnx.AttributeProto(name=name, type=attribute_type)  # type: ignore[arg-type]
    if attribute_type == onnx.AttributeProto.STRING:
        made.s = value if isinstance(value, bytes) else b"fp32"
    elif attribute_type == onnx.AttributeProto.INT:
        made.i = value if isinstance(value, int) else 64
    elif attribute_type == onnx.AttributeProto.INTS:
        made.ints.extend(value if isinstance(value, list) else [2, 3, 3, 3])
    elif attribute_type == onnx.AttributeProto.FLOAT:
        made.f = value if isinstance(value, float) else 64.0
    elif attribute_type == onnx.AttributeProto.TENSOR:
        made.t.CopyFrom(numpy_helper.from_array(np.array([2, 3, 3, 3], np.int64)))
    elif attribute_type == onnx.AttributeProto.STRINGS:
        made.strings.append(b"fp32")
    else:  # UNDEFINED: the values are there, the type is not
        made.s, made.i = b"fp32", 64
        made.ints.extend([2, 3, 3, 3])
    node.attribute.append(made)


def set_name(node: onnx.NodeProto, name: bytes) -> None:
    """Gives the node a name of any bytes (protobuf refuses to assign one that is not UTF-8)."""
    node.MergeFromString(bytes([0x1A, len(name)]) + name)  # field 3 (name), length-delimited, < 128 bytes


STRING, INT, INTS = onnx.AttributeProto.STRING, onnx.AttributeProto.INT, onnx.AttributeProto.INTS
FLOAT = onnx.AttributeProto.FLOAT
OTHER_TYPES = {"UNDEFINED": onnx.AttributeProto.UNDEFINED, "FLOAT": onnx.AttributeProto.FLOAT, "INT": INT,
               "STRING": STRING, "INTS": INTS, "TENSOR": onnx.AttributeProto.TENSOR,
               "STRINGS": onnx.AttributeProto.STRINGS}
EXPECTED_TYPES = {"format": "STRING", "word_bits": "INT", "shape": "INTS", "check": "STRING", "output_type": "INT"}

# (case, change to the protected conv model (fp32, 54 weights, W = 64: packed uint64 [27, 1]), error text)
TAMPERED = [
    *[(f"{name} missing", lambda m, n=name: set_attribute(m.graph.node[0], n, None), f"lacks attribute '{name}'")
      for name in EXPECTED_TYPES],
    *[(f"{name} of type {kind}", lambda m, n=name, t=code: set_attribute(m.graph.node[0], n, t),
       f"has attribute '{name}' of type {kind}, expected {EXPECTED_TYPES[name]}")
      for name in EXPECTED_TYPES for kind, code in OTHER_TYPES.items() if kind != EXPECTED_TYPES[name]],
    ("check twice", lambda m: m.graph.node[0].attribute.append(m.graph.node[0].attribute[0]),
     "has attribute 'check' more than once"),
    *[(f"format {value!r}", lambda m, v=value: set_attribute(m.graph.node[0], "format", STRING, v), "has format")
      for value in (b"fp32\0", b"fp32\0x", b"FP32", b" fp32", b"fp32 ", b"fp32\n", b"", b"fp64", b"\xff\xfe")],
    *[(f"check {value!r}", lambda m, v=value: set_attribute(m.graph.node[0], "check", STRING, v), "has check")
      for value in (b"runtime\0", b"Load", b"none\n", b"never", b"")],
    *[(f"word_bits {value}", lambda m, v=value: set_attribute(m.graph.node[0], "word_bits", INT, v), "has word_bits")
      for value in (0, 8, 16, 24, -64, 1024, 2**40, -2**63)],
    ("word_bits 128", lambda m: set_attribute(m.graph.node[0], "word_bits", INT, 128), "does not match its packed"),
    ("shape negative", lambda m: set_attribute(m.graph.node[0], "shape", INTS, [-2, 3, 3, 3]), "negative dimension"),
    ("shape of 2**124 weights", lambda m: set_attribute(m.graph.node[0], "shape", INTS, [2**62, 2**62]), "2**58"),
    ("shape whose product has 18,000 digits", lambda m: set_attribute(m.graph.node[0], "shape", INTS,
                                                                       [2**62 - 1] * 1000), "2**58"),
    ("shape larger than the packed data", lambda m: set_attribute(m.graph.node[0], "shape", INTS, [4, 3, 3, 3]),
     "does not match its packed tensor"),
    ("shape smaller than the packed data", lambda m: set_attribute(m.graph.node[0], "shape", INTS, [1, 3, 3, 3]),
     "does not match its packed tensor"),
    ("scalar shape", lambda m: set_attribute(m.graph.node[0], "shape", INTS, []), "does not match its packed tensor"),
    *[(f"output_type {value}", lambda m, v=value: set_attribute(m.graph.node[0], "output_type", INT, v),
       "has output_type") for value in (0, 10, 16, 3, 999, -1)],
    ("no input", lambda m: m.graph.node[0].input.pop(), "must have exactly one input"),
    ("two inputs", lambda m: m.graph.node[0].input.append("x"), "must have exactly one input"),
    ("unnamed input", lambda m: m.graph.node[0].input.__setitem__(0, ""), "must have exactly one input"),
    ("no output", lambda m: m.graph.node[0].output.pop(), "must have one to three outputs"),
    ("three outputs", lambda m: m.graph.node[0].output.extend(["a", "b"]), "only code secded has the third"),
    ("four outputs", lambda m: m.graph.node[0].output.extend(["a", "b", "c"]), "must have one to three outputs"),
    ("unnamed output", lambda m: m.graph.node[0].output.__setitem__(0, ""), "must have one to three outputs"),
    *[(f"code {value!r}", lambda m, v=value: set_attribute(m.graph.node[0], "code", STRING, v), "has code")
      for value in (b"secded\0", b"Parity", b"hamming", b"")],
    ("code of type INT", lambda m: set_attribute(m.graph.node[0], "code", INT, 1), "has attribute 'code' of type INT"),
    *[(f"range_max {value}", lambda m, v=value: set_attribute(m.graph.node[0], "range_max", FLOAT, v),
       "has range_max") for value in (float("nan"), float("inf"), -1.0)],
    ("other op type", lambda m: setattr(m.graph.node[0], "op_type", "ParityCheckUnpack2"), "has op type"),
    ("no ai.oppass import", lambda m: m.opset_import.pop(), "does not import it"),
    ("ai.oppass version 2", lambda m: setattr(m.opset_import[-1], "version", 2), "at version(s) 2"),
    ("ai.oppass imported twice", lambda m: m.opset_import.append(helper.make_opsetid("ai.oppass", 1)),
     "at version(s) 1, 1"),
    ("packed int64", lambda m: setattr(m.graph.initializer[0], "data_type", TensorProto.INT64),
     "does not match its packed tensor: INT64"),
    ("packed unknown type", lambda m: setattr(m.graph.initializer[0], "data_type", 99),
     "does not match its packed tensor: type 99"),
    ("packed rank 1", lambda m: m.graph.initializer[0].dims.pop(), "does not match its packed tensor"),
    ("packed not an initializer", lambda m: setattr(m.graph.initializer[0], "name", "elsewhere"),
     "which is not an initializer of the main graph"),
    ("name of any bytes", lambda m: (set_name(m.graph.node[0], b"\xff\n\\'w"),
                                     set_attribute(m.graph.node[0], "format", STRING, b"fp64")),
     "decode node '\\xff\\x0a\\\\'w' has format 'fp64'"),
]


def tampered_model(change: Callable[[onnx.ModelProto], object]) -> onnx.ModelProto:
    model = protect.transform(conv_model(17))
    assert [node.op_type for node in model.graph.node] == ["ParityCheckUnpack", "Conv"]
    change(model)
    return model


def command_line(command: str, model: Path, folder: Path) -> list[str]:
    return {"inspect": ["inspect", str(model)],
            "strip": ["strip", str(model), str(folder / "out.onnx")],
            "inject": ["inject", str(model), str(folder / "out.onnx"), "--ber", "1e-3", "--seed", "0"]}[command]


@pytest.mark.parametrize(("case", "change", "message"), TAMPERED, ids=[case for case, _, _ in TAMPERED])
@pytest.mark.parametrize("command", ["inspect", "strip", "inject"])
def test_tampered_decode_nodes_are_one_line_errors(
    case: str, change: Callable[[onnx.ModelProto], object], message: str, command: str, tmp_path: Path,
    capsys: pytest.CaptureFixture
) -> None:
    model = write(tampered_model(change), tmp_path / "tampered.onnx")
    assert_user_error(command_line(command, model, tmp_path), tmp_path, capsys, message)


@pytest.mark.parametrize(("case", "change", "message"), [
    ("packed data shorter than its dims", lambda m: setattr(m.graph.initializer[0], "raw_data",
                                                            m.graph.initializer[0].raw_data[:-8]),
     "has 208 bytes of data, expected 216"),
    ("packed data in a typed field, one value short", lambda m: m.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.zeros([27, 1], np.uint64), "w::op_packed")) or _to_typed_field(m, 26),
     "holds 26 values, expected 27"),
    ("packed data missing", lambda m: m.graph.initializer[0].ClearField("raw_data"), "holds 0 values, expected 27"),
])
@pytest.mark.parametrize("command", ["strip", "inject"])
def test_packed_data_that_does_not_fill_its_dims_is_a_one_line_error(
    case: str, change: Callable[[onnx.ModelProto], object], message: str, command: str, tmp_path: Path,
    capsys: pytest.CaptureFixture
) -> None:
    model = write(tampered_model(change), tmp_path / "tampered.onnx")
    assert_user_error(command_line(command, model, tmp_path), tmp_path, capsys, message)


def _to_typed_field(model: onnx.ModelProto, values: int) -> None:
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.uint64_data.extend(range(values))


@pytest.mark.parametrize("case", ["name of any bytes", "shape whose product has 18,000 digits",
                                  "format of type UNDEFINED", "packed unknown type", "no ai.oppass import"])
@pytest.mark.parametrize("command", ["inspect", "strip", "inject"])
def test_tampered_decode_nodes_print_no_traceback(case: str, command: str, tmp_path: Path) -> None:
    _, change, message = next(entry for entry in TAMPERED if entry[0] == case)
    model = write(tampered_model(change), tmp_path / "tampered.onnx")
    before = model.read_bytes()
    result = subprocess.run([sys.executable, "-m", "oppass.cli", *command_line(command, model, tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("oppass: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered.onnx"] and model.read_bytes() == before


def test_duplicate_initializer_names_are_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = write(duplicate_initializer_model(), tmp_path / "dup.onnx")
    assert_user_error(["transform", str(model), str(tmp_path / "out.onnx"), "--no-verify"], tmp_path, capsys,
                      "initializer 'w' is defined more than once")


@pytest.mark.parametrize(("make", "ops"), [(empty_graph_model, "Conv,Gemm"), (lambda: conv_model(17), "Gemm")])
def test_a_model_with_nothing_to_protect_is_an_error(make: Callable[[], onnx.ModelProto], ops: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    model = write(make(), tmp_path / "model.onnx")
    assert_user_error(["transform", str(model), str(tmp_path / "out.onnx"), "--ops", ops, "--no-verify"], tmp_path,
                      capsys, f"no weight of {ops.replace(',', ', ')} was found to protect: nothing written")


def _weight_also_an_input() -> onnx.ModelProto:
    model = conv_model(17)
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 3, 3]))
    return model


def _weight_of_no_format() -> onnx.ModelProto:
    model = conv_model(17)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((2, 3, 3, 3), np.uint16), "w"))
    return model


def _two_weights_of_no_format() -> onnx.ModelProto:
    model = _weight_of_no_format()
    model.graph.node.append(helper.make_node("Conv", ["y", "v"], ["z"], pads=[1, 1, 1, 1]))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 2, 3, 3), np.uint16), "v"))
    model.graph.output[0].name = "z"
    return model


@pytest.mark.parametrize(("make", "why"), [
    (_weight_also_an_input, "(weight 'w' left unprotected: it is also a graph input, which may override it)"),
    (_weight_of_no_format, "(weight 'w' left unprotected: its type UINT16 has no weight format)"),
    (_two_weights_of_no_format, "(weight 'w' left unprotected: its type UINT16 has no weight format; 1 more)"),
])
def test_nothing_to_protect_says_why_in_its_one_line(make: Callable[[], onnx.ModelProto], why: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """The weights skipped are named in the error, not warned of on lines of their own before it."""
    model = write(make(), tmp_path / "model.onnx")
    assert_user_error(["transform", str(model), str(tmp_path / "out.onnx"), "--ops", "Conv", "--no-verify"],
                      tmp_path, capsys, f"no weight of Conv was found to protect {why}: nothing written")


def test_the_api_refuses_a_model_with_nothing_to_protect() -> None:
    model = conv_model(17)
    with pytest.raises(oppass.OppassError, match="--allow-unprotected"):
        protect.transform(model, ops=["Gemm"])
    assert len(model.graph.initializer) == 1 and model.graph.initializer[0].name == "w"


def test_allow_unprotected_writes_the_model_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = write(empty_graph_model(), tmp_path / "empty_graph.onnx")
    assert cli.main(["transform", str(model), str(tmp_path / "out.onnx"), "--no-verify", "--allow-unprotected"]) == 0
    assert "oppass: warning: no weight of Conv, Gemm was found to protect: the model is written unprotected" in \
        capsys.readouterr().err
    assert not protected_models.inspect(tmp_path / "out.onnx")
    with pytest.warns(UserWarning, match="written unprotected"):
        unprotected = protect.transform(conv_model(17), ops=["Gemm"], allow_unprotected=True)
    assert not protected_models.inspect(unprotected)


@pytest.mark.parametrize(("name", "make"), [
    ("opset 7", lambda: conv_model(7)),
    ("opset 11", lambda: conv_model(11)),
    ("opset 21", lambda: conv_model(21)),
    ("21 weights: not a multiple of the word", lambda: conv_model(17, (7, 3, 1, 1))),
    ("conv inside a Loop body", loop_model),
])
@pytest.mark.parametrize("word", ["64", "256"])
@pytest.mark.parametrize("check", ["runtime", "load"])
def test_unusual_models_protect_correctly(name: str, make: Callable[[], onnx.ModelProto], word: str, check: str,
                                         tmp_path: Path) -> None:
    model = make()
    source = write(model, tmp_path / "model.onnx")
    destination = tmp_path / "protected.onnx"
    assert cli.main(["transform", str(source), str(destination), "--word", word, "--check", check,
                     "--no-verify"]) == 0
    protected = onnx.load(destination)
    onnx.checker.check_model(protected, full_check=True)
    names = tuple(t.name for t in protected_models.inspect(protected))
    assert names
    reference = adjusted_reference(model, names, "keep", word, "word-lsb")
    x = np.random.default_rng(0).standard_normal([1, *INPUT_SHAPE[1:]]).astype(np.float32)
    expected = ort.InferenceSession(reference.SerializeToString(), plain_options(False)).run(None, {"x": x})
    actual = ort.InferenceSession(protected.SerializeToString(), plain_options(True)).run(None, {"x": x})
    assert [a.tobytes() for a in actual] == [e.tobytes() for e in expected]


def test_the_newest_onnx_opset_is_protected_even_when_onnxruntime_cannot_run_it(tmp_path: Path) -> None:
    newest = onnx.defs.onnx_opset_version()
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    model = helper.make_model(
        helper.make_graph([node], "newest", [helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(weights([2, 3, 3, 3], 1), "w")]),
        opset_imports=[helper.make_opsetid("", newest)])
    source = write(model, tmp_path / "newest.onnx")
    assert cli.main(["transform", str(source), str(tmp_path / "out.onnx")]) == 0
    assert protected_models.inspect(tmp_path / "out.onnx")[0].name == "w"


@pytest.mark.parametrize("defer_threshold", [1, 2**20])
def test_a_weight_with_the_wrong_number_of_bytes_is_a_one_line_error(
    defer_threshold: int, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", defer_threshold)  # read from the file, or with the model
    model = conv_model(17)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = write(model, tmp_path / "short.onnx")
    assert_user_error(["transform", str(path), str(tmp_path / "out.onnx"), "--no-verify"], tmp_path, capsys,
                      "has 212 bytes of data, expected 216")


def test_a_model_reached_through_a_symlink_is_read_from_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)  # the weights are read from the file after the model
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    model = conv_model(17)
    target = write(model, tmp_path / "real" / "model.onnx")
    (tmp_path / "links" / "model.onnx").symlink_to(target)
    output = tmp_path / "out.onnx"
    assert cli.main(["transform", str(tmp_path / "links" / "model.onnx"), str(output), "--no-verify"]) == 0
    assert output.read_bytes() == protect.transform(model).SerializeToString()
