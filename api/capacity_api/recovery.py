"""Failure detection and recovery decisions (DESIGN section 6), pure and clock-injected.

A node is ``Alive`` while its Lease is within ``renewTime + leaseDurationSeconds``; past that it is
``Suspect`` (its readings are no longer used by anyone); a Suspect node is ``Failed`` once a
quorum of witness agents report that they cannot see it alive either (its Lease expired in their
own read, its agent's health endpoint not answering), or, without that quorum and with no
witness seeing it alive, once it has stayed expired for ``failure_grace_seconds`` (the hard grace
period). A node that any witness still sees alive stays Suspect: its pods may well run, and
moving them would count their capacity twice. A failed node is fenced,
then each claim placed on it recovers its lost share elsewhere. A node that comes back is
trusted again only after it renewed its Lease and published a full window (``minSamples``)
measured after it came back.

Safety valves, as in the Kubernetes node lifecycle controller: when more than
``partition_fraction`` of the nodes expire at once it is a partition of the operator or the API
server, and nothing moves; recoveries are rate-limited by a token bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from capacity_api import reasons
from capacity_api.admission import NodeView, NoPlacement, PlacementPlan, plan_placement
from capacity_api.lease import LeaseInfo
from capacity_api.models import (
    CapacityClaim,
    CapacityNode,
    Phase,
    Placement,
    Probe,
    RecoveryPolicy,
    RecoverySpec,
    Substrate,
    WitnessReport,
)
from capacity_api.webhook import HOSTNAME_KEY


class Liveness(StrEnum):
    ALIVE = "Alive"
    SUSPECT = "Suspect"
    FAILED = "Failed"


def expired_seconds(lease: LeaseInfo | None, now: datetime) -> float | None:
    """Seconds past ``renewTime + leaseDurationSeconds``; None while live. A node without a
    Lease, or whose Lease was never renewed, counts as expired since forever."""
    if lease is None or lease.renew_time is None:
        return float("inf")
    past = (now - lease.renew_time).total_seconds() - lease.duration_seconds
    return past if past > 0 else None


@dataclass(frozen=True, slots=True)
class Witnesses:
    """What the witnesses say of one suspect node: how many see it dead, how many alive."""

    dead: tuple[str, ...] = ()
    alive: tuple[str, ...] = ()

    def confirmed(self, quorum: int) -> bool:
        return not self.alive and quorum > 0 and len(self.dead) >= quorum

    @property
    def summary(self) -> str:
        if self.alive:
            return f"witness {', '.join(self.alive)} still sees it alive"
        if self.dead:
            return f"confirmed by {len(self.dead)} witness(es): {', '.join(self.dead)}"
        return "no witness reported"


def tally(
    suspect: str,
    reports: Mapping[str, Iterable[WitnessReport]],
    alive_nodes: Iterable[str],
    expired_at: datetime | None,
) -> Witnesses:
    """The witness reports on ``suspect`` that count: from nodes that are alive themselves (by
    their own Lease, in the caller's read), other than the suspect, and made after its Lease
    expired (``expired_at``; None: any time), so a report from before the outage is not
    evidence of it. ``reports`` maps each witness node to its reports."""
    live = set(alive_nodes) - {suspect}
    dead: list[str] = []
    alive: list[str] = []
    for witness in sorted(live & set(reports)):
        for report in reports[witness]:
            if report.node != suspect:
                continue
            seen = report.observed_at
            if seen.tzinfo is None and expired_at is not None:
                seen = seen.replace(tzinfo=expired_at.tzinfo)
            if expired_at is not None and seen < expired_at:
                continue
            (alive if report.alive else dead).append(witness)
            break
    return Witnesses(tuple(dead), tuple(alive))


def expired_at(lease: LeaseInfo | None) -> datetime | None:
    """When ``renewTime + leaseDurationSeconds`` passed (None: never renewed, or no Lease)."""
    if lease is None or lease.renew_time is None:
        return None
    return lease.renew_time + timedelta(seconds=lease.duration_seconds)


def assess(
    lease: LeaseInfo | None,
    now: datetime,
    failure_grace_seconds: float,
    seen_expired_since: datetime | None = None,
    *,
    witnesses: Witnesses | None = None,
    witness_quorum: int = 0,
) -> Liveness:
    """A node's liveness from its Lease (which the caller confirmed with a live read) and what
    the witnesses say.

    Expired and confirmed by ``witness_quorum`` witnesses (none seeing it alive): Failed at once.
    Expired and seen alive by a witness: Suspect, however long. Otherwise Failed after the hard
    grace period, which runs from when the lease expired, but never from before
    ``seen_expired_since``, when this operator first saw it expired: as the Kubernetes node
    lifecycle controller measures from its own observations, an operator that starts (or comes
    back) after a long outage gives every node one grace period to renew before failing it.
    """
    past = expired_seconds(lease, now)
    if past is None:
        return Liveness.ALIVE
    if witnesses is not None:
        if witnesses.alive:
            return Liveness.SUSPECT
        if witnesses.confirmed(witness_quorum):
            return Liveness.FAILED
    if seen_expired_since is not None:
        past = min(past, (now - seen_expired_since).total_seconds())
    return Liveness.FAILED if past >= failure_grace_seconds else Liveness.SUSPECT


@dataclass(frozen=True, slots=True)
class PartitionCheck:
    partitioned: bool
    expired: int
    total: int

    @property
    def message(self) -> str:
        return (
            f"{self.expired} of {self.total} node leases expired at once: treated as a "
            "partition of the operator or the API server; nothing is moved until it clears"
        )


def partition(
    leases: Mapping[str, LeaseInfo | None], now: datetime, fraction: float
) -> PartitionCheck:
    """Whether more than ``fraction`` of the nodes' leases are expired."""
    total = len(leases)
    expired = sum(1 for lease in leases.values() if expired_seconds(lease, now) is not None)
    return PartitionCheck(total > 0 and expired > fraction * total, expired, total)


class Decision(StrEnum):
    UNAFFECTED = "Unaffected"
    RECOVER = "Recover"
    FAIL = "Fail"


@dataclass(frozen=True, slots=True)
class RecoveryDecision:
    decision: Decision
    lost: tuple[str, ...] = ()
    reason: str = ""
    message: str = ""


def decide(claim: CapacityClaim, failed: Iterable[str]) -> RecoveryDecision:
    """What an Admitted claim does about its placement nodes that failed."""
    status = claim.status
    if status is None or status.phase is not Phase.ADMITTED:
        return RecoveryDecision(Decision.UNAFFECTED)
    failed_set = set(failed)
    lost = tuple(sorted({p.node for p in status.placements or [] if p.node in failed_set}))
    if not lost:
        return RecoveryDecision(Decision.UNAFFECTED)
    where = ", ".join(lost)
    recovery = claim.spec.recovery or RecoverySpec()
    if recovery.policy is RecoveryPolicy.NONE:
        return RecoveryDecision(
            Decision.FAIL,
            lost,
            reasons.NODE_FAILED,
            f"placement node {where} failed and spec.recovery.policy is None",
        )
    done = len(status.recoveries or [])
    if done >= recovery.max_recoveries:
        return RecoveryDecision(
            Decision.FAIL,
            lost,
            reasons.MAX_RECOVERIES,
            f"placement node {where} failed after {done} recoveries "
            f"(spec.recovery.maxRecoveries {recovery.max_recoveries})",
        )
    return RecoveryDecision(
        Decision.RECOVER, lost, reasons.NODE_FAILED, f"placement node {where} failed"
    )


def survivors(claim: CapacityClaim, lost: Iterable[str]) -> list[Placement]:
    gone = set(lost)
    status = claim.status
    return [p for p in (status.placements or []) if p.node not in gone] if status else []


def plan_recovery(
    claim: CapacityClaim,
    substrate: Substrate,
    views: Iterable[NodeView],
    lost: Iterable[str],
    excluded: Iterable[str] = (),
    *,
    min_isolation: float = 0.0,
    distrusted: Iterable[str] | None = None,
) -> PlacementPlan | NoPlacement:
    """Placement for the lost part only: as many nodes as were lost, never a ``distrusted`` node
    (failed, or back and not trusted again yet; by default every lost node) nor a node that
    already holds a share of the claim. A lost node that is trusted again may take its share
    back (the commit then replaces its old holder there)."""
    lost_nodes = set(lost)
    barred = lost_nodes if distrusted is None else set(distrusted)
    keep = {p.node for p in survivors(claim, lost_nodes)}
    usable = [v for v in views if v.name not in barred and v.name not in keep]
    spec = claim.spec.model_copy(update={"replicas": len(lost_nodes)})
    return plan_placement(spec, substrate, usable, excluded, min_isolation=min_isolation)


def recovery_moves(lost: Iterable[str], placement: Iterable[str]) -> dict[str, str]:
    """Which new placement node takes each lost node's share: a lost node placed again takes
    its own back; the others pair with the new nodes in order."""
    lost_nodes, placed = sorted(set(lost)), list(placement)
    back = {n: n for n in lost_nodes if n in placed}
    fresh = [n for n in placed if n not in back]
    return {**back, **dict(zip([n for n in lost_nodes if n not in back], fresh, strict=False))}


@dataclass
class TokenBucket:
    """Recoveries allowed: ``burst`` at once, refilled at ``per_minute``."""

    per_minute: float
    burst: int
    tokens: float = field(init=False)
    at: datetime | None = None

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: datetime) -> bool:
        if self.at is not None:
            elapsed = max(0.0, (now - self.at).total_seconds())
            self.tokens = min(float(self.burst), self.tokens + elapsed * self.per_minute / 60.0)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def trusted_again(
    node: CapacityNode | None, lease: LeaseInfo | None, since: datetime, now: datetime,
    min_samples: int,
) -> bool:  # fmt: skip
    """A node that failed may be used again once its Lease is live and it published, after
    ``since`` (when it came back), readings whose every window holds ``min_samples``."""
    if lease is None or not lease.live(now) or node is None or node.status is None:
        return False
    readings = (node.status.readings or {}).values()
    if not readings:
        return False
    for reading in readings:
        observed = reading.observed_at
        if observed.tzinfo is None:
            observed = observed.replace(tzinfo=since.tzinfo)
        if observed <= since or reading.samples < min_samples:
            return False
    return True


