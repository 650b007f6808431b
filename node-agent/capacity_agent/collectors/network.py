"""The network substrate: interface traffic from /proc/net/dev deltas against link speed.

Interfaces measured (unless ``interfaces`` names them explicitly): every interface in
/proc/net/dev except ``lo`` and those whose ``<sys>/class/net/<if>/operstate`` is ``down``. Unless
``include_virtual`` is set, and when ``<sys>/class/net`` exists, only interfaces with a
``device`` link are kept (physical NICs, the rule node-feature-discovery uses): veth pairs,
bridges, tunnels and ifb carry traffic that is also counted on a physical NIC, and their
"speed" means nothing.

/proc/net/dev is per network namespace: ``<proc>/net/dev`` is the namespace of the reading
process. A pod without ``hostNetwork`` reading the host's /proc mount should pass ``netns_pid=1``
to read ``<proc>/1/net/dev``, the host's namespace.

Link speed comes from ``<sys>/class/net/<if>/speed`` in Mb/s. -1, 0, absurd values, a missing
file or one that cannot be read (EINVAL on virtio and virtual devices) mean unknown; the
collector then uses ``default_speed_mbps`` (1 Gb/s) and records ``raw["<if>.speed_known"] = 0``.

Signals (in [0, 1]): ``rx`` and ``tx`` are the largest receive / transmit utilisation of any
interface (bytes/s over link speed); ``drops`` and ``errors`` are dropped and errored packets over
all packets handled (0 when none moved). The load is max(rx, tx). Capacity ``network-bandwidth``
is the sum of the link speeds in bytes/s.

First sample and counter wraps behave as in the storage collector: the first call primes and
raises :class:`PrimingError`; a counter that went down is taken as a 32- or 64-bit wrap when
plausible (:func:`counter_delta`), otherwise the interface was reset and the sample is skipped with
a CollectorError while the collector re-primes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.procfs import (
    Baseline,
    NetDevStats,
    counter_delta,
    is_dir,
    parse_net_dev,
    path_exists,
    read_optional,
    read_text,
)
from capacity_api.models import Substrate

__all__ = ["MAX_SPEED_MBPS", "NetworkCollector"]

MAX_SPEED_MBPS = 10_000_000
"""Speeds above 10 Tb/s are driver garbage (e.g. SPEED_UNKNOWN as an unsigned int)."""


class NetworkCollector(Collector):
    """Receive/transmit utilisation, drops and errors per interface (see the module docstring)."""

    substrate = Substrate.NETWORK

    def __init__(
        self,
        paths: HostPaths | None = None,
        *,
        interfaces: Sequence[str] | None = None,
        include_virtual: bool = False,
        default_speed_mbps: float = 1000.0,
        netns_pid: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if default_speed_mbps <= 0:
            raise ValueError("default_speed_mbps must be positive")
        self.paths = paths or HostPaths()
        self.interfaces = None if interfaces is None else tuple(interfaces)
        self.include_virtual = include_virtual
        self.default_speed_mbps = default_speed_mbps
        self.netns_pid = netns_pid
        self.clock = clock
        self._baseline: Baseline[NetDevStats] = Baseline("network")

    # -- Collector -----------------------------------------------------------------------------

    def present(self) -> bool:
        try:
            return bool(self._read())
        except CollectorError:
            return False

    def capacity(self) -> dict[str, str]:
        total = sum(self.link_speed(name)[0] for name in self._read())
        return {"network-bandwidth": str(round(total))}

    def sample(self) -> Sample:
        now = self.clock()
        current = self._read()
        if not current:
            raise CollectorError(f"network: no interfaces to measure in {self._net_dev_path()}")
        elapsed, pairs = self._baseline.advance(now, current)

        raw: dict[str, float] = {}
        rx_max = tx_max = 0.0
        packets = drops = errors = 0
        for name, old, cur in pairs:
            deltas = _deltas(old, cur)
            if deltas is None:
                raise CollectorError(f"network: counters of {name} were reset; re-primed")
            rx_bytes, tx_bytes, d_packets, d_drops, d_errors = deltas
            speed, known = self.link_speed(name)
            rx_rate, tx_rate = rx_bytes / elapsed, tx_bytes / elapsed
            rx_util, tx_util = min(1.0, rx_rate / speed), min(1.0, tx_rate / speed)
            raw[f"{name}.rx_bytes_per_s"] = rx_rate
            raw[f"{name}.tx_bytes_per_s"] = tx_rate
            raw[f"{name}.drops_per_s"] = d_drops / elapsed
            raw[f"{name}.errors_per_s"] = d_errors / elapsed
            raw[f"{name}.speed_bytes_per_s"] = speed
            raw[f"{name}.speed_known"] = 1.0 if known else 0.0
            rx_max, tx_max = max(rx_max, rx_util), max(tx_max, tx_util)
            packets += d_packets
            drops += d_drops
            errors += d_errors
        raw["interfaces"] = float(len(pairs))
        raw["elapsed_s"] = elapsed
        handled = packets + drops + errors
        signals = {
            "rx": rx_max,
            "tx": tx_max,
            "drops": drops / handled if handled else 0.0,
            "errors": errors / handled if handled else 0.0,
        }
        return Sample(
            substrate=self.substrate, time=now, load=max(rx_max, tx_max), signals=signals, raw=raw
        )

    # -- helpers -------------------------------------------------------------------------------

    def measured_interfaces(self) -> list[str]:
        """The interfaces a sample would measure now (raises CollectorError when unreadable)."""
        return sorted(self._read())

    def link_speed(self, name: str) -> tuple[float, bool]:
        """(bytes/s, known): the link speed from sysfs, or the default when unknown."""
        speed_mbps: int | None = None
        try:
            text = read_optional(self.paths.sys_path("class", "net", name, "speed"))
        except CollectorError:
            text = None  # e.g. permission denied: the speed is unknown, traffic is still read
        if text is not None:
            word = text.strip()
            if word.lstrip("-").isdigit() and word.isascii():
                value = int(word)
                if 0 < value <= MAX_SPEED_MBPS:
                    speed_mbps = value
        if speed_mbps is None:
            return self.default_speed_mbps * 1e6 / 8, False
        return speed_mbps * 1e6 / 8, True

    def _net_dev_path(self) -> Path:
        if self.netns_pid is None:
            return self.paths.proc_path("net", "dev")
        return self.paths.proc_path(str(self.netns_pid), "net", "dev")

    def _read(self) -> dict[str, NetDevStats]:
        stats = parse_net_dev(read_text(self._net_dev_path()))
        return {name: s for name, s in stats.items() if self._selected(name)}

    def _selected(self, name: str) -> bool:
        if self.interfaces is not None:
            return name in self.interfaces
        if name == "lo":
            return False
        class_net = self.paths.sys_path("class", "net")
        if not is_dir(class_net):
            return True
        try:
            operstate = read_optional(class_net / name / "operstate")
        except CollectorError:
            operstate = None
        if operstate is not None and operstate.strip() == "down":
            return False
        return self.include_virtual or path_exists(class_net / name / "device")


def _deltas(old: NetDevStats, cur: NetDevStats) -> tuple[int, int, int, int, int] | None:
    """(rx bytes, tx bytes, packets, drops, errors) between two readings; None on reset."""
    values = []
    for field in (
        "rx_bytes",
        "tx_bytes",
        "rx_packets",
        "tx_packets",
        "rx_drops",
        "tx_drops",
        "rx_errors",
        "tx_errors",
    ):
        delta = counter_delta(getattr(old, field), getattr(cur, field))
        if delta is None:
            return None
        values.append(delta)
    rx_bytes, tx_bytes, rx_packets, tx_packets, rx_drops, tx_drops, rx_errors, tx_errors = values
    return rx_bytes, tx_bytes, rx_packets + tx_packets, rx_drops + tx_drops, rx_errors + tx_errors
