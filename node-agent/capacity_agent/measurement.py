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

What is published. :meth:`NodeMeasurements.reading` and :meth:`NodeMeasurements.gates` summarise
a substrate's window (load and signal summaries, the spectral fingerprint, the gate readings);
:meth:`NodeMeasurements.spec` and :meth:`NodeMeasurements.build_status` hand them, with the
collectors' geometry and capacity and the conditions, to :mod:`capacity_agent.node_status`, which
builds the CapacityNode. Every host sample also feeds :mod:`capacity_agent.pressure`: the pressure
conditions published and the ones the voter reads (:meth:`NodeMeasurements.pressure_conditions`)
come from the same newest host reading.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.procfs import PrimingError
from capacity_agent.node_status import (
    ConditionLog,
    StaleSubstrate,
    freshness,
    moment,
    node_spec,
    node_status,
)
from capacity_agent.pressure import PressureConditions, PressureThresholds
from capacity_agent.window import Window
from capacity_api.gates import WINDOW, gate_reading, spectrum, summarize
from capacity_api.models import (
    CapacityNodeSpec,
    CapacityNodeStatus,
    CgroupLimits,
    Condition,
    GateReading,
    Geometry,
    PressureReading,
    SignalSummary,
    Substrate,
    SubstrateReading,
)

log = logging.getLogger(__name__)

LOG_EVERY = 60.0
"""Seconds between two log lines about the failures of one substrate."""
MAX_SIGNALS = 16
"""Signals published per substrate (the highest p95 first); keeps a CapacityNode small even on a
host with dozens of thermal sensors. The load summary always covers the worst of them."""
DECIMALS = 4
"""Published readings are rounded to this many decimals (smaller objects, steadier values)."""
ERROR_LIMIT = 300
"""Collector error texts are cut to this many characters (logs and the Stale message)."""

LOAD = "_load"
"""Window signal name of the substrate's load u (underscored: no collector signal is named so)."""
THROTTLED = "cpu_throttled"
"""Host window signal: share of CFS periods throttled between two samples."""


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


def _round(value: float) -> float:
    return round(float(value), DECIMALS)


def _rounded(summary: SignalSummary) -> SignalSummary:
    return SignalSummary(
        mean=_round(summary.mean), p95=_round(summary.p95), max=_round(summary.max)
    )


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
        self._pressure = PressureConditions(
            self.thresholds, host_measured=Substrate.HOST in self._states
        )
        self._conditions = ConditionLog()
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
            self._pressure.update(sample.pressure, at, throttled)

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

    # -- what the voter reads ------------------------------------------------------------------

    def series(self, substrate: Substrate) -> list[float]:
        """The load u window of ``substrate``, oldest first (empty when never sampled)."""
        state = self._states.get(substrate)
        if state is None:
            return []
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

    def pressure_conditions(self) -> list[str]:
        """Names of the pressure conditions currently True (e.g. ``["MemoryPressure"]``), as
        published: both come from the newest host sample."""
        return self._pressure.active()

    def load_range(self, substrate: Substrate) -> float:
        """Peak-to-peak range of the load window (0 when it has fewer than two samples)."""
        u = self.series(substrate)
        return max(u) - min(u) if len(u) >= 2 else 0.0

    # -- the CapacityNode ------------------------------------------------------------------------

    def spec(self, node_name: str) -> CapacityNodeSpec:
        """Substrates, geometry and capacity (blocking: collectors read files). A collector whose
        geometry or capacity cannot be read keeps its previous values."""
        for substrate, state in self._states.items():
            with state.lock:
                try:
                    state.geometry = state.collector.geometry()
                    state.capacity = state.collector.capacity()
                except Exception as exc:  # keep the last known values
                    log.debug("%s %s: geometry/capacity unreadable: %s", self.node, substrate, exc)
        return node_spec(
            node_name,
            self.substrates,
            geometry={s: self._states[s].geometry for s in self.substrates},
            capacity={s: self._states[s].capacity for s in self.substrates},
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
            observed_at=moment(state.window.newest_time),
            samples=state.window.count(LOAD),
        )

    def gates(self, substrate: Substrate, allocated: float) -> GateReading | None:
        """The gate readings of one substrate; None when it has no sample."""
        u = self.series(substrate)
        if not u:
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
        summaries: dict[Substrate, tuple[SubstrateReading, GateReading]] = {}
        for substrate in self.substrates:
            reading = self.reading(substrate)
            gate = self.gates(substrate, allocated.get(substrate.value, 0.0))
            if reading is not None and gate is not None:
                summaries[substrate] = (reading, gate)
        conditions = self.conditions(now, generation=generation)
        return node_status(summaries, conditions, generation=generation)

    def conditions(self, now: float, *, generation: int | None = None) -> list[Condition]:
        """Ready, Stale, MemoryPressure, CPUPressure, IOPressure as of ``now``."""
        stale = [self._staleness(s) for s in self.substrates if self.is_stale(s, now)]
        ready, stale_condition = freshness(self.substrates, stale, self.stale_after)
        return self._conditions.stamp(
            [ready, stale_condition, *self._pressure.states()], now, generation=generation
        )

    def _staleness(self, substrate: Substrate) -> StaleSubstrate:
        state = self._states[substrate]
        return StaleSubstrate(
            substrate, state.window.newest_time, state.consecutive, state.last_error
        )

    def close(self) -> None:
        """Close every collector (connections, NVML)."""
        for substrate, state in self._states.items():
            with state.lock:
                try:
                    state.collector.close()
                except Exception as exc:  # closing must not stop the others from closing
                    log.warning("%s %s: close failed: %s", self.node, substrate.value, exc)
