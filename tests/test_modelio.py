"""Model files (oppass.modelio): deferred tensors as standard external data, and the external-data checks.

The reader leaves the bytes of large weights in the model file as ONNX external data
pointing into that file, so the deferred skeleton must be a model other tools read from
the model's folder; external data is opened with onnx's own checks, whose refusals the
command line reports in one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import cnn
from onnx import external_data_helper, numpy_helper

from oppass import cli, modelio, protect
from oppass.errors import OppassError


@pytest.fixture
def defer_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every main-graph initializer with raw data is deferred (the test models' weights are small)."""
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", 1)


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def assert_same_weights(model: onnx.ModelProto, expected: onnx.ModelProto) -> None:
    """Same initializers, in the same order, with the same values (onnx's loader sets data_location, we clear it)."""
    actual, wanted = arrays(model), arrays(expected)
    assert list(actual) == list(wanted)
    for name, values in actual.items():
        np.testing.assert_array_equal(values, wanted[name])


def locations(path: Path) -> set[str]:
    """The external-data locations a model file names."""
    model = onnx.load_model(path, load_external_data=False)
    return {entry.value for tensor in modelio.all_tensors(model) for entry in tensor.external_data
            if entry.key == "location"}


# ----------------------------------------------------------------------------- the deferred skeleton


@pytest.mark.usefixtures("defer_everything")
def test_a_deferred_skeleton_is_a_model_onnx_and_onnxruntime_read_from_the_model_folder(tmp_path: Path) -> None:
    model = cnn()
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path)
    source = modelio.read_model(path, defer=True)
    deferred = [t for t in source.model.graph.initializer if external_data_helper.uses_external_data(t)]
    assert len(deferred) == len(model.graph.initializer)
    assert {external_data_helper.ExternalDataInfo(t).location for t in deferred} == {"model.onnx"}
    assert source.data_files == ()

    skeleton = tmp_path / "skeleton.onnx"  # beside the model, so its references resolve to model.onnx
    skeleton.write_bytes(source.model.SerializeToString())
    assert skeleton.stat().st_size < path.stat().st_size // 2
    onnx.checker.check_model(str(skeleton), full_check=True)  # the path form checks external data locations
    assert_same_weights(onnx.load_model(skeleton), model)
    loaded = onnx.ModelProto()
    loaded.CopyFrom(source.model)
    external_data_helper.load_external_data_for_model(loaded, str(tmp_path))
    assert_same_weights(loaded, model)

    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    actual = ort.InferenceSession(str(skeleton), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(actual[0], expected[0])


@pytest.mark.usefixtures("defer_everything")
def test_a_deferred_model_saved_under_its_own_name_elsewhere_holds_its_bytes(tmp_path: Path) -> None:
    """A deferred tensor names the input file; the output, though named alike, must never name itself."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    model = cnn()
    path = tmp_path / "in" / "model.onnx"
    onnx.save_model(model, path)
    source = modelio.read_model(path, defer=True)
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(OppassError, match="deferred tensors"):  # without the input to copy from
        modelio.save_model(source.model, output)
    assert not output.exists()
    modelio.save_model(source.model, output, source=source)
    assert locations(output) == set()
    assert output.read_bytes() == model.SerializeToString()
    modelio.save_model(protect.transform(source), tmp_path / "out" / "protected.onnx", source=source)
    assert locations(tmp_path / "out" / "protected.onnx") == set()
    assert modelio.load_model(tmp_path / "out" / "protected.onnx").SerializeToString() == \
        protect.transform(model).SerializeToString()


def self_referencing_model(path: Path) -> onnx.ModelProto:
    """Saves at `path` a cnn whose tensor `copy` is external data in the model file itself: conv1.w's bytes.

    Returns the model as onnx loads it.
    """
    model = cnn()
    original = model.graph.initializer[0]
    copy = model.graph.initializer.add()
    copy.name, copy.data_type = "copy", original.data_type
    copy.dims.extend(original.dims)
    placeholder = "0" * 10  # a fixed width, so that filling in the offset moves no byte
    entries = {"location": path.name, "offset": placeholder, "length": str(len(original.raw_data))}
    modelio.fields.point_to(copy, entries)
    offset = model.SerializeToString().index(original.raw_data)
    next(entry for entry in copy.external_data if entry.key == "offset").value = f"{offset:010d}"
    path.write_bytes(model.SerializeToString())
    return onnx.load_model(path)


@pytest.mark.parametrize("defer_threshold", [1, 2**20])
def test_a_model_that_names_its_own_file_as_external_data_is_read_as_onnx_reads_it(
    defer_threshold: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its reference is the file's own, not one the reader made: checked as any data file, kept as a data file."""
    monkeypatch.setattr(modelio.reader, "DEFER_THRESHOLD", defer_threshold)
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 256)
    path = tmp_path / "model.onnx"
    expected = self_referencing_model(path)
    source = modelio.read_model(path)
    assert source.data_files == (path.resolve(),)
    assert_same_weights(source.model, expected)
    deferred = modelio.read_model(path, defer=True)
    copy = next(t for t in deferred.model.graph.initializer if t.name == "copy")
    assert deferred.tensor_bytes(copy) == expected.graph.initializer[0].raw_data
    output = tmp_path / "out.onnx"
    modelio.save_model(deferred.model, output, source=deferred)  # a data file in: a data file out
    assert locations(output) == {"out.onnx.data"}
    assert_same_weights(modelio.load_model(output), expected)


