"""Pure decisions of the quorum admission protocol (DESIGN section 5).

Nothing here talks to the API server: the operator reads objects, calls these functions and writes
what they return with compare-and-swap. Every function is deterministic given its inputs (the
clock is a parameter), so the protocol's invariants are unit-tested without a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache

from capacity_api.models import (
    ASKED_FIELDS,
    ASKED_PATH,
    Allocation,
    CapacityClaim,
    CapacityClaimSpec,
    CapacityNode,
    ClaimSubstrate,
    ConditionStatus,
    Holder,
    Phase,
    Proposal,
    Substrate,
    Vote,
    VoterRole,
    VoteValue,
)
from capacity_api.quantity import parse_quantity
from capacity_api.reasons import READY, WAITING_FOR_CAPACITY, WAITING_FOR_NODES

EPSILON = 1e-9
"""Slack for float sums of shares: a + r <= 1 + EPSILON is still within capacity."""

RESOURCE_SUBSTRATE: Mapping[str, Substrate] = {
    "cpu": Substrate.HOST,
    "memory": Substrate.HOST,
    "nvidia.com/gpu": Substrate.GPU,
    "storage-iops": Substrate.STORAGE,
    "network-bandwidth": Substrate.NETWORK,
    "db-connections": Substrate.DATABASE,
}
"""Which substrate each requestable resource belongs to (its capacity key on the node)."""


class ClaimError(ValueError):
    """A claim the schema accepted but the platform can never hold as written."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def requested_resources(spec: CapacityClaimSpec) -> dict[str, Decimal]:
    """The claim's resources as exact base-unit amounts, keyed by wire name."""
    if spec.resources is None:
        return {}
    wire = spec.resources.model_dump(by_alias=True, exclude_none=True)
    return {name: parse_quantity(value) for name, value in wire.items()}


def claim_substrate(spec: CapacityClaimSpec) -> Substrate:
    """The substrate a claim is judged on; ``auto`` derives it from the requested resources."""
    if spec.substrate is not ClaimSubstrate.AUTO:
        substrate = Substrate(spec.substrate.value)
    else:
        kinds = {RESOURCE_SUBSTRATE[name] for name in requested_resources(spec)}
        special = kinds - {Substrate.HOST}
        if len(special) > 1:
            names = ", ".join(sorted(s.value for s in special))
            raise ClaimError(
                "AmbiguousSubstrate",
                f"spec.resources spans several substrates ({names}); set spec.substrate",
            )
        substrate = special.pop() if special else Substrate.HOST
    foreign = sorted(
        name for name in requested_resources(spec) if RESOURCE_SUBSTRATE[name] is not substrate
    )
    if foreign:
        raise ClaimError(
            "ResourceSubstrateMismatch",
            f"spec.resources {', '.join(foreign)} do not belong to substrate {substrate.value}",
        )
    return substrate


def node_share(spec: CapacityClaimSpec, substrate: Substrate, node: CapacityNode) -> float | None:
    """The fraction r of ``node``'s substrate the claim asks for (worst dimension).

    None when the node does not offer what is asked (substrate absent, or a requested resource
    has no capacity there). A value above 1 means the node can never hold the claim.
    """
    return share_of(requested_resources(spec), spec, substrate, node)


def share_of(
    resources: Mapping[str, Decimal],
    spec: CapacityClaimSpec,
    substrate: Substrate,
    node: CapacityNode,
) -> float | None:
    """:func:`node_share` with the claim's resources already parsed (placement asks it of every
    node for one claim)."""
    if substrate not in node.spec.substrates:
        return None
    if not resources:
        return max(spec.c_geo or 0.0, spec.c_int or 0.0)
    capacity = node.spec.capacity or {}
    worst = 0.0
    for name, amount in resources.items():
        if name not in capacity:
            return None
        total = _capacity_quantity(capacity[name])
        if total <= 0:
            return None if amount > 0 else worst
        worst = max(worst, float(amount / total))
    return worst


@lru_cache(maxsize=4096)
def _capacity_quantity(value: str) -> Decimal:
    """A node's capacity quantity, parsed once: the same few strings recur on every node."""
    return parse_quantity(value)


# ---------------------------------------------------------------------------------------------
# Node view and the ledger


