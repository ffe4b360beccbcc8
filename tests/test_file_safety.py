"""Outputs are published whole or not at all (issue 14.1, 14.3, 14.11, 14.12, 14.14).

A model and its external data are one unit: whatever step of a save fails (a full or read-only
file system at any write, sync or rename), the previous pair is left as it was, with no temporary
file; concurrent writers of one output never publish a model with another writer's data; a
catchable signal at any step removes what was being written and prints one line. Paths that are
not regular files (devices, FIFOs, sockets, folders) are refused as inputs and outputs, saying what
they are; text-format models are read, and refused as outputs by their suffix.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
from conftest import make_model, weights
from onnx import helper

from oppass import cli, files, modelio, protect
from oppass.errors import OppassError

WEIGHT_SHAPE = [16, 3, 3, 3]  # 1,728 bytes: above the writer's external-data threshold


def conv_model(seed: int) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    return make_model([node], {"w": weights(WEIGHT_SHAPE, seed)}, output_shape=["batch", 16, 6, 6])


def external_source(folder: Path, seed: int, protected: bool = False) -> modelio.ModelFile:
    """A model saved with external data in `folder`, read back deferred (so it is saved with external data)."""
    folder.mkdir(exist_ok=True)
    path = folder / f"source{seed}.onnx"
    model = protect.transform(conv_model(seed)) if protected else conv_model(seed)
    onnx.save_model(model, path, save_as_external_data=True, location=f"source{seed}.data", size_threshold=0)
    return modelio.read_model(path, defer=True)


def payload(path: Path) -> dict[str, bytes]:
    """The bytes of each main-graph initializer of the model at `path`."""
    return {t.name: t.raw_data for t in modelio.load_model(path).graph.initializer}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


# ----------------------------------------------------------------------------- forced failures


class PatchedOs:
    """The os module as oppass.files sees it, with some functions replaced."""

    def __init__(self, **replaced: Callable) -> None:
        self.replaced = replaced

    def __getattr__(self, name: str) -> object:
        return self.replaced.get(name) or getattr(os, name)


def counting(name: str, calls: list[str]) -> Callable:
    original = getattr(os, name)

    def count(*arguments: object) -> object:
        calls.append(name)
        return original(*arguments)

    return count


def failing_on_call(name: str, number: int, code: int) -> Callable:
    original, calls = getattr(os, name), [0]

    def fail(*arguments: object) -> object:
        calls[0] += 1
        if calls[0] == number:
            raise OSError(code, os.strerror(code))
        return original(*arguments)

    return fail


def pair(folder: Path, sources: Path) -> tuple[Path, Callable[[], None]]:
    """An output in `folder` with external data (model seed 1), and the save that would replace it (seed 2)."""
    first, second = external_source(sources, 1), external_source(sources, 2)
    folder.mkdir()
    output = folder / "model.onnx"
    modelio.save_model(first.model, output, source=first)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    return output, lambda: modelio.save_model(second.model, output, source=second)


def assert_old_pair_intact(output: Path, before: dict[str, bytes], sources: Path) -> None:
    assert snapshot(output.parent) == before, "a failed save changed the published files or left a temporary one"
    assert payload(output) == payload(sources / "source1.onnx")


SYSTEM_CALLS = ("fsync", "replace", "chmod")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT])
@pytest.mark.parametrize("call", SYSTEM_CALLS)
def test_a_save_failing_at_any_system_call_leaves_the_old_pair(
    call: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "in"
    calls: list[str] = []
    _, dry_run = pair(tmp_path / "count", sources)
    with monkeypatch.context() as patch:
        patch.setattr(files, "os", PatchedOs(**{name: counting(name, calls) for name in SYSTEM_CALLS}))
        dry_run()
    assert calls.count("replace") == 2 and calls.count("fsync") == 3  # data, model, folder
    output, save = pair(tmp_path / "out", sources)
    before = snapshot(output.parent)
    for number in range(1, calls.count(call) + 1):
        with monkeypatch.context() as patch:
            patch.setattr(files, "os", PatchedOs(**{call: failing_on_call(call, number, code)}))
            with pytest.raises(OppassError, match=f"cannot write .*: {os.strerror(code).lower()}"):
                save()
        if call == "fsync" and number == 3:  # the folder's sync, after the renames: the new pair is whole
            assert payload(output) == payload(sources / "source2.onnx")
        else:
            assert_old_pair_intact(output, before, sources)


class FullDisk(io.FileIO):
    """A file on a disk with `free[0]` bytes left (shared by every file of the save); writes past it fail."""

    free = [0]

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        if view.nbytes > self.free[0]:
            super().write(view[:self.free[0]])
            self.free[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free[0] -= view.nbytes
        return super().write(view)


@pytest.mark.parametrize("free", [0, 1, 1000, 1727, 1728, 1729, 1900, 2000, 2200, 100_000])
def test_a_full_disk_at_any_byte_leaves_the_old_pair(free: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tmp_path / "in"
    output, save = pair(tmp_path / "out", sources)
    before = snapshot(output.parent)
    FullDisk.free[0] = free
    monkeypatch.setattr(files, "os", PatchedOs(fdopen=lambda descriptor, mode, buffering: FullDisk(descriptor, "wb")))
    try:
        save()
    except OppassError as error:
        assert "no space left on device" in str(error)
        assert_old_pair_intact(output, before, sources)
    else:  # the whole save fitted: the new pair, whole
        assert sum(path.stat().st_size for path in output.parent.iterdir()) <= free
        assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx", "model.onnx.1.data"]
        assert payload(output) == payload(sources / "source2.onnx")


def test_a_model_always_names_the_slot_its_predecessor_does_not(tmp_path: Path) -> None:
    sources = [external_source(tmp_path / "in", seed) for seed in range(4)]
    output = tmp_path / "model.onnx"
    names = []
    for source in sources:
        modelio.save_model(source.model, output, source=source)
        (location,) = {entry.value for tensor in onnx.load_model(output, load_external_data=False).graph.initializer
                       for entry in tensor.external_data if entry.key == "location"}
        names.append(location)
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["model.onnx", location]
        assert payload(output) == payload(source.path)
    assert names == ["model.onnx.data", "model.onnx.1.data"] * 2
    modelio.save_model(conv_model(9), output)  # an inline model: its predecessor's data file goes
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["model.onnx"]


RACE_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from oppass import modelio
    source, output, rounds = modelio.read_model(sys.argv[1], defer=True), Path(sys.argv[2]), int(sys.argv[3])
    for _ in range(rounds):
        modelio.save_model(source.model, output, source=source)
""")


