"""Calibration on a stream of real outcomes (DESIGN section 7, docs/calibration.md): claims
admitted onto the real node, whose pods really run there; the tightly packed ones' pods are
OOM-killed by the kernel, the others run clean. The operator's calibration moves theta_iso,
round by round and within its bounds, to where the falsified admissions would have been
refused and the confirmed ones kept; each move is in the ConfigMap's history with its reason,
the pinned theta_fit never moves, the agents refuse a tight claim afterwards, and a rollback
through capctl puts the thresholds back.

Which workload fails is the test's choice (a real cluster does not OOM-kill on cue); the
admissions, the kills, the verdicts, the store rows and every threshold move are real.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from contextlib import ExitStack
from typing import Any

from capacity_api.gates import CALIBRATION_CONFIGMAP, THRESHOLD_BOUNDS
from tests.cluster import show, unique, wait_events, wait_for
from tests.integration.test_recovery import Running, claim_status, placement_nodes
from tests.integration.test_recovery_real_node import (
    capacity_node,
    real_node,
    real_node_agent,
    wait_full_window,
)
from tests.integration.test_truth import (
    calibration,
    labelled_pod,
    stored_rows,
    truth_of,
    truthful_operator,
)
from tests.integration.test_webhook import Env, env
from tests.nodes import describe, oom_pod_spec, real_node_pod_spec

__all__ = ["env", "real_node"]  # fixtures used here

TIGHT = (0.55, 0.6, 0.65, 0.7)
"""Shares of the real node that leave 0.45-0.3 of it unpromised: their pods are OOM-killed."""
LOOSE = (0.1, 0.15, 0.2, 0.25)
"""Shares that leave 0.9-0.75: their pods run clean."""
PERIOD = 4.0


def _data(env: Env) -> dict[str, str]:
    return dict(env.core.read_namespaced_config_map(CALIBRATION_CONFIGMAP, env.platform).data)


def _clean_pod_spec() -> dict[str, Any]:
    return real_node_pod_spec(["sleep", "3600"], memory="32Mi", cpu="100m", restart="Always")


def wait_room(env: Env, node: str, share: float) -> None:
    """Wait until the live host's measured load leaves ``share`` a fit error of at most 0.4
    (under the pinned thetaFit 0.5): this test is about isolation, and a busy moment of the
    machine (an earlier test's stress-ng, still in the window) would refuse large shares by fit.
    The window forgets a burst in at most W samples (32 s here)."""
    room = 1 - 0.6 * share

    def quiet() -> float | None:
        reading = ((capacity_node(env, node).get("status") or {}).get("readings") or {}).get(
            "host"
        ) or {}
        p95 = (reading.get("load") or {}).get("p95")
        return p95 if p95 is not None and p95 <= room else None

    try:
        wait_for(f"the host's load p95 at most {room:.2f}", quiet, timeout=120)
    except AssertionError:
        raise AssertionError(f"the host stayed busy: {describe_host(env, node)}") from None


def held_by(env: Env, node: str, claim: str) -> bool:
    """The node's ledger (status.allocated) still holds a share of ``claim`` (namespace/name)."""
    allocated = (capacity_node(env, node).get("status") or {}).get("allocated") or {}
    return any(h.get("claim") == claim for a in allocated.values() for h in a.get("holders", []))


def describe_host(env: Env, node: str) -> str:
    reading = ((capacity_node(env, node).get("status") or {}).get("readings") or {}).get(
        "host"
    ) or {}
    return f"host load {reading.get('load')}, samples {reading.get('samples')}"


def capctl(env: Env, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "capacity_cli", "--kubeconfig", str(env.kubeconfig),
         "--platform-namespace", env.platform, "calibration", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_calibration_learns_from_real_oom_kills_and_keeps_a_pinned_threshold(
    env: Env, real_node: str
) -> None:
    cluster, core, ns = env.cluster, env.core, env.namespace
    iso_low, iso_high = THRESHOLD_BOUNDS["theta_iso"]
    fit_high = THRESHOLD_BOUNDS["theta_fit"][1]
    # the loosest isolation, the spectral gates loose (the live host is noisy), and theta_fit
    # loose and pinned: the host's measured load also grows the fit error of a large share, so
    # theta_fit could explain the kills too; pinned, it must stay where it is
    calibration(
        env,
        thetaIso=str(iso_low),
        thetaFit=str(fit_high),
        thetaGlue=str(THRESHOLD_BOUNDS["theta_glue"][1]),
        thetaBurst=str(THRESHOLD_BOUNDS["theta_burst"][1]),
        pinned="thetaFit",
    )
    with ExitStack() as stack:
        proc = truthful_operator(env, period=PERIOD)
        proc.env.update(
            CAPACITY_OPERATOR_CALIBRATION_MIN_OUTCOMES=str(len(TIGHT) + len(LOOSE)),
            CAPACITY_OPERATOR_CALIBRATION_MAX_STEP="0.1",
        )
        op = stack.enter_context(Running(proc))
        stack.enter_context(Running(real_node_agent(env, real_node)))
        wait_full_window(env, real_node)

        # the stream: one claim at a time, so that each leaves 1 - share unpromised
        stream = [(s, True) for s in TIGHT] + [(s, False) for s in LOOSE]
        stream = [stream[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]  # interleaved
        for i, (share, tight) in enumerate(stream):
            name = f"s{i}"
            wait_room(env, real_node, share)
            cluster.create_claim(ns, name, cGeo=share, substrate="host")
            try:
                cluster.wait_phase(ns, name, {"Admitted"}, timeout=60)
            except AssertionError:
                raise AssertionError(f"{claim_status(cluster, ns, name)}\n{show(op)}") from None
            assert placement_nodes(claim_status(cluster, ns, name)) == [real_node]
            pod = unique(name)
            spec = oom_pod_spec() if tight else _clean_pod_spec()
            core.create_namespaced_pod(ns, labelled_pod(pod, name, spec))
            want = "Falsified" if tight else "Confirmed"

            def final(claim: str = name) -> str | None:
                verdict = truth_of(env, claim).get("verdict")
                return verdict if verdict not in (None, "Observing") else None

            try:
                verdict = wait_for(f"{name}'s verdict", final, timeout=90)
            except AssertionError:
                raise AssertionError(f"{describe(core, ns, pod)}\n{show(op)}") from None
            assert verdict == want, (name, share, truth_of(env, name))
            core.delete_namespaced_pod(pod, ns, grace_period_seconds=0)
            cluster.delete_claim(ns, name)
            wait_for(f"{name} gone", lambda claim=name: cluster.claim(ns, claim) is None,
                     timeout=30)  # fmt: skip
            # a claim has no finalizer: its share is freed from the deletion event, just after
            # the claim is gone; the next claim must find the node holding nothing of it
            wait_for(
                f"{name}'s share freed on {real_node}",
                lambda claim=name: not held_by(env, real_node, f"{ns}/{claim}"),
                timeout=30,
            )

        # the isolation each admission really left, as its vote read it (from the store)
        db = f"sqlite:///{(env.logs / 'op.log').with_suffix('.outcomes.db')}"
        rows = [r for r in stored_rows(db) if r["claim"].startswith(f"{ns}/s")]
        assert len(rows) == len(stream)
        left = {r["verdict"]: [] for r in rows}
        for r in rows:
            left[r["verdict"]].append(r["readings"][real_node]["isolation"])
        worst_failure, best_success = max(left["Falsified"]), min(left["Confirmed"])
        assert worst_failure < best_success

        # calibration moves theta_iso up, round after round, until no falsification is left
        path: list[float] = []

        def settled() -> bool:
            value = float(_data(env)["thetaIso"])
            if not path or path[-1] != value:
                path.append(value)
            return value > worst_failure

        try:
            wait_for("theta_iso above the worst failure", settled, timeout=60)
        except AssertionError:
            raise AssertionError(f"{path}\n{_data(env)}\n{show(op)}") from None
        data = _data(env)
        history = json.loads(data["history"])
        moves = [h for h in history if h["key"] == "thetaIso"]
        assert len(moves) >= 2, history  # bounded steps: it took more than one round
        step = 0.1 * (iso_high - iso_low)
        for before, after in itertools.pairwise(moves):
            assert after["from"] == before["to"]
        for move in moves:
            assert move["by"] == "calibration"
            assert move["outcomes"] == len(stream)
            assert iso_low <= move["from"] < move["to"] <= min(iso_high, best_success)
            assert move["to"] - move["from"] <= step + 1e-9
            assert "falsified" in move["why"]
        assert moves[0]["from"] == iso_low
        assert float(data["thetaIso"]) <= best_success
        # the pinned threshold did not move, though large shares also had the largest fit error
        assert float(data["thetaFit"]) == fit_high
        assert "thetaFit" not in {h["key"] for h in history}
        counters = json.loads(data["counters"])["host"]
        assert (counters["falsified"], counters["confirmed"]) == (len(TIGHT), len(LOOSE))
        wait_events(
            core, env.platform,
            f"involvedObject.name={CALIBRATION_CONFIGMAP},reason=ThresholdMoved",
            lambda e: "thetaIso" in e.message,
        )  # fmt: skip

        shown = capctl(env)
        assert "pinned" in shown
        assert f"{100 * len(TIGHT) / len(stream):.1f}%" in shown  # falsification rate
        assert moves[-1]["why"][:40] in shown

        # the agents pick the move up: a tight claim is refused now, a loose one admitted
        wait_room(env, real_node, TIGHT[0])
        cluster.create_claim(ns, "tight", cGeo=TIGHT[0], substrate="host")
        cluster.wait_phase(ns, "tight", {"Rejected"}, timeout=60)
        assert "theta_iso" in claim_status(cluster, ns, "tight")["message"]
        cluster.create_claim(ns, "loose", cGeo=LOOSE[-1], substrate="host")
        cluster.wait_phase(ns, "loose", {"Admitted"}, timeout=60)

        # capctl rolls the thresholds back to before the first move
        capctl(env, "rollback", "0")
        back = _data(env)
        assert float(back["thetaIso"]) == iso_low
        last = json.loads(back["history"])[-1]
        assert (last["by"], last["key"], last["to"]) == ("rollback", "thetaIso", iso_low)
        # the outcomes before the rollback no longer count: once the two new claims' verdicts
        # are counted (a round has run since), nothing has moved
        wait_for(
            "the two new verdicts counted",
            lambda: sum(json.loads(_data(env)["counters"])["host"].values()) == len(stream) + 2,
            timeout=PERIOD + 30,
        )
        after = _data(env)
        assert float(after["thetaIso"]) == iso_low
        assert json.loads(after["history"])[-1] == last

        # pins through capctl: unpinning the last one removes the key, pinning writes it
        capctl(env, "unpin", "thetaFit")
        assert "pinned" not in _data(env)
        shown = capctl(env, "pin", "thetaGlue", "thetaBurst")
        assert _data(env)["pinned"] == "thetaBurst,thetaGlue"
        assert shown.count("pinned") == 2