def node_staleness(
    node: CapacityNode | None, now: datetime, max_age: float, min_samples: int = 0
) -> str | None:
    """Why a node's published readings cannot be used now, or None when they can: the one
    freshness rule of the operator's placement and the witnesses' votes. Usable means a status
    that is Ready, whose newest reading is at most ``max_age`` seconds old (the thresholds'
    maxAgeSeconds), and every window holding at least ``min_samples`` samples (a node that just
    came up or came back is not trusted before)."""
    status = node.status if node is not None else None
    if status is None:
        return "no CapacityNode status"
    if not any(c.type == READY and c.status.value == "True" for c in status.conditions or []):
        return "not Ready"
    readings = (status.readings or {}).values()
    short = [r.samples for r in readings if r.samples < min_samples]
    if short:
        return f"window not full ({min(short)} of {min_samples} samples)"
    newest = max((r.observed_at for r in readings), default=None)
    if newest is None:
        return "readings stale"
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    if (now - newest).total_seconds() > max_age:
        return "readings stale"
    return None


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What placement reads from one version of a CapacityNode, computed once per version:
    every proposal looks at every node, and summing ledgers per proposal per node was a good
    part of the operator's CPU."""

    committed: Mapping[str, float]
    """Sum of the holders' shares per substrate (the ledger)."""
    p95: Mapping[str, float]
    """The p95 load of each substrate's published reading."""
    ledger_size: int
    """:func:`ledger_estimate` of the ledger as it is."""


def node_facts(node: CapacityNode) -> NodeFacts:
    status = node.status
    allocated = (status.allocated or {}) if status else {}
    readings = (status.readings or {}) if status else {}
    return NodeFacts(
        committed={s: sum(h.share for h in a.holders) for s, a in allocated.items()},
        p95={s: r.load.p95 for s, r in readings.items()},
        ledger_size=ledger_estimate(node),
    )


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the operator knows of one node when it places a claim."""

    name: str
    node: CapacityNode
    lease_live: bool
    """The node's Lease has been renewed within its duration."""
    fresh: bool
    """The node is Ready and its readings are recent."""
    reserved: Mapping[str, float] = field(default_factory=dict)
    """Shares of open proposals on this node, per substrate (not yet committed)."""
    facts: NodeFacts | None = None
    """The node's :func:`node_facts`; computed here when not given."""

    def __post_init__(self) -> None:
        if self.facts is None:
            object.__setattr__(self, "facts", node_facts(self.node))

    @property
    def known(self) -> NodeFacts:
        assert self.facts is not None  # set by __post_init__
        return self.facts

    def committed(self, substrate: Substrate) -> float:
        """The holders' shares on the substrate (open proposals not included)."""
        return self.known.committed.get(substrate.value, 0.0)

    def allocated(self, substrate: Substrate) -> float:
        return self.committed(substrate) + self.reserved.get(substrate.value, 0.0)

    def with_reserved(self, substrate: Substrate, share: float) -> NodeView:
        """The same node with ``share`` more of ``substrate`` promised."""
        reserved = dict(self.reserved)
        reserved[substrate.value] = reserved.get(substrate.value, 0.0) + share
        return replace(self, reserved=reserved)

    def headroom(self, substrate: Substrate) -> float:
        """min(1 - a, 1 - p95(u)) from the node's own reading, measured and promised."""
        a = self.allocated(substrate)
        p95 = self.known.p95.get(substrate.value, 1.0)
        return max(0.0, min(1.0 - a, 1.0 - p95))


def allocated_share(node: CapacityNode, substrate: Substrate) -> float:
    """Sum of the holders' shares on one substrate of the node."""
    status = node.status
    allocation = (status.allocated or {}).get(substrate.value) if status else None
    if allocation is None:
        return 0.0
    return sum(h.share for h in allocation.holders)


def allocation(holders: Iterable[Holder]) -> Allocation:
    """The Allocation summary for a set of holders (sorted, so equal sets compare equal)."""
    ordered = sorted(holders, key=lambda h: (h.claim, h.uid, h.epoch))
    return Allocation(
        share=min(1.0, sum(h.share for h in ordered)), claims=len(ordered), holders=ordered
    )


NODE_BYTES = 16 * 1024
"""A CapacityNode stays under this many bytes of JSON (DESIGN section 4): per-node objects
multiply by the size of the cluster."""

