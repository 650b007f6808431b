"""Pure parsers of the procfs, sysfs and cgroupfs files the live collectors read.

Every parser takes the text of one file and returns plain values; nothing here opens a file except
:func:`read_text` and :func:`read_optional`, so the parsers are unit-testable on literal strings.
Malformed content (a garbage line, a missing column, a negative counter, a non-finite number)
raises :class:`~capacity_agent.collectors.base.CollectorError`, never ``ValueError``,
``IndexError`` or ``KeyError``: the agent skips the sample and marks the substrate stale rather
than crash or read a broken file as zero load.

psutil parses /proc/stat, /proc/diskstats and /proc/net/dev too, but below one process-global
root and with fallbacks outside it: docs/agent.md ("Reading /proc") says why the agent does not
use it. The unit tests check these three parsers against psutil's on the same files.
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from capacity_agent.collectors.base import CollectorError
from capacity_api.models import PressureReading

__all__ = [
    "SECTOR_BYTES",
    "UNLIMITED_THRESHOLD",
    "Baseline",
    "CgroupEntry",
    "CpuTimes",
    "DiskStats",
    "NetDevStats",
    "PrimingError",
    "ProcStat",
    "counter_delta",
    "cpu_utilisation",
    "host_working_set",
    "is_dir",
    "parse_cgroup_v1_cfs_period",
    "parse_cgroup_v1_cfs_quota",
    "parse_cgroup_v1_cpu_limit",
    "parse_cgroup_v1_memory_limit",
    "parse_cgroup_v2_cpu_max",
    "parse_cgroup_v2_memory_max",
    "parse_cpu_stat",
    "parse_diskstats",
    "parse_flat_keyed",
    "parse_int",
    "parse_loadavg",
    "parse_meminfo",
    "parse_net_dev",
    "parse_proc_self_cgroup",
    "parse_proc_stat",
    "parse_psi",
    "path_exists",
    "read_optional",
    "read_text",
]

UNLIMITED_THRESHOLD = 2**60
"""Byte limits at or above 1 EiB mean "no limit".

cgroup v1 shows an unlimited ``memory.limit_in_bytes`` as PAGE_COUNTER_MAX rounded down to a page
(9223372036854771712 with 4 KiB pages, 9223372036854710272 with 64 KiB pages); no real machine has
an exabyte of memory, so anything that large is read as unlimited rather than as a limit.
"""

SECTOR_BYTES = 512
"""/proc/diskstats counts 512-byte sectors whatever the device's logical block size."""

# errno values that mean "this file does not apply here" rather than "reading failed":
# no such file, a path component is not a directory, PSI disabled (psi=0 gives EOPNOTSUPP),
# a NIC without a link speed (EINVAL), a device that went away, a sensor without data.
_ABSENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV, errno.ENODATA}
)


class PrimingError(CollectorError):
    """The first call of a delta-based collector: it stored its baseline and has no rate yet.

    A subclass of CollectorError, so the agent treats it like any skipped sample (never as zero
    load); an agent loop may choose not to count it as a failure.
    """


Stats = TypeVar("Stats")


