"""The host substrate read from node-exporter series in Prometheus, instead of the local /proc.

``PrometheusHostCollector(url, instance=...)`` asks Prometheus (through
``prometheus_api_client.PrometheusConnect``) for one node's node-exporter series, in a single
instant query per sample, so every signal of a sample is evaluated at the same instant:

``cpu``
    ``1 - sum(rate(node_cpu_seconds_total{mode=~"idle|iowait"}[W])) / count(CPUs)``: the busy
    share of all CPUs over the rate window W (default 30s). I/O wait counts as idle, as in
    ``psutil.cpu_percent`` and the kernel's own accounting: a CPU waiting on I/O is free to run
    other work.
``memory``
    ``(MemTotal - MemFree - Inactive_file) / MemTotal`` from ``node_memory_*_bytes``: the node
    working set, the same formula as the /proc host collector (and kubelet).
``load1``
    ``node_load1 / CPUs``, clamped at 1 (the unclamped load average is ``raw["loadavg1"]``).
``psi_cpu``, ``psi_memory``, ``psi_io``
    PSI ``some avg10`` / 100, when node-exporter exports ``node_pressure_*`` (kernel 4.20+ with
    PSI enabled); the full readings are in ``Sample.pressure``.

``load = max(cpu, memory)``. These are the signal names of the /proc host collector
(``collectors/host.py``), so the window cannot tell the two sources apart. PSI: ``some`` comes from
the ``*_waiting_seconds_total`` counters, ``full`` from ``*_stalled_seconds_total`` (memory and io),
as percent of time like /proc/pressure, with ``avg10`` computed as a rate over ``psi_short``
(default 10s: needs a scrape interval of 5 s or less; with slower scrapes set it to at least twice
the interval) and ``avg60`` over ``1m``. Pressure is left out when the series are absent; it is
never read as zero.

The selector picks exactly one node: ``instance`` (the node-exporter target, e.g.
``"10.0.0.7:9100"``) and optionally ``job``; ``selector`` adds raw PromQL label matchers. A query
that fails (network, HTTP status, timeout), returns no cpu or memory series (node-exporter down:
Prometheus marks its series stale), or matches more than one instance raises
:class:`CollectorError`. Requests are not retried inside a sample (the next sample is the retry)
and time out after ``timeout`` seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_api.models import Geometry, PressureReading, Substrate

log = logging.getLogger(__name__)

SIGNAL_LABEL = "capacity_signal"
"""The label the combined query puts on each series to name the signal it carries."""

# PSI: resource -> {PressureReading field prefix: node-exporter counter}.
_PSI = {
    "cpu": {"some": "node_pressure_cpu_waiting_seconds_total"},
    "memory": {
        "some": "node_pressure_memory_waiting_seconds_total",
        "full": "node_pressure_memory_stalled_seconds_total",
    },
    "io": {
        "some": "node_pressure_io_waiting_seconds_total",
        "full": "node_pressure_io_stalled_seconds_total",
    },
}


def _quote(value: str) -> str:
    """A PromQL double-quoted string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def label_matchers(
    instance: str | None = None, job: str | None = None, selector: str | None = None
) -> str:
    """The label matchers (without braces) that select one node's node-exporter series."""
    parts = []
    if instance:
        parts.append(f"instance={_quote(instance)}")
    if job:
        parts.append(f"job={_quote(job)}")
    if selector and selector.strip().strip(","):
        parts.append(selector.strip().strip(","))
    return ",".join(parts)


def _series(metric: str, matchers: str, extra: str = "") -> str:
    inside = ",".join(part for part in (extra, matchers) if part)
    return f"{metric}{{{inside}}}"


def build_queries(
    matchers: str, rate_window: str = "30s", psi_short: str = "10s", psi_long: str = "1m"
) -> dict[str, str]:
    """PromQL per signal name, each aggregated ``by (instance)``."""
    idle_series = _series("node_cpu_seconds_total", matchers, 'mode="idle"')
    cpus = f"count by (instance) ({idle_series})"
    idle = _series("node_cpu_seconds_total", matchers, 'mode=~"idle|iowait"')
    queries = {
        "cpu": f"1 - sum by (instance) (rate({idle}[{rate_window}])) / {cpus}",
        "cpus": cpus,
        # the node working set as kubelet and the /proc host collector compute it:
        # (MemTotal - MemFree - Inactive(file)) / MemTotal
        "memory": (
            f"(sum by (instance) ({_series('node_memory_MemTotal_bytes', matchers)})"
            f" - sum by (instance) ({_series('node_memory_MemFree_bytes', matchers)})"
            f" - sum by (instance) ({_series('node_memory_Inactive_file_bytes', matchers)}))"
            f" / sum by (instance) ({_series('node_memory_MemTotal_bytes', matchers)})"
        ),
        "memory_total_bytes": (
            f"sum by (instance) ({_series('node_memory_MemTotal_bytes', matchers)})"
        ),
        "load1": f"sum by (instance) ({_series('node_load1', matchers)})",
    }
    for resource, kinds in _PSI.items():
        for kind, metric in kinds.items():
            for window, suffix in ((psi_short, "avg10"), (psi_long, "avg60")):
                queries[f"psi:{resource}:{kind}_{suffix}"] = (
                    f"100 * sum by (instance) (rate({_series(metric, matchers)}[{window}]))"
                )
    return queries


def combine(queries: dict[str, str]) -> str:
    """One PromQL expression returning every query, each series labelled with its name."""
    return " or ".join(
        f'label_replace({expr}, "{SIGNAL_LABEL}", "{name}", "", "")'
        for name, expr in queries.items()
    )


