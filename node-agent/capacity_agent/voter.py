"""The agent's side of quorum admission: see proposals that name this node, vote, reserve.

One :class:`Voter` serves every node hosted by the process (one node for a DaemonSet pod, many
for a simulation). A process hosting one node watches only the claims whose proposal names it
(field selectors on ``status.proposal.asked``, :func:`capacity_api.admission.claim_watch_fields`);
one hosting several watches every claim once. For each open proposal that names a hosted node
and lacks its vote for the current epoch, the node decides:

- as a **placement** node, on fit: its own window of the proposal's substrate, through
  :func:`capacity_api.gates.evaluate_fit`, with the allocation already committed to it plus the
  shares it has promised to other open proposals (its local reservations) counted as allocated.
  What is committed is the larger of what the proposal says (the operator's ledger) and what
  the node has seen itself: the admitted claims placed on it, which it hears because their
  proposal stays in them after the commit;
- as a **witness**, on whether each placement node looks alive from here: a Lease renewed within
  its duration and a Ready CapacityNode with fresh readings. When the proposal takes
  attestations (``attestedSince``), the witness answers with its ballot's ``alive`` map
  instead: the nodes it saw alive and when. An attestation recent enough answers every
  proposal on that node without a write. A placement node it does not see alive still gets a
  NO vote.

The vote goes into the node's CapacityBallot (:mod:`capacity_agent.ballot`): one write carries
every vote the node cast since its last write, keyed by claim uid with the epoch; the operator
counts a vote only for the claim's current epoch and copies the counted votes into the claim at
commit. A YES reserves the share until the node sees the claim leave that epoch: committed
(the share then counts as admitted on the node), aborted, or deleted; the ballot then drops the
vote. The deadline does not end a reservation, since an operator may commit a quorum reached
in time after it. So every share committed on the node is always counted here, as a
reservation or as an admitted claim, whatever the operator's ledger says: two operator copies
acting at once (a failure of peering) cannot together promise the node past its capacity.
A claim that disappears while a watch is down sends no event; when that watch lists again, the
claims it last delivered and no longer lists are forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import httpx2
from lightkube import ALL_NS, Client
from lightkube.core.client import FieldSelector
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap

from capacity_agent.backoff import Backoff
from capacity_agent.ballot import BallotWriter
from capacity_agent.cluster import (
    CapacityClaims,
    CapacityNodes,
    describe_failure,
    http_status,
    lease_info,
    raise_releasing,
)
from capacity_agent.settings import BALLOT_INTERVAL
from capacity_api.admission import (
    HOLDING_PHASES,
    allocated_share,
    claim_key,
    claim_watch_fields,
    node_staleness,
)
from capacity_api.gates import CALIBRATION_CONFIGMAP, Series, Thresholds, evaluate_fit
from capacity_api.lease import LeaseInfo
from capacity_api.models import (
    BallotVote,
    CapacityClaim,
    CapacityNode,
    Phase,
    Substrate,
    Vote,
    VoterRole,
    VoteValue,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
CACHE_SECONDS = 1.0
WITNESS_CACHE_SECONDS = 10.0
THRESHOLDS_SECONDS = 5.0
WATCH_SECONDS = 120
"""The API server ends each claims watch request after this long; lightkube asks again from the
last resourceVersion seen."""


class Measurements(Protocol):
    """What a node's measurement loop offers the voter."""

    def series(self, substrate: Substrate) -> Series: ...

    def samples(self, substrate: Substrate) -> int: ...

    def newest_time(self, substrate: Substrate) -> float | None: ...

    def pressure_conditions(self) -> list[str]: ...


@dataclass
class Reservation:
    substrate: str
    share: float


