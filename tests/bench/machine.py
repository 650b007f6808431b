"""What the machine did during a benchmark: CPU of every process that takes part, and the load.

A benchmark's figures depend on everything else on the same two cores (the API server, etcd,
the agents, the benchmark's own client). :class:`MachineSampler` records, over one measured
interval:

- the CPU seconds of each named group of processes (the local cluster's components from their
  pidfiles, the operator, the agents, the benchmark itself), as seconds and as a percent of one
  core averaged over the interval;
- the whole machine's busy share (all cores, from ``/proc/stat``) and the 1-minute load average,
  sampled every second (median and max);

so that a reader can tell a slow operator from a saturated machine.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil


def cluster_processes(state: Path) -> dict[str, list[psutil.Process]]:
    """The local cluster's processes by component, from the pidfiles in its state directory
    (containerd's shims counted together)."""
    found: dict[str, list[psutil.Process]] = {}
    for pidfile in sorted(state.glob("*.pid")):
        try:
            found[pidfile.stem] = [psutil.Process(int(pidfile.read_text()))]
        except (psutil.NoSuchProcess, ValueError):
            continue
    sock = str(state / "node" / "containerd" / "containerd.sock")
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and "containerd-shim" in cmdline[0] and sock in cmdline:
            found.setdefault("containerd-shims", []).append(proc)
    return found


def _cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue  # gone: its last reading stays in the total
        total += times.user + times.system + times.children_user + times.children_system
    return total


class MachineSampler(threading.Thread):
    """Start it before the measured interval, :meth:`stop` it after; :meth:`figures` says what
    each group and the machine used in between."""

    def __init__(self, groups: Mapping[str, Iterable[psutil.Process]], interval: float = 1.0):
        super().__init__(daemon=True)
        self.groups = {name: list(procs) for name, procs in groups.items()}
        self.interval = interval
        self._halt = threading.Event()
        self._last: dict[str, float] = {}
        self.load: list[float] = []
        self.busy: list[float] = []
        self._t0 = 0.0
        self._t1 = 0.0
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: _cpu_seconds(procs) for name, procs in self.groups.items()}
        self._last = dict(self._before)
        self._t0 = time.monotonic()
        super().start()

    def run(self) -> None:
        # busy share from /proc/stat deltas (psutil.cpu_percent keeps its last reading per
        # thread, and would measure from whatever another thread of this process did)
        last = psutil.cpu_times()
        while not self._halt.wait(self.interval):
            self.load.append(os.getloadavg()[0])
            now = psutil.cpu_times()
            total = sum(now) - sum(last)
            idle = (now.idle + getattr(now, "iowait", 0.0)) - (
                last.idle + getattr(last, "iowait", 0.0)
            )
            if total > 0:
                self.busy.append(100.0 * (1.0 - idle / total))
            last = now
            # a process that exits keeps what it used: remember its last reading
            for name, procs in self.groups.items():
                self._last[name] = max(self._last[name], _cpu_seconds(procs))

    def stop(self) -> None:
        for name, procs in self.groups.items():
            self._last[name] = max(self._last[name], _cpu_seconds(procs))
        self._t1 = time.monotonic()
        self._halt.set()
        self.join(timeout=5)

    def figures(self, per: int | None = None, per_name: str = "claim") -> dict[str, Any]:
        """CPU per group (seconds, % of one core, and per ``per`` units when given) and the
        machine's busy share and load over the interval."""
        seconds = max(1e-9, self._t1 - self._t0)
        groups: dict[str, Any] = {}
        for name in self.groups:
            used = self._last[name] - self._before[name]
            entry: dict[str, Any] = {
                "cpu_s": round(used, 2),
                "cpu_pct_of_core": round(100.0 * used / seconds, 1),
            }
            if per:
                entry[f"cpu_ms_per_{per_name}"] = round(1000.0 * used / per, 2)
            groups[name] = entry
        return {
            "interval_s": round(seconds, 1),
            "cpus": os.cpu_count(),
            "machine_busy_pct_median": _median(self.busy),
            "machine_busy_pct_max": _max(self.busy),
            "load_1m_median": _median(self.load),
            "load_1m_max": _max(self.load),
            "processes": groups,
        }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _max(values: list[float]) -> float | None:
    return round(max(values), 2) if values else None


def table(figures: Mapping[str, Any]) -> str:
    """The per-process CPU as printable lines."""
    lines = [
        f"  machine: {figures['cpus']} cores, busy median {figures['machine_busy_pct_median']} % "
        f"(max {figures['machine_busy_pct_max']} %), load 1m median {figures['load_1m_median']} "
        f"(max {figures['load_1m_max']}) over {figures['interval_s']} s"
    ]
    for name, entry in sorted(figures["processes"].items(), key=lambda kv: -kv[1]["cpu_s"]):
        extra = "".join(
            f", {v} {k.removeprefix('cpu_').replace('_', ' ')}"
            for k, v in entry.items()
            if k.startswith("cpu_ms_per_")
        )
        used, share = entry["cpu_s"], entry["cpu_pct_of_core"]
        lines.append(f"  {name:<24} {used:>8} cpu s {share:>6} % of a core{extra}")
    return "\n".join(lines)
