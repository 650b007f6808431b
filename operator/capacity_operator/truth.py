"""Truth keeping (DESIGN section 7): each admission and each rejection checked against what really
happened during ``truth_observation_seconds``.

The operator reads, :mod:`capacity_api.truth` decides, the operator writes:

- the pods bound to a claim come from a kopf index of pods carrying the claim label (see
  :func:`pod_view`), so no pod gets a handler, a finalizer or an annotation of ours, and no
  claim check costs an API request;
- placement and candidate nodes come from the engine's CapacityNode cache;
- what changes is written to ``status.truth`` with compare-and-swap, with the ``Falsified``
  condition (True with the evidence, or False, reason ``Confirmed``) and an Event.

A rejected claim's candidates are the nodes that could ever hold it; their lowest headroom so
far is kept in ``status.truth.headroom`` (rewritten when a value drops by more than
:data:`HEADROOM_STEP`, so the period survives an operator restart without a write per pass).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from capacity_api import reasons
from capacity_api import truth as decide
from capacity_api.admission import ClaimError, claim_substrate, node_share
from capacity_api.models import CapacityClaim, Phase, Truth, Verdict
from capacity_operator.kube import JSON, ConflictError, NotFoundError
from capacity_operator.protocol import Engine, EventSink, with_condition
from capacity_operator.store import OutcomeRow, OutcomeStore, decision_id

log = logging.getLogger(__name__)

HEADROOM_STEP = 0.01
"""A candidate's lowest headroom is written again only when it dropped by more than this."""

_POD_STATUS_KEYS = ("phase", "reason", "message", "startTime", "containerStatuses",
                    "initContainerStatuses")  # fmt: skip


def pod_view(body: Mapping[str, Any]) -> JSON:
    """What truth needs of a pod (kept in the operator's index instead of the whole pod)."""
    status = body.get("status") or {}
    metadata = body.get("metadata") or {}
    return {
        "metadata": {
            "name": metadata.get("name"),
            "deletionTimestamp": metadata.get("deletionTimestamp"),
        },
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": {k: status[k] for k in _POD_STATUS_KEYS if k in status},
    }


def observed(status: Mapping[str, Any]) -> bool:
    """A decision whose check is still open: the claims the truth loop looks at each pass."""
    phase = status.get("phase")
    if phase not in (Phase.ADMITTED.value, Phase.REJECTED.value):
        return False
    truth = status.get("truth") or {}
    return truth.get("decision") != phase or truth.get("verdict") == Verdict.OBSERVING.value


def _decided_at(claim: CapacityClaim, fallback: datetime) -> datetime:
    """When the claim got its current decision (the Admitted condition's transition)."""
    for c in (claim.status.conditions or []) if claim.status else []:
        if c.type == reasons.ADMITTED and c.last_transition_time is not None:
            return c.last_transition_time
    return fallback


