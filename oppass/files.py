"""The files oppass reads and writes: regular files only, written to temporary names, published together.

Every output is written to a temporary file in its destination folder, synced, and renamed
into place. Files published together (a model and its external data) are renamed while
holding an exclusive lock on the folder (`folder_lock`), and the last rename is the one that
makes the others reachable, so a failure before it leaves the previous files as they were and
two writers never interleave. A catchable signal (the CLI turns SIGINT, SIGTERM and SIGHUP
into `Interrupted`) stops a write between two system calls and its temporary file is removed;
one arriving during the renames is held until they are done (`renames_in_progress`).
On Linux the kernel is asked to start writing a file back every WRITEBACK_BYTES written, so that
its fsync before the rename has little left to write. No onnx here: the campaign's exports use the same writes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import io
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from oppass.errors import Interrupted, OppassError

# Longest file name (bytes) of the file systems oppass writes to (ext4, xfs, btrfs, tmpfs).
NAME_MAX = 255
_TEMPORARY_SUFFIX = ".tmp"
# Bytes written between two requests to the kernel to start writing a temporary file back.
WRITEBACK_BYTES = 64 * 2**20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait
_RANDOM_CHARACTERS = 8  # what tempfile.mkstemp adds between prefix and suffix

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}
_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write to another folder",
    errno.EACCES: "check the folder's permissions",
    errno.EPERM: "check the folder's permissions",
    errno.ENAMETOOLONG: "choose a shorter name",
}


def kind(path: str | os.PathLike) -> str | None:
    """What `path` is if it exists and is not a regular file ("a FIFO (named pipe)", ...), else None.

    Follows symlinks: a link to a device is that device.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_input(path: str | os.PathLike, what: str) -> None:
    """Refuses an input that is missing or not a regular file, saying what it is."""
    found = kind(path)
    if found is not None:
        raise OppassError(f"{path} is {found}, not a {what}: give a regular file")
    if not Path(path).is_file():
        raise OppassError(f"no such {what}: {path}")


def check_output(path: str | os.PathLike) -> None:
    """Refuses an output path that exists and is not a regular file (a device, FIFO, socket, folder)."""
    found = kind(path)
    if found is not None:
        raise OppassError(f"output {path} is {found}: oppass writes only regular files, choose another path")


def write_error(error: OSError, path: Path) -> OppassError:
    """The one-line error for an OSError raised while writing `path`."""
    reason = error.strerror or type(error).__name__
    advice = _ADVICE.get(error.errno or 0, "check the output folder")
    return OppassError(f"cannot write {path}: {reason.lower()} ({advice})")


def write_temporary(destination: Path, write: Callable[[BinaryIO], object]) -> Path:
    """A synced temporary file next to `destination` that `write` filled; removed if anything fails."""
    try:
        descriptor, name = tempfile.mkstemp(dir=destination.parent, prefix=_temporary_prefix(destination.name),
                                            suffix=_TEMPORARY_SUFFIX)
    except OSError as error:
        raise write_error(error, destination) from None
    temporary = Path(name)
    try:
        with _WritebackFile(os.fdopen(descriptor, "wb", 0)) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())  # a rename must never publish a file whose bytes are not on disk
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode of a new file
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise write_error(error, destination) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


class _WritebackFile(io.BufferedWriter):
    """A buffered file that asks the kernel to start writing back what it holds every WRITEBACK_BYTES written
    (`sync_file_range`, where the C library has it: a hint, whose failure changes nothing)."""

    def __init__(self, raw: io.RawIOBase) -> None:
        super().__init__(raw)
        self._unrequested = 0

    def write(self, data: Any, /) -> int:
        written = super().write(data)
        self._unrequested += written
        start_writeback = _sync_file_range()
        if self._unrequested >= WRITEBACK_BYTES and start_writeback is not None:
            self.flush()
            start_writeback(self.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)  # 0 bytes: to the end of the file
            self._unrequested = 0
        return written


