"""PrometheusHostCollector against a real Prometheus scraping a real node-exporter on this machine.

The collector's readings are compared with the live readings of the same machine over the same
window (CPU from psutil, memory with the /proc host collector's own parser): both come from
/proc/stat and /proc/meminfo, one through node-exporter and Prometheus' ``rate``, the other
directly. Tolerances (absolute, in [0, 1] units):

- memory (working set, ``(MemTotal - MemFree - Inactive(file)) / MemTotal``, the live host
  collector's formula, read from /proc/meminfo with its own parser): 0.05, compared at the same
  moment (one scrape apart);
- cpu over the same 30 s: 0.10 (the windows differ by up to one 1 s scrape at each end, and
  ``rate`` extrapolates to the window's edges);
- a core burnt for ~15 s must raise the 10 s cpu reading by at least half of what it can add,
  ``min(1 / CPUs, idle share before the burn)``; with less than half a core idle the test is
  skipped, saying so (the burn has no room to show).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from capacity_agent.collectors.base import CollectorError
from capacity_agent.collectors.procfs import host_working_set, parse_meminfo
from capacity_agent.collectors.prometheus import (
    SIGNAL_LABEL,
    PrometheusHostCollector,
    parse_result,
)
from capacity_api.models import Substrate
from tests.services import PrometheusStack, free_port, prometheus_fixture  # noqa: F401

pytestmark = pytest.mark.services

MEMORY_TOLERANCE = 0.05
CPU_TOLERANCE = 0.10
BURN_SECONDS = 15.0


def memory_host() -> float:
    """The live host collector's memory signal, straight from /proc/meminfo."""
    total, working_set = host_working_set(parse_meminfo(Path("/proc/meminfo").read_text()))
    return working_set / total


def wait_for_history(stack: PrometheusStack, seconds: float) -> None:
    """Sleep until Prometheus holds at least ``seconds`` of scrapes (bounded by ``seconds``)."""
    remaining = stack.started + seconds - time.time()
    if remaining > 0:
        time.sleep(remaining)


@pytest.fixture
def collector(prometheus: PrometheusStack) -> Iterator[PrometheusHostCollector]:
    collector = PrometheusHostCollector(prometheus.url, prometheus.instance, job=prometheus.job)
    yield collector
    collector.close()


def test_present_geometry_and_capacity_match_the_machine(
    collector: PrometheusHostCollector,
) -> None:
    assert collector.substrate is Substrate.HOST
    assert collector.present()

    cpus = psutil.cpu_count()
    geometry = collector.geometry()
    assert geometry is not None
    assert geometry.units == cpus
    total = psutil.virtual_memory().total
    assert collector.capacity() == {"cpu": str(cpus), "memory": str(total)}


