"""Benchmark: the falsification rate over calibration rounds, on real workloads on the real node,
with the thresholds' path; and the operator's cost of truth keeping.

On the shared local cluster (or CAPACITY_TEST_KUBECONFIG), in a platform namespace of its own:
the operator (observation period ``BENCH_PERIOD`` s, default 4; a calibration round every
second, moves after ``BENCH_MIN_OUTCOMES`` outcomes, default 16: two rounds' worth) and the
real node's own agent.
The thresholds start loose: thetaIso at its lowest bound (0.01), thetaFit at its highest and
pinned, the spectral gates at their highest (the live host is noisy).

``BENCH_ROUNDS`` rounds (default 10) of ``BENCH_PER_ROUND`` claims (default 8), one claim at a
time, each asking for a share drawn uniformly from 0.05-0.9 of the real node (seeded). An
admitted claim gets one pod on the real node running ``memhog 64 inf``: it touches 64 MiB and
holds it. Its memory limit is ``slack x 160 MiB``, where slack is the share of the node left
unpromised after the admission (``1 - allocated - share``, as the vote read it): the harness's
model of neighbours squeezing each other on a tightly packed node. Below a slack of about 0.42
the limit is under what the pod touches and the kernel OOM-kills it: the admission is
Falsified. Otherwise it runs clean for the period: Confirmed. A rejected claim is kept until its
own verdict (MissedOpportunity or RightlyRejected).

``BENCH_STATIC=1`` pins every threshold: the same stream (same seed) against static limits,
for comparison; it writes calibration-static.json. ``BENCH_PINNED`` (comma-separated keys,
default thetaFit) pins others; a run with more than thetaFit pinned writes
calibration-<keys>.json.

Per round: the thresholds at its start, the claims admitted, falsified and rejected, and the
falsification rate (falsified / admitted). At the end: the history of every move, and the
operator's CPU seconds, peak RSS and outcome-store writes (rows and transactions, from its log
at a clean stop), per decision. The operator's CPU covers admission and truth keeping together;
they run in one process and are not separated here.

Which workload fails is the harness's model; the admissions, the kills, the verdicts and the
moves are real. Prints the figures and writes tests/bench/results/calibration.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402 - after the path set-up, like every import below
from kubernetes import client  # noqa: E402

from capacity_api import GROUP, VERSION  # noqa: E402
from capacity_api.gates import CALIBRATION_CONFIGMAP, THRESHOLD_BOUNDS  # noqa: E402
from tests import kube  # noqa: E402
from tests.cluster import Cluster, wait_for  # noqa: E402
from tests.integration.test_recovery import Running  # noqa: E402
from tests.integration.test_recovery_real_node import (  # noqa: E402
    real_node_agent,
    wait_full_window,
)
from tests.integration.test_truth import labelled_pod, truthful_operator  # noqa: E402
from tests.integration.test_webhook import Env  # noqa: E402
from tests.nodes import nodes_of_kind, ready, real_node_pod_spec  # noqa: E402

RESULTS = REPO / "tests" / "bench" / "results" / "calibration.json"
POOL_MIB = 160
NEED_MIB = 64
SHARES = (0.05, 0.9)


def pod_spec(slack: float) -> dict[str, Any]:
    limit = max(8, round(slack * POOL_MIB))
    command = ["/bin/memhog", str(NEED_MIB), "inf"]
    return real_node_pod_spec(command, memory=f"{limit}Mi", cpu="200m")


class Sampler:
    """The operator's CPU seconds and peak RSS, sampled every half second."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.start_cpu = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _cpu(self) -> float:
        t = self.process.cpu_times()
        return float(t.user + t.system)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                self.cpu = self._cpu() - self.start_cpu
            except psutil.Error:
                return