def stranded_on(pod: Mapping[str, Any], lost: Iterable[str]) -> str | None:
    """Why a pod of a recovered claim must go, or None: it runs on a failed node, or it was
    created while the claim still named the failed node (the fence's NoExecute taint evicts the
    old pods at once, and their controller recreates them before the claim moves) and is bound
    to it, so it could never be scheduled."""
    gone = set(lost)
    spec = pod.get("spec") or {}
    node = spec.get("nodeName")
    if node:
        return f"on failed node {node}" if node in gone else None
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in required.get("nodeSelectorTerms") or []:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == HOSTNAME_KEY and gone & set(expr.get("values") or []):
                return "unscheduled, bound to the failed node"
    return None


def peering_active(
    status: Mapping[str, Any] | None, priority: int, now: datetime
) -> bool:  # fmt: skip
    """Whether this operator copy is the one that acts, from the ClusterKopfPeering status
    (kopf's rule: a copy pauses while a live peer has a higher or the same priority). The copy
    itself is among the peers, so exactly one entry with our priority is ours."""
    same = 0
    for info in (status or {}).values():
        if not isinstance(info, Mapping):
            continue
        seen = str(info.get("lastseen") or "")
        lifetime = float(info.get("lifetime") or 60)
        try:
            last = datetime.fromisoformat(seen.replace("Z", "+00:00"))
        except ValueError:
            continue
        if last.tzinfo is None:
            last = last.replace(tzinfo=now.tzinfo)
        if (now - last).total_seconds() > lifetime:
            continue
        other = int(info.get("priority") or 0)
        if other > priority:
            return False
        if other == priority:
            same += 1
    return same <= 1


