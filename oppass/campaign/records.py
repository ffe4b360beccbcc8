"""What a campaign stores: one record per trial (plain data, so that the store and the summaries import no
onnxruntime)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)  # not frozen: a frozen dataclass takes 9x as long to make (5.7 against 0.6 us)
class TrialRecord:
    """The result of one trial (one row of the store)."""

    condition_key: str
    trial: int
    study: str
    format: str
    protection: str
    ber: float
    bit: int | None
    n_bits: int
    flips: int
    even_flip_words: int | None  # words hit by an even, non-zero number of flips (None for ECC)
    masked_words: int
    samples: int
    correct: int
    fault_free_correct: int
    sdc_samples: int
    nonfinite_samples: int
    outcome: str
    inject_seconds: float
    inference_seconds: float
    # Words SEC-DED corrected (a bit flipped back: the code's, or ECC (72,64)'s); None without SEC-DED, and in
    # trials stored before the column came (store column added by migration, NULL there).
    corrected_words: int | None = None
