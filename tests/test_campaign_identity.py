"""A campaign's identity covers every byte that decides its trials (issue 14.2).

Changing any byte of the model file, of its external data or of an image (even keeping every
name), or any name, gives another identity, so a resumed campaign refuses a store made with
other weights or images; workers refuse a model that changed after the plan was made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from oppass.campaign import CampaignConfig, run_campaign, worker
from oppass.campaign.data import ModelInput, open_dataset
from oppass.campaign.runner import make_plan
from oppass.campaign.store import Store
from oppass.errors import OppassError
from oppass.formats import DEFAULT_OPS

DIGITS_MODEL = Path(__file__).resolve().parent.parent / "oppass" / "examples" / "digits_cnn.onnx"


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library


def external_digits(folder: Path) -> Path:
    path = folder / "digits.onnx"
    onnx.save_model(onnx.load_model(DIGITS_MODEL), path, save_as_external_data=True, location="digits.data",
                    size_threshold=0)
    return path


def config(model: Path, out: Path) -> CampaignConfig:
    return CampaignConfig(model=model, data="digits", out=out, formats=("fp32",), protections=("none",),
                          ber_min=1e-3, ber_max=1e-3, points_per_decade=1, experiments=1, batch_size=10,
                          metric="top1", scheduler="serial")


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def weight_byte(model: Path, position: int) -> int:
    """The offset in the data file of a byte inside a weight (not alignment padding)."""
    tensors = [t for t in onnx.load_model(model, load_external_data=False).graph.initializer]
    entries = [{e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")} for t in tensors]
    spans = [(e.get("offset", 0), e["length"]) for e in entries if e.get("length")]
    offset, length = spans[position % len(spans)]
    return offset + position % length


@pytest.mark.parametrize("position", [0, 1, 7, 100, 1000, 5000, 12345])
@pytest.mark.parametrize("where", ["external data", "model file"])
def test_any_changed_byte_of_the_model_changes_the_identity(where: str, position: int, tmp_path: Path) -> None:
    model = external_digits(tmp_path)
    before = make_plan(config(model, tmp_path / "out")).identity
    store = Store(tmp_path / "out", before)
    store.close()
    if where == "external data":
        flip_byte(tmp_path / "digits.data", weight_byte(model, position))
    else:  # a byte of the producer's name: the model still parses
        proto = onnx.load_model(model, load_external_data=False)
        name = bytearray(proto.producer_name.encode() or b"x")
        name[position % len(name)] ^= 0x01
        proto.producer_name = name.decode()
        model.write_bytes(proto.SerializeToString())
    after = make_plan(config(model, tmp_path / "out")).identity
    assert after["model_sha256"] != before["model_sha256"]
    with pytest.raises(OppassError, match="other results \\(model_sha256 differ\\)"):
        Store(tmp_path / "out", after)


def test_the_identity_is_stable_when_nothing_changes(tmp_path: Path) -> None:
    model = external_digits(tmp_path)
    assert make_plan(config(model, tmp_path / "a")).identity == make_plan(config(model, tmp_path / "b")).identity


def test_a_worker_refuses_a_model_whose_data_changed_after_the_plan(tmp_path: Path) -> None:
    model = external_digits(tmp_path)
    plan = make_plan(config(model, tmp_path / "out"))
    flip_byte(tmp_path / "digits.data", weight_byte(model, 3))
    worker._CACHES.clear()
    with pytest.raises(OppassError, match="changed while the campaign ran"):
        worker.WorkerCache(plan.workload)


def image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / label / f"{index}.png")
    return root


def rewrite_image(root: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "dog" / "1.png")


IMAGE_CHANGES: dict[str, Callable[[Path], object]] = {
    "one byte of an image": lambda root: flip_byte(root / "cat" / "0.png", 40),
    "an image replaced under its name": rewrite_image,
    "an image renamed": lambda root: (root / "cat" / "0.png").rename(root / "cat" / "2.png"),
    "an image moved to another class": lambda root: (root / "cat" / "0.png").rename(root / "dog" / "9.png"),
}


@pytest.mark.parametrize("change", IMAGE_CHANGES)
def test_any_change_to_an_image_folder_changes_its_identity(change: str, tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    root = image_folder(tmp_path / "images")
    inputs = [ModelInput("image", np.dtype(np.float32), (None, 3, 8, 8))]
    before = open_dataset(str(root), inputs).identity
    assert open_dataset(str(root), inputs).identity == before
    IMAGE_CHANGES[change](root)
    assert open_dataset(str(root), inputs).identity != before


def matmul_model(folder: Path) -> Path:
    """A model with a MatMul weight and no Conv or Gemm: x [N, 8] @ w [8, 4]."""
    weight = np.random.default_rng(4).standard_normal((8, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(weight, "w")])
    path = folder / "matmul.onnx"
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    np.savez(folder / "inputs.npz", inputs=np.random.default_rng(5).standard_normal((20, 8)).astype(np.float32))
    return path


def test_a_campaign_protects_and_corrupts_the_weights_of_the_ops_it_names(tmp_path: Path) -> None:
    model = matmul_model(tmp_path)
    cfg = CampaignConfig(model=model, data=str(tmp_path / "inputs.npz"), out=tmp_path / "out", formats=("fp32",),
                         protections=("none", "64", "secded:64"), ber_min=1e-2, ber_max=1e-2, points_per_decade=1,
                         experiments=3, batch_size=10, metric="golden", scheduler="serial", ops=("MatMul",))
    with pytest.raises(OppassError, match="no weight initializers of Conv, Gemm .* --ops"):
        make_plan(dataclasses.replace(cfg, ops=DEFAULT_OPS))
    plan = make_plan(cfg)
    assert plan.identity["ops"] == ["MatMul"] and "ops" not in make_plan(config(external_digits(tmp_path),
                                                                              tmp_path / "digits")).identity
    run_campaign(cfg, log=None)
    store = Store(cfg.out, plan.identity)
    trials = store.trials()
    store.close()
    assert len(trials) == 9 and {trial.n_bits for trial in trials} == {8 * 4 * 32}  # the MatMul weight's bits
    assert sum(trial.flips for trial in trials) > 0
    with pytest.raises(OppassError, match="ops"):
        Store(cfg.out, make_plan(dataclasses.replace(cfg, ops=("MatMul", "Gemm"))).identity)
