"""StorageCollector, NetworkCollector and ThermalCollector on fixture /proc and /sys trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.network import NetworkCollector
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.procfs import PrimingError
from capacity_agent.collectors.storage import StorageCollector, is_physical_disk_name
from capacity_agent.collectors.thermal import ThermalCollector
from capacity_api.models import Substrate

pytestmark = pytest.mark.unit

MIB = 2**20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def paths(tmp_path: Path) -> HostPaths:
    return HostPaths(proc=tmp_path / "proc", sys=tmp_path / "sys")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def primed(collector: Collector) -> None:
    with pytest.raises(PrimingError):
        collector.sample()


# ---------------------------------------------------------------------------------------------
# Storage


def disk_line(
    major: int,
    minor: int,
    name: str,
    *,
    reads: int = 0,
    rsect: int = 0,
    rms: int = 0,
    writes: int = 0,
    wsect: int = 0,
    wms: int = 0,
    io_ms: int = 0,
) -> str:
    """A 20-column /proc/diskstats line (Linux 5.5+), other columns realistic but fixed."""
    return (
        f"{major:4d} {minor:7d} {name} {reads} 13442 {rsect} {rms} {writes} 117988 {wsect} {wms} "
        f"0 {io_ms} 163168 0 0 0 0 389 19"
    )


class Disks:
    """/proc/diskstats with vda (the measured disk) and devices the collector must skip."""

    def __init__(self, paths: HostPaths, *, sysfs: bool = True) -> None:
        self.paths = paths
        self.generation = 0
        self.vda = {"reads": 156614, "rsect": 8505066, "rms": 131018, "writes": 20149,
                    "wsect": 13816936, "wms": 30726, "io_ms": 16884}  # fmt: skip
        if sysfs:
            for name in ("vda", "nvme0n1"):
                (paths.sys_path("block", name, "device")).mkdir(parents=True)
            for name in ("loop0", "zram0", "dm-0"):
                (paths.sys_path("block", name)).mkdir(parents=True)
        self.write()

    def write(self) -> None:
        # every device the collector must skip gets busier by 10**6 ms on each write
        self.generation += 1
        n = 10**6 * self.generation
        busy_everywhere = {"reads": n, "writes": n, "io_ms": n}
        lines = [
            disk_line(7, 0, "loop0", **busy_everywhere),
            disk_line(254, 0, "vda", **self.vda),
            disk_line(254, 1, "vda1", **busy_everywhere),
            disk_line(253, 0, "zram0", **busy_everywhere),
            disk_line(252, 0, "dm-0", **busy_everywhere),
            disk_line(259, 0, "nvme0n1"),
            disk_line(259, 1, "nvme0n1p1", **busy_everywhere),
        ]
        write(self.paths.proc_path("diskstats"), "\n".join(lines) + "\n")

    def advance(self, **deltas: int) -> None:
        for key, delta in deltas.items():
            self.vda[key] += delta
        self.write()


def storage_second(
    disks: Disks, collector: StorageCollector, clock: Clock, **deltas: int
) -> Sample:
    clock.now += 1.0
    disks.advance(**deltas)
    return collector.sample()


def test_storage_known_rates_from_two_reads(paths: HostPaths, clock: Clock) -> None:
    disks = Disks(paths)
    collector = StorageCollector(paths, clock=clock, nominal_iops=1000, nominal_throughput=10 * MIB)
    assert collector.present()
    primed(collector)
    # 100 reads of 2048 sectors (1 MiB), 300 writes of 4 MiB, 400 ms waiting, 500 ms busy
    sample = storage_second(
        disks, collector, clock, reads=100, rsect=2048, rms=100, writes=300, wsect=8192,
        wms=300, io_ms=500,
    )  # fmt: skip
    assert sample.substrate is Substrate.STORAGE
    assert sample.raw["devices"] == 2  # vda and nvme0n1; loop, zram, dm and partitions skipped
    assert sample.signals["busy"] == pytest.approx(0.5)
    assert sample.load == pytest.approx(0.5)
    assert sample.signals["iops"] == pytest.approx(0.4)
    assert sample.signals["throughput"] == pytest.approx(0.5)
    assert sample.raw["vda.read_bytes_per_s"] == MIB
    assert sample.raw["vda.write_bytes_per_s"] == 4 * MIB
    assert sample.raw["vda.await_ms"] == pytest.approx(1.0)
    assert sample.raw["nvme0n1.busy"] == 0.0
    assert collector.capacity() == {"storage-iops": "1000"}
    assert collector.geometry() is None


def test_storage_name_filter_without_sysfs(paths: HostPaths, clock: Clock) -> None:
    disks = Disks(paths, sysfs=False)
    collector = StorageCollector(paths, clock=clock)
    primed(collector)
    sample = storage_second(disks, collector, clock, io_ms=100)
    assert sample.raw["devices"] == 2
    assert sample.signals["busy"] == pytest.approx(0.1)  # the busy partitions were skipped
    for name, physical in [
        ("sda", True), ("nvme0n1", True), ("mmcblk0", True), ("xvda", True), ("vda", True),
        ("sda1", False), ("nvme0n1p2", False), ("mmcblk0p1", False), ("xvda1", False),
        ("loop3", False), ("ram0", False), ("zram0", False), ("dm-1", False), ("md127", False),
        ("sr0", False),
    ]:  # fmt: skip
        assert is_physical_disk_name(name) is physical, name


def test_storage_explicit_device_list(paths: HostPaths, clock: Clock) -> None:
    disks = Disks(paths)
    collector = StorageCollector(paths, clock=clock, devices=["vda"])
    primed(collector)
    sample = storage_second(disks, collector, clock, io_ms=250)
    assert sample.raw["devices"] == 1
    assert sample.signals["busy"] == pytest.approx(0.25)


def test_storage_32_bit_io_ticks_wrap(paths: HostPaths, clock: Clock) -> None:
    disks = Disks(paths)
    disks.vda["io_ms"] = 2**32 - 300
    disks.write()
    collector = StorageCollector(paths, clock=clock)
    primed(collector)
    clock.now += 1.0
    disks.vda["io_ms"] = 300  # wrapped: 600 ms busy
    disks.write()
    assert collector.sample().signals["busy"] == pytest.approx(0.6)


def test_storage_64_bit_sector_wrap(paths: HostPaths, clock: Clock) -> None:
    disks = Disks(paths)
    disks.vda["wsect"] = 2**64 - 1024
    disks.write()
    collector = StorageCollector(paths, clock=clock)
    primed(collector)
    clock.now += 1.0
    disks.vda["wsect"] = 1024
    disks.write()
    assert collector.sample().raw["vda.write_bytes_per_s"] == 2048 * 512


def test_storage_counter_reset_skips_one_sample(paths: HostPaths, clock: Clock) -> None:
    disks = Disks(paths)
    disks.vda["reads"] = 5 * 10**12
    disks.write()
    collector = StorageCollector(paths, clock=clock)
    primed(collector)
    clock.now += 1.0
    disks.vda["reads"] = 10  # device re-created: not a plausible wrap
    disks.write()
    with pytest.raises(CollectorError, match="reset"):
        collector.sample()
    sample = storage_second(disks, collector, clock, reads=50)
    assert sample.raw["vda.iops"] == pytest.approx(50)


def test_storage_clock_must_advance(paths: HostPaths, clock: Clock) -> None:
    Disks(paths)
    collector = StorageCollector(paths, clock=clock)
    primed(collector)
    with pytest.raises(CollectorError, match="clock"):
        collector.sample()


@pytest.mark.parametrize(
    "content",
    ["", " 254 0 vda 1 2 3\n", " 254 0 vda a b c d e f g h i j k\n", "\x00\xff" * 10],
)
def test_storage_garbage(paths: HostPaths, clock: Clock, content: str) -> None:
    write(paths.proc_path("diskstats"), content)
    collector = StorageCollector(paths, clock=clock)
    assert collector.present() is False
    with pytest.raises(CollectorError):
        collector.sample()


def test_storage_only_virtual_devices_is_absent(paths: HostPaths, clock: Clock) -> None:
    write(paths.proc_path("diskstats"), disk_line(7, 0, "loop0") + "\n")
    collector = StorageCollector(paths, clock=clock)
    assert collector.present() is False
    with pytest.raises(CollectorError, match="no block devices"):
        collector.sample()


# ---------------------------------------------------------------------------------------------
# Network

HEADER = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs "
    "drop fifo colls carrier compressed\n"
)


class Nics:
    """/proc/net/dev and /sys/class/net: eth0 (1 Gb/s), eth1 (down), veth, ifb, lo."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.counters: dict[str, list[int]] = {
            name: [381104460, 20978, 0, 0, 1577183, 14396, 0, 0]
            for name in ("lo", "eth0", "eth1", "veth1a2b3c", "ifb0")
        }
        for name, speed, state, physical in [
            ("eth0", "1000", "up", True),
            ("eth1", "10000", "down", True),
            ("veth1a2b3c", "10000", "up", False),
            ("ifb0", None, "unknown", False),
            ("lo", None, "unknown", False),
        ]:
            base = paths.sys_path("class", "net", name)
            base.mkdir(parents=True)
            write(base / "operstate", state + "\n")
            if speed is not None:
                write(base / "speed", speed + "\n")
            if physical:
                (base / "device").mkdir()
        self.write()

    def write(self, name_prefix: str = "") -> None:
        lines = []
        for name, (rxb, rxp, rxe, rxd, txb, txp, txe, txd) in self.counters.items():
            lines.append(
                f"{name_prefix}{name:>6}: {rxb} {rxp} {rxe} {rxd} 0 0 0 0 "
                f"{txb} {txp} {txe} {txd} 0 0 0 0"
            )
        write(self.paths.proc_path("net", "dev"), HEADER + "\n".join(lines) + "\n")

    def add(self, name: str, **deltas: int) -> None:
        index = {"rxb": 0, "rxp": 1, "rxe": 2, "rxd": 3, "txb": 4, "txp": 5, "txe": 6, "txd": 7}
        for key, delta in deltas.items():
            self.counters[name][index[key]] += delta
        self.write()


