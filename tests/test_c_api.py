"""A protected model through onnxruntime's C API (custom_ops/examples/run_protected_model.c), no Python involved.

The program is compiled with the C compiler against the onnxruntime header the kernel's CMake
build fetches, and opens the wheel's libonnxruntime. It runs a runtime-mode model (the
ParityCheckUnpack library registered) and a portable load-mode model (no library), each
clean and with one stored bit flipped, and its outputs are compared bit for bit with
onnxruntime's Python API on the reference weights (the flipped word zeroed).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO_ROOT, cnn

from oppass import protect, protected_models, schema

PROGRAM = REPO_ROOT / "custom_ops" / "examples" / "run_protected_model.c"
BUILD = REPO_ROOT / "build" / "pytest-c-api"


@pytest.fixture(scope="module")
def program() -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("no C compiler (cc or gcc) on PATH")
    subprocess.run(["cmake", "-S", str(REPO_ROOT / "custom_ops"), "-B", str(BUILD)], check=True, capture_output=True)
    include = (BUILD / "ort_include_dir.txt").read_text()
    binary = BUILD / "run_protected_model"
    subprocess.run([compiler, "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-I", include,
                    str(PROGRAM), "-o", str(binary), "-ldl"], check=True, capture_output=True)
    return binary


def libonnxruntime() -> Path:
    found = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so*"))
    assert found, "the onnxruntime wheel has no libonnxruntime.so"
    return found[0]


def run_c(program: Path, library: str, model: Path, x: np.ndarray, folder: Path) -> tuple[np.ndarray, int]:
    (folder / "x.f32").write_bytes(x.astype("<f4").tobytes())
    result = subprocess.run([str(program), str(libonnxruntime()), library, str(model), str(folder / "x.f32"),
                             str(folder / "y.f32")], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    masked = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("masked_words ")]
    return np.frombuffer((folder / "y.f32").read_bytes(), "<f4"), masked[0]


@pytest.mark.parametrize("check", ["runtime", "load"])
def test_the_c_api_runs_a_protected_model_and_masks_a_flipped_word(
    check: str, program: Path, custom_op_library: str, tmp_path: Path
) -> None:
    protected = protect.transform(cnn(), check=check, report_faults=True)
    packed = next(t for t in protected.graph.initializer if t.name == protect.packed_name("conv2.w"))
    word = 3
    faulty = onnx.ModelProto()
    faulty.CopyFrom(protected)
    faulty_packed = next(t for t in faulty.graph.initializer if t.name == packed.name)
    raw = bytearray(packed.raw_data)
    raw[word * 8 + 2] ^= 0x10  # a bit of 64-bit word 3
    faulty_packed.raw_data = bytes(raw)
    x = np.random.default_rng(5).standard_normal([1, 3, 6, 6]).astype(np.float32)
    library = custom_op_library if check == "runtime" else "-"

    reference = protected_models.strip(protected)
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(reference)
    conv2 = next(t for t in zeroed.graph.initializer if t.name == "conv2.w")
    values = onnx.numpy_helper.to_array(conv2).copy()
    values.reshape(-1)[word * 2:(word + 1) * 2] = 0  # two fp32 weights per 64-bit word
    conv2.CopyFrom(onnx.numpy_helper.from_array(values, "conv2.w"))

    for label, model, expected_model, expected_masked in (("clean", protected, reference, 0),
                                                          ("faulty", faulty, zeroed, 1)):
        path = tmp_path / f"{label}.onnx"
        onnx.save_model(model, path)
        y, masked = run_c(program, library, path, x, tmp_path)
        assert masked == expected_masked, label
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        expected = ort.InferenceSession(expected_model.SerializeToString(), options).run(["y"], {"x": x})[0]
        np.testing.assert_allclose(y, expected.reshape(-1), rtol=1e-5, atol=1e-6, err_msg=label)
    clean_y, _ = run_c(program, library, tmp_path / "clean.onnx", x, tmp_path)
    assert not np.array_equal(clean_y, y)
    assert schema.MASKED_WORDS_OUTPUT in {o.name for o in protected.graph.output}


def test_the_program_reports_a_missing_model_in_one_line(program: Path, tmp_path: Path) -> None:
    result = subprocess.run([str(program), str(libonnxruntime()), "-", str(tmp_path / "none.onnx"),
                             str(tmp_path / "x.f32"), str(tmp_path / "y.f32")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 1 and result.stderr.startswith("run_protected_model: CreateSession: ")
    assert result.stderr.count("\n") == 1
