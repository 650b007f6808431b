"""One node's measurements: its collectors, one window per substrate, and what they say.

:class:`NodeMeasurements` is pure apart from the collectors it calls, and takes the time as an
argument everywhere (an injected clock), so it is tested without sleeping. Sampling is split in two
so that the agent can keep blocking reads off its event loop without sharing the windows between
threads: :meth:`NodeMeasurements.collect` calls the collectors (blocking; run it in a worker
thread) and :meth:`NodeMeasurements.record` adds what they returned to the windows (on the loop).
:meth:`NodeMeasurements.tick` does both, for callers that do not care.

Failed readings. A collector that raises (CollectorError, an out-of-range Sample, or anything
else) is counted per substrate, logged at most once per :data:`LOG_EVERY` seconds per substrate,
and skipped: nothing is added to the window, so the substrate's newest sample ages and it turns
``Stale`` after ``stale_after`` seconds. A failed reading is never read as zero load. The first
call of a delta-based collector (``PrimingError``) is skipped without being counted.

Gaps. A sample that comes more than ``stale_after`` seconds after the newest one in its window
(the agent was frozen, or every reading failed that long) restarts the window: what came before
the gap no longer describes the node, and a spectrum across a gap is not one series. So a node
that comes back fills ``minSamples`` again before its readings count (DESIGN section 6).

Conditions (:meth:`NodeMeasurements.build_status`), all with ``lastTransitionTime`` kept while
the status stays the same:

``Ready``
    True (``Measuring``) when every measured substrate has a sample newer than ``stale_after``;
    False (``SubstratesStale`` or ``NoSubstrates``) otherwise. Pressure does not make a node
    un-Ready (as with kubelet's node conditions); it stops it from voting YES instead.
``Stale``
    True (``SubstratesStale``) naming each substrate without a fresh sample, its last sample time,
    failure count and last error; False (``Fresh``) when all are fresh.
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

The values the voter uses are the ones published: :meth:`NodeMeasurements.pressure_conditions`
names the pressure conditions currently True, from the newest host reading.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.procfs import PrimingError
from capacity_agent.window import Window
from capacity_api import reasons
from capacity_api.gates import WINDOW, gate_reading, spectrum, summarize
from capacity_api.models import (
    CapacityNodeSpec,
    CapacityNodeStatus,
    CgroupLimits,
    Condition,
    ConditionStatus,
    GateReading,
    Geometry,
    PressureReading,
    SignalSummary,
    Substrate,
    SubstrateReading,
)
from capacity_api.quantity import QuantityError, parse_quantity

log = logging.getLogger(__name__)

LOG_EVERY = 60.0
"""Seconds between two log lines about the failures of one substrate."""
MAX_SIGNALS = 16
"""Signals published per substrate (the highest p95 first); keeps a CapacityNode small even on a
host with dozens of thermal sensors. The load summary always covers the worst of them."""
DECIMALS = 4
"""Published readings are rounded to this many decimals (smaller objects, steadier values)."""
MESSAGE_LIMIT = 512
"""Condition messages are cut to this many characters."""
ERROR_LIMIT = 300
"""Collector error texts are cut to this many characters (logs and the Stale message)."""

LOAD = "_load"
"""Window signal name of the substrate's load u (underscored: no collector signal is named so)."""
THROTTLED = "cpu_throttled"
"""Host window signal: share of CFS periods throttled between two samples."""

# Condition types and reasons live in capacity_api.reasons.

