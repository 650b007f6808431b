"""The pure procfs/sysfs/cgroupfs parsers on literal file contents.

Contents are shaped after a real Linux 6.x host (2 CPUs, cgroup v1 with a v2 ``unified`` mount);
the garbage cases check that malformed files only ever raise CollectorError.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capacity_agent.collectors.base import CollectorError
from capacity_agent.collectors.procfs import (
    SECTOR_BYTES,
    Baseline,
    CpuTimes,
    PrimingError,
    counter_delta,
    cpu_utilisation,
    host_working_set,
    parse_cgroup_v1_cfs_period,
    parse_cgroup_v1_cfs_quota,
    parse_cgroup_v1_cpu_limit,
    parse_cgroup_v1_memory_limit,
    parse_cgroup_v2_cpu_max,
    parse_cgroup_v2_memory_max,
    parse_cpu_stat,
    parse_diskstats,
    parse_flat_keyed,
    parse_int,
    parse_loadavg,
    parse_meminfo,
    parse_net_dev,
    parse_proc_self_cgroup,
    parse_proc_stat,
    parse_psi,
)

pytestmark = pytest.mark.unit

PROC_STAT = """\
cpu  57059 0 15550 22804 636 0 156 104 0 0
cpu0 27845 0 7326 12814 86 0 23 49 0 0
cpu1 29214 0 8224 9990 549 0 132 55 0 0
intr 6019871 0 9 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 10458727
btime 1795318640
processes 18442
procs_running 3
procs_blocked 0
softirq 2418542 0 712083 2 88093 0 0 1390 851672 0 765302
"""

MEMINFO = """\
MemTotal:       24684084 kB
MemFree:        20026636 kB
MemAvailable:   23887220 kB
Buffers:           23656 kB
Cached:          3860448 kB
SwapCached:            0 kB
Active:          1599276 kB
Inactive:        2421980 kB
Active(anon):       1544 kB
Inactive(anon):   144540 kB
Active(file):    1597732 kB
Inactive(file):  2277440 kB
Unevictable:       13368 kB
SwapTotal:             0 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
"""

PSI_CPU = """\
some avg10=57.30 avg60=48.58 avg300=38.18 total=213277410
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""

PSI_IO = """\
some avg10=0.42 avg60=1.11 avg300=1.02 total=7717496
full avg10=0.10 avg60=0.70 avg300=0.63 total=5002538
"""

DISKSTATS = """\
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 156614 13442 8505066 131018 20149 117988 13816936 30726 3 16884 163168 10575 35 4290488 1403 389 19
 253       0 zram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
   8       1 sda1 1200 0 96000 400 300 0 4800 90 0 500 490
"""  # noqa: E501 - diskstats lines are long

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    3293      31    0    0    0     0          0         0     3293      31    0    0    0     0       0          0
  eth0: 381104460   20978    1    2    0     0          0         0  1577183   14396    3    4    0     0       0          0