def test_network_utilisation_against_link_speed(paths: HostPaths, clock: Clock) -> None:
    nics = Nics(paths)
    collector = NetworkCollector(paths, clock=clock)
    assert collector.present()
    assert collector.capacity() == {"network-bandwidth": "125000000"}  # eth0 only: 1 Gb/s
    primed(collector)
    clock.now += 2.0
    nics.add("eth0", rxb=125_000_000, rxp=90, rxd=5, txb=25_000_000, txp=4, txe=1)
    nics.add("veth1a2b3c", rxb=10**10)  # virtual: not measured
    nics.add("lo", txb=10**10)
    sample = collector.sample()
    assert sample.substrate is Substrate.NETWORK
    assert sample.raw["interfaces"] == 1
    assert sample.signals["rx"] == pytest.approx(0.5)  # 62.5 MB/s of 125 MB/s
    assert sample.signals["tx"] == pytest.approx(0.1)
    assert sample.load == pytest.approx(0.5)
    assert sample.signals["drops"] == pytest.approx(5 / 100)
    assert sample.signals["errors"] == pytest.approx(1 / 100)
    assert sample.raw["eth0.speed_known"] == 1.0
    assert sample.raw["eth0.rx_bytes_per_s"] == 62_500_000


@pytest.mark.parametrize("speed", ["-1\n", "0\n", "4294967295\n", "fast\n", None])
def test_network_unknown_speed_uses_the_default(
    paths: HostPaths, clock: Clock, speed: str | None
) -> None:
    nics = Nics(paths)
    speed_file = paths.sys_path("class", "net", "eth0", "speed")
    if speed is None:
        speed_file.unlink()
    else:
        write(speed_file, speed)
    collector = NetworkCollector(paths, clock=clock, default_speed_mbps=100)
    primed(collector)
    clock.now += 1.0
    nics.add("eth0", txb=6_250_000)
    sample = collector.sample()
    assert sample.raw["eth0.speed_known"] == 0.0
    assert sample.raw["eth0.speed_bytes_per_s"] == 12_500_000
    assert sample.signals["tx"] == pytest.approx(0.5)


