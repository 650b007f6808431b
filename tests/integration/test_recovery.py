"""Recovery (DESIGN section 6) with the real operator and agent processes on the local cluster.

Each test runs the operator (short grace period) and one agent process per node (short
leases), and kills, pauses or restarts agents. The nodes of the pod test are real Kubernetes
Nodes managed by kwok (created by the test, deleted afterwards), so pods scheduled onto them go
Running, and the webhook process binds them to their claim's placement.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from capacity_api.webhook import CLAIM_LABEL
from tests.cluster import (
    REPORT_SECONDS,
    Cluster,
    Proc,
    agents_proc,
    ledger_from_claims,
    node_holders,
    operator_proc,
    reported,
    show,
    unique,
    wait_events,
    wait_for,
)
from tests.integration.test_webhook import (  # the webhook process and its configurations
    IMAGE,
    Env,
    Webhook,
    env,
    wait_serving,
    webhook,
)
from tests.services import free_port

__all__ = ["env", "webhook"]  # fixtures used here

LEASE = 4
GRACE = 2.0
SLOW_GRACE = 8.0
"""The grace period of the test where only witnesses may fail a node sooner."""
FAILED_TAINT = "capacity.platform.dev/failed"


def operator(
    kubeconfig: Path, platform: str, log: Path, claim_namespace: str | None = None
) -> Proc:
    """The operator with a short grace period and a lifecycle pass every half second; with
    ``claim_namespace`` it sees only that namespace's claims (not those other tests left)."""
    proc = operator_proc(
        kubeconfig, platform, log, vote_timeout=3.0, claim_namespace=claim_namespace
    )
    proc.env.update(
        CAPACITY_OPERATOR_FAILURE_GRACE_SECONDS=str(GRACE),
        CAPACITY_OPERATOR_LIFECYCLE_INTERVAL_SECONDS="0.5",
    )
    return proc


def agent(kubeconfig: Path, platform: str, log_dir: Path, prefix: str, count: int = 1) -> Proc:
    proc = agents_proc(
        kubeconfig, platform, log_dir / f"{prefix}.log", prefix=prefix, count=count,
        lease_duration=LEASE, lease_renew_interval=1.0,
    )  # fmt: skip
    proc.name = f"agent:{prefix}"
    return proc


def claim_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body = cluster.claim(namespace, name)
    assert body is not None, f"claim {name} is gone"
    return dict(body.get("status") or {})


def placement_nodes(status: dict[str, Any]) -> list[str]:
    return sorted(p["node"] for p in status.get("placements") or [])


def taints(core: client.CoreV1Api, node: str) -> list[str]:
    return [t.key for t in core.read_node(node).spec.taints or []]


@pytest.fixture
def prefix(cluster: Cluster) -> Iterator[str]:
    """A node name prefix of this test's own; its CapacityNodes are deleted afterwards."""
    name = unique("cp-rec")
    yield name
    cluster.delete_nodes(name)