def test_a_model_that_names_its_own_file_through_a_symlink_is_refused(tmp_path: Path) -> None:
    """The reader's own references to the file it read are not checked; the file's own claims are."""
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    self_referencing_model(tmp_path / "real" / "model.onnx")
    (tmp_path / "links" / "model.onnx").symlink_to(tmp_path / "real" / "model.onnx")
    with pytest.raises(OppassError, match="symbolic link"):
        modelio.read_model(tmp_path / "links" / "model.onnx")


@pytest.mark.usefixtures("defer_everything")
def test_a_data_file_named_like_the_model_in_a_subfolder_is_a_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelio.writer, "EXTERNAL_THRESHOLD", 256)
    (tmp_path / "weights").mkdir()
    path = tmp_path / "model.onnx"
    onnx.save_model(cnn(), path, save_as_external_data=True, location="weights/model.onnx", size_threshold=0)
    source = modelio.read_model(path, defer=True)
    assert source.data_files == (tmp_path / "weights" / "model.onnx",)
    output = tmp_path / "out.onnx"
    assert cli.main(["transform", str(path), str(output), "--no-verify"]) == 0
    assert locations(output) == {"out.onnx.data"}
    assert modelio.load_model(output).SerializeToString() == protect.transform(cnn()).SerializeToString()


# ----------------------------------------------------------------------------- unsafe external data


def tamper(**entries: str) -> Callable[[Path, Path], None]:
    """Sets external-data entries of the model's first tensor."""
    def apply(model_path: Path, outside: Path) -> None:
        model = onnx.load_model(model_path, load_external_data=False)
        tensor = model.graph.initializer[0]
        for key, value in entries.items():
            value = value.format(outside=outside)
            entry = next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add()
            entry.key, entry.value = key, value
        model_path.write_bytes(model.SerializeToString())
    return apply


def link(kind: str, name: str, target: str) -> Callable[[Path, Path], None]:
    """Makes `name` in the model folder a symlink or hard link to `target` (relative to the folder), and uses it."""
    def apply(model_path: Path, outside: Path) -> None:
        source = (model_path.parent / target.format(outside=outside)).resolve()
        (os.symlink if kind == "symlink" else os.link)(source, model_path.parent / name)
        tamper(location=name)(model_path, outside)
    return apply


def truncate(model_path: Path, outside: Path) -> None:
    data = model_path.parent / "cnn.onnx.data"
    data.write_bytes(data.read_bytes()[:100])


UNSAFE_CASES = {  # case: (what is done to the model, what the one line says)
    "parent folder": (tamper(location="../outside.data"), "points outside the directory"),
    "absolute path": (tamper(location="{outside}"), "it is an absolute path"),
    "symlink out of the folder": (link("symlink", "link.data", "{outside}"), "it is a symbolic link"),
    "symlink inside the folder": (link("symlink", "link.data", "cnn.onnx.data"), "it is a symbolic link"),
    "hard link to a file outside": (link("hard link", "hard.data", "{outside}"), "multiple hard links"),
    "missing file": (tamper(location="missing.data"), "it is not regular file"),
    "folder": (tamper(location="."), "it is not regular file"),
    "truncated file": (truncate, "is too short for tensor 'conv1.w' (truncated?)"),
    "offset past the end": (tamper(offset="1000000"), "is too short for tensor 'conv1.w' (truncated?)"),
    "length past the end": (tamper(length="1000000"), "is too short for tensor 'conv1.w' (truncated?)"),
    "negative offset": (tamper(offset="-1"), "offset must be non-negative"),
    "NUL in location": (tamper(location="cnn.onnx.data\0../outside.data"), "has an invalid location"),
    "over-long location": (tamper(location="a" * 5000), "File name too long"),
}


@pytest.mark.parametrize("command", ["inspect", "transform"])
@pytest.mark.parametrize("case", UNSAFE_CASES)
def test_unsafe_external_data_is_a_one_line_error(
    case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    model_path = folder / "cnn.onnx"
    onnx.save_model(cnn(), model_path, save_as_external_data=True, location="cnn.onnx.data", size_threshold=0)
    outside = tmp_path / "outside.data"
    outside.write_bytes((folder / "cnn.onnx.data").read_bytes())  # readable bytes of the right size
    damage, message = UNSAFE_CASES[case]
    damage(model_path, outside)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    arguments = [command, str(model_path)] + ([str(tmp_path / "out.onnx"), "--no-verify"] if command == "transform"
                                              else [])
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("oppass: error: ") and error.count("\n") == 1, error
    assert message in error
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
