"""Export the paper's CNNs with seeded random weights to self-contained ONNX files.

    python tools/export_cnns.py --out DIR [--models resnet50,mobilenet_v2,squeezenet1_0]

Each model comes from tools/cnn_architectures.py (plain torch; its docstring gives the
initialisation) built after `torch.manual_seed(SEED)`, has its parameters counted against
the paper's network, is exported in eval mode by torch's TorchScript exporter (`dynamo=False`,
which needs no onnxscript; opset 17, input `input` float32 [N, 3, 224, 224] with a dynamic
batch, output `output`, all weights as initializers in the .onnx file itself) and is checked
by running it in onnxruntime against the torch output. Writes DIR/<name>.onnx.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tools/cnn_architectures.py, also under -P

from cnn_architectures import ARCHITECTURES, PARAMETER_COUNTS, build, parameter_count  # noqa: E402

SEED = 0
OPSET = 17
INPUT_SHAPE = (1, 3, 224, 224)
TOLERANCE = 1e-3


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript exporter, batch dimension dynamic."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        opset_version=OPSET,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
        do_constant_folding=True,
        dynamo=False,
    )


def export(name: str, path: Path) -> None:
    """Export model `name` to `path`, with Identity-shared initializers inlined, and check it."""
    model = build(name, SEED)
    count, expected = parameter_count(model), PARAMETER_COUNTS[name]
    if count != expected:
        raise SystemExit(f"{name}: {count:,} parameters where the paper's network has {expected:,}")
    example = torch.rand(INPUT_SHAPE, generator=torch.Generator().manual_seed(SEED))
    export_torchscript(model, example, path)
    proto = onnx.load(str(path))
    inline_initializer_identities(proto)
    onnx.save(proto, str(path))
    check(model, example, path)


def inline_initializer_identities(proto: onnx.ModelProto) -> None:
    """Replace each `Identity(initializer)` by a copy of the initializer under the Identity's output name.

    The TorchScript exporter shares equal initializers (e.g. the all-zero biases that
    batch-norm folding yields with random weights) through Identity nodes; this makes
    every Conv/Gemm input a plain initializer again.
    """
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    identities = [node for node in graph.node if node.op_type == "Identity" and node.input[0] in initializers]
    for node in identities:
        copy = graph.initializer.add()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.node.remove(node)
    still_used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    unused = [tensor for tensor in graph.initializer if tensor.name not in still_used]
    for tensor in unused:
        graph.initializer.remove(tensor)


def check(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The file is self-contained, has no weights in Constant nodes and matches torch in onnxruntime."""
    proto = onnx.load(str(path), load_external_data=False)
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in proto.graph.initializer):
        raise SystemExit(f"{path}: weights were written as external data")
    onnx.checker.check_model(proto)
    batch = torch.cat([example, example.flip(0).mul(0.5)])
    with torch.no_grad():
        expected = model(batch).numpy()
    (actual,) = ort.InferenceSession(str(path)).run(["output"], {"input": batch.numpy()})
    error = float(np.max(np.abs(actual - expected)))
    if error > TOLERANCE:
        raise SystemExit(f"{path}: onnxruntime differs from torch by {error:.3g}")


def summary(path: Path) -> str:
    """One line: file size, node count, Conv/Gemm count, initializers, Identity and Constant nodes."""
    proto = onnx.load(str(path))
    op_types = [node.op_type for node in proto.graph.node]
    layers = sum(op in ("Conv", "Gemm") for op in op_types)
    return (
        f"{path.stat().st_size / 1e6:.1f} MB, {len(op_types)} nodes, {layers} Conv/Gemm, "
        f"{len(proto.graph.initializer)} initializers, {op_types.count('Identity')} Identity and "
        f"{op_types.count('Constant')} Constant nodes"
    )


def main() -> None:
    """Export and check each model named by --models into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(ARCHITECTURES), help="comma-separated model names")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        path = args.out / f"{name}.onnx"
        start = time.perf_counter()
        export(name, path)
        seconds = time.perf_counter() - start
        print(f"{name}: export + check in {seconds:.1f} s -> {path} ({summary(path)})")


if __name__ == "__main__":
    main()