class TruthKeeper:
    """Checks the claims under observation (:meth:`run`, one pass per truth interval) against
    the pod index and the node cache."""

    def __init__(self, engine: Engine, emit: EventSink, store: OutcomeStore | None = None) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.emit = emit
        self.store = store
        self._started: set[str] = set()
        """Claims (by uid) whose decision this process recorded in the store; kept only while
        the claim is under observation (each pass of :meth:`run` drops the others)."""

    @property
    def period(self) -> timedelta:
        return timedelta(seconds=self.settings.truth_observation_seconds)

    async def run(
        self,
        pods: Mapping[tuple[str, str], Iterable[Mapping[str, Any]]],
        kubelet: Mapping[str, Iterable[Iterable[Mapping[str, Any]]]],
        indexed: asyncio.Event,
    ) -> None:
        """Every ``truth_interval_seconds``, check each claim under observation (:func:`observed`,
        among the engine's claims: the admission loop keeps every claim's newest body anyway, so
        a kopf index of them cost a second bookkeeping per claim event) against its pods and its
        nodes' kubelet pressure (kopf's indexes), once kopf has filled those (``indexed``) and
        the engine is ready."""
        await indexed.wait()
        await self.engine.ready.wait()
        interval = self.settings.truth_interval_seconds
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if self.engine.paused:
                # a copy paused by peering keeps still: its watches stopped with kopf's, and
                # the active copy checks the same claims
                await asyncio.sleep(interval)
                continue
            pressure = {
                node: [c for conditions in store for c in conditions]
                for node, store in list(kubelet.items())
            }
            checked: set[str] = set()
            for uid, body in list(self.engine.claims.items()):
                if not observed(body.get("status") or {}):
                    continue
                checked.add(uid)
                meta = body["metadata"]
                key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
                try:
                    await self.check(body, list(pods.get(key) or ()), pressure)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("truth check of claim %s/%s failed; next pass retries", *key)
            self._started &= checked  # deleted claims, and checks that closed
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    async def check(
        self,
        body: JSON,
        pods: Iterable[Mapping[str, Any]],
        kubelet: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
    ) -> None:
        """Look at one claim now (the truth loop calls this once per pass)."""
        now = self.engine.clock()
        claim = self.engine.parsed(body)
        status = claim.status
        if status is None or status.phase not in (Phase.ADMITTED, Phase.REJECTED):
            return
        current = status.truth
        if current is None or current.decision is not status.phase:
            current = decide.start(status.phase, _decided_at(claim, now), self.period)
            fresh = True
        else:
            fresh = False
        new: Truth | None
        if status.phase is Phase.ADMITTED:
            new = self._admitted(claim, current, pods, kubelet or {}, now)
        else:
            new = self._rejected(claim, current, now)
        if new is None:
            return
        uid = claim.metadata.uid or ""
        if uid not in self._started:
            # what the decision was made on goes to the store once per process (an upsert:
            # after a restart it is recorded again, still one row)
            self._started.add(uid)
            await self._record(claim, new, first=True)
        quiet = new.decision is Phase.ADMITTED and new.verdict is Verdict.OBSERVING
        if fresh and quiet:
            return  # its start follows from the Admitted condition: nothing to write yet
        if not fresh and not self._worth_writing(current, new):
            return
        if await self._write(claim, body, new):
            await self._record(claim, new, first=False)

    def _admitted(
        self, claim: CapacityClaim, current: Truth, pods: Iterable[Mapping[str, Any]],
        kubelet: Mapping[str, Iterable[Mapping[str, Any]]], now: datetime,
    ) -> Truth:  # fmt: skip
        since = current.since
        limit = self.settings.truth_restart_limit
        evidence = [e for pod in pods for e in decide.pod_evidence(pod, since, limit)]
        placed = {p.node for p in (claim.status.placements or [])} if claim.status else set()
        for name in sorted(placed):
            node = self.engine.nodes.get(name)
            if node is not None:
                evidence += decide.node_evidence(node, since)
            evidence += decide.kubelet_evidence(name, kubelet.get(name, ()), since)
        return decide.judge_admitted(current, evidence, now)

    def _rejected(self, claim: CapacityClaim, current: Truth, now: datetime) -> Truth | None:
        try:
            substrate = claim_substrate(claim.spec)
        except ClaimError:
            return None  # refused as malformed: nothing could have held it
        shares: dict[str, float] = {}
        headroom: dict[str, float | None] = {}
        for view in self.engine.views():
            share = node_share(claim.spec, substrate, view.node)
            if share is None or share > 1.0:
                continue
            shares[view.name] = share
            usable = view.fresh and view.lease_live
            headroom[view.name] = view.headroom(substrate) if usable else None
        rejection = decide.Rejection(shares=shares, replicas=claim.spec.replicas)
        return decide.judge_rejected(current, rejection, headroom, now)

    @staticmethod
    def _worth_writing(old: Truth, new: Truth) -> bool:
        if new.verdict is not old.verdict or new.evidence != old.evidence:
            return True
        before, after = old.headroom or {}, new.headroom or {}
        return any(
            name not in before or before[name] - value > HEADROOM_STEP
            for name, value in after.items()
        )

    async def _record(self, claim: CapacityClaim, truth: Truth, *, first: bool) -> None:
        """Queue the decision and its outcome for the outcome store (never waits on it). The
        decision's inputs (votes' readings, fingerprints, thresholds) go with the first record
        only, when the observation starts: later records leave them as stored."""
        if self.store is None:
            return
        status = claim.status
        assert status is not None
        meta = claim.metadata
        try:
            substrate: str | None = claim_substrate(claim.spec).value
        except ClaimError:
            substrate = None
        if truth.decision is Phase.ADMITTED:
            nodes = sorted({p.node for p in status.placements or []})
        else:
            nodes = sorted(truth.headroom or {})
        readings = fingerprints = thresholds = None
        if first:
            # each placement vote with its readings, its YES or NO and the gate that said NO:
            # what calibration replays (capacity_api.calibration)
            readings = {
                n: {**v.readings, "vote": v.vote.value, "gate": v.gate}
                for n, v in (status.votes or {}).items()
                if v.readings
            }
            fingerprints = {}
            for name in sorted({*nodes, *(status.votes or {})}):
                node = self.engine.nodes.get(name)
                reading = (
                    (node.status.readings or {}).get(substrate or "")
                    if node is not None and node.status
                    else None
                )
                if reading is not None and reading.fingerprint:
                    fingerprints[name] = list(reading.fingerprint)
            thresholds = (await self.engine.thresholds()).to_configmap()
        self.store.record(
            OutcomeRow(
                decision_id=decision_id(meta.uid or "", truth.decision.value, truth.since),
                claim=f"{meta.namespace}/{meta.name}",
                claim_uid=meta.uid or "",
                decision=truth.decision.value,
                decided_at=truth.since,
                verdict=truth.verdict.value,
                substrate=substrate,
                request=claim.spec.wire(),
                nodes=nodes,
                readings=readings,
                fingerprints=fingerprints,
                thresholds=thresholds,
                evidence=[e.wire() for e in truth.evidence or []] or None,
                headroom=truth.headroom,
                outcome_at=truth.decided_at,
            )
        )

    async def _write(self, claim: CapacityClaim, body: JSON, new: Truth) -> bool:
        patch: JSON = {"truth": new.wire()}
        message = decide.summary(new)
        final = new.verdict is not Verdict.OBSERVING
        if final and new.decision is Phase.ADMITTED:
            falsified = new.verdict is Verdict.FALSIFIED
            reason = (
                (new.evidence or [])[0].kind
                if falsified and new.evidence
                else (Verdict.CONFIRMED.value)
            )
            patch["conditions"] = with_condition(
                claim, type_=reasons.FALSIFIED, value=falsified, reason=reason,
                message=message[:1024], generation=claim.metadata.generation,
            )  # fmt: skip
        try:
            await self.engine.kube.patch_claim_status_cas(
                claim.metadata.namespace or "",
                claim.metadata.name or "",
                claim.metadata.resource_version or "",
                patch,
            )
        except (ConflictError, NotFoundError):
            return False  # the claim moved on; the next tick looks again
        if not final:
            return True
        key = f"{claim.metadata.namespace}/{claim.metadata.name}"
        if new.verdict is Verdict.FALSIFIED:
            log.warning("claim %s %s", key, message)
            self.emit(body, "Warning", reasons.FALSIFIED, message)
        else:
            log.info("claim %s: %s", key, message)
            self.emit(body, "Normal", new.verdict.value, message)
        return True
