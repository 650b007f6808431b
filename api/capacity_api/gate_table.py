"""The threshold gates of a fit vote as data: which reading, compared how, against which threshold.

:func:`capacity_api.gates.evaluate_fit` applies these gates (among its other checks: samples,
freshness, capacity, pressure) and records the readings under the names used here, so anything
that shows a vote's readings against the thresholds (``capctl explain``) judges them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from capacity_api.gates import CONFIGMAP_KEYS, Gate, Thresholds

GateOp = Literal["<=", ">="]
"""How a reading must relate to its threshold to pass."""
_SYMBOLS: Mapping[str, str] = {"<=": "≤", ">=": "≥"}


@dataclass(frozen=True, slots=True)
class GateSpec:
    """One threshold gate."""

    reading: str
    """Key in ``Vote.readings`` (and in :attr:`capacity_api.gates.Decision.readings`)."""
    op: GateOp
    """``<=`` or ``>=``: how the reading must relate to the threshold to pass."""
    threshold: str
    """Field of :class:`~capacity_api.gates.Thresholds`."""
    gate: Gate
    """The :class:`~capacity_api.gates.Gate` that :func:`~capacity_api.gates.evaluate_fit`
    names when this check fails."""

    @property
    def key(self) -> str:
        """The threshold's key in the calibration ConfigMap."""
        return CONFIGMAP_KEYS[self.threshold]

    @property
    def symbol(self) -> str:
        """``≤`` or ``≥``."""
        return _SYMBOLS[self.op]

    def threshold_value(self, thresholds: Thresholds) -> float:
        return float(getattr(thresholds, self.threshold))

    def passes(self, value: float, threshold: float) -> bool:
        """Whether ``value`` passes against ``threshold`` (NaN never passes)."""
        if self.op == "<=":
            return value <= threshold
        return value >= threshold


GATES: tuple[GateSpec, ...] = (
    GateSpec("fitError", "<=", "theta_fit", Gate.FIT),
    GateSpec("isolation", ">=", "theta_iso", Gate.ISOLATION),
    GateSpec("gluingDelta", "<=", "theta_glue", Gate.GLUING),
    GateSpec("lambdaInt", "<=", "theta_burst", Gate.BURST),
)
"""The threshold gates of a fit vote (DESIGN section 4), in the order the agent applies them."""


@dataclass(frozen=True, slots=True)
class GateCheck:
    """One gate judged on one vote's readings."""

    gate: GateSpec
    threshold: float
    value: float | None
    """None when the vote carries no such reading."""

    @property
    def passed(self) -> bool | None:
        """None when there is no reading to judge."""
        if self.value is None:
            return None
        return self.gate.passes(self.value, self.threshold)


def gate_checks(readings: Mapping[str, float] | None, thresholds: Thresholds) -> list[GateCheck]:
    """Each threshold gate of a vote's readings, judged against ``thresholds``."""
    readings = readings or {}
    return [GateCheck(g, g.threshold_value(thresholds), readings.get(g.reading)) for g in GATES]


__all__ = ["GATES", "GateCheck", "GateOp", "GateSpec", "gate_checks"]
