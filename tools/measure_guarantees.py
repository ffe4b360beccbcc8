#!/usr/bin/env python3
"""Measures what Opportunistic Parity detects (docs/GUARANTEES.md) with the numpy codec.

    .venv/bin/python tools/measure_guarantees.py [--words 20000] [--seed 0]

For every format, word size and k = 1..4 it encodes random weights, flips k distinct bits
inside each of many words, decodes, and counts the words that were masked. Prints Markdown.
"""

from __future__ import annotations

import argparse

import numpy as np

from oppass import codec, formats

FORMATS = ("fp32", "bf16", "fp16", "int8")
FLIPS = (1, 2, 3, 4)
# Exponent field of each float format as (first bit, last bit) within a weight.
EXPONENT_BITS = {"fp32": (23, 30), "bf16": (7, 14), "fp16": (10, 14)}


def random_weights(fmt: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` small normal weights in format `fmt`."""
    values = (rng.standard_normal(count) * 0.05).astype(np.float32)
    return codec.to_format(values, fmt)[0]


def flip_k_bits_per_word(packed: np.ndarray, word_bits: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Stream positions of k distinct bits inside each word of `packed`, as an [n_words, k] array."""
    n_words = packed.shape[0]
    offsets = np.argsort(rng.random((n_words, word_bits)), axis=1)[:, :k]
    return offsets + (np.arange(n_words) * word_bits)[:, None]


def flip(packed: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A copy of `packed` with the given stream bits inverted."""
    stream = packed.copy().reshape(-1).view(np.uint8)
    flat = positions.reshape(-1)
    np.bitwise_xor.at(stream, flat // 8, (1 << (flat % 8)).astype(np.uint8))
    return stream.view(packed.dtype).reshape(packed.shape)


def detection_rate(fmt: str, word: str | int, k: int, n_words: int, rng: np.random.Generator) -> float:
    """Share of words with exactly k flipped bits that decode as masked."""
    word_bits = codec.word_bits(fmt, word)
    per_word = word_bits // formats.FORMATS[fmt].bits
    encoded = codec.encode(random_weights(fmt, n_words * per_word, rng), word_bits)
    faulty = flip(encoded.packed, flip_k_bits_per_word(encoded.packed, word_bits, k, rng))
    return float(np.mean(codec.odd_words(faulty)))


def undetected_double_damage(fmt: str, word_bits: int, n_words: int, rng: np.random.Generator) -> float:
    """Share of undetected double flips (in W-bit words) that hit at least one exponent bit."""
    bits = formats.FORMATS[fmt].bits
    positions = flip_k_bits_per_word(np.zeros((n_words, 1)), word_bits, 2, rng)
    low, high = EXPONENT_BITS[fmt]
    in_weight = positions % bits
    return float(np.mean(np.any((in_weight >= low) & (in_weight <= high), axis=1)))


def main() -> None:
    """Prints the detected fraction per format, word size and number of flips per word."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=20000, help="words per (format, word size, k)")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    rng = np.random.default_rng(arguments.seed)
    print("| format | word | " + " | ".join(f"{k} flip{'s' if k > 1 else ''}" for k in FLIPS) + " |")
    print("|---|---|" + "---:|" * len(FLIPS))
    for fmt in FORMATS:
        for word in formats.WORD_SIZES:
            if word != "weight" and word < formats.FORMATS[fmt].bits:
                continue
            rates = [detection_rate(fmt, word, k, arguments.words, rng) for k in FLIPS]
            print(f"| {fmt} | {word} | " + " | ".join(f"{rate:.4f}" for rate in rates) + " |")
    print()
    print("| format | word bits | undetected doubles hitting an exponent bit |")
    print("|---|---|---:|")
    for fmt in EXPONENT_BITS:
        for word_bits in (formats.FORMATS[fmt].bits, 64, 256):
            print(f"| {fmt} | {word_bits} | {undetected_double_damage(fmt, word_bits, arguments.words, rng):.3f} |")


if __name__ == "__main__":
    main()
