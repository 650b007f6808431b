"""The real node fails (DESIGN section 6): its kubelet, containerd and agent all stop, as on a
hung machine, and its claim and pod move to a kwok node; when it comes back it is not used until
it renewed its Lease and filled ``minSamples`` again.

"Stopped" is SIGSTOP of each process group: the kubelet and containerd belong to the local
cluster (``hack/control-plane`` started them, and restarting them here would record the host's
state again), so the test freezes and resumes them, always resuming in a ``finally``. A frozen
kubelet renews nothing and confirms no pod deletion; the container itself keeps running under
its shim, as on a node that lost its control plane. The NoExecute taint the operator sets would
also evict any other pod on the real node, so nothing else may run there meanwhile (the e2e tier,
which installs the chart there, runs after this one).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from capacity_api.gates import CALIBRATION_CONFIGMAP, THRESHOLD_BOUNDS, Thresholds
from capacity_api.webhook import CLAIM_LABEL
from tests.cluster import Proc, agents_proc, show, unique, wait_events, wait_for
from tests.integration.test_recovery import (
    FAILED_TAINT,
    LEASE,
    Running,
    _condition,
    agent,
    claim_status,
    kwok_managed_nodes,
    operator,
    placement_nodes,
    taints,
)
from tests.integration.test_webhook import Env, Webhook, env, wait_serving, webhook
from tests.nodes import REAL_NODE_TAINT, control_plane_dir, image_ref, real_node_or_skip

__all__ = ["env", "webhook"]  # fixtures used here

INTERVAL = 0.5
"""The real agent's sampling interval: minSamples (16) take 8 s to fill."""
MIN_SAMPLES = Thresholds().min_samples


@pytest.fixture
def real_node(core: client.CoreV1Api) -> Iterator[str]:
    """The real node, with no CapacityNode when the test starts (one an earlier agent left, a
    chart's for instance, would show a full window before the test's own agent sampled once);
    afterwards its CapacityNode is deleted and any fence taint removed."""
    name = real_node_or_skip(core)
    custom = client.CustomObjectsApi(core.api_client)

    def delete_capacity_node() -> None:
        try:
            custom.delete_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    delete_capacity_node()
    wait_for(
        f"{name}'s old CapacityNode gone",
        lambda: not _exists(custom, name),
        timeout=30,
    )
    yield name
    node = core.read_node(name)
    kept = [t for t in node.spec.taints or [] if t.key != FAILED_TAINT]
    if len(kept) != len(node.spec.taints or []):
        core.patch_node(name, {"spec": {"taints": [t.to_dict() for t in kept]}})
    delete_capacity_node()


def _exists(custom: client.CustomObjectsApi, name: str) -> bool:
    try:
        custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _process_group(component: str) -> int:
    """The process group of a local cluster component (its own session: pgid == pid)."""
    pid = int((control_plane_dir() / f"{component}.pid").read_text().strip())
    pgid = os.getpgid(pid)
    assert pgid == pid, f"{component} (pid {pid}) is not the leader of its process group"
    return pgid


@contextmanager
def frozen(groups: dict[str, int]) -> Iterator[None]:
    """SIGSTOP each process group; SIGCONT them all on exit, whatever happened."""
    stopped: list[int] = []
    try:
        for pgid in groups.values():
            os.killpg(pgid, signal.SIGSTOP)
            stopped.append(pgid)
        yield
    finally:
        for pgid in stopped:
            os.killpg(pgid, signal.SIGCONT)


