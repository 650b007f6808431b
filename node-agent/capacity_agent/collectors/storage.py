"""The storage substrate: block device I/O from /proc/diskstats deltas.

Devices measured (unless ``devices`` names them explicitly): whole physical disks. When
``<sys>/block`` exists, a device counts when it is listed there (so partitions, which live under
their disk, are excluded and never double-counted) and has a ``device`` link (a real backing
device: loop, ram, zram, device-mapper and md arrays are virtual and have none; their I/O reaches
a physical disk anyway). Without ``<sys>/block`` (a bare fixture, an unusual mount) the names are
filtered instead: loop*, ram*, zram*, dm-*, md*, sr*, fd* and partitions (sda1, nvme0n1p1,
mmcblk0p1, vda1, ...) are skipped. ``sr`` (optical) and ``fd`` are always skipped.

Signals (in [0, 1]): ``busy`` is the largest busy fraction of any device (io_ticks delta over the
elapsed wall time, what iostat calls %util); ``iops`` is the summed operations per second over
``nominal_iops``; ``throughput`` is the summed read+write bytes per second over
``nominal_throughput``. The load is ``busy``. ``raw`` keeps per-device and total bytes/s, IOPS,
await (ms per completed I/O, as iostat) and busy.

First sample: rates need two readings; the first :meth:`StorageCollector.sample` stores the
baseline and raises :class:`PrimingError`. Counter wraps: a counter that went down is taken as
wrapped at 2**32 (previous value below 2**32) or 2**64 when the wrapped increase is plausible (see
:func:`counter_delta`); otherwise the device was reset, and the sample is skipped with a
CollectorError and the collector re-primes: one lost sample, never an invented or zero rate. A
device that appears between two readings joins from the next sample on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.procfs import (
    SECTOR_BYTES,
    Baseline,
    DiskStats,
    counter_delta,
    is_dir,
    parse_diskstats,
    path_exists,
    read_text,
)
from capacity_api.models import Substrate

__all__ = ["StorageCollector", "is_physical_disk_name"]

_ALWAYS_SKIPPED = ("loop", "ram", "zram", "sr", "fd")
_VIRTUAL_PREFIXES = (*_ALWAYS_SKIPPED, "dm-", "md", "nbd")
_PARTITION = re.compile(
    r"^(?:(?:[shv]|xv)d[a-z]+\d+|(?:nvme\d+n\d+|mmcblk\d+|nbd\d+|loop\d+|md\d+)p\d+)$"
)


def is_physical_disk_name(name: str) -> bool:
    """Name-only guess used when sysfs is not available: no virtual devices, no partitions."""
    return not name.startswith(_VIRTUAL_PREFIXES) and not _PARTITION.match(name)


class StorageCollector(Collector):
    """Block device throughput, IOPS, await and busy fraction (see the module docstring)."""

    substrate = Substrate.STORAGE

    def __init__(
        self,
        paths: HostPaths | None = None,
        *,
        devices: Sequence[str] | None = None,
        nominal_iops: float = 10_000.0,
        nominal_throughput: float = 500e6,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if nominal_iops <= 0 or nominal_throughput <= 0:
            raise ValueError("nominal_iops and nominal_throughput must be positive")
        self.paths = paths or HostPaths()
        self.devices = None if devices is None else tuple(devices)
        self.nominal_iops = nominal_iops
        """The node's sustained IOPS capacity (all measured devices together)."""
        self.nominal_throughput = nominal_throughput
        """The node's sustained read+write bandwidth in bytes/s."""
        self.clock = clock
        self._baseline: Baseline[DiskStats] = Baseline("storage")

    # -- Collector -----------------------------------------------------------------------------

    def present(self) -> bool:
        try:
            return bool(self._read())
        except CollectorError:
            return False

    def capacity(self) -> dict[str, str]:
        return {"storage-iops": str(round(self.nominal_iops))}

    def sample(self) -> Sample:
        now = self.clock()
        current = self._read()
        if not current:
            raise CollectorError(
                f"storage: no block devices in {self.paths.proc_path('diskstats')}"
            )
        elapsed, pairs = self._baseline.advance(now, current)

        raw: dict[str, float] = {}
        busy_max = 0.0
        total_ios = total_read = total_write = total_wait = 0
        for name, old, cur in pairs:
            deltas = _deltas(old, cur)
            if deltas is None:
                raise CollectorError(f"storage: counters of {name} were reset; re-primed")
            ios, read_bytes, write_bytes, wait_ms, io_ms = deltas
            busy = min(1.0, io_ms / (elapsed * 1000.0))
            raw[f"{name}.read_bytes_per_s"] = read_bytes / elapsed
            raw[f"{name}.write_bytes_per_s"] = write_bytes / elapsed
            raw[f"{name}.iops"] = ios / elapsed
            raw[f"{name}.await_ms"] = wait_ms / ios if ios else 0.0
            raw[f"{name}.busy"] = busy
            busy_max = max(busy_max, busy)
            total_ios += ios
            total_read += read_bytes
            total_write += write_bytes
            total_wait += wait_ms

        iops = total_ios / elapsed
        throughput = (total_read + total_write) / elapsed
        raw.update(
            {
                "devices": float(len(pairs)),
                "read_bytes_per_s": total_read / elapsed,
                "write_bytes_per_s": total_write / elapsed,
                "iops": iops,
                "await_ms": total_wait / total_ios if total_ios else 0.0,
                "elapsed_s": elapsed,
            }
        )
        signals = {
            "busy": busy_max,
            "iops": min(1.0, iops / self.nominal_iops),
            "throughput": min(1.0, throughput / self.nominal_throughput),
        }
        return Sample(substrate=self.substrate, time=now, load=busy_max, signals=signals, raw=raw)

    def measured_devices(self) -> list[str]:
        """The devices a sample would measure now (raises CollectorError when unreadable)."""
        return sorted(self._read())

    # -- helpers -------------------------------------------------------------------------------

    def _read(self) -> dict[str, DiskStats]:
        stats = parse_diskstats(read_text(self.paths.proc_path("diskstats")))
        return {name: s for name, s in stats.items() if self._selected(name)}

    def _selected(self, name: str) -> bool:
        if self.devices is not None:
            return name in self.devices
        if name.startswith(_ALWAYS_SKIPPED):
            return False
        block = self.paths.sys_path("block")
        if is_dir(block):
            return path_exists(block / name / "device")
        return is_physical_disk_name(name)


def _deltas(old: DiskStats, cur: DiskStats) -> tuple[int, int, int, int, int] | None:
    """(ios, read bytes, written bytes, wait ms, busy ms) between two readings; None on reset."""
    values = []
    for before, after in (
        (old.reads, cur.reads),
        (old.writes, cur.writes),
        (old.discards, cur.discards),
        (old.read_sectors, cur.read_sectors),
        (old.write_sectors, cur.write_sectors),
        (old.read_ms, cur.read_ms),
        (old.write_ms, cur.write_ms),
        (old.discard_ms, cur.discard_ms),
        (old.io_ms, cur.io_ms),
    ):
        delta = counter_delta(before, after)
        if delta is None:
            return None
        values.append(delta)
    reads, writes, discards, rsect, wsect, rms, wms, dms, io_ms = values
    return (
        reads + writes + discards,
        rsect * SECTOR_BYTES,
        wsect * SECTOR_BYTES,
        rms + wms + dms,
        io_ms,
    )
