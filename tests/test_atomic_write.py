"""An `oppass transform` killed while it writes leaves no output file, and the input untouched."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import model_zoo
import pytest

pytestmark = [pytest.mark.models, pytest.mark.slow]

WRITES = 3


def transform_command(source: Path, destination: Path) -> list[str]:
    return [sys.executable, "-m", "oppass.cli", "transform", str(source), str(destination), "--no-verify"]


def wait_for_partial_write(folder: Path, destination: Path, process: subprocess.Popen) -> None:
    """Returns once the temporary file next to `destination` holds some bytes (the write is under way)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.stat().st_size > 0 for p in folder.glob(f".{destination.name}.*.tmp")):
            return
        time.sleep(0.001)
    raise AssertionError("the transform never started writing")


def test_transform_killed_mid_write_leaves_no_output_and_the_input_untouched(tmp_path: Path) -> None:
    source = tmp_path / "resnet50.onnx"
    source.write_bytes(model_zoo.paper_cnn("resnet50").read_bytes())
    source_digest = hashlib.sha256(source.read_bytes()).hexdigest()
    for attempt in range(WRITES):
        destination = tmp_path / f"protected{attempt}.onnx"
        process = subprocess.Popen(transform_command(source, destination))
        wait_for_partial_write(tmp_path, destination, process)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        assert not destination.exists(), "a killed write published a partial output"
    completed = tmp_path / "protected.onnx"
    subprocess.run(transform_command(source, completed), check=True, capture_output=True)
    assert completed.stat().st_size > 0
    assert hashlib.sha256(source.read_bytes()).hexdigest() == source_digest
