#!/usr/bin/env python3
"""Peak memory of two paths issue 14.7 fixed, measured as the process's peak RSS (ru_maxrss).

    .venv/bin/python tools/hardening_memory.py shared 16     # load_session, 16 load-mode decode nodes
                                                             # sharing one 16 MiB packed tensor
    .venv/bin/python tools/hardening_memory.py inspect 64    # `oppass inspect` of a model with one
                                                             # 64 MiB protected weight

Each builds its model in a child process and saves it, then prints this process's peak RSS
before and after the measured step on that file.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from oppass import cli, modelio, protect, runtime


def gemm_model(mebibytes: int, check: str) -> onnx.ModelProto:
    """A protected Gemm whose weight has `mebibytes` MiB of fp32 values."""
    rows = mebibytes * 2**20 // (4 * 1024)
    weight = np.random.default_rng(0).standard_normal([rows, 1024]).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
                              [numpy_helper.from_array(weight, "w")])
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return protect.transform(plain, check=check)


def shared_model(copies: int) -> onnx.ModelProto:
    """`copies` load-mode decode nodes of one packed tensor, each feeding its own Gemm, summed."""
    model = gemm_model(16, "load")
    decode, gemm = model.graph.node[0], model.graph.node[1]
    gemm.output[0] = "y0"
    for index in range(1, copies):
        for template, changes in ((decode, {"output": f"w{index}"}), (gemm, {"input": f"w{index}",
                                                                               "output": f"y{index}"})):
            node = model.graph.node.add()
            node.CopyFrom(template)
            node.name = f"{template.name}{index}"
            if "input" in changes:
                node.input[1] = changes["input"]
            node.output[0] = changes["output"]
    model.graph.node.append(helper.make_node("Sum", [f"y{index}" for index in range(copies)], ["y"]))
    return model


def build(path: Path, measurement: str, size: int) -> None:
    """Saves the measurement's model (run in a child: its memory is not this process's)."""
    model = shared_model(size) if measurement == "shared" else gemm_model(size, "runtime")
    modelio.save_model(model, path)


def measure(measurement: str, size: int) -> None:
    """Builds the model in a child process, then measures the step on its file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        subprocess.run([sys.executable, __file__, measurement, str(size), "--build", str(path)], check=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if measurement == "shared":
            runtime.load_session(path).run(None, {"x": np.ones([1, 1024], np.float32)})
            what = f"load_session, {size} decode nodes sharing one 16 MiB packed tensor"
        else:
            cli.main(["inspect", str(path)])
            what = f"inspect, one {size} MiB weight"
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{what}: peak RSS {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after "
          f"(+{(after - before) / 1024:.0f} MiB)")


def main() -> None:
    """Runs one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measurement", choices=("shared", "inspect"))
    parser.add_argument("size", type=int, help="decode nodes (shared) or MiB of the weight (inspect)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.build:
        build(arguments.build, arguments.measurement, arguments.size)
    else:
        measure(arguments.measurement, arguments.size)


if __name__ == "__main__":
    main()
