"""The host substrate: CPU, memory working set, PSI and cgroup limits, from procfs and cgroupfs.

Everything is read through :class:`HostPaths`, so the collector works on the host's /proc and /sys
mounted read-only under another prefix, and on fixture trees in tests.

Signals (all in [0, 1]):

- ``cpu``: busy share of CPU time between two /proc/stat readings, or, when the measured cgroup
  has a CPU quota, the larger of that and the cgroup's CPU usage over its quota.
- ``memory``: working set over the effective limit, the worse of two scopes: the host
  (MemTotal - MemFree - Inactive(file) over MemTotal, as kubelet computes the node working set)
  and, when a cgroup memory limit applies, the limiting cgroup (usage - inactive_file over its
  limit). The effective limit reported as capacity is min(MemTotal, cgroup limit).
- ``psi_cpu``, ``psi_memory``, ``psi_io``: ``some avg10`` / 100 from /proc/pressure/*. A missing
  PSI file (kernel without PSI, psi=0) or one with garbage content leaves that signal out and its
  pressure reading None; garbage is counted in :attr:`HostCollector.warnings`. A left-out signal
  is unknown, never zero.
- ``load1``: 1-minute load average over logical CPUs, clamped to 1.

The load is max(cpu, memory). CPU pressure is reported together with cgroup throttling: the share
of CFS periods throttled between the two readings goes to ``CgroupLimits.cpu_throttled_fraction``
(and ``raw["cpu_throttled_fraction"]``), because throttling inflates PSI cpu.

First sample: CPU utilisation needs two readings. The first :meth:`HostCollector.sample` stores the
baseline and raises :class:`PrimingError` (a CollectorError), so the agent skips it exactly like
any failed reading; every later call returns a sample over the time since the previous call.
Counters that go backwards (a restore, a different boot) raise CollectorError and re-prime.

Which cgroup: ``cgroup_path=None`` (default) is the agent's own cgroup from
``<proc>/self/cgroup``, resolved under ``<sys>/fs/cgroup`` (per controller on cgroup v1); a path
that does not exist there (the agent sees another cgroup namespace than the mounted hierarchy)
falls back to the hierarchy root. ``cgroup_path="/"`` measures the root, any other absolute path
that cgroup. Limits are the tightest along the path from the cgroup up to the root. cgroup v2 is
detected by ``<sys>/fs/cgroup/cgroup.controllers``; otherwise v1 controller directories are used
(hybrid hosts, where v2 is mounted at ``unified/`` without controllers, count as v1). Without any
cgroup hierarchy the limits are None and only the host scope is measured.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.procfs import (
    CpuTimes,
    PrimingError,
    cpu_utilisation,
    host_working_set,
    is_dir,
    parse_cgroup_v1_cpu_limit,
    parse_cgroup_v1_memory_limit,
    parse_cgroup_v2_cpu_max,
    parse_cgroup_v2_memory_max,
    parse_cpu_stat,
    parse_flat_keyed,
    parse_int,
    parse_loadavg,
    parse_meminfo,
    parse_proc_self_cgroup,
    parse_proc_stat,
    parse_psi,
    path_exists,
    read_optional,
    read_text,
)
from capacity_api.models import CgroupLimits, Geometry, PressureReading, Substrate

__all__ = ["PSI_RESOURCES", "CgroupScope", "HostCollector", "format_cores", "resolve_cgroup"]

log = logging.getLogger(__name__)

PSI_RESOURCES = ("cpu", "memory", "io")

_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
_V1_CPUACCT_DIRS = ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")


# ---------------------------------------------------------------------------------------------
# cgroup resolution


@dataclass(frozen=True, slots=True)
class CgroupScope:
    """The measured cgroup: its directories per controller and the mount roots above them."""

    version: int
    memory_dir: Path | None
    memory_root: Path | None
    cpu_dir: Path | None
    cpu_root: Path | None
    cpuacct_dir: Path | None
    """cgroup v1 only: where ``cpuacct.usage`` lives (v2 keeps usage in ``cpu.stat``)."""
    cpuacct_root: Path | None


def _existing(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        candidate = root / name
        if is_dir(candidate):
            return candidate
    return None


def _under(mount: Path, cgroup: str) -> Path:
    """``cgroup`` resolved under ``mount``; the mount root when it does not exist there."""
    parts = [p for p in cgroup.split("/") if p and p not in (".", "..")]
    candidate = mount.joinpath(*parts)
    return candidate if is_dir(candidate) else mount


def resolve_cgroup(paths: HostPaths, cgroup_path: str | None) -> CgroupScope | None:
    """Find the cgroup to measure (see the module docstring); None without a cgroup hierarchy."""
    root = paths.cgroup_root
    own: dict[str, str] = {}
    if cgroup_path is None:
        text = read_optional(paths.proc_path("self", "cgroup"))
        if text is not None:
            for entry in parse_proc_self_cgroup(text):
                if not entry.controllers:
                    own.setdefault("", entry.path)
                for controller in entry.controllers:
                    own[controller] = entry.path

    def path_for(controller: str) -> str:
        if cgroup_path is not None:
            return cgroup_path
        return own.get(controller, "/")

    if path_exists(root / "cgroup.controllers"):
        cgroup_dir = _under(root, path_for(""))
        return CgroupScope(
            version=2,
            memory_dir=cgroup_dir,
            memory_root=root,
            cpu_dir=cgroup_dir,
            cpu_root=root,
            cpuacct_dir=None,
            cpuacct_root=None,
        )
    memory_root = _existing(root, ("memory",))
    cpu_root = _existing(root, _V1_CPU_DIRS)
    cpuacct_root = _existing(root, _V1_CPUACCT_DIRS)
    if memory_root is None and cpu_root is None:
        return None
    return CgroupScope(
        version=1,
        memory_dir=None if memory_root is None else _under(memory_root, path_for("memory")),
        memory_root=memory_root,
        cpu_dir=None if cpu_root is None else _under(cpu_root, path_for("cpu")),
        cpu_root=cpu_root,
        cpuacct_dir=None if cpuacct_root is None else _under(cpuacct_root, path_for("cpuacct")),
        cpuacct_root=cpuacct_root,
    )


def _ancestors(directory: Path, root: Path) -> list[Path]:
    """``directory`` and its parents up to and including ``root``."""
    chain = [directory]
    current = directory
    while current != root and root in current.parents:
        current = current.parent
        chain.append(current)
    return chain


def format_cores(cores: float) -> str:
    """Cores as a Kubernetes quantity: ``"2"``, or millicores such as ``"1500m"``."""
    millis = max(1, round(cores * 1000))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


# ---------------------------------------------------------------------------------------------
# One reading


@dataclass(frozen=True, slots=True)
class _MemoryLimit:
    limit: int
    usage_dir: Path


@dataclass(frozen=True, slots=True)
class _CpuLimit:
    cores: float
    quota_dir: Path


@dataclass(frozen=True, slots=True)
class _Counters:
    """The cumulative counters a delta is taken over."""

    time: float
    cpu: CpuTimes
    cgroup_usage_ns: int | None
    nr_periods: int | None
    nr_throttled: int | None


class HostCollector(Collector):
    """CPU, memory, PSI and cgroup limits of this node (see the module docstring)."""

    substrate = Substrate.HOST

    def __init__(
        self,
        paths: HostPaths | None = None,
        *,
        cgroup_path: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cgroup_path is not None and not cgroup_path.startswith("/"):
            raise ValueError(f"cgroup_path must be absolute, got {cgroup_path!r}")
        self.paths = paths or HostPaths()
        self.cgroup_path = cgroup_path
        self.clock = clock
        self.warnings: Counter[str] = Counter()
        """Problems that did not fail the sample (garbage PSI, unreadable loadavg), by kind."""
        self._scope: CgroupScope | None = None
        self._scope_resolved = False
        self._prev: _Counters | None = None

    # -- Collector -----------------------------------------------------------------------------

    def present(self) -> bool:
        try:
            parse_proc_stat(read_text(self.paths.proc_path("stat")))
            host_working_set(parse_meminfo(read_text(self.paths.proc_path("meminfo"))))
        except CollectorError:
            return False
        return True

    def geometry(self) -> Geometry:
        ncpu = parse_proc_stat(read_text(self.paths.proc_path("stat"))).ncpu
        return Geometry(units=ncpu)

    def capacity(self) -> dict[str, str]:
        ncpu = parse_proc_stat(read_text(self.paths.proc_path("stat"))).ncpu
        mem_total, _ = host_working_set(parse_meminfo(read_text(self.paths.proc_path("meminfo"))))
        scope = self.scope()
        memory_limit = self._memory_limit(scope)
        cpu_limit = self._cpu_limit(scope)
        cores = float(ncpu) if cpu_limit is None else min(float(ncpu), cpu_limit.cores)
        memory = mem_total if memory_limit is None else min(mem_total, memory_limit.limit)
        return {"cpu": format_cores(cores), "memory": str(memory)}

    def sample(self) -> Sample:
        now = self.clock()
        stat = parse_proc_stat(read_text(self.paths.proc_path("stat")))
        mem_total, host_ws = host_working_set(
            parse_meminfo(read_text(self.paths.proc_path("meminfo")))
        )
        scope = self.scope()
        memory_limit = self._memory_limit(scope)
        cpu_limit = self._cpu_limit(scope)
        usage_ns = cgroup_ws = None
        if scope is not None and cpu_limit is not None:
            usage_ns = self._cgroup_cpu_usage_ns(scope, cpu_limit)
        if scope is not None and memory_limit is not None:
            cgroup_ws = self._cgroup_working_set(scope, memory_limit)
        throttle = self._throttle_counters(scope, cpu_limit)
        pressure = {resource: self._psi(resource) for resource in PSI_RESOURCES}
        load1 = self._loadavg()

        counters = _Counters(
            time=now,
            cpu=stat.cpu,
            cgroup_usage_ns=usage_ns,
            nr_periods=None if throttle is None else throttle[0],
            nr_throttled=None if throttle is None else throttle[1],
        )
        prev, self._prev = self._prev, counters
        if prev is None:
            raise PrimingError("host: first reading stored as the CPU baseline")

        raw: dict[str, float] = {
            "ncpu": float(stat.ncpu),
            "memory_total_bytes": float(mem_total),
            "memory_working_set_bytes": float(host_ws),
        }
        cpu = _cpu_signal(prev, counters, cpu_limit, raw)
        throttled = _throttled_fraction(prev, counters)
        if throttled is not None:
            raw["cpu_throttled_fraction"] = throttled
        memory = _memory_signal(mem_total, host_ws, memory_limit, cgroup_ws, raw)

        signals = {"cpu": cpu, "memory": memory}
        for resource, reading in pressure.items():
            if reading is not None and reading.some_avg10 is not None:
                signals[f"psi_{resource}"] = min(1.0, reading.some_avg10 / 100.0)
        if load1 is not None:
            raw["loadavg1"] = load1
            signals["load1"] = min(1.0, load1 / stat.ncpu)

        limits = None
        if scope is not None:
            limits = CgroupLimits(
                version=scope.version,
                memory_limit_bytes=None if memory_limit is None else memory_limit.limit,
                cpu_limit_cores=None if cpu_limit is None else cpu_limit.cores,
                cpu_throttled_fraction=throttled,
            )
        present_pressure = {k: v for k, v in pressure.items() if v is not None}
        return Sample(
            substrate=self.substrate,
            time=now,
            load=max(cpu, memory),
            signals=signals,
            raw=raw,
            pressure=present_pressure or None,
            cgroup=limits,
        )

    # -- cgroup --------------------------------------------------------------------------------

    def scope(self) -> CgroupScope | None:
        """The measured cgroup, resolved on first use (None without a cgroup hierarchy)."""
        if not self._scope_resolved:
            self._scope = resolve_cgroup(self.paths, self.cgroup_path)
            self._scope_resolved = True
        return self._scope

    def _memory_limit(self, scope: CgroupScope | None) -> _MemoryLimit | None:
        """The tightest memory limit from the cgroup up to the root, and where it is set."""
        if scope is None or scope.memory_dir is None or scope.memory_root is None:
            return None
        best: _MemoryLimit | None = None
        for directory in _ancestors(scope.memory_dir, scope.memory_root):
            if scope.version == 2:
                text = read_optional(directory / "memory.max")
                limit = None if text is None else parse_cgroup_v2_memory_max(text)
            else:
                text = read_optional(directory / "memory.limit_in_bytes")
                limit = None if text is None else parse_cgroup_v1_memory_limit(text)
            if limit is not None and (best is None or limit < best.limit):
                best = _MemoryLimit(limit=limit, usage_dir=directory)
        return best

    def _cpu_limit(self, scope: CgroupScope | None) -> _CpuLimit | None:
        """The tightest CPU quota in cores from the cgroup up to the root, and where it is set."""
        if scope is None or scope.cpu_dir is None or scope.cpu_root is None:
            return None
        best: _CpuLimit | None = None
        for directory in _ancestors(scope.cpu_dir, scope.cpu_root):
            if scope.version == 2:
                text = read_optional(directory / "cpu.max")
                cores = None if text is None else parse_cgroup_v2_cpu_max(text)
            else:
                quota = read_optional(directory / "cpu.cfs_quota_us")
                period = read_optional(directory / "cpu.cfs_period_us")
                cores = (
                    None
                    if quota is None or period is None
                    else parse_cgroup_v1_cpu_limit(quota, period)
                )
            if cores is not None and (best is None or cores < best.cores):
                best = _CpuLimit(cores=cores, quota_dir=directory)
        return best

    def _cgroup_working_set(self, scope: CgroupScope, limit: _MemoryLimit) -> int:
        """usage - inactive_file of the cgroup holding the limit (kubelet's working set)."""
        usage_file, inactive_key = (
            ("memory.current", "inactive_file")
            if scope.version == 2
            else ("memory.usage_in_bytes", "total_inactive_file")
        )
        usage = parse_int(read_text(limit.usage_dir / usage_file), usage_file)
        stat_text = read_optional(limit.usage_dir / "memory.stat")
        stat = {} if stat_text is None else parse_flat_keyed(stat_text, "memory.stat")
        inactive = stat.get(inactive_key, stat.get("inactive_file", 0))
        return max(0, usage - inactive)

    def _cgroup_cpu_usage_ns(self, scope: CgroupScope, limit: _CpuLimit) -> int:
        """Cumulative CPU time of the cgroup holding the quota, in nanoseconds."""
        if scope.version == 2:
            stat = parse_cpu_stat(read_text(limit.quota_dir / "cpu.stat"))
            if "usage_usec" not in stat:
                raise CollectorError(f"{limit.quota_dir / 'cpu.stat'}: no usage_usec")
            return stat["usage_usec"] * 1000
        if scope.cpu_root is None or scope.cpuacct_root is None:
            raise CollectorError("host: CPU quota set but no cpuacct hierarchy to read usage from")
        relative = limit.quota_dir.relative_to(scope.cpu_root)
        usage_file = scope.cpuacct_root / relative / "cpuacct.usage"
        return parse_int(read_text(usage_file), "cpuacct.usage")

    def _throttle_counters(
        self, scope: CgroupScope | None, limit: _CpuLimit | None
    ) -> tuple[int, int] | None:
        """(nr_periods, nr_throttled) where the quota is set, else of the measured cgroup."""
        if scope is None or scope.cpu_dir is None:
            return None
        directory = scope.cpu_dir if limit is None else limit.quota_dir
        text = read_optional(directory / "cpu.stat")
        if text is None:
            return None
        stat = parse_cpu_stat(text)
        if "nr_periods" not in stat or "nr_throttled" not in stat:
            return None
        return stat["nr_periods"], stat["nr_throttled"]

    # -- PSI and load --------------------------------------------------------------------------

    def _psi(self, resource: str) -> PressureReading | None:
        path = self.paths.proc_path("pressure", resource)
        try:
            text = read_optional(path)
            return None if text is None else parse_psi(text)
        except CollectorError as exc:
            self._warn(f"psi_{resource}", f"{path}: {exc}; pressure left out")
            return None

    def _loadavg(self) -> float | None:
        path = self.paths.proc_path("loadavg")
        try:
            return parse_loadavg(read_text(path))
        except CollectorError as exc:
            self._warn("loadavg", f"{exc}; load1 left out")
            return None

    def _warn(self, kind: str, message: str) -> None:
        self.warnings[kind] += 1
        if self.warnings[kind] == 1:
            log.warning("host collector: %s (logged once, counted in warnings)", message)
        else:
            log.debug("host collector: %s", message)


def _cpu_signal(
    prev: _Counters, cur: _Counters, limit: _CpuLimit | None, raw: dict[str, float]
) -> float:
    """Host CPU utilisation, or the cgroup's usage over its quota when that is higher."""
    try:
        host_cpu = cpu_utilisation(prev.cpu, cur.cpu)
    except CollectorError as exc:
        raise CollectorError(f"host: {exc}; re-primed") from exc
    raw["cpu_host"] = host_cpu
    if limit is None:
        return host_cpu
    raw["cpu_limit_cores"] = limit.cores
    if cur.cgroup_usage_ns is None or prev.cgroup_usage_ns is None:
        return host_cpu  # the quota appeared since the last reading: no cgroup delta yet
    elapsed = cur.time - prev.time
    if elapsed <= 0:
        raise CollectorError(f"host: clock did not advance ({elapsed:.3f} s); re-primed")
    d_usage = cur.cgroup_usage_ns - prev.cgroup_usage_ns
    if d_usage < 0:
        raise CollectorError("host: cgroup CPU usage went backwards; re-primed")
    cgroup_cpu = min(1.0, d_usage / 1e9 / elapsed / limit.cores)
    raw["cpu_cgroup"] = cgroup_cpu
    return max(host_cpu, cgroup_cpu)


def _memory_signal(
    mem_total: int,
    host_ws: int,
    limit: _MemoryLimit | None,
    cgroup_ws: int | None,
    raw: dict[str, float],
) -> float:
    """The worse of host working set / MemTotal and cgroup working set / cgroup limit."""
    memory = host_ws / mem_total
    effective_limit = mem_total
    if limit is not None and cgroup_ws is not None:
        raw["cgroup_memory_limit_bytes"] = float(limit.limit)
        raw["cgroup_memory_working_set_bytes"] = float(cgroup_ws)
        effective_limit = min(mem_total, limit.limit)
        memory = max(memory, cgroup_ws / limit.limit) if limit.limit > 0 else 1.0
    raw["memory_limit_bytes"] = float(effective_limit)
    return min(1.0, memory)


def _throttled_fraction(prev: _Counters, cur: _Counters) -> float | None:
    """Share of CFS periods throttled between two readings (0 when no period ran)."""
    if (
        prev.nr_periods is None
        or prev.nr_throttled is None
        or cur.nr_periods is None
        or cur.nr_throttled is None
    ):
        return None
    d_periods = cur.nr_periods - prev.nr_periods
    d_throttled = cur.nr_throttled - prev.nr_throttled
    if d_periods < 0 or d_throttled < 0:
        return None  # the quota moved to another cgroup or the counters were reset
    if d_periods == 0:
        return 0.0
    return min(1.0, d_throttled / d_periods)