LEDGER_BYTES = 6 * 1024
"""Of those, the operator's ledger (``status.allocated``) may take this many; the agent keeps
its spec and status under ``NODE_BYTES - LEDGER_BYTES``. About 50 claims of typical names per
node, fewer with long ones; a node whose ledger is full takes no further claim."""

HOLDER_OVERHEAD_BYTES = 60
"""JSON of one holder beyond its claim key and uid (keys, epoch, share, punctuation)."""

MAX_HOLDER_BYTES = 317 + 64 + HOLDER_OVERHEAD_BYTES
"""The largest holder: the longest claim key and uid."""


def ledger_bytes(allocations: Mapping[str, Allocation]) -> int:
    """Bytes of the ledger's JSON, as the API server stores it."""
    wire = {s: a.model_dump(mode="json", by_alias=True, exclude_none=True)
            for s, a in allocations.items()}  # fmt: skip
    return len(json.dumps(wire, separators=(",", ":")).encode())


def ledger_estimate(node: CapacityNode, holder_bytes: int = 0) -> int:
    """A cheap upper estimate of the ledger's bytes with one more holder of ``holder_bytes``
    (placement asks it of every node for every proposal; the commit checks exactly)."""
    allocated = (node.status.allocated or {}) if node.status else {}
    size = holder_bytes + 2
    for substrate, alloc in allocated.items():
        size += len(substrate) + 40
        size += sum(len(h.claim) + len(h.uid) + HOLDER_OVERHEAD_BYTES for h in alloc.holders)
    return size


def ledger_full(
    node: CapacityNode,
    substrate: Substrate,
    holder: Holder,
    pending: Mapping[str, Sequence[Holder]] | None = None,
) -> str | None:
    """Why the holder does not fit in the node's ledger budget, or None when it does.
    ``pending``: per substrate, the holders the write will leave there before this one, where
    they differ from the node's (a write that carries several)."""
    allocated = dict((node.status.allocated or {}) if node.status else {})
    for name, holders in (pending or {}).items():
        allocated[name] = allocation(holders)
    current = allocated.get(substrate.value)
    holders = [h for h in (current.holders if current else []) if h.uid != holder.uid]
    allocated[substrate.value] = allocation([*holders, holder])
    size = ledger_bytes(allocated)
    if size <= LEDGER_BYTES:
        return None
    count = sum(len(a.holders) for a in allocated.values()) - 1
    return f"its ledger is full ({count} claims; {size} of {LEDGER_BYTES} bytes with this one)"


def claim_key(claim: CapacityClaim) -> str:
    return f"{claim.metadata.namespace}/{claim.metadata.name}"


HOLDING_PHASES = frozenset({Phase.ADMITTED, Phase.RECOVERING})
"""The phases in which a claim holds a share of each node it is placed on (a Recovering claim
keeps its failed node's share until the recovery commits)."""


def expected_holders(claims: Iterable[CapacityClaim]) -> dict[tuple[str, str], list[Holder]]:
    """The holders every (node, substrate) must carry for the admitted claims: the ledger as a
    pure function of the claims' status."""
    ledger: dict[tuple[str, str], list[Holder]] = {}
    for claim in claims:
        status = claim.status
        if status is None or status.phase not in HOLDING_PHASES:
            continue
        for placement in status.placements or []:
            ledger.setdefault((placement.node, placement.substrate.value), []).append(
                Holder(
                    claim=claim_key(claim),
                    uid=claim.metadata.uid or "",
                    epoch=placement.epoch or 1,
                    share=placement.share,
                )
            )
    return ledger


# ---------------------------------------------------------------------------------------------
# Placement


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    placement: list[str]
    witnesses: list[str]
    share: float
    committed: dict[str, float] = field(default_factory=dict)
    """Per placement node, its committed share (holders only, not open proposals)."""
    ahead: list[str] = field(default_factory=list)
    """The candidates that follow the placement nodes in the same order (at most
    :data:`ATTEST_AHEAD`): where the next claims go once the placement nodes are full."""

    @property
    def voters(self) -> list[str]:
        return [*self.placement, *self.witnesses]


