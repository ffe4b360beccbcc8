"""Per-sample correctness, silent data corruption and the outcome class of a faulty run (docs/METHODS.md).

A batch's scored output has the sample axis first (`[samples, ...]`); `class_axis` (negative)
names the axis holding the classes. A sample's prediction is its top-1 at every position along
the other axes: it is right only if it is right everywhere. A sample with a NaN or infinite
value anywhere in its output is never correct.

Metrics: `top1`, `top5` (labels), `golden` (top-1 equal to the fault-free top-1 at every
position), `allclose` (every output within `rtol`/`atol` of the fault-free one, as
`numpy.isclose`), or a user function named `package.module:function` with the signature

    def metric(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> np.ndarray

taking one batch's faulty and fault-free outputs (`[samples, ...]`) and its labels (or None),
and returning one bool per sample (True: correct). It is called once per trial that flips
bits, and on the fault-free outputs (outputs = reference) for the fault-free accuracy and scores.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from oppass.errors import OppassError

TOP1, TOP5, GOLDEN, ALLCLOSE = "top1", "top5", "golden", "allclose"
BUILTIN = (TOP1, TOP5, GOLDEN, ALLCLOSE)
LABELLED = (TOP1, TOP5)
CLASSIFYING = (TOP1, TOP5, GOLDEN)
TOP5_CLASSES = 5
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4
NO_FAULT, MASKED, TOLERATED, SDC, NONFINITE = "no_fault", "masked", "tolerated", "sdc", "nonfinite"
OUTCOMES = (NO_FAULT, MASKED, TOLERATED, SDC, NONFINITE)
# Above one changed output in CHANGED_SHARE, a faulty run's top-1 is taken over every class vector.
CHANGED_SHARE = 4
OUTCOME_NAMES = {NO_FAULT: "no fault", MASKED: "masked", TOLERATED: "tolerated", SDC: "SDC", NONFINITE: "non-finite"}

UserMetric = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class Scores:
    """Per faulty run: correct samples, silently corrupted (finite) samples, non-finite samples, outcome."""

    correct: np.ndarray
    sdc: np.ndarray
    nonfinite: np.ndarray
    outcomes: list[str]


@dataclass(frozen=True)
class Metric:
    """A metric by name (BUILTIN or `module:function`) on outputs whose classes lie along `class_axis` (< 0)."""

    name: str
    class_axis: int = -1
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    @property
    def user(self) -> bool:
        """Whether the metric is a user function."""
        return self.name not in BUILTIN

    def describe(self) -> str:
        """What a correct sample is, in words (for tables, figures and the report)."""
        return describe(self.name, self.rtol, self.atol)

    def correct(self, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """Bool [runs, samples]: correct under the metric (and finite) for outputs stacked [runs, samples, ...]."""
        return self._verdicts(outputs, reference, labels) & finite_samples(outputs)

    def score(
        self,
        outputs: np.ndarray,
        reference: np.ndarray,
        labels: np.ndarray | None,
        reference_correct: np.ndarray,
        flips: np.ndarray,
        reference_top1: np.ndarray | None = None,
    ) -> Scores:
        """Scores faulty runs stacked [runs, samples, ...] against the fault-free `reference` of their batches.

        The outcome is NO_FAULT when no bit flipped, else NONFINITE if some output is NaN/inf, SDC if
        some finite sample is corrupted (top-1 changed at some position for the classifying metrics,
        outside tolerance for allclose, correct fault-free but not now for a user metric), MASKED if
        the outputs equal the fault-free ones bit for bit, TOLERATED otherwise. `reference_top1` is
        `top1(reference, class_axis)` when already taken.
        """
        runs = outputs.shape[0]
        finite = finite_samples(outputs)
        differs = outputs != reference  # NaN differs from everything
        if self.name in CLASSIFYING:  # each top-1 taken once: argmax along a short class axis is slow
            expected = top1(reference, self.class_axis) if reference_top1 is None else reference_top1
            predicted = _top1_of_changed(outputs, differs, expected, self.class_axis)
            agree = _all_positions(predicted == expected, runs)
            verdicts = agree if self.name == GOLDEN else self._verdicts(outputs, reference, labels, predicted)
            corrupted = ~agree
        else:
            verdicts = self._verdicts(outputs, reference, labels)
            corrupted = ~verdicts if self.name == ALLCLOSE else reference_correct & ~verdicts
        correct = np.count_nonzero(verdicts & finite, axis=1)
        sdc = np.count_nonzero(corrupted & finite, axis=1)
        nonfinite = np.count_nonzero(~finite, axis=1)
        equal = ~differs.reshape(runs, -1).any(axis=1)
        outcomes = np.where(np.asarray(flips) == 0, NO_FAULT,
                            np.where(nonfinite > 0, NONFINITE,
                                     np.where(sdc > 0, SDC, np.where(equal, MASKED, TOLERATED))))
        return Scores(correct, sdc, nonfinite, outcomes.tolist())

    def _verdicts(self, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
                  predicted: np.ndarray | None = None) -> np.ndarray:
        """Bool [runs, samples]: correct under the metric; `predicted` is top1(outputs) if already taken."""
        runs = outputs.shape[0]
        if self.name == ALLCLOSE:
            return _all_positions(np.isclose(outputs, reference, rtol=self.rtol, atol=self.atol), runs)
        if self.name == GOLDEN:
            return _all_positions(top1(outputs, self.class_axis) == top1(reference, self.class_axis), runs)
        if self.name in LABELLED:
            if labels is None:
                raise OppassError(f"metric {self.name} needs labels")
            if self.name == TOP1:
                return _all_positions((top1(outputs, self.class_axis) if predicted is None else predicted) == labels,
                                      runs)
            best = np.take(np.argpartition(-outputs, TOP5_CLASSES - 1, axis=self.class_axis), range(TOP5_CLASSES),
                           axis=self.class_axis)
            hits = (best == np.expand_dims(labels, self.class_axis)).any(axis=self.class_axis)
            return _all_positions(hits, runs)
        function = load_user_metric(self.name)
        return np.stack([_user_verdicts(self.name, function, outputs[run], reference[run],
                                        None if labels is None else labels[run]) for run in range(runs)])


def describe(name: str, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> str:
    """What a correct sample is under metric `name`, in words."""
    return {
        TOP1: "top-1 accuracy (label = top-1 output)",
        TOP5: "top-5 accuracy (label among the 5 largest outputs)",
        GOLDEN: "golden agreement (top-1 equal to the fault-free top-1)",
        ALLCLOSE: f"allclose (every output within rtol {rtol:g} / atol {atol:g} of the fault-free one)",
    }.get(name, f"user metric {name}")


def axis_label(name: str, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> str:
    """The y-axis label of accuracy-vs-BER figures under metric `name`."""
    return {
        TOP1: "top-1 accuracy (%)",
        TOP5: "top-5 accuracy (%)",
        GOLDEN: "agreement with fault-free top-1 (%)",
        ALLCLOSE: f"samples within rtol {rtol:g}, atol {atol:g} (%)",
    }.get(name, f"correct under {name} (%)")


def top1(outputs: np.ndarray, class_axis: int = -1) -> np.ndarray:
    """Index of the largest output along `class_axis` (NaN counts as largest, as numpy's argmax does)."""
    return outputs.argmax(axis=class_axis)


def _top1_of_changed(outputs: np.ndarray, differs: np.ndarray, reference_top1: np.ndarray,
                     class_axis: int) -> np.ndarray:
    """`top1(outputs, class_axis)`, taken only along the class vectors where `differs` (outputs != reference) is
    set somewhere; elsewhere the reference's top-1, which is the same (argmax only compares values)."""
    changed = np.flatnonzero(differs)
    if changed.size * CHANGED_SHARE > outputs.size:  # many outputs changed: one argmax of every vector is cheaper
        return top1(outputs, class_axis)
    predicted = np.array(reference_top1, copy=True)
    if changed.size:
        axis = class_axis % outputs.ndim
        coordinates = np.unravel_index(changed, outputs.shape)
        vectors = np.unravel_index(
            np.unique(np.ravel_multi_index(coordinates[:axis] + coordinates[axis + 1 :], predicted.shape)),
            predicted.shape)
        predicted[vectors] = np.moveaxis(outputs, axis, -1)[vectors].argmax(axis=-1)
    return predicted


def finite_samples(outputs: np.ndarray) -> np.ndarray:
    """Bool [runs, samples]: no NaN or infinity anywhere in the sample's output."""
    runs, samples = outputs.shape[:2]
    finite = np.isfinite(outputs)
    if finite.all():  # reducing along short trailing axes is slow: only when needed
        return np.ones((runs, samples), dtype=bool)
    return np.asarray(finite.reshape(runs, samples, -1).all(axis=2))


def _all_positions(hits: np.ndarray, runs: int) -> np.ndarray:
    """[runs, samples, positions...] -> [runs, samples]: true at every position."""
    if hits.ndim == 2:
        return hits
    samples = hits.shape[1] if hits.ndim > 1 else 1
    return np.asarray(hits.reshape(runs, samples, -1).all(axis=2))


@functools.cache
def load_user_metric(name: str) -> UserMetric:
    """The function named `package.module:function`, imported once per process."""
    module_name, _, function_name = name.partition(":")
    if not module_name or not function_name:
        raise OppassError(f"unknown metric {name!r}: choose from {', '.join(BUILTIN)} or give package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise OppassError(f"cannot import the module of metric {name!r}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise OppassError(f"module {module_name!r} has no function {function_name!r} (metric {name!r})")
    return function


def _user_verdicts(name: str, function: UserMetric, outputs: np.ndarray, reference: np.ndarray,
                   labels: np.ndarray | None) -> np.ndarray:
    samples = outputs.shape[0]
    verdicts = np.asarray(function(outputs, reference, labels))
    if verdicts.shape != (samples,) or not (verdicts.dtype == bool or np.issubdtype(verdicts.dtype, np.integer)):
        raise OppassError(f"metric {name} must return one bool per sample ([{samples}]), got "
                          f"{list(verdicts.shape)} {verdicts.dtype}")
    return verdicts.astype(bool)
