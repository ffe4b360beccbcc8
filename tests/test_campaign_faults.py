"""Campaign protections (`--protect`) and fault models (`--fault`, `--flips`, `--layers`): their definitions
hold, and protections over the same stored bits see the same faults."""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from oppass import codec, faults
from oppass.campaign import CampaignConfig, faultmodels, protection, run_campaign, worker
from oppass.campaign import cli as campaign_cli
from oppass.campaign.config import Condition, Variant, conditions, protection_label, protection_order
from oppass.campaign.injector import (
    BitPosition,
    EccProtected,
    NumpyDecoded,
    PackedWeights,
    StoredBits,
    StoredWords,
    Subspace,
)
from oppass.campaign.runner import make_plan
from oppass.campaign.store import Store
from oppass.encoder import CHUNK_WEIGHTS
from oppass.errors import OppassError
from oppass.formats import CODES, FORMATS, WORD_BITS

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx"


def config(out: Path, **changes: object) -> CampaignConfig:
    settings = dict(model=DIGITS_MODEL, data="digits", out=out, formats=("fp32",), protections=("none", "64"),
                    ber_min=1e-3, ber_max=1e-3, points_per_decade=1, experiments=3, batch_size=60,
                    metric="top1", scheduler="serial", seed=4)
    return CampaignConfig(**{**settings, **changes})


def stored_trials(out: Path, cfg: CampaignConfig) -> list:
    store = Store(out, make_plan(cfg).identity)
    trials = store.trials()
    store.close()
    return trials


# ----------------------------------------------------------------------------------- protections


@pytest.mark.parametrize(("name", "canonical"), [
    ("none", "none"), ("ecc", "ecc"), ("range", "range"), ("none+range", "range"), ("weight", "weight"),
    ("parity:64", "64"), ("parity:weight+range", "weight+range"), ("64+range", "64+range"),
    ("secded:64", "secded:64"), ("secded:weight+range", "secded:weight+range"),
])
def test_protection_names_are_canonical(name: str, canonical: str) -> None:
    assert protection.canonical(name) == canonical
    assert protection.parse(canonical) == protection.parse(name)


@pytest.mark.parametrize(("name", "fmt", "label"), [
    ("none", "fp32", "none"), ("range", "fp32", "range check"), ("weight", "bf16", "OP per weight"),
    ("64", "fp32", "OP per 64 bits"), ("256", "int8", "OP per 256 bits"), ("secded:64", "fp32", "SEC-DED per 64 bits"),
    ("secded:weight", "fp32", "SEC-DED per weight"), ("parity:64+range", "fp32", "OP per 64 bits + range"),
    ("secded:128+range", "bf16", "SEC-DED per 128 bits + range"), ("ecc", "int8", "ECC (72,64)"),
])
def test_protections_have_one_name_everywhere(name: str, fmt: str, label: str) -> None:
    assert protection_label(fmt, name) == protection.parse(name).label(fmt) == label


def test_legends_order_none_op_secded_then_ecc() -> None:
    names = ["ecc", "secded:64+range", "64", "secded:64", "none", "256", "weight", "range", "64+range"]
    assert sorted(names, key=lambda name: protection_order("fp32", name)) == \
        ["none", "range", "weight", "64", "64+range", "256", "secded:64", "secded:64+range", "ecc"]


@pytest.mark.parametrize("name", ["hamming:64", "parity:x", "ecc+range", "secded", "64bits"])
def test_unknown_protections_are_refused(name: str) -> None:
    with pytest.raises(OppassError, match="unknown protection"):
        protection.parse(name)


def test_secded_where_it_does_not_fit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OppassError, match="bf16"):
        config(tmp_path, formats=("bf16",), protections=("secded:16",))