@dataclass(frozen=True, slots=True)
class HostReading:
    """The values of one combined query for one instance."""

    instance: str
    values: dict[str, float]


def parse_result(result: Iterable[Any]) -> HostReading:
    """Group a query result by signal; exactly one instance must be present."""
    values: dict[str, float] = {}
    instances: set[str] = set()
    for item in result:
        try:
            labels = item["metric"]
            name = labels[SIGNAL_LABEL]
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise CollectorError(f"prometheus: unexpected result item {item!r}") from exc
        instances.add(str(labels.get("instance", "")))
        if math.isfinite(value):
            values[name] = value
    if len(instances) > 1:
        raise CollectorError(
            f"prometheus: the selector matches {len(instances)} instances "
            f"({', '.join(sorted(instances))}); set instance= to pick one node"
        )
    return HostReading(next(iter(instances), ""), values)


def _unit(value: float) -> float:
    return min(1.0, max(0.0, value))


def _quantity_bytes(value: float) -> str:
    """Bytes as a plain-integer quantity, the form the /proc host collector uses."""
    return str(int(value))


class PrometheusHostCollector(Collector):
    """Host signals of one node from node-exporter series in Prometheus.

    ``client`` is anything with PrometheusConnect's ``custom_query(query, params, timeout)``;
    None builds a ``PrometheusConnect(url)`` without retries and with ``timeout``.
    """

    substrate = Substrate.HOST

    def __init__(
        self,
        url: str,
        instance: str | None = None,
        *,
        job: str | None = None,
        selector: str | None = None,
        rate_window: str = "30s",
        psi_short: str = "10s",
        psi_long: str = "1m",
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        client: Any = None,
    ) -> None:
        self.url = url
        self.matchers = label_matchers(instance, job, selector)
        self.queries = build_queries(self.matchers, rate_window, psi_short, psi_long)
        self.query = combine(self.queries)
        self._timeout = timeout
        self._clock = clock
        self._client: Any = client or PrometheusConnect(
            url, retry=Retry(total=0), timeout=max(1, math.ceil(timeout))
        )
        self._last: HostReading | None = None

    def _read(self, required: tuple[str, ...] = ("cpu", "memory", "cpus")) -> HostReading:
        try:
            result = self._client.custom_query(self.query, timeout=self._timeout)
        except (requests.RequestException, PrometheusApiClientException, ValueError) as exc:
            raise CollectorError(f"prometheus {self.url}: query failed: {exc}") from exc
        reading = parse_result(result)
        missing = [name for name in required if name not in reading.values]
        if missing:
            raise CollectorError(
                f"prometheus {self.url}: no node-exporter series for {', '.join(missing)} with "
                f"{{{self.matchers}}} (target down, stale or not scraped yet?)"
            )
        self._last = reading
        return reading

    def present(self) -> bool:
        """Whether Prometheus has this node's CPUs and memory. Never raises.

        Rates need two scrapes, so a node scraped once is present before its first sample.
        """
        try:
            self._read(required=("cpus", "memory_total_bytes"))
        except CollectorError as exc:
            log.warning("host substrate from Prometheus not available: %s", exc)
            return False
        return True

    def _latest(self) -> HostReading | None:
        if self._last is None:
            try:
                return self._read(required=("cpus", "memory_total_bytes"))
            except CollectorError as exc:
                log.warning("%s", exc)
                return None
        return self._last

    def geometry(self) -> Geometry | None:
        reading = self._latest()
        if reading is None:
            return None
        cpus = int(reading.values["cpus"])
        return Geometry(units=cpus, detail={"cpus": cpus})

    def capacity(self) -> dict[str, str]:
        reading = self._latest()
        if reading is None:
            return {}
        capacity = {"cpu": str(int(reading.values["cpus"]))}
        if "memory_total_bytes" in reading.values:
            capacity["memory"] = _quantity_bytes(reading.values["memory_total_bytes"])
        return capacity

    def sample(self) -> Sample:
        reading = self._read()
        values = reading.values
        cpus = values["cpus"]
        if cpus < 1:
            raise CollectorError(f"prometheus {self.url}: {cpus} CPUs reported")
        cpu = _unit(values["cpu"])
        memory = _unit(values["memory"])
        signals = {"cpu": cpu, "memory": memory}
        raw = {"cpu": values["cpu"], "memory": values["memory"], "cpus": cpus}
        if "memory_total_bytes" in values:
            raw["memory_total_bytes"] = values["memory_total_bytes"]
        if "load1" in values:
            raw["loadavg1"] = values["load1"]
            signals["load1"] = _unit(values["load1"] / cpus)
        pressure = self._pressure(values)
        for resource, psi in (pressure or {}).items():
            if psi.some_avg10 is not None:
                signals[f"psi_{resource}"] = _unit(psi.some_avg10 / 100.0)
        return Sample(
            substrate=self.substrate,
            time=self._clock(),
            load=max(cpu, memory),
            signals=signals,
            raw=raw,
            pressure=pressure,
        )

    @staticmethod
    def _pressure(values: dict[str, float]) -> dict[str, PressureReading] | None:
        pressure: dict[str, PressureReading] = {}
        for resource in _PSI:
            fields = {
                key.rsplit(":", 1)[1]: max(0.0, min(100.0, value))
                for key, value in values.items()
                if key.startswith(f"psi:{resource}:")
            }
            if fields:
                pressure[resource] = PressureReading(**fields)
        return pressure or None

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if callable(close):
            close()
