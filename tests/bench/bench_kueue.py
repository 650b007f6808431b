"""Side by side with Kueue: the same offered rates against Kueue's manager, one table.

Builds (once, cached by version: ``hack/kueue``) Kueue's manager from its Go module, applies its
CRDs to the local control plane (or CAPACITY_TEST_KUBECONFIG), and for each client-limit
setting and each offered rate runs the manager out of cluster as a process of its own: one
ResourceFlavor, one ClusterQueue with quota for every Workload, one LocalQueue in a fresh
namespace, no nodes, no votes. Workloads of one pod (one container asking for 100m CPU) are
created at a steady rate; a watch records when each one's condition ``Admitted`` turns True.

Per run, measured like tests/bench/bench_admission.py does: latency create -> Admitted
p50/p90/p99, throughput, API requests per admission (kube-apiserver's own
``apiserver_request_total``, every client counted), CPU of every process taking part
(tests/bench/machine.py). Our figures are read from the JSON that bench_admission.py wrote
(tests/bench/results/admission*.json), not measured again, unless BENCH_RUN_OURS asks for it.

    python tests/bench/bench_kueue.py      # or make bench-kueue: 1000 Workloads at 10, 30, 100/s
    BENCH_WORKLOADS=100 BENCH_RATES=10,100 python tests/bench/bench_kueue.py
    BENCH_LIMITS=off ...       # one client setting only: shipped (qps 50, burst 100) or off
    BENCH_OURS='admission-100n-*.json' ...  # which of our results to show (admission*.json)
    BENCH_RUN_OURS=100 ...     # run our benchmark first (100 nodes, same count and rates)
    BENCH_WAIT=300             # seconds to wait for the last admissions after the last create

Kueue runs without its webhooks (nothing registers them with the API server, so the API server
never calls them) and without its visibility server; everything else is its own defaults plus
the shipped manager's settings (client limits, per-kind concurrency, ``--zap-log-level=2``).
Its manager reads its metrics certificate from the fixed path /etc/kueue/metrics/certs when
internal certificate management is off, so it is started in a mount namespace of its own
(``unshare``) where a throwaway self-signed certificate is overlaid there; the host's /etc is
not touched. Prints a table and writes tests/bench/results/kueue.json. Figures, not pass/fail.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests import kube  # noqa: E402
from tests.bench.bench_admission import (  # noqa: E402
    Watcher,
    apiserver_requests,
    offer,
    percentile,
)
from tests.bench.machine import MachineSampler, cluster_processes, table  # noqa: E402
from tests.cluster import Proc, unique  # noqa: E402
from tests.nodes import control_plane_dir  # noqa: E402
from tests.services import free_port  # noqa: E402

RESULTS = REPO / "tests" / "bench" / "results"
GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
KUEUE_NAMESPACE = "kueue-system"
CPU_PER_WORKLOAD_MILLI = 100
LIMITS: dict[str, tuple[float, int]] = {
    # config/components/manager/controller_manager_config.yaml of the release
    "shipped": (50.0, 100),
    # a negative qps installs no client-side rate limiter (cmd/kueue/main.go)
    "off": (-1.0, 100),
}
KUEUE_PATH = ("workloads/", "events/", "clusterqueues/", "localqueues/", "resourceflavors/")
"""Resources of the admission path: the Workloads, their Events and the queues' status."""
LIMIT_LABELS = {"shipped": "qps 50, burst 100", "off": "client limits off"}


@dataclass(frozen=True)
class Kueue:
    """The manager binary, its CRDs and its version (from hack/kueue)."""

    binary: Path
    crds: Path
    version: str

    @classmethod
    def ensure(cls) -> Kueue:
        script = str(REPO / "hack" / "kueue")

        def ask(what: str) -> str:
            # stderr passes through: a first build says it is building (about 5 minutes)
            out = subprocess.run(
                [script, what], check=True, stdout=subprocess.PIPE, text=True, timeout=3600
            )
            return out.stdout.strip().splitlines()[-1]

        return cls(Path(ask("path")), Path(ask("crds")), ask("version"))