def test_protections_over_the_same_bits_share_their_faults(tmp_path: Path, custom_op_library: str) -> None:
    cfg = config(tmp_path, protections=("none", "range", "weight", "64", "64+range", "secded:64", "ecc"))
    run_campaign(cfg)
    by_trial: dict[tuple[int, str], dict[str, tuple[int, int]]] = defaultdict(dict)
    for trial in stored_trials(tmp_path, cfg):
        storage = protection.parse(trial.protection).storage("fp32")
        by_trial[(trial.trial, storage)][trial.protection] = (trial.flips, trial.masked_words)
    assert len(by_trial) == 3 * 3  # W=32, W=64, ECC
    for (_, storage), trials in by_trial.items():
        assert len({flips for flips, _ in trials.values()}) == 1, trials  # the same draw
        if storage == "W=64":
            assert trials["64"][1] == trials["64+range"][1] > 0  # the same odd words, by the kernel and numpy
    # Sharing is of positions, not only counts: none and range differ only where the range check acts.
    conditions_ = {c.protection: c for c in conditions(cfg)}
    assert conditions_["none"].draw_key == conditions_["range"].draw_key == conditions_["weight"].draw_key
    assert conditions_["64"].draw_key == conditions_["secded:64"].draw_key != conditions_["ecc"].draw_key


def digits_cache(tmp_path: Path) -> worker.WorkerCache:
    worker._CACHES.clear()
    return worker.worker_cache(make_plan(config(tmp_path)).workload)


def test_numpy_parity_decode_matches_the_kernel(tmp_path: Path, custom_op_library: str) -> None:
    cache = digits_cache(tmp_path)
    kernel = cache.session(Variant("fp32", "64"))
    plain = cache.session(Variant("fp32", "parity:64"))
    simulated = NumpyDecoded(plain.weights, "fp32", 64, codec.PARITY, plain.code_words, None)
    inputs = cache.batch(0)[0]
    assert np.array_equal(kernel.run(inputs)[0], plain.run(inputs)[0])  # the same fault-free weights
    assert simulated.n_bits == kernel.stored.n_bits
    for ber in (1e-4, 3e-3):
        positions = faults.draw_flip_positions(np.random.default_rng(7), simulated.n_bits, ber)
        on_kernel, on_numpy = kernel.stored.prepare(positions), simulated.prepare(positions)
        kernel.stored.inject(on_kernel)
        simulated.inject(on_numpy)
        (expected, masked), (got, _) = kernel.run(inputs), plain.run(inputs)
        kernel.stored.restore(on_kernel)
        simulated.restore(on_numpy)
        assert masked == on_numpy.masked > 0 and expected.tobytes() == got.tobytes()
    kernel.weights.verify()
    plain.weights.verify()


def test_secded_corrects_single_flips_and_masks_double_ones(tmp_path: Path, custom_op_library: str) -> None:
    session = digits_cache(tmp_path).session(Variant("fp32", "secded:64"))
    target = session.decoded(protection.parse("secded:64"))
    singles = np.arange(0, 64 * 200, 64 + 1)  # one flip in each of 200 words, every bit position in turn
    single = target.prepare(singles)
    assert single.masked == 0 and np.array_equal(single.change, single.clean)
    double = target.prepare(np.array([64 * 5 + 3, 64 * 5 + 40]))
    target.inject(double)
    assert double.masked == 1 and not session.weights.buffers[0].reshape(-1)[10:12].any()  # word 5: weights 10, 11
    target.restore(double)
    session.weights.verify()


def test_range_check_zeroes_weights_beyond_the_fault_free_maximum(tmp_path: Path, custom_op_library: str) -> None:
    session = digits_cache(tmp_path).session(Variant("fp32", "none"))
    target = session.decoded(protection.parse("range"))
    maxima = [np.abs(buffer.view(np.float32)).max() for buffer in session.weights.buffers]
    injection = target.prepare(faults.draw_flip_positions(np.random.default_rng(1), target.n_bits, 0.02))
    plain = session.stored.prepare(faults.draw_flip_positions(np.random.default_rng(1), target.n_bits, 0.02))
    target.inject(injection)
    checked = [buffer.view(np.float32).copy() for buffer in session.weights.buffers]
    target.restore(injection)
    session.stored.inject(plain)
    flipped = [buffer.view(np.float32).copy() for buffer in session.weights.buffers]
    session.stored.restore(plain)
    for weights, unchecked, bound in zip(checked, flipped, maxima, strict=True):
        with np.errstate(invalid="ignore"):
            inside = np.abs(unchecked) <= bound
        assert np.array_equal(weights[inside], unchecked[inside])  # in range: the flipped value stays
        assert (weights[~inside] == 0).all() and (~inside).any()


