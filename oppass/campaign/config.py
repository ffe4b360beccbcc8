"""What a campaign runs: its configuration, BER grid and conditions."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oppass import formats
from oppass.campaign import faultmodels, protection
from oppass.campaign.metrics import BUILTIN, DEFAULT_ATOL, DEFAULT_RTOL
from oppass.campaign.protection import ECC, UNPROTECTED
from oppass.errors import OppassError
from oppass.formats import DEFAULT_OPS

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
    fault: str = faultmodels.FLIP
    flip_counts: tuple[int, ...] = ()
    layers: tuple[str, ...] = ()
    ops: tuple[str, ...] = DEFAULT_OPS  # the op types whose weights are protected and corrupted

    def __post_init__(self) -> None:
        object.__setattr__(self, "protections", tuple(protection.canonical(name) for name in self.protections))
        object.__setattr__(self, "fault", faultmodels.parse(self.fault).name)
        _validate(self)


@dataclass(frozen=True)
class Variant:
    """One model build: weights stored in `format`, OP over `word` (UNPROTECTED: plain, check none; `CODE:W`:
    plain, holding the fault-free decode of that code, which the campaign decodes in numpy)."""

    format: str
    word: str

    @property
    def key(self) -> str:
        """The variant's name: `format/word`."""
        return f"{self.format}/{self.word}"

    @property
    def protected(self) -> bool:
        """Whether the build runs OP's decoder in the model (else plain weights, check none)."""
        return self.word != UNPROTECTED and ":" not in self.word


@dataclass(frozen=True)
class Condition:
    """One point of the grid: faults of model `fault` at `ber` (or `count` of them) in `format` storage under
    `protection`, in the tensors `layers` (all when empty).

    `protection` is a canonical protection name (oppass.campaign.protection). In the bit-position
    study (`bit` set) faults hit only bit `bit` of the plain stored weights.
    """

    study: str
    format: str
    protection: str
    ber: float
    bit: int | None = None
    fault: str = faultmodels.FLIP
    count: int | None = None
    layers: tuple[str, ...] = ()

    @functools.cached_property  # asked per trial
    def key(self) -> str:
        """The condition's name in the store, e.g. `ber/fp32/64/ber=1e-06` (`/bit=3` in the bit study), with the
        fault model after the protection unless it is independent flips, `flips=K` for a flip count, and
        `/layers=A,B` when restricted."""
        return f"{self.study}/{self.format}/{self.protection}/{self._fault_key}"

    @functools.cached_property  # asked per trial
    def draw_key(self) -> str:
        """The name of the condition's fault draws: the same for protections over the same stored bits (store
        format 2), so that they see the same faults (the bit study keeps one draw per condition)."""
        if self.study == BIT_STUDY:
            return self.key
        return f"{self.study}/{self.format}/{protection.parse(self.protection).storage(self.format)}/{self._fault_key}"

    @functools.cached_property  # asked per trial
    def _fault_key(self) -> str:
        fault = "" if self.fault == faultmodels.FLIP else f"{self.fault}/"
        axis = f"ber={self.ber:.6g}" if self.count is None else f"flips={self.count}"
        bit = "" if self.bit is None else f"/bit={self.bit}"
        layers = f"/layers={','.join(self.layers)}" if self.layers else ""
        return f"{fault}{axis}{bit}{layers}"

    @functools.cached_property  # asked per trial
    def variant(self) -> Variant:
        """The model build the condition runs on (plain storage for the bit study)."""
        word = UNPROTECTED if self.study == BIT_STUDY else protection.parse(self.protection).variant_word
        return Variant(self.format, word)


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
    axis: list[tuple[float, int | None]] = [(0.0, count) for count in config.flip_counts] or \
        [(ber, None) for ber in bers]
    fault, layers = config.fault, config.layers
    planned = [
        Condition(BER_STUDY, fmt, name, ber, None, fault, count, layers)
        for fmt in weight_formats for name in campaign_protections(config) for ber, count in axis
    ]
    if config.bit_positions:
        planned += [
            Condition(BIT_STUDY, fmt, UNPROTECTED, ber, bit, fault, count, layers)
            for fmt in weight_formats
            for bit in range(formats.FORMATS[fmt].bits)
            for ber, count in axis
        ]
    return planned


def campaign_protections(config: CampaignConfig) -> tuple[str, ...]:
    """The protections of the BER study, in order: `protections`, then ECC when `ecc` asks for it."""
    return config.protections + ((ECC,) if config.ecc and ECC not in config.protections else ())


def protection_label(fmt: str, name: str) -> str:
    """The one name of protection `name` in tables, figures and the report (oppass.campaign.protection):
    "none", "OP per weight", "OP per 64 bits", "SEC-DED per 64 bits", "... + range", "ECC (72,64)"."""
    return protection.parse(name).label(fmt)


def protection_order(fmt: str, name: str) -> tuple[int, int, int]:
    """The sort key of protection `name` in tables and legends: none first, then OP, SEC-DED, ECC last."""
    return protection.parse(name).order(fmt)


def _validate(config: CampaignConfig) -> None:
    if not config.formats:
        raise OppassError("no weight format given (--formats)")
    unknown = [fmt for fmt in config.formats if fmt not in formats.FORMATS]
    if unknown:
        raise OppassError(f"unknown weight format {unknown[0]!r}: choose from {', '.join(formats.FORMATS)}")
    if not config.protections and not config.ecc:
        raise OppassError("no protection level given (--op or --protect)")
    for fmt in config.formats:
        for name in config.protections:
            protection.parse(name).word_bits(fmt)
    faultmodels.validate(faultmodels.parse(config.fault), config.ber_max, config.flip_counts)
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
