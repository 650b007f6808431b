"""The CapacityNode of one node as its agent publishes it: the spec, and the status made of
readings, gates and conditions.

Everything here is pure: it turns what :class:`~capacity_agent.measurement.NodeMeasurements`
measured (and :class:`~capacity_agent.pressure.PressureConditions` judged) into the API models,
and never reads a collector. The status never carries ``status.allocated``, which the operator
owns.

Conditions, all with ``lastTransitionTime`` kept while the status stays the same
(:class:`ConditionLog`):

``Ready``
    True (``Measuring``) when every measured substrate has a sample newer than ``stale_after``;
    False (``SubstratesStale`` or ``NoSubstrates``) otherwise.
``Stale``
    True (``SubstratesStale``) naming each substrate without a fresh sample, its last sample time,
    failure count and last error; False (``Fresh``) when all are fresh.
``MemoryPressure``, ``CPUPressure``, ``IOPressure``
    From the host's PSI (:mod:`capacity_agent.pressure`).

Messages are cut to :data:`MESSAGE_LIMIT` characters; capacities that are not Kubernetes
quantities are dropped (and logged) rather than sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from capacity_api import reasons
from capacity_api.models import (
    CapacityNodeSpec,
    CapacityNodeStatus,
    Condition,
    ConditionStatus,
    GateReading,
    Geometry,
    Substrate,
    SubstrateReading,
)
from capacity_api.quantity import QuantityError, parse_quantity

__all__ = [
    "CONDITION_TYPES",
    "MESSAGE_LIMIT",
    "ConditionLog",
    "ConditionState",
    "StaleSubstrate",
    "freshness",
    "moment",
    "node_spec",
    "node_status",
]

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 512
"""Condition messages are cut to this many characters."""
STALE_ERROR_LIMIT = 160
"""Characters of a substrate's last error quoted in the Stale message."""

CONDITION_TYPES = (
    reasons.READY,
    reasons.STALE,
    reasons.MEMORY_PRESSURE,
    reasons.CPU_PRESSURE,
    reasons.IO_PRESSURE,
)
"""The conditions of a CapacityNode, in the order they are published."""


@dataclass(frozen=True, slots=True)
class ConditionState:
    """A condition as judged now, before its transition time is kept or set."""

    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class StaleSubstrate:
    """What the Stale condition says about a substrate without a fresh sample."""

    substrate: Substrate
    newest: float | None
    """Time of its newest sample; None when it has none."""
    failures: int = 0
    """Failed samples since the newest good one."""
    last_error: str = ""

    def describe(self) -> str:
        since = (
            "no sample yet"
            if self.newest is None
            else f"last sample {moment(self.newest, whole_seconds=True).isoformat()}"
        )
        if self.failures:
            since += f", {self.failures} failed since"
            if self.last_error:
                since += f" (last error: {self.last_error[:STALE_ERROR_LIMIT]})"
        return f"{self.substrate.value}: {since}"


def moment(ts: float, *, whole_seconds: bool = False) -> datetime:
    """Unix time ``ts`` as a UTC datetime, to the millisecond (or to the second)."""
    at = datetime.fromtimestamp(ts, UTC)
    if whole_seconds:
        return at.replace(microsecond=0)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def freshness(
    measured: Sequence[Substrate], stale: Sequence[StaleSubstrate], stale_after: float
) -> tuple[ConditionState, ConditionState]:
    """Ready and Stale for the ``measured`` substrates, of which ``stale`` have no fresh
    sample within ``stale_after`` seconds."""
    if not measured:
        ready = ConditionState(
            reasons.READY, ConditionStatus.FALSE, reasons.NO_SUBSTRATES, "no substrate is present"
        )
    elif stale:
        names = ", ".join(s.substrate.value for s in stale)
        ready = ConditionState(
            reasons.READY,
            ConditionStatus.FALSE,
            reasons.SUBSTRATES_STALE,
            f"no fresh sample of {names}",
        )
    else:
        names = ", ".join(s.value for s in measured)
        ready = ConditionState(
            reasons.READY, ConditionStatus.TRUE, reasons.MEASURING, f"measuring {names}"
        )
    if stale:
        details = "; ".join(s.describe() for s in stale)
        stale_condition = ConditionState(
            reasons.STALE,
            ConditionStatus.TRUE,
            reasons.SUBSTRATES_STALE,
            f"no sample within {stale_after:g} s: {details}",
        )
    else:
        stale_condition = ConditionState(
            reasons.STALE,
            ConditionStatus.FALSE,
            reasons.FRESH,
            f"every substrate sampled within {stale_after:g} s",
        )
    return ready, stale_condition


class ConditionLog:
    """The conditions last published, so that ``lastTransitionTime`` moves only when a
    condition's status does."""

    def __init__(self) -> None:
        self._last: dict[str, Condition] = {}

    def stamp(
        self, states: Iterable[ConditionState], now: float, *, generation: int | None = None
    ) -> list[Condition]:
        """The conditions for ``states`` as of ``now``, remembered for the next call."""
        conditions = []
        for state in states:
            previous = self._last.get(state.type)
            if previous is not None and previous.status == state.status:
                since = previous.last_transition_time
            else:
                since = moment(now, whole_seconds=True)
            condition = Condition(
                type=state.type,
                status=state.status,
                reason=state.reason,
                message=_short(state.message),
                last_transition_time=since,
                observed_generation=generation,
            )
            self._last[state.type] = condition
            conditions.append(condition)
        return conditions


def node_status(
    summaries: Mapping[Substrate, tuple[SubstrateReading, GateReading]],
    conditions: list[Condition],
    *,
    generation: int | None = None,
) -> CapacityNodeStatus:
    """The status to publish: the reading and gates of each substrate that has both (a substrate
    without a sample is left out, never sent as zeros), and the conditions."""
    return CapacityNodeStatus(
        readings={s.value: reading for s, (reading, _) in summaries.items()} or None,
        gates={s.value: gate for s, (_, gate) in summaries.items()} or None,
        conditions=conditions,
        observed_generation=generation,
    )


def node_spec(
    node_name: str,
    substrates: Sequence[Substrate],
    geometry: Mapping[Substrate, Geometry | None],
    capacity: Mapping[Substrate, Mapping[str, str]],
) -> CapacityNodeSpec:
    """The spec to publish: each substrate's geometry, and the capacities of all of them merged
    (sorted by name; values that are not Kubernetes quantities are dropped and logged)."""
    merged: dict[str, str | int] = {}
    for substrate, quantities in capacity.items():
        merged.update(_valid_quantities(substrate, quantities))
    shapes = {s.value: g for s, g in geometry.items() if g is not None}
    return CapacityNodeSpec(
        node_name=node_name,
        substrates=list(substrates),
        geometry=shapes or None,
        capacity=dict(sorted(merged.items())) or None,
    )


def _valid_quantities(substrate: Substrate, capacity: Mapping[str, str]) -> dict[str, str]:
    valid: dict[str, str] = {}
    for key, value in capacity.items():
        try:
            parse_quantity(value)
        except QuantityError as exc:
            log.warning("%s: capacity %s dropped: %s", substrate.value, key, exc)
            continue
        valid[key] = value
    return valid


def _short(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."
