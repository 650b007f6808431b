"""Benchmark: what the local cluster costs to start and to keep running.

On a private cluster of its own (own state directory, ports, bridge and subnets, as the lifecycle
tests use, so it never touches the shared one) with the binaries and images already cached:

- ``up`` from an empty state directory (certificates, etcd, kube-apiserver, controller manager,
  scheduler, containerd, image imports, kubelet Ready, kwok nodes Ready), ``up`` against the
  running cluster, ``down``; ``BENCH_RUNS`` times (default 3), medians reported;
- with 3 pods running on the real node (``sleep``), the idle CPU (percent of one core, median
  over 10 s windows) and RSS (MiB, peak) of every process of the cluster, over ``BENCH_SECONDS``
  (default 120) after a 20 s settling period;
- pod created -> Ready on the real node.

Prints the figures and writes tests/bench/results/cluster.json. Needs root (the real node); exits
0 whatever the figures, 1 only when the cluster could not be run.

    python tests/bench/bench_cluster.py          (or: make bench)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kubernetes import client  # noqa: E402 - after the path set-up, like every import below

from tests import kube  # noqa: E402
from tests.bench.machine import cluster_processes  # noqa: E402
from tests.cluster import wait_for  # noqa: E402
from tests.nodes import image_ref, on_real_node, wait_default_service_account  # noqa: E402

RESULTS = REPO / "tests" / "bench" / "results" / "cluster.json"
CONTROL_PLANE = REPO / "hack" / "control-plane"
SETTLE = 20.0
CPU_WINDOW = 10.0


def env_for(state: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CAPACITY_CP_DIR": str(state),
        "CAPACITY_CP_PORT": "27443",
        "CAPACITY_CP_ETCD_PORT": "27790",
        "CAPACITY_CP_BRIDGE": "cpbench0",
        "CAPACITY_CP_NODE_NAME": "bench-node",
        "CAPACITY_CP_NODE_SUBNET": "10.247.0.0/16",
        "CAPACITY_CP_SERVICE_CIDR": "10.0.7.0/24",
        "CAPACITY_CP_REAL_NODE": "1",
    }


def timed(state: Path, command: str) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run(
        [str(CONTROL_PLANE), command],
        env=env_for(state),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"hack/control-plane {command} failed:\n{out.stderr[-3000:]}")
    return time.monotonic() - started, out.stdout.strip().splitlines()[-1] if out.stdout else ""


def idle_figures(state: Path, seconds: float) -> dict[str, dict[str, float]]:
    procs = cluster_processes(state)
    cpu: dict[str, list[float]] = {name: [] for name in procs}
    rss: dict[str, float] = dict.fromkeys(procs, 0.0)
    before = {name: sum(sum(p.cpu_times()[:2]) for p in ps) for name, ps in procs.items()}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(CPU_WINDOW)
        for name, ps in procs.items():
            now = sum(sum(p.cpu_times()[:2]) for p in ps)
            cpu[name].append(100.0 * (now - before[name]) / CPU_WINDOW)
            before[name] = now
            rss[name] = max(rss[name], sum(p.memory_info().rss for p in ps) / 2**20)
    return {
        name: {
            "processes": len(procs[name]),
            "cpu_percent_median": round(statistics.median(cpu[name]), 2),
            "rss_mib_peak": round(rss[name], 1),
        }
        for name in procs
    }


def pods_on_node(core: client.CoreV1Api, count: int) -> list[float]:
    wait_default_service_account(core, "default")
    ready_after = []
    for i in range(count):
        name = f"idle-{i}"
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": on_real_node(
                {
                    "containers": [
                        {
                            "name": "main",
                            "image": image_ref("testbox"),
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "86400"],
                        }
                    ]
                }
            ),
        }
        started = time.monotonic()
        core.create_namespaced_pod("default", body)

        def is_ready(pod_name: str = name) -> bool:
            pod = core.read_namespaced_pod(pod_name, "default")
            return any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
            )

        wait_for(f"pod {name} Ready", is_ready, timeout=120, interval=0.05)
        ready_after.append(time.monotonic() - started)
    return ready_after


def main() -> int:
    if os.geteuid() != 0:
        print("bench_cluster: needs root (the real node)", file=sys.stderr)
        return 1
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    seconds = float(os.environ.get("BENCH_SECONDS", "120"))
    ups, reuses, downs = [], [], []
    state = Path(tempfile.mkdtemp(prefix="cpb-", dir="/tmp"))
    try:
        for _ in range(runs):
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir()
            took, kubeconfig = timed(state, "up")
            ups.append(took)
            reuses.append(timed(state, "up")[0])
            downs.append(timed(state, "down")[0])
        timed(state, "up")
        api = kube.api_client(Path(kubeconfig))
        core = client.CoreV1Api(api)
        pod_ready = pods_on_node(core, 3)
        time.sleep(SETTLE)  # let start-up work (image imports, first syncs) finish
        idle = idle_figures(state, seconds)
        api.close()
    finally:
        subprocess.run(
            [str(CONTROL_PLANE), "down"], env=env_for(state), capture_output=True, check=False
        )
        shutil.rmtree(state, ignore_errors=True)
    figures = {
        "runs": runs,
        "up_cold_s": [round(t, 2) for t in ups],
        "up_cold_s_median": round(statistics.median(ups), 2),
        "up_reuse_s_median": round(statistics.median(reuses), 2),
        "down_s_median": round(statistics.median(downs), 2),
        "pod_ready_s": [round(t, 2) for t in pod_ready],
        "idle_seconds": seconds,
        "idle": idle,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"up (empty state, binaries and images cached): median {figures['up_cold_s_median']} s "
        f"of {figures['up_cold_s']}; up when running {figures['up_reuse_s_median']} s; "
        f"down {figures['down_s_median']} s"
    )
    print(f"pod created -> Ready on the real node: {figures['pod_ready_s']} s")
    print(f"idle over {seconds:.0f} s with 3 pods on the real node:")
    for name, row in sorted(idle.items()):
        print(
            f"  {name:24} {row['cpu_percent_median']:6.2f} % of a core  "
            f"{row['rss_mib_peak']:7.1f} MiB  ({row['processes']} process(es))"
        )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
