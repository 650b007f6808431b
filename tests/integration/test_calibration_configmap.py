"""A hand-edited calibration ConfigMap with a garbage value: refused with a Warning Event on the
ConfigMap naming the key, and the last good threshold stays in force (admission decides with
it, not with the default)."""

from __future__ import annotations

from contextlib import ExitStack

from capacity_api.gates import CALIBRATION_CONFIGMAP
from tests.cluster import unique, wait_for
from tests.integration.test_recovery import Running, agent, claim_status, operator
from tests.integration.test_webhook import Env, env

__all__ = ["env"]  # fixtures used here


def test_a_garbage_threshold_is_refused_with_an_event_and_the_last_good_one_stays(
    env: Env,
) -> None:
    cluster, core, ns = env.cluster, env.core, env.namespace
    prefix = unique("cp-cal")
    core.create_namespaced_config_map(
        env.platform, {"metadata": {"name": CALIBRATION_CONFIGMAP}, "data": {"thetaIso": "0.5"}}
    )
    with ExitStack() as stack:
        stack.enter_context(Running(operator(env.kubeconfig, env.platform, env.logs / "op.log")))
        stack.enter_context(Running(agent(env.kubeconfig, env.platform, env.logs, prefix)))
        stack.callback(cluster.delete_nodes, prefix)
        cluster.wait_nodes_ready(prefix, 1)
        # 0.55 of the node leaves 0.45 free: refused under thetaIso 0.5, admitted under 0.15
        cluster.create_claim(ns, "first", cGeo=0.55, substrate="host")
        cluster.wait_phase(ns, "first", {"Rejected"}, timeout=60)
        assert "theta_iso 0.50" in claim_status(cluster, ns, "first")["message"]

        core.patch_namespaced_config_map(
            CALIBRATION_CONFIGMAP, env.platform, {"data": {"thetaIso": "banana"}}
        )

        def warned() -> str | None:
            events = core.list_namespaced_event(
                env.platform,
                field_selector=f"involvedObject.name={CALIBRATION_CONFIGMAP},"
                "reason=InvalidThreshold",
            ).items
            found = [e for e in events if e.type == "Warning" and "thetaIso" in e.message]
            return found[0].message if found else None

        message = wait_for("a Warning Event naming thetaIso", warned, timeout=30)
        assert "'banana' is not a finite number; refused" in message
        assert "keeping the last good value 0.5" in message
        cluster.create_claim(ns, "second", cGeo=0.55, substrate="host")
        cluster.wait_phase(ns, "second", {"Rejected"}, timeout=60)
        assert "theta_iso 0.50" in claim_status(cluster, ns, "second")["message"]
