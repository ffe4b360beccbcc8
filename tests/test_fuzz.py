"""Short libFuzzer runs of the kernel and of the decoder under AddressSanitizer and UndefinedBehaviorSanitizer.

The targets (custom_ops/fuzz/): fuzz_parity_check_unpack drives shape inference, attribute validation
and decoding through a fake OrtApi, against the rules and a reference decoder; fuzz_decoder drives
the onnxruntime-free decoder alone with random plans, streams and word ranges. exhaustive_secded
decodes every single and double flip of SEC-DED words in every format and word size where the code
fits, against the same reference. CI installs clang and
its runtimes (.ci/run); elsewhere the tests are skipped when clang is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "custom_ops" / "fuzz"
CPU_INFO = Path("/proc/cpuinfo")
# The CPU runs the decoder's one-pass SEC-DED decode (custom_ops/secded_avx512.c).
ONE_PASS_CPU = CPU_INFO.is_file() and {"avx512f", "avx512bw", "avx512vl", "avx512vbmi", "gfni"} <= set(
    CPU_INFO.read_text().split())
TARGETS = ("parity_check_unpack", "decoder")
SECONDS = 10  # per target


@pytest.fixture(scope="module")
def fuzzers() -> dict[str, Path]:
    if shutil.which("clang") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("clang is missing in CI: .ci/run installs clang and libclang-rt-14-dev")
        pytest.skip("clang with libFuzzer is not installed (apt-get install clang libclang-rt-14-dev)")
    built = subprocess.run([str(FUZZ / "build.sh")], capture_output=True, text=True, check=True)
    paths = [Path(line) for line in built.stdout.strip().splitlines()[-len(TARGETS) - 1:]]
    return {path.name.removeprefix("fuzz_"): path for path in paths}


@pytest.mark.slow
def test_every_single_flip_corrected_and_double_masked(fuzzers: dict[str, Path]) -> None:
    result = subprocess.run([str(fuzzers["exhaustive_secded"])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every single flip corrected, every double masked" in result.stdout
    one_pass = re.search(r"\((\d+) through the one-pass AVX-512 decode\)", result.stdout)
    assert one_pass is not None and (int(one_pass.group(1)) > 0) == ONE_PASS_CPU


# libFuzzer's memory limit reads the process's peak RSS, which Linux carries over from the parent when a
# forked child execs: a fuzzer started straight from a pytest process that once held 2.5 GB is "out of
# memory" before its first input. Started by a shell that forks it (the `exit` keeps the shell from
# exec-ing it), it counts its own memory only.
FRESH_RSS = ["/bin/sh", "-c", '"$0" "$@"; exit $?']


@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz_run_finds_nothing(target: str, fuzzers: dict[str, Path], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)
    arguments = [str(fuzzers[target]), f"-max_total_time={SECONDS}", f"-artifact_prefix={tmp_path}/",
                 "-print_final_stats=1", str(corpus)]
    result = subprocess.run([*FRESH_RSS, *arguments], capture_output=True, text=True)
    crashes = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("crash-", "leak-", "timeout-")))
    assert result.returncode == 0 and not crashes, result.stderr[-3000:]
    executed = next(line for line in result.stderr.splitlines() if line.startswith("stat::number_of_executed_units"))
    assert int(executed.split(":")[-1]) > 0