def test_cpu_and_memory_agree_with_psutil_over_the_same_window(
    prometheus: PrometheusStack,
    collector: PrometheusHostCollector,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wait_for_history(prometheus, 5)
    short = PrometheusHostCollector(
        prometheus.url, prometheus.instance, job=prometheus.job, rate_window="10s"
    )
    memory_pairs: list[tuple[float, float]] = []
    cpu10_pairs: list[tuple[float, float]] = []
    window_start = time.monotonic()
    first = start = psutil.cpu_times()
    for _ in range(3):
        time.sleep(10)
        end = psutil.cpu_times()
        cpu10_pairs.append((short.sample().signals["cpu"], _busy_fraction(start, end)))
        memory_pairs.append((collector.sample().signals["memory"], memory_host()))
        start = end
    sample_30 = collector.sample()
    cpu_psutil_30 = _busy_fraction(first, start)
    elapsed = time.monotonic() - window_start
    short.close()

    memory_diff = max(abs(a - b) for a, b in memory_pairs)
    cpu10_diff = max(abs(a - b) for a, b in cpu10_pairs)
    cpu30_diff = abs(sample_30.signals["cpu"] - cpu_psutil_30)
    with capsys.disabled():
        print(
            f"\n[prometheus vs psutil over {elapsed:.1f}s] "
            f"cpu30 prom={sample_30.signals['cpu']:.4f} psutil={cpu_psutil_30:.4f} "
            f"diff={cpu30_diff:.4f}; "
            f"cpu10 pairs={[(round(a, 4), round(b, 4)) for a, b in cpu10_pairs]} "
            f"max diff={cpu10_diff:.4f}; "
            f"memory pairs={[(round(a, 4), round(b, 4)) for a, b in memory_pairs]} "
            f"max diff={memory_diff:.4f}"
        )
    assert memory_diff <= MEMORY_TOLERANCE
    assert cpu30_diff <= CPU_TOLERANCE
    assert cpu10_diff <= CPU_TOLERANCE
    assert 0.0 <= sample_30.signals["load1"] <= 1.0
    assert sample_30.load == max(sample_30.signals["cpu"], sample_30.signals["memory"])
    if Path("/proc/pressure/cpu").exists():
        assert sample_30.pressure is not None
        assert set(sample_30.pressure) == {"cpu", "memory", "io"}
        assert sample_30.pressure["memory"].full_avg60 is not None
        assert {"psi_cpu", "psi_memory", "psi_io"} <= set(sample_30.signals)


def _busy_fraction(start: Any, end: Any) -> float:
    """Busy CPU share between two ``psutil.cpu_times()`` readings, counted as psutil does.

    Total time leaves out guest time (already inside user time), idle includes I/O wait.
    """

    def total(times: Any) -> float:
        values = times._asdict()
        return float(
            sum(values.values()) - values.get("guest", 0.0) - values.get("guest_nice", 0.0)
        )

    def idle(times: Any) -> float:
        return float(times.idle) + float(getattr(times, "iowait", 0.0))

    elapsed = total(end) - total(start)
    if elapsed <= 0:
        return 0.0
    return max(0.0, min(1.0, 1.0 - (idle(end) - idle(start)) / elapsed))


def test_cpu_reading_rises_while_a_core_burns(
    prometheus: PrometheusStack, capsys: pytest.CaptureFixture[str]
) -> None:
    cpus = psutil.cpu_count() or 1
    collector = PrometheusHostCollector(
        prometheus.url, prometheus.instance, job=prometheus.job, rate_window="10s"
    )
    try:
        wait_for_history(prometheus, 12)
        start = psutil.cpu_times()
        time.sleep(10)
        before_psutil = _busy_fraction(start, psutil.cpu_times())
        before = collector.sample().signals["cpu"]
        idle = 1.0 - before_psutil
        if idle < 0.5 / cpus:  # a busy machine has no room for the burn to show
            pytest.skip(f"no idle core to burn: the machine is {before_psutil:.0%} busy already")
        expected_rise = 0.5 * min(1.0 / cpus, idle)

        burner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import time\nend = time.monotonic() + {BURN_SECONDS + 10}\n"
                "while time.monotonic() < end:\n    pass\n",
            ]
        )
        try:
            time.sleep(BURN_SECONDS - 10)  # let the 10 s rate window fill with the burn
            start = psutil.cpu_times()
            time.sleep(10)
            during_psutil = _busy_fraction(start, psutil.cpu_times())
            during = collector.sample().signals["cpu"]
        finally:
            burner.kill()
            burner.wait(timeout=10)
    finally:
        collector.close()

    with capsys.disabled():
        print(
            f"\n[burn one of {cpus} CPUs] prom before={before:.4f} during={during:.4f} "
            f"rise={during - before:.4f}; psutil before={before_psutil:.4f} "
            f"during={during_psutil:.4f}"
        )
    assert during - before >= expected_rise
    assert abs(during - during_psutil) <= CPU_TOLERANCE


def test_query_failures_are_collector_errors(prometheus: PrometheusStack) -> None:
    unknown = PrometheusHostCollector(prometheus.url, "203.0.113.1:9100")
    with pytest.raises(CollectorError, match="no node-exporter series"):
        unknown.sample()
    assert not unknown.present()
    assert unknown.geometry() is None
    assert unknown.capacity() == {}

    down = PrometheusHostCollector(f"http://127.0.0.1:{free_port()}", "x:9100", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(CollectorError, match="query failed"):
        down.sample()
    assert time.monotonic() - started < 5  # no retries inside a sample

    broken = PrometheusHostCollector(prometheus.url, prometheus.instance, rate_window="banana")
    with pytest.raises(CollectorError, match="query failed"):
        broken.sample()
    for collector in (unknown, down, broken):
        collector.close()


def test_a_selector_matching_several_instances_is_refused() -> None:
    item = {"metric": {SIGNAL_LABEL: "cpu", "instance": "a:9100"}, "value": [0, "0.5"]}
    other = {"metric": {SIGNAL_LABEL: "cpu", "instance": "b:9100"}, "value": [0, "0.7"]}

    assert parse_result([item]).values == {"cpu": 0.5}
    with pytest.raises(CollectorError, match="matches 2 instances"):
        parse_result([item, other])
    with pytest.raises(CollectorError, match="unexpected result item"):
        parse_result([{"metric": {}, "value": [0, "1"]}])