@dataclass(frozen=True, slots=True)
class NoPlacement:
    """No proposal can be made now. ``final`` means no node could ever hold the claim."""

    reason: str
    message: str
    final: bool
    wait: bool = False
    """True when the cluster has no usable node at all yet: keep the claim Pending."""


ATTEST_AHEAD = 3
"""How many of the next candidates a proposal names for its witnesses to attest ahead
(docs/admission.md, "Attesting ahead")."""


def default_witnesses(replicas: int) -> int:
    """Witnesses so that at least 3 nodes vote (where the cluster has them)."""
    return max(0, 3 - replicas)


def plan_placement(
    spec: CapacityClaimSpec,
    substrate: Substrate,
    nodes: Sequence[NodeView],
    excluded: Iterable[str] = (),
    min_isolation: float = 0.0,
    *,
    pack: Mapping[str, int] | None = None,
) -> PlacementPlan | NoPlacement:
    """Rank nodes by headroom and choose placement nodes and witnesses for one epoch.

    A node is a candidate when it has fresh readings and a live lease, did not refuse earlier,
    keeps the hard rule a + r <= 1, and leaves at least ``min_isolation`` promised slack
    (1 - a - r, the isolation gate: a function of promises only, so the operator knows it as well
    as the voter does and need not ask a node that must refuse).

    ``pack``: nodes to fill first while they are candidates, before any other, the node
    with the most first (then by headroom): the operator passes the placement nodes of its
    other open proposals with how many ask each, so that one node answers the proposals of a
    busy moment in one ballot write, rather than several nodes taking turns
    (docs/admission.md, "Packing"). The plan's ``ahead`` names the candidates that follow
    the placement nodes in that order, where the next claims would go once these are full
    (docs/admission.md, "Attesting ahead").
    """
    excluded_set = set(excluded)
    resources = requested_resources(spec)
    shares = {view.name: share_of(resources, spec, substrate, view.node) for view in nodes}
    offering = {name: r for name, r in shares.items() if r is not None}
    if not offering:
        return NoPlacement(
            "NoNodeOffersSubstrate",
            f"no node offers substrate {substrate.value} with the requested resources",
            final=bool(nodes),
            wait=not nodes,
        )
    can_ever = sorted(name for name, r in offering.items() if r <= 1.0 + EPSILON)
    if len(can_ever) < spec.replicas:
        smallest = min(offering.values())
        return NoPlacement(
            "ExceedsNodeCapacity",
            f"the request is {smallest:.2f} of the largest {substrate.value} node's capacity; "
            f"{len(can_ever)} node(s) could ever hold it, {spec.replicas} needed",
            final=True,
        )
    usable = [v for v in nodes if v.fresh and v.lease_live]
    if not usable:
        return NoPlacement(
            "NoReadyNodes",
            "no node has fresh readings and a live lease yet",
            final=False,
            wait=True,
        )
    reasons: list[str] = []
    candidates: list[NodeView] = []
    for view in usable:
        r = offering.get(view.name)
        if r is None:
            continue
        a = view.allocated(substrate)
        if view.name in excluded_set:
            continue  # the caller reports refusals with the voters' own reasons
        if view.known.ledger_size + MAX_HOLDER_BYTES > LEDGER_BYTES:
            reasons.append(f"{view.name}: its ledger is full")
        elif a + r > 1.0 + EPSILON:
            reasons.append(f"{view.name}: allocated {a:.2f} + request {r:.2f} exceeds capacity")
        elif 1.0 - a - r < min_isolation - EPSILON:
            reasons.append(
                f"{view.name}: isolation {max(0.0, 1.0 - a - r):.2f} < theta_iso "
                f"{min_isolation:.2f} (allocated {a:.2f} + request {r:.2f})"
            )
        else:
            candidates.append(view)
    if len(candidates) < spec.replicas:
        stale = sorted(v.name for v in nodes if not (v.fresh and v.lease_live))
        if stale:
            reasons.append(f"not ready or lease expired: {', '.join(stale)}")
        # would it fit if the usable nodes held nothing? If not, no claim leaving frees room
        # for it (its share and theta_iso alone rule it out): final, and said so
        if_empty = [
            v.name
            for v in usable
            if v.name not in excluded_set
            and (r := offering.get(v.name)) is not None
            and 1.0 - r >= min_isolation - EPSILON
        ]
        return NoPlacement(
            "InsufficientCapacity",
            f"{len(candidates)} of {spec.replicas} placement node(s) available; "
            + "; ".join(reasons),
            final=len(if_empty) < spec.replicas,
        )
    headroom = {v.name: v.headroom(substrate) for v in candidates}
    packed = pack or {}
    candidates.sort(key=lambda v: (-packed.get(v.name, 0), -headroom[v.name], v.name))
    placement = [v.name for v in candidates[: spec.replicas]]
    wanted = spec.witnesses if spec.witnesses is not None else default_witnesses(spec.replicas)
    # witnesses judge liveness, not room: the same few live nodes (by name) witness every
    # proposal, so that each answers many proposals in one ballot write
    others = sorted(
        (v for v in usable if v.name not in placement),
        key=lambda v: (v.name in excluded_set, v.name),
    )
    witnesses = [v.name for v in others[:wanted]]
    share = max(offering[name] for name in placement)
    views = {v.name: v for v in candidates}
    committed = {n: min(1.0, round(views[n].committed(substrate), 6)) for n in placement}
    ahead = [v.name for v in candidates[spec.replicas : spec.replicas + ATTEST_AHEAD]]
    return PlacementPlan(
        placement=placement, witnesses=witnesses, share=share, committed=committed, ahead=ahead
    )


