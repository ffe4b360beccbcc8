"""Writes tests/vectors/format_vectors.json, the normative test vectors of docs/FORMAT.md.

The expected values come from a plain-Python, bit-by-bit reading of the spec (the weight
stream is one big Python integer); nothing here uses numpy or oppass, so the vectors
check the codec and the C kernel instead of echoing either.

Usage: python tools/make_format_vectors.py [output.json]
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from pathlib import Path

FORMAT_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "uint8": 8}
WORDS = ("weight", 16, 32, 64, 128, 256, 512)
FLIPS = ("word-lsb", "largest", "min-error")
LANE_BITS = 64
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "format_vectors.json"

# Zeros of both signs, subnormals, the smallest normal, infinities, quiet/signalling/negative NaNs,
# the largest finite value and two ordinary numbers, as raw codes.
SPECIAL_CODES = {
    "fp32": [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F800000, 0xFF800000,
             0x7FC00000, 0x7F800001, 0xFFC00001, 0x7F7FFFFF, 0x3F800000, 0xBFC00000],
    "bf16": [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x7F80, 0xFF80,
             0x7FC0, 0x7F81, 0xFFC1, 0x7F7F, 0x3F80, 0xBFC0],
    "fp16": [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7C00, 0xFC00,
             0x7E00, 0x7C01, 0xFE01, 0x7BFF, 0x3C00, 0xBE00],
    "int8": [0x00, 0x80, 0x7F, 0xFF, 0x81, 0x01, 0xFE],
    "uint8": [0x00, 0xFF, 0x80, 0x7F, 0x01, 0xFE],
}


def resolve_word(fmt: str, word: str | int) -> int:
    """W in bits."""
    return FORMAT_BITS[fmt] if word == "weight" else int(word)


def value(code: int, fmt: str) -> float:
    """The number a weight code stands for."""
    if fmt == "fp32":
        return struct.unpack("<f", struct.pack("<I", code))[0]
    if fmt == "bf16":
        return struct.unpack("<f", struct.pack("<I", code << 16))[0]
    if fmt == "fp16":
        return struct.unpack("<e", struct.pack("<H", code))[0]
    if fmt == "int8":
        return code - 256 if code >= 128 else code
    return code


def float_code(number: float, fmt: str) -> int:
    """Code of a float number in a float format (bf16: truncated fp32, any code is a valid weight)."""
    if fmt == "fp16":
        return struct.unpack("<H", struct.pack("<e", number))[0]
    fp32 = struct.unpack("<I", struct.pack("<f", number))[0]
    return fp32 >> 16 if fmt == "bf16" else fp32


def parity(bits: int) -> int:
    """XOR of all bits of an integer."""
    return bin(bits).count("1") % 2


def magnitude_key(code: int, fmt: str) -> tuple[int, float]:
    """Orders weights by |value|, every NaN equal and above everything else."""
    number = value(code, fmt)
    return (1, 0.0) if math.isnan(number) else (0, abs(number))


def flip_error(code: int, fmt: str) -> float | None:
    """|value change| of an LSB flip, or None when the flip of a NaN leaves no number to compare."""
    flipped = value(code ^ 1, fmt)
    return abs(flipped - value(code, fmt)) if math.isfinite(flipped) else None


def is_float(fmt: str) -> bool:
    """Whether the format is a binary floating-point one."""
    return fmt in ("fp32", "bf16", "fp16")


def is_infinite(code: int, fmt: str) -> bool:
    """Whether the code is +-infinity of a float format."""
    return is_float(fmt) and math.isinf(value(code, fmt))


def is_zero(code: int, fmt: str) -> bool:
    """Whether the code is +0.0 or -0.0 of a float format."""
    return is_float(fmt) and value(code, fmt) == 0.0


def chosen_weight(real_codes: list[int], fmt: str, flip: str) -> int:
    """Index in its word of the weight whose LSB the strategy flips: a real, non-infinite weight."""
    candidates = [index for index, code in enumerate(real_codes) if not is_infinite(code, fmt)]
    if flip == "word-lsb":
        return candidates[0]
    if flip == "largest":
        best = candidates[0]
        for index in candidates:
            if magnitude_key(real_codes[index], fmt) > magnitude_key(real_codes[best], fmt):
                best = index
        return best
    finite = [(flip_error(real_codes[index], fmt), index) for index in candidates]
    with_error = [(error, index) for error, index in finite if error is not None]
    return min(with_error)[1] if with_error else candidates[0]


def parity_flip(real_codes: list[int], fmt: str, flip: str) -> tuple[int, int]:
    """The weight (index in the word) and the bit (a mask) that make an odd word even.

    A float zero first (its sign bit); else the strategy's choice, its LSB, or bit 1 for a
    NaN whose LSB flip would leave an infinity. Raises ValueError when every real weight is
    infinite.
    """
    bits = FORMAT_BITS[fmt]
    for index, code in enumerate(real_codes):
        if is_zero(code, fmt):
            return index, 1 << (bits - 1)
    if all(is_infinite(code, fmt) for code in real_codes):
        raise ValueError("an odd word of infinite weights")
    index = chosen_weight(real_codes, fmt, flip)
    flipped = real_codes[index] ^ 1
    return index, (0b10 if math.isinf(value(flipped, fmt)) else 1)


def stream_of(codes: list[int], bits: int) -> int:
    """The little-endian bit stream of the weights as one integer (bit s = stream bit s)."""
    stream = 0
    for index, code in enumerate(codes):
        stream |= code << (index * bits)
    return stream


def word_count(n_weights: int, fmt: str, word_bits: int) -> int:
    """n_words = ceil(n * b / W)."""
    return -(-n_weights * FORMAT_BITS[fmt] // word_bits)


def word_at(stream: int, index: int, word_bits: int) -> int:
    """Word `index` of the stream: its bits [index * W, (index + 1) * W)."""
    return (stream >> (index * word_bits)) & ((1 << word_bits) - 1)


def codes_of(stream: int, n_weights: int, bits: int) -> list[int]:
    """The first `n_weights` codes of `bits` bits each of the stream."""
    return [(stream >> (index * bits)) & ((1 << bits) - 1) for index in range(n_weights)]


def encode(codes: list[int], fmt: str, word_bits: int, flip: str) -> tuple[list[int], int]:
    """The OP-adjusted codes and the number of words that got an LSB flip."""
    bits = FORMAT_BITS[fmt]
    per_word = word_bits // bits
    stream = stream_of(codes, bits)
    adjusted = list(codes)
    flipped = 0
    for index in range(word_count(len(codes), fmt, word_bits)):
        if parity(word_at(stream, index, word_bits)):
            real = codes[index * per_word:(index + 1) * per_word]
            weight, bit = parity_flip(real, fmt, flip)
            adjusted[index * per_word + weight] ^= bit
            flipped += 1
    return adjusted, flipped


def packed_words(codes: list[int], fmt: str, word_bits: int) -> list[list[int | str]]:
    """Packed tensor rows: one lane for W < 64, else W/64 uint64 lanes as decimal strings."""
    stream = stream_of(codes, FORMAT_BITS[fmt])
    rows = []
    for index in range(word_count(len(codes), fmt, word_bits)):
        word = word_at(stream, index, word_bits)
        if word_bits < LANE_BITS:
            rows.append([word])
        else:
            rows.append([str((word >> (LANE_BITS * lane)) & ((1 << LANE_BITS) - 1))
                         for lane in range(word_bits // LANE_BITS)])
    return rows


def decode_after_faults(adjusted: list[int], fmt: str, word_bits: int, flipped_bits: list[int]) -> dict:
    """Flips the given stream bits of the encoded words, then decodes with masking."""
    bits = FORMAT_BITS[fmt]
    stream = stream_of(adjusted, bits)
    for bit in flipped_bits:
        stream ^= 1 << bit
    masked = 0
    for index in range(word_count(len(adjusted), fmt, word_bits)):
        if parity(word_at(stream, index, word_bits)):
            stream &= ~(((1 << word_bits) - 1) << (index * word_bits))
            masked += 1
    return {"flipped_bits": flipped_bits, "decoded": codes_of(stream, len(adjusted), bits), "masked_words": masked}


def case(name: str, fmt: str, word: str | int, flip: str, codes: list[int], shape: list[int],
         flipped_bits: list[int] | None) -> dict:
    """One vector case: the encoding of `codes`, and the decode after flipping `flipped_bits` if given.

    When the encoding must fail (an odd word of infinite weights), the case has `error` instead.
    """
    word_bits = resolve_word(fmt, word)
    entry: dict = {"name": name, "code": "parity", "format": fmt, "word": word, "word_bits": word_bits,
                   "flip": flip, "shape": shape, "weights": codes}
    try:
        adjusted, changed_words = encode(codes, fmt, word_bits, flip)
    except ValueError as error:
        entry["error"] = str(error)
        return entry
    entry.update(adjusted=adjusted, changed_words=changed_words, packed=packed_words(adjusted, fmt, word_bits))
    if flipped_bits is not None:
        entry["decoded_after_faults"] = decode_after_faults(adjusted, fmt, word_bits, flipped_bits)
    return entry


def random_code(rng: random.Random, fmt: str) -> int:
    """A weight code: mostly ordinary numbers over a wide exponent range, sometimes arbitrary bits."""
    bits = FORMAT_BITS[fmt]
    if fmt in ("int8", "uint8") or rng.random() < 0.2:
        return rng.getrandbits(bits)
    return float_code(rng.gauss(0.0, 1.0) * 2.0 ** rng.randint(-12, 8), fmt)


def word_with_parity(rng: random.Random, fmt: str, per_word: int, wanted: int) -> list[int]:
    """Random codes for one word whose parity is `wanted` (bit 1 of the last weight is adjusted)."""
    codes = [random_code(rng, fmt) for _ in range(per_word)]
    if parity(stream_of(codes, FORMAT_BITS[fmt])) != wanted:
        codes[-1] ^= 0b10
    return codes


def generated_weights(rng: random.Random, fmt: str, per_word: int) -> list[int]:
    """Words: all zero, odd, even, the special codes (filled up with random ones), then an odd partial tail.

    With one weight per word, the infinity of odd parity is left out: it cannot be encoded.
    """
    specials = [code for code in SPECIAL_CODES[fmt] if per_word > 1 or not (is_infinite(code, fmt) and parity(code))]
    specials += [random_code(rng, fmt) for _ in range(-len(specials) % per_word)]
    codes = [0] * per_word + word_with_parity(rng, fmt, per_word, 1) + word_with_parity(rng, fmt, per_word, 0)
    codes += specials
    if per_word > 1:
        codes += word_with_parity(rng, fmt, max(1, per_word // 2), 1)
    return codes


def fault_bits(rng: random.Random, n_weights: int, fmt: str, word_bits: int) -> list[int]:
    """1 flip in word 1, 2 in word 2, 3 in word 3, and 1 in the padding when there is any."""
    bits = []
    for word_index, count in ((1, 1), (2, 2), (3, 3)):
        bits += sorted(word_index * word_bits + offset for offset in rng.sample(range(word_bits), count))
    stream_end = n_weights * FORMAT_BITS[fmt]
    padding_end = word_count(n_weights, fmt, word_bits) * word_bits
    if padding_end > stream_end:
        bits.append(rng.randrange(stream_end, padding_end))
    return bits


def generated_cases() -> list[dict]:
    """One case per format x word size x flip strategy."""
    rng = random.Random(20240607)
    cases = []
    for fmt, bits in FORMAT_BITS.items():
        for word in WORDS:
            word_bits = resolve_word(fmt, word)
            if word_bits < bits:
                continue
            for flip in FLIPS:
                codes = generated_weights(rng, fmt, word_bits // bits)
                shape = [2, len(codes) // 2] if len(codes) % 2 == 0 else [len(codes)]
                faults = fault_bits(rng, len(codes), fmt, word_bits)
                cases.append(case(f"{fmt}-{word}-{flip}", fmt, word, flip, codes, shape, faults))
    return cases


def handcrafted_cases() -> list[dict]:
    """The worked examples of docs/FORMAT.md, tie rules, NaN/infinity choices and empty tensors."""
    return [
        case("doc-fp32-64-word-lsb", "fp32", 64, "word-lsb", [0x3F800000, 0xC0000000, 0x3F000000], [3], [70]),
        case("doc-bf16-32-largest", "bf16", 32, "largest", [0x3F00, 0xC040], [2], [0, 31]),
        case("doc-fp16-64-min-error", "fp16", 64, "min-error", [0x3C00, 0x63D0, 0x2C00, 0x8000], [2, 2], [60]),
        case("doc-int8-32-word-lsb", "int8", 32, "word-lsb", [0x81, 0x01, 0x3C, 0x00], [1, 4], [9, 10, 11]),
        case("doc-uint8-weight-word-lsb", "uint8", "weight", "word-lsb", [0x00, 0x01, 0x03, 0xFF, 0x80], [5],
             [16, 17]),
        case("fp32-min-error-nan-not-infinity", "fp32", 64, "min-error", [0x7F800000, 0x7FC00000], [2], None),
        case("fp32-min-error-skips-nonfinite", "fp32", 128, "min-error",
             [0x7F800000, 0x7FC00000, 0x7F7FFFFF, 0x00000003], [4], None),
        case("fp32-min-error-subnormal-ties-smallest-normal", "fp32", 64, "min-error", [0x00800001, 0x00000001], [2],
             None),
        case("fp32-min-error-never-padding", "fp32", 64, "min-error", [0x3F800000], [1], [40]),
        case("fp32-largest-nan-beats-infinity", "fp32", 64, "largest", [0x7F800000, 0x7FC00000], [2], None),
        case("fp32-largest-nans-tie", "fp32", 64, "largest", [0x7FC00000, 0x7FC00001], [2], None),
        case("fp32-largest-signed-zeros-tie", "fp32", 64, "largest", [0x80000000, 0x00000000], [2], None),
        case("fp32-largest-opposite-signs-tie", "fp32", 64, "largest", [0xBF800000, 0x3F800000], [2], None),
        case("int8-largest-minus-128", "int8", 32, "largest", [0x7F, 0x80, 0x01, 0x00], [4], None),
        case("int8-largest-opposite-signs-tie", "int8", 16, "largest", [0xFB, 0x05], [2], None),
        case("int8-min-error-codes-tie", "int8", 32, "min-error", [0x03, 0x80, 0x01, 0x7F], [4], None),
        case("fp32-empty", "fp32", 64, "word-lsb", [], [0, 3], None),
        case("int8-weight-empty", "int8", "weight", "largest", [], [0], None),
        *class_keeping_cases(),
    ]


# Per float format: +-0.0, 1.0, 1.5, +inf, -inf, a NaN of mantissa 1 (its LSB flip would give an infinity).
CLASS_CODES = {
    "fp32": {"+0": 0x00000000, "-0": 0x80000000, "1.0": 0x3F800000, "1.5": 0x3FC00000,
             "+inf": 0x7F800000, "-inf": 0xFF800000, "nan1": 0x7F800001},
    "bf16": {"+0": 0x0000, "-0": 0x8000, "1.0": 0x3F80, "1.5": 0x3FC0, "+inf": 0x7F80, "-inf": 0xFF80, "nan1": 0x7F81},
    "fp16": {"+0": 0x0000, "-0": 0x8000, "1.0": 0x3C00, "1.5": 0x3E00, "+inf": 0x7C00, "-inf": 0xFC00, "nan1": 0x7C01},
}


def odd_word(fmt: str, per_word: int, codes: list[int]) -> list[int]:
    """`codes` filled up to a word with 1.0s, the first of them 1.5 when that makes the word's parity odd."""
    fillers = [CLASS_CODES[fmt]["1.0"]] * (per_word - len(codes))
    if fillers and not parity(stream_of(codes + fillers, FORMAT_BITS[fmt])):
        fillers[0] = CLASS_CODES[fmt]["1.5"]
    word = codes + fillers
    if not parity(stream_of(word, FORMAT_BITS[fmt])):
        raise AssertionError(f"{codes} is not an odd {fmt} word")
    return word


