"""Model files for tests, made on first use and cached (no tests in this module).

- `torchvision_model(name)`: a torchvision CNN with seeded random weights, exported by
  tools/export_torchvision.py in a subprocess. The interpreter is $OPPASS_TORCH_PYTHON or
  the current one (the test extra installs torch + torchvision); `has_torchvision()` tells
  whether it can export, for skip markers.
- `pretrained_model(name)`: a real pretrained CNN from a PyPI wheel (tools/pretrained_models.py).
- `quantized_digits_model()`: the bundled digits CNN after onnxruntime `quantize_dynamic`
  (ConvInteger / MatMulInteger with uint8 weights).

Files live in $OPPASS_CACHE_DIR or ~/.cache/oppass/models, keyed by model name plus a
hash of what made them, so a changed export script or model re-exports.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = REPO_ROOT / "tools" / "export_torchvision.py"
PRETRAINED_SCRIPT = REPO_ROOT / "tools" / "pretrained_models.py"
TORCH_PYTHON_ENV = "OPPASS_TORCH_PYTHON"
MODULE_NAME = "oppass_tools_pretrained_models"


def _load_pretrained_tool():
    """tools/pretrained_models.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(MODULE_NAME, PRETRAINED_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_pretrained = _load_pretrained_tool()
cache_dir = _pretrained.cache_dir
cached = _pretrained.cached
pretrained_model = _pretrained.pretrained_model
PRETRAINED_NAMES = tuple(_pretrained.CATALOG)


def torch_python() -> str:
    """Interpreter that runs the torchvision export: $OPPASS_TORCH_PYTHON or this one."""
    return os.environ.get(TORCH_PYTHON_ENV) or sys.executable


@functools.cache
def has_torchvision() -> bool:
    """Whether torch_python() can import torch and torchvision (checked without importing them)."""
    probe = "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('torchvision')))"
    return subprocess.run([torch_python(), "-c", probe], check=False).returncode == 0


def torchvision_model(name: str) -> Path:
    """Cached ONNX export of torchvision model `name` (e.g. "resnet50"), random seeded weights."""
    key = f"{name}-{_pretrained.file_digest(EXPORT_SCRIPT)[:12]}"
    return cached(key, f"{name}.onnx", lambda partial: _export_torchvision(name, partial))


def quantized_digits_model() -> Path:
    """Cached uint8 ConvInteger/MatMulInteger version of oppass/examples/digits_cnn.onnx."""
    digest = _pretrained.file_digest(_pretrained.DIGITS_MODEL)[:12]
    return cached(f"digits_cnn_uint8-{digest}", "digits_cnn_uint8.onnx", _pretrained.quantized_digits_model)


def _export_torchvision(name: str, destination: Path) -> None:
    """Run tools/export_torchvision.py for one model and move its file to `destination`."""
    with tempfile.TemporaryDirectory(dir=destination.parent) as folder:
        command = [torch_python(), str(EXPORT_SCRIPT), "--out", folder, "--models", name]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"exporting {name} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(Path(folder) / f"{name}.onnx", destination)
