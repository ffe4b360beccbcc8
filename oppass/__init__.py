"""oppass: Opportunistic Parity protection of ONNX model weights.

The public API is imported on first use (PEP 562), so that `import oppass` and the numpy-only
`import oppass.codec` load neither onnx nor onnxruntime.
"""

from __future__ import annotations

from oppass.errors import OppassError

# Not typing's: `python -m oppass` holds SIGINT only once this package has loaded, so it loads little.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from oppass.protect import WeightLayout, transform, transform_file, transform_with_report
    from oppass.protected_models import inject, inspect, strip
    from oppass.runtime import custom_op_library, load_session, optimize_for_cpu, session_options

__version__ = "0.1.0"
# Where each lazily imported public name is defined.
_LAZY = {
    "transform": "oppass.protect",
    "transform_file": "oppass.protect",
    "transform_with_report": "oppass.protect",
    "WeightLayout": "oppass.protect",
    "inject": "oppass.protected_models",
    "inspect": "oppass.protected_models",
    "strip": "oppass.protected_models",
    "custom_op_library": "oppass.runtime",
    "load_session": "oppass.runtime",
    "optimize_for_cpu": "oppass.runtime",
    "session_options": "oppass.runtime",
}
__all__ = [
    "OppassError",
    "WeightLayout",
    "custom_op_library",
    "inject",
    "inspect",
    "load_session",
    "optimize_for_cpu",
    "session_options",
    "strip",
    "transform",
    "transform_file",
    "transform_with_report",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