def class_keeping_cases() -> list[dict]:
    """Pins the rules that keep each weight's class: zeros flip their sign, in every strategy; infinities are
    never chosen; a NaN of mantissa 1 gets bit 1 flipped; an odd word of infinities cannot be encoded."""
    cases = []
    for fmt, named in CLASS_CODES.items():
        per_word = 64 // FORMAT_BITS[fmt]
        for flip in FLIPS:
            zero_words = odd_word(fmt, per_word, [named["1.5"], named["-0"]]) + odd_word(fmt, per_word, [named["+0"]])
            cases.append(case(f"{fmt}-64-{flip}-zero-flips-sign", fmt, 64, flip, zero_words, [2, per_word], None))
            infinity_word = odd_word(fmt, per_word, [named["+inf"], named["-inf"]][:per_word - 1])
            cases.append(case(f"{fmt}-64-{flip}-infinity-never-chosen", fmt, 64, flip, infinity_word, [per_word],
                              None))
        cases.append(case(f"{fmt}-weight-zeros-flip-sign", fmt, "weight", "min-error", [named["-0"], named["+0"]],
                          [2], None))
        nan = named["nan1"] if parity(named["nan1"]) else named["nan1"] | 1 << (FORMAT_BITS[fmt] - 1)
        cases.append(case(f"{fmt}-weight-nan-stays-nan", fmt, "weight", "word-lsb", [nan, named["1.0"]], [2], None))
        cases.append(case(f"{fmt}-64-largest-nan-beside-infinity-stays-nan", fmt, 64, "largest",
                          [named["+inf"], nan] if parity(named["+inf"] ^ nan) else [named["-inf"], nan], [2], None))
        odd_infinity = named["+inf"] if parity(named["+inf"]) else named["-inf"]
        cases.append(case(f"{fmt}-weight-odd-infinity-fails", fmt, "weight", "word-lsb", [odd_infinity], [1], None))
        cases.append(case(f"{fmt}-64-odd-word-of-infinities-fails", fmt, 64, "min-error",
                          [named["+inf"], named["-inf"]], [2], None))
    return cases


def main() -> None:
    """Writes every case to the file named on the command line (default: the test vectors)."""
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    cases = handcrafted_cases() + generated_cases()
    output.write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {output}")


if __name__ == "__main__":
    main()