def kubectl(kubeconfig: Path, *args: str) -> str:
    out = subprocess.run(
        [str(kube.kubectl_path()), "--kubeconfig", str(kubeconfig), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.stdout


def apply_kueue_crds(kubeconfig: Path, crds: Path) -> None:
    """Server-side apply (the Workload CRD is too large for a client-side apply's annotation),
    then wait until every CRD is Established."""
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(crds))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(crds.glob("*.yaml"))]
    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=120s",
            *[f"crd/{n}" for n in names])  # fmt: skip


def api_client(kubeconfig: Path, pool: int = 16) -> client.ApiClient:
    """A client whose connection pool holds a connection per creating thread."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool
    return client.ApiClient(configuration)


def self_signed(directory: Path) -> None:
    """tls.crt and tls.key for localhost, valid a day (the webhook and metrics servers need a
    certificate to start; nothing calls them)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


@dataclass
class ManagerPorts:
    health: int
    metrics: int
    webhook: int


def manager_config(
    *, qps: float, burst: int, ports: ManagerPorts, cert_dir: Path
) -> dict[str, Any]:
    """Kueue's Configuration: the shipped settings that apply out of cluster, on loopback."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports.metrics}"},
        "webhook": {"host": "127.0.0.1", "port": ports.webhook, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": qps, "burst": burst},
        # as shipped (config/components/manager/controller_manager_config.yaml)
        "controller": {
            "groupKindConcurrency": {
                "Job.batch": 5,
                "Pod": 5,
                "Workload.kueue.x-k8s.io": 5,
                "LocalQueue.kueue.x-k8s.io": 1,
                "Cohort.kueue.x-k8s.io": 1,
                "ClusterQueue.kueue.x-k8s.io": 1,
                "ResourceFlavor.kueue.x-k8s.io": 1,
            }
        },
        # the default integration only; the benchmark creates Workloads directly
        "integrations": {"frameworks": ["batch/job"]},
    }


class Manager:
    """Kueue's manager as a child process, in a mount namespace where a throwaway certificate
    sits at /etc/kueue/metrics/certs (overlaid on /etc; the host's /etc is not changed)."""

    def __init__(self, kueue: Kueue, kubeconfig: Path, *, qps: float, burst: int, log: Path):
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-kueue-"))
        certs = self.workdir / "certs"
        self_signed(certs)
        upper = self.workdir / "etc-upper"
        metrics_certs = upper / "kueue" / "metrics" / "certs"
        metrics_certs.mkdir(parents=True)
        for name in ("tls.crt", "tls.key"):
            shutil.copy(certs / name, metrics_certs / name)
        (self.workdir / "etc-work").mkdir()
        self.ports = ManagerPorts(free_port(), free_port(), free_port())
        cfg = manager_config(qps=qps, burst=burst, ports=self.ports, cert_dir=certs)
        config_file = self.workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg))
        mount = (
            "mount -t overlay overlay -o "
            f"lowerdir=/etc,upperdir={upper},workdir={self.workdir / 'etc-work'} /etc"
            ' && exec "$0" "$@"'
        )
        # unshare and sh exec in turn: the pid we start is the manager's
        userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        argv = [
            "unshare", *userns, "--mount", "--propagation", "private", "sh", "-c", mount,
            str(kueue.binary), f"--config={config_file}", "--zap-log-level=2",
            "--feature-gates=VisibilityOnDemand=false",
        ]  # fmt: skip
        self.proc = Proc("kueue", argv, log, env={"KUBECONFIG": str(kubeconfig)})

    @property
    def pid(self) -> int:
        assert self.proc.popen is not None
        return self.proc.popen.pid

    def start(self, timeout: float = 120.0) -> None:
        self.proc.start()
        url = f"http://127.0.0.1:{self.ports.health}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive:
                raise RuntimeError(f"Kueue's manager exited:\n{self.proc.tail(30)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Kueue's manager not ready after {timeout}s:\n{self.proc.tail(30)}")

    def stop(self) -> None:
        self.proc.stop()  # SIGTERM to the process group we started, SIGKILL after 15 s
        shutil.rmtree(self.workdir, ignore_errors=True)