# ---------------------------------------------------------------------------------- fault models


def space(seed: int = 0) -> StoredBits:
    rng = np.random.default_rng(seed)
    return StoredBits(PackedWeights.of([rng.integers(0, 2**32, size=(5000, 1), dtype=np.uint32),
                                     rng.integers(0, 256, size=(333, 1), dtype=np.uint8)]))


def draws(model: str, target: object, ber: float, count: int | None = None, trials: int = 300) -> list[np.ndarray]:
    fault = faultmodels.parse(model)
    return [fault.positions(np.random.default_rng(t), target, ber, count, faults.SAMPLER_GAPS)  # type: ignore
            for t in range(trials)]


def within(values: list[int], mean: float, variance: float) -> bool:
    """The sample mean of `values` lies within 5 standard errors of `mean`."""
    return abs(np.mean(values) - mean) < 5 * math.sqrt(variance / len(values)) + 1e-9


def test_independent_flips_are_binomial_and_a_count_is_exact() -> None:
    target = space()
    counts = [d.size for d in draws("flip", target, 1e-3)]
    assert within(counts, target.n_bits * 1e-3, target.n_bits * 1e-3)
    assert all(d.size == 7 and np.unique(d).size == 7 for d in draws("flip", target, 0.0, count=7, trials=20))


@pytest.mark.parametrize("value", [0, 1])
def test_stuck_cells_read_their_value_and_persist_across_a_trials_batches(value: int) -> None:
    target = space()
    fault = faultmodels.parse(f"stuck:{value}")
    changed = fault.positions(np.random.default_rng(3), target, 0.01, None, faults.SAMPLER_GAPS)
    cells = faults.draw_flip_positions(np.random.default_rng(3), target.n_bits, 0.01)
    assert np.array_equal(changed, cells[target.bits(cells) != value])  # the stuck cells holding the other value
    injection = target.prepare(changed)
    reads = []
    for _batch in range(3):  # every inference of the trial reads the same stuck cells
        target.inject(injection)
        reads.append(StoredBits(PackedWeights.of([target.weights.block.copy()])).bits(cells))
        target.restore(injection)
    assert all((read == value).all() for read in reads)
    again = fault.positions(np.random.default_rng(3), target, 0.01, None, faults.SAMPLER_GAPS)
    assert np.array_equal(again, changed)  # the trial's map comes from the trial's stream alone
    counts = [d.size for d in draws(f"stuck:{value}", target, 1e-3)]
    ones = target.ones()
    held = target.n_bits - ones if value == 1 else ones  # cells that change when stuck
    assert within(counts, held * 1e-3, held * 1e-3)