CONDITION_TYPES = (
    reasons.READY,
    reasons.STALE,
    reasons.MEMORY_PRESSURE,
    reasons.CPU_PRESSURE,
    reasons.IO_PRESSURE,
)
_PSI_RESOURCE = {
    reasons.MEMORY_PRESSURE: "memory",
    reasons.CPU_PRESSURE: "cpu",
    reasons.IO_PRESSURE: "io",
}


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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one collector returned for one tick: a sample or the exception it raised."""

    substrate: Substrate
    sample: Sample | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class TickResult:
    """Substrates that were sampled, and that failed (priming is neither)."""

    sampled: tuple[Substrate, ...] = ()
    failed: tuple[Substrate, ...] = ()


@dataclass
class _PressureState:
    status: ConditionStatus = ConditionStatus.UNKNOWN
    reason: str = reasons.PSI_UNAVAILABLE
    message: str = "no PSI reading yet"


@dataclass
class _SubstrateState:
    collector: Collector
    window: Window
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: int = 0
    """Failed samples since start (priming excluded)."""
    consecutive: int = 0
    """Failed samples since the last good one."""
    last_error: str = ""
    logged_at: float | None = None
    suppressed: int = 0
    pressure: dict[str, PressureReading] | None = None
    cgroup: CgroupLimits | None = None
    geometry: Geometry | None = None
    capacity: dict[str, str] = field(default_factory=dict)


def _iso(ts: float, *, whole_seconds: bool = False) -> datetime:
    moment = datetime.fromtimestamp(ts, UTC)
    if whole_seconds:
        return moment.replace(microsecond=0)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _round(value: float) -> float:
    return round(float(value), DECIMALS)


def _rounded(summary: SignalSummary) -> SignalSummary:
    return SignalSummary(
        mean=_round(summary.mean), p95=_round(summary.p95), max=_round(summary.max)
    )


def _short(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def discover(
    collectors: Iterable[Collector], *, required: Collection[Substrate] = ()
) -> list[Collector]:
    """The collectors whose substrate is present, plus those in ``required`` even when absent.

    Blocking (collectors probe files, NVML or a database): call it off the event loop. A collector
    whose ``present()`` raises counts as absent. One collector per substrate: the first wins.
    """
    kept: dict[Substrate, Collector] = {}
    for collector in collectors:
        substrate = collector.substrate
        if substrate in kept:
            continue
        try:
            present = collector.present()
        except Exception as exc:  # present() must not raise; a broken probe is an absent substrate
            log.warning("%s: presence probe failed: %s", substrate.value, exc)
            present = False
        if present:
            kept[substrate] = collector
        elif substrate in required:
            log.warning(
                "%s: not present now, but measured because it was asked for (it shows as Stale "
                "until it can be read)",
                substrate.value,
            )
            kept[substrate] = collector
        else:
            log.info("%s: not present on this node; not measured", substrate.value)
            collector.close()
    return [kept[s] for s in Substrate if s in kept]


class NodeMeasurements:
    """The collectors and windows of one node (see the module docstring)."""

    def __init__(
        self,
        collectors: Sequence[Collector],
        *,
        stale_after: float,
        node: str = "",
        window_size: int = WINDOW,
        thresholds: PressureThresholds | None = None,
        log_every: float = LOG_EVERY,
    ) -> None:
        if stale_after <= 0:
            raise ValueError(f"stale_after must be positive, got {stale_after!r}")
        self.node = node
        self.stale_after = stale_after
        self.thresholds = thresholds or PressureThresholds()
        self.log_every = log_every
        self._states: dict[Substrate, _SubstrateState] = {}
        for collector in collectors:
            if collector.substrate in self._states:
                raise ValueError(f"two collectors for substrate {collector.substrate.value}")
            self._states[collector.substrate] = _SubstrateState(collector, Window(window_size))
        self._pressure: dict[str, _PressureState] = {
            kind: _PressureState(
                message="host substrate not measured"
                if Substrate.HOST not in self._states
                else "no host sample yet"
            )
            for kind in _PSI_RESOURCE
        }
        self._throttle: deque[tuple[float, float]] = deque()
        self._conditions: dict[str, Condition] = {}
        self.gaps = 0
        """Windows restarted after a gap longer than ``stale_after``."""

    # -- what is measured ----------------------------------------------------------------------

    @property
    def substrates(self) -> list[Substrate]:
        """The measured substrates, in the order of :class:`Substrate`."""
        return [s for s in Substrate if s in self._states]

    def collector(self, substrate: Substrate) -> Collector | None:
        state = self._states.get(substrate)
        return None if state is None else state.collector

    def errors(self, substrate: Substrate) -> int:
        """Failed samples of ``substrate`` since start (priming excluded)."""
        state = self._states.get(substrate)
        return 0 if state is None else state.errors

    # -- sampling ------------------------------------------------------------------------------

    def collect(self, substrates: Iterable[Substrate] | None = None) -> list[Outcome]:
        """Call each collector once (blocking). Never raises: failures become Outcomes."""
        chosen = self.substrates if substrates is None else list(substrates)
        return [self.collect_one(s) for s in chosen]

    def collect_one(self, substrate: Substrate) -> Outcome:
        """One reading of one substrate (blocking); the collector is never called concurrently."""
        state = self._states[substrate]
        with state.lock:
            try:
                sample = state.collector.sample()
            except Exception as exc:  # any failure of a collector is a skipped sample
                return Outcome(substrate, error=exc)
        if sample.substrate != substrate:
            return Outcome(
                substrate,
                error=CollectorError(
                    f"{substrate.value}: collector returned a {sample.substrate.value} sample"
                ),
            )
        return Outcome(substrate, sample=sample)

    def record(self, now: float, outcomes: Iterable[Outcome]) -> TickResult:
        """Add the samples to their windows and count the failures (pure, no I/O)."""
        sampled: list[Substrate] = []
        failed: list[Substrate] = []
        for outcome in outcomes:
            state = self._states.get(outcome.substrate)
            if state is None:
                continue
            if outcome.sample is not None:
                self._add(outcome.substrate, state, outcome.sample, now)
                sampled.append(outcome.substrate)
                continue
            error = outcome.error or CollectorError("no sample and no error")
            if isinstance(error, PrimingError):
                log.debug("%s %s: %s", self.node, outcome.substrate.value, error)
                continue
            self._fail(outcome.substrate, state, error, now)
            failed.append(outcome.substrate)
        return TickResult(tuple(sampled), tuple(failed))

    def tick(self, now: float) -> TickResult:
        """Take one sample from every collector and record it (blocking)."""
        return self.record(now, self.collect())

    def _add(
        self, substrate: Substrate, state: _SubstrateState, sample: Sample, now: float
    ) -> None:
        at = sample.time if math.isfinite(sample.time) else now
        signals = {LOAD: sample.load, **sample.signals}
        throttled = sample.cgroup.cpu_throttled_fraction if sample.cgroup is not None else None
        if throttled is not None:
            signals[THROTTLED] = throttled
        newest = state.window.newest_time
        if newest is not None and at - newest > self.stale_after:
            # a gap (the agent was frozen, or every sample failed): the samples before it no
            # longer describe the node, and a spectrum across a gap is not one series. The
            # window starts again and has to fill minSamples before anyone trusts it.
            log.info(
                "%s %s: no sample for %.1f s (> %g s): window restarted",
                self.node, substrate.value, at - newest, self.stale_after,
            )  # fmt: skip
            state.window.clear()
            self.gaps += 1
        state.window.add(at, signals)
        state.consecutive = 0
        state.pressure = sample.pressure
        state.cgroup = sample.cgroup
        if substrate is Substrate.HOST:
            self._update_pressure(sample, at, throttled)

    def _fail(
        self, substrate: Substrate, state: _SubstrateState, error: BaseException, now: float
    ) -> None:
        state.errors += 1
        state.consecutive += 1
        text = str(error).strip() or type(error).__name__
        if not isinstance(error, CollectorError):
            text = f"{type(error).__name__}: {text}"
        state.last_error = text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 3] + "..."
        last = state.logged_at
        if last is None or now - last >= self.log_every or now < last:
            extra = f" ({state.suppressed} more since the last report)" if state.suppressed else ""
            log.warning(
                "%s %s: sample failed, %d failures so far%s; skipped, never read as zero: %s",
                self.node,
                substrate.value,
                state.errors,
                extra,
                state.last_error,
            )
            state.logged_at = now
            state.suppressed = 0
        else:
            state.suppressed += 1
            log.debug("%s %s: sample failed: %s", self.node, substrate.value, state.last_error)

    # -- pressure ------------------------------------------------------------------------------

    def _update_pressure(self, sample: Sample, at: float, throttled: float | None) -> None:
        t = self.thresholds
        # values stamped after this sample (the clock stepped back) no longer describe "now"
        while self._throttle and self._throttle[-1][0] > at:
            self._throttle.pop()
        if throttled is not None:
            self._throttle.append((at, throttled))
        while self._throttle and self._throttle[0][0] < at - t.throttle_seconds:
            self._throttle.popleft()
        pressure = sample.pressure or {}
        for kind, resource in _PSI_RESOURCE.items():
            state = self._pressure[kind]
            reading = pressure.get(resource)
            value = None if reading is None else reading.some_avg10
            if value is None or not math.isfinite(value):
                state.status = ConditionStatus.UNKNOWN
                state.reason = reasons.PSI_UNAVAILABLE
                state.message = f"no PSI {resource} some avg10 in the newest host sample"
                continue
            threshold = {"memory": t.memory, "io": t.io, "cpu": t.cpu}[resource]
            effective = value
            note = ""
            if resource == "cpu" and self._throttle:
                share = sum(v for _, v in self._throttle) / len(self._throttle)
                effective = value * (1.0 - share)
                note = (
                    f" (cgroup throttled in {share:.0%} of periods over "
                    f"{t.throttle_seconds:g} s: {effective:.1f}% after discounting)"
                )
            was_set = state.status is ConditionStatus.TRUE
            limit = threshold * t.clear_ratio if was_set else threshold
            if effective > limit:
                state.status = ConditionStatus.TRUE
                state.reason = reasons.PSI_ABOVE_THRESHOLD
                state.message = (
                    f"PSI {resource} some avg10 {value:.1f}%{note} above {limit:g}%"
                    if not was_set
                    else f"PSI {resource} some avg10 {value:.1f}%{note} not yet below {limit:g}%"
                )
            else:
                state.status = ConditionStatus.FALSE
                if resource == "cpu" and value > limit:
                    state.reason = reasons.CPU_THROTTLED
                    state.message = (
                        f"PSI cpu some avg10 {value:.1f}% is above {limit:g}% but explained by "
                        f"cgroup throttling{note}"
                    )
                else:
                    state.reason = reasons.PSI_BELOW_THRESHOLD
                    state.message = f"PSI {resource} some avg10 {value:.1f}%{note} <= {limit:g}%"

    def pressure_conditions(self) -> list[str]:
        """Names of the pressure conditions currently True (e.g. ``["MemoryPressure"]``)."""
        return [k for k, s in self._pressure.items() if s.status is ConditionStatus.TRUE]

    # -- what the voter reads ------------------------------------------------------------------

    def series(self, substrate: Substrate) -> npt.NDArray[np.float64]:
        """The load u window of ``substrate``, oldest first (empty when never sampled)."""
        state = self._states.get(substrate)
        if state is None:
            return np.zeros(0, dtype=np.float64)
        return state.window.series(LOAD)

    def samples(self, substrate: Substrate) -> int:
        """Samples of ``substrate`` in its window (0 when not measured)."""
        state = self._states.get(substrate)
        return 0 if state is None else state.window.count(LOAD)

    def newest_time(self, substrate: Substrate) -> float | None:
        """Time of the newest sample of ``substrate``; None when it has none."""
        state = self._states.get(substrate)
        return None if state is None else state.window.newest_time

    def is_stale(self, substrate: Substrate, now: float, max_age: float | None = None) -> bool:
        """True when ``substrate`` has no sample, or its newest is older than ``max_age``
        (default ``stale_after``). A substrate that is not measured is stale."""
        newest = self.newest_time(substrate)
        limit = self.stale_after if max_age is None else max_age
        return newest is None or now - newest > limit

    def load_range(self, substrate: Substrate) -> float:
        """Peak-to-peak range of the load window (0 when it has fewer than two samples)."""
        u = self.series(substrate)
        return float(np.ptp(u)) if u.size >= 2 else 0.0

    # -- the CapacityNode ------------------------------------------------------------------------

    def spec(self, node_name: str) -> CapacityNodeSpec:
        """Substrates, geometry and capacity (blocking: collectors read files). A collector whose
        geometry or capacity cannot be read keeps its previous values."""
        geometry: dict[str, Geometry] = {}
        capacity: dict[str, str | int] = {}
        for substrate, state in self._states.items():
            with state.lock:
                try:
                    state.geometry = state.collector.geometry()
                    state.capacity = _valid_quantities(substrate, state.collector.capacity())
                except Exception as exc:  # keep the last known values
                    log.debug("%s %s: geometry/capacity unreadable: %s", self.node, substrate, exc)
            if state.geometry is not None:
                geometry[substrate.value] = state.geometry
            capacity.update(state.capacity)
        return CapacityNodeSpec(
            node_name=node_name,
            substrates=self.substrates,
            geometry=geometry or None,
            capacity=dict(sorted(capacity.items())) or None,
        )

    def reading(self, substrate: Substrate) -> SubstrateReading | None:
        """The window summary of one substrate; None when it has no sample (never zeros)."""
        state = self._states.get(substrate)
        if state is None or state.window.newest_time is None:
            return None
        summaries = state.window.summaries()
        load = summaries.pop(LOAD, None)
        if load is None:
            return None
        top = sorted(summaries.items(), key=lambda item: (-item[1].p95, item[0]))[:MAX_SIGNALS]
        signals = {name: _rounded(summary) for name, summary in sorted(top)}
        fingerprint = [_round(x) for x in spectrum(state.window.series(LOAD)).fingerprint]
        cgroup = state.cgroup
        if cgroup is not None:
            throttled = summarize(state.window.series(THROTTLED))
            cgroup = cgroup.model_copy(
                update={
                    "cpu_throttled_fraction": None
                    if throttled is None
                    else min(1.0, _round(throttled.mean))
                }
            )
        pressure = None
        if state.pressure:
            pressure = dict(sorted(state.pressure.items()))
        return SubstrateReading(
            load=_rounded(load),
            signals=signals or None,
            fingerprint=fingerprint,
            pressure=pressure,
            cgroup=cgroup,
            observed_at=_iso(state.window.newest_time),
            samples=state.window.count(LOAD),
        )

    def gates(self, substrate: Substrate, allocated: float) -> GateReading | None:
        """The gate readings of one substrate; None when it has no sample."""
        u = self.series(substrate)
        if u.size == 0:
            return None
        g = gate_reading(u, allocated)
        return GateReading(
            headroom=_round(g.headroom),
            gluing_delta=_round(g.gluing_delta),
            lambda1=_round(g.lambda1),
            lambda_int=_round(g.lambda_int),
            entropy=_round(g.entropy),
        )

    def build_status(
        self,
        now: float,
        allocated: Mapping[str, float] | None = None,
        *,
        generation: int | None = None,
    ) -> CapacityNodeStatus:
        """Readings, gates and conditions as of ``now`` (never ``status.allocated``, which the
        operator owns). ``allocated`` is the share of each substrate promised to claims, for the
        headroom gate (0 when unknown)."""
        allocated = allocated or {}
        readings: dict[str, SubstrateReading] = {}
        gates: dict[str, GateReading] = {}
        for substrate in self.substrates:
            reading = self.reading(substrate)
            gate = self.gates(substrate, allocated.get(substrate.value, 0.0))
            if reading is not None and gate is not None:
                readings[substrate.value] = reading
                gates[substrate.value] = gate
        return CapacityNodeStatus(
            readings=readings or None,
            gates=gates or None,
            conditions=self.conditions(now, generation=generation),
            observed_generation=generation,
        )

    def conditions(self, now: float, *, generation: int | None = None) -> list[Condition]:
        """Ready, Stale, MemoryPressure, CPUPressure, IOPressure as of ``now``."""
        stale = [s for s in self.substrates if self.is_stale(s, now)]
        measured = ", ".join(s.value for s in self.substrates)
        wanted: list[tuple[str, ConditionStatus, str, str]] = []
        if not self._states:
            wanted.append(
                (
                    reasons.READY,
                    ConditionStatus.FALSE,
                    reasons.NO_SUBSTRATES,
                    "no substrate is present",
                )
            )
        elif stale:
            names = ", ".join(s.value for s in stale)
            wanted.append(
                (
                    reasons.READY,
                    ConditionStatus.FALSE,
                    reasons.SUBSTRATES_STALE,
                    f"no fresh sample of {names}",
                )
            )
        else:
            wanted.append(
                (reasons.READY, ConditionStatus.TRUE, reasons.MEASURING, f"measuring {measured}")
            )
        if stale:
            details = "; ".join(self._stale_detail(s) for s in stale)
            message = f"no sample within {self.stale_after:g} s: {details}"
            wanted.append((reasons.STALE, ConditionStatus.TRUE, reasons.SUBSTRATES_STALE, message))
        else:
            message = f"every substrate sampled within {self.stale_after:g} s"
            wanted.append((reasons.STALE, ConditionStatus.FALSE, reasons.FRESH, message))
        for kind in (reasons.MEMORY_PRESSURE, reasons.CPU_PRESSURE, reasons.IO_PRESSURE):
            p = self._pressure[kind]
            wanted.append((kind, p.status, p.reason, p.message))
        return [
            self._condition(
                kind,
                status=status,
                reason=reason,
                message=message,
                now=now,
                generation=generation,
            )
            for kind, status, reason, message in wanted
        ]

    def _stale_detail(self, substrate: Substrate) -> str:
        state = self._states[substrate]
        newest = state.window.newest_time
        since = (
            "no sample yet"
            if newest is None
            else f"last sample {_iso(newest, whole_seconds=True).isoformat()}"
        )
        if state.consecutive:
            since += f", {state.consecutive} failed since"
        if state.last_error and state.consecutive:
            since += f" (last error: {state.last_error[:160]})"
        return f"{substrate.value}: {since}"

    def _condition(
        self,
        kind: str,
        *,
        status: ConditionStatus,
        reason: str,
        message: str,
        now: float,
        generation: int | None,
    ) -> Condition:
        previous = self._conditions.get(kind)
        if previous is not None and previous.status == status:
            since = previous.last_transition_time
        else:
            since = _iso(now, whole_seconds=True)
        condition = Condition(
            type=kind,
            status=status,
            reason=reason,
            message=_short(message),
            last_transition_time=since,
            observed_generation=generation,
        )
        self._conditions[kind] = condition
        return condition

    def close(self) -> None:
        """Close every collector (connections, NVML)."""
        for substrate, state in self._states.items():
            with state.lock:
                try:
                    state.collector.close()
                except Exception as exc:  # closing must not stop the others from closing
                    log.warning("%s %s: close failed: %s", self.node, substrate.value, exc)


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