def scenario(api: client.ApiClient, kubeconfig: Path) -> dict[str, Any]:
    cluster = Cluster(api)
    core = client.CoreV1Api(api)
    real = [n.metadata.name for n in nodes_of_kind(core, "real") if ready(n)]
    if not real:
        raise SystemExit("bench_calibration: no Ready real node (hack/control-plane up)")
    node = real[0]
    rounds = int(os.environ.get("BENCH_ROUNDS", "10"))
    per_round = int(os.environ.get("BENCH_PER_ROUND", "8"))
    period = float(os.environ.get("BENCH_PERIOD", "4"))
    min_outcomes = os.environ.get("BENCH_MIN_OUTCOMES", "16")
    rng = random.Random(int(os.environ.get("BENCH_SEED", "7")))
    # BENCH_STATIC=1: every threshold pinned, the same stream against static limits
    static = os.environ.get("BENCH_STATIC") == "1"
    pinned = "thetaFit,thetaIso,thetaGlue,thetaBurst" if static else "thetaFit"
    pinned = os.environ.get("BENCH_PINNED", pinned)
    tag = uuid.uuid4().hex[:6]
    platform, ns = f"bench-cal-p-{tag}", f"bench-cal-{tag}"
    for name in (platform, ns):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    logs = Path(tempfile.mkdtemp(prefix="bench-calibration-"))
    env = Env(kubeconfig, api, ns, platform, logs)
    core.create_namespaced_config_map(
        platform,
        {
            "metadata": {"name": CALIBRATION_CONFIGMAP},
            "data": {
                "thetaIso": str(THRESHOLD_BOUNDS["theta_iso"][0]),
                "thetaFit": str(THRESHOLD_BOUNDS["theta_fit"][1]),
                "thetaGlue": str(THRESHOLD_BOUNDS["theta_glue"][1]),
                "thetaBurst": str(THRESHOLD_BOUNDS["theta_burst"][1]),
                "pinned": pinned,
            },
        },
    )

    def data() -> dict[str, str]:
        return dict(core.read_namespaced_config_map(CALIBRATION_CONFIGMAP, platform).data)

    def verdict(name: str) -> str | None:
        body = cluster.claim(ns, name) or {}
        v = ((body.get("status") or {}).get("truth") or {}).get("verdict")
        return v if v not in (None, "Observing") else None

    op = truthful_operator(env, period=period)
    op.env.update(
        CAPACITY_OPERATOR_CALIBRATION_MIN_OUTCOMES=min_outcomes,
        CAPACITY_OPERATOR_CALIBRATION_MAX_STEP="0.1",
    )
    table: list[dict[str, Any]] = []
    decisions = 0
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            stack.enter_context(Running(real_node_agent(env, node)))
            op.start()
            stack.callback(op.stop)
            assert op.popen is not None
            sampler = stack.enter_context(Sampler(op.popen.pid))
            wait_full_window(env, node)
            n = 0
            for r in range(rounds):
                cm = data()
                row: dict[str, Any] = {
                    "round": r + 1,
                    "thetaIso": float(cm["thetaIso"]),
                    "thetaGlue": float(cm["thetaGlue"]),
                    "thetaBurst": float(cm["thetaBurst"]),
                    "shares": [],
                    "admitted": 0,
                    "falsified": 0,
                    "rejected": 0,
                    "rejectedBy": {},
                }
                rejected: list[str] = []
                for _ in range(per_round):
                    name = f"c{n}"
                    n += 1
                    share = round(rng.uniform(*SHARES), 3)
                    row["shares"].append(share)
                    cluster.create_claim(ns, name, cGeo=share, substrate="host")
                    body = cluster.wait_phase(ns, name, {"Admitted", "Rejected"}, timeout=60)
                    decisions += 1
                    if body["status"]["phase"] == "Rejected":
                        row["rejected"] += 1
                        rejected.append(name)
                        gates = [v.get("gate") for v in body["status"].get("votes", {}).values()]
                        why = ",".join(sorted({g for g in gates if g}))
                        why = why or str(body["status"].get("message", "?"))[:80]
                        row["rejectedBy"][why] = row["rejectedBy"].get(why, 0) + 1
                        continue
                    row["admitted"] += 1
                    vote = body["status"]["votes"][node]["readings"]
                    slack = float(vote["isolation"])
                    pod = f"{name}-{tag}"
                    core.create_namespaced_pod(ns, labelled_pod(pod, name, pod_spec(slack)))
                    v = wait_for(f"{name}'s verdict", lambda c=name: verdict(c),
                                 timeout=period + 90)  # fmt: skip
                    if v == "Falsified":
                        row["falsified"] += 1
                    core.delete_namespaced_pod(pod, ns, grace_period_seconds=0)
                    cluster.delete_claim(ns, name)
                    wait_for(f"{name} gone", lambda c=name: cluster.claim(ns, c) is None,
                             timeout=60)  # fmt: skip
                for name in rejected:
                    wait_for(f"{name}'s verdict", lambda c=name: verdict(c), timeout=period + 60)
                    cluster.delete_claim(ns, name)
                admitted = row["admitted"]
                row["falsificationRate"] = row["falsified"] / admitted if admitted else None
                print(json.dumps(row), flush=True)
                table.append(row)
            final = data()
    finally:
        op.stop()
    elapsed = time.monotonic() - started
    log = op.output()
    store = re.search(r"outcome store: (\d+) rows written in (\d+) transactions", log)
    rows_written, transactions = (int(store[1]), int(store[2])) if store else (None, None)
    history = json.loads(final.get("history") or "[]")
    rates = [r["falsificationRate"] for r in table if r["falsificationRate"] is not None]
    half = max(1, len(rates) // 2)
    for name in (ns, platform):
        core.delete_namespace(name)
    try:  # the real node's CapacityNode belongs to this run's agent: leave no stale one
        client.CustomObjectsApi(api).delete_cluster_custom_object(
            GROUP, VERSION, "capacitynodes", node
        )
    except client.ApiException as exc:
        if exc.status != 404:
            raise
    return {
        "static": static,
        "pinned": pinned,
        "rounds": table,
        "perRound": per_round,
        "period": period,
        "minOutcomes": int(min_outcomes),
        "thresholdPath": [
            {"id": h["id"], "key": h["key"], "from": h["from"], "to": h["to"], "by": h["by"]}
            for h in history
        ],
        "final": {k: final.get(k) for k in ("thetaFit", "thetaIso", "thetaGlue", "thetaBurst")},
        "counters": json.loads(final.get("counters") or "{}"),
        "falsificationRate": {
            "firstHalfMedian": statistics.median(rates[:half]) if rates else None,
            "secondHalfMedian": statistics.median(rates[half:]) if rates[half:] else None,
        },
        "operator": {
            "decisions": decisions,
            "cpuSeconds": round(sampler.cpu, 2),
            "cpuSecondsPerDecision": round(sampler.cpu / decisions, 3) if decisions else None,
            "peakRssMiB": round(sampler.peak_rss / 2**20, 1),
            "storeRowsWritten": rows_written,
            "storeTransactions": transactions,
            "storeRowsPerDecision": round(rows_written / decisions, 2)
            if rows_written is not None and decisions
            else None,
        },
        "elapsedSeconds": round(elapsed, 1),
        "logs": str(logs),
    }


def main() -> int:
    kubeconfig = kube.test_kubeconfig()
    api = kube.api_client(kubeconfig)
    kube.refuse_beside_chart_operator(api, "the benchmark")
    outcome = scenario(api, kubeconfig)
    print(json.dumps({k: v for k, v in outcome.items() if k != "rounds"}, indent=2), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    label = "static" if outcome["static"] else outcome["pinned"].replace(",", "-")
    results = RESULTS if label == "thetaFit" else RESULTS.with_name(f"calibration-{label}.json")
    results.write_text(
        json.dumps({"machine": {"cpus": os.cpu_count()}, **outcome}, indent=2) + "\n"
    )
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
