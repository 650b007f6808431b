"""Admission benchmark: claims created at a steady rate against N simulated nodes.

Runs the real operator and one real agent process hosting N simulated nodes (synthetic sources)
against the local control plane (or CAPACITY_TEST_KUBECONFIG), creates claims at a fixed rate,
and measures, per scenario: admission latency (create -> Admitted or Rejected, observed through a
watch) p50/p90/p99, sustained throughput, operator CPU and RSS, and API requests per admission
(from kube-apiserver's own request counters, split by resource).

    python tests/bench/bench_admission.py                 # 10, 50, 100 nodes; 1000 claims; 10/s
    BENCH_NODES=100 BENCH_CLAIMS=1000 BENCH_RATE=40 python tests/bench/bench_admission.py
    BENCH_PROFILE=1 ...        # also a py-spy profile of the operator (root), hot frames printed
    BENCH_APISERVER_PROFILE=1  # also a CPU profile of kube-apiserver (go tool pprof -top -cum);
                               # needs the control plane up with CAPACITY_CP_PROFILING=1
    BENCH_IDLE_SECONDS=20      # first measure every process with the nodes but no claims
                               # (default 20 s; 0: skip); the run then reports what the
                               # claims added beyond that, per claim
    BENCH_AGENT_INTERVAL=0.5 BENCH_PUBLISH_INTERVAL=5 ...
                               # the simulated nodes' sampling and publishing intervals (s);
                               # default: the agent's own defaults, 1 and 10

The simulated nodes run with the agent's default intervals, as installed. Until 2026-12-05 they
sampled every 0.5 s and published every 5 s (2 s at 10 nodes or fewer), which doubled their
background writes and their sampling CPU on the machine the control plane shares.

Prints a table and writes tests/bench/results/admission.json. Figures, not pass/fail.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, watch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from capacity_api import GROUP, VERSION  # noqa: E402
from capacity_api.admission import Outcome, tally  # noqa: E402
from capacity_api.models import CapacityClaimStatus, Vote  # noqa: E402
from tests import kube  # noqa: E402
from tests.bench.machine import MachineSampler, cluster_processes, table  # noqa: E402
from tests.bench.profile import ApiServerProfile, Profile, apiserver_hot, hot_frames  # noqa: E402
from tests.cluster import Cluster, agents_proc, operator_proc, unique  # noqa: E402
from tests.nodes import control_plane_dir  # noqa: E402

RESULTS = REPO / "tests" / "bench" / "results"
FINAL = {"Admitted", "Rejected"}


def latency_parts(created: dict[str, float], watcher: Watcher) -> dict[str, float]:
    """Where a claim's latency goes, medians over the claims admitted by votes: created to its
    proposal seen (the operator's part), proposal seen to the quorum's last vote cast (the
    voters'), that vote to the decision seen (the ballot write, the operator's commit)."""
    parts: dict[str, list[float]] = {"proposal": [], "votes": [], "commit": []}
    for name, cast in watcher.quorum_at.items():
        if name not in created or name not in watcher.proposed or name not in watcher.done:
            continue
        proposed, final = watcher.proposed[name], watcher.done[name][0]
        parts["proposal"].append(proposed - created[name])
        parts["votes"].append(cast - proposed)
        parts["commit"].append(final - cast)
    return {k: round(percentile(v, 50), 3) for k, v in parts.items()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def apiserver_requests(api: client.ApiClient) -> dict[str, float]:
    """kube-apiserver's apiserver_request_total, summed per resource, verb and answer code."""
    text = api.call_api(
        "/metrics",
        "GET",
        response_type="str",
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
        _preload_content=False,
    ).data.decode()
    totals: dict[str, float] = {}
    pattern = re.compile(r"^apiserver_request_total\{(.*)\} (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        resource = f"{labels.get('resource', '')}/{labels.get('subresource', '')}"
        key = f"{resource}:{labels.get('verb')}:{labels.get('code')}"
        totals[key] = totals.get(key, 0.0) + float(match.group(2))
    return totals


def offer(names: list[str], rate: float, create: Callable[[str], object]) -> dict[str, float]:
    """Create one object per name at a steady ``rate`` per second (8 creates in flight at most);
    return when each create was sent, by name. Raises what a create raised."""
    created: dict[str, float] = {}
    start = time.time()
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for i, name in enumerate(names):
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            created[name] = time.time()
            futures.append(pool.submit(create, name))
        for f in futures:
            f.result()
    return created


def claim_final(obj: dict[str, Any]) -> str | None:
    """A claim's final phase (Admitted, Rejected), or None while it has none."""
    phase = (obj.get("status") or {}).get("phase")
    return phase if phase in FINAL else None


def quorum_cast_at(status: dict[str, Any]) -> float | None:
    """When the vote that completed the quorum of the claim's last proposal was cast, from the
    votes copied into its status at commit: the first cast time at which the protocol's own
    rule (:func:`capacity_api.admission.tally`) commits on the votes cast until then. None
    without such votes."""
    parsed = CapacityClaimStatus.model_validate(status)
    if parsed.proposal is None or not parsed.votes:
        return None
    cast = sorted((v.time, node) for node, v in parsed.votes.items() if v.time is not None)
    so_far: dict[str, Vote] = {}
    for at, node in cast:
        so_far[node] = parsed.votes[node]
        if tally(parsed.proposal, so_far, at).outcome is Outcome.COMMIT:
            return at.timestamp()
    return None


class Watcher(threading.Thread):
    """Records when each object of one namespaced custom resource is first seen final (``final``
    gives its final state, or None), from a watch resumed at the last resourceVersion."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        *,
        group: str = GROUP,
        version: str = VERSION,
        plural: str = "capacityclaims",
        final: Callable[[dict[str, Any]], str | None] = claim_final,
    ) -> None:
        super().__init__(daemon=True)
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.resource = (group, version, plural)
        self.final = final
        self.done: dict[str, tuple[float, str]] = {}
        self.proposed: dict[str, float] = {}
        """When each object was first seen with a proposal in its status."""
        self.quorum_at: dict[str, float] = {}
        """For each claim seen final with votes: when the vote that completed its quorum was
        cast (the voter's clock; this machine's)."""
        self.waiting: set[str] = set()
        """Claims Pending now because other claims hold the room they need."""
        self.stop_flag = threading.Event()

    def run(self) -> None:
        version = None
        while not self.stop_flag.is_set():
            stream = watch.Watch().stream(
                self.custom.list_namespaced_custom_object,
                *self.resource[:2],
                self.namespace,
                self.resource[2],
                timeout_seconds=30,
                resource_version=version,
            )
            for event in stream:
                obj = event["object"]
                version = obj["metadata"]["resourceVersion"]
                name = obj["metadata"]["name"]
                state = self.final(obj)
                status = obj.get("status") or {}
                if status.get("proposal") and name not in self.proposed:
                    self.proposed[name] = time.time()
                if state is not None and name not in self.done:
                    self.done[name] = (time.time(), state)
                    if (cast := quorum_cast_at(status)) is not None:
                        self.quorum_at[name] = cast
                if (status.get("phase"), status.get("reason")) == ("Pending", "WaitingForCapacity"):
                    self.waiting.add(name)
                else:
                    self.waiting.discard(name)
                if self.stop_flag.is_set():
                    return


class Sampler(threading.Thread):
    """CPU and RSS of a process tree, once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.cpu: list[float] = []
        self.rss: list[float] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        last = self.proc.cpu_times()
        last_t = time.monotonic()
        while not self.stop_flag.wait(1.0):
            try:
                now = self.proc.cpu_times()
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            t = time.monotonic()
            used = (now.user + now.system) - (last.user + last.system)
            self.cpu.append(100.0 * used / (t - last_t))
            self.rss.append(rss / 2**20)
            last, last_t = now, t


def requests_beyond_idle(
    idle: dict[str, Any] | None, requests: float, seconds: float, done: int
) -> float | None:
    """API requests per claim beyond what the nodes cost with no claims at all (their Lease
    renewals and publishing, the idle phase's requests per second) over the run's
    ``seconds``: what the claims add, as the CPU figures beyond idle."""
    if not idle or not done:
        return None
    return round((requests - float(idle["api_requests_per_s"]) * seconds) / done, 2)


def beyond_idle(
    idle: dict[str, Any] | None, machine: MachineSampler, done: int
) -> dict[str, float] | None:
    """Per process, the CPU the claims added (ms per claim): what it used over the run less
    what it used per second with no claims at all (the idle phase), over the run's length."""
    if not idle or not done:
        return None
    run = machine.figures()
    seconds = run["interval_s"]
    out: dict[str, float] = {}
    for name, entry in run["processes"].items():
        rate = idle["cpu"]["processes"].get(name, {}).get("cpu_pct_of_core", 0.0) / 100.0
        out[name] = round(1000.0 * (entry["cpu_s"] - rate * seconds) / done, 2)
    return out


def scenario(
    api: client.ApiClient, kubeconfig: Path, *, nodes: int, claims: int, rate: float, workdir: Path
) -> dict[str, Any]:
    cluster = Cluster(api)
    core = client.CoreV1Api(api)
    platform, namespace, prefix = unique("bench-platform"), unique("bench"), unique("bn")
    for ns in (platform, namespace):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    interval = float(os.environ.get("BENCH_AGENT_INTERVAL", "1"))
    publish = float(os.environ.get("BENCH_PUBLISH_INTERVAL", "10"))
    agents = agents_proc(
        kubeconfig,
        platform,
        workdir / f"agents-{nodes}.log",
        prefix=prefix,
        count=nodes,
        interval=interval,
        publish_interval=publish,
        lease_duration=40,
        lease_renew_interval=10,
        extra=["--threads", "16"],
    )
    op = operator_proc(
        kubeconfig,
        platform,
        workdir / f"operator-{nodes}.log",
        claim_namespace=namespace,
        vote_timeout=15,
    )
    # each node holds at most 0.85 (isolation 0.15); size the claims so all of them fit
    share = round(min(0.2, 0.8 * nodes / claims), 4)
    result: dict[str, Any] = {
        "nodes": nodes,
        "claims": claims,
        "offered_rate": rate,
        "share": share,
        "agent_interval_s": interval,
        "agent_publish_interval_s": publish,
    }
    try:
        agents.start()
        cluster.wait_nodes_ready(prefix, nodes, timeout=180)
        op.start()
        time.sleep(5)  # operator started, caches filled, ledger rebuilt
        watcher = Watcher(api, namespace)
        watcher.start()
        groups = {
            **cluster_processes(control_plane_dir()),
            "operator": [psutil.Process(op.popen.pid if op.popen else 0)],
            "agents": [psutil.Process(agents.popen.pid if agents.popen else 0)],
            "benchmark (client)": [psutil.Process()],
        }
        idle_seconds = float(os.environ.get("BENCH_IDLE_SECONDS", "20"))
        if idle_seconds > 0:
            # the cost of the nodes alone (publishing, Leases, the operator's loops), so that
            # what a claim adds can be told from what time and nodes cost
            idle = MachineSampler(groups)
            idle_before = apiserver_requests(api)
            idle.start()
            time.sleep(idle_seconds)
            idle.stop()
            idle_requests = sum(apiserver_requests(api).values()) - sum(idle_before.values())
            result["idle"] = {
                "cpu": idle.figures(),
                "api_requests_per_s": round(idle_requests / idle_seconds, 2),
            }
        sampler = Sampler(op.popen.pid if op.popen else 0)
        sampler.start()
        machine = MachineSampler(groups)
        machine.start()
        profile: Profile | None = None
        if os.environ.get("BENCH_PROFILE") and op.popen:
            name = f"profile-operator-{nodes}n-{rate:g}per-s.txt"
            profile = Profile(op.popen.pid, RESULTS / name).__enter__()
        apiserver: ApiServerProfile | None = None
        if os.environ.get("BENCH_APISERVER_PROFILE"):  # needs CAPACITY_CP_PROFILING=1
            name = f"profile-apiserver-{nodes}n-{rate:g}per-s.pprof"
            seconds = int(min(60, claims / rate))
            apiserver = ApiServerProfile(api, seconds, RESULTS / name).__enter__()
        before = apiserver_requests(api)
        start = time.time()
        created = offer(
            [f"b{i:05d}" for i in range(claims)],
            rate,
            lambda name: cluster.create_claim(namespace, name, cGeo=share),
        )
        offered_for = time.time() - start
        deadline = time.time() + 300
        # done when every claim is final or waits for room that no claim will free here
        while len(watcher.done) + len(watcher.waiting) < claims and time.time() < deadline:
            time.sleep(0.5)
        after = apiserver_requests(api)
        window = time.time() - start
        machine.stop()
        if profile is not None:
            profile.__exit__()
            samples, frames = hot_frames(profile.path)
            result["profile"] = {"file": str(profile.path), "samples": samples,
                                 "frames": [[f, n] for f, n in frames]}  # fmt: skip
        if apiserver is not None:
            apiserver.__exit__()
            binary = str(kube.tool_path("kube-apiserver"))
            result["apiserver_profile"] = {
                "file": str(apiserver.path), "error": apiserver.error,
                "top_cumulative": apiserver_hot(binary, apiserver.path),
            }  # fmt: skip
        sampler.stop_flag.set()
        watcher.stop_flag.set()
        latencies = [watcher.done[n][0] - created[n] for n in created if n in watcher.done]
        # in creation order: whether the slow ones are the first (warm-up) or the last (a queue)
        ordered = sorted((t, n) for n, t in created.items() if n in watcher.done)
        tenths = [ordered[i * len(ordered) // 10 : (i + 1) * len(ordered) // 10] for i in range(10)]
        by_tenth = [[watcher.done[n][0] - t for t, n in part] for part in tenths if part]
        phases = [p for _, p in watcher.done.values()]
        finish = max((t for t, _ in watcher.done.values()), default=start)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        by_resource: dict[str, float] = {}
        for key, value in delta.items():
            resource = key.split(":")[0]
            by_resource[resource] = by_resource.get(resource, 0.0) + value
        done = len(watcher.done)
        requests = sum(delta.values())
        result.update(
            {
                "completed": done,
                "admitted": phases.count("Admitted"),
                "rejected": phases.count("Rejected"),
                "waiting_for_room": len(watcher.waiting),
                "offered_seconds": round(offered_for, 1),
                "latency_p50_s": round(percentile(latencies, 50), 3),
                "latency_p90_s": round(percentile(latencies, 90), 3),
                "latency_p99_s": round(percentile(latencies, 99), 3),
                "latency_by_tenth_p50_s": [round(percentile(x, 50), 3) for x in by_tenth],
                "latency_parts_p50_s": latency_parts(created, watcher),
                "latency_by_tenth_max_s": [round(max(x), 3) for x in by_tenth],
                "throughput_per_s": round(done / max(1e-9, finish - start), 2),
                "operator_cpu_median_pct": round(statistics.median(sampler.cpu), 1)
                if sampler.cpu
                else None,
                "operator_cpu_p90_pct": round(percentile(sampler.cpu, 90), 1),
                "operator_rss_peak_mib": round(max(sampler.rss), 1) if sampler.rss else None,
                "api_requests_per_claim": round(requests / max(1, done), 2),
                "api_requests_per_claim_beyond_idle": requests_beyond_idle(
                    result.get("idle"), requests, window, done
                ),
                "cpu": machine.figures(per=done),
                "cpu_ms_per_claim_beyond_idle": beyond_idle(result.get("idle"), machine, done),
                "api_requests_by_verb_per_claim": {
                    k: round(v / max(1, done), 2)
                    for k, v in sorted(delta.items(), key=lambda kv: -kv[1])
                    if v / max(1, done) >= 0.01
                },
                "api_requests_by_resource_per_claim": {
                    k: round(v / max(1, done), 2)
                    for k, v in sorted(by_resource.items(), key=lambda kv: -kv[1])
                    if v > 0
                },
            }
        )
    finally:
        op.stop()
        agents.stop()
        cluster.delete_nodes(prefix)  # and their ballots
        custom = client.CustomObjectsApi(api)
        for item in cluster.claims(namespace):
            custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                "capacityclaims",
                item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )
        for ns in (platform, namespace):
            core.delete_namespace(ns)
        # the namespace controller deletes the claims in the background: the next run (the
        # next rate of bench-kueue) must not measure that work as its own
        gone_by = time.monotonic() + NAMESPACE_GONE_SECONDS
        while time.monotonic() < gone_by and any(
            n.metadata.name in (platform, namespace) for n in core.list_namespace().items
        ):
            time.sleep(1.0)
    return result


NAMESPACE_GONE_SECONDS = 300.0
"""How long a run waits at its end for its namespaces (and their claims) to be deleted."""


def main() -> int:
    kubeconfig = kube.test_kubeconfig()
    api = kube.api_client(kubeconfig)
    kube.refuse_beside_chart_operator(api, "the benchmark")
    kube.apply_crds(api)
    node_counts = [int(n) for n in os.environ.get("BENCH_NODES", "10,50,100").split(",")]
    claims = int(os.environ.get("BENCH_CLAIMS", "1000"))
    rate = float(os.environ.get("BENCH_RATE", "10"))
    workdir = RESULTS / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for nodes in node_counts:
        print(f"-- {nodes} nodes, {claims} claims at {rate}/s", flush=True)
        outcome = scenario(api, kubeconfig, nodes=nodes, claims=claims, rate=rate, workdir=workdir)
        print(json.dumps(outcome, indent=2), flush=True)
        if "cpu" in outcome:
            print(table(outcome["cpu"]), flush=True)
        for line in (outcome.get("apiserver_profile") or {}).get("top_cumulative", []):
            print("  apiserver " + line)
        if "profile" in outcome:
            total = max(1, outcome["profile"]["samples"])
            print(f"  operator profile ({total} samples, inclusive):")
            for frame, n in outcome["profile"]["frames"]:
                print(f"    {100 * n / total:5.1f} %  {frame}")
        results.append(outcome)
    header = (
        f"{'nodes':>5} {'claims':>6} {'rate':>5} {'p50 s':>7} {'p99 s':>7} {'thru/s':>7} "
        f"{'op cpu%':>7} {'op MiB':>7} {'req/claim':>9} {'beyond idle':>11}"
    )
    print(header)
    for r in results:
        print(
            f"{r['nodes']:>5} {r['claims']:>6} {r['offered_rate']:>5} {r['latency_p50_s']:>7} "
            f"{r['latency_p99_s']:>7} {r['throughput_per_s']:>7} "
            f"{r['operator_cpu_median_pct']!s:>7} {r['operator_rss_peak_mib']!s:>7} "
            f"{r['api_requests_per_claim']:>9} "
            f"{r.get('api_requests_per_claim_beyond_idle')!s:>11}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("BENCH_OUTPUT", "admission.json")
    (RESULTS / name).write_text(
        json.dumps({"machine": {"cpus": os.cpu_count()}, "results": results}, indent=2)
    )
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
