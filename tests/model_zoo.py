"""Model files for tests, made on first use and cached (no tests in this module).

- `paper_cnn(name)`: one of the paper's CNNs (`PAPER_CNNS`: ResNet50, MobileNetV2,
  SqueezeNet 1.0) with seeded random weights, built by tools/cnn_architectures.py and
  exported by tools/export_cnns.py, all three in one subprocess (torch imports once). The
  interpreter is $OPPASS_TORCH_PYTHON or the current one (the test extra installs a CPU
  build of torch).
- `pretrained_model(name)`: a real pretrained CNN from a PyPI wheel (tools/pretrained_models.py).
- `quantized_digits_model()`: the bundled digits CNN after onnxruntime `quantize_dynamic`
  (ConvInteger / MatMulInteger with uint8 weights).
- `transformer(dtype, folding)`: tools/export_transformer.py's GPT-2-shaped transformer exported by
  torch.onnx.export (fp32, fp16 or bf16 weights; transposes folded or not).
- `write_matmul_stack(folder, layers, width)`: a transformer-shaped stack of fp32 MatMul weights
  with external data, written tensor by tensor (not cached: it may be gigabytes).

Files live in $OPPASS_CACHE_DIR or ~/.cache/oppass/models, keyed by model name plus a
hash of what made them, so a changed export script, architecture or model re-exports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = REPO_ROOT / "tools" / "export_cnns.py"
ARCHITECTURES_SCRIPT = REPO_ROOT / "tools" / "cnn_architectures.py"
TRANSFORMER_SCRIPT = REPO_ROOT / "tools" / "export_transformer.py"
PAPER_CNNS = ("resnet50", "mobilenet_v2", "squeezenet1_0")
EXPORTED = "exported.txt"  # written, with the export's summary, once all of PAPER_CNNS are in its folder
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
    """Interpreter that runs the torch export: $OPPASS_TORCH_PYTHON or this one."""
    return os.environ.get(TORCH_PYTHON_ENV) or sys.executable


def paper_cnn(name: str) -> Path:
    """Cached ONNX export of the paper's CNN `name` (one of `PAPER_CNNS`), random seeded weights."""
    if name not in PAPER_CNNS:
        raise ValueError(f"no paper CNN {name!r}: choose one of {', '.join(PAPER_CNNS)}")
    digest = hashlib.sha256(EXPORT_SCRIPT.read_bytes() + ARCHITECTURES_SCRIPT.read_bytes()).hexdigest()
    return cached(f"paper_cnns-{digest[:12]}", EXPORTED, _export_paper_cnns).parent / f"{name}.onnx"


def quantized_digits_model() -> Path:
    """Cached uint8 ConvInteger/MatMulInteger version of oppass/examples/digits_cnn.onnx."""
    digest = _pretrained.file_digest(_pretrained.DIGITS_MODEL)[:12]
    return cached(f"digits_cnn_uint8-{digest}", "digits_cnn_uint8.onnx", _pretrained.quantized_digits_model)


def transformer(dtype: str, folding: bool) -> Path:
    """Cached export of the GPT-2-shaped transformer of tools/export_transformer.py (default sizes)."""
    digest = hashlib.sha256(TRANSFORMER_SCRIPT.read_bytes()).hexdigest()[:12]
    name = f"gpt-{dtype}{'' if folding else '-unfolded'}"

    def export(path: Path) -> None:
        command = [torch_python(), str(TRANSFORMER_SCRIPT), "--out", str(path), "--dtype", dtype]
        result = subprocess.run(command + ([] if folding else ["--no-folding"]), capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"exporting {name} failed: {result.stderr.strip().splitlines()[-1:]}")

    return cached(f"{name}-{digest}", f"{name}.onnx", export)


def write_matmul_stack(folder: Path, layers: int, width: int, *, seed: int = 0) -> Path:
    """`folder`/stack.onnx and its external data `stack.onnx.data`: per layer, MatMul weights of a transformer
    block (q, k, v, o: [width, width]; MLP: [width, 4 width] and [4 width, width]) chained on input x [1, width].

    Weights are uniform in +-1/sqrt(fan-in), so activations stay finite; each is generated and written
    on its own, so memory stays one tensor whatever the model's size.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    shapes = [(width, width)] * 4 + [(width, 4 * width), (4 * width, width)]
    rng = np.random.default_rng(seed)
    model_path, data_name = folder / "stack.onnx", "stack.onnx.data"
    nodes, initializers, previous, offset = [], [], "x", 0
    with open(folder / data_name, "wb") as data:
        for layer in range(layers):
            for index, shape in enumerate(shapes):
                name = f"layer{layer}.w{index}"
                values = rng.random(shape, dtype=np.float32)
                values -= np.float32(0.5)
                values *= np.float32(2 / np.sqrt(shape[0]))
                data.write(b"\0" * (-offset % 4096))
                offset += -offset % 4096
                data.write(values.tobytes())
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
                for key, value in {"location": data_name, "offset": offset, "length": values.nbytes}.items():
                    tensor.external_data.add(key=key, value=str(value))
                tensor.data_location = TensorProto.EXTERNAL
                initializers.append(tensor)
                offset += values.nbytes
                nodes.append(helper.make_node("MatMul", [previous, name], [f"{name}.out"]))
                previous = f"{name}.out"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "matmul_stack",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, model_path)
    return model_path


def _export_paper_cnns(marker: Path) -> None:
    """Run tools/export_cnns.py once for all `PAPER_CNNS`, move the files next to `marker`, then write it."""
    with tempfile.TemporaryDirectory(dir=marker.parent) as folder:
        command = [torch_python(), str(EXPORT_SCRIPT), "--out", folder, "--models", ",".join(PAPER_CNNS)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"exporting {', '.join(PAPER_CNNS)} failed: {result.stderr.strip().splitlines()[-1:]}")
        for name in PAPER_CNNS:
            os.replace(Path(folder) / f"{name}.onnx", marker.parent / f"{name}.onnx")
    marker.write_text(result.stdout.replace(f"{folder}/", ""))
