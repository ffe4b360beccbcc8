"""Campaigns on models beyond one-input classifiers: several inputs, 3-D outputs, fixed batch, allclose and user
metrics, the NaN case, extension of a finished campaign, and the one-line errors a newcomer meets."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from oppass import faults
from oppass.campaign import CampaignConfig, run_campaign
from oppass.campaign.data import ModelInput, model_inputs, open_dataset
from oppass.campaign.metrics import MASKED, NO_FAULT, NONFINITE, SDC, TOLERATED, Metric
from oppass.campaign.runner import make_plan
from oppass.campaign.worker import even_flip_words
from oppass.errors import OppassError
from oppass.protect import transform

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx"
TIMING_FIELDS = ("inference_seconds_mean", "inject_seconds_mean")
SAMPLES = 24
USER_METRIC = '''
import numpy as np

def within_half(outputs, reference, labels):
    """Correct when no output moves by more than 0.5."""
    return np.abs(outputs - reference).reshape(len(outputs), -1).max(axis=1) <= 0.5
'''


@pytest.fixture(autouse=True)
def library(custom_op_library: str) -> str:
    return custom_op_library


def detector(batch: int | str = "N", opset: int = 17) -> onnx.ModelProto:
    """Inputs `image` [batch, 1, 6, 6], `extra` [batch, 4] and `offset` [4] (one for all samples); outputs
    `scores` [batch, 36, 3] (3 classes at 36 positions, from a Conv) and `side` [batch, 5] (from a Gemm)."""
    rng = np.random.default_rng(0)
    initializers = {
        "conv_w": rng.standard_normal((3, 1, 3, 3)).astype(np.float32),
        "gemm_w": rng.standard_normal((4, 5)).astype(np.float32),
        "shape": np.array([0, 3, 36], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["conv", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["scores"], perm=[0, 2, 1]),
        helper.make_node("Add", ["extra", "offset"], ["shifted"]),
        helper.make_node("Gemm", ["shifted", "gemm_w"], ["side"]),
    ]
    graph = helper.make_graph(
        nodes, "detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, 6, 6]),
         helper.make_tensor_value_info("extra", TensorProto.FLOAT, [batch, 4]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 36, 3]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def detector_data(path: Path, **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, image=rng.standard_normal((SAMPLES, 1, 6, 6)).astype(np.float32),
             extra=rng.standard_normal((SAMPLES, 4)).astype(np.float32),
             offset=np.arange(4, dtype=np.float32), **extra)
    return path


def config(tmp_path: Path, model: onnx.ModelProto | Path, data: Path | str, **changes: object) -> CampaignConfig:
    if isinstance(model, onnx.ModelProto):
        tmp_path.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "model.onnx"
        onnx.save(model, path)
        model = path
    settings = dict(model=model, data=str(data), out=tmp_path / "out", formats=("fp32",), protections=("none", "64"),
                    ber_min=1e-3, ber_max=1e-1, points_per_decade=1, experiments=3, batch_size=8,
                    scheduler="serial", seed=4)
    return CampaignConfig(**{**settings, **changes})  # type: ignore[arg-type]


def results(summaries: list) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(s).items() if k not in TIMING_FIELDS} for s in summaries]


def test_a_multi_input_model_with_a_3d_output_runs_under_golden(tmp_path: Path) -> None:
    result = run_campaign(config(tmp_path, detector(), detector_data(tmp_path / "d.npz")), log=None)
    by_key = {s.condition_key: s for s in result.summaries}
    assert result.trials_run == 2 * 3 * 3
    assert by_key["ber/fp32/none/ber=0.001"].fault_free_accuracy == 1.0  # golden agrees with itself
    worst = by_key["ber/fp32/none/ber=0.1"]
    assert worst.accuracy_mean < 1.0 and worst.sdc + worst.nonfinite > 0
    assert "golden" in (tmp_path / "out" / "table2.md").read_text()


def test_allclose_on_a_chosen_output_and_a_fixed_batch_model(tmp_path: Path) -> None:
    data = detector_data(tmp_path / "d.npz")
    batched = run_campaign(config(tmp_path / "a", detector(), data, metric="allclose", output="side"), log=None)
    single = run_campaign(config(tmp_path / "b", detector(batch=1), data, metric="allclose", output="side"),
                          log=None)
    plan = make_plan(config(tmp_path / "b", detector(batch=1), data, metric="allclose", output="side"))
    assert not plan.workload.batched and plan.workload.output == "side"
    # One run per sample or one per batch: the same trials, the same verdicts (outputs agree to rounding).
    assert [s.accuracy_mean for s in single.summaries] == [s.accuracy_mean for s in batched.summaries]
    assert min(s.accuracy_mean for s in batched.summaries) < 1.0


def test_a_user_metric_scores_the_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_metrics.py").write_text(USER_METRIC)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = detector_data(tmp_path / "d.npz")
    user = run_campaign(config(tmp_path / "u", detector(), data, metric="my_metrics:within_half"), log=None)
    assert user.summaries[0].fault_free_accuracy == 1.0
    assert min(s.accuracy_mean for s in user.summaries) < 1.0
    (tmp_path / "bad_metrics.py").write_text("def everything(outputs, reference, labels):\n    return True\n")
    with pytest.raises(OppassError, match=r"must return one bool per sample \(\[2\]\)"):
        make_plan(config(tmp_path / "v", detector(), data, metric="bad_metrics:everything"))
    with pytest.raises(OppassError, match="cannot import"):
        make_plan(config(tmp_path / "w", detector(), data, metric="no_such_module:f"))


def test_a_nan_output_is_never_correct_even_when_the_fault_free_class_is_0() -> None:
    reference = np.zeros((1, 4, 10), dtype=np.float32)
    reference[..., 0] = 1.0  # fault-free top-1: class 0 everywhere
    faulty = np.full_like(reference, np.nan)
    for name, labels in (("golden", None), ("top1", np.zeros((1, 4), dtype=np.int64)),
                         ("top5", np.zeros((1, 4), dtype=np.int64)), ("allclose", None)):
        metric = Metric(name)
        scores = metric.score(faulty, reference, labels, np.ones((1, 4), dtype=bool), np.array([7]))
        assert scores.correct.tolist() == [0] and scores.nonfinite.tolist() == [4], name
        assert scores.outcomes == [NONFINITE]
    assert Metric("golden").score(reference, reference, None, np.ones((1, 4), bool), np.array([0])).outcomes == \
        [NO_FAULT]
    changed = reference.copy()
    changed[0, 1, 3] = 5.0
    assert Metric("golden").score(changed, reference, None, np.ones((1, 4), bool), np.array([1])).outcomes == [SDC]


@pytest.mark.parametrize("class_axis", [-1, -2, -3])
def test_scores_taking_top1_only_where_outputs_changed_equal_those_of_every_top1(class_axis: int) -> None:
    """A faulty run's top-1 is taken only along the class vectors that differ from the fault-free ones: the
    scores equal those of a top-1 of every vector, with ties, NaNs, -0.0 against 0.0, and few or most changed."""
    rng = np.random.default_rng(-class_axis)
    shape = (6, 5, 4, 3, 7)  # [runs, samples, ...]: the class axis is one of the last three
    reference = rng.integers(-3, 4, size=shape).astype(np.float32)  # small integers: ties
    expected = reference.argmax(axis=class_axis)
    labels = rng.integers(0, shape[class_axis], size=expected.shape)
    flips = np.arange(6) % 2
    for changed_share in (0.0, 0.01, 0.1, 0.5, 1.0):
        faulty = reference.copy()
        hit = rng.random(shape) < changed_share
        faulty[hit] = rng.choice(np.array([np.nan, -0.0, 0.0, 9.0, -9.0, 1.0], dtype=np.float32), size=hit.sum())
        predicted = faulty.argmax(axis=class_axis)  # every class vector's top-1
        finite = np.isfinite(faulty).reshape(6, 5, -1).all(axis=2)
        agree = (predicted == expected).reshape(6, 5, -1).all(axis=2)
        right = (predicted == labels).reshape(6, 5, -1).all(axis=2)
        for name, verdicts, given in (("golden", agree, None), ("top1", right, labels)):
            scores = Metric(name, class_axis=class_axis).score(faulty, reference, given, np.ones((6, 5), dtype=bool),
                                                               flips, reference_top1=expected)
            assert scores.correct.tolist() == np.count_nonzero(verdicts & finite, axis=1).tolist(), name
            assert scores.sdc.tolist() == np.count_nonzero(~agree & finite, axis=1).tolist(), name
            equal = (faulty == reference).reshape(6, -1).all(axis=1)
            outcomes = np.where(flips == 0, NO_FAULT, np.where((~finite).any(axis=1), NONFINITE, np.where(
                (~agree & finite).any(axis=1), SDC, np.where(equal, MASKED, TOLERATED))))
            assert scores.outcomes == outcomes.tolist(), name


def test_even_flip_words_counts_words_hit_an_even_number_of_times() -> None:
    # 64-bit words: word 0 gets 2 flips, word 1 one, word 2 four, word 1000 two.
    positions = np.array([0, 9, 67, 128, 129, 130, 190, 64000, 64001])
    assert even_flip_words(positions, 64) == 3
    assert even_flip_words(positions, 8) == 1  # bytes: only byte 8000 has two flips (byte 16 has three)
    assert even_flip_words(positions, 1) == 0
    assert even_flip_words(np.empty(0, dtype=np.int64), 64) == 0


@pytest.mark.parametrize("word_bits", [8, 16, 32, 64])
def test_even_flip_words_from_a_mask_counts_as_from_the_positions(word_bits: int) -> None:
    for ber in (0.01, 0.2):
        positions = faults.draw_flip_positions(np.random.default_rng(4), 64_000, ber)
        bits = np.zeros(64_000 + 64, dtype=bool)  # zero past the stream
        bits[positions] = True
        mask = np.packbits(bits, bitorder="little")
        assert even_flip_words(positions, word_bits, mask) == even_flip_words(positions, word_bits) > 0


def test_extending_a_campaign_runs_only_new_trials_and_equals_a_fresh_run(tmp_path: Path) -> None:
    small = dict(formats=("fp32",), protections=("none",), ber_min=1e-2, ber_max=1e-2, experiments=2)
    large = dict(formats=("fp32", "bf16"), protections=("none", "64"), ber_min=1e-3, ber_max=1e-1,
                 experiments=3, bit_positions=True)
    digits = dict(batch_size=50, metric="top1")
    first = run_campaign(config(tmp_path, DIGITS_MODEL, "digits", out=tmp_path / "grown", **small, **digits),
                         log=None)
    assert first.trials_run == 2
    grown = run_campaign(config(tmp_path, DIGITS_MODEL, "digits", out=tmp_path / "grown", **large, **digits),
                         log=None)
    fresh = run_campaign(config(tmp_path, DIGITS_MODEL, "digits", out=tmp_path / "fresh", **large, **digits),
                         log=None)
    total = 2 * 2 * 3 * 3 + (32 + 16) * 3 * 3
    assert fresh.trials_run == total and grown.trials_run == total - 2
    assert results(grown.summaries) == results(fresh.summaries)
    again = run_campaign(config(tmp_path, DIGITS_MODEL, "digits", out=tmp_path / "grown", **small, **digits),
                         log=None)
    assert again.trials_run == 0 and len(again.summaries) == 1  # a smaller grid reports only its own trials


def test_npz_aliases_casts_and_shared_arrays(tmp_path: Path) -> None:
    digits = np.load(REPO_ROOT / "oppass" / "examples" / "digits_test.npz")
    np.savez(tmp_path / "xy.npz", x=digits["inputs"].astype(np.float64), y=digits["labels"])
    inputs = [ModelInput("image", np.dtype(np.float32), (None, 1, 8, 8))]
    dataset = open_dataset(str(tmp_path / "xy.npz"), inputs)
    assert dataset.labels is not None and dataset.size == 450 and dataset.batched
    assert dataset.notes == ["the data's float64 array for input 'image' is cast to the model's float32"]
    (feed,) = dataset.feeds(np.arange(3))
    assert feed["image"].dtype == np.float32 and feed["image"].shape == (3, 1, 8, 8)
    model_inputs = [ModelInput("image", np.dtype(np.float32), (None, 1, 6, 6)),
                    ModelInput("extra", np.dtype(np.float32), (None, 4)),
                    ModelInput("offset", np.dtype(np.float32), (4,))]
    dataset = open_dataset(str(detector_data(tmp_path / "d.npz")), model_inputs)
    (feed,) = dataset.feeds(np.arange(5))
    assert feed["offset"].tolist() == [0, 1, 2, 3] and feed["extra"].shape == (5, 4)
    fixed = [dataclasses.replace(i, shape=(1, *i.shape[1:])) if i.name != "offset" else i for i in model_inputs]
    runs = open_dataset(str(tmp_path / "d.npz"), fixed).feeds(np.arange(5))
    assert len(runs) == 5 and runs[0]["image"].shape == (1, 1, 6, 6) and runs[0]["offset"].shape == (4,)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"pixels": np.zeros((4, 1, 8, 8), np.float32)},
     r"has no array for the model input 'image': it holds pixels \[4, 1, 8, 8\]; expected 'image' \(or 'inputs' "
     r"or 'x'\), and optionally integer labels as 'labels' or 'y'"),
    ({"x": np.zeros((4, 1, 9, 9), np.float32)},
     r"the model input 'image' float32 \[N, 1, 8, 8\] does not fit the data: .* holds 4 samples of \[1, 9, 9\]"),
    ({"x": np.zeros((4, 1, 8, 8), np.int32).astype(np.complex64)}, r"cannot take the data's complex64 array"),
])
def test_data_that_does_not_fit_gives_one_line(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(OppassError, match=message):
        make_plan(config(tmp_path, DIGITS_MODEL, tmp_path / "bad.npz"))


def test_newcomer_cases_give_one_line_errors_or_notes(tmp_path: Path) -> None:
    protected = tmp_path / "protected.onnx"
    onnx.save(transform(onnx.load(DIGITS_MODEL), format="fp32", word=64), protected)
    with pytest.raises(OppassError, match="already protected by oppass"):
        make_plan(config(tmp_path, protected, "digits"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OppassError, match="is a file: give a folder"):
        run_campaign(config(tmp_path, DIGITS_MODEL, "digits", out=tmp_path / "a_file"), log=None)
    with pytest.raises(OppassError, match="cannot create the output folder .*below: not a directory"):
        run_campaign(config(tmp_path, DIGITS_MODEL, "digits", out=tmp_path / "a_file" / "below"), log=None)
    plan = make_plan(config(tmp_path, detector(opset=11), detector_data(tmp_path / "d.npz"),
                            formats=("fp32", "int8")))
    assert plan.formats == ("fp32",)
    assert any(note.startswith("weight format int8 skipped") for note in plan.notes)
    with pytest.raises(OppassError, match="no output 'boxes': its outputs are 'scores', 'side'"):
        make_plan(config(tmp_path, detector(), tmp_path / "d.npz", output="boxes"))
    with pytest.raises(OppassError, match="has no class axis"):
        make_plan(config(tmp_path, detector(), tmp_path / "d.npz", output="side", class_axis=0))


def voice_activity(tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    """A model shaped like a voice-activity detector (silero-vad): `audio` [1, 8] and a scalar `rate` per run, one
    probability `speech` [1, 1] out; and data for 5 runs, each entry along axis 0 a whole input."""
    weight = np.random.default_rng(0).standard_normal((8, 1)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["audio", "w"], ["logit"]), helper.make_node("Cast", ["rate"], ["r"], to=1),
             helper.make_node("Mul", ["r", "zero"], ["nothing"]), helper.make_node("Add", ["logit", "nothing"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["speech"])]
    graph = helper.make_graph(
        nodes, "vad", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 8]),
                       helper.make_tensor_value_info("rate", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    data = tmp_path / "vad.npz"
    np.savez(data, audio=np.random.default_rng(1).standard_normal((5, 1, 8)).astype(np.float32),
             rate=np.full(5, 16000, np.int64))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), data


def test_a_scalar_input_per_run_is_fed_as_a_0d_array_and_a_one_class_output_needs_allclose(tmp_path: Path) -> None:
    model, data = voice_activity(tmp_path)
    with pytest.raises(OppassError, match=r"output 'speech' \[1, 1\] per sample has 1 class along axis -1, so its "
                                          "top-1 can never change: use --metric allclose"):
        make_plan(config(tmp_path, model, data))
    result = run_campaign(config(tmp_path, model, data, metric="allclose", batch_size=5, experiments=2), log=None)
    assert result.trials_run == 2 * 2 * 3
    runs = open_dataset(str(data), model_inputs(model)).feeds(np.arange(2))
    assert [type(run["rate"]) for run in runs] == [np.ndarray] * 2 and runs[0]["rate"].shape == ()


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OppassError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        run_campaign(config(tmp_path, DIGITS_MODEL, "digits", scheduler="tcp://127.0.0.1:9"), log=None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_an_image_folder_is_cropped_to_the_model_input(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("cat", "dog"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(tmp_path / folder / "a.png")
    fixed = ModelInput("images", np.dtype(np.float32), (1, 3, 416, 320))
    dataset = open_dataset(str(tmp_path), [fixed])
    runs = dataset.feeds(np.arange(2))
    assert dataset.labels is not None and dataset.labels.tolist() == [0, 1] and not dataset.batched
    assert [run["images"].shape for run in runs] == [(1, 3, 416, 320)] * 2
    assert dataset.notes == ["images are centre-cropped to the model's 416x320 input"]
    (batch,) = open_dataset(str(tmp_path), [ModelInput("x", np.dtype(np.float32), (None, 3, None, None))]).feeds(
        np.arange(2))
    assert batch["x"].shape == (2, 3, 224, 224)
    with pytest.raises(OppassError, match=r"an image folder feeds \[N, 3, H, W\] ImageNet-normalised crops"):
        open_dataset(str(tmp_path), [ModelInput("x", np.dtype(np.float32), (None, 1, 8, 8))])
