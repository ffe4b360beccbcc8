"""The streaming transform (`protect.transform_file`): each weight read, encoded and written before the next.

It must write what the in-memory pass writes, byte for byte, for every code, range check and
check mode, with the C encoder in chunks and with the numpy codec (in chunks and whole); fail
without leaving anything behind; refuse what the in-memory pass refuses; and transform a model
over 2 GB in memory bounded by its largest tensor, measured in a child process.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ALL_MODEL_FIXTURES, make_model, model_ops, weights
from model_zoo import write_matmul_stack
from onnx import helper

from oppass import cli, codec, encoder, faults, modelio, native, protected_models
from oppass.errors import OppassError
from oppass.protect import packed_name, transform, transform_file, transform_to_placeholders, transform_with_report

OPTIONS = [
    {},
    {"format": "bf16", "word": "512", "flip": "min-error"},
    {"format": "fp16", "word": "weight", "flip": "largest", "report_faults": True},
    {"format": "int8", "check": "load"},
    {"check": "none", "word": "128"},
    {"code": "secded"},
    {"code": "secded", "format": "bf16", "word": "128", "range_check": True, "report_faults": True,
     "check": "load-custom"},
    {"code": "secded", "check": "none", "word": "32", "report_faults": True},
    {"code": "secded", "format": "int8", "range_check": True},
    {"range_check": True, "flip": "largest", "report_faults": True},
    {"range_check": True, "format": "fp16", "word": "256", "check": "none"},
    {"check": "load", "report_faults": True},
    {"check": "load", "format": "fp16", "word": "256"},
]


def large_gemm_model() -> onnx.ModelProto:
    """Two Gemms whose weights (73 KiB and 38 KiB) are read from the file, not held in the parsed model."""
    nodes = [helper.make_node("Gemm", ["x", "a.w"], ["h"], transB=1), helper.make_node("Gemm", ["h", "b.w"], ["y"])]
    initializers = {"a.w": weights([64, 293], 21), "b.w": weights([64, 150], 22)}
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 293])]
    return make_model(nodes, initializers, inputs=inputs, output_shape=["batch", 150])


ENCODER_KINDS = ("C encoder in small chunks", "numpy codec in small chunks", "numpy codec")


def use_encoder(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """C encoder (parity) or numpy codec, in chunks of 1024 weights (several per large weight) or whole tensors."""
    if kind.startswith("numpy"):
        monkeypatch.setattr(native, "available", lambda: False)
    else:
        assert native.available()
    monkeypatch.setattr(encoder, "CHUNK_WEIGHTS", 1024 if kind.endswith("small chunks") else 2**40)


@pytest.fixture(params=ENCODER_KINDS)
def encoder_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, custom_op_library: str) -> str:
    use_encoder(request.param, monkeypatch)
    return request.param


@pytest.mark.parametrize("options", OPTIONS, ids=lambda options: ",".join(map(str, options.values())) or "default")
@pytest.mark.parametrize("fixture_name", (*ALL_MODEL_FIXTURES, "large_gemm_model"))
def test_streamed_file_is_the_in_memory_transform_byte_for_byte(
    fixture_name: str, options: dict, encoder_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = large_gemm_model() if fixture_name == "large_gemm_model" else request.getfixturevalue(fixture_name)
    if options.get("format") and fixture_name in ("qdq_model", "conv_integer_model"):
        pytest.skip("only fp32 weights are converted")
    source = tmp_path / "model.onnx"
    onnx.save_model(model, source)
    streamed, in_memory = tmp_path / "streamed.onnx", tmp_path / "in_memory.onnx"
    report = transform_file(source, streamed, ops=model_ops(fixture_name), **options)
    protected, expected_report = transform_with_report(source, ops=model_ops(fixture_name), **options)
    modelio.save_model(protected, in_memory)

    assert streamed.read_bytes() == in_memory.read_bytes()
    assert report == expected_report
    assert source.read_bytes() == onnx.load_model(source).SerializeToString()  # untouched, still the model saved


@pytest.mark.parametrize("options", OPTIONS, ids=lambda options: ",".join(map(str, options.values())) or "default")
def test_every_encoder_writes_the_same_file(options: dict, tmp_path: Path, custom_op_library: str) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(large_gemm_model(), source)
    written = {}
    for kind in ENCODER_KINDS:
        with pytest.MonkeyPatch.context() as monkeypatch:
            use_encoder(kind, monkeypatch)
            output = tmp_path / f"{kind}.onnx"
            written[kind] = (transform_file(source, output, **options), output.read_bytes())

    assert len(set(written.values())) == 1, sorted(written)


@pytest.mark.parametrize("code", ["parity", "secded"])
def test_streamed_range_max_is_the_fault_free_maximum_of_the_decoded_weights(
    code: str, encoder_kind: str, tmp_path: Path
) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(large_gemm_model(), source)
    output = tmp_path / "protected.onnx"

    report = transform_file(source, output, code=code, range_check=True, word="64")

    read = modelio.load_model(output)
    nodes = {node.output[0]: node for node in read.graph.node if node.op_type == "ParityCheckUnpack"}
    for tensor in report.tensors:
        packed_tensor = next(t for t in read.graph.initializer if t.name == packed_name(tensor.name))
        packed = onnx.numpy_helper.to_array(packed_tensor)
        shape = next(list(v.type.tensor_type.shape.dim) for v in read.graph.value_info if v.name == tensor.name)
        decoded = codec.decode(packed, "fp32", 64, [dim.dim_value for dim in shape], code=code)
        largest = codec.max_magnitude(decoded.weights)
        node_max = next(a.f for a in nodes[tensor.name].attribute if a.name == "range_max")
        assert tensor.range_max == largest and np.float32(node_max) == np.float32(largest)


def test_streamed_external_data_model_is_the_in_memory_transform(
    external_data_model: Path, encoder_kind: str, tmp_path: Path
) -> None:
    streamed, in_memory = tmp_path / "streamed.onnx", tmp_path / "in_memory.onnx"
    report = transform_file(external_data_model, streamed, format="bf16")
    protected, expected_report = transform_with_report(external_data_model, format="bf16")
    modelio.save_model(protected, in_memory)

    assert report == expected_report
    assert modelio.load_model(streamed).SerializeToString() == modelio.load_model(in_memory).SerializeToString()


@pytest.mark.parametrize(("replacement", "message"), [
    ([3.4e38, 1.0], "outside the finite bf16 range"),
    ([np.inf, -np.inf], "only infinite weights"),  # a last word of odd parity
])
def test_an_error_while_streaming_leaves_nothing_behind(
    replacement: list[float], message: str, encoder_kind: str, tmp_path: Path
) -> None:
    model = large_gemm_model()
    second = onnx.numpy_helper.to_array(model.graph.initializer[1]).copy()
    second.reshape(-1)[-2:] = replacement  # the last word of the second weight
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(second, "b.w"))
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / "model.onnx"
    onnx.save_model(model, source)
    before = source.read_bytes()
    output = tmp_path / "out" / "protected.onnx"
    output.parent.mkdir()

    with pytest.raises(OppassError, match=message):
        transform_file(source, output, format="bf16" if "bf16" in message else "keep", word="64")

    assert list(output.parent.iterdir()) == []  # no output, no temporary file
    assert source.read_bytes() == before and list(folder.iterdir()) == [source]


@pytest.mark.parametrize(("model_options", "message"), [
    ({"check": "load"}, "already protected (it has standard-op load checks)"),
    ({"check": "load-custom", "code": "secded"}, "already protected (it has ai.oppass nodes)"),
])
def test_a_protected_model_is_refused_and_nothing_written(
    model_options: dict, message: str, tmp_path: Path, custom_op_library: str
) -> None:
    source, protected = tmp_path / "model.onnx", tmp_path / "protected.onnx"
    onnx.save_model(large_gemm_model(), source)
    transform_file(source, protected, **model_options)
    output = tmp_path / "out" / "again.onnx"
    output.parent.mkdir()

    with pytest.raises(OppassError, match=re.escape(message)):
        transform_file(protected, output)

    assert list(output.parent.iterdir()) == []


def test_nothing_to_protect_is_an_error_unless_allowed(tmp_path: Path, custom_op_library: str) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(large_gemm_model(), source)
    output = tmp_path / "out" / "protected.onnx"
    output.parent.mkdir()

    with pytest.raises(OppassError, match="no weight of Conv was found to protect: nothing written"):
        transform_file(source, output, ops=("Conv",))
    assert list(output.parent.iterdir()) == []
    with pytest.warns(UserWarning, match="written unprotected"):
        report = transform_file(source, output, ops=("Conv",), allow_unprotected=True)

    assert report.tensors == ()
    assert modelio.load_model(output).SerializeToString() == onnx.load_model(source).SerializeToString()


def test_a_model_file_read_deferred_is_protected_in_place_and_streamed(tmp_path: Path, custom_op_library: str) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(large_gemm_model(), source)
    read = modelio.read_model(source, defer=True)

    report = transform_file(read, tmp_path / "protected.onnx")

    assert [tensor.name for tensor in report.tensors] == ["a.w", "b.w"]
    assert any(modelio.is_placeholder(tensor) for tensor in read.model.graph.initializer)
    with pytest.raises(OppassError):  # a placeholder without its producer is never written
        modelio.save_model(read.model, tmp_path / "again.onnx", source=read)


# ----------------------------------------------------------------------------- bounded memory


PEAK_SCRIPT = """
import sys
from oppass import cli
status = cli.main(sys.argv[1:])
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak", peak)
sys.exit(status)
"""


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(2**24):
            hasher.update(block)
    return hasher.hexdigest()


@pytest.mark.slow
def test_a_model_over_2_gb_is_transformed_in_memory_bounded_by_its_largest_tensor(
    tmp_path: Path, custom_op_library: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    model = write_matmul_stack(folder, layers=11, width=2048)  # 66 weights of 16 or 64 MiB: 2.06 GiB
    data = folder / "stack.onnx.data"
    assert data.stat().st_size > 2**31
    digests = {path: _digest(path) for path in (model, data)}
    output = tmp_path / "out" / "protected.onnx"
    output.parent.mkdir()

    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) forking test process
    result = subprocess.run([sys.executable, "-P", "-c", PEAK_SCRIPT, "transform", str(model), str(output),
                             "--ops", "MatMul", "--no-verify"], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split("peak")[-1])
    assert peak < 2**30, f"peak RSS {peak / 2**20:.0f} MiB for a {data.stat().st_size / 2**30:.2f} GiB model"
    assert {path: _digest(path) for path in (model, data)} == digests  # the input is never modified
    assert (output.parent / "protected.onnx.data").stat().st_size > 2**31
    protected = protected_models.inspect(output)
    assert len(protected) == 66
    read = modelio.read_model(output, defer=True)
    original = modelio.read_model(model, defer=True)
    for name in ("layer0.w0", "layer10.w5"):  # the first and the last weight decode to the adjusted weights
        packed_tensor = next(t for t in read.model.graph.initializer if t.name == packed_name(name))
        packed = np.frombuffer(read.tensor_bytes(packed_tensor), np.uint64).reshape(tuple(packed_tensor.dims))
        weight = next(t for t in original.model.graph.initializer if t.name == name)
        values = np.frombuffer(original.tensor_bytes(weight), np.float32).reshape(tuple(weight.dims))
        decoded = codec.decode(packed, "fp32", 64, values.shape)
        expected = codec.encode(values, 64).adjusted
        assert decoded.masked_words == 0 and expected is not None
        np.testing.assert_array_equal(decoded.weights.view(np.uint32), expected.view(np.uint32))


# ----------------------------------------------------------------------------- streamed strip and inject


def _tensors(path: Path) -> dict[str, bytes]:
    model = modelio.load_model(path)
    return {tensor.name: tensor.SerializeToString() for tensor in model.graph.initializer}


@pytest.mark.parametrize("options", OPTIONS, ids=lambda options: ",".join(map(str, options.values())) or "default")
@pytest.mark.parametrize("ber", [1e-3, 0.5])
def test_cli_strip_and_inject_stream_what_the_library_computes(
    options: dict, ber: float, tmp_path: Path, custom_op_library: str
) -> None:
    source, protected = tmp_path / "model.onnx", tmp_path / "protected.onnx"
    onnx.save_model(large_gemm_model(), source)
    transform_file(source, protected, **options)
    before = protected.read_bytes()
    stripped, faulty = tmp_path / "stripped.onnx", tmp_path / "faulty.onnx"

    assert cli.main(["strip", str(protected), str(stripped)]) == 0
    assert cli.main(["inject", str(protected), str(faulty), "--ber", str(ber), "--seed", "3"]) == 0

    expected_faulty, flips = protected_models.inject(protected, ber, 3)
    assert flips > 0
    expected = {tensor.name: tensor.SerializeToString() for tensor in expected_faulty.graph.initializer}
    assert _tensors(faulty) == expected
    assert _tensors(stripped) == {tensor.name: tensor.SerializeToString()
                                  for tensor in protected_models.strip(protected).graph.initializer}
    assert protected.read_bytes() == before


def test_segment_flips_are_the_positions_drawn_over_the_whole_stream() -> None:
    sizes = [10, 3000, 1, 0, 500]
    for ber, chunk in ((0.5, 7), (0.5, 2**20), (1e-3, 1), (1.0, 100), (0.0, 5)):
        expected = [np.random.default_rng(3).integers(0, 255, size=size, dtype=np.uint8) for size in sizes]
        flipped = [buffer.copy() for buffer in expected]
        positions = faults.draw_flip_positions(np.random.default_rng(9), 8 * sum(sizes), ber)
        faults.flip_bits(expected, positions)
        flips = faults.SegmentFlips(np.random.default_rng(9), sizes, ber, chunk)
        for index in (2, 0, 4, 1, 3):  # any order
            flips.flip(index, flipped[index])
        assert all(np.array_equal(a, b) for a, b in zip(expected, flipped, strict=True)), (ber, chunk)
        assert flips.count == positions.size


def _one_weight_file(folder: Path, mebibytes: int, fmt: str, check: str = "runtime") -> Path:
    """A protected Gemm of one weight of `mebibytes` MiB of fp32 values, in `fmt` and `check` mode, with external
    data."""
    side = 1024
    plain = folder / "plain.onnx"
    weight = np.random.default_rng(0).standard_normal((mebibytes * 2**20 // (4 * side), side), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, weight.shape[0]])],
                              [onnx.numpy_helper.from_array(weight, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), plain,
                    save_as_external_data=True, location="plain.onnx.data")
    protected = folder / "protected.onnx"
    transform_file(plain, protected, format=fmt, check=check)
    return protected


SESSION_SCRIPT = PEAK_SCRIPT.replace("from oppass import cli\nstatus = cli.main(sys.argv[1:])", """
import numpy as np
from oppass import runtime
if sys.argv[1:]:
    runtime.load_session(sys.argv[1]).run(None, {"x": np.ones((1, 1024), np.float32)})