@functools.cache
def _sync_file_range() -> Any:
    """The C library's sync_file_range (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def write_atomically(destination: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes one file: `write` fills a temporary file next to `destination`, renamed into place under the lock."""
    check_output(destination)
    temporary = write_temporary(destination, write)
    try:
        with folder_lock(destination.parent) as folder:
            publish(folder, [(temporary, destination)])
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(destination: Path, text: str) -> Path:
    """`write_atomically` of UTF-8 text; returns `destination`."""
    write_atomically(destination, lambda stream: stream.write(text.encode()))
    return destination


def write_bytes_atomically(destination: Path, content: bytes) -> Path:
    """`write_atomically` of `content`; returns `destination`."""
    write_atomically(destination, lambda stream: stream.write(content))
    return destination


def text_writer(write: Callable[[io.TextIOWrapper], object]) -> Callable[[BinaryIO], None]:
    """A `write` for `write_atomically` from one that writes text (newline translation off, as csv wants)."""

    def write_bytes(stream: BinaryIO) -> None:
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        write(text)
        text.flush()
        text.detach()

    return write_bytes


@contextmanager
def folder_lock(folder: Path) -> Iterator[int]:
    """Holds an exclusive lock on `folder` (flock on the folder itself) and gives its descriptor."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise OppassError(f"cannot open the output folder {folder}: {(error.strerror or '').lower()}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield descriptor
    finally:
        os.close(descriptor)  # closing releases the lock


def publish(folder: int, renames: list[tuple[Path, Path]], obsolete: tuple[Path, ...] = ()) -> None:
    """Renames each (temporary, final) pair in order, syncs the folder, then removes `obsolete` files.

    Call it under `folder_lock`. The last rename is the one that makes the earlier files
    reachable: if any rename fails, the files already renamed are removed again.
    """
    done: list[Path] = []
    with renames_in_progress():
        for temporary, final in renames:
            try:
                os.replace(temporary, final)
            except OSError as error:
                for renamed in done:
                    renamed.unlink(missing_ok=True)
                raise write_error(error, final) from None
            done.append(final)
        try:
            os.fsync(folder)
        except OSError as error:
            raise write_error(error, renames[-1][1]) from None
        for path in obsolete:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- signals

_held_signals: list[int] = []
_renaming = False
_first_signal: int | None = None


def received_signal() -> int | None:
    """The first signal `raise_interrupted` received in this process, if any."""
    return _first_signal


def forget_interrupt_exit() -> None:
    """Clears CPython's note that a KeyboardInterrupt left an `exec` of a string (dataclasses and namedtuple make
    their methods that way, so a Ctrl-C during an import can land in one). While it is set, the interpreter ends
    by SIGINT at exit, not with the status returned, even after the interrupt was caught. Call it where the
    interrupt is caught. Each `exec` of a string clears the note as it starts."""
    exec("pass", {})  # a constant string: the only way Python code can clear the note


def raise_interrupted(signum: int, frame: object) -> None:
    """Signal handler (installed by the CLI): raises Interrupted, or holds the signal during renames."""
    global _first_signal
    if _first_signal is None:
        _first_signal = signum
    if _renaming:
        _held_signals.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def renames_in_progress() -> Iterator[None]:
    """Holds the signals `raise_interrupted` receives until the block ends, then raises the first."""
    global _renaming
    _renaming = True
    try:
        yield
    finally:
        _renaming = False
        held = list(_held_signals)
        _held_signals.clear()
    if held:
        raise Interrupted(held[0])


# ----------------------------------------------------------------------------- names


def _temporary_prefix(name: str) -> str:
    """`.<name>.`, the name cut (to characters of at most 4 bytes each) when the temporary name would not fit."""
    room = NAME_MAX - len("..") - _RANDOM_CHARACTERS - len(_TEMPORARY_SUFFIX)
    if len(os.fsencode(name)) > room:
        name = name[:room // 4]
    return f".{name}."


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
