"""Simulated substrate sources for tests and benchmarks, and the agent's ``--source`` syntax.

Every source here is a :class:`~capacity_agent.collectors.base.Collector`, so the measurement
window, the gates and the publisher cannot tell them from a live collector.

Source specs (:func:`parse_source`), as given on the command line:

``live``
    the node's own collectors (/proc, /sys, NVML, the database).
``replay:FILE``
    :class:`ReplayCollector` over a recorded JSON-lines file.
``synthetic:KIND``
    :class:`SyntheticCollector` of one kind: ``steady``, ``periodic``, ``bursty`` or ``ramp``.
``prometheus:URL``
    :class:`~capacity_agent.collectors.prometheus.PrometheusHostCollector` reading node-exporter
    series from the Prometheus server at URL (http or https).

Replay file format: UTF-8 JSON lines, one object per sample, oldest first::

    {"t": 0.0, "load": 0.42, "signals": {"cpu": 0.42, "memory": 0.30}}
    {"t": 1.0, "load": 0.47, "signals": {"cpu": 0.47, "memory": 0.31}, "raw": {"rss": 1.2e9}}

- ``t`` (number, required): seconds since the start of the recording, non-decreasing. By default it
  is informational (one record per ``sample()`` call, so a recording plays at the agent's interval);
  with ``paced=True`` the record played is the last one whose ``t`` is at most the time elapsed
  since the first sample (so a recording keeps its own timing whatever the agent's interval).
- ``load`` (number in [0, 1], required): the substrate's load u.
- ``signals`` (object of numbers in [0, 1], optional, default ``{}``).
- ``raw`` (object of numbers, optional): natural-unit values, passed through.

Blank lines and lines starting with ``#`` are ignored. Any other line that is not such an object
(bad JSON, missing or out-of-range values, ``t`` going backwards) is malformed: it is counted in
:attr:`ReplayCollector.malformed`, logged (once per file, with the first bad line number) and
skipped; it never stops the replay. At the end of the file the replay loops to the start. The
``Sample.time`` of a replayed record comes from the injected clock, not from ``t``, so the windows
it feeds stay fresh.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_api.models import Geometry, Substrate

log = logging.getLogger(__name__)

Clock = Callable[[], float]

NOISE_KNOT = 8
"""Steps between the random knots of the synthetic sources' smooth noise."""


# ---------------------------------------------------------------------------------------------
# Source specs


class SourceKind(StrEnum):
    """Where the agent takes its samples from."""

    LIVE = "live"
    REPLAY = "replay"
    SYNTHETIC = "synthetic"
    PROMETHEUS = "prometheus"


class SyntheticKind(StrEnum):
    """The shapes :class:`SyntheticCollector` produces."""

    STEADY = "steady"
    PERIODIC = "periodic"
    BURSTY = "bursty"
    RAMP = "ramp"


SOURCE_RULE = (
    "a source is one of: live | replay:FILE | synthetic:KIND (KIND one of "
    + ", ".join(kind.value for kind in SyntheticKind)
    + ") | prometheus:URL (an http:// or https:// URL with a host)"
)


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed ``--source`` value; exactly the field that belongs to ``kind`` is set."""

    kind: SourceKind
    path: Path | None = None
    """The recording, for ``replay``."""
    synthetic: SyntheticKind | None = None
    """The shape, for ``synthetic``."""
    url: str | None = None
    """The Prometheus server, for ``prometheus``."""

    def __str__(self) -> str:
        argument = self.path or self.synthetic or self.url
        return self.kind.value if argument is None else f"{self.kind.value}:{argument}"


def parse_source(spec: str) -> SourceSpec:
    """Parse ``live``, ``replay:FILE``, ``synthetic:KIND`` or ``prometheus:URL``.

    Raises ValueError naming the rule that was broken. The file of a replay is not opened here.
    """
    text = spec.strip()
    name, sep, argument = text.partition(":")
    try:
        kind = SourceKind(name)
    except ValueError:
        raise ValueError(f"source {spec!r}: unknown kind {name!r}; {SOURCE_RULE}") from None
    if kind is SourceKind.LIVE:
        if sep:
            raise ValueError(f"source {spec!r}: 'live' takes no argument; {SOURCE_RULE}")
        return SourceSpec(kind)
    if not argument.strip():
        placeholder = {"replay": "FILE", "synthetic": "KIND", "prometheus": "URL"}[kind.value]
        raise ValueError(
            f"source {spec!r}: {kind.value} needs an argument, {kind.value}:{placeholder}; "
            f"{SOURCE_RULE}"
        )
    if kind is SourceKind.REPLAY:
        return SourceSpec(kind, path=Path(argument))
    if kind is SourceKind.SYNTHETIC:
        try:
            return SourceSpec(kind, synthetic=SyntheticKind(argument))
        except ValueError:
            raise ValueError(
                f"source {spec!r}: unknown synthetic kind {argument!r}; {SOURCE_RULE}"
            ) from None
    url = urlsplit(argument)
    if url.scheme not in {"http", "https"} or not url.hostname:
        raise ValueError(f"source {spec!r}: {argument!r} is not a Prometheus URL; {SOURCE_RULE}")
    return SourceSpec(kind, url=argument)


# ---------------------------------------------------------------------------------------------
# Replay


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """One valid line of a recording."""

    t: float
    load: float
    signals: dict[str, float]
    raw: dict[str, float]


def _fraction(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= number <= 1.0 else None


def parse_record(line: str) -> ReplayRecord:
    """One line of a recording, or ValueError saying what is wrong with it."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    t = data.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise ValueError("'t' must be a finite number of seconds")
    load = _fraction(data.get("load"))
    if load is None:
        raise ValueError("'load' must be a number in [0, 1]")
    signals_in = data.get("signals", {})
    if not isinstance(signals_in, dict):
        raise ValueError("'signals' must be an object")
    signals: dict[str, float] = {}
    for key, value in signals_in.items():
        fraction = _fraction(value)
        if fraction is None:
            raise ValueError(f"signal {key!r} must be a number in [0, 1]")
        signals[str(key)] = fraction
    raw_in = data.get("raw", {})
    if not isinstance(raw_in, dict):
        raise ValueError("'raw' must be an object")
    raw: dict[str, float] = {}
    for key, value in raw_in.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"raw {key!r} must be a number")
        raw[str(key)] = float(value)
    return ReplayRecord(float(t), load, signals, raw)


