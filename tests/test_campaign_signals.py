"""`oppass campaign` under a pipe and a signal: progress lines, and SIGINT/SIGTERM ending with one line, exit status
130/143 and a store that the same command resumes, in serial and Dask runs."""

from __future__ import annotations

import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oppass.campaign.progress import Progress
from oppass.campaign.store import STORE_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx"
RESUME_LINE = r"interrupted: (\d+) of (\d+) trials stored; run the same command to resume"


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library


def campaign_command(out: Path, scheduler: str = "serial", *extra: str) -> list[str]:
    """A campaign of 2 x 2 x 28 x 4 = 448 trials on the digits CNN."""
    return [sys.executable, "-m", "oppass.cli", "campaign", str(DIGITS_MODEL), "--data", "digits", "--out", str(out),
            "--formats", "fp32,bf16", "--op", "none,64", "--ber", "1e-5:1e-2", "--exps", "4", "--batch", "100",
            "--scheduler", scheduler, *extra]


def test_progress_lines_show_done_total_rate_eta_and_what_was_stored_before() -> None:
    stream = io.StringIO()
    progress = Progress(1200, 300, stream, interval=3600)
    progress.advance(120)
    progress.tick()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "campaign: 1200 trials, 300 already stored, 900 to run"
    assert lines[1].startswith("campaign: 420/1200 trials (300 before this run)  ") and "/s  ETA " in lines[1]
    assert len(lines) == 3 and lines[2].startswith("campaign: 420/1200 trials")


def test_progress_draws_lines_on_its_own_while_trials_run() -> None:
    stream = io.StringIO()
    progress = Progress(10, 0, stream, interval=0.01)
    deadline = time.monotonic() + 30
    while len(stream.getvalue().splitlines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    progress.close()
    assert len(stream.getvalue().splitlines()) >= 4  # the first line, two ticks, the last line


def test_a_pipe_shows_progress(tmp_path: Path) -> None:
    result = subprocess.run(campaign_command(tmp_path / "out", "serial", "--exps", "1"), capture_output=True,
                            text=True, cwd=REPO_ROOT, check=True)
    lines = result.stderr.splitlines()
    assert lines[0] == "campaign: 112 trials, 112 to run"
    assert lines[-1].startswith("campaign: 112/112 trials  ") and "ETA 0:00:00" in lines[-1]
    again = subprocess.run(campaign_command(tmp_path / "out", "serial", "--exps", "2"), capture_output=True,
                           text=True, cwd=REPO_ROOT, check=True)
    assert again.stderr.splitlines()[0] == "campaign: 224 trials, 112 already stored, 112 to run"


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_in_a_serial_run_ends_with_one_line_and_the_same_command_resumes(
        tmp_path: Path, signum: int, status: int) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(campaign_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO_ROOT)
    _wait_for_rows(out / STORE_FILE, 40, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    _assert_one_interrupt_line(stderr, process.returncode, status, out)
    resumed = subprocess.run(campaign_command(out), capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert "448/448 trials" in resumed.stderr and _row_count(out / STORE_FILE) == 448


@pytest.mark.slow
def test_ctrl_c_in_a_dask_run_ends_with_one_line_and_the_same_command_resumes(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group: the client and its workers."""
    out = tmp_path / "out"
    command = campaign_command(out, "local", "--workers", "2")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               start_new_session=True)
    _wait_for_rows(out / STORE_FILE, 40, process, seconds=180)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=180)
    _assert_one_interrupt_line(stderr, process.returncode, 130, out)
    resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert "448/448 trials" in resumed.stderr and _row_count(out / STORE_FILE) == 448


def _assert_one_interrupt_line(stderr: str, returncode: int, status: int, out: Path) -> None:
    import re

    lines = [line for line in stderr.splitlines() if not line.startswith("campaign: ")]
    assert returncode == status, stderr
    assert len(lines) == 1, stderr
    match = re.fullmatch(RESUME_LINE, lines[0])
    assert match, stderr
    stored, total = int(match[1]), int(match[2])
    assert total == 448 and 40 <= stored < total and stored == _row_count(out / STORE_FILE)


def _row_count(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        connection.close()


def _wait_for_rows(path: Path, rows: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and _row_count(path) >= rows:
            return
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"the campaign stored no {rows} trials in time: {process.communicate()[1]}")


def _wait_until_mapped(pid: int, library: str) -> None:
    """Waits until process `pid` has mapped a file whose name holds `library` (it is importing that module)."""
    deadline = time.monotonic() + 60
    while library not in Path(f"/proc/{pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.001)


# A command whose work is interrupted inside an `exec` of a string, as a Ctrl-C can land while a dataclass or
# namedtuple makes its methods during an import: the KeyboardInterrupt leaves that exec, then oppass catches it.
EXEC_INTERRUPTED = """import sys
from oppass import cli, modelio
from oppass.campaign import runner


def interrupted(*arguments, **options):
    exec("raise KeyboardInterrupt", {})


runner.run_campaign = modelio.read_model = interrupted
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("command", "line"), [
    (["inspect", "model.onnx"], "oppass: error: stopped by SIGINT (no partly written file is left)"),
    (["campaign", str(DIGITS_MODEL), "--data", "digits", "--out", "out", "--scheduler", "serial"],
     "interrupted before any trial ran"),
])
@pytest.mark.parametrize("entry", ["-m", "-c"])  # runpy's `-m` is where CPython acts on the note at exit
def test_an_interrupt_caught_after_it_left_an_exec_still_exits_130(tmp_path: Path, command: list[str], line: str,
                                                                  entry: str) -> None:
    """CPython notes a KeyboardInterrupt that leaves an `exec` of a string and, at exit, ends the process by
    SIGINT (-2) instead of with its status, even when the interrupt was caught: oppass clears that note where it
    catches one, so the status is 130 and the line its own."""
    if entry == "-m":
        (tmp_path / "interrupted_command.py").write_text(EXEC_INTERRUPTED)
        runs = [sys.executable, "-m", "interrupted_command"]
    else:
        runs = [sys.executable, "-c", EXEC_INTERRUPTED]
    result = subprocess.run([*runs, *command], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 130, result
    assert result.stderr.splitlines() == [line]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, 0.6, 1.0, 1.5])
def test_ctrl_c_while_the_command_starts_ends_with_one_line(tmp_path: Path, delay: float) -> None:
    """A Ctrl-C while oppass loads (numpy, onnx and onnxruntime: about a second, where an interrupt inside a C
    extension's import becomes its ImportError) ends like one later: 130, one line. Timed from numpy's
    extension being mapped: oppass's own code is running (before it, the interpreter starting is not ours)."""
    command = [sys.executable, "-m", "oppass", *campaign_command(tmp_path / "out")[3:]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    _wait_until_mapped(process.pid, "_multiarray_umath")
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    said = [line for line in stderr.splitlines() if not line.startswith("campaign: ")]
    # One CI run (of about 80) once ended killed by SIGINT (-2) right after its line "interrupted before any trial
    # ran": the interrupt had left an exec of a string (test_an_interrupt_caught_after_it_left_an_exec_...).
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(said) == 1 and (said[0] in ("oppass: error: stopped by SIGINT while starting (nothing was written)",
                                           "oppass: error: stopped by SIGINT (no partly written file is left)",
                                           "interrupted before any trial ran")
                               or re.fullmatch(RESUME_LINE, said[0])), stderr
