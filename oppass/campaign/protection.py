"""The protections a campaign compares (`--protect`), by name.

A protection is a code over W-bit words of the stored weights, optionally followed by the
range check: `none`, `ecc` (SEC-DED (72,64), 12.5 % extra storage), `range`, `parity:W`,
`secded:W`, `parity:W+range`, `secded:W+range` (W: `weight` or a word size in bits). OP
alone keeps its historical name, the bare word size (`weight`, `64`), so that stores and
condition keys of campaigns made before `--protect` existed stay valid; `parity:W` is read as
`W`, `none+range` as `range`.
"""

from __future__ import annotations

from dataclasses import dataclass

from oppass import codec
from oppass.errors import OppassError
from oppass.formats import PARITY, SECDED, WEIGHT_WORD

UNPROTECTED = "none"
ECC = "ecc"
RANGE = "range"
_RANGE_SUFFIX = "+range"
PLAIN = "plain"  # code of plain storage (no code)
ECC_STORAGE = "ecc72"


@dataclass(frozen=True)
class Protection:
    """A parsed protection: `code` (PLAIN, PARITY, SECDED or ECC) over `word`-sized words, then the range check."""

    code: str
    word: str
    range_check: bool

    @property
    def name(self) -> str:
        """The canonical name (the one stored in condition keys)."""
        if self.code == ECC:
            return ECC
        if self.code == PLAIN:
            return RANGE if self.range_check else UNPROTECTED
        base = self.word if self.code == PARITY else f"{SECDED}:{self.word}"
        return base + (_RANGE_SUFFIX if self.range_check else "")

    @property
    def decoded_in_numpy(self) -> bool:
        """Whether the campaign decodes the stored words in numpy and runs plain weights (the range check and
        SEC-DED), instead of OP's decoder running in the model (the custom op) or plain storage."""
        return self.range_check or self.code == SECDED

    @property
    def variant_word(self) -> str:
        """The `Variant.word` of the model build the protection runs on: `none` (plain weights), an OP word size
        (the custom-op decoder) or `CODE:W` (plain weights holding that code's fault-free decode)."""
        if self.code in (PLAIN, ECC) or (self.code == PARITY and not self.range_check):
            return UNPROTECTED if self.code != PARITY else self.word
        return f"{self.code}:{self.word}"

    def word_bits(self, fmt: str) -> int:
        """W in bits for format `fmt` (refused with one line where the code does not fit)."""
        if self.code in (PLAIN, ECC):
            return codec.word_bits(fmt, WEIGHT_WORD)
        return codec.word_bits(fmt, self.word if self.word == WEIGHT_WORD else _bits(self.word), self.code)

    def storage(self, fmt: str) -> str:
        """What the stored bits of format `fmt` look like to a fault: protections of equal storage hold the same
        number of bits in the same places, so they share their fault draws."""
        return ECC_STORAGE if self.code == ECC else f"W={self.word_bits(fmt)}"

    def label(self, fmt: str) -> str:
        """The protection's one name in tables, figures and the report: "none", "range check", "OP per weight",
        "OP per 64 bits", "SEC-DED per 64 bits", each code with " + range" after it, "ECC (72,64)"."""
        if self.code == ECC:
            return "ECC (72,64)"
        if self.code == PLAIN:
            return "range check" if self.range_check else UNPROTECTED
        scheme = "OP" if self.code == PARITY else "SEC-DED"
        words = "per weight" if self.word == WEIGHT_WORD else f"per {self.word_bits(fmt)} bits"
        return f"{scheme} {words}" + (" + range" if self.range_check else "")

    def order(self, fmt: str) -> tuple[int, int, int]:
        """Where the protection goes in tables and legends: none and the range check first, then OP, then SEC-DED,
        each by word size (the code alone before it with the range check), ECC last."""
        rank = {PLAIN: 0, PARITY: 1, SECDED: 2, ECC: 3}[self.code]
        return (rank, self.word_bits(fmt), int(self.range_check))


def parse(name: str) -> Protection:
    """The protection called `name`; an unknown name is refused in one line."""
    text = name.strip()
    range_check = text.endswith(_RANGE_SUFFIX)
    base = text[: -len(_RANGE_SUFFIX)] if range_check else text
    if base == ECC and not range_check:
        return Protection(ECC, WEIGHT_WORD, False)
    if text == RANGE or base == UNPROTECTED:
        return Protection(PLAIN, WEIGHT_WORD, range_check or text == RANGE)
    code, _, word = base.rpartition(":")
    code = code or PARITY
    if code in (PARITY, SECDED) and (word == WEIGHT_WORD or word.isdigit()):
        return Protection(code, word, range_check)
    raise OppassError(f"unknown protection {name!r}: use none, ecc, range, parity:W, secded:W, parity:W+range or "
                      "secded:W+range (W: weight or a word size in bits)")


def canonical(name: str) -> str:
    """The canonical name of protection `name`."""
    return parse(name).name


def _bits(word: str) -> int:
    try:
        return int(word)
    except ValueError:
        raise OppassError(f"unknown word size {word!r}: use weight or a word size in bits") from None
