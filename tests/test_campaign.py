"""Unit tests of the campaign building blocks: ECC, statistics/BERZAD, seeds, injectors, store."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sqlite3
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from oppass import faults
from oppass.campaign import ecc, injector, stats
from oppass.campaign.config import CampaignConfig, ber_grid, conditions
from oppass.campaign.injector import BitPosition, EccProtected, PackedWeights, RestorationError, StoredBits
from oppass.campaign.records import TrialRecord
from oppass.campaign.scheduler import CHUNK_TRIALS, tasks
from oppass.campaign.seeds import TrialStreams, batch_indices, stable_words, trial_rng
from oppass.campaign.store import Store, column_type
from oppass.errors import OppassError


def random_words(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size=count, dtype=np.uint64, endpoint=False)


def flip_codewords(data: np.ndarray, check: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Received words after flipping codeword bit positions[i, :] of word i (bits 64..71 are the check byte)."""
    data, check = data.copy(), check.copy()
    for column in positions.T:
        in_data = column < ecc.DATA_BITS
        data[in_data] ^= np.left_shift(np.uint64(1), column[in_data].astype(np.uint64))
        check[~in_data] ^= np.left_shift(1, column[~in_data] - ecc.DATA_BITS).astype(np.uint8)
    return data, check


# ------------------------------------------------------------------------------------- ECC


def test_ecc_check_byte_of_data_bit_0_is_hand_computed() -> None:
    # Data bit 0 sits at codeword position 3 = 0b11: Hamming bits 0 and 1 are set; the
    # overall parity of data (1 bit) and Hamming bits (2 bits) is odd, so bit 7 is set.
    assert ecc.encode(np.array([1], dtype=np.uint64))[0] == 0x83
    assert ecc.encode(np.array([0], dtype=np.uint64))[0] == 0


def test_ecc_clean_words_decode_unchanged() -> None:
    data = random_words(1000, 1)
    decoded, status = ecc.decode(data, ecc.encode(data))
    assert np.array_equal(decoded, data)
    assert (status == ecc.CLEAN).all()


def test_ecc_corrects_every_single_error() -> None:
    data = np.repeat(random_words(20, 2), ecc.CODEWORD_BITS)
    positions = np.tile(np.arange(ecc.CODEWORD_BITS), 20)[:, None]
    received = flip_codewords(data, ecc.encode(data), positions)
    decoded, status = ecc.decode(*received)
    assert np.array_equal(decoded, data)
    assert (status == ecc.CORRECTED).all()


def test_ecc_detects_every_double_error() -> None:
    pairs = np.array(list(itertools.combinations(range(ecc.CODEWORD_BITS), 2)))
    data = np.repeat(random_words(3, 3), len(pairs))
    received = flip_codewords(data, ecc.encode(data), np.tile(pairs, (3, 1)))
    _, status = ecc.decode(*received)
    assert (status == ecc.DETECTED).all()


def test_ecc_triple_errors_are_never_reported_clean() -> None:
    rng = np.random.default_rng(4)
    positions = np.stack([rng.choice(ecc.CODEWORD_BITS, 3, replace=False) for _ in range(2000)])
    data = random_words(2000, 5)
    decoded, status = ecc.decode(*flip_codewords(data, ecc.encode(data), positions))
    assert (status != ecc.CLEAN).all()
    assert (decoded[status == ecc.CORRECTED] != data[status == ecc.CORRECTED]).all()  # miscorrections


# ----------------------------------------------------------------------------- statistics


def test_t_interval_matches_the_student_table() -> None:
    interval = stats.t_interval([1.0, 2.0, 3.0])
    half_width = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) from a Student t table
    assert interval.mean == pytest.approx(2.0)
    assert interval.std == pytest.approx(1.0)
    assert (interval.low, interval.high) == pytest.approx((2.0 - half_width, 2.0 + half_width))


def test_single_experiment_interval_is_the_point() -> None:
    assert stats.t_interval([0.7]) == stats.Interval(0.7, 0.0, 0.7, 0.7)