class Baseline(Generic[Stats]):
    """The previous reading of per-device counters, so two readings give rates.

    :meth:`advance` stores the new reading and returns the elapsed time with the devices present
    in both; the first call, a clock that did not move, or no device in common raise (the sample
    is skipped, never read as zero), and the new reading becomes the baseline either way.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._prev: tuple[float, dict[str, Stats]] | None = None

    def advance(
        self, now: float, current: dict[str, Stats]
    ) -> tuple[float, list[tuple[str, Stats, Stats]]]:
        prev, self._prev = self._prev, (now, current)
        if prev is None:
            raise PrimingError(f"{self.label}: first reading stored as the baseline")
        prev_time, prev_stats = prev
        elapsed = now - prev_time
        if elapsed <= 0:
            raise CollectorError(
                f"{self.label}: clock did not advance ({elapsed:.3f} s); re-primed"
            )
        # a device that appeared since the last reading joins from the next sample
        pairs = [
            (name, prev_stats[name], cur)
            for name, cur in sorted(current.items())
            if name in prev_stats
        ]
        if not pairs:
            raise CollectorError(f"{self.label}: nothing present in both readings; re-primed")
        return elapsed, pairs


# ---------------------------------------------------------------------------------------------
# Reading


def read_text(path: Path) -> str:
    """The whole file as text; any OS error becomes a CollectorError naming the file."""
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise CollectorError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_optional(path: Path) -> str | None:
    """The file's text, or None when the file does not apply here (missing, unsupported).

    Other OS errors (permission denied, I/O error) still raise CollectorError: a read-only mount
    that the agent cannot read is a misconfiguration, not an absent feature.
    """
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS or isinstance(exc, FileNotFoundError | NotADirectoryError):
            return None
        raise CollectorError(f"cannot read {path}: {exc.strerror or exc}") from exc


def path_exists(path: Path) -> bool:
    """Whether ``path`` exists; False when even that cannot be told (never raises)."""
    try:
        return path.exists()
    except OSError:
        return False


def is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory; False when that cannot be told (never raises)."""
    try:
        return path.is_dir()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Scalars


def parse_int(text: str, what: str = "value", *, minimum: int | None = 0) -> int:
    """One integer (surrounding whitespace allowed), at least ``minimum`` unless that is None."""
    word = text.strip()
    if not word or not word.lstrip("+-").isascii() or not word.lstrip("+-").isdigit():
        raise CollectorError(f"{what}: expected an integer, got {_excerpt(text)}")
    try:
        value = int(word)
    except ValueError as exc:  # e.g. more digits than int() accepts
        raise CollectorError(f"{what}: expected an integer, got {_excerpt(text)}") from exc
    if minimum is not None and value < minimum:
        raise CollectorError(f"{what}: {value} is below {minimum}")
    return value


def _parse_float(word: str, what: str) -> float:
    try:
        value = float(word)
    except ValueError as exc:
        raise CollectorError(f"{what}: expected a number, got {_excerpt(word)}") from exc
    if not math.isfinite(value):
        raise CollectorError(f"{what}: {word!r} is not finite")
    return value