def claim_watch_fields(hosted: Collection[str]) -> list[dict[str, str] | None]:
    """The field selectors of an agent process's claims watches (None: every claim).

    A process hosting one node (a DaemonSet pod) watches, one watch per field, the claims whose
    proposal names its node in ``status.proposal.asked`` (:class:`~capacity_api.models.Asked`)
    and those naming more voters than the fields hold: the API server then sends it the events
    of the claims it votes on (and keeps sending the later events of those claims while the
    proposal stays in their status), not every claim's. A process hosting several (a
    simulation) would need as many watches per node, so it keeps one watch of every claim.
    """
    if len(hosted) != 1:
        return [None]
    (node,) = hosted
    return [{f"{ASKED_PATH}.{name}": "true" if name == "more" else node} for name in ASKED_FIELDS]


def no_room(plan: NoPlacement, refusals: Mapping[str, str], others_in_the_way: bool) -> NoPlacement:
    """What a claim that cannot be placed now does (DESIGN section 5: it waits, and is never
    retried into a storm). It waits (``WaitingForCapacity``) when the room is taken by other
    claims: open proposals (``others_in_the_way``: it would fit without them, and they may
    still abort) or admitted claims (they may be deleted); it is looked at again when room is
    freed. It is rejected as ``plan`` says when placement nodes refused it by their votes
    (``refusals``: the nodes' own measurements said no, the design's "retries with another
    placement up to a bound, then Rejected with the reasons from the votes"), or when
    ``plan`` is final (no node could ever hold it) or already a wait (no usable node yet)."""
    if plan.final or plan.wait or (refusals and not others_in_the_way):
        return plan
    if others_in_the_way:
        message = "waiting for open proposals of other claims to commit or abort; " + plan.message
    else:
        message = "waiting for room (admitted claims hold it): " + plan.message
    return NoPlacement(WAITING_FOR_CAPACITY, message, final=False, wait=True)


def same_wait(before: str | None, after: str) -> bool:
    """Whether two messages of a waiting claim say it waits for the same thing (their first
    clause: open proposals, or room held by admitted claims), so that the claim is not written
    again for numbers that moved, only when what it waits for changed."""

    def head(message: str) -> str:
        return message.partition(";")[0].partition(":")[0]

    return before is not None and head(before) == head(after)


def room_grew(before: CapacityNode | None, after: CapacityNode) -> bool:
    """Whether a new version of a CapacityNode may give a waiting claim room it did not have:
    a new node, a changed capacity or set of substrates, or an allocation that shrank (a share
    or a ledger that got smaller). Readings and conditions do not count here (placement judges
    room on promises; a node that became fresh again is found by the periodic look)."""
    if before is None:
        return True
    if (
        before.spec.capacity != after.spec.capacity
        or before.spec.substrates != after.spec.substrates
    ):
        return True
    old = (before.status.allocated or {}) if before.status else {}
    new = (after.status.allocated or {}) if after.status else {}
    for substrate, alloc in old.items():
        now = new.get(substrate)
        if now is None or now.share < alloc.share - EPSILON or now.claims < alloc.claims:
            return True
    return False