class ReplayCollector(Collector):
    """Replays a JSON-lines recording (format in the module docstring), looping at the end."""

    def __init__(
        self,
        path: str | Path,
        substrate: Substrate = Substrate.HOST,
        clock: Clock = time.time,
        *,
        paced: bool = False,
        geometry: Geometry | None = None,
        capacity: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.substrate = substrate
        self._clock = clock
        self._paced = paced
        self._geometry = geometry
        self._capacity = dict(capacity or {})
        self._records: list[ReplayRecord] | None = None
        self._error: str | None = None
        self._position = 0
        self._start: float | None = None
        self.malformed = 0
        """Lines skipped because they were malformed."""

    def _load(self) -> list[ReplayRecord]:
        if self._records is not None:
            return self._records
        records: list[ReplayRecord] = []
        self._records = records
        try:
            with self.path.open(encoding="utf-8", errors="replace") as lines:
                first_bad: tuple[int, str] | None = None
                for number, line in enumerate(lines, start=1):
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    try:
                        record = parse_record(line)
                        if records and record.t < records[-1].t:
                            raise ValueError(f"'t' goes backwards ({record.t} < {records[-1].t})")
                    except ValueError as exc:
                        self.malformed += 1
                        first_bad = first_bad or (number, str(exc))
                        continue
                    records.append(record)
        except OSError as exc:
            self._error = f"replay {self.path}: cannot read: {exc.strerror or exc}"
            log.warning("%s", self._error)
            return records
        if first_bad is not None:
            log.warning(
                "replay %s: skipped %d malformed lines (first: line %d: %s)",
                self.path,
                self.malformed,
                *first_bad,
            )
        if not records:
            self._error = f"replay {self.path}: no valid records"
            log.warning("%s", self._error)
        return records

    def records(self) -> list[ReplayRecord]:
        """The valid records of the file, read once."""
        return list(self._load())

    def present(self) -> bool:
        return bool(self._load())

    def geometry(self) -> Geometry | None:
        return self._geometry

    def capacity(self) -> dict[str, str]:
        return dict(self._capacity)

    def _next(self, now: float) -> ReplayRecord:
        records = self._load()
        if not records:
            raise CollectorError(self._error or f"replay {self.path}: no valid records")
        if not self._paced:
            record = records[self._position % len(records)]
            self._position = (self._position + 1) % len(records)
            return record
        if self._start is None:
            self._start = now
        first, last = records[0].t, records[-1].t
        steps = [b.t - a.t for a, b in itertools.pairwise(records) if b.t > a.t]
        step = sorted(steps)[len(steps) // 2] if steps else 1.0
        span = last - first + step
        offset = first + (now - self._start) % span
        index = 0
        for i, record in enumerate(records):
            if record.t <= offset:
                index = i
            else:
                break
        return records[index]

    def sample(self) -> Sample:
        now = self._clock()
        record = self._next(now)
        return Sample(
            substrate=self.substrate,
            time=now,
            load=record.load,
            signals=dict(record.signals),
            raw={**record.raw, "t": record.t},
        )


# ---------------------------------------------------------------------------------------------
# Synthetic


def _uniform(seed: int, step: int, stream: int) -> float:
    """A deterministic uniform number in [0, 1) for (seed, step, stream), platform-independent."""
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class SyntheticCollector(Collector):
    """Deterministic synthetic load of one shape; a pure function of the seed and the clock.

    The clock value t is cut into steps of ``step`` seconds (set it to the sampling interval);
    every random draw depends only on (seed, step index), so two collectors with the same seed
    read at the same clock values produce the same samples, in any order. Shapes (before a smooth
    ``noise`` within ±noise/2 that wanders over :data:`NOISE_KNOT` steps, then clipped to [0, 1]):

    ``steady``
        ``base``.
    ``periodic``
        ``base + amplitude * sin(2π t / period)``.
    ``bursty``
        mostly ``base``; on a random half of the odd steps (``burst_probability``) a one-step
        spike to between ``base + 0.6 * amplitude`` and ``base + amplitude``. Spikes last one
        step and never come back to back, so their power sits at the top of the spectrum: high
        lambda_int (0.7 to 0.8 for the default probability, above the default burst gate).
    ``ramp``
        rises linearly from ``base`` at ``start`` (default: the clock at construction) to
        ``base + amplitude`` after ``period`` seconds, then holds.

    Signals: ``cpu`` is the shape, ``memory = memory_ratio * cpu``; ``load = max(cpu, memory)``.
    """

    def __init__(
        self,
        kind: SyntheticKind | str,
        substrate: Substrate = Substrate.HOST,
        *,
        seed: int = 0,
        clock: Clock = time.time,
        base: float = 0.3,
        amplitude: float = 0.2,
        period: float = 60.0,
        step: float = 1.0,
        noise: float = 0.01,
        burst_probability: float = 0.5,
        memory_ratio: float = 0.8,
        start: float | None = None,
        cpus: int = 8,
        geometry: Geometry | None = None,
        capacity: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = SyntheticKind(kind)
        if period <= 0 or step <= 0:
            raise ValueError("period and step must be positive")
        if not 0.0 <= burst_probability <= 1.0 or not 0.0 <= memory_ratio <= 1.0:
            raise ValueError("burst_probability and memory_ratio must be within [0, 1]")
        self.substrate = substrate
        self.seed = seed
        self._clock = clock
        self.base = base
        self.amplitude = amplitude
        self.period = period
        self.step = step
        self.noise = noise
        self.burst_probability = burst_probability
        self.memory_ratio = memory_ratio
        self.start = clock() if start is None else start
        self._geometry = geometry or Geometry(units=cpus, detail={"cpus": cpus})
        self._capacity = (
            dict(capacity) if capacity is not None else {"cpu": str(cpus), "memory": "32Gi"}
        )

    def present(self) -> bool:
        return True

    def geometry(self) -> Geometry | None:
        return self._geometry

    def capacity(self) -> dict[str, str]:
        return dict(self._capacity)

    def _smooth_noise(self, x: float) -> float:
        """Value noise in [0, 1): random knots every NOISE_KNOT steps, cosine-interpolated.

        Smooth noise keeps its power at the bottom of the spectrum, so it never makes a steady
        or periodic source look bursty (white noise alone gives lambda_int about 0.5).
        """
        position = x / NOISE_KNOT
        knot = math.floor(position)
        weight = (1.0 - math.cos(math.pi * (position - knot))) / 2.0
        left = _uniform(self.seed, knot, 0)
        right = _uniform(self.seed, knot + 1, 0)
        return left + (right - left) * weight

    def value(self, t: float) -> float:
        """The cpu signal at clock value t, in [0, 1]."""
        k = math.floor(t / self.step)
        jitter = self.noise * (self._smooth_noise(t / self.step) - 0.5)
        if self.kind is SyntheticKind.STEADY:
            shape = self.base
        elif self.kind is SyntheticKind.PERIODIC:
            shape = self.base + self.amplitude * math.sin(2.0 * math.pi * t / self.period)
        elif self.kind is SyntheticKind.BURSTY:
            shape = self.base
            if k % 2 == 1 and _uniform(self.seed, k, 1) < self.burst_probability:
                shape += self.amplitude * (0.6 + 0.4 * _uniform(self.seed, k, 2))
        else:
            progress = min(1.0, max(0.0, (t - self.start) / self.period))
            shape = self.base + self.amplitude * progress
        return min(1.0, max(0.0, shape + jitter))

    def sample(self) -> Sample:
        now = self._clock()
        cpu = self.value(now)
        memory = self.memory_ratio * cpu
        return Sample(
            substrate=self.substrate,
            time=now,
            load=max(cpu, memory),
            signals={"cpu": cpu, "memory": memory},
        )