@pytest.mark.parametrize(("width", "row"), [(2, 64), (3, 64), (4, 72)])
def test_multi_bit_upsets_are_adjacent_bits_of_one_row(width: int, row: int) -> None:
    if row == 72:
        target: object = EccProtected(PackedWeights.of([np.arange(4000, dtype=np.uint64).reshape(-1, 1)]))
    else:
        target = space()
    n_bits = target.n_bits  # type: ignore[attr-defined]
    starts = (n_bits // row) * (row - width + 1) + max(0, n_bits % row - width + 1)
    all_draws = draws(f"mbu:{width}", target, 1e-3)
    for positions in all_draws[:50]:
        runs = np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1)
        for run in runs:  # overlapping upsets merge into longer runs; a lone upset is exactly `width` long
            assert run.size >= width and run[0] // row == run[-1] // row
    upsets = [sum(len(r) // width for r in np.split(d, np.flatnonzero(np.diff(d) != 1) + 1)) if d.size else 0
              for d in all_draws]
    assert within(upsets, starts * 1e-3 / width, starts * 1e-3 / width * 1.2)


def test_asymmetric_flips_have_their_two_rates() -> None:
    target = space(2)
    ones = target.ones()
    zeros = target.n_bits - ones
    rises, falls = [], []
    for positions in draws("asym:4", target, 1e-3):
        before = target.bits(positions)
        rises.append(int(np.count_nonzero(before == 0)))
        falls.append(int(np.count_nonzero(before == 1)))
        assert np.unique(positions).size == positions.size
    assert within(rises, zeros * 1e-3, zeros * 1e-3)
    assert within(falls, ones * 4e-3, ones * 4e-3)


def test_asymmetric_draws_are_uniform_among_the_bits_of_their_value() -> None:
    block = np.zeros((64, 1), dtype=np.uint8)
    block[:8] = 0xFF  # 64 ones, 448 zeros
    target = StoredBits(PackedWeights.of([block]))
    hits = np.zeros(target.n_bits)
    for positions in draws("asym:1", target, 0.05, trials=2000):
        hits[positions] += 1
    ones, zeros = hits[:64], hits[64:]
    assert abs(ones.mean() - 2000 * 0.05) < 5 and abs(zeros.mean() - 2000 * 0.05) < 2
    assert ones.std() < 3 * math.sqrt(100) and zeros.std() < 3 * math.sqrt(100)


@pytest.mark.parametrize("kind", ["stored", "ecc", "decoded"])
def test_faults_restricted_to_chosen_layers_land_only_there(kind: str) -> None:
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 2**32, size=(n, 1), dtype=np.uint32) for n in (300, 77, 500)]
    weights = PackedWeights.of(arrays)
    if kind == "stored":
        target: object = StoredBits(weights)
    elif kind == "ecc":
        target = EccProtected(weights)
    else:
        target = NumpyDecoded(weights, "fp32", 64, codec.PARITY,
                              StoredWords.of([codec.pack(a.reshape(-1).view(np.float32), 64) for a in arrays]), None)
    sub = Subspace(target, [1, 2])  # type: ignore[arg-type]
    segments = target.segments([1, 2])  # type: ignore[attr-defined]
    assert sub.n_bits == int((segments[:, 1] - segments[:, 0]).sum())
    positions = sub.to_target(faults.draw_flip_positions(np.random.default_rng(0), sub.n_bits, 0.05))
    inside = ((positions[:, None] >= segments[:, 0]) & (positions[:, None] < segments[:, 1])).any(axis=1)
    assert positions.size > 100 and inside.all()
    assert np.array_equal(sub.bits(np.arange(sub.n_bits)), target.bits(np.concatenate(  # type: ignore
        [np.arange(start, stop) for start, stop in segments])))


def test_bad_fault_models_are_refused_in_one_line(tmp_path: Path) -> None:
    for text in ("stuck:2", "mbu:1", "asym:-1", "burst"):
        with pytest.raises(OppassError, match="unknown fault model"):
            faultmodels.parse(text)
    with pytest.raises(OppassError, match="--flips does not apply"):
        config(tmp_path, fault="asym:2", flip_counts=(1,))
    with pytest.raises(OppassError, match="at least 1"):
        config(tmp_path, flip_counts=(0, 2))