status = 0""")


def _peak_above_imports(*arguments: str, script: str = PEAK_SCRIPT) -> int:
    """VmHWM of `oppass ARGUMENTS` (or of `script`) in a fresh interpreter, less that of one that only imported
    what it imports."""
    peaks = []
    baseline = script.replace("status = cli.main(sys.argv[1:])", "status = 0")  # the same imports, no work
    for job, job_arguments in ((script, arguments), (baseline, ())):
        result = subprocess.run([sys.executable, "-P", "-c", job, *job_arguments], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, result.stderr
        peaks.append(int(result.stdout.split("peak")[-1]))
    return peaks[0] - peaks[1]


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_strip_decodes_a_weight_chunk_by_chunk(fmt: str, tmp_path: Path, custom_op_library: str) -> None:
    protected = _one_weight_file(tmp_path, 48, fmt)

    peak = _peak_above_imports("strip", str(protected), str(tmp_path / "plain-again.onnx"))

    # The whole-model strip held 5-6x the weight (the model, its copy, the decoded weights and their protos).
    assert peak < 3 * 48 * 2**20, f"strip peaked {peak / 2**20:.0f} MiB above the imports for a 48 MiB weight"


def test_inject_at_a_high_rate_holds_a_chunk_of_positions(tmp_path: Path, custom_op_library: str) -> None:
    protected = _one_weight_file(tmp_path, 32, "fp32")

    peak = _peak_above_imports("inject", str(protected), str(tmp_path / "faulty.onnx"), "--ber", "0.5", "--seed", "1")

    # Drawing all 2^27 positions at once took 8 bytes per position (1 GiB) and as much again for the gaps.
    assert peak < 4 * 32 * 2**20, f"inject --ber 0.5 peaked {peak / 2**20:.0f} MiB above the imports for 32 MiB"


@pytest.mark.parametrize(("check", "fmt"), [("runtime", "fp32"), ("runtime", "int8"), ("load-custom", "fp32")])
def test_load_session_holds_few_copies_of_a_weight(check: str, fmt: str, tmp_path: Path,
                                                   custom_op_library: str) -> None:
    protected = _one_weight_file(tmp_path, 48, fmt, check)

    peak = _peak_above_imports(str(protected), script=SESSION_SCRIPT)

    # It held 5-6x (int8: 6.4x, as fp32 words): the file's model, its decoding model and session, the folded model,
    # its bytes and onnxruntime's copies. Now: the packed words and the decoded weight (or the session's mapped
    # words and one run's output), about 2.2x.
    assert peak < 3 * 48 * 2**20, f"load_session peaked {peak / 2**20:.0f} MiB above the imports for 48 MiB"


def test_load_mode_nodes_sharing_a_packed_weight_hold_one_decoded_copy(tmp_path: Path,
                                                                       custom_op_library: str) -> None:
    protected = _one_weight_file(tmp_path, 16, "fp32", "load-custom")
    model = modelio.load_model(protected)
    decode, gemm = model.graph.node[0], model.graph.node[1]
    gemm.output[0] = "y0"
    for index in range(1, 16):  # 16 decode nodes of one packed tensor, each feeding its own Gemm, summed
        for template, weight, output in ((decode, None, f"w{index}"), (gemm, f"w{index}", f"y{index}")):
            node = model.graph.node.add()
            node.CopyFrom(template)
            node.name = f"{template.name}{index}"
            if weight is not None:
                node.input[1] = weight
            node.output[0] = output
    model.graph.node.append(helper.make_node("Sum", [f"y{index}" for index in range(16)], ["y"]))
    shared = tmp_path / "shared.onnx"
    modelio.save_model(model, shared)

    peak = _peak_above_imports(str(shared), script=SESSION_SCRIPT)

    # 6.6x before: the decoding model and session held the packed tensor thrice, the folded model its decoded copy.
    assert peak < 3 * 16 * 2**20, f"load_session peaked {peak / 2**20:.0f} MiB above the imports for 16 MiB"


def test_inspect_reads_no_weight(tmp_path: Path, custom_op_library: str) -> None:
    protected = _one_weight_file(tmp_path, 48, "fp32")

    peak = _peak_above_imports("inspect", str(protected))

    # Loading the model read every packed byte, twice over (the file's bytes, then the proto's): 2x the weight.
    assert peak < 16 * 2**20, f"inspect peaked {peak / 2**20:.0f} MiB above the imports for a 48 MiB weight"


CAMPAIGN_SCRIPT = PEAK_SCRIPT.replace("from oppass import cli\n",
                                      "from oppass import cli\nfrom oppass.campaign import runner\n")


# 8.3x before (parity): the worker's copy of the model, the variant's bytes serialised and parsed by onnxruntime,
# the planning session's copies; then 4.7x (parity) and 6.3x (SEC-DED): the variant's proto, the buffers' pristine
# copy, the code's words, onnxruntime's arena doubling. Now (tools/bench, 64 MiB) 2.7x and 3.0x: the buffers,
# onnxruntime's decode and the prepared flips of BER 1e-3.
@pytest.mark.parametrize(("protect", "copies"), [("parity:64", 4), ("secded:64", 4), ("parity:64+range", 4)])
def test_a_campaign_trial_holds_few_copies_of_the_weight(tmp_path: Path, custom_op_library: str, protect: str,
                                                         copies: float) -> None:
    _one_weight_file(tmp_path, 48, "fp32")  # writes plain.onnx, the campaign's input, too
    np.savez(tmp_path / "inputs.npz", inputs=np.ones((1, 1, 1024), np.float32))

    peak = _peak_above_imports("campaign", str(tmp_path / "plain.onnx"), "--data", str(tmp_path / "inputs.npz"),
                               "--out", str(tmp_path / "campaign"), "--formats", "fp32", "--protect", protect,
                               "--ber", "1e-3:1e-3", "--points-per-decade", "1", "--exps", "1", "--batch", "1",
                               "--scheduler", "serial", "--metric", "golden",
                               script=CAMPAIGN_SCRIPT)

    assert peak < copies * 48 * 2**20, \
        f"a one-trial campaign ({protect}) peaked {peak / 2**20:.0f} MiB above the imports for 48 MiB"


@pytest.mark.parametrize("options", [{}, {"format": "bf16", "code": "secded"}, {"check": "none", "word": "weight"}])
def test_placeholder_producers_write_the_packed_tensors_transform_makes(tmp_path: Path, options: dict) -> None:
    _one_weight_file(tmp_path, 1, "fp32")  # writes plain.onnx
    plain = tmp_path / "plain.onnx"
    whole = {tensor.name: tensor.raw_data for tensor in transform(plain, **options).graph.initializer}

    model, producers = transform_to_placeholders(plain, **options)

    placeholders = [tensor for tensor in model.graph.initializer if modelio.is_placeholder(tensor)]
    assert sorted(tensor.name for tensor in placeholders) == sorted(producers) == [packed_name("w")]
    assert not any(onnx.external_data_helper.uses_external_data(tensor) for tensor in modelio.all_tensors(model)
                   if not modelio.is_placeholder(tensor))
    for name, producer in producers.items():
        written = io.BytesIO()
        producer.write(written)
        assert written.getvalue() == whole[name] and producer.nbytes == len(whole[name])