def capacity_node(env: Env, name: str) -> dict[str, Any]:
    """The CapacityNode (empty until its agent created it)."""
    try:
        return dict(env.custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", name))
    except ApiException as exc:
        if exc.status == 404:
            return {}
        raise


def _host_samples(cn: dict[str, Any]) -> int:
    reading = ((cn.get("status") or {}).get("readings") or {}).get("host") or {}
    return int(reading.get("samples", 0))


def _processes_of(pod_uid: str) -> list[int]:
    """PIDs on this machine in the pod's cgroup (the kubelet's cgroupfs driver names it
    ``pod<uid>``)."""
    marks = {f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}"}
    pids = []
    for path in Path("/proc").glob("[0-9]*/cgroup"):
        try:
            text = path.read_text()
        except OSError:
            continue  # the process exited meanwhile
        if any(mark in text for mark in marks):
            pids.append(int(path.parent.name))
    return pids


def real_node_agent(env: Env, real_node: str) -> Proc:
    """The real node's own agent process: live host readings every :data:`INTERVAL`, short
    leases."""
    proc = agents_proc(
        env.kubeconfig, env.platform, env.logs / "real-agent.log", prefix=real_node, count=None,
        source="live", interval=INTERVAL, lease_duration=LEASE, lease_renew_interval=1.0,
        extra=["--substrates", "host"],
    )  # fmt: skip
    proc.name = f"agent:{real_node}"
    return proc


def loosest_spectral_gates(env: Env) -> None:
    """The live host's load is noisy (its gluing delta was seen at 0.12-0.15, above the default
    0.1): a test about something else sets the spectral gates to their loosest bounds in its
    platform's calibration ConfigMap."""
    env.core.create_namespaced_config_map(
        env.platform,
        {
            "metadata": {"name": CALIBRATION_CONFIGMAP},
            "data": {"thetaGlue": str(THRESHOLD_BOUNDS["theta_glue"][1]),
                     "thetaBurst": str(THRESHOLD_BOUNDS["theta_burst"][1])},
        },
    )  # fmt: skip


def _settled(cn: dict[str, Any]) -> bool:
    """The host window holds minSamples and its published spectral readings pass the loosest
    gates (:func:`loosest_spectral_gates`): load that just changed (the previous test's stress,
    a build) drifts the window past even those for a while."""
    gate = ((cn.get("status") or {}).get("gates") or {}).get("host") or {}
    return (
        _host_samples(cn) >= MIN_SAMPLES
        and gate.get("gluingDelta", 1.0) <= THRESHOLD_BOUNDS["theta_glue"][1]
        and gate.get("lambdaInt", 1.0) <= THRESHOLD_BOUNDS["theta_burst"][1]
    )


def wait_full_window(env: Env, node: str) -> None:
    """Until the node published a full host window that the loosest spectral gates pass."""
    wait_for(
        f"{node} published a full, settled window",
        lambda: _settled(capacity_node(env, node)),
        timeout=120,
    )


def _deployment(name: str, claim: str) -> dict[str, Any]:
    labels = {"app": name, CLAIM_LABEL: claim}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "tolerations": [
                        {"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "containers": [
                        {
                            "name": "main",
                            "image": image_ref("testbox"),
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "3600"],
                        }
                    ],
                },
            },
        },
    }