def test_network_include_virtual_and_explicit_list(paths: HostPaths, clock: Clock) -> None:
    nics = Nics(paths)
    everything = NetworkCollector(paths, clock=clock, include_virtual=True)
    only_veth = NetworkCollector(paths, clock=clock, interfaces=["veth1a2b3c"])
    primed(everything)
    primed(only_veth)
    clock.now += 1.0
    nics.add("veth1a2b3c", rxb=625_000_000)  # half of 10 Gb/s
    sample = everything.sample()
    assert sample.raw["interfaces"] == 3  # eth0, veth, ifb; not lo, not eth1 (down)
    assert sample.signals["rx"] == pytest.approx(0.5)
    assert only_veth.sample().raw["interfaces"] == 1


def test_network_without_sysfs_measures_all_but_lo(paths: HostPaths, clock: Clock) -> None:
    write(paths.proc_path("net", "dev"), HEADER + "    lo: " + "0 " * 16 + "\n  eth0: " + "1 " * 16)
    collector = NetworkCollector(paths, clock=clock)
    primed(collector)
    clock.now += 1.0
    sample = collector.sample()
    assert sample.raw["interfaces"] == 1
    assert sample.raw["eth0.speed_known"] == 0.0


def test_network_host_namespace_via_pid(paths: HostPaths, clock: Clock) -> None:
    Nics(paths)
    (paths.proc_path("net", "dev")).rename(paths.proc / "devnull")
    write(paths.proc_path("1", "net", "dev"), (paths.proc / "devnull").read_text())
    assert NetworkCollector(paths, clock=clock).present() is False
    assert NetworkCollector(paths, clock=clock, netns_pid=1).present() is True