@contextmanager
def kwok_managed_nodes(core: client.CoreV1Api, names: list[str], label: str) -> Iterator[list[str]]:
    """Kubernetes Nodes faked by kwok (pods on them go Running), deleted again on exit."""
    for name in names:
        core.create_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                    "labels": {"kubernetes.io/hostname": name, "cp-test": label},
                },
                "status": {
                    "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                },
            }
        )
    try:
        yield names
    finally:
        for name in names:
            try:
                core.delete_node(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture
def kwok_managed(core: client.CoreV1Api, prefix: str) -> Iterator[list[str]]:
    """Five Nodes of this test's own, faked by kwok."""
    with kwok_managed_nodes(core, [f"{prefix}-{i}-0" for i in range(5)], prefix) as names:
        yield names


def test_a_killed_agents_claim_and_pods_move_to_another_node(
    env: Env, webhook: Webhook, kwok_managed: list[str]
) -> None:
    cluster, core, ns = env.cluster, env.core, env.namespace
    with ExitStack() as stack:
        agents = {}
        for name in kwok_managed:
            proc = agent(env.kubeconfig, env.platform, env.logs, name.removesuffix("-0"))
            agents[name] = stack.enter_context(Running(proc))
        op = stack.enter_context(
            Running(operator(env.kubeconfig, env.platform, env.logs / "op.log"))
        )
        for name in kwok_managed:
            cluster.wait_nodes_ready(name.removesuffix("-0"), 1)
        cluster.create_claim(ns, "web", cGeo=0.1, substrate="host")
        cluster.create_claim(
            ns, "fragile", cGeo=0.05, substrate="host", replicas=5, recovery={"policy": "None"}
        )
        for name in ("web", "fragile"):
            cluster.wait_phase(ns, name, {"Admitted"}, timeout=60)
        (dead,) = placement_nodes(claim_status(cluster, ns, "web"))
        wait_serving(webhook, env, "web")
        labels = {"app": "web", CLAIM_LABEL: "web"}
        client.AppsV1Api(env.api).create_namespaced_deployment(
            ns,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "main", "image": IMAGE}]},
                    },
                },
            },
        )
        pods_on = _pods_running_on(core, ns)
        wait_for(f"3 web pods on {dead}", lambda: pods_on([dead]), timeout=90)

        agents[dead].kill()
        killed = time.monotonic()

        def recovered() -> dict[str, Any] | None:
            # Recovering lasts one voting round (well under a second here): wait for its end
            status = claim_status(cluster, ns, "web")
            done = status.get("phase") == "Admitted" and status.get("recoveries")
            return status if done else None

        try:
            status = wait_for("web recovered", recovered, timeout=LEASE + GRACE + 30)
        except AssertionError:
            raise AssertionError(
                f"{claim_status(cluster, ns, 'web')}\n{show(op, agents[dead])}"
            ) from None
        moved = time.monotonic() - killed
        (new,) = placement_nodes(status)
        assert new != dead
        (recovery,) = status["recoveries"]
        assert (recovery["from"], recovery["to"]) == (dead, new)
        assert recovery["epoch"] == status["placements"][0]["epoch"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Recovered"]["status"] == "True"
        # it went through Recovering: the Events of each step say so
        for step in ("Recovering", "Recovered"):
            wait_events(core, ns, f"involvedObject.name=web,reason={step}")
        print(
            f"kill -> claim Admitted again on {new}: {moved:.1f} s "
            f"(lease {LEASE} s, grace {GRACE} s)"
        )

        # the old pods were deleted; their ReplicaSet made new ones, bound to the new node
        wait_for(f"3 web pods on {new}", lambda: pods_on([new]), timeout=60)
        print(f"kill -> 3 pods Running on {new}: {time.monotonic() - killed:.1f} s")

        # the dead node is shown as such, fenced, and holds nothing of the claim any more
        cn = env.custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", dead)
        assert _condition(cn, "Ready") == ("Unknown", "NodeFailed")
        assert _condition(cn, "Fenced") == ("True", "NodeFenced")
        assert FAILED_TAINT in taints(core, dead)

        def dead_released() -> bool:
            cn = env.custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", dead)
            return not any(h["claim"] == f"{ns}/web" for h in node_holders(cn).get("host", []))

        wait_for(f"{dead}'s ledger report to release web", dead_released, timeout=REPORT_SECONDS)

        # recovery policy None: the spanning claim fails with the reason, nothing is moved
        fragile = claim_status(cluster, ns, "fragile")
        assert fragile["phase"] == "Failed", fragile
        assert fragile["reason"] == "NodeFailed"
        assert "spec.recovery.policy is None" in fragile["message"]
        fragile_uid = cluster.claim(ns, "fragile")["metadata"]["uid"]  # type: ignore[index]

        def fragile_freed() -> bool:
            return not any(
                h["uid"] == fragile_uid
                for name in kwok_managed
                for h in node_holders(
                    env.custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
                ).get("host", [])
            )

        wait_for(
            "the Failed claim's shares freed on every node", fragile_freed, timeout=REPORT_SECONDS
        )

        # the node comes back: not used until it renewed and filled its window, then unfenced
        agents[dead] = stack.enter_context(
            Running(agent(env.kubeconfig, env.platform, env.logs, dead.removesuffix("-0")))
        )
        wait_for(f"{dead} unfenced", lambda: FAILED_TAINT not in taints(core, dead), timeout=30)
        # the log line is read from the operator's pipe by a thread: wait for it, do not race it
        wait_for("operator logs trusted again", lambda: "trusted again" in op.output(), timeout=5)
        wait_for(
            f"{dead} Fenced=False",
            lambda: (
                _condition(
                    env.custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", dead),
                    "Fenced",
                )
                == ("False", "NodeReturned")
            ),
            timeout=10,
        )


def test_a_blip_shorter_than_the_lease_moves_nothing(env: Env, prefix: str) -> None:
    cluster, ns = env.cluster, env.namespace
    names = [f"{prefix}-{i}" for i in range(3)]
    with ExitStack() as stack:
        agents = {
            n: stack.enter_context(Running(agent(env.kubeconfig, env.platform, env.logs, n)))
            for n in names
        }
        op = stack.enter_context(
            Running(operator(env.kubeconfig, env.platform, env.logs / "op.log"))
        )
        for n in names:
            cluster.wait_nodes_ready(n, 1)
        cluster.create_claim(ns, "steady", cGeo=0.1, substrate="host")
        before = claim_status(
            cluster, ns, cluster.wait_phase(ns, "steady", {"Admitted"})["metadata"]["name"]
        )
        (node,) = placement_nodes(before)
        paused = agents[node.removesuffix("-0")]
        assert paused.popen is not None
        os.killpg(paused.popen.pid, signal.SIGSTOP)
        time.sleep(LEASE / 2)  # the blip itself: shorter than the lease
        os.killpg(paused.popen.pid, signal.SIGCONT)
        paused_at = time.time()

        def renewed() -> bool:
            lease = client.CoordinationV1Api(env.api).read_namespaced_lease(node, env.platform)
            return lease.spec.renew_time.timestamp() > paused_at

        wait_for(f"{node} renews after the pause", renewed, timeout=10)
        # what a blip must not cause would show within lease + grace: look for that long
        deadline = time.monotonic() + LEASE + GRACE + 1
        while time.monotonic() < deadline:
            status = claim_status(cluster, ns, "steady")
            assert status["phase"] == "Admitted", show(op)
            assert placement_nodes(status) == [node]
            time.sleep(0.5)
        assert not status.get("recoveries")
        assert "fenced" not in op.output()


def _proxied_kubeconfig(kubeconfig: Path, port: int, path: Path) -> Path:
    """A copy of ``kubeconfig`` that reaches the API server through 127.0.0.1:``port``."""
    config = yaml.safe_load(kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{port}"
    path.write_text(yaml.safe_dump(config))
    return path


def _api_port(kubeconfig: Path) -> int:
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    return int(server.rsplit(":", 1)[1].rstrip("/"))


def _condition(cn: dict[str, Any], kind: str) -> tuple[str, str] | None:
    """(status, reason) of a CapacityNode's condition of type ``kind``."""
    for c in (cn.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return (c["status"], c.get("reason", ""))
    return None


def _ready_reason(env: Env, node: str) -> str | None:
    cn = env.custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", node)
    conditions = (cn.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c["type"] == "Ready"), None)
    return None if ready is None else f"{ready['status']}/{ready.get('reason')}"


def test_an_agent_cut_off_from_the_api_server_but_seen_by_witnesses_keeps_its_claim(
    env: Env, prefix: str
) -> None:
    """Its Lease expires, but the witnesses reach its /healthz: Suspect however long, nothing
    moves (its pods may run), not even past the grace period. Killed for real, the witnesses
    confirm (the NodeFailed message names them) and the claim moves."""
    cluster, ns = env.cluster, env.namespace
    port = free_port()
    proxy = Proc(
        "api-proxy",
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
         f"TCP:127.0.0.1:{_api_port(env.kubeconfig)}"],
        env.logs / "proxy.log",
    )  # fmt: skip
    cut_config = _proxied_kubeconfig(env.kubeconfig, port, env.logs / "cut.kubeconfig")
    cut = f"{prefix}-cut-0"
    slow = operator(env.kubeconfig, env.platform, env.logs / "op.log")
    slow.env["CAPACITY_OPERATOR_FAILURE_GRACE_SECONDS"] = str(SLOW_GRACE)
    with ExitStack() as stack:
        stack.enter_context(Running(proxy))
        op = stack.enter_context(Running(slow))
        victim = stack.enter_context(
            Running(agent(cut_config, env.platform, env.logs, f"{prefix}-cut"))
        )
        cluster.wait_nodes_ready(f"{prefix}-cut", 1)
        cluster.create_claim(ns, "held", cGeo=0.05, substrate="host")
        cluster.wait_phase(ns, "held", {"Admitted"}, timeout=60)
        assert placement_nodes(claim_status(cluster, ns, "held")) == [cut]
        for w in ("w0", "w1", "w2"):
            stack.enter_context(
                Running(agent(env.kubeconfig, env.platform, env.logs, f"{prefix}-{w}"))
            )
            cluster.wait_nodes_ready(f"{prefix}-{w}", 1)

        proxy.kill()  # the agent runs and measures, but reaches no API server
        cut_at = time.monotonic()
        wait_for(
            f"{cut} Ready=Unknown/WitnessedAlive",
            lambda: _ready_reason(env, cut) == "Unknown/WitnessedAlive",
            timeout=LEASE + 20,
        )

        def report_of_w0() -> dict[str, Any] | None:
            cn = env.custom.get_cluster_custom_object(
                GROUP, VERSION, "capacitynodes", f"{prefix}-w0-0"
            )
            reports = ((cn.get("status") or {}).get("witness") or {}).get("reports") or []
            return next((r for r in reports if r["node"] == cut), None)

        seen = wait_for(f"w0's report on {cut}", report_of_w0, timeout=10)
        assert (seen["alive"], seen["probe"]) == (True, "Reachable"), seen
        # were a witness that sees it alive ignored, the grace period would fail it within
        # lease + grace of the cut: hold on past that
        while time.monotonic() < cut_at + LEASE + SLOW_GRACE + 2:
            status = claim_status(cluster, ns, "held")
            assert status["phase"] == "Admitted", show(op)
            assert placement_nodes(status) == [cut]
            assert _ready_reason(env, cut) == "Unknown/WitnessedAlive"
            time.sleep(0.5)
        assert not status.get("recoveries")

        victim.kill()  # now it is dead: the witnesses' probes fail, they confirm at once
        killed = time.monotonic()

        def moved() -> dict[str, Any] | None:
            status = claim_status(cluster, ns, "held")
            done = status.get("phase") == "Admitted" and status.get("recoveries")
            return status if done else None

        status = wait_for("held recovered", moved, timeout=25)
        took = time.monotonic() - killed
        assert took < SLOW_GRACE, f"recovered {took:.1f} s after the kill"

        assert placement_nodes(status) != [cut]
        cn = env.custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", cut)
        ready = next(c for c in cn["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "NodeFailed"
        assert "confirmed by 3 witness(es)" in ready["message"], ready
        print(
            f"killed -> confirmed by witnesses and recovered in {took:.1f} s "
            f"(grace {SLOW_GRACE:g} s)"
        )


def test_a_partition_moves_nothing_until_it_clears(env: Env, prefix: str) -> None:
    cluster, ns = env.cluster, env.namespace
    groups = {"dead": 1, "gone": 5, "alive": 4}
    dead_node = f"{prefix}-dead-0"
    with ExitStack() as stack:
        op = stack.enter_context(
            Running(operator(env.kubeconfig, env.platform, env.logs / "op.log"))
        )
        procs = {}
        for g, n in groups.items():
            procs[g] = stack.enter_context(
                Running(agent(env.kubeconfig, env.platform, env.logs, f"{prefix}-{g}", n))
            )
            cluster.wait_nodes_ready(f"{prefix}-{g}", n)
            if g == "dead":  # the only node yet: this claim lands on it
                cluster.create_claim(ns, "on-dead", cGeo=0.05, substrate="host")
                cluster.wait_phase(ns, "on-dead", {"Admitted"}, timeout=60)
        for i in range(5):
            cluster.create_claim(ns, f"c{i}", cGeo=0.05, substrate="host")
            cluster.wait_phase(ns, f"c{i}", {"Admitted"}, timeout=60)
        names = ["on-dead", *(f"c{i}" for i in range(5))]
        placed = {c: placement_nodes(claim_status(cluster, ns, c))[0] for c in names}
        assert placed["on-dead"] == dead_node
        on_dead = sorted(c for c, n in placed.items() if n == dead_node)

        procs["gone"].kill()
        procs["dead"].kill()

        def partition_event() -> bool:
            events = env.core.list_event_for_all_namespaces(
                field_selector="reason=PartitionSuspected"
            )
            return any(e.involved_object.name.startswith(prefix) for e in events.items)

        wait_for("the PartitionSuspected Event", partition_event, timeout=LEASE + GRACE + 15)
        wait_for(
            "the log says 6 of 10", lambda: "6 of 10 node leases expired" in op.output(), timeout=5
        )
        deadline = time.monotonic() + GRACE + 2
        while time.monotonic() < deadline:
            for c, n in placed.items():
                status = claim_status(cluster, ns, c)
                assert status["phase"] == "Admitted", (c, status, show(op))
                assert placement_nodes(status) == [n]
            time.sleep(0.5)

        # five come back: 1 of 10 expired is no partition; the one still dead is recovered
        stack.enter_context(
            Running(agent(env.kubeconfig, env.platform, env.logs, f"{prefix}-gone", 5))
        )
        for c in on_dead:

            def moved(c: str = c) -> dict[str, Any] | None:
                status = claim_status(cluster, ns, c)
                ok = status.get("phase") == "Admitted" and status.get("recoveries")
                return status if ok else None

            status = wait_for(f"{c} recovered from {dead_node}", moved, timeout=60)
            assert dead_node not in placement_nodes(status)
            assert status["recoveries"][0]["from"] == dead_node
        for c, n in placed.items():
            if c not in on_dead:
                assert placement_nodes(claim_status(cluster, ns, c)) == [n], c


# -- helpers ------------------------------------------------------------------------------------


class Running:
    """Start a process on entry, stop it (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def __enter__(self) -> Proc:
        return self.proc.start()

    def __exit__(self, *_: object) -> None:
        self.proc.stop()


def _pods_running_on(core: client.CoreV1Api, namespace: str) -> Any:
    def probe(nodes: list[str]) -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        running = [p for p in live if p.status.phase == "Running" and p.spec.node_name in nodes]
        return running if len(running) == 3 and len(live) == 3 else None

    return probe


def test_two_claims_recovering_onto_room_for_one_exactly_one_gets_it(env: Env, prefix: str) -> None:
    """...and the one left waiting takes its share back on its own node once that node returns
    and is trusted again, its old holder replaced, never counted twice."""
    cluster, ns = env.cluster, env.namespace
    with ExitStack() as stack:
        op = stack.enter_context(
            Running(operator(env.kubeconfig, env.platform, env.logs / "op.log"))
        )
        doomed = stack.enter_context(
            Running(agent(env.kubeconfig, env.platform, env.logs, f"{prefix}-a"))
        )
        cluster.wait_nodes_ready(f"{prefix}-a", 1)
        for name in ("c1", "c2"):  # the only node yet: both land on it (0.8 of it)
            cluster.create_claim(ns, name, cGeo=0.4, substrate="host")
            cluster.wait_phase(ns, name, {"Admitted"}, timeout=60)
        stack.enter_context(Running(agent(env.kubeconfig, env.platform, env.logs, f"{prefix}-b")))
        cluster.wait_nodes_ready(f"{prefix}-b", 1)
        cluster.create_claim(ns, "c3", cGeo=0.4, substrate="host")
        cluster.wait_phase(ns, "c3", {"Admitted"}, timeout=60)
        room = f"{prefix}-b-0"  # 0.4 held: room for one more 0.4 under theta_iso 0.15
        assert placement_nodes(claim_status(cluster, ns, "c3")) == [room]

        doomed.kill()

        def settled() -> dict[str, dict[str, Any]] | None:
            states = {c: claim_status(cluster, ns, c) for c in ("c1", "c2")}
            phases = sorted(s.get("phase", "") for s in states.values())
            waiting = [s for s in states.values() if s.get("reason") == "WaitingForCapacity"]
            return states if phases == ["Admitted", "Recovering"] and waiting else None

        states = wait_for("one recovered, one waiting", settled, timeout=LEASE + GRACE + 30)
        (winner,) = [c for c, s in states.items() if s["phase"] == "Admitted"]
        assert placement_nodes(states[winner]) == [room], show(op)
        node = reported(cluster, prefix, ns)[room]
        held = sorted(h["claim"] for h in node["status"]["allocated"]["host"]["holders"])
        assert held == sorted([f"{ns}/c3", f"{ns}/{winner}"])
        assert node["status"]["allocated"]["host"]["share"] == pytest.approx(0.8)

        # the failed node returns: trusted again, it takes the waiting claim's share back
        (loser,) = [c for c in states if c != winner]
        home = f"{prefix}-a-0"
        stack.enter_context(Running(agent(env.kubeconfig, env.platform, env.logs, f"{prefix}-a")))

        def back_home() -> dict[str, Any] | None:
            status = claim_status(cluster, ns, loser)
            return status if status.get("phase") == "Admitted" else None

        status = wait_for(f"{loser} back on {home}", back_home, timeout=60)
        assert placement_nodes(status) == [home], show(op)
        last = status["recoveries"][-1]
        assert (last["from"], last["to"]) == (home, home)
        assert status["placements"][0]["epoch"] == last["epoch"]
        cn = reported(cluster, prefix, ns)[home]
        holders = node_holders(cn)["host"]
        # exactly one holder, the new epoch's: the old share was replaced, never counted twice
        assert [(h["claim"], h["epoch"]) for h in holders] == [(f"{ns}/{loser}", last["epoch"])]
        assert cn["status"]["allocated"]["host"]["share"] == pytest.approx(0.4)
        assert ledger_from_claims(cluster.claims(ns)) == {
            (home, "host"): pytest.approx(0.4),
            (room, "host"): pytest.approx(0.8),
        }


def test_operator_killed_during_recoveries_leaves_one_placement_per_claim(
    env: Env, prefix: str
) -> None:
    cluster, ns = env.cluster, env.namespace
    rng = random.Random(20261202)
    names = [f"{prefix}-{i}" for i in range(6)]
    log = env.logs / "op.log"
    with ExitStack() as stack:
        agents = {}
        for name in names[:2]:  # the claims start on the first two nodes
            agents[name] = stack.enter_context(
                Running(agent(env.kubeconfig, env.platform, env.logs, name))
            )
            cluster.wait_nodes_ready(name, 1)
        op = operator(env.kubeconfig, env.platform, log).start()
        try:
            for i in range(4):
                cluster.create_claim(
                    ns, f"k{i}", cGeo=0.15, substrate="host",
                    recovery={"policy": "Replace", "maxRecoveries": 100},
                )  # fmt: skip
                cluster.wait_phase(ns, f"k{i}", {"Admitted"}, timeout=60)
            for name in names[2:]:
                agents[name] = stack.enter_context(
                    Running(agent(env.kubeconfig, env.platform, env.logs, name))
                )
                cluster.wait_nodes_ready(name, 1)
            claims = [f"k{i}" for i in range(4)]
            for _ in range(10):
                placed = [placement_nodes(claim_status(cluster, ns, c))[0] for c in claims]
                victim = max(set(placed), key=placed.count)
                agents[victim.removesuffix("-0")].kill()
                time.sleep(rng.uniform(0.5, LEASE + GRACE + 2))
                op.kill()  # SIGKILL, wherever it was: detecting, fencing, voting, committing
                op = operator(env.kubeconfig, env.platform, log).start()

                def moved(victim: str = victim) -> bool:
                    states = [claim_status(cluster, ns, c) for c in claims]
                    return all(
                        s.get("phase") == "Admitted" and victim not in placement_nodes(s)
                        for s in states
                    )

                wait_for(f"every claim off {victim}", moved, timeout=60)
                agents[victim.removesuffix("-0")] = stack.enter_context(
                    Running(
                        agent(env.kubeconfig, env.platform, env.logs, victim.removesuffix("-0"))
                    )
                )
            reported(cluster, prefix, ns)  # the last operator's report of its ledger
        finally:
            op.stop()
        bodies = cluster.claims(ns)
        by_uid = {c["metadata"]["uid"]: c for c in bodies}
        for body in bodies:
            placements = body["status"]["placements"]
            assert len(placements) == 1, body["status"]
        expected = ledger_from_claims(bodies)
        for name, node in cluster.nodes(prefix).items():
            holders = node_holders(node).get("host", [])
            uids = [h["uid"] for h in holders]
            assert len(uids) == len(set(uids)), f"{name}: a claim held twice: {holders}"
            for h in holders:
                claim = by_uid.get(h["uid"])
                assert claim is not None, f"{name}: leaked holder {h}"
                assert any(
                    p["node"] == name and p["epoch"] == h["epoch"]
                    for p in claim["status"]["placements"]
                ), f"{name}: holder {h} is no placement of its claim"
            held = sum(h["share"] for h in holders)
            assert held == pytest.approx(expected.get((name, "host"), 0.0)), name