@pytest.mark.parametrize(
    ("accuracy", "fault_free", "zero_loss"),
    [
        ([0.9, 0.8, 0.95], [0.9, 0.8, 0.95], True),  # identical: no drop at all
        ([0.88, 0.78, 0.93], [0.9, 0.8, 0.95], False),  # two samples (2/100) lost on every batch
        ([0.895, 0.795, 0.945], [0.9, 0.8, 0.95], True),  # half a sample: below the resolution
        ([0.901, 0.799, 0.951, 0.899], [0.9, 0.8, 0.95, 0.9], True),  # tiny noise around zero
        ([0.95, 0.2, 0.94, 0.9], [0.95, 0.8, 0.94, 0.9], False),  # one collapsed batch: the drop is not bounded
        ([0.5, 0.55, 0.45, 0.52], [0.9, 0.8, 0.94, 0.89], False),  # a clear drop
        ([0.92, 0.81, 0.96], [0.9, 0.8, 0.95], True),  # a gain is no loss
    ],
)
def test_zero_loss_rule_on_paired_batches(accuracy: list[float], fault_free: list[float], zero_loss: bool) -> None:
    assert stats.is_zero_loss(np.array(accuracy), np.array(fault_free), samples=100) is zero_loss


def test_berzad_is_the_last_ber_before_the_first_lossy_one() -> None:
    bers = [1e-7, 1e-6, 2e-6, 3e-6, 1e-5]
    assert stats.berzad(bers, [True, True, False, True, False]) == 1e-6  # lossy 2e-6 stops the scan


def test_berzad_sorts_the_grid_first() -> None:
    assert stats.berzad([1e-5, 1e-7, 1e-6], [False, True, True]) == 1e-6


def test_berzad_is_zero_when_the_lowest_ber_is_lossy() -> None:
    assert stats.berzad([1e-9, 1e-8], [False, True]) == 0.0


def test_berzad_is_infinite_when_nothing_is_lossy() -> None:
    assert stats.berzad([1e-9, 1e-8], [True, True]) == math.inf


# ---------------------------------------------------------------------------- grid and seeds


def test_paper_grid_has_one_to_nine_per_decade() -> None:
    grid = ber_grid(1e-9, 1e-1, 9)
    assert len(grid) == 8 * 9 + 1
    assert grid[:3] == (1e-9, 2e-9, 3e-9) and grid[-2:] == (9e-2, 1e-1)


def test_log_spaced_grid() -> None:
    assert ber_grid(1e-6, 1e-4, 2) == (1e-6, 3.16e-6, 1e-5, 3.16e-5, 1e-4)


def test_conditions_cover_formats_protections_bers_and_bits() -> None:
    config = CampaignConfig(model=Path("m.onnx"), data="digits", out=Path("o"), formats=("fp32", "int8"),
                            protections=("none", "64"), ber_min=1e-3, ber_max=1e-2, points_per_decade=1,
                            ecc=True, bit_positions=True)
    planned = conditions(config)
    assert len(planned) == 2 * 3 * 2 + (32 + 8) * 2
    assert len({condition.key for condition in planned}) == len(planned)


