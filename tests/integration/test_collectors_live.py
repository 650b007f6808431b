"""The live collectors against this machine's real /proc and /sys (no cluster needed).

Each test makes the substrate do something known (burn a core, write and fsync 32 MiB to a loop
device of its own, send UDP datagrams over a veth pair into a network namespace of its own) and
checks that the collector sees it. The devices are the tests' own, so the tests run and assert on
any machine where they may be created (root, as CI runs): they no longer depend on a physical
disk under the test directory or a route off the machine.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import uuid
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
from tests.cluster import wait_for

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


def root_or_skip(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (CI runs as root, so there it runs)")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device of this test's own over a 64 MiB file: a block device that only the test
    writes to, whatever disks this machine has. Its name (``loop3``); detached afterwards."""
    root_or_skip("a loop device")
    backing = tmp_path / "disk.img"
    with backing.open("wb") as f:
        f.truncate(64 * 2**20)
    out = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    # util-linux prints ``/dev/loopN``; one CI run got a bare ``loopN`` for a device the kernel
    # had just created, and ``losetup --detach loopN`` fails: the node's path is what is used
    name = Path(out.stdout.strip()).name
    device = Path("/dev") / name
    try:
        wait_for(f"{device} to appear", device.exists, timeout=10)
        yield name
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True, timeout=30)


def test_storage_sees_writes_to_a_block_device(loop_device: str) -> None:
    """32 MiB written and fsynced to the device: the collector counts at least those bytes, some
    operations and a busy device."""
    collector = StorageCollector(REAL, devices=[loop_device])
    assert collector.measured_devices() == [loop_device]
    size = 32 * 2**20
    block = os.urandom(2**20)
    prime(collector)
    fd = os.open(f"/dev/{loop_device}", os.O_WRONLY)
    try:
        for _ in range(size // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    sample = collector.sample()
    # bytes = rate x elapsed: rounded, as the float product can land a hair under the count
    written = round(sample.raw[f"{loop_device}.write_bytes_per_s"] * sample.raw["elapsed_s"])
    assert written >= size, f"{loop_device} wrote {written} bytes, expected >= {size}"
    assert sample.raw[f"{loop_device}.iops"] > 0
    assert sample.raw[f"{loop_device}.busy"] > 0
    assert 0.0 < sample.signals["busy"] <= 1.0
    assert sample.load == sample.signals["busy"]


def test_storage_leaves_out_virtual_devices_by_default(loop_device: str) -> None:
    """Without a device list, a loop device is not measured: its I/O lands on a physical disk,
    which would count it twice."""
    assert loop_device not in StorageCollector(REAL).measured_devices()


LINK = ("169.254.231.1", "169.254.231.2")
"""Link-local addresses of the veth pair (never routed off the link)."""


@pytest.fixture
def veth_pair() -> Iterator[str]:
    """A veth pair between this network namespace and one the test creates, each end with a
    link-local address: traffic sent to the far end stays on this machine. The near end's name;
    the namespace (and with it the pair) is deleted afterwards."""
    root_or_skip("a network namespace")
    tag = uuid.uuid4().hex[:6]
    netns, near, far = f"capt-{tag}", f"capt{tag}a", f"capt{tag}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)

    ip("netns", "add", netns)
    try:
        ip("link", "add", near, "type", "veth", "peer", "name", far, "netns", netns)
        ip("addr", "add", f"{LINK[0]}/30", "dev", near)
        ip("link", "set", near, "up")
        ip("-n", netns, "addr", "add", f"{LINK[1]}/30", "dev", far)
        ip("-n", netns, "link", "set", far, "up")
        yield near
    finally:
        ip("netns", "delete", netns)  # deletes the far end, and the near end with it
        subprocess.run(["ip", "link", "delete", near], timeout=30, capture_output=True, check=False)


def test_network_counts_datagrams_sent_over_a_link(veth_pair: str) -> None:
    """1000 datagrams of 1000 bytes to the far end of the pair: the near end's transmit counter
    holds at least their payload, and the tx signal rises."""
    collector = NetworkCollector(REAL, interfaces=[veth_pair])
    assert collector.measured_interfaces() == [veth_pair]
    payload, count = b"\0" * 1000, 1000
    prime(collector)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LINK[0], 0))
        for _ in range(count):
            sock.sendto(payload, (LINK[1], 9))
    sample = collector.sample()
    sent = round(sample.raw[f"{veth_pair}.tx_bytes_per_s"] * sample.raw["elapsed_s"])
    assert sent >= count * len(payload)  # plus UDP/IP/Ethernet headers
    assert sample.signals["tx"] > 0
    assert sample.load >= sample.signals["tx"]
    # the link speed as sysfs gives it (a veth that is up says 10000 Mb/s; unknown: the default)
    try:
        mbps = int(Path(f"/sys/class/net/{veth_pair}/speed").read_text())
    except (OSError, ValueError):
        mbps = -1
    assert sample.raw[f"{veth_pair}.speed_known"] == (1.0 if mbps > 0 else 0.0)
    if mbps > 0:
        assert sample.raw[f"{veth_pair}.speed_bytes_per_s"] == mbps * 1e6 / 8


def test_network_leaves_out_virtual_interfaces_by_default(veth_pair: str) -> None:
    """Without an interface list only physical NICs are measured: a veth's traffic is also
    counted where it leaves the machine."""
    assert veth_pair not in NetworkCollector(REAL).measured_interfaces()


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
