"""The live collectors against this machine's real /proc and /sys (no cluster needed).

Each test makes the substrate do something known (burn a core, write and fsync a file, send UDP
datagrams) and checks that the collector sees it. Tests skip, with the reason, when this machine
lacks the substrate (no physical disk under the test directory, no route out, no thermal zone).
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from capacity_agent.collectors.base import CollectorError, Sample
from capacity_agent.collectors.host import HostCollector
from capacity_agent.collectors.network import NetworkCollector
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.procfs import PrimingError, parse_net_dev, read_text
from capacity_agent.collectors.storage import StorageCollector
from capacity_agent.collectors.thermal import ThermalCollector
from capacity_api.models import Substrate

pytestmark = pytest.mark.integration

REAL = HostPaths()
BURN_SECONDS = 2.0
BURN = "import time\nend = time.perf_counter() + {s}\nwhile time.perf_counter() < end:\n    pass\n"


def prime(collector: HostCollector | StorageCollector | NetworkCollector) -> None:
    with pytest.raises(PrimingError):
        collector.sample()


def host_cpu_over(seconds: float, collector: HostCollector) -> Sample:
    prime(collector)
    time.sleep(seconds)
    return collector.sample()


@contextmanager
def favoured_cgroup() -> Iterator[Path | None]:
    """A CPU cgroup of its own for the burner, weighted 8x the default (cgroup v1 ``cpu.shares``
    or v2 ``cpu.weight``), so the burner gets its core even while other work runs on this
    shared box and one measurement suffices. None where this process may not create one (not
    root, no CPU controller): the burner then runs where the test runs."""
    for root, knob, value in (
        (Path("/sys/fs/cgroup/cpu"), "cpu.shares", "8192"),
        (Path("/sys/fs/cgroup"), "cpu.weight", "800"),
    ):
        group = root / f"capacity-test-burn-{os.getpid()}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / knob).write_text(value)
        except OSError:  # no such controller here
            group.rmdir()
            continue
        try:
            yield group
        finally:
            group.rmdir()  # the burner has exited: the group is empty
        return
    yield None


def burn_one_core(ncpu: int) -> tuple[float, float]:
    """(host cpu signal over a 2 s single-core burn, the burner's own share of all CPU time)."""
    collector = HostCollector(REAL)
    with favoured_cgroup() as group:

        def join_group() -> None:  # in the child, before exec: "0" moves the writer itself
            if group is not None:
                (group / "cgroup.procs").write_text("0")

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        prime(collector)
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", BURN.format(s=BURN_SECONDS)],
            check=True, timeout=30, preexec_fn=join_group,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        busy = collector.sample()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    burned = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert busy.load >= busy.signals["cpu"]
    return busy.signals["cpu"], burned / (elapsed * ncpu)


def test_host_cpu_rises_while_a_core_burns() -> None:
    """One measurement: the host signal over a single-core burn accounts for at least what the
    burner itself used (its rusage), and the burner, in a favoured cgroup, got most of a core.
    Other load on the box can only raise the host signal, never lower it below the burner."""
    collector = HostCollector(REAL)
    assert collector.present()
    ncpu = collector.geometry().units
    assert ncpu == os.cpu_count()
    busy, burner_share = burn_one_core(ncpu)
    assert burner_share > 0.5 / ncpu, f"the burner only got {burner_share:.2f} of the CPUs"
    # the host signal accounts for at least the burner (10 % slack for tick granularity)
    assert busy >= 0.9 * burner_share, (busy, burner_share)


def test_host_memory_psi_and_cgroup_are_consistent_with_this_machine() -> None:
    collector = HostCollector(REAL)
    sample = host_cpu_over(0.2, collector)
    assert sample.substrate is Substrate.HOST
    assert 0.0 < sample.signals["memory"] < 1.0
    capacity = collector.capacity()
    mem_total = int(sample.raw["memory_total_bytes"])
    assert 0 < int(capacity["memory"]) <= mem_total
    assert mem_total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    has_psi = Path("/proc/pressure/cpu").exists()
    for name in ("psi_cpu", "psi_memory", "psi_io"):
        assert (name in sample.signals) is has_psi
    if has_psi:
        assert sample.pressure is not None
        assert set(sample.pressure) == {"cpu", "memory", "io"}

    cgroup_fs = Path("/sys/fs/cgroup")
    if (cgroup_fs / "cgroup.controllers").exists():
        expected: int | None = 2
    elif (cgroup_fs / "memory").is_dir() or (cgroup_fs / "cpu").is_dir():
        expected = 1
    else:
        expected = None
    assert (sample.cgroup.version if sample.cgroup else None) == expected
    assert not collector.warnings


def _device_of(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev)


def test_storage_sees_an_fsynced_write(tmp_path: Path) -> None:
    collector = StorageCollector(REAL)
    if not collector.present():
        pytest.skip("no physical block device in /proc/diskstats (only loop/ram/zram/virtual)")
    major, minor = _device_of(tmp_path)
    device = None
    for line in read_text(REAL.proc_path("diskstats")).splitlines():
        parts = line.split()
        if parts and (int(parts[0]), int(parts[1])) == (major, minor):
            device = parts[2]
    selected = collector.measured_devices()
    if device is None or device not in selected:
        pytest.skip(
            f"{tmp_path} is on device {major}:{minor} ({device or 'not in diskstats'}), "
            f"not one of the measured disks {sorted(selected)}"
        )

    size = 32 * 2**20
    block = os.urandom(2**20)
    prime(collector)
    target = tmp_path / "fsync.bin"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    time.sleep(0.2)
    sample = collector.sample()
    written = sample.raw[f"{device}.write_bytes_per_s"] * sample.raw["elapsed_s"]
    assert written >= 0.9 * size, f"{device} wrote {written:.0f} bytes, expected >= {size}"
    assert sample.raw[f"{device}.iops"] > 0
    assert sample.raw[f"{device}.busy"] > 0
    assert 0.0 < sample.signals["busy"] <= 1.0
    assert sample.load == sample.signals["busy"]


def test_network_counts_sent_datagrams() -> None:
    collector = NetworkCollector(REAL)
    if not collector.present():
        pytest.skip("no physical network interface that is up")
    interfaces = collector.measured_interfaces()
    payload, count = b"\0" * 1000, 1000
    prime(collector)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            for _ in range(count):  # TEST-NET-2 discard port: leaves by the default route
                sock.sendto(payload, ("198.51.100.1", 9))
        except OSError as exc:
            pytest.skip(f"cannot send UDP out of this machine: {exc}")
    time.sleep(0.2)
    sample = collector.sample()
    sent = sum(
        sample.raw[f"{name}.tx_bytes_per_s"] * sample.raw["elapsed_s"] for name in interfaces
    )
    if sent == 0:
        pytest.skip(f"the datagrams did not leave through any of {sorted(interfaces)}")
    assert sent >= count * len(payload)  # plus UDP/IP/Ethernet headers
    assert sample.signals["tx"] > 0
    assert sample.load >= sample.signals["tx"]
    for name in interfaces:
        # this machine's virtio NIC reports speed -1: the default is used and marked
        speed = Path(f"/sys/class/net/{name}/speed")
        try:
            known = int(speed.read_text()) > 0
        except (OSError, ValueError):
            known = False
        assert sample.raw[f"{name}.speed_known"] == (1.0 if known else 0.0)


def test_network_counters_match_psutil() -> None:
    first = parse_net_dev(read_text(REAL.proc_path("net", "dev")))
    theirs = psutil.net_io_counters(pernic=True)
    second = parse_net_dev(read_text(REAL.proc_path("net", "dev")))
    for name, counters in theirs.items():
        if name in first:
            assert first[name].rx_bytes <= counters.bytes_recv <= second[name].rx_bytes
            assert first[name].tx_bytes <= counters.bytes_sent <= second[name].tx_bytes


def test_thermal_matches_sysfs() -> None:
    collector = ThermalCollector(REAL)
    zones = list(Path("/sys/class/thermal").glob("thermal_zone*"))
    hwmons = list(Path("/sys/class/hwmon").glob("hwmon*/temp*_crit"))
    if not collector.present():
        # nothing to compare against: the substrate is absent, and sampling says so
        criticals = [
            p
            for zone in zones
            for p in zone.glob("trip_point_*_type")
            if p.read_text().strip() == "critical"
        ]
        assert not criticals
        assert not hwmons
        with pytest.raises(CollectorError, match="no sensor"):
            collector.sample()
        return
    sample = collector.sample()
    assert sample.signals
    for name, value in sample.signals.items():
        temp_c = sample.raw[f"{name}.temp_c"]
        assert -50.0 < temp_c < 150.0
        assert 0.0 <= value <= 1.0