@pytest.mark.slow
def test_concurrent_writers_of_one_output_never_mix_their_files(tmp_path: Path) -> None:
    writers = 4
    sources = [external_source(tmp_path / "in", seed) for seed in range(writers)]
    expected = [payload(source.path) for source in sources]
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", RACE_WRITER, str(source.path), str(output), "40"])
                 for source in sources]
    while any(process.poll() is None for process in processes):
        try:
            seen = payload(output)
        except OppassError:  # not written yet, or the data file this model named was just replaced
            continue
        assert seen in expected, "a model was published with another writer's data"
    assert [process.wait() for process in processes] == [0] * writers
    assert payload(output) in expected
    assert len([p for p in output.parent.iterdir()]) == 2  # the model and the one data file it names


# ----------------------------------------------------------------------------- real file systems


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts small tmpfs file systems (`mount("size=64k,ro")`); skips the test where mounting is not allowed."""
    points: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mount{len(points)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip("mounting a tmpfs needs root (the forced-failure tests cover the same failures)")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False)


def run_cli(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oppass.cli", *arguments], capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str, status: int = 2) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith("oppass: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr


@pytest.mark.parametrize("space", ["4k", "12k", "20k"])
def test_a_full_file_system_is_a_one_line_error_that_leaves_the_old_pair(
    space: str, tmp_path: Path, mounted: Callable[[str], Path]
) -> None:
    folder = mounted(f"size={space}")
    sources = tmp_path / "in"
    first, second = external_source(sources, 1, protected=True), external_source(sources, 2, protected=True)
    output = folder / "model.onnx"
    try:
        modelio.save_model(first.model, output, source=first)
    except OppassError as error:  # not even the first pair fits
        assert "no space left on device" in str(error) and list(folder.iterdir()) == []
        return
    before = snapshot(folder)
    result = run_cli("inject", str(second.path), str(output), "--ber", "0", "--seed", "0")
    if result.returncode == 0:
        assert payload(output) == payload(second.path)
    else:
        assert_one_line_error(result, "no space left on device")
        assert_old_pair_intact(output, before, sources)


def test_a_read_only_file_system_is_a_one_line_error(tmp_path: Path, mounted: Callable[[str], Path]) -> None:
    source = external_source(tmp_path / "in", 1)
    folder = mounted("size=64k,ro")
    result = run_cli("transform", str(source.path), str(folder / "model.onnx"), "--no-verify")
    assert_one_line_error(result, "read-only file system")
    assert list(folder.iterdir()) == []


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("length", [250, 255])
def test_a_legal_long_output_name_is_written(length: int, tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save_model(conv_model(1), source)
    output = tmp_path / ("m" * (length - len(".onnx")) + ".onnx")
    result = run_cli("transform", str(source), str(output), "--no-verify")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", output.name])


def test_an_output_name_too_long_for_its_data_file_is_a_one_line_error(tmp_path: Path) -> None:
    source = external_source(tmp_path / "in", 1)
    output = tmp_path / ("m" * 246 + ".onnx")  # 251 characters: `<name>.data` would have 256
    before = snapshot(tmp_path)
    result = run_cli("transform", str(source.path), str(output), "--no-verify")
    assert_one_line_error(result, "file name too long (choose a shorter name)")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- paths that are not regular files


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()


def make_folder(path: Path) -> None:
    path.mkdir()


def link_to_device(path: Path) -> None:
    path.symlink_to(os.devnull)


SPECIAL = {  # what the path is made into, what the message says it is
    "FIFO": (make_fifo, "is a FIFO (named pipe)"),
    "socket": (make_socket, "is a socket"),
    "folder": (make_folder, "is a directory"),
    "symlink to a character device": (link_to_device, "is a character device"),
}


@pytest.mark.parametrize("target", ["model", "data file", "second data slot"])
@pytest.mark.parametrize("case", SPECIAL)
@pytest.mark.parametrize("command", ["transform", "strip", "inject"])
def test_an_output_that_is_not_a_regular_file_is_refused(command: str, case: str, target: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "m.onnx"
    onnx.save_model(conv_model(1) if command == "transform" else protect.transform(conv_model(1)), source)
    output = tmp_path / "out.onnx"
    special = {"model": output, "data file": tmp_path / "out.onnx.data",
               "second data slot": tmp_path / "out.onnx.1.data"}[target]
    make, what = SPECIAL[case]
    make(special)
    before = snapshot(tmp_path)
    arguments = {"transform": ["transform", str(source), str(output), "--no-verify"],
                 "strip": ["strip", str(source), str(output)],
                 "inject": ["inject", str(source), str(output), "--ber", "0", "--seed", "1"]}[command]
    assert cli.main(arguments) == 2  # refused before anything is opened: a FIFO cannot block it
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"output {special} {what}: oppass writes only regular files" in error, error
    assert snapshot(tmp_path) == before
    assert os.path.lexists(special) and not special.is_file()


def test_dev_null_as_output_is_refused_and_left_alone(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save_model(conv_model(1), source)
    before = os.stat(os.devnull)
    assert_one_line_error(run_cli("transform", str(source), os.devnull, "--no-verify"), "is a character device")
    after = os.stat(os.devnull)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)


@pytest.mark.parametrize("case", SPECIAL)
@pytest.mark.parametrize("command", ["transform", "inspect", "strip", "inject"])
def test_an_input_that_is_not_a_regular_file_is_refused_not_reported_missing(command: str, case: str,
                                                                             tmp_path: Path) -> None:
    special = tmp_path / "m.onnx"
    make, what = SPECIAL[case]
    make(special)
    arguments = {"transform": ["transform", str(special), str(tmp_path / "o.onnx"), "--no-verify"],
                 "inspect": ["inspect", str(special)],
                 "strip": ["strip", str(special), str(tmp_path / "o.onnx")],
                 "inject": ["inject", str(special), str(tmp_path / "o.onnx"), "--ber", "0", "--seed", "1"]}[command]
    if case == "FIFO":  # a FIFO opened for reading would block: it must never be opened
        result = run_cli(*arguments, timeout=60)
    else:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            status = cli.main(arguments)
        result = subprocess.CompletedProcess(arguments, status, "", errors.getvalue())
    assert_one_line_error(result, f"{special} {what}, not a model file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ----------------------------------------------------------------------------- text formats


TEXT_SUFFIXES = [".json", ".onnxjson", ".textproto", ".prototxt", ".pbtxt", ".txtpb", ".onnxtxt", ".onnxtext"]


@pytest.mark.parametrize("suffix", TEXT_SUFFIXES)
def test_a_text_format_model_is_read(suffix: str, tmp_path: Path) -> None:
    model = conv_model(3)
    source = tmp_path / f"m{suffix}"
    onnx.save_model(model, source, format=onnx.serialization.registry.get_format_from_file_extension(suffix))
    output = tmp_path / "out.onnx"
    result = run_cli("transform", str(source), str(output), "--no-verify")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    expected = protect.transform(onnx.load_model(source))  # the ONNX text format drops some details
    assert output.read_bytes() == expected.SerializeToString()


@pytest.mark.parametrize("contents", [
    b"", b"{", b"ir_version: x", b"<", b"\xff\xfe\x00", b"\x08\x07",
    b"<ir_version: 99999999999999999999999999>\ng (float[1] x) => (float[1] y) {\n y = Identity(x)\n}",
    b"g (uint64[2] x) => (float[1] y) <uint64[2] w = {99999999999999999999999, 1}> {\n y = Identity(x)\n}",
])
@pytest.mark.parametrize("suffix", TEXT_SUFFIXES)
def test_a_damaged_text_format_model_is_a_one_line_error(suffix: str, contents: bytes, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / f"m{suffix}"
    source.write_bytes(contents)
    assert cli.main(["inspect", str(source)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("oppass: error: ") and error.count("\n") == 1 and "is not a valid ONNX model" in error


@pytest.mark.parametrize("suffix", TEXT_SUFFIXES)
@pytest.mark.parametrize("command", ["transform", "strip", "inject"])
def test_a_text_format_output_name_is_refused(suffix: str, command: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "m.onnx"
    onnx.save_model(conv_model(1), source)
    protected = tmp_path / "p.onnx"
    assert cli.main(["transform", str(source), str(protected), "--no-verify"]) == 0
    capsys.readouterr()
    output = tmp_path / f"out{suffix}"
    arguments = {"transform": ["transform", str(source), str(output), "--no-verify"],
                 "strip": ["strip", str(protected), str(output)],
                 "inject": ["inject", str(protected), str(output), "--ber", "0", "--seed", "1"]}[command]
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "has the suffix of a text format" in error, error
    assert not output.exists()


# ----------------------------------------------------------------------------- signals


SIGNALLED_SAVE = textwrap.dedent("""
    import os, sys, time
    from oppass import cli
    call, number, signum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    original, calls = getattr(os, call), [0]

    def signalled(*arguments):
        calls[0] += 1
        if calls[0] == number:
            os.kill(os.getpid(), signum)
            if call == "fsync":
                time.sleep(0.5)  # the signal arrives while the write waits
        return original(*arguments)

    setattr(os, call, signalled)
    sys.exit(cli.main(sys.argv[4:]))
