"""What a campaign runs: its configuration, BER grid and conditions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oppass import codec, formats
from oppass.campaign.metrics import BUILTIN, DEFAULT_ATOL, DEFAULT_RTOL
from oppass.errors import OppassError

UNPROTECTED = "none"
ECC = "ecc"
BER_STUDY = "ber"
BIT_STUDY = "bit"
PAPER_POINTS_PER_DECADE = 9


@dataclass(frozen=True)
class CampaignConfig:
    """A fault-injection campaign (defaults: the paper's grid, Alg. 1 and Table II)."""

    model: Path
    data: str
    out: Path
    formats: tuple[str, ...] = ("fp32", "bf16", "int8")
    protections: tuple[str, ...] = ("none", "weight", "64", "256")
    ber_min: float = 1e-9
    ber_max: float = 1e-1
    points_per_decade: int = PAPER_POINTS_PER_DECADE
    experiments: int = 20
    batch_size: int = 400
    metric: str | None = None  # None: top1 with labels, golden without
    output: str | None = None  # the scored model output (None: the first)
    class_axis: int = -1  # the classes' axis of the scored output, as the model declares it
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    bit_positions: bool = False
    batch_study: bool = False
    ecc: bool = False
    scheduler: str = "local"
    workers: int | None = None
    seed: int = 0
    command: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class Variant:
    """One model build: weights stored in `format`, OP over `word` (UNPROTECTED: plain, check none)."""

    format: str
    word: str

    @property
    def key(self) -> str:
        """The variant's name: `format/word`."""
        return f"{self.format}/{self.word}"

    @property
    def protected(self) -> bool:
        """Whether the build is OP-protected (else plain, check none)."""
        return self.word != UNPROTECTED


@dataclass(frozen=True)
class Condition:
    """One point of the grid: faults at `ber` in `format` storage under `protection`.

    `protection` is UNPROTECTED, an OP word size ("weight", "64", ...) or ECC. In the
    bit-position study (`bit` set) flips hit only bit `bit` of the plain stored weights.
    """

    study: str
    format: str
    protection: str
    ber: float
    bit: int | None = None

    @property
    def key(self) -> str:
        """The condition's name in the store, e.g. `ber/fp32/64/ber=1e-06` (`/bit=3` in the bit study)."""
        bit = "" if self.bit is None else f"/bit={self.bit}"
        return f"{self.study}/{self.format}/{self.protection}/ber={self.ber:.6g}{bit}"

    @property
    def variant(self) -> Variant:
        """The model build the condition runs on (plain storage for the bit study and ECC)."""
        plain = self.study == BIT_STUDY or self.protection == ECC
        return Variant(self.format, UNPROTECTED if plain else self.protection)


def ber_grid(ber_min: float, ber_max: float, points_per_decade: int) -> tuple[float, ...]:
    """The BERs of [ber_min, ber_max]: per decade 1..9 × 10^k when points_per_decade is 9 (the
    paper's grid), else `points_per_decade` log-spaced points 10^(k + j/n); each rounded to 3
    significant digits."""
    low, high = math.floor(math.log10(ber_min)), math.ceil(math.log10(ber_max))
    decades = 10.0 ** np.arange(low, high + 1)
    if points_per_decade == PAPER_POINTS_PER_DECADE:
        mantissas = np.arange(1, 10, dtype=np.float64)
    else:
        mantissas = 10.0 ** (np.arange(points_per_decade) / points_per_decade)
    grid = sorted({float(f"{ber:.3g}") for ber in (decades[:, None] * mantissas).ravel()})
    return tuple(ber for ber in grid if ber_min <= ber <= ber_max)


def conditions(config: CampaignConfig, chosen: tuple[str, ...] | None = None) -> list[Condition]:
    """Every condition of the campaign (in formats `chosen`, default the configured ones), in a fixed order."""
    weight_formats = config.formats if chosen is None else chosen
    bers = ber_grid(config.ber_min, config.ber_max, config.points_per_decade)
    protections = config.protections + ((ECC,) if config.ecc else ())
    planned = [
        Condition(BER_STUDY, fmt, protection, ber)
        for fmt in weight_formats for protection in protections for ber in bers
    ]
    if config.bit_positions:
        planned += [
            Condition(BIT_STUDY, fmt, UNPROTECTED, ber, bit)
            for fmt in weight_formats
            for bit in range(formats.FORMATS[fmt].bits)
            for ber in bers
        ]
    return planned


def protection_label(fmt: str, protection: str) -> str:
    """The one name of a protection level in tables, figures and the report: "none", "OP per weight"
    (the format's bits), "OP per 64 bits", "OP per 256 bits", ..., "ECC (72,64)"."""
    if protection == UNPROTECTED:
        return "none"
    if protection == ECC:
        return "ECC (72,64)"
    if protection == "weight":
        return "OP per weight"
    return f"OP per {codec.word_bits(fmt, int(protection))} bits"


def protection_order(protection: str) -> tuple[int, int]:
    """None first, then OP per weight, OP words by size, ECC last."""
    if protection == UNPROTECTED:
        return (0, 0)
    if protection == ECC:
        return (3, 0)
    return (1, 0) if protection == "weight" else (2, int(protection))


def _validate(config: CampaignConfig) -> None:
    if not config.formats:
        raise OppassError("no weight format given (--formats)")
    unknown = [fmt for fmt in config.formats if fmt not in formats.FORMATS]
    if unknown:
        raise OppassError(f"unknown weight format {unknown[0]!r}: choose from {', '.join(formats.FORMATS)}")
    if not config.protections and not config.ecc:
        raise OppassError("no protection level given (--op)")
    for fmt in config.formats:
        for protection in config.protections:
            if protection != UNPROTECTED:
                codec.word_bits(fmt, protection if protection == "weight" else _word_size(protection))
    if not 0 < config.ber_min <= config.ber_max <= 1:
        raise OppassError(f"BER range must satisfy 0 < min <= max <= 1, got {config.ber_min}:{config.ber_max}")
    if config.points_per_decade < 1:
        raise OppassError(f"--points-per-decade must be at least 1, got {config.points_per_decade}")
    if config.experiments < 1 or config.batch_size < 1:
        raise OppassError("--exps and --batch must be at least 1")
    if config.metric is not None and config.metric not in BUILTIN and not _is_function_name(config.metric):
        raise OppassError(f"unknown metric {config.metric!r}: choose from {', '.join(BUILTIN)} or give "
                          "package.module:function")
    if not (config.rtol >= 0 and config.atol >= 0):
        raise OppassError(f"--rtol and --atol must be >= 0, got {config.rtol} and {config.atol}")
    if config.seed < 0:
        raise OppassError(f"--seed must be a non-negative integer, got {config.seed}")
    if config.workers is not None and config.workers < 1:
        raise OppassError(f"--workers must be at least 1, got {config.workers}")


def _is_function_name(name: str) -> bool:
    module, _, function = name.partition(":")
    return bool(module) and function.isidentifier() and all(part.isidentifier() for part in module.split("."))


def _word_size(protection: str) -> int:
    try:
        return int(protection)
    except ValueError:
        raise OppassError(f"unknown OP level {protection!r}: use none, weight or a word size in bits") from None
