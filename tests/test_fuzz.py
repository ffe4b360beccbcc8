"""A short libFuzzer run of the kernel under AddressSanitizer and UndefinedBehaviorSanitizer.

The harness (custom_ops/fuzz/) drives attribute validation and decoding through a fake
OrtApi and checks every accepted input against a reference decoder. CI installs clang and
its runtimes (.ci/run); elsewhere the test is skipped when clang is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "custom_ops" / "fuzz"
SECONDS = 20


@pytest.fixture(scope="module")
def fuzzer() -> Path:
    if shutil.which("clang") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("clang is missing in CI: .ci/run installs clang and libclang-rt-14-dev")
        pytest.skip("clang with libFuzzer is not installed (apt-get install clang libclang-rt-14-dev)")
    built = subprocess.run([str(FUZZ / "build.sh")], capture_output=True, text=True, check=True)
    return Path(built.stdout.strip().splitlines()[-1])


def test_short_fuzz_run_finds_nothing(fuzzer: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", corpus)
    result = subprocess.run(
        [str(fuzzer), f"-max_total_time={SECONDS}", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(corpus)],
        capture_output=True, text=True,
    )
    crashes = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("crash-", "leak-", "timeout-")))
    assert result.returncode == 0 and not crashes, result.stderr[-3000:]
    executed = next(line for line in result.stderr.splitlines() if line.startswith("stat::number_of_executed_units"))
    assert int(executed.split(":")[-1]) > 0