def workload_admitted(obj: dict[str, Any]) -> str | None:
    """ "Admitted" once the Workload's ``Admitted`` condition is True, else None."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    admitted = any(c.get("type") == "Admitted" and c.get("status") == "True" for c in conditions)
    return "Admitted" if admitted else None


class RssSampler(threading.Thread):
    """Peak RSS of one process, once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0.0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(1.0):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            except psutil.Error:
                return


def workload(name: str, queue: str) -> dict[str, Any]:
    container = {
        "name": "c",
        "image": "registry.invalid/bench:0",
        "resources": {"requests": {"cpu": f"{CPU_PER_WORKLOAD_MILLI}m"}},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {
            "queueName": queue,
            "podSets": [
                {
                    "name": "main",
                    "count": 1,
                    "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
                }
            ],
        },
    }


def ensure_namespace(core: client.CoreV1Api, name: str) -> bool:
    """Create the namespace when missing; True when this call created it."""
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as exc:
        if exc.status != 409:
            raise
        return False
    return True


def condition_true(obj: dict[str, Any], kind: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def wait_until(what: str, probe: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def drop_finalizers(custom: client.CustomObjectsApi, plural: str, namespace: str | None) -> None:
    """Remove what is left of ``plural`` (finalizers first: the manager may be gone)."""
    if namespace is None:
        items = custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]
    else:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
    for item in items:
        name = item["metadata"]["name"]
        patch = {"metadata": {"finalizers": None}}
        try:
            if namespace is None:
                custom.patch_cluster_custom_object(GROUP, VERSION, plural, name, patch)
            else:
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, patch
                )
        except ApiException as exc:
            if exc.status != 404:
                raise


def settled_requests(
    api: client.ApiClient, quiet: int = 2, limit: float = 30.0
) -> dict[str, float]:
    """kube-apiserver's request counters once the writes that follow the admissions are done.

    Kueue posts its Events (and its queues' status) after the admission itself, through the
    same client-side rate limiter: at 100/s with qps 50 two thirds of the Events were still queued
    when the last Workload was seen Admitted. The counters are read every second until those of
    Workloads, Events and queues have not moved for ``quiet`` readings (at most ``limit`` s),
    so what an admission costs is counted in full; the few requests of an idle cluster in
    those seconds are counted too."""

    def busy(totals: dict[str, float]) -> float:
        return sum(v for k, v in totals.items() if k.startswith(KUEUE_PATH))

    last = apiserver_requests(api)
    still = 0
    deadline = time.monotonic() + limit
    while still < quiet and time.monotonic() < deadline:
        time.sleep(1.0)
        now = apiserver_requests(api)
        still = still + 1 if busy(now) == busy(last) else 0
        last = now
    return last