def _excerpt(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_flat_keyed(text: str, what: str) -> dict[str, int]:
    """A "key value" per line file (cpu.stat, memory.stat, cpuacct.stat)."""
    result: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CollectorError(
                f"{what} line {number}: expected 'key value', got {_excerpt(line)}"
            )
        result[parts[0]] = parse_int(parts[1], f"{what} {parts[0]}")
    return result


# ---------------------------------------------------------------------------------------------
# /proc/stat


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Aggregate CPU time in clock ticks (USER_HZ) since boot."""

    busy: int
    """user + nice + system + irq + softirq + steal (guest time is already inside user/nice)."""
    idle: int
    """idle + iowait: time the CPUs could have run something."""

    @property
    def total(self) -> int:
        return self.busy + self.idle


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What the host collector needs from /proc/stat."""

    cpu: CpuTimes
    ncpu: int
    """Logical CPUs: the number of ``cpuN`` lines."""


def parse_proc_stat(text: str) -> ProcStat:
    """Parse /proc/stat: the aggregate ``cpu`` line and the count of ``cpuN`` lines."""
    aggregate: CpuTimes | None = None
    ncpu = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("cpu"):
            continue
        label = parts[0]
        if label == "cpu":
            fields = [parse_int(p, f"/proc/stat cpu field {i}") for i, p in enumerate(parts[1:])]
            if len(fields) < 4:
                raise CollectorError(f"/proc/stat: cpu line has {len(fields)} fields, need >= 4")
            # user nice system idle iowait irq softirq steal [guest guest_nice]
            user, nice, system, idle = fields[:4]
            iowait, irq, softirq, steal = [*fields[4:8], 0, 0, 0, 0][:4]
            aggregate = CpuTimes(
                busy=user + nice + system + irq + softirq + steal, idle=idle + iowait
            )
        elif label[3:].isdigit():
            ncpu += 1
        else:
            raise CollectorError(f"/proc/stat: unexpected cpu label {_excerpt(label)}")
    if aggregate is None:
        raise CollectorError("/proc/stat: no aggregate 'cpu' line")
    if ncpu == 0:
        raise CollectorError("/proc/stat: no per-CPU 'cpuN' lines")
    return ProcStat(cpu=aggregate, ncpu=ncpu)


def cpu_utilisation(prev: CpuTimes, cur: CpuTimes) -> float:
    """Busy share of the CPU time elapsed between two /proc/stat readings, in [0, 1].

    Raises CollectorError when no time elapsed or the counters went backwards (a different boot,
    a checkpoint/restore): the caller re-primes. iowait alone may step back a little on NO_HZ
    kernels; that is absorbed by clamping the busy delta, not treated as a reset.
    """
    d_total = cur.total - prev.total
    if d_total <= 0:
        raise CollectorError(
            f"/proc/stat: CPU time did not advance ({prev.total} -> {cur.total} ticks)"
        )
    d_busy = cur.busy - prev.busy
    return min(1.0, max(0.0, d_busy / d_total))


# ---------------------------------------------------------------------------------------------
# /proc/meminfo, /proc/loadavg


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into bytes (``kB`` values are multiplied by 1024; counts are kept)."""
    result: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not key.strip() or not parts or len(parts) > 2:
            raise CollectorError(f"/proc/meminfo line {number}: malformed {_excerpt(line)}")
        value = parse_int(parts[0], f"/proc/meminfo {key}")
        if len(parts) == 2:
            if parts[1] != "kB":
                raise CollectorError(f"/proc/meminfo {key}: unknown unit {_excerpt(parts[1])}")
            value *= 1024
        result[key.strip()] = value
    return result


def host_working_set(meminfo: dict[str, int]) -> tuple[int, int]:
    """(MemTotal, working set) in bytes, the way kubelet/cAdvisor compute it for the node.

    usage = MemTotal - MemFree; working set = usage - Inactive(file), never below zero.
    """
    try:
        total = meminfo["MemTotal"]
        free = meminfo["MemFree"]
    except KeyError as exc:
        raise CollectorError(f"/proc/meminfo: no {exc.args[0]}") from exc
    if total <= 0:
        raise CollectorError("/proc/meminfo: MemTotal is 0")
    if free > total:
        raise CollectorError(f"/proc/meminfo: MemFree {free} exceeds MemTotal {total}")
    inactive_file = meminfo.get("Inactive(file)", 0)
    return total, max(0, total - free - inactive_file)


def parse_loadavg(text: str) -> float:
    """The 1-minute load average from /proc/loadavg."""
    parts = text.split()
    if len(parts) < 3:
        raise CollectorError(f"/proc/loadavg: malformed {_excerpt(text)}")
    value = _parse_float(parts[0], "/proc/loadavg")
    if value < 0:
        raise CollectorError(f"/proc/loadavg: negative load {value}")
    return value


# ---------------------------------------------------------------------------------------------
# PSI


def parse_psi(text: str) -> PressureReading:
    """Parse /proc/pressure/{cpu,memory,io} (or a cgroup's *.pressure).

    ``some`` is required; ``full`` is optional (system-wide cpu has no ``full`` line before Linux
    5.13). Values are percentages in [0, 100] as the kernel reports them.
    """
    values: dict[str, float] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        kind = parts[0]
        if kind not in ("some", "full"):
            raise CollectorError(f"PSI line {number}: unknown kind {_excerpt(kind)}")
        fields: dict[str, str] = {}
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise CollectorError(f"PSI line {number}: malformed field {_excerpt(item)}")
            fields[key] = value
        for window in ("avg10", "avg60"):
            if window not in fields:
                raise CollectorError(f"PSI line {number}: no {window}")
            value_ = _parse_float(fields[window], f"PSI {kind} {window}")
            if not 0.0 <= value_ <= 100.0:
                raise CollectorError(f"PSI {kind} {window}: {value_} is not a percentage")
            values[f"{kind}_{window}"] = value_
    if "some_avg10" not in values:
        raise CollectorError("PSI: no 'some' line")
    return PressureReading(
        some_avg10=values["some_avg10"],
        some_avg60=values["some_avg60"],
        full_avg10=values.get("full_avg10"),
        full_avg60=values.get("full_avg60"),
    )


# ---------------------------------------------------------------------------------------------
# cgroups


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    """One line of /proc/<pid>/cgroup: ``hierarchy-id:controllers:path``."""

    hierarchy: int
    controllers: tuple[str, ...]
    """Empty for the cgroup v2 unified hierarchy (``0::/path``)."""
    path: str


def parse_proc_self_cgroup(text: str) -> list[CgroupEntry]:
    """Parse /proc/self/cgroup (v1, v2 or hybrid)."""
    entries: list[CgroupEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            raise CollectorError(f"/proc/self/cgroup line {number}: malformed {_excerpt(line)}")
        hierarchy = parse_int(parts[0], "/proc/self/cgroup hierarchy id")
        controllers = tuple(c for c in parts[1].split(",") if c)
        entries.append(CgroupEntry(hierarchy=hierarchy, controllers=controllers, path=parts[2]))
    if not entries:
        raise CollectorError("/proc/self/cgroup: empty")
    return entries


def parse_cgroup_v2_memory_max(text: str) -> int | None:
    """cgroup v2 ``memory.max``: bytes, or None for ``max`` (and absurdly large values)."""
    word = text.strip()
    if word == "max":
        return None
    value = parse_int(word, "memory.max")
    return None if value >= UNLIMITED_THRESHOLD else value


def parse_cgroup_v2_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``$QUOTA $PERIOD``): cores, or None for ``max``.

    ``"200000 100000"`` is 2 cores, ``"max 100000"`` is unlimited. A lone quota uses the kernel's
    default period of 100000 us.
    """
    parts = text.split()
    if not 1 <= len(parts) <= 2:
        raise CollectorError(f"cpu.max: malformed {_excerpt(text)}")
    period = parse_int(parts[1], "cpu.max period", minimum=1) if len(parts) == 2 else 100_000
    if parts[0] == "max":
        return None
    quota = parse_int(parts[0], "cpu.max quota", minimum=1)
    return quota / period


def parse_cpu_stat(text: str) -> dict[str, int]:
    """cgroup ``cpu.stat`` (v1 or v2): every ``key value`` counter.

    The throttling counters are ``nr_periods`` and ``nr_throttled`` in both versions; v2 adds
    ``usage_usec``. A cgroup without the CPU controller has no throttling keys.
    """
    return parse_flat_keyed(text, "cpu.stat")


def parse_cgroup_v1_memory_limit(text: str) -> int | None:
    """cgroup v1 ``memory.limit_in_bytes``: bytes, or None when unlimited.

    Unlimited shows as PAGE_COUNTER_MAX (e.g. 9223372036854771712); -1 is accepted too.
    """
    word = text.strip()
    if word == "-1":
        return None
    value = parse_int(word, "memory.limit_in_bytes")
    return None if value >= UNLIMITED_THRESHOLD else value


def parse_cgroup_v1_cfs_quota(text: str) -> int | None:
    """cgroup v1 ``cpu.cfs_quota_us``: microseconds per period, or None for -1 (unlimited)."""
    value = parse_int(text, "cpu.cfs_quota_us", minimum=-1)
    if value == -1:
        return None
    if value == 0:
        raise CollectorError("cpu.cfs_quota_us: 0 is not a valid quota")
    return value


def parse_cgroup_v1_cfs_period(text: str) -> int:
    """cgroup v1 ``cpu.cfs_period_us``: microseconds, at least 1."""
    return parse_int(text, "cpu.cfs_period_us", minimum=1)


def parse_cgroup_v1_cpu_limit(quota_text: str, period_text: str) -> float | None:
    """Cores from ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None when unlimited."""
    quota = parse_cgroup_v1_cfs_quota(quota_text)
    period = parse_cgroup_v1_cfs_period(period_text)
    return None if quota is None else quota / period


# ---------------------------------------------------------------------------------------------
# Counters


def counter_delta(prev: int, cur: int) -> int | None:
    """The increase of a monotonic kernel counter between two readings, or None for a reset.

    A counter that went down either wrapped or was reset (device re-created, driver reloaded).
    The width is inferred from the previous value: below 2**32 it may be a 32-bit counter
    (io_ticks and the *_ticks columns of diskstats are printed as unsigned int, some NIC drivers
    keep 32-bit stats), otherwise 64-bit. The wrapped delta is accepted only when it is less than
    half the counter's range: no counter advances by 2**31 in one sampling interval, so a larger
    apparent jump is a reset, and the caller re-primes instead of inventing a huge rate.
    """
    if cur >= prev:
        return cur - prev
    width = 32 if prev < 2**32 else 64
    wrapped = cur + 2**width - prev
    return wrapped if wrapped < 2 ** (width - 1) else None


# ---------------------------------------------------------------------------------------------
# /proc/diskstats


@dataclass(frozen=True, slots=True)
class DiskStats:
    """Counters of one block device from /proc/diskstats (kernel 4.18+ columns optional)."""

    major: int
    minor: int
    name: str
    reads: int
    read_sectors: int
    read_ms: int
    writes: int
    write_sectors: int
    write_ms: int
    in_flight: int
    io_ms: int
    """Milliseconds the device had I/O in flight (io_ticks): the busy time."""
    discards: int = 0
    discard_ms: int = 0

    @property
    def ios(self) -> int:
        return self.reads + self.writes + self.discards

    @property
    def wait_ms(self) -> int:
        return self.read_ms + self.write_ms + self.discard_ms


def parse_diskstats(text: str) -> dict[str, DiskStats]:
    """Parse /proc/diskstats: 14 columns (before 4.18), 18 (discards) or 20 (flushes)."""
    result: dict[str, DiskStats] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 14:
            raise CollectorError(
                f"/proc/diskstats line {number}: {len(parts)} columns, need >= 14: {_excerpt(line)}"
            )
        name = parts[2]
        values = [
            parse_int(p, f"/proc/diskstats {name} column {i + 4}") for i, p in enumerate(parts[3:])
        ]
        major = parse_int(parts[0], "/proc/diskstats major")
        minor = parse_int(parts[1], "/proc/diskstats minor")
        discards = values[11] if len(values) >= 15 else 0
        discard_ms = values[14] if len(values) >= 15 else 0
        result[name] = DiskStats(
            major=major,
            minor=minor,
            name=name,
            reads=values[0],
            read_sectors=values[2],
            read_ms=values[3],
            writes=values[4],
            write_sectors=values[6],
            write_ms=values[7],
            in_flight=values[8],
            io_ms=values[9],
            discards=discards,
            discard_ms=discard_ms,
        )
    return result


# ---------------------------------------------------------------------------------------------
# /proc/net/dev


@dataclass(frozen=True, slots=True)
class NetDevStats:
    """Counters of one interface from /proc/net/dev."""

    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_drops: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_drops: int


def parse_net_dev(text: str) -> dict[str, NetDevStats]:
    """Parse /proc/net/dev (two header lines, then ``iface: 8 rx and 8 tx columns``)."""
    result: dict[str, NetDevStats] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if "|" in line or not line.strip():
            continue  # the two header lines
        name, sep, rest = line.partition(":")
        name = name.strip()
        parts = rest.split()
        if not sep or not name or len(parts) != 16:
            raise CollectorError(f"/proc/net/dev line {number}: malformed {_excerpt(line)}")
        v = [parse_int(p, f"/proc/net/dev {name} column {i + 1}") for i, p in enumerate(parts)]
        result[name] = NetDevStats(
            rx_bytes=v[0],
            rx_packets=v[1],
            rx_errors=v[2],
            rx_drops=v[3],
            tx_bytes=v[8],
            tx_packets=v[9],
            tx_errors=v[10],
            tx_drops=v[11],
        )
    if not result:
        raise CollectorError("/proc/net/dev: no interfaces")
    return result
