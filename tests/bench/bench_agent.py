"""Benchmark: what one live node agent costs, against the local control plane.

Runs ``python -m capacity_agent`` as its own process with every substrate present on this machine,
the default publish and lease intervals and a 1 s sampling interval, for ``BENCH_SECONDS`` (default
130: the 64-sample window fills after about 66 s, and the writes after that are the steady
state), and measures from outside:

- its CPU time (psutil, every second): median and p95 of the percent of one core;
- its resident memory: peak RSS in MiB, sampled every second and as the kernel's high-water mark
  (``VmHWM`` of /proc/<pid>/status, which also catches peaks between samples);
- CapacityNode writes, as resourceVersion changes seen by a watch on its object, per minute;
- Lease renewals, as resourceVersion changes seen by a watch on its Lease, per minute;
- its own counters from /metrics (publishes, cycles skipped as unchanged, renewals, errors).

Targets: <= 1 % of one core, <= 64 MiB RSS (what Node Feature Discovery's worker requests),
<= 6 CapacityNode writes per minute plus lease renewals. Prints the figures and writes them to
tests/bench/results/agent.json. Not a pass/fail test: it exits 0 whatever the figures are, 1 only
when the agent could not be run.

    python tests/bench/bench_agent.py          (or: make bench)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402 - after the path set-up, like every import below
from kubernetes import client, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

from capacity_api import GROUP, VERSION  # noqa: E402
from tests import kube  # noqa: E402

RESULTS = REPO / "tests" / "bench" / "results" / "agent.json"
WARM_UP = 5.0
"""Seconds of start-up (imports, discovery) left out of the CPU figures."""
CPU_WINDOW = 10
"""Seconds per CPU percentage (psutil's CPU times move in 10 ms ticks)."""
WINDOW_FILL = 66.0
"""Seconds until the 64-sample window is full at a 1 s interval (plus priming)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class VersionCounter:
    """Counts resourceVersion changes of one object through a watch, in a daemon thread."""

    def __init__(self, list_fn: Any, seconds: float, *args: Any, **kwargs: Any) -> None:
        self.changes: list[float] = []
        self._versions: set[str] = set()
        self._args = (list_fn, seconds, args, kwargs)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        list_fn, seconds, args, kwargs = self._args
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                stream = watch.Watch().stream(
                    list_fn,
                    *args,
                    timeout_seconds=max(1, int(deadline - time.monotonic())),
                    **kwargs,
                )
                for event in stream:
                    obj = event["object"]
                    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict()
                    version = meta.get("resourceVersion") or meta.get("resource_version")
                    if event["type"] in ("ADDED", "MODIFIED") and version not in self._versions:
                        self._versions.add(version)
                        self.changes.append(time.monotonic())
            except ApiException as exc:
                print(f"watch failed ({exc.status}); retrying", file=sys.stderr)
                time.sleep(1)


def high_water_mark(pid: int) -> float | None:
    """The process's peak resident memory in MiB (``VmHWM``), None when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def scrape(port: int) -> dict[str, float]:
    """The agent's own capacity_agent_* counters, summed over labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("capacity_agent_") or "_created" in line:
            continue
        name = line.split("{")[0].split(" ")[0]
        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "130"))
    kubeconfig = kube.test_kubeconfig()
    api = kube.api_client(kubeconfig)
    kube.apply_crds(api)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    suffix = uuid.uuid4().hex[:6]
    namespace = f"capacity-bench-{suffix}"
    name = f"bench-agent-{suffix}"
    port = free_port()
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))

    writes = VersionCounter(
        custom.list_cluster_custom_object,
        seconds + 15,
        GROUP,
        VERSION,
        "capacitynodes",
        field_selector=f"metadata.name={name}",
    )
    renewals = VersionCounter(
        client.CoordinationV1Api(api).list_namespaced_lease,
        seconds + 15,
        namespace,
        field_selector=f"metadata.name={name}",
    )
    writes.start()
    renewals.start()

    log = Path(tempfile.mkstemp(prefix="bench-agent-", suffix=".log")[1])
    argv = [
        sys.executable,
        "-m",
        "capacity_agent",
        "--node-name",
        name,
        "--interval",
        "1",
        "--kubeconfig",
        str(kubeconfig),
        "--lease-namespace",
        namespace,
        "--health-port",
        str(port),
        "--source",
        "live",
    ]
    cpu: list[tuple[float, float]] = []
    """(seconds since start, cumulative CPU seconds of the agent), every second."""
    rss: list[float] = []
    hwm = 0.0
    """VmHWM of the agent in MiB, as last read before it was stopped."""
    exit_code: int | None = None
    metrics: dict[str, float] = {}
    started = time.monotonic()
    with log.open("wb") as out:
        agent = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            process = psutil.Process(agent.pid)
            while time.monotonic() - started < seconds:
                time.sleep(1.0)
                if agent.poll() is not None:
                    print(f"agent exited early ({agent.returncode}); log: {log}", file=sys.stderr)
                    print(log.read_text()[-3000:], file=sys.stderr)
                    return 1
                times = process.cpu_times()
                cpu.append((time.monotonic() - started, times.user + times.system))
                rss.append(process.memory_info().rss / 2**20)
                hwm = high_water_mark(agent.pid) or hwm
            metrics = scrape(port)
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    exit_code = agent.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    exit_code = agent.wait()
            else:
                exit_code = agent.returncode
    elapsed = time.monotonic() - started

    node = custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
    substrates = node["spec"]["substrates"]
    size = len(json.dumps({k: v for k, v in node.items() if k != "metadata"}))
    try:
        custom.delete_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
        core.delete_namespace(namespace)
    except ApiException as exc:
        print(f"cleanup: {exc.status} {exc.reason}", file=sys.stderr)
    api.close()

    result = summarise(
        elapsed=elapsed,
        cpu=cpu,
        rss=rss,
        hwm=hwm,
        writes=[t - started for t in writes.changes],
        renewals=[t - started for t in renewals.changes],
    )
    result.update(
        {
            "substrates": substrates,
            "interval_seconds": 1.0,
            "publish_interval_seconds": 10.0,
            "capacitynode_bytes": size,
            "agent_metrics": metrics,
            "agent_exit_code_after_sigterm": exit_code,
            "targets": {"cpu_percent": 1.0, "rss_mib": 64.0, "capacitynode_writes_per_minute": 6.0},
        }
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("CPU, median % of one core (10 s windows)", result["cpu_percent_median"]),
        ("CPU, max % of one core (10 s windows)", result["cpu_percent_max"]),
        ("CPU, mean % of one core after warm-up", result["cpu_percent_mean"]),
        ("CPU seconds for start-up", result["cpu_seconds_start_up"]),
        ("RSS, peak MiB (1 s samples)", result["rss_mib_peak"]),
        ("RSS, high-water mark MiB (VmHWM)", result["rss_mib_hwm"]),
        ("CapacityNode writes / min", result["writes_per_minute"]),
        ("  after the creation", result["writes_per_minute_after_creation"]),
        ("  after the window filled", result["writes_per_minute_after_window_full"]),
        ("Lease renewals / min", result["renewals_per_minute"]),
        ("CapacityNode size, bytes", size),
        ("exit code after SIGTERM", exit_code),
    ]
    print(f"agent benchmark ({elapsed:.0f} s, substrates {', '.join(substrates)}):")
    for label, value in rows:
        print(f"  {label:<42} {value!s:>8}")
    print(f"written to {RESULTS.relative_to(REPO)}")
    return 0


def summarise(
    *,
    elapsed: float,
    cpu: list[tuple[float, float]],
    rss: list[float],
    writes: list[float],
    renewals: list[float],
    hwm: float = 0.0,
) -> dict[str, Any]:
    """The figures, from samples in seconds since the agent started.

    CPU time moves in 10 ms clock ticks, too coarse for one second at well under 1 %, so the
    percentages are taken over 10 s windows of the per-second samples, after the warm-up.
    """
    steady = [(at, used) for at, used in cpu if at >= WARM_UP]
    windows = [
        100.0 * (b_used - a_used) / (b_at - a_at)
        for (a_at, a_used), (b_at, b_used) in zip(steady, steady[CPU_WINDOW:], strict=False)
    ]
    mean = 100.0 * (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
    minutes = elapsed / 60.0
    created = writes[0] if writes else 0.0
    after_creation = [t for t in writes if t - created > 2.0]  # the spec and status applies
    full = created + WINDOW_FILL
    after_full = [t for t in writes if t > full]
    return {
        "seconds": round(elapsed, 1),
        "cpu_percent_median": round(statistics.median(windows), 3),
        "cpu_percent_max": round(max(windows), 3),
        "cpu_percent_mean": round(mean, 3),
        "cpu_seconds_start_up": round(steady[0][1], 3),
        "rss_mib_peak": round(max(rss), 1),
        "rss_mib_last": round(rss[-1], 1),
        "rss_mib_hwm": round(hwm, 1) if hwm else None,
        "writes": len(writes),
        "writes_per_minute": round(len(writes) / minutes, 2),
        "writes_per_minute_after_creation": round(
            len(after_creation) / ((elapsed - created) / 60.0), 2
        ),
        "writes_per_minute_after_window_full": (
            round(len(after_full) / ((elapsed - full) / 60.0), 2) if elapsed - full >= 20 else None
        ),
        "renewals": len(renewals),
        "renewals_per_minute": round(len(renewals) / minutes, 2),
    }


if __name__ == "__main__":
    sys.exit(main())