def run_kueue(
    kueue: Kueue,
    kubeconfig: Path,
    *,
    limits: str,
    workloads: int,
    rate: float,
    wait: float,
    workdir: Path,
) -> dict[str, Any]:
    api = api_client(kubeconfig)
    watch_api = api_client(kubeconfig, pool=2)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    qps, burst = LIMITS[limits]
    namespace, flavor, cq = unique("bench-kueue"), unique("bench-flavor"), unique("bench-cq")
    queue = "bench"
    result: dict[str, Any] = {
        "who": "kueue",
        "kueue_version": kueue.version,
        "limits": limits,
        "qps": qps,
        "burst": burst,
        "workloads": workloads,
        "offered_rate": rate,
        "cpu_request_per_workload": f"{CPU_PER_WORKLOAD_MILLI}m",
    }
    log = workdir / f"kueue-{limits}-{rate:g}per-s.log"
    log.unlink(missing_ok=True)
    result["log"] = str(log)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    manager: Manager | None = None
    try:
        manager = Manager(kueue, kubeconfig, qps=qps, burst=burst, log=log)
        custom.create_cluster_custom_object(
            GROUP, VERSION, "resourceflavors",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor",
             "metadata": {"name": flavor}, "spec": {}},
        )  # fmt: skip
        quota = f"{CPU_PER_WORKLOAD_MILLI * workloads}m"  # every Workload fits
        custom.create_cluster_custom_object(
            GROUP, VERSION, "clusterqueues",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": cq},
             "spec": {"namespaceSelector": {},
                      "resourceGroups": [{"coveredResources": ["cpu"], "flavors": [
                          {"name": flavor, "resources": [{"name": "cpu", "nominalQuota": quota}]}
                      ]}]}},
        )  # fmt: skip
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "localqueues",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue",
             "metadata": {"name": queue}, "spec": {"clusterQueue": cq}},
        )  # fmt: skip
        manager.start()
        wait_until(
            f"ClusterQueue {cq} Active",
            lambda: condition_true(
                custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", cq), "Active"
            ),
            timeout=60,
        )
        time.sleep(3)  # informers synced, the first reconciles done
        watcher = Watcher(
            watch_api,
            namespace,
            group=GROUP,
            version=VERSION,
            plural="workloads",
            final=workload_admitted,
        )
        watcher.start()
        rss = RssSampler(manager.pid)
        rss.start()
        machine = MachineSampler(
            {
                **cluster_processes(control_plane_dir()),
                "kueue manager": [psutil.Process(manager.pid)],
                "benchmark (client)": [psutil.Process()],
            }
        )
        machine.start()
        before = apiserver_requests(api)
        start = time.time()
        created = offer(
            [f"w{i:05d}" for i in range(workloads)],
            rate,
            lambda name: custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "workloads", workload(name, queue)
            ),
        )
        offered_for = time.time() - start
        deadline = time.time() + wait
        while len(watcher.done) < workloads and time.time() < deadline:
            if not manager.proc.alive:
                raise RuntimeError(f"Kueue's manager exited:\n{manager.proc.tail(30)}")
            time.sleep(0.5)
        admitted_at = time.time()
        after = settled_requests(api)
        machine.stop()
        rss.stop_flag.set()
        watcher.stop_flag.set()
        admitted = {name: at for name, (at, _) in watcher.done.items()}
        latencies = [admitted[n] - created[n] for n in created if n in admitted]
        done = len(latencies)
        finish = max(admitted.values(), default=start)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        by_resource: dict[str, float] = {}
        for key, value in delta.items():
            resource = key.split(":")[0]
            by_resource[resource] = by_resource.get(resource, 0.0) + value
        reasons: dict[str, int] = {}
        for event in core.list_namespaced_event(namespace).items:
            reasons[event.reason] = reasons.get(event.reason, 0) + 1
        result.update(
            {
                "admitted": done,
                # Events stored in the namespace at the end: client-go's recorder drops what
                # does not fit its queue when its client waits (client-side limits, slow server)
                "events_stored_by_reason": dict(sorted(reasons.items())),
                "not_admitted_after_wait": workloads - done,
                "wait_s": wait,
                "offered_seconds": round(offered_for, 1),
                "settle_s": round(time.time() - admitted_at, 1),
                "latency_p50_s": round(percentile(latencies, 50), 3),
                "latency_p90_s": round(percentile(latencies, 90), 3),
                "latency_p99_s": round(percentile(latencies, 99), 3),
                "latency_max_s": round(max(latencies), 3) if latencies else None,
                "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
                "throughput_per_s": round(done / max(1e-9, finish - start), 2),
                "kueue_rss_peak_mib": round(rss.peak, 1),
                "api_requests_per_admission": round(sum(delta.values()) / max(1, done), 2),
                # the share that is Kueue's own path (other clients of a shared cluster aside)
                "api_requests_kueue_objects_per_admission": round(
                    sum(v for k, v in by_resource.items() if k.startswith(KUEUE_PATH))
                    / max(1, done),
                    2,
                ),
                "cpu": machine.figures(per=done, per_name="admission"),
                "api_requests_by_resource_per_admission": {
                    k: round(v / max(1, done), 2)
                    for k, v in sorted(by_resource.items(), key=lambda kv: -kv[1])
                    if v > 0
                },
            }
        )
    finally:
        cleanup(custom, core, manager, namespace=namespace, cq=cq, flavor=flavor)
        watch_api.close()
        api.close()
    return result


