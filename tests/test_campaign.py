"""Unit tests of the campaign building blocks: ECC, statistics/BERZAD, seeds, injectors, store."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oppass.campaign import ecc, stats
from oppass.campaign.config import CampaignConfig, ber_grid, conditions
from oppass.campaign.injector import BitPosition, EccProtected, RestorationError, StoredBits
from oppass.campaign.seeds import batch_indices, stable_words, trial_rng
from oppass.campaign.store import Store
from oppass.campaign.worker import TrialRecord
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


def test_stored_bits_flips_exactly_the_drawn_bits_and_restores() -> None:
    buffers = sample_buffers()
    target = StoredBits(buffers)
    before = stream_bits(buffers)
    positions = target.draw(np.random.default_rng(0), 0.05)
    assert positions.size > 0
    target.inject(positions)
    assert np.array_equal(np.flatnonzero(stream_bits(buffers) != before), positions)
    target.restore(positions)
    assert np.array_equal(stream_bits(buffers), before)


def test_restoration_check_catches_a_changed_word() -> None:
    buffers = sample_buffers()
    target = StoredBits(buffers)
    positions = np.array([3, 64 * 5 + 9])
    target.inject(positions)
    buffers[1][1, 0] ^= 0x80  # the byte holding stream bit 64*5+9 changes behind the injector's back
    with pytest.raises(RestorationError):
        target.restore(positions)


def test_bit_position_target_hits_only_that_bit_of_each_weight() -> None:
    buffers = [np.zeros((100, 1), dtype=np.uint16)]
    target = BitPosition(StoredBits(buffers), 16, 14)
    positions = target.draw(np.random.default_rng(1), 0.3)
    target.inject(positions)
    assert target.n_bits == 100
    assert np.array_equal(np.flatnonzero(buffers[0][:, 0]), positions // 16)
    assert (buffers[0][positions // 16, 0] == 1 << 14).all()


def test_ecc_target_corrects_single_and_masks_double_errors() -> None:
    buffers = [np.arange(1, 21, dtype=np.uint8).reshape(20, 1)]  # 20 bytes: 3 codewords, the last one padded
    pristine = buffers[0].copy()
    target = EccProtected(buffers)
    assert target.n_bits == 3 * ecc.CODEWORD_BITS
    single = np.array([5])
    assert target.inject(single) == 0 and np.array_equal(buffers[0], pristine)
    target.restore(single)
    double = np.array([ecc.CODEWORD_BITS + 1, ecc.CODEWORD_BITS + 70])  # codeword 1: a data and a check bit
    assert target.inject(double) == 1
    assert (buffers[0][8:16] == 0).all() and np.array_equal(buffers[0][:8], pristine[:8])
    target.restore(double)
    assert np.array_equal(buffers[0], pristine)


# ----------------------------------------------------------------------------------- store


def record(key: str, trial: int) -> TrialRecord:
    return TrialRecord(key, trial, "ber", "fp32", "none", 1e-3, None, 100, 1, 0, 10, 9, 9, 0, 0, "masked", 0.1, 0.2)


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
