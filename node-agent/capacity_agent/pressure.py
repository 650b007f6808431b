"""The pressure conditions of a node, from the PSI of its newest host sample.

:class:`PressureConditions` is fed every host sample (:meth:`PressureConditions.update`) and keeps
one state per condition; it is pure (no I/O, the sample's time is an argument). The states become
conditions of the CapacityNode (:mod:`capacity_agent.node_status`), and the voter reads the ones
currently True (:meth:`PressureConditions.active`): it votes with what is published.

``MemoryPressure``, ``IOPressure``
    True (``PSIAboveThreshold``) when the newest host PSI ``some avg10`` exceeds
    :attr:`PressureThresholds.memory` / :attr:`PressureThresholds.io` (10 % of the time), False
    (``PSIBelowThreshold``) once it falls below ``clear_ratio`` (80 %) of the threshold: a small
    hysteresis so that a value hovering at the threshold does not flap the condition (and with it,
    the CapacityNode). Unknown (``PSIUnavailable``) without PSI: a kernel without
    /proc/pressure, no host sample yet, or the host substrate not measured.
``CPUPressure``
    As above with :attr:`PressureThresholds.cpu` (50 %), but on the CPU PSI after discounting
    cgroup throttling: ``effective = psi_cpu_some_avg10 x (1 - throttled)``, where ``throttled``
    is the mean share of CFS periods in which the measured cgroup was throttled over the last
    :attr:`PressureThresholds.throttle_seconds` (10 s, the span of avg10). Throttling inflates CPU
    stall time (a task held back by its own quota stalls even on an idle node), and a quota that is
    exhausted already shows as a high ``cpu`` load (usage over quota) in the window, which the fit
    gate sees; the condition is meant for contention on the node. When throttling alone explains
    the stall (raw PSI above the threshold, effective below it), the condition is False with reason
    ``CPUThrottled``. Without throttling counters (no CPU controller, no quota) the raw PSI is used.

Pressure does not make a node un-Ready (as with kubelet's node conditions); it stops it from voting
YES instead.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from capacity_agent.node_status import ConditionState
from capacity_api import reasons
from capacity_api.models import ConditionStatus, PressureReading

__all__ = ["CONDITION_PSI", "PressureConditions", "PressureThresholds"]

CONDITION_PSI = {
    reasons.MEMORY_PRESSURE: "memory",
    reasons.CPU_PRESSURE: "cpu",
    reasons.IO_PRESSURE: "io",
}
"""Each pressure condition and the PSI resource (/proc/pressure/<resource>) it reads."""


@dataclass(frozen=True, slots=True)
class PressureThresholds:
    """When the host's PSI sets a pressure condition (percent of time, as the kernel reports)."""

    memory: float = 10.0
    """MemoryPressure above this PSI memory some avg10."""
    io: float = 10.0
    """IOPressure above this PSI io some avg10."""
    cpu: float = 50.0
    """CPUPressure above this PSI cpu some avg10, after discounting throttling."""
    clear_ratio: float = 0.8
    """A set condition clears only below threshold x clear_ratio (hysteresis)."""
    throttle_seconds: float = 10.0
    """Span over which cgroup throttling is averaged for the CPU discount (PSI avg10's span)."""

    def threshold(self, resource: str) -> float:
        """The threshold of one PSI resource (``memory``, ``io`` or ``cpu``)."""
        return {"memory": self.memory, "io": self.io, "cpu": self.cpu}[resource]


class PressureConditions:
    """The state of each pressure condition (see the module docstring)."""

    def __init__(self, thresholds: PressureThresholds, *, host_measured: bool) -> None:
        self.thresholds = thresholds
        why = "no host sample yet" if host_measured else "host substrate not measured"
        self._states = {
            kind: ConditionState(kind, ConditionStatus.UNKNOWN, reasons.PSI_UNAVAILABLE, why)
            for kind in CONDITION_PSI
        }
        self._throttle: deque[tuple[float, float]] = deque()
        """(time, throttled share) of the host samples within ``throttle_seconds``."""

    def states(self) -> list[ConditionState]:
        """MemoryPressure, CPUPressure and IOPressure as they stand."""
        return list(self._states.values())

    def active(self) -> list[str]:
        """Names of the pressure conditions currently True (e.g. ``["MemoryPressure"]``)."""
        return [k for k, s in self._states.items() if s.status is ConditionStatus.TRUE]

    def update(
        self, pressure: Mapping[str, PressureReading] | None, at: float, throttled: float | None
    ) -> None:
        """Judge the PSI of a host sample taken at ``at``; ``throttled`` is its share of CFS
        periods throttled (None without throttling counters)."""
        share = self._throttled_share(at, throttled)
        for kind, resource in CONDITION_PSI.items():
            reading = (pressure or {}).get(resource)
            value = None if reading is None else reading.some_avg10
            if value is None or not math.isfinite(value):
                self._states[kind] = ConditionState(
                    kind,
                    ConditionStatus.UNKNOWN,
                    reasons.PSI_UNAVAILABLE,
                    f"no PSI {resource} some avg10 in the newest host sample",
                )
                continue
            was_set = self._states[kind].status is ConditionStatus.TRUE
            self._states[kind] = self._judge(
                kind, resource, value, was_set, share if resource == "cpu" else None
            )

    def _throttled_share(self, at: float, throttled: float | None) -> float | None:
        """Mean throttled share over the last ``throttle_seconds``, this sample included."""
        # values stamped after this sample (the clock stepped back) no longer describe "now"
        while self._throttle and self._throttle[-1][0] > at:
            self._throttle.pop()
        if throttled is not None:
            self._throttle.append((at, throttled))
        while self._throttle and self._throttle[0][0] < at - self.thresholds.throttle_seconds:
            self._throttle.popleft()
        if not self._throttle:
            return None
        return sum(v for _, v in self._throttle) / len(self._throttle)

    def _judge(
        self, kind: str, resource: str, value: float, was_set: bool, throttled: float | None
    ) -> ConditionState:
        t = self.thresholds
        limit = t.threshold(resource) * (t.clear_ratio if was_set else 1.0)
        effective = value
        note = ""
        if throttled is not None:
            effective = value * (1.0 - throttled)
            note = (
                f" (cgroup throttled in {throttled:.0%} of periods over "
                f"{t.throttle_seconds:g} s: {effective:.1f}% after discounting)"
            )
        observed = f"PSI {resource} some avg10 {value:.1f}%{note}"
        if effective > limit:
            verdict = "not yet below" if was_set else "above"
            return ConditionState(
                kind,
                ConditionStatus.TRUE,
                reasons.PSI_ABOVE_THRESHOLD,
                f"{observed} {verdict} {limit:g}%",
            )
        if throttled is not None and value > limit:
            return ConditionState(
                kind,
                ConditionStatus.FALSE,
                reasons.CPU_THROTTLED,
                f"PSI cpu some avg10 {value:.1f}% is above {limit:g}% but explained by cgroup "
                f"throttling{note}",
            )
        return ConditionState(
            kind, ConditionStatus.FALSE, reasons.PSI_BELOW_THRESHOLD, f"{observed} <= {limit:g}%"
        )