@dataclass
class VoterNode:
    """One hosted node as the voter sees it."""

    name: str
    measurements: Measurements
    lease_renewed_at: Callable[[], float | None]
    """Unix time of this node's last successful Lease renewal (None: never)."""
    lease_duration: float = 40.0
    reservations: dict[tuple[str, int], Reservation] = field(default_factory=dict)
    """YES promises on open epochs, by (claim uid, epoch)."""
    admitted: dict[str, Reservation] = field(default_factory=dict)
    """Shares of the admitted (or recovering) claims placed on this node, by claim uid."""

    def reserved(self, substrate: str, excluding: tuple[str, int]) -> float:
        """The shares promised to open epochs on the substrate, but ``excluding``'s."""
        return _shares(self.reservations, substrate, excluding)

    def committed_seen(self, substrate: str, excluding: str) -> float:
        """The shares of the admitted claims this node has seen placed on it."""
        return _shares(self.admitted, substrate, excluding)

    def see(self, uid: str, status: Mapping[str, Any] | None) -> None:
        """Keep what the claim holds on this node as its status says (nothing when gone)."""
        held = None
        if status and status.get("phase") in HOLDING_PHASES:
            for placement in status.get("placements") or []:
                if placement.get("node") == self.name:
                    held = Reservation(
                        str(placement.get("substrate", Substrate.HOST.value)),
                        float(placement.get("share", 0.0)),
                    )
        if held is None:
            self.admitted.pop(uid, None)
        else:
            self.admitted[uid] = held

    def forget(self, uid: str) -> None:
        self.admitted.pop(uid, None)
        for key in [k for k in self.reservations if k[0] == uid]:
            del self.reservations[key]


K = TypeVar("K")


def _shares(entries: Mapping[K, Reservation], substrate: str, excluding: K) -> float:
    return sum(
        r.share for key, r in entries.items() if r.substrate == substrate and key != excluding
    )


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    vote: Vote
    reserve: Reservation | None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def decide_placement(
    *,
    node: VoterNode,
    claim_uid: str,
    epoch: int,
    substrate: Substrate,
    share: float,
    committed: float,
    thresholds: Thresholds,
    now: float,
) -> PlacementDecision:
    """A placement node's vote on fit (pure given its inputs)."""
    renewed = node.lease_renewed_at()
    if renewed is None or now - renewed > node.lease_duration:
        vote = Vote(
            vote=VoteValue.NO,
            role=VoterRole.PLACEMENT,
            epoch=epoch,
            reason="own lease expired: this node cannot vote YES",
            time=datetime.fromtimestamp(now, UTC),
        )
        return PlacementDecision(vote, None)
    samples = node.measurements.samples(substrate)
    newest = node.measurements.newest_time(substrate)
    age = math.inf if newest is None else now - newest
    key = (claim_uid, epoch)
    reserved = node.reserved(substrate.value, excluding=key)
    decision = evaluate_fit(
        u=node.measurements.series(substrate),
        allocated=min(1.0, committed + reserved),
        request=share,
        samples=samples,
        age_seconds=age,
        pressure=node.measurements.pressure_conditions(),
        thresholds=thresholds,
    )
    readings = {k: round(float(v), 4) for k, v in decision.readings.items() if math.isfinite(v)}
    readings["reserved"] = round(reserved, 4)
    vote = Vote(
        vote=VoteValue.YES if decision.yes else VoteValue.NO,
        role=VoterRole.PLACEMENT,
        epoch=epoch,
        reason=decision.reason,
        gate=decision.gate,
        readings=readings,
        time=datetime.fromtimestamp(now, UTC),
    )
    reserve = Reservation(substrate.value, share) if decision.yes else None
    return PlacementDecision(vote, reserve)


def decide_witness(
    *,
    epoch: int,
    placement: Sequence[str],
    leases: Mapping[str, tuple[float | None, float]],
    nodes: Mapping[str, CapacityNode | None],
    max_age: float,
    now: float,
) -> Vote:
    """A witness's vote: are the placement nodes alive as seen from here? (pure)"""
    problems: list[str] = []
    for name in placement:
        renewed, duration = leases.get(name, (None, 0.0))
        if renewed is None:
            problems.append(f"{name}: no lease")
        elif now - renewed > duration:
            problems.append(f"{name}: lease expired {now - renewed - duration:.0f}s ago")
        stale = node_staleness(nodes.get(name), datetime.fromtimestamp(now, UTC), max_age)
        if stale is not None:
            problems.append(f"{name}: {stale}")
    return Vote(
        vote=VoteValue.NO if problems else VoteValue.YES,
        role=VoterRole.WITNESS,
        epoch=epoch,
        reason="; ".join(problems)
        if problems
        else "placement nodes alive: " + ", ".join(placement),
        time=datetime.fromtimestamp(now, UTC),
    )


