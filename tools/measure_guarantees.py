#!/usr/bin/env python3
"""Measures what each code corrects, detects and misses (docs/GUARANTEES.md) with the numpy codec.

    .venv/bin/python tools/measure_guarantees.py [--words 20000] [--seed 0]

For every code, format, word size and k = 1..4 it encodes random weights, flips k distinct
bits (uniformly placed) inside each of many words, decodes, and sorts the words into
corrected (decoded bit for bit as without the faults), detected (masked: zeroed) and silent
(decoded wrong, not masked). Then, in 64-bit words, what the range check adds for the silent
words. Prints Markdown, with the rates the codes' math predicts next to the measured ones.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from oppass import codec, formats

FORMATS = ("fp32", "bf16", "fp16", "int8")
FLIPS = (1, 2, 3, 4)
OUTCOMES = ("corrected", "detected", "silent")
# Exponent field of each float format as (first bit, last bit) within a weight.
EXPONENT_BITS = {"fp32": (23, 30), "bf16": (7, 14), "fp16": (10, 14)}


def random_weights(fmt: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` small normal weights in format `fmt`."""
    values = (rng.standard_normal(count) * 0.05).astype(np.float32)
    return codec.to_format(values, fmt)[0]


def flip_k_bits_per_word(n_words: int, word_bits: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Offsets of k distinct bits inside each of `n_words` words, as an [n_words, k] array."""
    return np.argsort(rng.random((n_words, word_bits)), axis=1)[:, :k]


def flip(packed: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A copy of `packed` with the given stream bits inverted."""
    stream = packed.copy().reshape(-1).view(np.uint8)
    flat = positions.reshape(-1)
    np.bitwise_xor.at(stream, flat // 8, (1 << (flat % 8)).astype(np.uint8))
    return stream.view(packed.dtype).reshape(packed.shape)


def as_codes(weights: np.ndarray) -> np.ndarray:
    """The weights' raw codes, flat."""
    return weights.reshape(-1).view(f"u{weights.dtype.itemsize}")


def outcomes(fmt: str, word_bits: int, code: str, offsets: np.ndarray, rng: np.random.Generator,
             range_check: bool = False) -> dict[str, np.ndarray]:
    """Per word (one per row of `offsets`, the bits flipped in it): whether it was corrected, detected or silent.

    With `range_check` also `range_zeroed`: a weight of the word was zeroed by the range check (the bound being
    the fault-free maximum |w|, as the pass sets it).
    """
    n_words = offsets.shape[0]
    per_word = word_bits // formats.FORMATS[fmt].bits
    weights = random_weights(fmt, n_words * per_word, rng)
    encoded = codec.encode(weights, word_bits, code=code)
    clean = as_codes(codec.decode(encoded.packed, fmt, word_bits, weights.shape, code=code).weights)
    faulty = flip(encoded.packed, offsets + (np.arange(n_words) * word_bits)[:, None])
    decoded = codec.decode(faulty, fmt, word_bits, weights.shape, code=code)
    wrong = (as_codes(decoded.weights) != clean).reshape(n_words, per_word)
    result = {"corrected": ~decoded.masked & ~wrong.any(axis=1), "detected": decoded.masked,
              "silent": ~decoded.masked & wrong.any(axis=1)}
    if range_check:
        bound = codec.max_magnitude(codec.decode(encoded.packed, fmt, word_bits, weights.shape, code=code).weights)
        checked = codec.decode(faulty, fmt, word_bits, weights.shape, code=code, range_max=bound)
        zeroed = (as_codes(checked.weights) != as_codes(decoded.weights)).reshape(n_words, per_word)
        result["range_zeroed"] = zeroed.any(axis=1)
    return result


def outcome_rates(fmt: str, word: str | int, code: str, k: int, n_words: int,
                  rng: np.random.Generator) -> tuple[float, float, float]:
    """Shares of words with exactly k flipped bits that are corrected, detected and silent."""
    word_bits = codec.word_bits(fmt, word, code)
    found = outcomes(fmt, word_bits, code, flip_k_bits_per_word(n_words, word_bits, k, rng), rng)
    corrected, detected, silent = (float(np.mean(found[outcome])) for outcome in OUTCOMES)
    return corrected, detected, silent


def predicted(code: str, word_bits: int, k: int) -> tuple[float, float, float]:
    """The rates the code's math gives for k uniformly placed distinct flips in a W-bit word (no padding).

    Parity: odd k detected, even k silent (every flip changes a stored bit the decode outputs). SEC-DED: one
    flip corrected; two detected (two distinct indices never XOR to 0); three silent (the syndrome names a
    fourth bit, and no four check bits are ever the three flips plus the named one); four: silent exactly when
    the four indices XOR to 0, which W(W-1)(W-2)/24 of the C(W, 4) sets do: probability 1/(W-3).
    """
    if code == formats.PARITY:
        return (0.0, 1.0, 0.0) if k % 2 else (0.0, 0.0, 1.0)
    silent_four = 1 / (word_bits - 3)
    return {1: (1.0, 0.0, 0.0), 2: (0.0, 1.0, 0.0), 3: (0.0, 0.0, 1.0), 4: (0.0, 1 - silent_four, silent_four)}[k]


def undetected_double_damage(fmt: str, word_bits: int, n_words: int, rng: np.random.Generator) -> float:
    """Share of double flips (in W-bit words) that hit at least one exponent bit."""
    bits = formats.FORMATS[fmt].bits
    positions = flip_k_bits_per_word(n_words, word_bits, 2, rng)
    low, high = EXPONENT_BITS[fmt]
    in_weight = positions % bits
    return float(np.mean(np.any((in_weight >= low) & (in_weight <= high), axis=1)))


def cell(rates: tuple[float, ...]) -> str:
    """A table cell: the rates joined by slashes."""
    return " / ".join(f"{rate:.4f}" for rate in rates)


def main() -> None:
    """Prints the outcome rates per code, format, word size and number of flips per word."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=20000, help="words per (code, format, word size, k)")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    rng = np.random.default_rng(arguments.seed)
    for code in formats.CODES:
        print(f"### {code}: corrected / detected / silent\n")
        print("| format | word | " + " | ".join(f"{k} flip{'s' if k > 1 else ''}" for k in FLIPS) + " | math |")
        print("|---|---|" + "---:|" * len(FLIPS) + "---|")
        for fmt in FORMATS:
            for width in formats.word_widths(fmt, code):
                label = f"{width} (weight)" if width == formats.FORMATS[fmt].bits else str(width)
                measured = [outcome_rates(fmt, width, code, k, arguments.words, rng) for k in FLIPS]
                exact = all(math.isclose(a, b) for k, rates in zip(FLIPS, measured, strict=True)
                            for a, b in zip(rates, predicted(code, width, k), strict=True) if k < 4)
                silent_four = predicted(code, width, 4)[2]
                note = "as predicted" if exact else "DIFFERS"
                if code == formats.SECDED:
                    spread = math.sqrt(silent_four * (1 - silent_four) / arguments.words)  # binomial standard error
                    note += f"; 4 flips silent: 1/(W-3) = {silent_four:.4f} ± {spread:.4f}"
                print(f"| {fmt} | {label} | " + " | ".join(cell(rates) for rates in measured) + f" | {note} |")
        print()
    print("### the range check on silent words (64-bit words)\n")
    print("| format | code | flips | silent | silent words with a weight zeroed by the range check |")
    print("|---|---|---:|---:|---:|")
    for fmt in FORMATS:
        for code, k in ((formats.PARITY, 2), (formats.SECDED, 3)):
            found = outcomes(fmt, 64, code, flip_k_bits_per_word(arguments.words, 64, k, rng), rng, range_check=True)
            silent = found["silent"]
            print(f"| {fmt} | {code} | {k} | {np.mean(silent):.4f} | {np.mean(found['range_zeroed'][silent]):.4f} |")
    print()
    print("| format | word bits | double flips hitting an exponent bit |")
    print("|---|---|---:|")
    for fmt in EXPONENT_BITS:
        for word_bits in (formats.FORMATS[fmt].bits, 64, 256):
            print(f"| {fmt} | {word_bits} | {undetected_double_damage(fmt, word_bits, arguments.words, rng):.3f} |")


if __name__ == "__main__":
    main()