MAX_WITNESS_REPORTS = 16
"""Reports one witness keeps (``status.witness.reports`` is bounded by the schema too)."""


def suspects(
    leases: Iterable[LeaseInfo], hosted: Iterable[str], now: datetime
) -> list[LeaseInfo]:  # fmt: skip
    """The Leases a witness reports on: expired ones of nodes it does not host, longest expired
    first, at most :data:`MAX_WITNESS_REPORTS`."""
    mine = set(hosted)
    expired = [
        (past, lease.name, lease)
        for lease in leases
        if lease.name not in mine and (past := expired_seconds(lease, now)) is not None
    ]
    expired.sort(key=lambda item: (-item[0], item[1]))
    return [lease for _, _, lease in expired[:MAX_WITNESS_REPORTS]]


def witness_report(lease: LeaseInfo, probe: Probe, now: datetime) -> WitnessReport:
    """A witness's report on one suspect: alive when its Lease is live in the witness's read or
    its agent's health endpoint answers."""
    return WitnessReport(
        node=lease.name,
        alive=lease.live(now) or probe is Probe.REACHABLE,
        probe=probe,
        lease_renew_time=lease.renew_time,
        observed_at=now,
    )


def same_reports(old: Iterable[WitnessReport], new: Iterable[WitnessReport]) -> bool:
    """Whether two report sets say the same (observation times aside): nothing to write."""

    def key(r: WitnessReport) -> tuple[str, bool, str, datetime | None]:
        return (r.node, r.alive, r.probe.value, r.lease_renew_time)

    return sorted(map(key, old), key=str) == sorted(map(key, new), key=str)
