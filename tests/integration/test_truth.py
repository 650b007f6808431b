"""Truth (DESIGN section 7) with the real operator and agent processes on the local cluster:
an admission falsified by a real kernel OOM kill on the real node, an admission confirmed after a
clean observation period on a kwok node, and a rejection that the idle nodes then show to have
been a missed opportunity.

Pods carry the claim label and are placed by hand (the webhook's binding is tested elsewhere):
truth follows the label, whoever bound the pod.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from kubernetes.client.rest import ApiException

from capacity_api.gates import CALIBRATION_CONFIGMAP, THRESHOLD_BOUNDS
from capacity_api.webhook import CLAIM_LABEL
from capacity_operator.store import database_url, outcomes
from tests.cluster import Proc, show, unique, wait_events, wait_for
from tests.integration.test_recovery import (
    Running,
    agent,
    claim_status,
    kwok_managed_nodes,
    operator,
    placement_nodes,
)
from tests.integration.test_recovery_real_node import (
    loosest_spectral_gates,
    real_node,
    real_node_agent,
    wait_full_window,
)
from tests.integration.test_webhook import IMAGE, Env, env
from tests.nodes import describe, oom_pod_spec

__all__ = ["env", "real_node"]  # fixtures used here

PERIOD = 8.0
"""The operator's observation period in these tests."""


def truthful_operator(env: Env, period: float = PERIOD) -> Proc:
    """The operator with a short observation period and a calibration round every second. It
    sees only the test's namespace: claims other tests left behind would otherwise be checked
    too, and their outcomes counted with this test's."""
    proc = operator(env.kubeconfig, env.platform, env.logs / "op.log", env.namespace)
    proc.env["CAPACITY_OPERATOR_TRUTH_OBSERVATION_SECONDS"] = str(period)
    proc.env["CAPACITY_OPERATOR_TRUTH_INTERVAL_SECONDS"] = "1"
    proc.env["CAPACITY_OPERATOR_CALIBRATION_INTERVAL_SECONDS"] = "1"
    return proc


def counters(env: Env) -> dict[str, int]:
    """The host substrate's counters in the calibration ConfigMap (empty: none yet)."""
    try:
        cm = env.core.read_namespaced_config_map(CALIBRATION_CONFIGMAP, env.platform)
    except ApiException as exc:
        if exc.status == 404:
            return {}  # calibration creates it once something is counted
        raise
    return dict(json.loads((cm.data or {}).get("counters") or "{}").get("host") or {})


def calibration(env: Env, **data: str) -> None:
    env.core.create_namespaced_config_map(
        env.platform, {"metadata": {"name": CALIBRATION_CONFIGMAP}, "data": data}
    )


def labelled_pod(name: str, claim: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {CLAIM_LABEL: claim}},
        "spec": spec,
    }


def stored_rows(url: str) -> list[dict[str, Any]]:
    """The outcome store's rows, read straight from its database."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(r) for r in connection.execute(sa.select(outcomes)).mappings()]
    except sa.exc.OperationalError:
        return []  # no file or no table yet
    finally:
        engine.dispose()


def truth_of(env: Env, name: str) -> dict[str, Any]:
    return dict(claim_status(env.cluster, env.namespace, name).get("truth") or {})


def condition(env: Env, name: str, kind: str) -> dict[str, Any] | None:
    for c in claim_status(env.cluster, env.namespace, name).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return None


def event(env: Env, name: str, reason: str) -> str:
    """The message of the claim's Event with ``reason`` (waited for)."""
    selector = f"involvedObject.name={name},reason={reason}"
    return str(wait_events(env.core, env.namespace, selector)[0].message)


