"""Inputs that used to end in a traceback end in one line and a non-zero exit (issue 14.9-14.14).

Table-driven: model contents onnx's checker accepts (names and strings of any bytes, unknown
data types, weights in typed fields, segments), a negative seed, every campaign data problem
(empty, 0-d, object, string and complex arrays, non-integer or out-of-range labels, files that
are no .npz, damaged images, a damaged store) and campaign exports on a full disk.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cnn
from onnx import TensorProto, numpy_helper
from test_file_safety import FullDisk, PatchedOs, snapshot

from oppass import cli, files, modelio, protect
from oppass.campaign import CampaignConfig, run_campaign
from oppass.campaign.data import ModelInput, open_dataset
from oppass.campaign.store import STORE_FILE
from oppass.errors import OppassError

DIGITS_MODEL = Path(__file__).resolve().parent.parent / "oppass" / "examples" / "digits_cnn.onnx"


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library


def run(arguments: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    status = cli.main(arguments)
    return status, capsys.readouterr().err


def assert_one_line(status: int, error: str, message: str = "") -> None:
    assert status == 2, error
    assert error.startswith("oppass: error: ") and error.count("\n") == 1 and message in error, error


# ----------------------------------------------------------------------------- odd model contents


def any_bytes_name(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].MergeFromString(b"\x42\x04\xff\xfe\n\x00")  # field 8 (name): not UTF-8


def any_bytes_doc_string(model: onnx.ModelProto) -> None:
    model.MergeFromString(b"\x32\x03\xff\x00\x80")  # field 6 (doc_string)


def any_bytes_graph_name(model: onnx.ModelProto) -> None:
    model.graph.MergeFromString(b"\x12\x02\xc3\x28")  # field 2 (name)


def unknown_data_type(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].data_type = 99


def typed_field(values_missing: int) -> Callable[[onnx.ModelProto], None]:
    def apply(model: onnx.ModelProto) -> None:
        tensor = model.graph.initializer[0]
        values = numpy_helper.to_array(tensor).ravel()
        tensor.ClearField("raw_data")
        tensor.float_data.extend(values[:len(values) - values_missing].tolist())
    return apply


def segment(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].segment.begin = 0
    model.graph.initializer[0].segment.end = 3


def string_weight(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_type = TensorProto.STRING
    tensor.string_data.extend([b"\xff"] * int(np.prod(tensor.dims)))


ODD_CONTENTS = {
    "tensor name of any bytes": any_bytes_name,
    "doc string of any bytes": any_bytes_doc_string,
    "graph name of any bytes": any_bytes_graph_name,
    "unknown data type": unknown_data_type,
    "weights in a typed field": typed_field(0),
    "typed field one value short": typed_field(1),
    "typed field empty": typed_field(108),
    "segment": segment,
    "string weights": string_weight,
}


@pytest.mark.parametrize("protected", [False, True])
@pytest.mark.parametrize("command", ["transform", "inspect", "strip", "inject"])
@pytest.mark.parametrize("case", ODD_CONTENTS)
def test_odd_contents_are_handled_or_refused_in_one_line(case: str, command: str, protected: bool, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    model = protect.transform(cnn()) if protected else cnn()
    ODD_CONTENTS[case](model)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    output = tmp_path / "out.onnx"
    arguments = {"transform": ["transform", str(path), str(output)], "inspect": ["inspect", str(path)],
                 "strip": ["strip", str(path), str(output)],
                 "inject": ["inject", str(path), str(output), "--ber", "0.01", "--seed", "3"]}[command]
    before = snapshot(tmp_path)
    status, error = run(arguments, capsys)
    if status == 0:
        assert all(line.startswith("oppass: warning: ") for line in error.splitlines()), error
        if command != "inspect":
            modelio.load_model(output)
    else:
        assert_one_line(status, error)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("seed", ["-1", "-9223372036854775808"])
def test_a_negative_seed_is_a_one_line_error(seed: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "p.onnx"
    modelio.save_model(protect.transform(cnn()), path)
    status, error = run(["inject", str(path), str(tmp_path / "o.onnx"), "--ber", "0.1", "--seed", seed], capsys)
    assert_one_line(status, error, "the seed must be a non-negative integer")
    assert not (tmp_path / "o.onnx").exists()


# ----------------------------------------------------------------------------- campaign data


def campaign_arguments(data: str, out: Path, *extra: str) -> list[str]:
    return ["campaign", str(DIGITS_MODEL), "--data", data, "--out", str(out), "--exps", "1", "--ber", "1e-3:1e-3",
            "--points-per-decade", "1", "--formats", "fp32", "--op", "none", "--scheduler", "serial", *extra]


def npz(**arrays: np.ndarray) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "data.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return path
    return make


def raw_file(contents: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "data.npz"
        path.write_bytes(contents)
        return path
    return make


def damaged_images(folder: Path) -> Path:
    (folder / "images" / "seven").mkdir(parents=True)
    (folder / "images" / "seven" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    return folder / "images"


DIGITS_INPUTS = np.zeros((4, 1, 8, 8), np.float32)
DATA_PROBLEMS = {
    "empty inputs": (npz(inputs=np.zeros((0, 1, 8, 8), np.float32)), "holds no samples"),
    "0-d inputs": (npz(inputs=np.float32(1)), "holds no samples"),
    "object inputs": (npz(inputs=np.array([None, 1], dtype=object)), "Object arrays cannot be loaded"),
    "string inputs": (npz(inputs=np.array(["a", "b"])), "cannot take the data's <U1 array: store it as float32"),
    "complex inputs": (npz(inputs=DIGITS_INPUTS.astype(np.complex64)), "cannot take the data's complex64 array"),
    "no inputs": (npz(images=DIGITS_INPUTS), "has no array for the model input 'image': it holds images"),
    "inputs of the wrong shape": (npz(inputs=np.zeros((4, 3, 5, 5), np.float32)), "does not fit the data"),
    "float labels": (npz(inputs=DIGITS_INPUTS, labels=np.array([0.5, 1, 2, 3])), "must be integers with one entry"),
    "too few labels": (npz(inputs=DIGITS_INPUTS, labels=np.array([0, 1])), "has no sample axis of 2"),
    "negative label": (npz(inputs=DIGITS_INPUTS, labels=np.array([0, 1, -1, 3])), "class indices (>= 0)"),
    "label beyond the classes": (npz(inputs=DIGITS_INPUTS, labels=np.array([0, 1, 10, 3])), "has 10 classes"),
    "not a zip": (raw_file(b"not a zip"), "not a zip archive"),
    "a truncated npz": (lambda folder: raw_file(npz(inputs=DIGITS_INPUTS)(folder).read_bytes()[:200])(folder),
                        "not a zip archive"),
    "images for a one-channel model": (damaged_images, "an image folder feeds [N, 3, H, W]"),
}


@pytest.mark.parametrize("case", DATA_PROBLEMS)
def test_campaign_data_problems_are_one_line_errors(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make, message = DATA_PROBLEMS[case]
    data = make(tmp_path)
    status, error = run(campaign_arguments(str(data), tmp_path / "out"), capsys)
    assert_one_line(status, error, message)
    assert not (tmp_path / "out").exists()


def test_a_damaged_image_is_a_one_line_error(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    image_input = ModelInput("image", np.dtype(np.float32), (None, 3, 8, 8))
    with pytest.raises(OppassError, match="1.png cannot be read .*: remove or replace it"):
        open_dataset(str(damaged_images(tmp_path)), [image_input]).feeds(np.arange(1))


@pytest.mark.parametrize("damage", [b"", b"garbage" * 100, b"SQLite format 3\0" + b"\xff" * 2000])
def test_a_damaged_store_says_so_and_how_to_start_over(damage: bytes, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / STORE_FILE).write_bytes(damage)
    if not damage:  # an empty file is a valid empty database: give it a table of another shape
        with sqlite3.connect(out / STORE_FILE) as connection:
            connection.execute("CREATE TABLE trials (x)")
            connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            connection.execute("INSERT INTO meta VALUES ('identity', 'not json')")
        damage = (out / STORE_FILE).read_bytes()
    status, error = run(campaign_arguments("digits", out), capsys)
    assert_one_line(status, error, "is damaged")
    assert "delete it to start the campaign over" in error
    assert (out / STORE_FILE).read_bytes() == damage


def test_a_negative_campaign_seed_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "oppass.cli", *campaign_arguments("digits", tmp_path / "out",
                                                                                     "--seed", "-1")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == "oppass: error: --seed must be a non-negative integer, got -1\n"
    assert not (tmp_path / "out").exists()


def test_campaign_exports_on_a_full_disk_leave_the_previous_ones(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = CampaignConfig(model=DIGITS_MODEL, data="digits", out=tmp_path / "out", formats=("fp32",),
                            protections=("none",), ber_min=1e-3, ber_max=1e-3, points_per_decade=1, experiments=1,
                            batch_size=20, metric="top1", scheduler="serial")
    run_campaign(config)
    exports = {name: data for name, data in snapshot(config.out).items() if not name.startswith(STORE_FILE)}
    assert {"trials.csv", "table2.md", "report.html"} <= set(exports) and any(n.endswith(".png") for n in exports)
    for free in (0, 100, 5000):
        FullDisk.free[0] = free
        with monkeypatch.context() as patch:
            patch.setattr(files, "os", PatchedOs(fdopen=lambda descriptor, mode, buffering: FullDisk(descriptor, "wb")))
            with pytest.raises(OppassError, match="no space left on device"):
                run_campaign(config)
        after = snapshot(config.out)
        assert {name: after[name] for name in exports} == exports
        assert not [name for name in after if name.endswith(".tmp")]


@pytest.mark.parametrize("which", ["model", "data"])
def test_a_fifo_as_campaign_model_or_data_is_named_not_opened(which: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    fifo = tmp_path / ("model.onnx" if which == "model" else "data.npz")
    os.mkfifo(fifo)
    arguments = campaign_arguments("digits" if which == "model" else str(fifo), tmp_path / "out")
    if which == "model":
        arguments[1] = str(fifo)
    status, error = run(arguments, capsys)
    assert_one_line(status, error, f"{fifo} is a FIFO (named pipe), not a")
    assert not (tmp_path / "out").exists()