def test_tasks_hold_trials_of_one_variant_in_trial_order_and_cover_every_pending_pair() -> None:
    config = CampaignConfig(model=Path("m.onnx"), data="digits", out=Path("o"), formats=("fp32",),
                            protections=("none", "64"), ber_min=1e-6, ber_max=1e-2, points_per_decade=9, ecc=True)
    planned = conditions(config)  # 37 BERs: 74 conditions of the plain variant (none, ecc), 37 of the 64-bit one
    pending = [(condition, trial) for condition in planned for trial in range(3)]
    pending.remove((planned[5], 1))  # already stored
    work = tasks(pending)
    assert sorted((c.key, t) for task in work for c, t in task) == sorted((c.key, t) for c, t in pending)
    assert all(len({c.variant for c, _ in task}) == 1 for task in work)
    plain = [task for task in work if task[0][0].variant == planned[0].variant]
    sizes = [len(task) for task in plain]  # 221 pairs, split evenly
    assert len(sizes) == -(-221 // CHUNK_TRIALS) and sum(sizes) == 221 and max(sizes) - min(sizes) <= 1
    assert [t for task in plain for _, t in task] == sorted(t for c, t in pending if c.variant == planned[0].variant)
    assert [c for c, t in plain[0]] == [c for c in planned if c.variant == planned[0].variant][: sizes[0]]


def test_invalid_word_size_for_format_is_rejected() -> None:
    with pytest.raises(OppassError):
        CampaignConfig(model=Path("m.onnx"), data="digits", out=Path("o"), formats=("fp32",), protections=("16",))


def test_trial_streams_differ_by_condition_and_trial_and_repeat() -> None:
    draw = lambda key, trial: trial_rng(7, key, trial).integers(0, 2**32, 4).tolist()  # noqa: E731
    assert draw("a", 0) == draw("a", 0)
    assert draw("a", 0) != draw("a", 1)
    assert draw("a", 0) != draw("b", 0)


def test_stable_hash_does_not_depend_on_python_hash_seed() -> None:
    script = "from oppass.campaign.seeds import stable_words; print(stable_words('ber/fp32/64/ber=1e-06'))"
    outputs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{stable_words('ber/fp32/64/ber=1e-06')}\n"}


def test_batches_are_distinct_sorted_and_reproducible() -> None:
    first = batch_indices(3, 0, 450, 400)
    assert np.array_equal(first, batch_indices(3, 0, 450, 400))
    assert np.unique(first).size == 400 and (np.diff(first) > 0).all()
    assert not np.array_equal(first, batch_indices(3, 1, 450, 400))


# ------------------------------------------------------------------------------- injectors


def stream_bits(buffers: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.unpackbits(b.reshape(-1).view(np.uint8), bitorder="little") for b in buffers])


def sample_buffers() -> list[np.ndarray]:
    rng = np.random.default_rng(8)
    return [
        rng.integers(0, 2**64, size=(5, 1), dtype=np.uint64, endpoint=False),
        rng.integers(0, 256, size=(13, 1), dtype=np.uint8),
        rng.integers(0, 2**32, size=(7, 1), dtype=np.uint32),
    ]


def test_packed_weights_hold_the_arrays_on_8_byte_boundaries() -> None:
    arrays = sample_buffers()
    weights = PackedWeights.of(arrays)
    assert [b.ctypes.data - weights.block.ctypes.data for b in weights.buffers] == [0, 40, 56]
    assert all(np.array_equal(b, a) and b.dtype == a.dtype for b, a in zip(weights.buffers, arrays, strict=True))
    assert weights.block.size == 88 and weights.words.size == 11