def test_flip_count_campaign_restricted_to_a_layer(tmp_path: Path, custom_op_library: str) -> None:
    cfg = config(tmp_path, protections=("none", "64+range"), flip_counts=(1, 5), layers=("fc2.weight",), fault="mbu:2")
    assert [c.key for c in conditions(cfg)][:2] == ["ber/fp32/none/mbu:2/flips=1/layers=fc2.weight",
                                                    "ber/fp32/none/mbu:2/flips=5/layers=fc2.weight"]
    run_campaign(cfg)
    trials = stored_trials(tmp_path, cfg)
    assert len(trials) == 2 * 2 * 3
    for trial in trials:
        count = int(trial.condition_key.split("flips=")[1].split("/")[0])
        assert trial.flips in range(count + 1, 2 * count + 1)  # K upsets of 2 bits, overlaps merged
        assert trial.ber == pytest.approx(count / trial.n_bits) and trial.n_bits < 38160 * 32 / 4
    with pytest.raises(OppassError, match="no protected weight tensor named 'fc9.w'"):
        run_campaign(config(tmp_path / "other", layers=("fc9.w",)))


def test_secded_trials_store_the_words_they_corrected(tmp_path: Path, custom_op_library: str) -> None:
    # One flip: one word corrected. Two: two words corrected, or one word with both, zeroed (detected).
    cfg = config(tmp_path, protections=("none", "64", "secded:64", "ecc"), flip_counts=(1, 2), experiments=6)
    result = run_campaign(cfg)
    trials = stored_trials(tmp_path, cfg)
    assert len(trials) == 4 * 2 * 6
    for trial in trials:
        if trial.protection in ("none", "64"):
            assert trial.corrected_words is None
        else:
            assert trial.corrected_words is not None
            assert trial.corrected_words + 2 * trial.masked_words == trial.flips
    assert {t.corrected_words for t in trials if t.flips == 1 and t.protection == "secded:64"} == {1}
    means = {(s.protection, s.flips_mean): s.corrected_words_mean for s in result.summaries}
    assert means[("secded:64", 1.0)] == means[("ecc", 1.0)] == 1.0 and means[("64", 1.0)] is None


