"""Writes the normative test vectors of docs/FORMAT.md: tests/vectors/format_vectors.json (opportunistic
parity) and tests/vectors/code_vectors.json (SEC-DED and the range check).

The expected values come from a plain-Python, bit-by-bit reading of the spec (the weight
stream is one big Python integer, a word is one integer); nothing here uses numpy or oppass,
so the vectors check the codec and the C kernel instead of echoing either.

Usage: python tools/make_format_vectors.py [output_dir]
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
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "vectors"
PARITY_FILE, CODE_FILE = "format_vectors.json", "code_vectors.json"

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
    """Packed tensor rows of the weights' stream (see `packed_rows`)."""
    return packed_rows(stream_of(codes, FORMAT_BITS[fmt]), word_count(len(codes), fmt, word_bits), word_bits)


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


# SEC-DED and the range check (docs/FORMAT.md, "SEC-DED" and "Range check").

MANTISSA_BITS = {"fp32": 23, "bf16": 7, "fp16": 10}
INTEGER_BUDGET = 3


def stolen_budget(fmt: str) -> int:
    """The most check bits one weight may hold: floor(mantissa bits / 2) for floats, 3 for integers."""
    return MANTISSA_BITS[fmt] // 2 if is_float(fmt) else INTEGER_BUDGET


def check_bit_count(word_bits: int) -> int:
    """r, with 2**(r - 1) = W."""
    return word_bits.bit_length()


