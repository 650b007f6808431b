"""Truth, as installed by the chart: an admitted claim whose pod runs clean through the
observation period (the local-cluster values set it to 30 s) is Confirmed, and the operator,
running as uid 10001 on a read-only root filesystem, keeps the outcome on its volume.
(The real OOM kill that falsifies a claim: tests/integration/test_truth.py.)"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client

from tests.cluster import Cluster, wait_events, wait_for
from tests.e2e.conftest import NAMESPACE, Platform
from tests.e2e.test_webhook_binding import _pod, _pod_spec

OBSERVATION = 30


def test_a_clean_pod_through_the_period_confirms_its_claim_and_the_outcome_is_stored(
    platform: Platform, namespace: str, api: client.ApiClient, core: client.CoreV1Api,
    kubectl: Any,
) -> None:  # fmt: skip
    cluster = Cluster(api)
    cluster.create_claim(namespace, "checked", cGeo=0.05, substrate="host")
    claim = cluster.wait_phase(namespace, "checked", {"Admitted", "Rejected"}, timeout=120)
    assert claim["status"]["phase"] == "Admitted", claim["status"]
    core.create_namespaced_pod(namespace, _pod("checked-0", _pod_spec(platform), "checked"))
    wait_for(
        "the pod Running",
        lambda: core.read_namespaced_pod("checked-0", namespace).status.phase == "Running",
        timeout=90,
    )

    def confirmed() -> dict[str, Any] | None:
        status = (cluster.claim(namespace, "checked") or {}).get("status") or {}
        truth = status.get("truth") or {}
        return status if truth.get("verdict") == "Confirmed" else None

    status = wait_for("checked Confirmed", confirmed, timeout=OBSERVATION + 60)
    falsified = next(c for c in status["conditions"] if c["type"] == "Falsified")
    assert (falsified["status"], falsified["reason"]) == ("False", "Confirmed")
    wait_events(core, namespace, "involvedObject.name=checked,reason=Confirmed")

    # the outcome row, read from the operator's SQLite file inside its pod
    uid = claim["metadata"]["uid"]
    script = (
        "import json, sqlite3, sys; c = sqlite3.connect('/var/lib/capacity-platform/outcomes.db'); "
        "print(json.dumps(c.execute('select verdict, decision from outcomes where claim_uid = ?', "
        "(sys.argv[1],)).fetchall()))"
    )

    def row() -> list[list[str]] | None:
        done = kubectl(
            "exec", "-n", NAMESPACE, "deploy/capacity-platform-operator", "--",
            "python", "-c", script, uid, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            return None
        rows: list[list[str]] = json.loads(done.stdout)
        return rows if rows and rows[0][0] == "Confirmed" else None

    assert wait_for("the outcome stored", row, timeout=30) == [["Confirmed", "Admitted"]]

    # calibration, with the chart's RBAC (get and patch on its one ConfigMap), counted it
    def counted() -> dict[str, int] | None:
        data = core.read_namespaced_config_map("capacity-calibration", NAMESPACE).data or {}
        host = json.loads(data.get("counters") or "{}").get("host") or {}
        return host if host.get("confirmed", 0) >= 1 else None

    wait_for("the calibration counters", counted, timeout=30)
    shown = kubectl(
        "exec", "-n", NAMESPACE, "deploy/capacity-platform-operator", "--",
        "capctl", "--platform-namespace", NAMESPACE, "calibration", check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "thetaIso" in shown.stdout