WATCH = "_watch"
"""Key of the index of the watch that delivered an item (see :meth:`Voter.relisted`)."""
LISTED = "_listed"
"""Key of the marker a watch queues after each list: its index, with the uids listed."""

FORGET_DELETED_SECONDS = 600.0
"""How long :class:`EpochOrder` remembers the epoch of a claim that went away from its watches."""


class EpochOrder:
    """Puts the events of one agent's several claims watches back in order.

    Each watch delivers its events in order, but a claim moves between the watches when its
    next epoch names this node in another field (or not at all): the old field's watch sends
    DELETED with the old epoch's content, the new one's ADDED with the new epoch, in either
    order. Epochs only grow and a proposal's voters do not change within one, so an event
    whose epoch is older than the newest seen for that claim is stale and dropped; events of
    the newest epoch pass, a deletion included. A claim that went away is remembered for
    :data:`FORGET_DELETED_SECONDS`, long enough for any watch to catch up.
    """

    def __init__(self) -> None:
        self.newest: dict[str, int] = {}
        self._gone: deque[tuple[float, str, int]] = deque()

    def admit(self, body: JSON, now: float) -> bool:
        while self._gone and self._gone[0][0] < now - FORGET_DELETED_SECONDS:
            _, uid, epoch = self._gone.popleft()
            if self.newest.get(uid) == epoch:
                del self.newest[uid]
        uid = body.get("metadata", {}).get("uid", "")
        proposal = (body.get("status") or {}).get("proposal") or {}
        epoch = int(proposal.get("epoch", 0))
        if epoch < self.newest.get(uid, 0):
            return False
        self.newest[uid] = epoch
        if body.get("_deleted"):
            self._gone.append((now, uid, epoch))
        return True


