"""HostCollector on fixture /proc and /sys trees under tmp_path (cgroup v1, v2, none)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from capacity_agent.collectors.base import CollectorError, Sample
from capacity_agent.collectors.host import HostCollector, format_cores, resolve_cgroup
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.procfs import PrimingError
from capacity_api.models import Substrate

pytestmark = pytest.mark.unit

MIB = 2**20
GIB = 2**30
UNLIMITED_V1 = "9223372036854771712"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_stat(busy: int, idle: int, ncpu: int = 2) -> str:
    """A /proc/stat whose aggregate line has the given busy and idle (+iowait) ticks."""
    user, system, iowait = busy - busy // 4, busy // 4, idle // 10
    lines = [f"cpu  {user} 0 {system} {idle - iowait} {iowait} 0 0 0 0 0"]
    lines += [
        f"cpu{i} {user // ncpu} 0 {system // ncpu} {idle // ncpu} 0 0 0 0 0 0" for i in range(ncpu)
    ]
    lines += ["intr 6019871 0 9 0", "ctxt 10458727", "btime 1795318640", "procs_running 3"]
    return "\n".join(lines) + "\n"


def meminfo(
    total_kib: int = 16 * 1024 * 1024,
    free_kib: int = 12 * 1024 * 1024,
    inactive_file_kib: int = 1024 * 1024,
) -> str:
    return (
        f"MemTotal:       {total_kib} kB\n"
        f"MemFree:        {free_kib} kB\n"
        f"MemAvailable:   {free_kib + inactive_file_kib} kB\n"
        "Buffers:           23656 kB\n"
        "Cached:          3860448 kB\n"
        "Active(file):    1597732 kB\n"
        f"Inactive(file):  {inactive_file_kib} kB\n"
        "SwapTotal:             0 kB\n"
        "HugePages_Total:       0\n"
    )


def psi(some10: float, full10: float | None = 0.0) -> str:
    text = f"some avg10={some10:.2f} avg60={some10 / 2:.2f} avg300=0.00 total=12345\n"
    if full10 is not None:
        text += f"full avg10={full10:.2f} avg60=0.00 avg300=0.00 total=0\n"
    return text


class Host:
    """A fixture host: /proc and /sys under tmp_path, and a clock the test moves."""

    def __init__(self, root: Path) -> None:
        self.paths = HostPaths(proc=root / "proc", sys=root / "sys")
        self.now = 1_800_000_000.0
        self.set_stat(busy=1000, idle=1000)
        write(self.proc / "meminfo", meminfo())
        write(self.proc / "loadavg", "0.50 0.40 0.30 3/105 18428\n")
        for resource, some in (("cpu", 12.5), ("memory", 1.0), ("io", 3.0)):
            write(self.proc / "pressure" / resource, psi(some))

    @property
    def proc(self) -> Path:
        return self.paths.proc

    @property
    def cgroup(self) -> Path:
        return self.paths.cgroup_root

    def clock(self) -> float:
        return self.now

    def set_stat(self, busy: int, idle: int, ncpu: int = 2) -> None:
        write(self.proc / "stat", proc_stat(busy, idle, ncpu))

    def collector(self, **kwargs: str) -> HostCollector:
        return HostCollector(self.paths, clock=self.clock, **kwargs)

    # cgroup v2 ----------------------------------------------------------------------------

    def cgroup_v2(self, path: str = "/kubepods.slice/pod1.slice/ctr.scope") -> Path:
        write(self.proc / "self" / "cgroup", f"0::{path}\n")
        write(self.cgroup / "cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma\n")
        write(self.cgroup / "cpu.stat", "usage_usec 763852608\nuser_usec 1\nsystem_usec 1\n")
        write(self.cgroup / "memory.stat", "anon 1\nfile 2\ninactive_file 3\n")
        leaf = self.cgroup.joinpath(*path.strip("/").split("/"))
        current = self.cgroup
        for part in path.strip("/").split("/"):
            current = current / part
            write(current / "memory.max", "max\n")
            write(current / "memory.current", f"{300 * MIB}\n")
            write(current / "memory.stat", f"anon {200 * MIB}\ninactive_file {100 * MIB}\n")
            write(current / "cpu.max", "max 100000\n")
            write(current / "cpu.stat", cpu_stat_v2(usage_usec=0, periods=0, throttled=0))
        return leaf

    # cgroup v1 ----------------------------------------------------------------------------

    def cgroup_v1(self, path: str = "/kubepods/burstable/pod1/ctr") -> dict[str, Path]:
        write(
            self.proc / "self" / "cgroup",
            f"12:memory:{path}\n11:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n",
        )
        # hybrid layout: v2 mounted at unified/ without controllers, as on this test machine
        write(self.cgroup / "unified" / "cgroup.controllers", "\n")
        dirs: dict[str, Path] = {}
        for controller in ("memory", "cpu,cpuacct"):
            current = self.cgroup / controller
            for part in ["", *path.strip("/").split("/")]:
                current = current / part if part else current
                if controller == "memory":
                    write(current / "memory.limit_in_bytes", UNLIMITED_V1 + "\n")
                    write(current / "memory.usage_in_bytes", f"{300 * MIB}\n")
                    write(current / "memory.stat", f"cache 1\ntotal_inactive_file {100 * MIB}\n")
                else:
                    write(current / "cpu.cfs_quota_us", "-1\n")
                    write(current / "cpu.cfs_period_us", "100000\n")
                    write(current / "cpu.stat", cpu_stat_v1(periods=0, throttled=0))
                    write(current / "cpuacct.usage", "0\n")
            dirs[controller] = current
        return dirs


def cpu_stat_v2(usage_usec: int, periods: int, throttled: int) -> str:
    return (
        f"usage_usec {usage_usec}\nuser_usec {usage_usec // 2}\nsystem_usec {usage_usec // 2}\n"
        f"nr_periods {periods}\nnr_throttled {throttled}\nthrottled_usec {throttled * 1000}\n"
    )


def cpu_stat_v1(periods: int, throttled: int) -> str:
    return (
        f"nr_periods {periods}\nnr_throttled {throttled}\nthrottled_time {throttled * 1000}\n"
        "nr_bursts 0\nburst_time 0\n"
    )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def primed(collector: HostCollector) -> HostCollector:
    with pytest.raises(PrimingError):
        collector.sample()
    return collector


def second(
    host: Host,
    collector: HostCollector,
    *,
    busy: int,
    idle: int,
    dt: float = 1.0,
    before: Callable[[], None] | None = None,
) -> Sample:
    """Advance the clock and /proc/stat, then take the next sample."""
    host.now += dt
    host.set_stat(busy=busy, idle=idle)
    if before is not None:
        before()
    return collector.sample()


# ---------------------------------------------------------------------------------------------
# Deltas and signals


def test_first_sample_primes_then_a_known_utilisation(host: Host) -> None:
    collector = host.collector()
    with pytest.raises(PrimingError, match="baseline"):
        collector.sample()
    sample = second(host, collector, busy=1150, idle=1050)  # 150 busy of 200 ticks
    assert sample.substrate is Substrate.HOST
    assert sample.time == host.now
    assert sample.signals["cpu"] == pytest.approx(0.75)
    # working set = MemTotal - MemFree - Inactive(file) = 16 - 12 - 1 GiB
    assert sample.signals["memory"] == pytest.approx(3 / 16)
    assert sample.load == pytest.approx(0.75)
    assert sample.signals["psi_cpu"] == pytest.approx(0.125)
    assert sample.signals["psi_memory"] == pytest.approx(0.01)
    assert sample.signals["psi_io"] == pytest.approx(0.03)
    assert sample.signals["load1"] == pytest.approx(0.25)
    assert sample.pressure is not None
    assert sample.pressure["cpu"].some_avg60 == pytest.approx(6.25)
    assert sample.cgroup is None  # no cgroup hierarchy in this fixture
    assert sample.raw["memory_working_set_bytes"] == 3 * GIB


def test_each_sample_is_a_delta_from_the_previous_one(host: Host) -> None:
    collector = primed(host.collector())
    assert second(host, collector, busy=1100, idle=1100).signals["cpu"] == pytest.approx(0.5)
    assert second(host, collector, busy=1110, idle=1190).signals["cpu"] == pytest.approx(0.1)


def test_counters_going_backwards_re_prime(host: Host) -> None:
    collector = primed(host.collector())
    with pytest.raises(CollectorError, match="re-primed"):
        second(host, collector, busy=10, idle=10)  # a restore or another boot
    assert second(host, collector, busy=60, idle=60).signals["cpu"] == pytest.approx(0.5)


def test_load_average_is_clamped(host: Host) -> None:
    write(host.proc / "loadavg", "7.00 1.00 1.00 3/105 1\n")
    collector = primed(host.collector())
    assert second(host, collector, busy=1001, idle=1001).signals["load1"] == 1.0


def test_geometry_and_capacity_without_cgroups(host: Host) -> None:
    host.set_stat(busy=1000, idle=1000, ncpu=4)
    collector = host.collector()
    geometry = collector.geometry()
    assert geometry.units == 4
    assert collector.capacity() == {"cpu": "4", "memory": str(16 * GIB)}
    assert collector.present()


def test_absent_proc_is_not_present_and_never_raises(tmp_path: Path) -> None:
    collector = HostCollector(HostPaths(proc=tmp_path / "nope", sys=tmp_path / "nope"))
    assert collector.present() is False
    with pytest.raises(CollectorError):
        collector.sample()


# ---------------------------------------------------------------------------------------------
# PSI


def test_missing_psi_files_leave_pressure_out(host: Host) -> None:
    (host.proc / "pressure" / "memory").unlink()
    collector = primed(host.collector())
    sample = second(host, collector, busy=1100, idle=1100)
    assert "psi_memory" not in sample.signals  # unknown, never zero
    assert sample.pressure is not None
    assert set(sample.pressure) == {"cpu", "io"}
    assert not collector.warnings


def test_no_psi_at_all(host: Host) -> None:
    for resource in ("cpu", "memory", "io"):
        (host.proc / "pressure" / resource).unlink()
    (host.proc / "pressure").rmdir()
    collector = primed(host.collector())
    sample = second(host, collector, busy=1100, idle=1100)
    assert sample.pressure is None
    assert not any(name.startswith("psi_") for name in sample.signals)


def test_psi_without_full_line(host: Host) -> None:
    write(host.proc / "pressure" / "cpu", psi(40.0, full10=None))
    collector = primed(host.collector())
    sample = second(host, collector, busy=1100, idle=1100)
    assert sample.pressure is not None
    assert sample.pressure["cpu"].full_avg10 is None
    assert sample.signals["psi_cpu"] == pytest.approx(0.4)


def test_garbage_psi_is_skipped_and_counted(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    write(host.proc / "pressure" / "io", "some avg10=banana avg60=0.00\n")
    collector = primed(host.collector())
    with caplog.at_level(logging.WARNING):
        sample = second(host, collector, busy=1100, idle=1100)
        second(host, collector, busy=1200, idle=1200)
    assert "psi_io" not in sample.signals
    assert sample.signals["psi_cpu"] == pytest.approx(0.125)
    assert collector.warnings["psi_io"] == 3  # priming read, then two samples
    assert sum("pressure left out" in r.getMessage() for r in caplog.records) == 1  # logged once


# ---------------------------------------------------------------------------------------------
# Garbage in the files that matter: CollectorError, nothing else


@pytest.mark.parametrize(
    ("relative", "content"),
    [
        ("stat", "cpu  a b c d\ncpu0 1 2 3 4\n"),
        ("stat", ""),
        ("meminfo", "MemTotal: lots\n"),
        ("meminfo", "MemFree: 10 kB\n"),
    ],
)
def test_garbage_core_files_raise_collector_error(host: Host, relative: str, content: str) -> None:
    write(host.proc / relative, content)
    collector = host.collector()
    with pytest.raises(CollectorError):
        collector.sample()
    assert collector.present() is False


def test_unreadable_file_raises_collector_error(host: Host) -> None:
    (host.proc / "stat").unlink()
    (host.proc / "stat").mkdir()  # reading a directory: IsADirectoryError
    with pytest.raises(CollectorError, match="cannot read"):
        host.collector().sample()


def test_garbage_loadavg_drops_only_load1(host: Host) -> None:
    write(host.proc / "loadavg", "???\n")
    collector = primed(host.collector())
    sample = second(host, collector, busy=1100, idle=1100)
    assert "load1" not in sample.signals
    assert collector.warnings["loadavg"] == 2


# ---------------------------------------------------------------------------------------------
# cgroup v2


def test_v2_unlimited_max_sentinels(host: Host) -> None:
    host.cgroup_v2()
    collector = primed(host.collector())
    sample = second(host, collector, busy=1100, idle=1100)
    assert sample.cgroup is not None
    assert sample.cgroup.version == 2
    assert sample.cgroup.memory_limit_bytes is None
    assert sample.cgroup.cpu_limit_cores is None
    assert sample.cgroup.cpu_throttled_fraction == 0.0  # no period ran: nothing throttled
    assert collector.capacity() == {"cpu": "2", "memory": str(16 * GIB)}


def test_v2_memory_limit_on_a_parent_is_the_effective_limit(host: Host) -> None:
    leaf = host.cgroup_v2()
    pod = leaf.parent
    write(pod / "memory.max", f"{GIB}\n")
    write(pod / "memory.current", f"{600 * MIB}\n")
    write(pod / "memory.stat", f"anon {500 * MIB}\ninactive_file {88 * MIB}\n")
    collector = primed(host.collector())
    sample = second(host, collector, busy=1100, idle=1100)
    assert sample.cgroup is not None
    assert sample.cgroup.memory_limit_bytes == GIB
    # (600 - 88) MiB of 1 GiB, worse than the host's 3/16
    assert sample.signals["memory"] == pytest.approx(512 / 1024)
    assert sample.raw["memory_limit_bytes"] == GIB
    assert collector.capacity()["memory"] == str(GIB)


def test_v2_cpu_quota_usage_and_throttling(host: Host) -> None:
    leaf = host.cgroup_v2()
    write(leaf / "cpu.max", "50000 100000\n")  # half a core
    write(leaf / "cpu.stat", cpu_stat_v2(usage_usec=10_000_000, periods=1000, throttled=100))
    collector = primed(host.collector())

    def burn() -> None:  # 0.45 s of CPU in 1 s against a 0.5 core quota; 40 of 50 periods
        write(leaf / "cpu.stat", cpu_stat_v2(usage_usec=10_450_000, periods=1050, throttled=140))

    sample = second(host, collector, busy=1010, idle=1190, before=burn)  # host: 5 % busy
    assert sample.raw["cpu_host"] == pytest.approx(0.05)
    assert sample.raw["cpu_cgroup"] == pytest.approx(0.9)
    assert sample.signals["cpu"] == pytest.approx(0.9)
    assert sample.cgroup is not None
    assert sample.cgroup.cpu_limit_cores == 0.5
    assert sample.cgroup.cpu_throttled_fraction == pytest.approx(0.8)
    assert collector.capacity()["cpu"] == "500m"


def test_v2_cgroup_path_missing_under_sys_falls_back_to_root(host: Host) -> None:
    host.cgroup_v2()
    write(host.proc / "self" / "cgroup", "0::/somewhere/else\n")
    scope = resolve_cgroup(host.paths, None)
    assert scope is not None
    assert scope.memory_dir == host.cgroup


def test_v2_explicit_root(host: Host) -> None:
    leaf = host.cgroup_v2()
    write(leaf / "memory.max", f"{GIB}\n")
    collector = primed(host.collector(cgroup_path="/"))
    sample = second(host, collector, busy=1100, idle=1100)
    assert sample.cgroup is not None
    assert sample.cgroup.memory_limit_bytes is None  # the root has no memory.max
    assert sample.cgroup.cpu_throttled_fraction is None  # root cpu.stat has no nr_periods


@pytest.mark.parametrize(
    ("name", "content"),
    [("memory.max", "lots\n"), ("cpu.max", "fast 100000\n"), ("cpu.stat", "nr_periods x\n")],
)
def test_v2_garbage_raises_collector_error(host: Host, name: str, content: str) -> None:
    leaf = host.cgroup_v2()
    write(leaf / name, content)
    with pytest.raises(CollectorError):
        host.collector().sample()


def test_v2_relative_cgroup_path_is_refused(host: Host) -> None:
    with pytest.raises(ValueError, match="absolute"):
        host.collector(cgroup_path="kubepods")


# ---------------------------------------------------------------------------------------------
# cgroup v1 (hybrid layout)


def test_v1_absurd_limit_and_minus_one_quota_are_unlimited(host: Host) -> None:
    host.cgroup_v1()
    collector = primed(host.collector())
    sample = second(host, collector, busy=1100, idle=1100)
    assert sample.cgroup is not None
    assert sample.cgroup.version == 1  # unified/ without controllers does not make it v2
    assert sample.cgroup.memory_limit_bytes is None
    assert sample.cgroup.cpu_limit_cores is None
    assert collector.capacity() == {"cpu": "2", "memory": str(16 * GIB)}


def test_v1_limits_usage_and_throttling(host: Host) -> None:
    dirs = host.cgroup_v1()
    memory, cpu = dirs["memory"], dirs["cpu,cpuacct"]
    write(memory / "memory.limit_in_bytes", f"{512 * MIB}\n")
    write(memory / "memory.usage_in_bytes", f"{400 * MIB}\n")
    write(memory / "memory.stat", f"cache 1\ninactive_file 1\ntotal_inactive_file {16 * MIB}\n")
    write(cpu / "cpu.cfs_quota_us", "150000\n")
    write(cpu / "cpu.stat", cpu_stat_v1(periods=200, throttled=10))
    write(cpu / "cpuacct.usage", "5000000000\n")
    collector = primed(host.collector())

    def burn() -> None:  # 1.2 s of CPU in 2 s against 1.5 cores; 5 of 20 periods throttled
        write(cpu / "cpu.stat", cpu_stat_v1(periods=220, throttled=15))
        write(cpu / "cpuacct.usage", "6200000000\n")

    sample = second(host, collector, busy=1100, idle=1300, dt=2.0, before=burn)
    assert sample.cgroup is not None
    assert sample.cgroup.memory_limit_bytes == 512 * MIB
    assert sample.cgroup.cpu_limit_cores == 1.5
    assert sample.cgroup.cpu_throttled_fraction == pytest.approx(0.25)
    assert sample.signals["memory"] == pytest.approx(384 / 512)
    assert sample.raw["cpu_cgroup"] == pytest.approx(0.4)
    assert sample.signals["cpu"] == pytest.approx(0.4)  # the host, 1/4 busy, is lower
    assert collector.capacity() == {"cpu": "1500m", "memory": str(512 * MIB)}


def test_v1_separate_cpu_and_cpuacct_mounts(host: Host) -> None:
    """This test machine mounts cpu and cpuacct separately, with the agent at / in both."""
    write(host.proc / "self" / "cgroup", "4:memory:/agent\n2:cpuacct:/\n1:cpu:/\n")
    write(host.cgroup / "memory" / "memory.limit_in_bytes", UNLIMITED_V1)
    write(host.cgroup / "memory" / "agent" / "memory.limit_in_bytes", f"{GIB}\n")
    write(host.cgroup / "memory" / "agent" / "memory.usage_in_bytes", f"{GIB // 4}\n")
    write(host.cgroup / "cpu" / "cpu.cfs_quota_us", "100000\n")
    write(host.cgroup / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(host.cgroup / "cpu" / "cpu.stat", cpu_stat_v1(periods=0, throttled=0))
    write(host.cgroup / "cpuacct" / "cpuacct.usage", "0\n")
    collector = primed(host.collector())

    def burn() -> None:
        write(host.cgroup / "cpuacct" / "cpuacct.usage", "250000000\n")

    sample = second(host, collector, busy=1100, idle=1100, before=burn)
    assert sample.raw["cpu_cgroup"] == pytest.approx(0.25)
    assert sample.signals["cpu"] == pytest.approx(0.5)  # the host is busier than the cgroup
    assert sample.signals["memory"] == pytest.approx(0.25)  # no memory.stat: inactive 0
    assert sample.cgroup is not None
    assert sample.cgroup.memory_limit_bytes == GIB


@pytest.mark.parametrize(
    ("controller", "name", "content"),
    [
        ("memory", "memory.limit_in_bytes", "-7\n"),
        ("cpu,cpuacct", "cpu.cfs_quota_us", "0\n"),
        ("cpu,cpuacct", "cpu.cfs_period_us", "abc\n"),
    ],
)
def test_v1_garbage_raises_collector_error(
    host: Host, controller: str, name: str, content: str
) -> None:
    dirs = host.cgroup_v1()
    write(dirs[controller] / name, content)
    with pytest.raises(CollectorError):
        host.collector().sample()


def test_v1_quota_without_cpuacct_usage_is_an_error(host: Host) -> None:
    dirs = host.cgroup_v1()
    write(dirs["cpu,cpuacct"] / "cpu.cfs_quota_us", "100000\n")
    (dirs["cpu,cpuacct"] / "cpuacct.usage").unlink()
    with pytest.raises(CollectorError, match=r"cpuacct\.usage"):
        host.collector().sample()


# ---------------------------------------------------------------------------------------------
# Small helpers


@pytest.mark.parametrize(
    ("cores", "quantity"), [(2.0, "2"), (0.5, "500m"), (1.5, "1500m"), (0.0001, "1m")]
)
def test_format_cores(cores: float, quantity: str) -> None:
    assert format_cores(cores) == quantity


def test_host_paths_from_env() -> None:
    paths = HostPaths.from_env({"HOST_PROC": "/host/proc", "HOST_SYS": "/host/sys"})
    assert paths.proc_path("pressure", "cpu") == Path("/host/proc/pressure/cpu")
    assert paths.cgroup_root == Path("/host/sys/fs/cgroup")
    assert paths.cgroup_path("/a/b", "memory") == Path("/host/sys/fs/cgroup/memory/a/b")
    assert HostPaths.from_env({}) == HostPaths()
    with pytest.raises(ValueError, match=r"\.\."):
        paths.cgroup_path("/a/../../etc")
