"""A short run of the command-line mutation fuzzer (tools/mutation_fuzz.py, issue 14).

Every case (a mutated model through transform, inspect, strip or inject, in a child process)
must end with exit status 0 and a model onnx reads, or status 2 and one `oppass: error:` line
with no file created or changed; never a traceback, a signal, a hang or a changed input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).resolve().parents[1] / "tools" / "mutation_fuzz.py"


@pytest.mark.parametrize("seed", [0, 1])
def test_a_short_fuzz_run_finds_no_failure(seed: int, tmp_path: Path, custom_op_library: str) -> None:
    result = subprocess.run([sys.executable, str(FUZZER), "--cases", "60", "--seed", str(seed), "--failures",
                             str(tmp_path / "failures")], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1].endswith(": 0 failed"), result.stdout
    assert not (tmp_path / "failures").exists()