@pytest.mark.parametrize("ber", [0.0, 0.05, 0.5])
@pytest.mark.parametrize(("dense_bits", "packed_bits"), [(0, 16), (10**9, 1), (10**9, 10**9)])  # never dense,
def test_stored_bits_flips_exactly_the_drawn_bits_and_restores(ber: float, dense_bits: int, packed_bits: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # ... always dense with the mask added byte by byte, always dense with a boolean mask packed
    monkeypatch.setattr(injector, "DENSE_BITS", dense_bits)
    monkeypatch.setattr(injector, "PACKED_BITS", packed_bits)
    weights = PackedWeights.of(sample_buffers())
    target = StoredBits(weights)
    before = stream_bits(weights.buffers)
    positions = faults.draw_flip_positions(np.random.default_rng(0), target.n_bits, ber, sort=False)
    injection = target.prepare(positions)
    target.inject(injection)
    assert injection.flips == positions.size
    assert np.array_equal(np.flatnonzero(stream_bits(weights.buffers) != before), np.sort(positions))
    target.restore(injection)
    assert np.array_equal(stream_bits(weights.buffers), before)
    weights.verify()


def test_trial_streams_give_each_trial_the_generator_trial_rng_seeds() -> None:
    streams = TrialStreams()
    for seed in (0, 7, 2**32 - 1, 2**32, 2**70 + 3):
        for key in ("ber/fp32/W=32/ber=1e-06", "bit/bf16/none/ber=0.1/bit=3"):
            for trial in (0, 1, 19, 2**31, 2**32, 2**40 + 1, 2**64 + 5):
                expected = trial_rng(seed, key, trial)
                rng = streams.rng(seed, key, trial)
                assert rng.bit_generator.state == expected.bit_generator.state
                assert np.array_equal(rng.standard_exponential(8), expected.standard_exponential(8))


@pytest.mark.parametrize("sampler", faults.SAMPLERS)
@pytest.mark.parametrize("ber", [1e-4, 1e-3, 0.02, 0.1, 0.7])  # both of numpy's sampling algorithms
def test_unsorted_draw_picks_the_same_positions_as_the_sorted_one(ber: float, sampler: int) -> None:
    drawn = faults.draw_flip_positions(np.random.default_rng(3), 1_000_000, ber, sort=False, sampler=sampler)
    again = faults.draw_flip_positions(np.random.default_rng(3), 1_000_000, ber, sampler=sampler)
    assert np.array_equal(np.sort(drawn), again) and np.unique(again).size == again.size


@pytest.mark.parametrize("count", [7, 15])  # below and above n/2 (the complement is drawn)
def test_distinct_positions_are_uniform_over_sets(count: int) -> None:
    rng = np.random.default_rng(5)
    draws = np.stack([faults.distinct_positions(rng, 20, count) for _ in range(4000)])
    assert all(np.all(np.diff(row) > 0) for row in draws) and draws.min() >= 0 and draws.max() < 20
    hits = np.zeros((20, 20))
    for row in draws:
        hits[np.ix_(row, row)] += 1
    singles, pairs = np.diag(hits), hits[~np.eye(20, dtype=bool)]
    n = len(draws)
    # Each position with probability count/20, each pair count(count-1)/380: within 5 standard errors.
    p1, p2 = count / 20, count * (count - 1) / 380
    assert np.abs(singles - n * p1).max() < 5 * math.sqrt(n * p1 * (1 - p1))
    assert np.abs(pairs - n * p2).max() < 5 * math.sqrt(n * p2 * (1 - p2))


@pytest.mark.parametrize("ber", [0.05, 0.6])
def test_gap_sampler_flips_each_bit_independently(ber: float) -> None:
    rng = np.random.default_rng(6)
    draws = [faults.draw_flip_positions(rng, 40, ber) for _ in range(4000)]
    counts = np.array([d.size for d in draws])
    n = len(draws)
    assert abs(counts.mean() - 40 * ber) < 5 * math.sqrt(40 * ber * (1 - ber) / n)
    assert counts.var() == pytest.approx(40 * ber * (1 - ber), rel=0.15)  # Binomial(40, ber)
    hits = np.zeros((40, 40))
    for row in draws:
        assert np.all(np.diff(row) > 0) and (row.size == 0 or (row[0] >= 0 and row[-1] < 40))
        hits[np.ix_(row, row)] += 1
    singles, pairs = np.diag(hits), hits[~np.eye(40, dtype=bool)]
    assert np.abs(singles - n * ber).max() < 5 * math.sqrt(n * ber * (1 - ber))
    assert np.abs(pairs - n * ber**2).max() < 5 * math.sqrt(n * ber**2 * (1 - ber**2))  # independent pairs


def test_sampler_memory_grows_with_flips_not_bits() -> None:
    import tracemalloc

    tracemalloc.start()
    positions = faults.draw_flip_positions(np.random.default_rng(0), 10**9, 2e-4)  # 1e9 bits, ~2e5 flips
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 150_000 < positions.size < 250_000 and np.all(np.diff(positions) > 0)
    assert peak < 20 * positions.nbytes  # the choice sampler would hold a permutation of 8 GB


def geometric_gap_positions(rng: np.random.Generator, n: int, ber: float) -> np.ndarray:
    """Store format 2's gap sampler as first written, with numpy's own geometric draws."""
    expected = n * ber
    chunk = int(expected + 5 * np.sqrt(expected) + 16)
    parts, last = [], -1
    while last < n:
        parts.append(last + np.cumsum(np.minimum(rng.geometric(ber, size=chunk), n + 1), dtype=np.int64))
        last = int(parts[-1][-1])
        chunk = max(16, int((n - last) * ber * 1.2) + 16)
    positions = np.concatenate(parts)
    return positions[: np.searchsorted(positions, n)]


@pytest.mark.parametrize(("n", "ber"), [
    (n, ber) for n in (1, 1000, 1_221_120, 10**12)
    for ber in (1e-300, 1e-12, 3.3e-7, 1e-3, 0.0774, 0.1, 0.3333, 0.34, 0.9) if n * ber <= 1e6  # <= 1e6 flips
])
def test_the_gap_sampler_is_numpys_geometric(n: int, ber: float) -> None:
    # Below p = 1/3 the sampler inverts numpy's exponential draws itself: the same positions, bit for bit.
    for seed in range(5):
        drawn = faults.draw_flip_positions(np.random.default_rng(seed), n, ber)
        assert np.array_equal(drawn, geometric_gap_positions(np.random.default_rng(seed), n, ber))


def test_the_choice_sampler_is_numpys_choice() -> None:
    drawn = faults.draw_flip_positions(np.random.default_rng(9), 5000, 0.1, sampler=faults.SAMPLER_CHOICE)
    rng = np.random.default_rng(9)
    count = rng.binomial(5000, 0.1)
    assert np.array_equal(drawn, np.sort(rng.choice(5000, size=count, replace=False)))


def test_restoration_check_catches_a_changed_byte() -> None:
    weights = PackedWeights.of(sample_buffers())
    target = StoredBits(weights)
    injection = target.prepare(faults.draw_flip_positions(np.random.default_rng(0), target.n_bits, 0.01))
    target.inject(injection)
    target.restore(injection)
    weights.verify()
    weights.buffers[1][1, 0] ^= 0x80  # a byte changes behind the injector's back
    with pytest.raises(RestorationError):
        weights.verify()


def test_bit_position_target_hits_only_that_bit_of_each_weight() -> None:
    weights = PackedWeights.of([np.zeros((100, 1), dtype=np.uint16)])
    target = BitPosition(StoredBits(weights), 16, 14)
    injection = target.prepare(faults.draw_flip_positions(np.random.default_rng(1), target.n_bits, 0.3))
    target.inject(injection)
    hit = np.flatnonzero(weights.buffers[0][:, 0])
    assert target.n_bits == 100 and hit.size == injection.flips > 0
    assert (weights.buffers[0][hit, 0] == 1 << 14).all()


def test_ecc_target_corrects_single_and_masks_double_errors() -> None:
    weights = PackedWeights.of([np.arange(1, 21, dtype=np.uint8).reshape(20, 1)])  # 3 codewords, the last one padded
    buffer, pristine = weights.buffers[0], weights.buffers[0].copy()
    target = EccProtected(weights)
    assert target.n_bits == 3 * ecc.CODEWORD_BITS
    single = target.prepare(np.array([5]))
    target.inject(single)
    assert single.masked == 0 and np.array_equal(buffer, pristine)
    target.restore(single)
    double = target.prepare(np.array([ecc.CODEWORD_BITS + 1, ecc.CODEWORD_BITS + 70]))  # a data and a check bit
    target.inject(double)
    assert double.masked == 1
    assert (buffer[8:16] == 0).all() and np.array_equal(buffer[:8], pristine[:8])
    target.restore(double)
    assert np.array_equal(buffer, pristine)


@pytest.mark.parametrize("target_type", [StoredBits, EccProtected])
def test_dense_and_sparse_injection_agree(target_type: type, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = [random_words(300, 6), np.arange(13, dtype=np.uint8), random_words(50, 7).view(np.uint32)]
    n_bits = target_type(PackedWeights.of(arrays)).n_bits
    positions = faults.draw_flip_positions(np.random.default_rng(2), n_bits, 0.01, sort=False)
    blocks, masked = [], []
    for dense_bits in (0, 10**9):  # never dense, always dense
        monkeypatch.setattr(injector, "DENSE_BITS", dense_bits)
        weights = PackedWeights.of(arrays)
        target = target_type(weights)
        injection = target.prepare(positions)
        assert (injection.index is None) == (dense_bits > 0 and target_type is StoredBits)
        target.inject(injection)
        blocks.append(weights.block.copy())
        masked.append(injection.masked)
        target.restore(injection)
        weights.verify()
    assert masked[0] == masked[1] and (masked[0] > 0) == (target_type is EccProtected)
    assert np.array_equal(blocks[0], blocks[1]) and not np.array_equal(blocks[0], PackedWeights.of(arrays).block)


# ----------------------------------------------------------------------------------- store


def record(key: str, trial: int) -> TrialRecord:
    return TrialRecord(key, trial, "ber", "fp32", "none", 1e-3, None, 100, 1, 0, 0, 10, 9, 9, 0, 0, "masked", 0.1, 0.2)


def test_store_ignores_duplicates_and_keeps_rows(tmp_path: Path) -> None:
    store = Store(tmp_path, {"seed": 0})
    assert store.add([record("a", 0), record("a", 1)]) == 2
    assert store.add([record("a", 1), record("b", 0)]) == 1
    store.close()
    reopened = Store(tmp_path, {"seed": 0})
    assert reopened.finished() == {("a", 0), ("a", 1), ("b", 0)}
    assert reopened.trials()[0] == record("a", 0)
    reopened.close()


def test_store_refuses_another_configuration(tmp_path: Path) -> None:
    Store(tmp_path, {"seed": 0, "experiments": 20}).close()
    with pytest.raises(OppassError, match="experiments"):
        Store(tmp_path, {"seed": 0, "experiments": 10})


@pytest.mark.parametrize(("annotation", "column"), [
    (int, "INTEGER NOT NULL"), (float, "REAL NOT NULL"), (str, "TEXT NOT NULL"),
    (int | None, "INTEGER"), (float | None, "REAL"), (None | str, "TEXT"), (typing.Optional[float], "REAL"),
])
def test_column_types_come_from_the_type_hints(annotation: object, column: str) -> None:
    assert column_type(annotation) == column


@pytest.mark.parametrize("annotation", [int | str, bytes, list[int], typing.Union[int, float, None]])
def test_types_without_a_column_type_are_refused(annotation: object) -> None:
    with pytest.raises(TypeError, match="no SQLite column type"):
        column_type(annotation)


def test_a_nullable_float_field_stores_nulls(tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True)
    class Row:
        name: str
        value: float | None

    hints = typing.get_type_hints(Row)
    columns = ", ".join(f"{field.name} {column_type(hints[field.name])}" for field in dataclasses.fields(Row))
    assert columns == "name TEXT NOT NULL, value REAL"
    connection = sqlite3.connect(tmp_path / "rows.sqlite")
    connection.execute(f"CREATE TABLE rows ({columns})")
    connection.execute("INSERT INTO rows VALUES (?, ?)", ("a", None))
    assert connection.execute("SELECT value FROM rows").fetchall() == [(None,)]
    connection.close()


# Store format 3's sampler in each of its regimes: (bits, BER) with few flips (a count, then positions), geometric
# gaps between them, and a mask of random words (from faults.WORD_RATE on, above faults.FEW_FLIPS expected flips).
WORD_REGIMES = [(4_000, 0.01), (100_000, 0.01), (20_000, 0.1), (3_000, 0.6), (20_000, 1 / 3)]


@pytest.mark.parametrize(("n", "ber"), WORD_REGIMES)
def test_word_sampler_counts_are_binomial_and_positions_uniform(n: int, ber: float) -> None:
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(12)
    draws = [faults.draw_flip_positions(rng, n, ber, sampler=faults.SAMPLER_WORDS) for _ in range(1500)]
    assert faults.uses_mask(n, ber) == (ber >= faults.WORD_RATE and n * ber > faults.FEW_FLIPS)
    for row in draws:
        assert row.dtype == np.int64 and np.all(np.diff(row) > 0) and (row.size == 0 or (row[0] >= 0 and row[-1] < n))
    # Flips per trial against Binomial(n, ber): chi-square over bins of at least 5 expected trials each.
    counts = np.array([row.size for row in draws])
    edges = np.unique(scipy_stats.binom.ppf(np.linspace(0, 1, 21)[1:-1], n, ber)).astype(int)
    observed = np.bincount(np.searchsorted(edges, counts, side="left"), minlength=edges.size + 1)
    probabilities = np.diff(np.concatenate([[0.0], scipy_stats.binom.cdf(edges, n, ber), [1.0]]))
    assert scipy_stats.chisquare(observed, probabilities * len(draws)).pvalue > 1e-3
    # Positions uniform over [0, n): chi-square over 50 equal bins.
    everything = np.concatenate(draws)
    assert scipy_stats.chisquare(np.bincount(everything * 50 // n, minlength=50)).pvalue > 1e-3
    # Bits independent inside each 64-bit word: flips per whole word against Binomial(64, ber).
    words = np.concatenate([np.bincount(row >> 6, minlength=n // 64)[: n // 64] for row in draws])
    expected = scipy_stats.binom.pmf(np.arange(65), 64, ber) * words.size
    keep = expected >= 5
    observed = np.bincount(words, minlength=65)
    assert observed[~keep].sum() <= expected[~keep].sum() * 3 + 10
    assert scipy_stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()
                                 ).pvalue > 1e-3
    # Neighbours independent: both of two adjacent bits flip with probability ber^2.
    pairs = sum(int(np.count_nonzero(np.diff(row) == 1)) for row in draws)
    mean = len(draws) * (n - 1) * ber**2
    assert abs(pairs - mean) < 5 * math.sqrt(mean)


@pytest.mark.parametrize("ber", [1 / 32, 0.1, 1 / 3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("n", [9_000, 64 * 1000, 64 * faults.WORD_BLOCK * 2 + 37])
def test_the_word_mask_holds_the_positions_drawn_alike(n: int, ber: float) -> None:
    assert faults.uses_mask(n, ber)
    positions = faults.draw_flip_positions(np.random.default_rng(8), n, ber, sampler=faults.SAMPLER_WORDS)
    mask = faults.draw_flip_mask(np.random.default_rng(8), n, ber)
    assert mask.dtype == np.uint64 and mask.size == -(-n // 64)
    assert np.array_equal(np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")), positions)
    with pytest.raises(OppassError, match="flip masks are drawn from BER"):
        faults.draw_flip_mask(np.random.default_rng(8), n, faults.WORD_RATE / 2)


def test_a_mask_injection_is_the_dense_injection_of_its_positions() -> None:
    rng = np.random.default_rng(4)
    weights = PackedWeights.of([rng.integers(0, 2**32, size=size, dtype=np.uint32) for size in (96, 1000, 8)])
    target = StoredBits(weights)
    assert target.takes_masks
    mask = faults.draw_flip_mask(np.random.default_rng(2), target.n_bits, 0.2)
    positions = faults.draw_flip_positions(np.random.default_rng(2), target.n_bits, 0.2, sampler=faults.SAMPLER_WORDS)
    from_mask, from_positions = target.prepare_mask(mask.view(np.uint8), positions.size), target.prepare(positions)
    assert from_mask.flips == from_positions.flips == positions.size and from_mask.index is from_positions.index is None
    assert np.array_equal(from_mask.change, from_positions.change)
    fault_free = weights.block.copy()
    target.inject(from_mask)
    assert np.array_equal(np.flatnonzero(np.unpackbits(weights.block ^ fault_free, bitorder="little")), positions)
    target.restore(from_mask)
    weights.verify()
    assert StoredBits(PackedWeights.of([np.zeros(3, dtype=np.uint32)])).takes_masks  # padded at the end only
    assert not StoredBits(PackedWeights.of([np.zeros(3, dtype=np.uint32)] * 2)).takes_masks  # the second one shifted


MEMORY_CHILD = """
import resource, sys
import numpy as np
from oppass import faults
n, what = int(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(0)
drawn = faults.draw_flip_mask(rng, n, 0.5) if what == "mask" else faults.draw_flip_positions(
    rng, n, 0.5, sampler=faults.SAMPLER_WORDS)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, drawn.nbytes)
"""


@pytest.mark.parametrize(("n", "what"), [(2**32, "mask"), (2**26, "positions")])
def test_the_word_sampler_holds_its_draw_and_blocks_only(n: int, what: str) -> None:
    # At BER 0.5: a mask of 4 Gbit (512 MiB; the gap sampler would hold 16 GiB of positions, choice 32 GiB), and
    # 32 M positions (256 MiB) drawn block by block; the child's peak RSS growth, with generous room for the blocks.
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n), what], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    peak, held = map(int, child.stdout.split())
    assert held == (n // 8 if what == "mask" else 8 * (held // 8)) and held > 0
    assert peak < (1.25 if what == "mask" else 2.5) * held + 64 * 2**20