def test_network_32_bit_wrap_and_reset(paths: HostPaths, clock: Clock) -> None:
    nics = Nics(paths)
    nics.counters["eth0"][0] = 2**32 - 1_000_000
    nics.write()
    collector = NetworkCollector(paths, clock=clock)
    primed(collector)
    clock.now += 1.0
    nics.counters["eth0"][0] = 11_500_000  # wrapped: 12.5 MB
    nics.write()
    assert collector.sample().signals["rx"] == pytest.approx(0.1)
    clock.now += 1.0
    nics.counters["eth0"][0] = 0  # the driver reset its counters
    nics.counters["eth0"][4] = 0
    nics.write()
    with pytest.raises(CollectorError, match="reset"):
        collector.sample()
    clock.now += 1.0
    nics.add("eth0", rxb=1_250_000)
    assert collector.sample().signals["rx"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "content",
    ["", HEADER, HEADER + "eth0: 1 2 3\n", HEADER + "eth0: " + "x " * 16, "\x00\x01garbage"],
)
def test_network_garbage(paths: HostPaths, clock: Clock, content: str) -> None:
    write(paths.proc_path("net", "dev"), content)
    collector = NetworkCollector(paths, clock=clock)
    assert collector.present() is False
    with pytest.raises(CollectorError):
        collector.sample()


# ---------------------------------------------------------------------------------------------
# Thermal


def thermal_zone(paths: HostPaths, index: int, temp: str, trips: list[tuple[str, int]]) -> Path:
    zone = paths.sys_path("class", "thermal", f"thermal_zone{index}")
    write(zone / "type", "x86_pkg_temp\n")
    write(zone / "temp", temp)
    for n, (kind, value) in enumerate(trips):
        write(zone / f"trip_point_{n}_type", kind + "\n")
        write(zone / f"trip_point_{n}_temp", f"{value}\n")
    return zone


def test_thermal_zones_and_hwmon(paths: HostPaths, clock: Clock) -> None:
    thermal_zone(paths, 0, "45000\n", [("passive", 90000), ("critical", 100000)])
    thermal_zone(paths, 1, "99000\n", [("passive", 90000)])  # no critical: not measured
    thermal_zone(paths, 10, "20000\n", [("critical", 105000), ("critical", 80000)])
    hwmon = paths.sys_path("class", "hwmon", "hwmon2")
    write(hwmon / "name", "coretemp\n")
    write(hwmon / "temp1_input", "80000\n")
    write(hwmon / "temp1_crit", "100000\n")
    write(hwmon / "temp2_input", "95000\n")  # no crit: not measured
    write(hwmon / "temp3_input", "-5000\n")
    write(hwmon / "temp3_crit", "100000\n")
    write(hwmon / "temp4_input", "130000\n")
    write(hwmon / "temp4_crit", "125000\n")
    collector = ThermalCollector(paths, clock=clock)
    assert collector.present()
    sample = collector.sample()
    assert sample.substrate is Substrate.THERMAL
    assert sample.time == clock.now
    assert sample.signals == {
        "thermal_zone0": pytest.approx(0.45),
        "thermal_zone10": pytest.approx(0.25),  # the lowest critical trip counts
        "hwmon2_temp1": pytest.approx(0.8),
        "hwmon2_temp3": 0.0,
        "hwmon2_temp4": 1.0,
    }
    assert sample.load == 1.0
    assert sample.raw["hwmon2_temp1.temp_c"] == 80.0
    assert sample.raw["thermal_zone0.crit_c"] == 100.0


def test_thermal_absent_without_critical_points(paths: HostPaths, clock: Clock) -> None:
    collector = ThermalCollector(paths, clock=clock)
    assert collector.present() is False  # no class/thermal at all
    thermal_zone(paths, 0, "45000\n", [("passive", 90000), ("hot", 95000)])
    write(paths.sys_path("class", "hwmon", "hwmon0", "temp1_input"), "40000\n")
    assert collector.present() is False
    with pytest.raises(CollectorError, match="no sensor"):
        collector.sample()


def test_thermal_unreadable_sensor_is_skipped_and_counted(paths: HostPaths, clock: Clock) -> None:
    thermal_zone(paths, 0, "45000\n", [("critical", 100000)])
    thermal_zone(paths, 1, "garbage\n", [("critical", 100000)])
    collector = ThermalCollector(paths, clock=clock)
    sample = collector.sample()
    assert sample.signals == {"thermal_zone0": pytest.approx(0.45)}
    assert sample.raw["unreadable"] == 1.0
    assert collector.warnings["thermal_zone1"] == 1


def test_thermal_all_sensors_unreadable_is_an_error(paths: HostPaths, clock: Clock) -> None:
    zone = thermal_zone(paths, 0, "", [("critical", 100000)])
    (zone / "temp").unlink()
    (zone / "temp").mkdir()  # read fails with IsADirectoryError
    with pytest.raises(CollectorError, match="none of 1"):
        ThermalCollector(paths, clock=clock).sample()
