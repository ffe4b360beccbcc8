"""Loads the ParityCheckUnpack custom-op library into onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from oppass.errors import OppassError

LIBRARY_ENV = "OPPASS_CUSTOM_OP_LIBRARY"
LIBRARY_NAME = "liboppass_ops.so"


def custom_op_library() -> str:
    """Path of the compiled ParityCheckUnpack library ($OPPASS_CUSTOM_OP_LIBRARY overrides)."""
    override = os.environ.get(LIBRARY_ENV)
    path = Path(override) if override else Path(__file__).parent / "_lib" / LIBRARY_NAME
    if not path.is_file():
        raise OppassError(f"custom-op library not found at {path}: reinstall oppass (pip install .)")
    return str(path)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime SessionOptions with the ParityCheckUnpack library registered."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(custom_op_library())
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options
