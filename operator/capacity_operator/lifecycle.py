"""Node lifecycle: keeps each CapacityNode's liveness true and recovers the claims of failed
nodes, as the Kubernetes node lifecycle controller does for Nodes (DESIGN section 6).

One pass every ``lifecycle_interval_seconds`` (only in the operator copy that peering lets act):

1. every node with a Lease in the platform namespace (its agent joined) whose cached Lease looks
   expired is confirmed with a live read of the Lease (until the node is failed);
2. more than ``partition_fraction`` of the nodes expired at once: a partition; nodes are marked
   stale but nothing moves, and a Warning Event on each expired node says why;
3. an expired node gets ``Ready=Unknown`` (``LeaseExpired``, or ``NodeFailed`` past the grace
   period) and ``Stale=True``, so its last readings are never used as current;
   (the grace period counts from when this process first saw the Lease expired, so a freshly
   started operator gives every node one grace period to renew);
4. a failed node is fenced: tainted ``capacity.platform.dev/failed:NoExecute`` on its Kubernetes
   Node where one exists; then each claim holding a share on it recovers (rate-limited), through
   :meth:`Engine.recover`;
5. a failed node whose Lease is live again is trusted once it published a full window measured
   since it came back: then the taint goes.

Decisions are the pure functions of :mod:`capacity_api.recovery`; this module reads and writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from capacity_api import reasons
from capacity_api.lease import LeaseInfo
from capacity_api.models import CapacityNode, WitnessReport
from capacity_api.recovery import (
    Decision,
    Liveness,
    PartitionCheck,
    TokenBucket,
    Witnesses,
    assess,
    decide,
    expired_at,
    expired_seconds,
    partition,
    peering_active,
    tally,
    trusted_again,
)
from capacity_operator.kube import JSON, ConflictError, Kube, NotFoundError, parse_claim
from capacity_operator.protocol import Engine, EventSink

log = logging.getLogger(__name__)

FAILED_TAINT = "capacity.platform.dev/failed"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _node_body(node: CapacityNode) -> JSON:
    return {
        "apiVersion": node.api_version,
        "kind": "CapacityNode",
        "metadata": {"name": node.metadata.name, "uid": node.metadata.uid},
    }


class Lifecycle:
    """The node lifecycle loop of one operator process."""

    def __init__(
        self,
        engine: Engine,
        kube: Kube,
        emit: EventSink,
        *,
        priority: int,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.engine = engine
        self.kube = kube
        self.settings = engine.settings
        self.emit = emit
        self.priority = priority
        self.clock = clock
        self.partitioned = False
        self.bucket = TokenBucket(self.settings.recoveries_per_minute, self.settings.recovery_burst)
        self._limited: set[str] = set()
        self.seen_expired: dict[str, datetime] = {}
        """When this process first saw each node's Lease expired (the grace runs from then)."""

    async def run(self) -> None:
        await self.engine.ready.wait()
        await self._remember_fenced()
        while True:
            try:
                active = await self.active()
                self.engine.paused = not active
                if active:
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node lifecycle pass failed; next pass in %gs", self.interval)
            await asyncio.sleep(self.interval)

    async def _remember_fenced(self) -> None:
        """Nodes fenced by an earlier operator copy (it died, or this one restarted) are trusted
        again only as a returning node is: after a full window measured from now."""
        now = self.clock()
        for _ in range(self.settings.commit_retries):
            try:
                fenced = await self.kube.nodes_tainted(FAILED_TAINT)
            except Exception:
                log.exception("could not list fenced nodes; retrying")
                await asyncio.sleep(self.interval)
                continue
            for name in fenced:
                self.engine.returning.setdefault(name, now)
            if fenced:
                log.info("fenced by an earlier copy, not used until trusted again: %s", fenced)
            return

    @property
    def interval(self) -> float:
        return self.settings.lifecycle_interval_seconds

    async def active(self) -> bool:
        if self.settings.standalone:
            return True
        status = await self.kube.peering_status(self.settings.peering)
        return peering_active(status, self.priority, self.clock())

    async def tick(self) -> None:
        now = self.clock()
        engine = self.engine
        leases: dict[str, LeaseInfo | None] = {}
        # only nodes whose agent joined this platform (a Lease in its namespace): a CapacityNode
        # without one is never placed on, and never fenced
        for name in sorted(set(engine.nodes) & set(engine.leases)):
            lease = engine.leases.get(name)
            if expired_seconds(lease, now) is not None and name not in engine.failed:
                # never act on the watch cache alone: a live read confirms the expiry (a node
                # already failed needs none: nothing more is done to it, and the watch shows
                # its renewal when it comes back)
                lease = await self.kube.get_lease(self.settings.namespace, name)
                if lease is None:
                    continue  # the Lease is gone; its deletion event drops it from the cache
                engine.observe_lease(lease)
            leases[name] = lease
        alive = [n for n, lease in leases.items() if expired_seconds(lease, now) is None]
        # what the witnesses say is read only while some node is expired; tally() keeps the
        # reports of alive witnesses only
        reports = self._witness_reports() if len(alive) < len(leases) else {}
        check = partition(leases, now, self.settings.partition_fraction)
        if check.partitioned != self.partitioned:
            self._partition_changed(check, leases, now)
        for name, lease in leases.items():
            witnesses = None
            if expired_seconds(lease, now) is None:
                self.seen_expired.pop(name, None)
            else:
                self.seen_expired.setdefault(name, now)
                witnesses = tally(name, reports, alive, expired_at(lease))
            state = assess(
                lease,
                now,
                self.settings.failure_grace_seconds,
                self.seen_expired.get(name),
                witnesses=witnesses,
                witness_quorum=self.settings.witness_quorum,
            )
            if state is Liveness.ALIVE:
                await self._alive(name, lease, now)
                continue
            await self._mark_expired(name, lease, state, now, witnesses)
            if state is Liveness.FAILED and not check.partitioned and name not in engine.failed:
                await self._fence(name, now)
        if not check.partitioned and engine.failed:
            await self._recover_claims(now)
        try:
            # the thresholds in force are re-read here too (at most every 5 s), so that an edit
            # of the calibration ConfigMap is picked up, or refused with an Event, within
            # seconds even while no claim is decided
            await engine.thresholds()
        except Exception:
            log.exception("could not read the calibration ConfigMap; keeping the thresholds")

    def _partition_changed(
        self, check: PartitionCheck, leases: dict[str, LeaseInfo | None], now: datetime
    ) -> None:
        self.partitioned = check.partitioned
        if check.partitioned:
            log.warning("%s", check.message)
        else:
            log.info("partition cleared: %d of %d node leases expired", check.expired, check.total)
        for name, lease in leases.items():
            node = self.engine.nodes.get(name)
            if node is None or expired_seconds(lease, now) is None:
                continue
            if check.partitioned:
                self.emit(_node_body(node), "Warning", reasons.PARTITION_SUSPECTED, check.message)
            else:
                self.emit(
                    _node_body(node), "Normal", reasons.PARTITION_SUSPECTED,
                    "partition cleared: recovery resumes",
                )  # fmt: skip

    def _witness_reports(self) -> dict[str, list[WitnessReport]]:
        """Each cached CapacityNode's witness reports, by the witness's node name."""
        return {
            name: node.status.witness.reports or []
            for name, node in self.engine.nodes.items()
            if node.status is not None and node.status.witness is not None
        }

    # -- one node ------------------------------------------------------------------------------

    async def _alive(self, name: str, lease: LeaseInfo | None, now: datetime) -> None:
        engine = self.engine
        if name in engine.failed:
            engine.failed.pop(name)
            engine.returning.setdefault(name, now)
            log.info("node %s renews its lease again; not used until it filled its window", name)
        since = engine.returning.get(name)
        if since is None:
            return
        node = engine.nodes.get(name)
        if not trusted_again(node, lease, since, now, engine.min_samples):
            await self._set_fenced(
                name, True, reasons.RETURNING,
                f"renews its lease again; not used until it publishes a full window "
                f"({engine.min_samples} samples) measured since {_iso(since)}",
                now,
            )  # fmt: skip
            return
        engine.returning.pop(name)
        message = "renewed its lease and published a full window since it came back: trusted again"
        log.info("node %s %s", name, message)
        await self._unfence(name)
        await self._set_fenced(name, False, reasons.NODE_RETURNED, message, now)
        if node is not None:
            self.emit(_node_body(node), "Normal", reasons.NODE_RETURNED, message)

    async def _write_conditions(self, name: str, new: list[JSON]) -> CapacityNode | None:
        """Compare-and-swap the node's conditions of the types in ``new`` (the others kept);
        nothing is written when each already has that status and reason. Returns the node
        written, or None."""
        kinds = {c["type"] for c in new}
        async with self.engine.node_lock(name):
            for _ in range(self.settings.commit_retries):
                node = self.engine.nodes.get(name)
                if node is None:
                    return None
                conditions = node.status.conditions or [] if node.status else []
                have = {c.type: (c.status.value, c.reason) for c in conditions}
                if all(have.get(c["type"]) == (c["status"], c["reason"]) for c in new):
                    return None
                wanted = [c.wire() for c in conditions if c.type not in kinds] + new
                try:
                    await self.engine.write_node_status(name, node, {"conditions": wanted})
                except ConflictError:
                    await self.engine.refresh_node(name)
                    continue
                except NotFoundError:
                    return None
                return node
        return None

    async def _set_fenced(
        self, name: str, fenced: bool, reason: str, message: str, now: datetime
    ) -> None:
        condition: JSON = {
            "type": reasons.FENCED,
            "status": "True" if fenced else "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": _iso(now),
        }
        if await self._write_conditions(name, [condition]) is not None:
            log.info("node %s: Fenced=%s (%s): %s", name, condition["status"], reason, message)

    async def _mark_expired(
        self,
        name: str,
        lease: LeaseInfo | None,
        state: Liveness,
        now: datetime,
        witnesses: Witnesses | None,
    ) -> None:
        reason = reasons.NODE_FAILED if state is Liveness.FAILED else reasons.LEASE_EXPIRED
        if state is Liveness.SUSPECT and witnesses is not None and witnesses.alive:
            reason = reasons.WITNESSED_ALIVE
        if lease is None or lease.renew_time is None:
            message = "no Lease renewed by its agent"
        else:
            past = expired_seconds(lease, now) or 0.0
            message = (
                f"lease renewed at {_iso(lease.renew_time)} expired {past:.0f}s ago "
                f"(duration {lease.duration_seconds}s); readings are stale"
            )
        if witnesses is not None:
            message += f"; {witnesses.summary}"
        if reason == reasons.WITNESSED_ALIVE:
            message += ": its agent runs but cannot renew; nothing moves while it is seen"
        if state is Liveness.FAILED:
            message += "; node failed: fenced, its claims recover elsewhere"
        stamp = _iso(now)
        written = await self._write_conditions(
            name,
            [
                {"type": reasons.READY, "status": "Unknown", "reason": reason,
                 "message": message, "lastTransitionTime": stamp},
                {"type": reasons.STALE, "status": "True", "reason": reasons.LEASE_EXPIRED,
                 "message": message, "lastTransitionTime": stamp},
            ],
        )  # fmt: skip
        if written is None:
            return
        log.warning("node %s: Ready=Unknown (%s): %s", name, reason, message)
        if state is Liveness.FAILED:
            self.emit(_node_body(written), "Warning", reason, message)

    async def _fence(self, name: str, now: datetime) -> None:
        """Taint the Kubernetes Node (where one exists); then the node counts as failed."""
        for _ in range(self.settings.commit_retries):
            found = await self.kube.node_taints(name)
            if found is None:
                break  # no Kubernetes Node by that name: the lease is the fence
            version, taints = found
            if any(t.get("key") == FAILED_TAINT for t in taints):
                break
            taints.append({"key": FAILED_TAINT, "effect": "NoExecute", "timeAdded": _iso(now)})
            try:
                await self.kube.set_node_taints(name, taints, version)
            except ConflictError:
                continue
            log.warning("node %s fenced: tainted %s:NoExecute", name, FAILED_TAINT)
            break
        self.engine.failed[name] = now
        self.engine.returning.pop(name, None)
        await self._set_fenced(
            name, True, reasons.NODE_FENCED,
            f"failed: tainted {FAILED_TAINT}:NoExecute where a Node exists, its allocations "
            "frozen, its claims recover elsewhere",
            now,
        )  # fmt: skip

    async def _unfence(self, name: str) -> None:
        for _ in range(self.settings.commit_retries):
            found = await self.kube.node_taints(name)
            if found is None:
                return
            version, taints = found
            kept = [t for t in taints if t.get("key") != FAILED_TAINT]
            if len(kept) == len(taints):
                return
            try:
                await self.kube.set_node_taints(name, kept, version)
            except ConflictError:
                continue
            log.info("node %s: taint %s removed", name, FAILED_TAINT)
            return

    # -- claims --------------------------------------------------------------------------------

    async def _recover_claims(self, now: datetime) -> None:
        keys: set[str] = set()
        for name in self.engine.failed:
            keys.update(self.engine.ledger.claims_on(name))
        for key in sorted(keys):
            namespace, _, claim_name = key.partition("/")
            try:
                body = await self.kube.get_claim(namespace, claim_name)
            except NotFoundError:
                continue
            decision = decide(parse_claim(body), self.engine.failed)
            if decision.decision is Decision.UNAFFECTED:
                continue
            if decision.decision is Decision.RECOVER and not self.bucket.take(now):
                if key not in self._limited:
                    self._limited.add(key)
                    message = (
                        f"{decision.message}; recovery waits for the rate limit "
                        f"({self.settings.recoveries_per_minute:g} per minute)"
                    )
                    self.emit(body, "Warning", reasons.RECOVERY_RATE_LIMITED, message)
                continue
            self._limited.discard(key)
            try:
                await self.engine.recover(body, decision)
            except ConflictError:
                continue  # the claim moved on; the next pass decides again