"""  # noqa: E501 - /proc/net/dev lines are long


# ---------------------------------------------------------------------------------------------
# /proc/stat


def test_proc_stat_aggregate_and_cpu_count() -> None:
    stat = parse_proc_stat(PROC_STAT)
    assert stat.ncpu == 2
    # busy = user + nice + system + irq + softirq + steal; idle = idle + iowait
    assert stat.cpu == CpuTimes(busy=57059 + 15550 + 156 + 104, idle=22804 + 636)


def test_proc_stat_old_kernel_with_four_columns() -> None:
    stat = parse_proc_stat("cpu 10 0 10 80\ncpu0 10 0 10 80\n")
    assert stat.cpu == CpuTimes(busy=20, idle=80)


def test_cpu_utilisation_of_a_known_delta() -> None:
    before = CpuTimes(busy=1000, idle=1000)
    after = CpuTimes(busy=1150, idle=1050)
    assert cpu_utilisation(before, after) == pytest.approx(0.75)


def test_cpu_utilisation_refuses_time_going_backwards() -> None:
    with pytest.raises(CollectorError, match="did not advance"):
        cpu_utilisation(CpuTimes(busy=100, idle=100), CpuTimes(busy=50, idle=100))
    with pytest.raises(CollectorError):
        cpu_utilisation(CpuTimes(busy=100, idle=100), CpuTimes(busy=100, idle=100))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "cpu0 1 2 3 4\n",  # no aggregate
        "cpu 1 2 3 4\n",  # no per-CPU line
        "cpu 1 2 x 4\ncpu0 1 2 3 4\n",
        "cpu 1 2\ncpu0 1 2 3 4\n",
        "cpu -1 2 3 4\ncpu0 1 2 3 4\n",
        "cpu 1 2 3 4\ncpufoo 1 2 3 4\n",
    ],
)
def test_proc_stat_garbage(text: str) -> None:
    with pytest.raises(CollectorError):
        parse_proc_stat(text)


# ---------------------------------------------------------------------------------------------
# /proc/meminfo, /proc/loadavg


def test_meminfo_in_bytes_and_working_set() -> None:
    info = parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 24684084 * 1024
    assert info["HugePages_Total"] == 0  # counts keep their value
    total, working_set = host_working_set(info)
    assert total == 24684084 * 1024
    assert working_set == (24684084 - 20026636 - 2277440) * 1024


@pytest.mark.parametrize(
    "text",
    [
        "MemTotal 100 kB\n",
        "MemTotal:\n",
        "MemTotal: 100 MB\n",
        "MemTotal: abc kB\n",
        "MemTotal: 1 2 3\n",
    ],
)
def test_meminfo_garbage(text: str) -> None:
    with pytest.raises(CollectorError):
        parse_meminfo(text)


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"MemFree": 1}, "MemTotal"),
        ({"MemTotal": 0, "MemFree": 0}, "MemTotal is 0"),
        ({"MemTotal": 10, "MemFree": 20}, "exceeds"),
    ],
)
def test_working_set_needs_sane_totals(info: dict[str, int], message: str) -> None:
    with pytest.raises(CollectorError, match=message):
        host_working_set(info)


def test_loadavg() -> None:
    assert parse_loadavg("3.92 2.53 1.19 3/105 18428\n") == pytest.approx(3.92)
    for bad in ("", "nan 1 1 1/1 1", "-1 1 1 1/1 1", "x y z"):
        with pytest.raises(CollectorError):
            parse_loadavg(bad)


# ---------------------------------------------------------------------------------------------
# PSI


def test_psi_some_and_full() -> None:
    cpu = parse_psi(PSI_CPU)
    assert (cpu.some_avg10, cpu.some_avg60) == (57.30, 48.58)
    assert (cpu.full_avg10, cpu.full_avg60) == (0.0, 0.0)
    io = parse_psi(PSI_IO)
    assert io.full_avg60 == 0.70


def test_psi_without_full_line_as_before_linux_5_13() -> None:
    cpu = parse_psi("some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n")
    assert cpu.some_avg10 == 1.50
    assert cpu.full_avg10 is None
    assert cpu.full_avg60 is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",  # no some
        "some avg10=abc avg60=0.00 avg300=0.00 total=0\n",
        "some avg10=0.00 avg300=0.00 total=0\n",  # no avg60
        "some avg10 avg60=0.00\n",
        "some avg10=nan avg60=0.00\n",
        "some avg10=150.0 avg60=0.00\n",
        "some avg10=-1 avg60=0.00\n",
        "partial avg10=0.00 avg60=0.00\n",
        "\x00\x01\x02garbage",
    ],
)
def test_psi_garbage(text: str) -> None:
    with pytest.raises(CollectorError):
        parse_psi(text)


# ---------------------------------------------------------------------------------------------
# cgroups


def test_proc_self_cgroup_v1_hybrid() -> None:
    entries = parse_proc_self_cgroup(
        "9:name=systemd:/\n"
        "4:memory:/process_api/90d0e2665af50c5f9379d264ea67ba15\n"
        "2:cpu,cpuacct:/kubepods/pod1\n"
        "0::/\n"
    )
    assert entries[1].controllers == ("memory",)
    assert entries[1].path == "/process_api/90d0e2665af50c5f9379d264ea67ba15"
    assert entries[2].controllers == ("cpu", "cpuacct")
    assert entries[3].hierarchy == 0
    assert entries[3].controllers == ()


def test_proc_self_cgroup_v2() -> None:
    (entry,) = parse_proc_self_cgroup("0::/kubepods.slice/kubepods-pod1.slice/cri-abc.scope\n")
    assert entry.path == "/kubepods.slice/kubepods-pod1.slice/cri-abc.scope"


@pytest.mark.parametrize("text", ["", "garbage\n", "x::/\n", "0::relative\n"])
def test_proc_self_cgroup_garbage(text: str) -> None:
    with pytest.raises(CollectorError):
        parse_proc_self_cgroup(text)


def test_v2_memory_max() -> None:
    assert parse_cgroup_v2_memory_max("max\n") is None
    assert parse_cgroup_v2_memory_max("1073741824\n") == 1073741824
    assert parse_cgroup_v2_memory_max("0\n") == 0
    assert parse_cgroup_v2_memory_max("9223372036854771712\n") is None
    for bad in ("", "maximum", "-5", "1.5G"):
        with pytest.raises(CollectorError):
            parse_cgroup_v2_memory_max(bad)


def test_v2_cpu_max() -> None:
    assert parse_cgroup_v2_cpu_max("max 100000\n") is None
    assert parse_cgroup_v2_cpu_max("max\n") is None
    assert parse_cgroup_v2_cpu_max("200000 100000\n") == 2.0
    assert parse_cgroup_v2_cpu_max("50000 100000\n") == 0.5
    assert parse_cgroup_v2_cpu_max("150000\n") == 1.5  # default period
    for bad in ("", "max 0", "200000 0", "x 100000", "1 2 3", "-1 100000"):
        with pytest.raises(CollectorError):
            parse_cgroup_v2_cpu_max(bad)


def test_cpu_stat_v1_and_v2() -> None:
    v1 = parse_cpu_stat(
        "nr_periods 120\nnr_throttled 30\nthrottled_time 9000000\nnr_bursts 0\nburst_time 0\n"
    )
    assert (v1["nr_periods"], v1["nr_throttled"]) == (120, 30)
    v2 = parse_cpu_stat(
        "usage_usec 763852608\nuser_usec 595242165\nsystem_usec 168610442\n"
        "nr_periods 10\nnr_throttled 1\nthrottled_usec 5000\n"
    )
    assert v2["usage_usec"] == 763852608
    for bad in ("nr_periods\n", "nr_periods x\n", "a b c\n"):
        with pytest.raises(CollectorError):
            parse_cpu_stat(bad)


def test_v1_memory_limit_absurd_values_are_unlimited() -> None:
    assert parse_cgroup_v1_memory_limit("9223372036854771712\n") is None  # 4 KiB pages
    assert parse_cgroup_v1_memory_limit("9223372036854710272\n") is None  # 64 KiB pages
    assert parse_cgroup_v1_memory_limit("-1\n") is None
    assert parse_cgroup_v1_memory_limit("536870912\n") == 536870912
    for bad in ("", "unlimited", "-2"):
        with pytest.raises(CollectorError):
            parse_cgroup_v1_memory_limit(bad)


def test_v1_cfs_quota_and_period() -> None:
    assert parse_cgroup_v1_cfs_quota("-1\n") is None
    assert parse_cgroup_v1_cfs_quota("50000\n") == 50000
    assert parse_cgroup_v1_cfs_period("100000\n") == 100000
    assert parse_cgroup_v1_cpu_limit("-1\n", "100000\n") is None
    assert parse_cgroup_v1_cpu_limit("150000\n", "100000\n") == 1.5
    for quota, period in (("0", "100000"), ("-2", "100000"), ("100", "0"), ("x", "1")):
        with pytest.raises(CollectorError):
            parse_cgroup_v1_cpu_limit(quota, period)


# ---------------------------------------------------------------------------------------------
# Counters, diskstats, net/dev


def test_counter_delta_plain_wrap_and_reset() -> None:
    assert counter_delta(100, 250) == 150
    assert counter_delta(2**32 - 100, 400) == 500  # 32-bit wrap (io_ticks)
    assert counter_delta(2**64 - 10, 5) == 15  # 64-bit wrap
    assert counter_delta(3_000_000_000_000, 10) is None  # 64-bit counter reset
    assert counter_delta(1_000_000_000, 10) is None  # fell by more than half of 2**32: reset


def test_diskstats_columns() -> None:
    stats = parse_diskstats(DISKSTATS)
    assert set(stats) == {"loop0", "vda", "zram0", "sda1"}
    vda = stats["vda"]
    assert (vda.major, vda.minor) == (254, 0)
    assert (vda.reads, vda.read_sectors, vda.read_ms) == (156614, 8505066, 131018)
    assert (vda.writes, vda.write_sectors, vda.write_ms) == (20149, 13816936, 30726)
    assert (vda.in_flight, vda.io_ms) == (3, 16884)
    assert (vda.discards, vda.discard_ms) == (10575, 1403)
    assert vda.ios == 156614 + 20149 + 10575
    old_kernel = stats["sda1"]  # 14 columns: no discard fields
    assert (old_kernel.discards, old_kernel.io_ms) == (0, 500)


@pytest.mark.parametrize(
    "text",
    [
        "   8 0 sda 1 2 3\n",
        "   8 0 sda 1 2 3 4 5 6 7 8 9 ten 11\n",
        "   8 0 sda 1 2 3 4 5 6 7 8 9 -10 11\n",
        "   x 0 sda 1 2 3 4 5 6 7 8 9 10 11\n",
    ],
)
def test_diskstats_garbage(text: str) -> None:
    with pytest.raises(CollectorError):
        parse_diskstats(text)


def test_net_dev_columns() -> None:
    stats = parse_net_dev(NET_DEV)
    eth0 = stats["eth0"]
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_drops) == (
        381104460,
        20978,
        1,
        2,
    )
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_drops) == (1577183, 14396, 3, 4)
    assert stats["lo"].rx_bytes == 3293


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Inter-|   Receive\n face |bytes\n",  # headers only
        "eth0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n",
        "eth0: 1 2 3\n",
        "eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 x\n",
    ],
)
def test_net_dev_garbage(text: str) -> None:
    with pytest.raises(CollectorError):
        parse_net_dev(text)


def test_parse_int_and_flat_keyed_edges() -> None:
    assert parse_int(" 42\n") == 42
    assert parse_int("-1", minimum=-1) == -1
    for bad in ("", "4 2", "0x10", "\u00b2", "1" * 5000):
        with pytest.raises(CollectorError):
            parse_int(bad)
    assert parse_flat_keyed("a 1\n\nb 2\n", "x") == {"a": 1, "b": 2}


def test_priming_is_a_collector_error() -> None:
    assert issubclass(PrimingError, CollectorError)


# ---------------------------------------------------------------------------------------------
# Arbitrary input: only CollectorError, never another exception type

PARSERS: list[Callable[[str], Any]] = [
    parse_proc_stat,
    parse_meminfo,
    parse_loadavg,
    parse_psi,
    parse_proc_self_cgroup,
    parse_cgroup_v2_memory_max,
    parse_cgroup_v2_cpu_max,
    parse_cpu_stat,
    parse_cgroup_v1_memory_limit,
    parse_cgroup_v1_cfs_quota,
    parse_cgroup_v1_cfs_period,
    parse_diskstats,
    parse_net_dev,
    lambda text: host_working_set(parse_meminfo(text)),
]

LINES = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            [
                "cpu 1 2 3 4",
                "cpu0 1 2 3 4",
                "MemTotal: 10 kB",
                "MemFree: 20 kB",
                "some avg10=1.0 avg60=2.0",
                "full avg10=x",
                "0::/",
                "max 100000",
                "nr_periods 1",
                "eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
                " 8 0 sda 1 2 3 4 5 6 7 8 9 10 11",
            ]
        ),
        st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=20).map(
            lambda xs: " ".join(map(str, xs))
        ),
    ),
    max_size=8,
).map("\n".join)


@pytest.mark.parametrize("parser", PARSERS)
@settings(
    max_examples=150, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(text=LINES)
def test_parsers_raise_only_collector_error(parser: Callable[[str], Any], text: str) -> None:
    with contextlib.suppress(CollectorError):
        parser(text)


def test_baseline_primes_then_pairs_devices_present_in_both_readings() -> None:
    baseline: Baseline[int] = Baseline("disks")
    with pytest.raises(PrimingError, match="disks: first reading"):
        baseline.advance(10.0, {"vda": 1, "vdb": 2})
    elapsed, pairs = baseline.advance(12.5, {"vda": 5, "vdc": 9})
    assert elapsed == 2.5
    assert pairs == [("vda", 1, 5)]  # vdc joins from the next sample, vdb is gone
    with pytest.raises(CollectorError, match="clock did not advance"):
        baseline.advance(12.5, {"vda": 6})
    with pytest.raises(CollectorError, match="nothing present in both readings"):
        baseline.advance(13.0, {"sda": 1})


# ---------------------------------------------------------------------------------------------
# The same files read by psutil, the reference (a development dependency; docs/agent.md says why
# the agent parses these files itself)

DISKSTATS_4_18 = """\
 259       0 nvme0n1 48125 1021 3366010 21930 74512 51118 4417424 96114 0 63520 125688 812 0 901 7