def test_a_real_oom_kill_on_the_real_node_falsifies_its_claim(env: Env, real_node: str) -> None:
    cluster, core, ns = env.cluster, env.core, env.namespace
    loosest_spectral_gates(env)  # this test is about truth, not the gates
    with ExitStack() as stack:
        op = stack.enter_context(Running(truthful_operator(env)))
        stack.enter_context(Running(real_node_agent(env, real_node)))
        wait_full_window(env, real_node)
        cluster.create_claim(ns, "hog", cGeo=0.05, substrate="host")
        try:
            cluster.wait_phase(ns, "hog", {"Admitted"}, timeout=60)
        except AssertionError:
            raise AssertionError(f"{claim_status(cluster, ns, 'hog')}\n{show(op)}") from None
        assert placement_nodes(claim_status(cluster, ns, "hog")) == [real_node]
        assert truth_of(env, "hog").get("verdict") in (None, "Observing")

        pod = unique("hog")
        spec = oom_pod_spec()
        core.create_namespaced_pod(ns, labelled_pod(pod, "hog", spec))

        def falsified() -> dict[str, Any] | None:
            t = truth_of(env, "hog")
            return t if t.get("verdict") == "Falsified" else None

        try:
            t = wait_for("hog falsified", falsified, timeout=90)
        except AssertionError:
            raise AssertionError(f"{describe(core, ns, pod)}\n{show(op)}") from None
        (evidence,) = [e for e in t["evidence"] if e["kind"] == "OOMKilled"]
        assert (evidence["pod"], evidence["container"], evidence["node"]) == (pod, "hog", real_node)
        assert evidence["reason"] == "OOMKilled"
        assert evidence["time"][:19] >= t["since"][:19]  # the kubelet's whole seconds
        cond = condition(env, "hog", "Falsified")
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("True", "OOMKilled")
        assert pod in cond["message"]
        assert f"OOMKilled pod {pod}/hog on {real_node}" in event(env, "hog", "Falsified")
        # the outcome is in the store (the operator's SQLite file), with what it was decided on
        db = database_url(str((env.logs / "op.log").with_suffix(".outcomes.db")), None)

        def stored() -> dict[str, Any] | None:
            rows = [r for r in stored_rows(db) if r["claim"] == f"{ns}/hog"]
            return rows[0] if rows and rows[0]["verdict"] == "Falsified" else None

        outcome = wait_for("hog's outcome stored", stored, timeout=30)
        # calibration counted it
        wait_for("the falsification counter", lambda: counters(env).get("falsified") == 1,
                 timeout=30)  # fmt: skip
        assert outcome["evidence"][0]["kind"] == "OOMKilled"
        assert outcome["nodes"] == [real_node]
        assert outcome["readings"][real_node]["headroom"] > 0
        assert outcome["fingerprints"][real_node]
        # final: the period running out does not turn it into Confirmed
        until = datetime.fromisoformat(t["until"].replace("Z", "+00:00"))
        wait_for("the period over", lambda: datetime.now(UTC) > until + timedelta(seconds=2),
                 timeout=PERIOD + 10)  # fmt: skip
        assert truth_of(env, "hog")["verdict"] == "Falsified"