def check_positions(fmt: str, word_bits: int) -> list[int]:
    """Word bit position of check bit j = 0 .. r-1: bit (j div k) of weight (j mod k)."""
    bits = FORMAT_BITS[fmt]
    per_word = word_bits // bits
    return [(j % per_word) * bits + j // per_word for j in range(check_bit_count(word_bits))]


def stolen_bits(fmt: str, word_bits: int) -> list[int]:
    """Number of check bits held by each weight of a word (its lowest bits)."""
    per_word = word_bits // FORMAT_BITS[fmt]
    return [sum(1 for j in range(check_bit_count(word_bits)) if j % per_word == i) for i in range(per_word)]


def secded_fits(fmt: str, word_bits: int) -> bool:
    """Whether no weight of the word holds more check bits than the format's budget."""
    return max(stolen_bits(fmt, word_bits)) <= stolen_budget(fmt)


def hamming_indices(fmt: str, word_bits: int) -> list[int]:
    """Hamming index of each word bit: the lowest check position 0, the others 1, 2, 4, ...; the data bits the
    other indices 3, 5, 6, 7, 9, ... in ascending position."""
    checks = sorted(check_positions(fmt, word_bits))
    indices = [0] * word_bits
    for i, position in enumerate(checks[1:]):
        indices[position] = 1 << i
    data_indices = iter([index for index in range(3, word_bits) if index & (index - 1)])
    for position in range(word_bits):
        if position not in checks:
            indices[position] = next(data_indices)
    return indices


def syndrome(word: int, indices: list[int]) -> int:
    """XOR of the Hamming indices of the word's set bits."""
    result = 0
    for position, index in enumerate(indices):
        if word >> position & 1:
            result ^= index
    return result


def rounded_float(code: int, fmt: str, stolen: int) -> int:
    """The float code with its `stolen` low bits 0: magnitude rounded to nearest, ties to even, never to
    infinity; zeros and infinities unchanged; a NaN truncated, its mantissa's top bit set if it would be 0."""
    bits, mantissa = FORMAT_BITS[fmt], MANTISSA_BITS[fmt]
    sign = code & (1 << (bits - 1))
    magnitude = code ^ sign
    infinity = ((1 << (bits - 1 - mantissa)) - 1) << mantissa
    low = (1 << stolen) - 1
    down = magnitude & ~low
    if magnitude > infinity:
        return sign | (down if down & ((1 << mantissa) - 1) else down | 1 << (mantissa - 1))
    rest, half, up = magnitude & low, (1 << stolen) >> 1, down + (1 << stolen)
    if stolen and (rest > half or (rest == half and down >> stolen & 1)) and up < infinity:
        return sign | up
    return sign | down


def rounded_integer(code: int, fmt: str, stolen: int) -> int:
    """The integer code rounded to the nearest multiple of 2**stolen, ties toward zero, clamped to the range."""
    number, step = value(code, fmt), 1 << stolen
    down = number // step * step
    rest = number - down
    rounded = down + step if 2 * rest > step or (2 * rest == step and number < 0) else down
    lowest, highest = (-128, 127) if fmt == "int8" else (0, 255)
    return max(min(rounded, highest // step * step), lowest) & 0xFF


def rounded_weight(code: int, fmt: str, stolen: int) -> int:
    """What a weight holding `stolen` check bits decodes to."""
    return rounded_float(code, fmt, stolen) if is_float(fmt) else rounded_integer(code, fmt, stolen)


def secded_encode(codes: list[int], fmt: str, word_bits: int) -> tuple[list[int], int, int]:
    """The rounded codes, the number of words where rounding changed a weight, and the encoded stream."""
    bits = FORMAT_BITS[fmt]
    per_word = word_bits // bits
    stolen = stolen_bits(fmt, word_bits)
    rounded = [rounded_weight(code, fmt, stolen[index % per_word]) for index, code in enumerate(codes)]
    checks = sorted(check_positions(fmt, word_bits))
    indices = hamming_indices(fmt, word_bits)
    stream = stream_of(rounded, bits)
    n_words = word_count(len(codes), fmt, word_bits)
    for index in range(n_words):
        word = word_at(stream, index, word_bits)
        word_syndrome = syndrome(word, indices)
        for i, position in enumerate(checks[1:]):
            if word_syndrome >> i & 1:
                word |= 1 << position
        if parity(word):
            word |= 1 << checks[0]
        stream |= word << (index * word_bits)
    changed = sum(1 for index in range(n_words)
                  if rounded[index * per_word:(index + 1) * per_word] != codes[index * per_word:(index + 1) * per_word])
    return rounded, changed, stream


def secded_decode(stream: int, n_weights: int, fmt: str, word_bits: int) -> tuple[list[int], int, int]:
    """Decoded codes, masked words (even flips) and corrected words (a single flip) of an encoded stream."""
    indices = hamming_indices(fmt, word_bits)
    data_mask = (1 << word_bits) - 1
    for position in check_positions(fmt, word_bits):
        data_mask &= ~(1 << position)
    decoded = masked = corrected = 0
    for index in range(word_count(n_weights, fmt, word_bits)):
        word = word_at(stream, index, word_bits)
        word_syndrome = syndrome(word, indices)
        if parity(word):
            word ^= 1 << indices.index(word_syndrome)
            corrected += 1
        elif word_syndrome:
            word = 0
            masked += 1
        decoded |= (word & data_mask) << (index * word_bits)
    return codes_of(decoded, n_weights, FORMAT_BITS[fmt]), masked, corrected


def parity_decode(stream: int, n_weights: int, fmt: str, word_bits: int) -> tuple[list[int], int]:
    """Decoded codes and masked words (odd parity) of a parity-encoded stream."""
    masked = 0
    for index in range(word_count(n_weights, fmt, word_bits)):
        if parity(word_at(stream, index, word_bits)):
            stream &= ~(((1 << word_bits) - 1) << (index * word_bits))
            masked += 1
    return codes_of(stream, n_weights, FORMAT_BITS[fmt]), masked


def range_checked(codes: list[int], fmt: str, range_max: float | None) -> tuple[list[int], int]:
    """Codes with every weight w where not |w| <= range_max zeroed, and how many were; no check for None."""
    if range_max is None:
        return codes, 0
    outside = [not abs(value(code, fmt)) <= range_max for code in codes]
    return [0 if out else code for code, out in zip(codes, outside, strict=True)], sum(outside)


def packed_rows(stream: int, n_words: int, word_bits: int) -> list[list[int | str]]:
    """Packed tensor rows of a stream: one lane for W < 64, else W/64 uint64 lanes as decimal strings."""
    rows: list[list[int | str]] = []
    for index in range(n_words):
        word = word_at(stream, index, word_bits)
        if word_bits < LANE_BITS:
            rows.append([word])
        else:
            rows.append([str((word >> (LANE_BITS * lane)) & ((1 << LANE_BITS) - 1))
                         for lane in range(word_bits // LANE_BITS)])
    return rows


def code_case(name: str, code: str, fmt: str, word: str | int, codes: list[int], shape: list[int],
              flipped_bits: list[int], range_max: float | None = None) -> dict:
    """One code vector: the encoding with `code` (parity: word-lsb), then the decode after `flipped_bits`
    with the range check when `range_max` is given. An unsupported secded word has `error` instead."""
    word_bits = resolve_word(fmt, word)
    entry: dict = {"name": name, "code": code, "format": fmt, "word": word, "word_bits": word_bits,
                   "shape": shape, "weights": codes}
    if code == "parity":
        entry["flip"] = "word-lsb"
    if range_max is not None:
        entry["range_max"] = range_max
    if code == "secded" and not secded_fits(fmt, word_bits):
        entry["error"] = (f"{fmt} in {word_bits}-bit words would hold up to {max(stolen_bits(fmt, word_bits))} "
                          f"check bits in one weight, over the budget of {stolen_budget(fmt)}")
        return entry
    n_words = word_count(len(codes), fmt, word_bits)
    if code == "parity":
        adjusted, changed_words = encode(codes, fmt, word_bits, "word-lsb")
        stream = stream_of(adjusted, FORMAT_BITS[fmt])
    else:
        adjusted, changed_words, stream = secded_encode(codes, fmt, word_bits)
    entry.update(adjusted=adjusted, changed_words=changed_words, packed=packed_rows(stream, n_words, word_bits))
    faulted = stream
    for bit in flipped_bits:
        faulted ^= 1 << bit
    if code == "parity":
        decoded, masked = parity_decode(faulted, len(codes), fmt, word_bits)
        corrected = 0
    else:
        decoded, masked, corrected = secded_decode(faulted, len(codes), fmt, word_bits)
    checked, range_zeroed = range_checked(decoded, fmt, range_max)
    entry["decoded_after_faults"] = {"flipped_bits": flipped_bits, "decoded": checked, "masked_words": masked,
                                     "corrected_words": corrected, "range_zeroed": range_zeroed}
    return entry


def finite_code(rng: random.Random, fmt: str) -> int:
    """A random finite weight code (a number over a wide exponent range, or any integer code)."""
    while True:
        code = random_code(rng, fmt)
        if not is_float(fmt) or math.isfinite(value(code, fmt)):
            return code


def secded_fault_bits(rng: random.Random, fmt: str, word_bits: int, n_weights: int) -> list[int]:
    """1 flip in word 1, 2 in word 2, the overall-parity bit of word 3, 3 flips in word 4, 4 in word 5, and 1
    padding bit when there is padding."""
    bits = []
    for word_index, count in ((1, 1), (2, 2), (4, 3), (5, 4)):
        bits += [word_index * word_bits + offset for offset in rng.sample(range(word_bits), count)]
    bits.append(3 * word_bits + min(check_positions(fmt, word_bits)))
    stream_end = n_weights * FORMAT_BITS[fmt]
    padding_end = word_count(n_weights, fmt, word_bits) * word_bits
    if padding_end > stream_end:
        bits.append(rng.randrange(stream_end, padding_end))
    return sorted(bits)


def secded_weights(rng: random.Random, fmt: str, per_word: int) -> list[int]:
    """An all-zero word, five random words, the special codes (filled up with random ones), a partial tail."""
    specials = SPECIAL_CODES[fmt] + [random_code(rng, fmt) for _ in range(-len(SPECIAL_CODES[fmt]) % per_word)]
    codes = [0] * per_word + [random_code(rng, fmt) for _ in range(5 * per_word)] + specials
    return codes + [random_code(rng, fmt) for _ in range(per_word // 2)]


def generated_code_cases() -> list[dict]:
    """SEC-DED for every format x word size (an error case where it does not fit); the range check with
    parity and with SEC-DED in 64-bit words for every format, range_max the fault-free maximum |w|."""
    rng = random.Random(20261202)
    cases = []
    for fmt, bits in FORMAT_BITS.items():
        for word in WORDS:
            word_bits = resolve_word(fmt, word)
            if word_bits < bits:
                continue
            codes = secded_weights(rng, fmt, word_bits // bits)
            faults = secded_fault_bits(rng, fmt, word_bits, len(codes)) if secded_fits(fmt, word_bits) else []
            cases.append(code_case(f"secded-{fmt}-{word}", "secded", fmt, word, codes, [len(codes)], faults))
        for code in ("parity", "secded"):
            per_word = 64 // bits
            codes = [finite_code(rng, fmt) for _ in range(5 * per_word + per_word // 2)]
            encoded = code_case("", code, fmt, 64, codes, [len(codes)], [])
            range_max = max(abs(value(adjusted, fmt)) for adjusted in encoded["adjusted"])
            exponent_top = bits - 2  # a float's top exponent bit, an integer's top value bit
            faults = [64 + exponent_top, 64 + bits + exponent_top]
            faults += [128 + rng.randrange(64)] + [192 + offset for offset in rng.sample(range(64), 3)]
            faults += [256 + offset for offset in rng.sample(range(64), 4)]
            cases.append(code_case(f"range-{code}-{fmt}-64", code, fmt, 64, codes, [len(codes)], sorted(faults),
                                   float(range_max)))
    return cases


def handcrafted_code_cases() -> list[dict]:
    """The worked examples, the rounding rules (ties, the top of the range, NaNs, subnormals, integer
    clamping) and the range check's edges."""
    return [
        code_case("doc-secded-fp32-64", "secded", "fp32", 64, [0x3F800000, 0xC0000000, 0x3EAAAAAB], [3], [5]),
        code_case("doc-secded-int8-16", "secded", "int8", 16, [0x7F, 0x05, 0xFC, 0x0C], [4], [3, 20, 27]),
        code_case("doc-range-parity-fp32-64", "parity", "fp32", 64, [0x3F800000, 0x3F000000], [2], [30, 62],
                  value(0x3F800001, "fp32")),
        code_case("secded-fp32-64-rounding", "secded", "fp32", 64,
                  [0x3F800008, 0x3F800004, 0x3F800018, 0x3F80000C, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800001, 0xFF800001,
                   0x00000001, 0x0000000F, 0x007FFFFF, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00007, 0x3F80000F],
                  [16], [0, 64, 65]),
        code_case("secded-fp16-32-rounding", "secded", "fp16", 32,
                  [0x3C04, 0x3C02, 0x3C0C, 0x3C06, 0x7BFF, 0xFBFF, 0x7C01, 0x7C03, 0x0001, 0x03FF, 0x8000, 0x7C00],
                  [12], [31, 33]),
        code_case("secded-bf16-32-rounding", "secded", "bf16", 32,
                  [0x3F84, 0x3F82, 0x3F8C, 0x3F86, 0x7F7F, 0xFF7F, 0x7F81, 0xFF87, 0x0001, 0x007F, 0x8000, 0xFF80],
                  [12], [15, 16, 17]),
        code_case("secded-int8-16-rounding", "secded", "int8", 16,
                  [0x7F, 0x7F, 0x80, 0x80, 0x04, 0x02, 0xFC, 0xFE, 0x0C, 0x06, 0xF4, 0xFA, 0x05, 0x03, 0xFB, 0xFD],
                  [16], [0, 1, 2]),
        code_case("secded-uint8-16-rounding", "secded", "uint8", 16,
                  [0xFF, 0xFF, 0x04, 0x02, 0x0C, 0x06, 0x05, 0x03, 0xFC, 0xFE], [10], [8]),
        code_case("secded-fp32-weight-flips", "secded", "fp32", "weight", [0x3F800000, 0xBF800000, 0x40490FDB],
                  [3], [0, 32 + 31, 64 + 5, 64 + 6]),
        code_case("secded-fp32-512-padding-flip", "secded", "fp32", 512, [0x3F800000] * 3, [3], [500]),
        code_case("secded-fp32-empty", "secded", "fp32", 64, [], [0, 2], []),
        code_case("range-max-zero-keeps-zeros", "parity", "fp32", 64, [0x00000000, 0x80000000, 0x00000001,
                                                                       0x80000001], [4], [], 0.0),
        code_case("range-zeroes-nan-and-infinity", "parity", "fp32", 128,
                  [0x7FC00000, 0x7F800000, 0xFF800000, 0x3F800000], [4], [], 2.0),
        code_case("range-int8-compares-magnitude", "parity", "int8", 32, [0x80, 0x7F, 0x81, 0x05], [4], [], 127.0),
        code_case("range-secded-fp16-64", "secded", "fp16", 64, [0x3C00, 0xBC00, 0x3800, 0x0000], [4],
                  [14, 30, 45], 1.0),
        code_case("range-secded-bf16-64-miscorrection", "secded", "bf16", 64, [0x3F80, 0x3F00, 0xBF00, 0x3E80],
                  [4], [14, 13, 12], 1.0),
    ]


def main() -> None:
    """Writes both vector files into the folder named on the command line (default: tests/vectors)."""
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    output.mkdir(parents=True, exist_ok=True)
    for file_name, cases in ((PARITY_FILE, handcrafted_cases() + generated_cases()),
                             (CODE_FILE, handcrafted_code_cases() + generated_code_cases())):
        (output / file_name).write_text(json.dumps(cases, indent=1) + "\n")
        print(f"wrote {len(cases)} cases to {output / file_name}")


if __name__ == "__main__":
    main()