def cleanup(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    manager: Manager | None,
    *,
    namespace: str,
    cq: str,
    flavor: str,
) -> None:
    """Delete the run's objects while the manager still runs (it releases its finalizers),
    stop it, drop any finalizer left, delete the namespace."""
    steps: list[tuple[str, Any]] = [
        ("workloads", lambda: custom.delete_collection_namespaced_custom_object(
            GROUP, VERSION, namespace, "workloads")),
        ("localqueues", lambda: custom.delete_collection_namespaced_custom_object(
            GROUP, VERSION, namespace, "localqueues")),
        ("clusterqueues", lambda: custom.delete_cluster_custom_object(
            GROUP, VERSION, "clusterqueues", cq)),
        ("resourceflavors", lambda: custom.delete_cluster_custom_object(
            GROUP, VERSION, "resourceflavors", flavor)),
    ]  # fmt: skip
    for what, step in steps:
        try:
            step()
        except ApiException as exc:
            if exc.status != 404:
                print(f"cleanup: deleting {what}: {exc.status} {exc.reason}", file=sys.stderr)
    if manager is not None:
        time.sleep(2 if manager.proc.alive else 0)
        manager.stop()
    for plural, ns in (("workloads", namespace), ("localqueues", namespace)):
        drop_finalizers(custom, plural, ns)
    for plural, name in (("clusterqueues", cq), ("resourceflavors", flavor)):
        try:
            custom.patch_cluster_custom_object(
                GROUP, VERSION, plural, name, {"metadata": {"finalizers": None}}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
    core.delete_namespace(namespace)


def ours_results(patterns: list[str]) -> list[dict[str, Any]]:
    """Every result of the admission benchmark's JSON files matching ``patterns`` (in
    tests/bench/results unless a path is given), labelled with its file."""
    found: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for pattern in patterns:
        base = pattern if os.path.isabs(pattern) else str(RESULTS / pattern)
        for name in sorted(glob.glob(base)):
            path = Path(name)
            if path in seen or path.name == "kueue.json":
                continue
            seen.add(path)
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                print(f"skipping {path}: {exc}", file=sys.stderr)
                continue
            found.extend(
                {**r, "who": "ours", "file": path.name}
                for r in data.get("results", [])
                if "latency_p50_s" in r and "offered_rate" in r
            )
    return found


def run_ours(nodes: str, workloads: int, rates: list[float]) -> list[str]:
    """Run tests/bench/bench_admission.py at each rate; return the files it wrote."""
    names = []
    for rate in rates:
        name = f"admission-kueue-cmp-{nodes}n-{rate:g}.json"
        env = {
            **os.environ,
            "BENCH_NODES": nodes,
            "BENCH_CLAIMS": str(workloads),
            "BENCH_RATE": str(rate),
            "BENCH_OUTPUT": name,
        }
        script = REPO / "tests" / "bench" / "bench_admission.py"
        subprocess.run([sys.executable, str(script)], check=True, env=env)
        names.append(name)
    return names


def _cpu_ms(r: dict[str, Any], group: str) -> str:
    processes = (r.get("cpu") or {}).get("processes") or {}
    entry = processes.get(group) or {}
    value = next((v for k, v in entry.items() if k.startswith("cpu_ms_per_")), None)
    return "-" if value is None else f"{value:g}"


def row(r: dict[str, Any]) -> list[str]:
    busy = (r.get("cpu") or {}).get("machine_busy_pct_median")
    if r["who"] == "ours":
        who = f"ours, {r['nodes']} nodes ({r['file']})"
        total = r.get("claims", 0)
        done = r.get("admitted", r.get("completed", 0))
        requests = r.get("api_requests_per_claim")
        beyond = r.get("api_requests_per_claim_beyond_idle")
        controller = _cpu_ms(r, "operator")
        agents = _cpu_ms(r, "agents")
    else:
        who = f"Kueue {r['kueue_version']}, {LIMIT_LABELS[r['limits']]}"
        total, done = r["workloads"], r["admitted"]
        requests = r.get("api_requests_per_admission")
        beyond = None  # Kueue's run has no idle phase: its figure is all requests
        controller = _cpu_ms(r, "kueue manager")
        agents = "-"
    return [
        f"{r['offered_rate']:g}/s",
        who,
        f"{done}/{total}",
        f"{r['latency_p50_s']:g} s",
        f"{r['latency_p90_s']:g} s",
        f"{r['latency_p99_s']:g} s",
        f"{r['throughput_per_s']:g}/s",
        ("-" if requests is None else f"{requests:g}")
        + ("" if beyond is None else f" ({beyond:g} beyond idle)"),
        _cpu_ms(r, "kube-apiserver"),
        _cpu_ms(r, "etcd"),
        controller,
        agents,
        "-" if busy is None else f"{busy:g} %",
    ]


HEADER = [
    "offered",
    "who",
    "admitted",
    "p50",
    "p90",
    "p99",
    "throughput",
    "API requests per admission",
    "kube-apiserver CPU ms per admission",
    "etcd CPU ms",
    "controller CPU ms (operator / Kueue)",
    "agents CPU ms",
    "machine busy (median)",
]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    workloads = int(os.environ.get("BENCH_WORKLOADS", "1000"))
    rates = [float(r) for r in os.environ.get("BENCH_RATES", "10,30,100").split(",")]
    limits = [s.strip() for s in os.environ.get("BENCH_LIMITS", "shipped,off").split(",")]
    unknown = [s for s in limits if s not in LIMITS]
    if unknown:
        raise SystemExit(f"BENCH_LIMITS: unknown {unknown}; use {', '.join(LIMITS)}")
    wait = float(os.environ.get("BENCH_WAIT", "300"))
    patterns = os.environ.get("BENCH_OURS", "admission*.json").split(",")
    run_ours_nodes = os.environ.get("BENCH_RUN_OURS")

    kubeconfig = kube.test_kubeconfig()
    api = api_client(kubeconfig)
    core = client.CoreV1Api(api)
    if run_ours_nodes:
        patterns = run_ours(run_ours_nodes, workloads, rates)
    kueue = Kueue.ensure()
    apply_kueue_crds(kubeconfig, kueue.crds)
    created_system_ns = ensure_namespace(core, KUEUE_NAMESPACE)
    workdir = RESULTS / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    context = {
        "cpus": os.cpu_count(),
        "load_1m_at_start": round(os.getloadavg()[0], 2),
        "chart_operators_running": kube.chart_operators(api),
    }
    results: list[dict[str, Any]] = []
    try:
        for setting in limits:
            for rate in rates:
                print(f"-- Kueue {kueue.version}, {LIMIT_LABELS[setting]}: "
                      f"{workloads} Workloads at {rate:g}/s", flush=True)  # fmt: skip
                outcome = run_kueue(
                    kueue,
                    kubeconfig,
                    limits=setting,
                    workloads=workloads,
                    rate=rate,
                    wait=wait,
                    workdir=workdir,
                )
                print(json.dumps({k: v for k, v in outcome.items() if k != "cpu"}, indent=2))
                print(table(outcome["cpu"]), flush=True)
                results.append(outcome)
    finally:
        if created_system_ns:
            core.delete_namespace(KUEUE_NAMESPACE)
    ours = ours_results(patterns)
    rows = [
        row(r)
        for r in sorted(
            [*ours, *results],
            key=lambda r: (r["offered_rate"], r["who"] != "ours", r.get("file", ""), r["who"]),
        )
        if r["offered_rate"] in rates or r["who"] == "kueue"
    ]
    for rate in rates:
        if not any(r["offered_rate"] == rate for r in ours):
            missing = [f"{rate:g}/s", f"ours: no result at {rate:g}/s in {','.join(patterns)}"]
            at = next((i for i, r in enumerate(rows) if r[0] == f"{rate:g}/s"), len(rows))
            rows.insert(at, missing + ["-"] * (len(HEADER) - len(missing)))
    print()
    print(markdown(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("BENCH_OUTPUT", "kueue.json")
    (RESULTS / name).write_text(
        json.dumps(
            {"machine": context, "kueue": results, "ours": ours, "table": markdown(rows)},
            indent=2,
        )
    )
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
