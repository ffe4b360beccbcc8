"""Writing export files atomically: a temporary file next to the target, renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes(path: Path, content: bytes) -> Path:
    """Writes `content` to `path` so that `path` holds either its previous version or all of `content`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(content)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically."""
    return write_bytes(path, text.encode())
