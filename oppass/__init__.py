"""oppass: Opportunistic Parity protection of ONNX model weights."""

from oppass.errors import OppassError
from oppass.graph import inject, inspect, strip, transform, transform_with_report
from oppass.runtime import custom_op_library, load_session, optimize_for_cpu, session_options

__version__ = "0.1.0"
__all__ = [
    "OppassError",
    "custom_op_library",
    "inject",
    "inspect",
    "load_session",
    "optimize_for_cpu",
    "session_options",
    "strip",
    "transform",
    "transform_with_report",
]