def new_proposal(
    previous: Proposal | None,
    plan: PlacementPlan,
    substrate: Substrate,
    now: datetime,
    vote_timeout: timedelta,
    *,
    holding: Iterable[str] = (),
    attestation: timedelta | None = None,
) -> Proposal:
    """The next epoch's proposal: epochs only grow, so votes for an older one never count.
    ``holding``: nodes the claim keeps a share of (a recovery's survivors). ``attestation``:
    how old a witness's attestation may be and still count as its YES (None: witnesses vote
    on the proposal itself)."""
    kept = [n for n in dict.fromkeys(holding) if n not in plan.voters]
    return Proposal(
        epoch=(previous.epoch + 1) if previous else 1,
        placement=plan.placement,
        voters=plan.voters,
        deadline=now + vote_timeout,
        share=plan.share,
        substrate=substrate,
        committed=plan.committed or None,
        holding=kept or None,
        attested_since=now - attestation if attestation is not None else None,
        ahead=(plan.ahead or None) if attestation is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Tally


class Outcome(StrEnum):
    WAIT = "Wait"
    COMMIT = "Commit"
    ABORT = "Abort"


@dataclass(frozen=True, slots=True)
class Tally:
    outcome: Outcome
    yes: int
    needed: int
    voters: int
    counted: dict[str, Vote] = field(default_factory=dict)
    """Votes that count: from a voter of this proposal, for this epoch."""
    refused_by: list[str] = field(default_factory=list)
    """Placement nodes that voted NO."""
    reason: str = ""

    @property
    def vote_count(self) -> str:
        return f"{self.yes}/{self.needed}"


def quorum(voters: int) -> int:
    """floor(n/2) + 1."""
    return voters // 2 + 1


def proposal_open(claim: CapacityClaim) -> bool:
    """Whether the claim's proposal is still being voted on, so that its live votes are in the
    voters' ballots: the claim is Voting, or Recovering with a proposal newer than every
    placement (the re-admission of a failed node's share). Once the proposal is decided, the
    votes that were counted are in the claim's own ``status.votes``."""
    status = claim.status
    if status is None or status.proposal is None:
        return False
    if status.phase is Phase.VOTING:
        return True
    if status.phase is not Phase.RECOVERING:
        return False
    newest = max((p.epoch or 0 for p in status.placements or []), default=0)
    return status.proposal.epoch > newest


def ballot_votes(
    claim: CapacityClaim,
    entry: Callable[[str, str], Vote | None],
    *,
    other_epochs: bool = False,
    alive: Callable[[str], Mapping[str, datetime] | None] | None = None,
) -> dict[str, Vote]:
    """Node -> its vote on the claim's open proposal, read from each voter's ballot by
    ``entry(node, claim uid)`` (None: no vote there). Only votes for the proposal's epoch are
    taken, as the tally counts them; ``other_epochs`` keeps a voter's entry for another epoch
    too, for showing it as stale (the tally still never counts it). A witness without a vote
    for the epoch answers YES by its ballot's attestations, ``alive(node)``, when they cover
    the proposal (:func:`attested_vote`). Empty when the proposal is not open
    (:func:`proposal_open`)."""
    uid = claim.metadata.uid
    proposal = claim.status.proposal if claim.status else None
    if not uid or proposal is None or not proposal_open(claim):
        return {}
    votes: dict[str, Vote] = {}
    for node in dict.fromkeys(proposal.voters):
        vote = entry(node, uid)
        if vote is not None and vote.epoch == proposal.epoch:
            votes[node] = vote
            continue
        attested = attested_vote(proposal, node, alive(node)) if alive is not None else None
        if attested is not None:
            votes[node] = attested
        elif vote is not None and other_epochs:
            votes[node] = vote
    return votes


def attested_vote(
    proposal: Proposal, node: str, alive: Mapping[str, datetime] | None
) -> Vote | None:
    """A witness's YES for this epoch by attestation: ``node`` is one of the proposal's
    witnesses, the proposal takes attestations (``attestedSince``), and ``alive`` (its
    ballot's) says every placement node was alive at or after that time. Otherwise None:
    the witness has not answered (a NO is always a vote). The vote carries the proposal's
    epoch, is timed by the oldest attestation it rests on, and names them (what the commit
    copies into the claim's status)."""
    since = proposal.attested_since
    if since is None or not alive or node not in proposal.voters or node in proposal.placement:
        return None
    seen = [alive.get(name) for name in proposal.placement]
    times = [t for t in seen if t is not None and t >= since]
    if not proposal.placement or len(times) < len(proposal.placement):
        return None
    return Vote(
        vote=VoteValue.YES,
        role=VoterRole.WITNESS,
        epoch=proposal.epoch,
        reason="placement nodes alive (attested): " + ", ".join(proposal.placement),
        time=min(times),
    )


def with_ballot_votes(claim: CapacityClaim, votes: Mapping[str, Vote] | None) -> CapacityClaim:
    """The claim as the protocol decides on it: while its proposal is open, its
    ``status.votes`` are the ballots' ``votes`` (whatever the claim's own status says: a vote
    written there by anyone never counts); otherwise, and when ``votes`` is None (the ballots
    were not read), the claim as it is."""
    status = claim.status
    if votes is None or status is None or not proposal_open(claim):
        return claim
    return claim.model_copy(update={"status": status.model_copy(update={"votes": dict(votes)})})


def tally(proposal: Proposal, votes: Mapping[str, Vote] | None, now: datetime) -> Tally:
    """Decide an epoch from its votes.

    Only votes from the proposal's voters carrying its epoch count. Commit when every placement
    node said YES and YES reaches a majority of the voters; abort as soon as a placement node
    says NO or a majority can no longer be reached, or when the deadline has passed.
    """
    voters = list(dict.fromkeys(proposal.voters))
    counted = {
        node: vote
        for node, vote in (votes or {}).items()
        if node in voters and vote.epoch == proposal.epoch
    }
    needed = quorum(len(voters))
    yes = sum(1 for v in counted.values() if v.vote is VoteValue.YES)
    no = len(counted) - yes
    placement_yes = all(
        n in counted and counted[n].vote is VoteValue.YES for n in proposal.placement
    )
    refused = sorted(
        n for n in proposal.placement if n in counted and counted[n].vote is VoteValue.NO
    )

    def result(outcome: Outcome, reason: str = "", refused_by: Sequence[str] = ()) -> Tally:
        return Tally(
            outcome,
            yes=yes,
            needed=needed,
            voters=len(voters),
            counted=counted,
            refused_by=list(refused_by),
            reason=reason,
        )

    if placement_yes and yes >= needed:
        return result(Outcome.COMMIT, "quorum reached")
    if refused:
        return result(Outcome.ABORT, vote_reasons(counted, refused), refused)
    if len(voters) - no < needed:
        why = vote_reasons(counted, sorted(counted))
        return result(Outcome.ABORT, f"quorum can no longer be reached: {why}")
    if now >= proposal.deadline:
        missing = ", ".join(sorted(n for n in voters if n not in counted))
        return result(
            Outcome.ABORT, f"deadline passed with {yes}/{needed} YES; no vote from {missing}"
        )
    return result(Outcome.WAIT)


# ---------------------------------------------------------------------------------------------
# What to do next with a claim, and when to look again


class Action(StrEnum):
    """The one step the operator takes next for a claim (:func:`next_step`)."""

    NOTHING = "Nothing"
    """Final, or nothing to do until something changes."""
    PROPOSE = "Propose"
    """Pending: place it and propose (within the open-proposal budget, :func:`admit_order`)."""
    WAIT = "Wait"
    """Voting, votes still missing before the deadline: nothing to write."""
    COMMIT = "Commit"
    ABORT = "Abort"
    RESTART = "Restart"
    """The spec changed while voting: abort the epoch and start the admission over."""
    NOTE_SPEC_CHANGE = "NoteSpecChange"
    """Admitted, spec changed since: say that the admission stands as committed."""
    RECOVER = "Recover"
    """Recovering: tally or propose the take-over of the lost share."""


WAITING_REASONS = frozenset({WAITING_FOR_NODES, WAITING_FOR_CAPACITY})


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    tally: Tally | None = None


def waiting_for_room(claim: CapacityClaim) -> bool:
    """Pending because other claims hold the room it needs (:func:`no_room`)."""
    status = claim.status
    return (
        status is not None
        and status.phase is Phase.PENDING
        and status.reason == WAITING_FOR_CAPACITY
        and claim.metadata.deletion_timestamp is None
    )


def pending(claim: CapacityClaim) -> bool:
    """Not yet proposed (no status, or Pending waiting for nodes or capacity)."""
    status = claim.status
    return status is None or status.phase in (None, Phase.PENDING)


def next_step(claim: CapacityClaim, now: datetime) -> Step:
    """What the operator does next for the claim as it is now (level-based: the same claim at
    the same time always gives the same step)."""
    status = claim.status
    action = Action.NOTHING
    if claim.metadata.deletion_timestamp is not None:
        pass
    elif status is None or pending(claim):
        action = Action.PROPOSE
    elif status.phase is Phase.VOTING:
        if status.proposal is not None:
            return _voting_step(claim, now)
        action = Action.PROPOSE
    elif status.phase is Phase.ADMITTED:
        generation = claim.metadata.generation
        if generation is not None and generation != status.observed_generation:
            action = Action.NOTE_SPEC_CHANGE
    elif status.phase is Phase.RECOVERING:
        action = Action.RECOVER
    return Step(action)


def _voting_step(claim: CapacityClaim, now: datetime) -> Step:
    status = claim.status
    assert status is not None
    assert status.proposal is not None
    if claim.metadata.generation != status.observed_generation:
        return Step(Action.RESTART)
    result = tally(status.proposal, status.votes, now)
    action = {
        Outcome.COMMIT: Action.COMMIT,
        Outcome.ABORT: Action.ABORT,
        Outcome.WAIT: Action.WAIT,
    }[result.outcome]
    return Step(action, result)


ROOM_RECHECK = timedelta(seconds=10)
"""How often a claim waiting for room is looked at again although nothing said room was freed
(a node that became fresh again, a threshold that moved): the freeing events themselves wake
the waiting claims at once."""


def wake_at(
    claim: CapacityClaim, now: datetime, recheck: timedelta, room_recheck: timedelta = ROOM_RECHECK
) -> datetime | None:
    """When the claim needs a look although nothing about it changed: a Voting claim at its
    deadline, a claim waiting for nodes and a Recovering one every ``recheck``, a claim waiting
    for room every ``room_recheck``; None when only a change of the claim can move it on."""
    status = claim.status
    if claim.metadata.deletion_timestamp is not None or status is None:
        return None
    if status.phase is Phase.VOTING and status.proposal is not None:
        return status.proposal.deadline
    if status.phase is Phase.PENDING and status.reason == WAITING_FOR_CAPACITY:
        return now + room_recheck
    if status.phase is Phase.PENDING and status.reason in WAITING_REASONS:
        return now + recheck
    if status.phase is Phase.RECOVERING:
        return now + recheck
    return None


def admit_order(
    queued: Iterable[tuple[str, datetime | None, str]], open_proposals: int, limit: int
) -> list[str]:
    """Flow control: which queued claims may propose now, given ``(uid, created, key)`` of each
    and the proposals already open. The oldest first (creation time, then namespace/name), up to
    ``limit`` open proposals at once; the rest stay queued, unwritten, until an epoch ends."""
    slots = max(0, limit - open_proposals)
    if slots == 0:
        return []
    floor = datetime.min.replace(tzinfo=UTC)
    ordered = sorted(queued, key=lambda q: (q[1] or floor, q[2]))
    return [uid for uid, _, _ in ordered[:slots]]


def vote_reasons(votes: Mapping[str, Vote], nodes: Iterable[str]) -> str:
    """ "node-a: fit_error 0.31 > theta_fit 0.165; node-b: ..." for the NO votes among nodes."""
    parts = [
        f"{n}: {votes[n].reason or 'NO'}"
        for n in nodes
        if n in votes and votes[n].vote is VoteValue.NO
    ]
    return "; ".join(parts)


def role_of(proposal: Proposal, node: str) -> VoterRole | None:
    if node in proposal.placement:
        return VoterRole.PLACEMENT
    if node in proposal.voters:
        return VoterRole.WITNESS
    return None


def condition_status(value: bool) -> ConditionStatus:
    return ConditionStatus.TRUE if value else ConditionStatus.FALSE