""")


@pytest.mark.parametrize(("signum", "call", "number"), [
    *[(signal.SIGTERM, call, number) for call in ("fsync", "replace") for number in (1, 2)],
    (signal.SIGINT, "fsync", 1), (signal.SIGHUP, "fsync", 2), (signal.SIGINT, "replace", 2),
])
def test_a_signal_during_a_save_leaves_one_pair_and_no_temporary_file(
    signum: int, call: str, number: int, tmp_path: Path
) -> None:
    """Signals at fsync 1 and 2 (data file, model: the new files go) or replace 1 and 2 (the renames,
    during which the signal waits: the new pair is published, then the command stops)."""
    sources = tmp_path / "in"
    first, second = external_source(sources, 1, protected=True), external_source(sources, 2, protected=True)
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    modelio.save_model(first.model, output, source=first)
    before = snapshot(output.parent)
    result = subprocess.run([sys.executable, "-c", SIGNALLED_SAVE, call, str(number), str(int(signum)),
                             "inject", str(second.path), str(output), "--ber", "0", "--seed", "0"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert_one_line_error(result, f"stopped by {signal.Signals(signum).name}", 128 + signum)
    if call == "fsync":
        assert snapshot(output.parent) == before
    else:
        assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx", "model.onnx.1.data"]
        assert payload(output) == payload(second.path)


def test_the_temporary_name_of_a_long_output_fits(tmp_path: Path) -> None:
    destination = tmp_path / ("é" * 120 + ".onnx")  # 245 bytes
    temporary = files.write_temporary(destination, lambda stream: stream.write(b"x"))
    assert len(os.fsencode(temporary.name)) <= files.NAME_MAX and temporary.read_bytes() == b"x"


def test_a_file_written_with_early_writeback_is_published_whole(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[tuple[int, int, int]] = []
    start_writeback = files._sync_file_range()

    def recording(descriptor: int, offset: int, length: int, flags: int) -> int:
        requests.append((offset, length, flags))
        return 0 if start_writeback is None else start_writeback(descriptor, offset, length, flags)

    monkeypatch.setattr(files, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(files, "_sync_file_range", lambda: recording)
    pieces = [bytes([number]) * 3000 for number in range(50)]
    destination = tmp_path / "out.bin"
    files.write_atomically(destination, lambda stream: [stream.write(piece) for piece in pieces])
    assert destination.read_bytes() == b"".join(pieces)
    assert requests == [(0, 0, 2)] * (50 * 3000 // 6000)  # every second piece passes 4096 bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