def test_command_line_options_of_protections_and_faults(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    campaign_cli.add_arguments(parser)
    args = parser.parse_args([str(DIGITS_MODEL), "--data", "digits", "--out", str(tmp_path), "--protect",
                              "none,parity:64+range,secded:64", "--fault", "stuck:1", "--flips", "1,2,5",
                              "--layers", "conv1.weight,fc1.weight"])
    cfg = campaign_cli.config_from_args(args)
    assert cfg.protections == ("none", "64+range", "secded:64")
    assert (cfg.fault, cfg.flip_counts, cfg.layers) == ("stuck:1", (1, 2, 5), ("conv1.weight", "fc1.weight"))
    legacy = campaign_cli.config_from_args(parser.parse_args([str(DIGITS_MODEL), "--data", "digits", "--out",
                                                              str(tmp_path), "--op", "none,64"]))
    assert legacy.protections == ("none", "64") and legacy.fault == "flip" and not legacy.flip_counts
    assert Condition("ber", "fp32", "64", 1e-6).key == "ber/fp32/64/ber=1e-06"  # keys of older stores


def test_each_target_reads_its_stored_bits() -> None:
    rng = np.random.default_rng(9)
    arrays = [rng.integers(0, 2**32, size=(n, 1), dtype=np.uint32) for n in (31, 8)]
    weights = PackedWeights.of(arrays)
    stream = np.concatenate([np.unpackbits(a.view(np.uint8).reshape(-1), bitorder="little") for a in arrays])
    stored = StoredBits(weights)
    words = [codec.pack(a.reshape(-1).view(np.float32), 128) for a in arrays]
    decoded = NumpyDecoded(weights, "fp32", 128, codec.PARITY, StoredWords.of(words), None)
    padded = np.concatenate([np.unpackbits(w.view(np.uint8).reshape(-1), bitorder="little") for w in words])
    encoded = [codec.encode(a.reshape(-1).view(np.float32), 64, code=codec.SECDED) for a in arrays]
    secded = NumpyDecoded(PackedWeights.of([e.adjusted for e in encoded]), "fp32", 64, codec.SECDED,
                          StoredWords.of([e.packed for e in encoded]), None)
    secded_words = np.concatenate([np.unpackbits(e.packed.view(np.uint8).reshape(-1), bitorder="little")
                                   for e in encoded])
    target = EccProtected(weights)
    data = np.unpackbits(weights.block, bitorder="little").reshape(-1, 64)
    check = np.unpackbits(target.check[:, None], axis=1, bitorder="little")
    codewords = np.concatenate([data, check], axis=1).reshape(-1)
    for space_, expected in ((stored, stream), (decoded, padded), (secded, secded_words), (target, codewords)):
        everything = np.arange(space_.n_bits)
        assert np.array_equal(space_.bits(everything), expected)
        assert space_.ones() == int(expected.sum())


def test_protections_fault_models_and_counts_extend_a_campaign_in_place(tmp_path: Path,
                                                                        custom_op_library: str) -> None:
    """A store grows by protections, flip counts and fault models like by BERs: only the new trials run, and they
    are those of a fresh run (shared draws included: `secded:64` added later sees `64`'s faults)."""
    first = config(tmp_path / "grown", protections=("64",), flip_counts=(2,), experiments=2)
    assert run_campaign(first, log=None).trials_run == 2
    wider = dict(protections=("64", "secded:64"), flip_counts=(2, 6), experiments=2)
    assert run_campaign(config(tmp_path / "grown", **wider), log=None).trials_run == 2 * 2 * 2 - 2
    assert run_campaign(config(tmp_path / "grown", **wider, fault="stuck:1"), log=None).trials_run == 2 * 2 * 2
    fresh = config(tmp_path / "fresh", **wider)
    run_campaign(fresh, log=None)

    def rows(out: Path, cfg: CampaignConfig) -> dict:
        return {(t.condition_key, t.trial): (t.flips, t.masked_words, t.correct, t.outcome, t.even_flip_words)
                for t in stored_trials(out, cfg)}

    grown = rows(tmp_path / "grown", config(tmp_path / "grown", **wider))
    assert len(grown) == 2 * 2 * 2 * 2 and sum("stuck:1" in key for key, _ in grown) == 2 * 2 * 2
    assert {key: row for key, row in grown.items() if "stuck" not in key[0]} == rows(tmp_path / "fresh", fresh)


@pytest.mark.parametrize("ber", [1e-300, 5e-324, 1e-19])
def test_gap_draws_at_rates_whose_gaps_overflow_int64_end(ber: float) -> None:
    """At tiny rates numpy gives int64's maximum for gaps beyond it: the draw still ends, with few flips."""
    rng = np.random.default_rng(0)
    positions = faults.draw_flip_positions(rng, 10**12, ber)
    assert positions.size <= 1 and ((positions >= 0) & (positions < 10**12)).all()
    again = faults.draw_flip_positions(np.random.default_rng(0), 10**12, ber)
    assert np.array_equal(positions, again)


class _SlicedProducer:
    """Writes an array's bytes in slices of an odd size, as a packed weight's producer does in its own."""

    def __init__(self, array: np.ndarray) -> None:
        self.data = array.tobytes()
        self.nbytes = len(self.data)

    def write(self, stream: BinaryIO) -> None:
        view = memoryview(self.data)
        for start in range(0, self.nbytes, 1_000_003):
            stream.write(view[start : start + 1_000_003])


@pytest.mark.parametrize(("code", "word"), [(codec.SECDED, "64"), (codec.PARITY, "64"), (codec.SECDED, "128")])
def test_campaign_encodes_a_tensor_in_chunks_exactly_as_the_codec_does_whole(code: str, word: str) -> None:
    rng = np.random.default_rng(11)
    tensors = [rng.standard_normal(size, dtype=np.float32) for size in (CHUNK_WEIGHTS * 2 + 37, 5)]
    layouts = [(tensor.shape, tensor.dtype) for tensor in tensors]
    words, fill = worker.coded_fill([_SlicedProducer(tensor) for tensor in tensors], layouts, "fp32", code, word)
    weights = PackedWeights(layouts, fill)
    width = codec.word_bits("fp32", int(word), code)
    whole = [codec.encode(tensor, width, code=code) for tensor in tensors]
    assert words.counts.tolist() == [encoded.packed.shape[0] for encoded in whole]
    assert words.ones.tolist() == [int(np.bitwise_count(encoded.packed).sum()) for encoded in whole]
    for buffer, encoded in zip(weights.buffers, whole, strict=True):
        assert np.array_equal(buffer.view(np.uint32), encoded.adjusted.view(np.uint32))
    decoded = NumpyDecoded(weights, "fp32", width, code, words, None)  # the words encoded again from the block
    lanes = np.concatenate([encoded.packed for encoded in whole])
    positions = np.sort(rng.choice(decoded.n_bits, 200_000, replace=False))
    word, bit = np.divmod(positions, width)
    lane, shift = np.divmod(bit, min(width, 64))
    expected = ((lanes[word, lane] >> shift.astype(lanes.dtype)) & 1).astype(np.uint8)
    assert np.array_equal(decoded.bits(positions), expected) and decoded.ones() == int(np.bitwise_count(lanes).sum())


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("word", WORD_BITS)
def test_a_codes_words_are_the_encoding_of_their_fault_free_decode(fmt: str, code: str, word: int) -> None:
    """What lets the campaign keep no copy of a code's words (`StoredWords`): encoding the decode of the encoded
    weights gives the same words, with zeros of both signs, infinities and NaNs of every payload among them."""
    try:
        width = codec.word_bits(fmt, word, code)
    except OppassError:
        pytest.skip(f"{code} has no {word}-bit words of {fmt}")
    rng = np.random.default_rng(word)
    weight = FORMATS[fmt]
    codes = rng.integers(0, 2**weight.bits, size=4099, dtype=np.uint64).astype(weight.code_dtype)
    if weight.is_float:
        codes[:64] = 0
        codes[64:128] = 1 << (weight.bits - 1)  # -0.0
    weights = codes.view(weight.dtype)
    try:
        encoded = codec.encode(weights, width, code=code)
    except OppassError:  # a parity word of infinities only cannot be made even
        encoded = codec.encode(np.where(np.isinf(weights.astype(np.float32)), 0, weights).astype(weight.dtype),
                               width, code=code)
    again = codec.encode(encoded.adjusted, width, code=code)
    assert np.array_equal(again.packed, encoded.packed)
    decoded = codec.decode(encoded.packed, fmt, width, weights.shape, code=code).weights
    assert np.array_equal(decoded.view(weight.code_dtype), encoded.adjusted.view(weight.code_dtype))


def test_whole_space_scans_count_and_list_bits_a_scan_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting a space's ones and listing the bits that hold a value read it in scans of SCAN_BITS positions
    (no position array of the whole space): the same counts and bits as reading it at once."""
    monkeypatch.setattr(faultmodels, "SCAN_BITS", 1000)
    rng = np.random.default_rng(12)
    arrays = [np.zeros(n, dtype=np.uint32) for n in (300, 77, 500)]
    for array in arrays:  # few ones: listing them is the draw's way for bits of a rare value
        array[rng.choice(array.size, 5, replace=False)] = rng.integers(1, 2**32, 5, dtype=np.uint32)
    stored = StoredBits(PackedWeights.of(arrays))
    sub = Subspace(stored, [0, 2])
    sign = BitPosition(stored, 32, 31)
    assert sub.ones() == int(sum(np.bitwise_count(arrays[i]).sum() for i in (0, 2)))
    assert sign.ones() == int(sum(np.count_nonzero(array >> 31) for array in arrays))
    assert stored.ones() == int(sum(np.bitwise_count(array).sum() for array in arrays))
    chosen = faultmodels._holding(np.random.default_rng(1), sub, 1, sub.ones(), 20)
    assert chosen.size == 20 == np.unique(chosen).size and (sub.bits(chosen) == 1).all()