class Voter:
    """Watches claims once for all hosted nodes and casts their votes."""

    def __init__(
        self,
        api: Client,
        nodes: Mapping[str, VoterNode],
        namespace: str,
        clock: Callable[[], float] = time.time,
        *,
        ballot_interval: float = BALLOT_INTERVAL,
    ) -> None:
        self.api = api
        self.nodes = dict(nodes)
        self.namespace = namespace
        self.clock = clock
        self.ballot_interval = ballot_interval
        self.cast: dict[tuple[str, int, str], float] = {}
        self.ballots: dict[str, BallotWriter] = {}
        self._thresholds: tuple[float, Thresholds] | None = None
        self._thresholds_lock = asyncio.Lock()
        self._node_cache: dict[str, tuple[float, CapacityNode | None]] = {}
        self._lease_cache: tuple[float, dict[str, tuple[float | None, float]]] | None = None
        self._stop = threading.Event()
        self._lease_lock = asyncio.Lock()
        self._node_locks: dict[str, asyncio.Lock] = {}
        self.sources: dict[str, int] = {}
        """Per claim uid, the watch (index in the selectors) that delivered its last event."""

    # -- the watch --------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for node in self.nodes:
            self.ballot(node).open()  # every hosted node's ballot, before the first proposal
        queue: asyncio.Queue[JSON] = asyncio.Queue()
        selectors = claim_watch_fields(list(self.nodes))
        order = EpochOrder() if len(selectors) > 1 else None
        for index, fields in enumerate(selectors):
            threading.Thread(
                target=self._watch,
                args=(loop, queue, fields, index),
                name=f"claims-watch-{index}",
                daemon=True,
            ).start()
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                body = await queue.get()
                if LISTED in body:
                    self.relisted(body[LISTED], body["uids"])
                    continue
                if order is not None and not order.admit(body, self.clock()):
                    continue  # an older epoch's event, from a watch that lagged behind another
                uid = body.get("metadata", {}).get("uid", "")
                if body.get("_deleted"):
                    self.sources.pop(uid, None)
                else:
                    self.sources[uid] = int(body.get(WATCH, 0))
                task = asyncio.create_task(self.handle(body))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            self._stop.set()
            for task in pending:
                task.cancel()

    def relisted(self, index: int, uids: Sequence[str]) -> None:
        """Watch ``index`` listed its claims again: the claims it delivered last and no longer
        lists went away while it was down (no event told): forget their shares."""
        listed = set(uids)
        for uid in [u for u, i in self.sources.items() if i == index and u not in listed]:
            del self.sources[uid]
            for hosted in self.nodes.values():
                hosted.forget(uid)
            for writer in self.ballots.values():
                writer.relied.pop(uid, None)

    def _watch(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[JSON],
        fields: dict[str, str] | None,
        index: int = 0,
    ) -> None:
        """List the claims that ``fields`` select (None: every claim), then watch from the list's
        version; list again at once when that version expired (410 Gone), after a backoff on
        any other failure. A claim that stops matching the selector comes as DELETED with its
        previous content: for this node it is gone. Every item carries the watch's ``index``;
        after each list comes a marker with the uids listed (:meth:`relisted`)."""
        backoff = Backoff(initial=0.5, cap=30.0)
        selector: FieldSelector | None = dict(fields) if fields is not None else None
        while not self._stop.is_set():
            try:
                listing = self.api.list(CapacityClaims, namespace=ALL_NS, fields=selector)
                items = [dict(item) for item in listing]
                version = listing.resourceVersion
                backoff.reset()  # the API server answers again
                for item in items:
                    item[WATCH] = index
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                uids = [item.get("metadata", {}).get("uid", "") for item in items]
                loop.call_soon_threadsafe(queue.put_nowait, {LISTED: index, "uids": uids})
                events = self.api.watch(
                    CapacityClaims,
                    namespace=ALL_NS,
                    fields=selector,
                    resource_version=version,
                    server_timeout=WATCH_SECONDS,
                    on_error=raise_releasing,
                )
                for kind, event in events:
                    obj = dict(event)
                    obj[WATCH] = index
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        if kind == "DELETED":
                            obj["_deleted"] = True
                        loop.call_soon_threadsafe(queue.put_nowait, obj)
                    if self._stop.is_set():
                        return
            except Exception as exc:  # the watch must survive API outages of any shape
                if http_status(exc) == 410:  # Gone: the version expired, list again at once
                    continue
                delay = backoff.next()
                log.warning(
                    "claims watch failed (%s); retrying in %.1fs", describe_failure(exc), delay
                )
                self._stop.wait(delay)

    # -- decisions ---------------------------------------------------------------------------

    async def handle(self, body: JSON) -> None:
        """React to one claim state: release reservations it no longer needs, vote if asked."""
        uid = body.get("metadata", {}).get("uid", "")
        status = body.get("status") or {}
        proposal = status.get("proposal")
        # a Recovering claim votes on re-admitting the share of its failed node
        voting = status.get("phase") in (Phase.VOTING.value, Phase.RECOVERING.value) and not (
            body.get("_deleted")
        )
        epoch = int(proposal["epoch"]) if voting and proposal else -1
        deleted = bool(body.get("_deleted"))
        for hosted in self.nodes.values():
            # a reservation that ends by a commit counts on as an admitted share: both change
            # here, before any other vote of this node is decided
            for stale in [k for k in hosted.reservations if k[0] == uid and k[1] != epoch]:
                del hosted.reservations[stale]
            hosted.see(uid, None if deleted else status)
        for writer in self.ballots.values():
            writer.forget(uid, epoch)
        if epoch < 0:
            return
        claim = CapacityClaim.model_validate(body)
        assert claim.status is not None
        assert claim.status.proposal is not None
        votes = claim.status.votes or {}
        for name in claim.status.proposal.voters:
            node = self.nodes.get(name)
            if node is None:
                continue
            key = (uid, epoch, name)
            existing = votes.get(name)
            if key in self.cast or (existing is not None and existing.epoch == epoch):
                continue
            self.cast[key] = self.clock()
            await self._vote(claim, node)
        self._forget_old_casts()

    async def _vote(self, claim: CapacityClaim, node: VoterNode) -> None:
        assert claim.status is not None
        proposal = claim.status.proposal
        assert proposal is not None
        now = self.clock()
        if node.name in proposal.placement:
            substrate = proposal.substrate or Substrate.HOST
            committed = (proposal.committed or {}).get(node.name)
            if committed is None:  # a proposal of an operator that does not say: read the ledger
                ledger = await self._capacity_node(node.name)
                committed = allocated_share(ledger, substrate) if ledger else 0.0
            uid = claim.metadata.uid or ""
            seen = node.committed_seen(substrate.value, excluding=uid)
            decision = decide_placement(
                node=node,
                claim_uid=uid,
                epoch=proposal.epoch,
                substrate=substrate,
                share=proposal.share or 0.0,
                committed=max(committed, seen),
                thresholds=await self._current_thresholds(),
                now=now,
            )
            if decision.reserve is not None:
                node.reservations[(claim.metadata.uid or "", proposal.epoch)] = decision.reserve
            vote = decision.vote
        elif proposal.attested_since is not None:
            await self._attest(claim, node.name, proposal.attested_since)
            return
        else:
            thresholds = await self._current_thresholds()
            leases = await self._leases()
            nodes = {
                n: await self._witnessed_node(n, thresholds.max_age_seconds)
                for n in proposal.placement
            }
            vote = decide_witness(
                epoch=proposal.epoch,
                placement=proposal.placement,
                leases=leases,
                nodes=nodes,
                max_age=thresholds.max_age_seconds,
                now=now,
            )
        await self._cast(claim, node.name, vote)

    async def _attest(self, claim: CapacityClaim, node: str, since: datetime) -> None:
        """Answer as a witness by attestation: nothing to write when the ballot already says
        (or is about to say) that every placement node was alive at or after ``since``.
        Otherwise judge the placement nodes and queue those alive, timed no earlier than
        ``since`` (this agent saw the proposal, so it judges after it was made, whatever its
        clock says). Attestations older than ``since`` go with the same write (no proposal
        made from now on can count them), but not those an open proposal relies on (until its
        claim leaves the epoch). A placement node not alive gets no attestation and the
        proposal a NO vote, as before. The write also attests the nodes the proposal names
        ``ahead`` that are alive and not attested since ``since``: the next proposals, placed
        there, then cost it no write (docs/admission.md, "Attesting ahead")."""
        assert claim.status is not None
        assert claim.status.proposal is not None
        proposal = claim.status.proposal
        writer = self.ballot(node)
        uid = claim.metadata.uid or ""
        if all(writer.attested_since(p, since) for p in proposal.placement):
            writer.rely(uid, proposal.epoch, proposal.placement)
            return
        thresholds = await self._current_thresholds()
        max_age = thresholds.max_age_seconds
        leases = await self._leases()
        now = self.clock()
        nodes = {n: await self._witnessed_node(n, max_age) for n in proposal.placement}
        ahead = {
            n: await self._witnessed_node(n, max_age)
            for n in proposal.ahead or []
            if n not in nodes and n != node and not writer.attested_since(n, since)
        }
        at = max(datetime.fromtimestamp(now, UTC), since)
        alive: dict[str, datetime] = {}
        for name, seen in {**nodes, **ahead}.items():
            verdict = decide_witness(
                epoch=proposal.epoch, placement=[name], leases=leases, nodes={name: seen},
                max_age=max_age, now=now,
            )  # fmt: skip
            if verdict.vote is VoteValue.YES:
                alive[name] = at
        placed = [n for n in nodes if n in alive]
        if len(placed) == len(nodes):
            writer.rely(uid, proposal.epoch, proposal.placement)
        judged = [*nodes, *ahead]
        writer.attest(alive, drop=[n for n in judged if n not in alive], older_than=since)
        if len(placed) < len(nodes):
            vote = decide_witness(
                epoch=proposal.epoch, placement=proposal.placement, leases=leases, nodes=nodes,
                max_age=max_age, now=now,
            )  # fmt: skip
            await self._cast(claim, node, vote)

    async def _cast(self, claim: CapacityClaim, node: str, vote: Vote) -> None:
        """Queue the vote in the node's ballot (written with the node's other votes)."""
        entry = BallotVote(**vote.model_dump(), claim=claim_key(claim))
        self.ballot(node).put(claim.metadata.uid or "", entry)
        log.debug("%s voted %s on %s: %s", node, vote.vote.value, entry.claim, vote.reason)

    def ballot(self, node: str) -> BallotWriter:
        writer = self.ballots.get(node)
        if writer is None:
            writer = self.ballots[node] = BallotWriter(self.api, node, spacing=self.ballot_interval)
        return writer

    @property
    def votes_cast(self) -> int:
        """Votes written to the API server (in ballots)."""
        return sum(writer.votes_written for writer in self.ballots.values())

    def _forget_old_casts(self) -> None:
        horizon = self.clock() - 600
        for key in [k for k, t in self.cast.items() if t < horizon]:
            del self.cast[key]

    # -- cached reads -------------------------------------------------------------------------

    async def _capacity_node(self, name: str) -> CapacityNode | None:
        async with self._node_locks.setdefault(name, asyncio.Lock()):
            return await self._read_capacity_node(name)

    async def _witnessed_node(self, name: str, max_age: float) -> CapacityNode | None:
        """A placement node's CapacityNode as a witness judges it: a copy that still passes
        the freshness rule is used for up to WITNESS_CACHE_SECONDS (its readings can only get
        newer meanwhile; the Lease, read every second, is what tells a node died), any other
        is read again at most every CACHE_SECONDS. One read per node per several seconds,
        instead of one per placement node per second of votes."""
        cached = self._fresh_cached(name, max_age, self.clock())
        return cached if cached is not None else await self._capacity_node(name)

    def _fresh_cached(self, name: str, max_age: float, now: float) -> CapacityNode | None:
        """The cached CapacityNode of ``name`` when a witness may still judge by it (as
        :meth:`_witnessed_node`), without reading it: None otherwise."""
        cached = self._node_cache.get(name)
        if (
            cached is not None
            and cached[1] is not None
            and now - cached[0] < WITNESS_CACHE_SECONDS
            and node_staleness(cached[1], datetime.fromtimestamp(now, UTC), max_age) is None
        ):
            return cached[1]
        return None

    async def _read_capacity_node(self, name: str) -> CapacityNode | None:
        now = self.clock()
        cached = self._node_cache.get(name)
        if cached and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        try:
            body = await asyncio.to_thread(self.api.get, CapacityNodes, name)
            node: CapacityNode | None = CapacityNode.model_validate(dict(body))
        except httpx2.HTTPStatusError as exc:
            if http_status(exc) != 404:
                raise
            node = None
        self._node_cache[name] = (now, node)
        return node

    async def _leases(self) -> dict[str, tuple[float | None, float]]:
        """Every node Lease as (renewed at, duration); one list at a time, cached for a second
        (lightkube decodes the list with msgspec, cheap even for a hundred simulated nodes)."""
        async with self._lease_lock:
            now = self.clock()
            if self._lease_cache and now - self._lease_cache[0] < CACHE_SECONDS:
                return self._lease_cache[1]
            infos = await asyncio.to_thread(self._list_leases)
            leases: dict[str, tuple[float | None, float]] = {}
            for lease in infos:
                renewed = lease.renew_time.timestamp() if lease.renew_time else None
                leases[lease.name] = (renewed, float(lease.duration_seconds))
            self._lease_cache = (now, leases)
            return leases

    def _list_leases(self) -> list[LeaseInfo]:
        return [lease_info(lease) for lease in self.api.list(Lease, namespace=self.namespace)]

    async def _current_thresholds(self) -> Thresholds:
        """The calibration ConfigMap's thresholds, re-read at most every THRESHOLDS_SECONDS by
        one caller while the others wait for it (not one read per concurrent vote)."""
        if self._thresholds and self.clock() - self._thresholds[0] < THRESHOLDS_SECONDS:
            return self._thresholds[1]
        async with self._thresholds_lock:
            if self._thresholds and self.clock() - self._thresholds[0] < THRESHOLDS_SECONDS:
                return self._thresholds[1]
            return await self._read_thresholds()

    async def _read_thresholds(self) -> Thresholds:
        now = self.clock()
        data: Mapping[str, str] | None
        try:
            cm = await asyncio.to_thread(
                self.api.get, ConfigMap, CALIBRATION_CONFIGMAP, namespace=self.namespace
            )
            data = cm.data or {}
        except httpx2.HTTPStatusError as exc:
            if http_status(exc) != 404:
                raise
            data = None
        parsed = Thresholds.from_configmap(data, self._thresholds[1] if self._thresholds else None)
        for warning in parsed.warnings:
            log.warning("calibration ConfigMap: %s", warning)
        self._thresholds = (now, parsed.thresholds)
        return parsed.thresholds
