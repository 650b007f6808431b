"""Where the host's /proc and /sys are, as seen by the agent.

The DaemonSet mounts the host's ``/proc`` and ``/sys`` read-only under another prefix (for example
``/host/proc`` and ``/host/sys``, as node-feature-discovery does), and tests point both at fixture
trees under ``tmp_path``. Every collector builds its file paths through a :class:`HostPaths`, never
from a literal ``/proc`` or ``/sys``, and only ever opens them for reading.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PROC_ENV = "HOST_PROC"
"""Environment variable naming the host's /proc mount (the gopsutil/psutil convention)."""
SYS_ENV = "HOST_SYS"
"""Environment variable naming the host's /sys mount."""


@dataclass(frozen=True, slots=True)
class HostPaths:
    """Roots of the host's procfs and sysfs."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HostPaths:
        """Paths from ``HOST_PROC`` / ``HOST_SYS``, defaulting to /proc and /sys."""
        env = os.environ if environ is None else environ
        return cls(proc=Path(env.get(PROC_ENV, "/proc")), sys=Path(env.get(SYS_ENV, "/sys")))

    def proc_path(self, *parts: str) -> Path:
        """A path under the host's /proc, e.g. ``proc_path("pressure", "cpu")``."""
        return self.proc.joinpath(*parts)

    def sys_path(self, *parts: str) -> Path:
        """A path under the host's /sys, e.g. ``sys_path("class", "net")``."""
        return self.sys.joinpath(*parts)

    @property
    def cgroup_root(self) -> Path:
        """The cgroup mount point, ``<sys>/fs/cgroup``."""
        return self.sys / "fs" / "cgroup"

    def cgroup_path(self, cgroup: str, controller: str | None = None) -> Path:
        """The directory of a cgroup given by its absolute path inside the hierarchy.

        ``controller`` names the cgroup v1 hierarchy directory (``memory``, ``cpu``, ...); it is
        ``None`` for the cgroup v2 unified hierarchy mounted at the root. ``..`` components are
        refused so that a hostile ``/proc/self/cgroup`` line cannot point outside the mount.
        """
        parts = [p for p in cgroup.split("/") if p and p != "."]
        if ".." in parts:
            raise ValueError(f"cgroup path {cgroup!r} must not contain '..'")
        base = self.cgroup_root if controller is None else self.cgroup_root / controller
        return base.joinpath(*parts)