"""  # 18 columns: discards but no flushes


@pytest.fixture
def psutil_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fixture /proc with this module's files, where psutil reads for the test."""
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "stat").write_text(PROC_STAT)
    (proc / "diskstats").write_text(DISKSTATS + DISKSTATS_4_18)
    (proc / "net" / "dev").write_text(NET_DEV)
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(proc))
    return proc


def test_cpu_times_agree_with_psutil(psutil_proc: Path) -> None:
    ours = parse_proc_stat((psutil_proc / "stat").read_text()).cpu
    theirs = psutil.cpu_times()
    hz = os.sysconf("SC_CLK_TCK")  # psutil reports seconds, /proc/stat counts USER_HZ ticks
    busy = theirs.user + theirs.nice + theirs.system + theirs.irq + theirs.softirq + theirs.steal
    assert ours.busy == pytest.approx(busy * hz)
    assert ours.idle == pytest.approx((theirs.idle + theirs.iowait) * hz)


def test_disk_counters_agree_with_psutil(psutil_proc: Path) -> None:
    ours = parse_diskstats((psutil_proc / "diskstats").read_text())
    theirs = psutil.disk_io_counters(perdisk=True, nowrap=False)
    assert set(ours) == set(theirs) == {"loop0", "vda", "zram0", "sda1", "nvme0n1"}
    for name, disk in ours.items():
        assert (
            disk.reads,
            disk.writes,
            disk.read_sectors * SECTOR_BYTES,
            disk.write_sectors * SECTOR_BYTES,
            disk.read_ms,
            disk.write_ms,
            disk.io_ms,
        ) == (
            theirs[name].read_count,
            theirs[name].write_count,
            theirs[name].read_bytes,
            theirs[name].write_bytes,
            theirs[name].read_time,
            theirs[name].write_time,
            theirs[name].busy_time,
        ), name
    # what psutil leaves out and the storage load counts: discards (kernel 4.18+)
    assert (ours["nvme0n1"].discards, ours["nvme0n1"].discard_ms) == (812, 7)


def test_network_counters_agree_with_psutil(psutil_proc: Path) -> None:
    ours = parse_net_dev((psutil_proc / "net" / "dev").read_text())
    theirs = psutil.net_io_counters(pernic=True, nowrap=False)
    assert set(ours) == set(theirs) == {"lo", "eth0"}
    for name, nic in ours.items():
        assert (
            nic.rx_bytes,
            nic.rx_packets,
            nic.rx_errors,
            nic.rx_drops,
            nic.tx_bytes,
            nic.tx_packets,
            nic.tx_errors,
            nic.tx_drops,
        ) == (
            theirs[name].bytes_recv,
            theirs[name].packets_recv,
            theirs[name].errin,
            theirs[name].dropin,
            theirs[name].bytes_sent,
            theirs[name].packets_sent,
            theirs[name].errout,
            theirs[name].dropout,
        ), name