def test_the_real_node_failing_moves_its_claim_and_pod_to_a_kwok_node_and_is_trusted_again_only_after_a_full_window(  # noqa: E501
    env: Env, webhook: Webhook, real_node: str
) -> None:
    cluster, core, ns = env.cluster, env.core, env.namespace
    prefix = unique("cp-rn")
    spare = f"{prefix}-0"
    real_agent = real_node_agent(env, real_node)
    groups = {c: _process_group(c) for c in ("kubelet", "containerd")}
    loosest_spectral_gates(env)  # this test is about recovery, not the gates
    with ExitStack() as stack:
        stack.enter_context(kwok_managed_nodes(core, [spare], prefix))
        stack.callback(cluster.delete_nodes, prefix)
        op = stack.enter_context(
            Running(operator(env.kubeconfig, env.platform, env.logs / "op.log"))
        )
        stack.enter_context(Running(real_agent))
        wait_full_window(env, real_node)
        # the only node yet: the claim lands on the real node
        cluster.create_claim(ns, "db", cGeo=0.05, substrate="host")
        try:
            cluster.wait_phase(ns, "db", {"Admitted"}, timeout=60)
        except AssertionError:
            raise AssertionError(f"{claim_status(cluster, ns, 'db')}\n{show(op)}") from None
        assert placement_nodes(claim_status(cluster, ns, "db")) == [real_node]
        spare_agent = stack.enter_context(
            Running(agent(env.kubeconfig, env.platform, env.logs, prefix))
        )
        cluster.wait_nodes_ready(prefix, 1)
        wait_serving(webhook, env, "db")
        client.AppsV1Api(env.api).create_namespaced_deployment(ns, _deployment("db", "db"))

        def pod_running_on(node: str) -> client.V1Pod | None:
            pods = core.list_namespaced_pod(ns, label_selector="app=db").items
            live = [p for p in pods if p.metadata.deletion_timestamp is None]
            ok = len(live) == 1 and live[0].status.phase == "Running"
            return live[0] if ok and live[0].spec.node_name == node else None

        old_pod = wait_for(f"the db pod Running on {real_node}", lambda: pod_running_on(real_node),
                           timeout=90)  # fmt: skip
        assert real_agent.popen is not None
        groups["agent"] = os.getpgid(real_agent.popen.pid)

        with frozen(groups):
            stopped = time.monotonic()

            def moved() -> dict[str, Any] | None:
                status = claim_status(cluster, ns, "db")
                done = status.get("phase") == "Admitted" and status.get("recoveries")
                return status if done else None

            try:
                status = wait_for("db recovered", moved, timeout=LEASE + 30)
            except AssertionError:
                raise AssertionError(
                    f"{claim_status(cluster, ns, 'db')}\n{show(op, spare_agent)}"
                ) from None
            print(f"real node stopped -> claim Admitted on {spare}: "
                  f"{time.monotonic() - stopped:.1f} s")  # fmt: skip
            assert placement_nodes(status) == [spare]
            (recovery,) = status["recoveries"]
            assert (recovery["from"], recovery["to"]) == (real_node, spare)
            assert FAILED_TAINT in taints(core, real_node)
            cn = capacity_node(env, real_node)
            assert _condition(cn, "Ready") == ("Unknown", "NodeFailed")
            assert _condition(cn, "Fenced") == ("True", "NodeFenced")
            # the pod moves: deleted on the frozen node (Terminating there: no kubelet confirms
            # it), recreated by its ReplicaSet, bound by the webhook to the new placement
            new_pod = wait_for(f"a db pod Running on {spare}", lambda: pod_running_on(spare),
                               timeout=60)  # fmt: skip
            print(f"real node stopped -> pod Running on {spare}: "
                  f"{time.monotonic() - stopped:.1f} s")  # fmt: skip
            assert new_pod.metadata.name != old_pod.metadata.name
            # deleted with grace 0 (a kubelet that is gone never confirms), while its container
            # still runs on the hung node
            assert old_pod.metadata.name not in [
                p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="app=db").items
            ]
            assert _processes_of(old_pod.metadata.uid), "the old pod's container is not running"

        # resumed: containerd, kubelet and agent run again; the agent's window restarts (a gap)
        resumed = datetime.now(UTC)
        observed: list[tuple[bool, int, str | None]] = []

        def renewed() -> bool:
            lease = client.CoordinationV1Api(env.api).read_namespaced_lease(real_node, env.platform)
            return bool(lease.spec.renew_time and lease.spec.renew_time > resumed)

        wait_for(f"{real_node} renews its Lease", renewed, timeout=15)
        # back, but not trusted: a claim that needs both nodes cannot be placed
        cluster.create_claim(ns, "pair", cGeo=0.05, substrate="host", replicas=2)

        def watch_returning() -> dict[str, Any] | None:
            cn = capacity_node(env, real_node)
            fenced = _condition(cn, "Fenced")
            observed.append(
                (FAILED_TAINT in taints(core, real_node), _host_samples(cn), fenced and fenced[1])
            )
            pair = claim_status(cluster, ns, "pair")
            return pair if pair.get("phase") in ("Rejected", "Admitted") else None

        pair = wait_for("pair decided", watch_returning, timeout=30)
        assert pair["phase"] == "Rejected", pair
        assert pair["reason"] == "InsufficientCapacity"
        assert real_node in pair["message"], pair["message"]
        assert FAILED_TAINT in taints(core, real_node), "trusted before the claim was decided"

        def unfenced() -> bool:
            cn = capacity_node(env, real_node)
            fenced = _condition(cn, "Fenced")
            observed.append(
                (FAILED_TAINT in taints(core, real_node), _host_samples(cn), fenced and fenced[1])
            )
            return not observed[-1][0]

        wait_for(f"{real_node} trusted again", unfenced, timeout=30)
        print(f"resumed -> trusted again: {(datetime.now(UTC) - resumed).total_seconds():.1f} s")
        # while fenced it was seen Returning with a window restarted after the gap; the taint
        # went only once the window held minSamples again
        returning = [s for tainted, s, reason in observed if tainted and reason == "Returning"]
        assert returning, observed
        assert min(returning) < MIN_SAMPLES, observed
        assert all(s >= MIN_SAMPLES for tainted, s, _ in observed if not tainted), observed
        wait_for(
            f"{real_node} Fenced=False",
            lambda: (
                _condition(capacity_node(env, real_node), "Fenced") == ("False", "NodeReturned")
            ),
            timeout=10,
        )
        wait_events(core, None, f"involvedObject.name={real_node},reason=NodeReturned")

        # used again: a claim that needs both nodes is admitted onto both
        cluster.create_claim(ns, "pair-again", cGeo=0.05, substrate="host", replicas=2)
        cluster.wait_phase(ns, "pair-again", {"Admitted"}, timeout=60)
        both = placement_nodes(claim_status(cluster, ns, "pair-again"))
        assert both == sorted([real_node, spare])
        # the resumed kubelet stops the container of the pod deleted meanwhile
        wait_for(
            "the old pod's container stopped by the resumed kubelet",
            lambda: not _processes_of(old_pod.metadata.uid),
            timeout=60,
        )