def test_a_clean_period_confirms_and_an_idle_node_shows_a_missed_opportunity(env: Env) -> None:
    """On one kwok node with a steady load (headroom about 0.65): a small claim is admitted and
    its pod runs clean, so it is Confirmed; a claim of 0.55 is rejected by theta_iso 0.5 (0.45
    of the node would stay free) though the node keeps room for it all period: a missed
    opportunity; a claim larger than the node is rightly rejected."""
    cluster, core, ns = env.cluster, env.core, env.namespace
    prefix = unique("cp-truth")
    node = f"{prefix}-0"
    calibration(env, thetaIso=str(THRESHOLD_BOUNDS["theta_iso"][1]))
    with ExitStack() as stack:
        stack.enter_context(kwok_managed_nodes(core, [node], prefix))
        stack.callback(cluster.delete_nodes, prefix)
        op = stack.enter_context(Running(truthful_operator(env)))
        stack.enter_context(Running(agent(env.kubeconfig, env.platform, env.logs, prefix)))
        cluster.wait_nodes_ready(prefix, 1)
        cluster.create_claim(ns, "small", cGeo=0.1, substrate="host")
        cluster.wait_phase(ns, "small", {"Admitted"}, timeout=60)
        core.create_namespaced_pod(
            ns,
            labelled_pod(
                "small-0", "small",
                {"nodeName": node, "containers": [{"name": "main", "image": IMAGE}]},
            ),
        )  # fmt: skip
        cluster.create_claim(ns, "wide", cGeo=0.55, substrate="host")
        cluster.create_claim(ns, "huge", resources={"cpu": "4096"})
        for name in ("wide", "huge"):
            cluster.wait_phase(ns, name, {"Rejected"}, timeout=60)
        assert "theta_iso" in claim_status(cluster, ns, "wide")["message"]

        def final(name: str) -> dict[str, Any] | None:
            t = truth_of(env, name)
            return t if t.get("verdict") not in (None, "Observing") else None

        try:
            small = wait_for("small decided", lambda: final("small"), timeout=PERIOD + 30)
            wide = wait_for("wide decided", lambda: final("wide"), timeout=PERIOD + 30)
            huge = wait_for("huge decided", lambda: final("huge"), timeout=PERIOD + 30)
        except AssertionError:
            raise AssertionError(show(op)) from None
        assert small["verdict"] == "Confirmed", small
        assert not small.get("evidence")
        cond = condition(env, "small", "Falsified")
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("False", "Confirmed")
        assert event(env, "small", "Confirmed")

        assert wide["verdict"] == "MissedOpportunity", wide
        assert wide["headroom"][node] >= 0.55
        assert event(env, "wide", "MissedOpportunity")
        assert huge["verdict"] == "RightlyRejected", huge
        wanted = {"confirmed": 1, "falsified": 0, "missed": 1, "rightlyRejected": 1}
        wait_for("calibration's counters", lambda: counters(env) == wanted, timeout=30)
        assert condition(env, "wide", "Falsified") is None  # rejected claims have no such


def test_the_kubelets_memory_pressure_on_the_placement_node_falsifies(env: Env) -> None:
    """A kwok node's Node gets the kubelet condition MemoryPressure=True while a claim is placed
    on it (written here as a kubelet would): the admission is Falsified with that evidence."""
    cluster, core, ns = env.cluster, env.core, env.namespace
    prefix = unique("cp-kp")
    node = f"{prefix}-0"
    with ExitStack() as stack:
        stack.enter_context(kwok_managed_nodes(core, [node], prefix))
        stack.callback(cluster.delete_nodes, prefix)
        op = stack.enter_context(Running(truthful_operator(env, period=60)))
        stack.enter_context(Running(agent(env.kubeconfig, env.platform, env.logs, prefix)))
        cluster.wait_nodes_ready(prefix, 1)
        cluster.create_claim(ns, "squeezed", cGeo=0.1, substrate="host")
        cluster.wait_phase(ns, "squeezed", {"Admitted"}, timeout=60)
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        pressure = {
            "type": "MemoryPressure", "status": "True", "reason": "KubeletHasInsufficientMemory",
            "message": "kubelet has insufficient memory available", "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }  # fmt: skip
        # a strategic merge patch: conditions merge by type, the others stay
        core.patch_node_status(node, {"status": {"conditions": [pressure]}})

        def falsified() -> dict[str, Any] | None:
            t = truth_of(env, "squeezed")
            return t if t.get("verdict") == "Falsified" else None

        try:
            t = wait_for("squeezed falsified", falsified, timeout=30)
        except AssertionError:
            conditions = core.read_node_status(node).status.conditions
            raise AssertionError(f"{conditions}\n{show(op)}") from None
        (evidence,) = t["evidence"]
        assert (evidence["kind"], evidence["node"], evidence["reason"]) == (
            "NodePressure", node, "MemoryPressure",
        )  # fmt: skip
        assert evidence["message"] == "kubelet: kubelet has insufficient memory available"
        cond = condition(env, "squeezed", "Falsified")
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("True", "NodePressure")
