"""The operator's side of quorum admission (DESIGN section 5).

:class:`Engine` is level-based: :meth:`Engine.reconcile` looks at a claim as it is now and takes
the one step its phase calls for (propose, commit, abort, reject), writing with compare-and-swap.
A conflict means someone else moved the object: re-read and decide again. Decisions come from the
pure functions in :mod:`capacity_api.admission`; this module only reads, writes and remembers.

The allocation ledger is a pure function of the claims' status (``capacity_api.ledger``), kept
in memory: filled from the claims listed on start before anything is admitted, then from
every claim event and every write's response. A commit is checked against it and holds its
shares there before its claim write goes out (no await between the check and the hold), so no
node is ever promised past its capacity by this operator, however many steps run at once; the
placement agent, which keeps its YES promises until it sees their outcome, is what keeps two
copies that act at once from over-promising (docs/admission.md, "The ledger").
``CapacityNode.status.allocated`` is the ledger's report, written now and then
(:meth:`Engine.report_ledger`), never read to decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from capacity_api import reasons
from capacity_api.admission import (
    EPSILON,
    Action,
    ClaimError,
    NodeView,
    NoPlacement,
    Outcome,
    PlacementPlan,
    Tally,
    admit_order,
    allocation,
    attested_vote,
    ballot_votes,
    claim_key,
    claim_substrate,
    ledger_full,
    new_proposal,
    next_step,
    no_room,
    node_staleness,
    pending,
    plan_placement,
    proposal_open,
    quorum,
    room_grew,
    same_wait,
    tally,
    waiting_for_room,
    wake_at,
    with_ballot_votes,
)
from capacity_api.gates import CALIBRATION_CONFIGMAP, Thresholds
from capacity_api.lease import LeaseInfo
from capacity_api.ledger import Ledger
from capacity_api.models import (
    Allocation,
    CapacityBallotStatus,
    CapacityClaim,
    CapacityNode,
    Holder,
    Phase,
    Placement,
    Proposal,
    Recovery,
    Substrate,
    Vote,
)
from capacity_api.recovery import (
    Decision,
    RecoveryDecision,
    plan_recovery,
    recovery_moves,
    stranded_on,
    survivors,
)
from capacity_api.webhook import CLAIM_LABEL
from capacity_operator.kube import (
    JSON,
    ConflictError,
    Kube,
    NotFoundError,
    parse_claim,
    parse_node,
)
from capacity_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

EventSink = Callable[[JSON, str, str, str], None]
"""(object body, type Normal|Warning, reason, message) -> None."""

MAX_MESSAGE = 1000

LIVENESS_TICKS_PER_SECOND = 4
"""A node's Lease liveness and freshness are recomputed at most this often (or on a change)."""

RECHECK_SECONDS = 1.0
"""How often a claim waiting for nodes or capacity, or recovering, is looked at again."""
ROOM_PASS_CLAIMS = 256
"""When room is freed, how many of the waiting claims (the oldest) one pass places: a pass
costs a placement per claim, so a long queue under churn does not cost a core; the younger
ones are looked at by their own timers (every ``ROOM_RECHECK``), each right after a pass."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Inflight:
    """An open proposal of this operator: its share counts against placement of others."""

    substrate: str
    nodes: tuple[str, ...]
    share: float
    deadline: datetime


@dataclass
class WaitingRoom:
    """The claims Pending with reason WaitingForCapacity, looked at again when room is freed."""

    claims: set[str] = field(default_factory=set)
    freed: bool = False
    """Room may have been freed (a holder or an open proposal gone, a node added or back)
    since the waiting claims were last looked at."""
    swept: datetime | None = None
    """When the waiting claims were last looked at because room was freed."""
    rechecked: set[str] = field(default_factory=set)
    """Waiting claims whose time to be looked at again came (``ROOM_RECHECK``): looked at
    right after the next pass, so that room found free goes to the oldest claims it fits
    first, not to whichever claim's timer came first."""


class Engine:
    """Admission state of one operator process: caches, locks and the protocol steps."""

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        emit: EventSink,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.emit = emit
        self.clock = clock
        self.nodes: dict[str, CapacityNode] = {}
        self.node_versions: dict[str, str] = {}
        self.leases: dict[str, LeaseInfo] = {}
        self.inflight: dict[str, Inflight] = {}
        self._node_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._claim_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.ready = asyncio.Event()
        self._thresholds: tuple[datetime, Thresholds] | None = None
        self._thresholds_lock = asyncio.Lock()
        self._threshold_warnings: tuple[str, ...] = ()
        """What was wrong with the calibration ConfigMap at the last read (said once)."""
        self.failed: dict[str, datetime] = {}
        """Nodes declared failed (and fenced) by the node lifecycle, with when."""
        self.returning: dict[str, datetime] = {}
        """Failed nodes whose Lease is live again, with when they came back: not used until
        they published a full window measured since (recovery.trusted_again)."""
        # the admission loop (:meth:`run`): what it knows of the claims and what is due
        self.claims: dict[str, JSON] = {}
        """The newest body seen of every served claim, by uid (watch events and our writes)."""
        self._due: set[str] = set()
        """Claims that changed since the loop last looked at them."""
        self._wake_at: dict[str, datetime] = {}
        """Claims to look at at a time although nothing changes (deadlines, waiting)."""
        self._queued: dict[str, tuple[datetime | None, str]] = {}
        """Pending claims waiting for room among the open proposals (flow control), with their
        place in the queue (creation time, namespace/name)."""
        self._deleted: dict[str, JSON] = {}
        """Claims gone from the API whose holders are still to be freed."""
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.threads)
        self.paused = False
        """Set by the node lifecycle from the peering status: kopf stops delivering events to
        a paused copy, and this stops the loop's own wake-ups (deadlines, waiting claims)."""
        self._liveness_cache: dict[
            str, tuple[tuple[str | None, datetime | None, int], bool, bool]
        ] = {}
        """Per node: (its resourceVersion, its Lease's renewal, the tick) -> (live, fresh)."""
        self._parsed: dict[str, CapacityClaim] = {}
        """The cached claims parsed once (an event is parsed once, not per look at it)."""
        self._queued_started: set[str] = set()
        """Queued claims whose first step runs (counted as open until it ends)."""
        self._background: set[asyncio.Task[None]] = set()
        self.ballots: dict[str, SeenBallot] = {}
        """Per node, its ballot as last seen: the live votes and attestations."""
        self._views: dict[str, tuple[tuple[CapacityNode, int], NodeView]] = {}
        """Per node, its view without open proposals (see :meth:`views`), with the
        CapacityNode and the ledger version it was made of."""
        self.ledger = Ledger()
        """What every node has promised: a function of the claims' status."""
        self._upkeep = _LedgerUpkeep()
        self._room = WaitingRoom()

    # -- caches --------------------------------------------------------------------------------

    def observe_node(self, body: JSON, deleted: bool = False) -> None:
        name = body["metadata"]["name"]
        if deleted:
            self.nodes.pop(name, None)
            self.node_versions.pop(name, None)
            self._views.pop(name, None)
            # its ballot goes with it (an agent still running creates it again with its next
            # vote); without this, ballots of removed nodes would stay for ever
            self.ballots.pop(name, None)
            task = asyncio.get_running_loop().create_task(self._delete_ballot(name))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        version = body["metadata"].get("resourceVersion", "")
        known = self.node_versions.get(name)
        if known is not None and not _rv_newer(version, known):
            return  # an event no newer than what our own write returned
        before = self.nodes.get(name)
        self.nodes[name] = node = parse_node(body)
        self.node_versions[name] = version
        if before is None or _allocated(before) != _allocated(node):
            self._upkeep.changed(name, self.clock())  # a new node, or its report moved
        if self._room.claims and room_grew(before, node):
            self._free_room()

    async def _delete_ballot(self, name: str) -> None:
        try:
            await self.kube.delete_ballot(name)
        except Exception as exc:  # the next deletion event or a restart tries again
            log.warning("ballot of removed node %s not deleted: %s", name, exc)

    def observe_lease(self, lease: LeaseInfo, deleted: bool = False) -> None:
        if deleted:
            self.leases.pop(lease.name, None)
            return
        before = self.leases.get(lease.name)
        self.leases[lease.name] = lease
        now = self.clock()
        if self._room.claims and lease.live(now) and not (before and before.live(now)):
            self._free_room()  # a node that was gone renews again

    def _free_room(self) -> None:
        self._room.freed = True
        self._wake.set()

    def _end_inflight(self, uid: str) -> None:
        """An open proposal of this operator ended without a commit: its share is free."""
        if self.inflight.pop(uid, None) is not None and self._room.claims:
            self._free_room()

    def observe_ballot(self, body: JSON, deleted: bool = False) -> None:
        """A node's ballot changed: keep its votes and attestations, and look again at every
        claim whose vote from that node is new or changed (only those entries are parsed), or
        that names the node as a voter when its attestations changed."""
        node = body["metadata"]["name"]
        known = self.ballots.get(node) or SeenBallot()
        if deleted:
            self.ballots.pop(node, None)
            return
        status = body.get("status") or {}
        seen = SeenBallot()
        for uid, entry in (status.get("votes") or {}).items():
            before = known.votes.get(uid)
            if before is not None and before[0] == entry:
                seen.votes[uid] = before
                continue
            try:
                seen.votes[uid] = (entry, Vote.model_validate(entry))  # its claim key dropped
            except ValueError as exc:
                log.warning("ballot %s: vote on claim %s ignored (%s)", node, uid, exc)
                continue
            if uid in self.claims:
                self._due.add(uid)
                self._wake.set()
        seen.alive_sent = status.get("alive")
        if seen.alive_sent == known.alive_sent:
            seen.alive = known.alive
        else:
            try:
                alive = CapacityBallotStatus.model_validate({"alive": seen.alive_sent}).alive
                seen.alive = alive or {}
            except ValueError as exc:
                log.warning("ballot %s: attestations ignored (%s)", node, exc)
            if seen.alive != known.alive:
                self._attestations_changed(node, seen.alive)
        self.ballots[node] = seen

    def _attestations_changed(self, node: str, alive: dict[str, datetime]) -> None:
        """Look again at the claims these attestations answer: an open proposal (they all have
        a deadline to be looked at by) that names the node as a witness and whose placement
        nodes they all cover. (A proposal answered before its write returned is looked at
        when its placement vote comes, which every commit needs.)"""
        for uid in self._wake_at:
            claim = self._parsed.get(uid)
            if claim is None or claim.status is None or not proposal_open(claim):
                continue
            proposal = claim.status.proposal
            if proposal is not None and attested_vote(proposal, node, alive) is not None:
                self._due.add(uid)
                self._wake.set()

    def attested_alive(self, node: str) -> dict[str, datetime] | None:
        """The nodes ``node``'s ballot attests alive, with when (as last seen)."""
        seen = self.ballots.get(node)
        return seen.alive if seen is not None else None

    def ballot_vote(self, node: str, uid: str) -> Vote | None:
        """The vote on claim ``uid`` in ``node``'s ballot, as last seen."""
        seen = self.ballots.get(node)
        entry = seen.votes.get(uid) if seen is not None else None
        return entry[1] if entry is not None else None

    def with_votes(self, claim: CapacityClaim) -> CapacityClaim:
        """The claim as the protocol decides on it: while its proposal is open, its
        ``status.votes`` are the ballots' votes on it (``capacity_api.admission``'s one rule,
        which ``capctl explain`` shows as well)."""
        votes = ballot_votes(claim, self.ballot_vote, alive=self.attested_alive)
        return with_ballot_votes(claim, votes)

    def observe_claim(self, body: JSON, deleted: bool = False, *, own: bool = False) -> None:
        """A claim as a watch event (or, with ``own``, our own write) shows it now: cache it and
        tell the loop. An event no newer than what our write returned is not news."""
        uid = body["metadata"].get("uid", "")
        if deleted:
            self.claims.pop(uid, None)
            self._parsed.pop(uid, None)
            self._room.claims.discard(uid)
            self._wake_at.pop(uid, None)
            self._queued.pop(uid, None)
            self._due.discard(uid)
            self._deleted[uid] = body
            self._ledger_changed(self.ledger.forget(uid))
            self._wake.set()
            return
        version = body["metadata"].get("resourceVersion", "")
        known = self.claims.get(uid)
        known_version = known["metadata"].get("resourceVersion", "") if known else ""
        if known is not None and not _rv_newer(version, known_version):
            return  # older than, or the same as, what we have
        self.claims[uid] = body
        self._parsed[uid] = claim = parse_claim(body)
        self._ledger_changed(self.ledger.observe(claim))
        if waiting_for_room(claim):
            self._room.claims.add(uid)
        else:
            self._room.claims.discard(uid)
        when = wake_at(claim, self.clock(), timedelta(seconds=RECHECK_SECONDS))
        if when is None:
            self._wake_at.pop(uid, None)
        else:
            self._wake_at[uid] = when
        if not own:
            self._due.add(uid)
            self._wake.set()

    def _ledger_changed(self, freed: bool) -> None:
        """The ledger changed: report it, and look at the waiting claims when room was freed."""
        now = self.clock()
        for name in self.ledger.dirty:
            self._upkeep.changed(name, now)
        self.ledger.dirty.clear()
        if freed and self._room.claims:
            self._free_room()

    def parsed(self, body: JSON) -> CapacityClaim:
        """The claim of ``body``: parsed once when it is the newest body seen of its claim."""
        uid = body["metadata"].get("uid", "")
        if self.claims.get(uid) is body and uid in self._parsed:
            return self._parsed[uid]
        return parse_claim(body)

    def views(
        self, exclude_claim: str | None = None, *, ignore_inflight: bool = False
    ) -> list[NodeView]:
        """Every known node as the placement sees it, open proposals of others included."""
        now = self.clock()
        reserved: defaultdict[str, defaultdict[str, float]] = defaultdict(
            lambda: defaultdict(float)
        )
        for uid, flight in self.inflight.items():
            if ignore_inflight or uid == exclude_claim or flight.deadline < now:
                continue
            for target in flight.nodes:
                if not self.ledger.holds(target, uid):  # committed: counted as a holder
                    reserved[target][flight.substrate] += flight.share
        views = []
        for name, node in sorted(self.nodes.items()):
            live, fresh = self._liveness(name, node, now)
            live = live and name not in self.failed and name not in self.returning
            view = self._base_view(name, node, live, fresh)
            held = reserved.get(name)
            if held:
                view = replace(view, reserved=dict(held))  # the base view's facts, not again
            views.append(view)
        return views

    def _base_view(self, name: str, node: CapacityNode, live: bool, fresh: bool) -> NodeView:
        """The node's view without open proposals, kept while nothing in it changes: its facts
        are computed once per version of the CapacityNode and of its ledger, not once per
        proposal."""
        key = (node, self.ledger.changes.get(name, 0))
        made_of, view = self._views.get(name, (None, None))
        same = made_of is not None and made_of[0] is node and made_of[1] == key[1]
        if view is not None and same and (view.lease_live, view.fresh) == (live, fresh):
            return view
        facts = view.facts if view is not None and same else None
        view = NodeView(
            name=name, node=self.with_ledger(name, node), lease_live=live, fresh=fresh,
            facts=facts,
        )  # fmt: skip
        self._views[name] = (key, view)
        return view

    def with_ledger(self, name: str, node: CapacityNode) -> CapacityNode:
        """The node with the ledger's holders as its ``status.allocated`` (what placement and
        the commit check read), whatever its report says now."""
        status = node.status
        if status is None:
            return node
        allocated = self.ledger.allocations(name) or None
        status = status.model_copy(update={"allocated": allocated})
        return node.model_copy(update={"status": status})

    def _liveness(self, name: str, node: CapacityNode, now: datetime) -> tuple[bool, bool]:
        """(Lease live, readings fresh) of a node, computed again only when its CapacityNode
        or Lease changed or a quarter of a second passed: every proposal looks at every node,
        and the freshness rule per node per proposal was a tenth of the operator's CPU."""
        lease = self.leases.get(name)
        tick = int(now.timestamp() * LIVENESS_TICKS_PER_SECOND)
        key = (self.node_versions.get(name), lease.renew_time if lease else None, tick)
        cached = self._liveness_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        live = lease is not None and lease.live(now)
        fresh = node_staleness(node, now, self.max_age_seconds, self.min_samples) is None
        self._liveness_cache[name] = (key, live, fresh)
        return live, fresh

    def node_lock(self, name: str) -> asyncio.Lock:
        """The lock every compare-and-swap write of this node's status holds."""
        return self._node_locks[name]

    async def write_node_status(self, name: str, node: CapacityNode, status: JSON) -> None:
        """Compare-and-swap merge of ``status`` into the node (ConflictError when it moved)."""
        await self._write_node(name, node, status)

    async def refresh_node(self, name: str) -> CapacityNode | None:
        """Read the node again (and update the cache); None when it is gone."""
        return await self._fresh_node(name)

    @property
    def _in_force(self) -> Thresholds:
        """The thresholds of the last read (the defaults before the first)."""
        return self._thresholds[1] if self._thresholds else Thresholds()

    @property
    def min_samples(self) -> int:
        """minSamples of the thresholds in force."""
        return self._in_force.min_samples

    @property
    def max_age_seconds(self) -> float:
        """maxAgeSeconds of the thresholds in force: how old a node's newest reading may be for
        placement, the same limit its agent and the witnesses apply to their votes."""
        return self._in_force.max_age_seconds

    async def thresholds(self) -> Thresholds:
        """Gate thresholds from the calibration ConfigMap (re-read at most every 5 s, by one
        caller: the others wait for its read instead of each sending their own, which at 30
        claims a second was 4 ConfigMap reads per claim)."""
        cached = self._cached_thresholds()
        if cached is not None:
            return cached
        async with self._thresholds_lock:
            cached = self._cached_thresholds()
            if cached is not None:
                return cached
            return await self._read_thresholds()

    def _cached_thresholds(self) -> Thresholds | None:
        now = self.clock()
        if self._thresholds is not None and (now - self._thresholds[0]).total_seconds() < 5:
            return self._thresholds[1]
        return None

    async def _read_thresholds(self) -> Thresholds:
        now = self.clock()
        data = await self.kube.get_configmap_data(self.settings.namespace, CALIBRATION_CONFIGMAP)
        last_good = self._thresholds[1] if self._thresholds is not None else None
        parsed = Thresholds.from_configmap(data, last_good)
        if parsed.warnings != self._threshold_warnings:
            # said once per change of what is wrong, not on every re-read
            self._threshold_warnings = parsed.warnings
            for warning in parsed.warnings:
                log.warning("calibration ConfigMap: %s", warning)
                self.emit(
                    {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": CALIBRATION_CONFIGMAP,
                                  "namespace": self.settings.namespace}},
                    "Warning", reasons.INVALID_THRESHOLD, warning,
                )  # fmt: skip
        self._thresholds = (now, parsed.thresholds)
        return parsed.thresholds

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load caches and build the ledger from the claims, before anything is admitted."""
        for body in await self.kube.list_nodes():
            self.observe_node(body)
        for lease in await self.kube.list_leases(self.settings.namespace):
            self.observe_lease(lease)
        for body in await self._served_claims():
            self.ledger.observe(parse_claim(body))
        self._ledger_changed(False)
        now = self.clock()
        for name in self.nodes:  # reported once (where the report differs)
            self._upkeep.changed(name, now)
        self.ready.set()

    async def _served_claims(self) -> list[JSON]:
        """Every claim this operator serves (its ``claim_namespaces``, or all)."""
        served = set(self.settings.claim_namespaces)
        return [
            body
            for body in await self.kube.list_claims()
            if not served or body["metadata"].get("namespace") in served
        ]

    # -- the admission loop ----------------------------------------------------------------

    async def run(self) -> None:
        """The admission loop: each cycle takes every claim that changed, whose deadline came or
        that waits to be looked at again, and starts its next step; Pending claims propose in
        creation order, only while fewer than ``max_open_proposals`` epochs are open (the rest
        wait, unwritten, for an epoch to end). Steps of different claims run concurrently, one
        at a time per claim."""
        await self.ready.wait()
        # cancelled, the loop stops starting steps; the steps under way are left to finish
        # their writes (:meth:`drain`, which a graceful stop awaits with a bound, and whose
        # cancellation cancels them)
        while True:
            if self.paused:  # a peer of higher priority acts; the cache keeps filling
                await asyncio.sleep(RECHECK_SECONDS)
                continue
            await self._sleep()
            self.cycle()

    def _next_room_sweep(self) -> datetime:
        assert self._room.swept is not None
        return self._room.swept + timedelta(seconds=RECHECK_SECONDS)

    async def _sleep(self) -> None:
        now = self.clock()
        soonest = min(self._wake_at.values(), default=None)
        if self._room.freed and self._room.swept is not None:
            soonest = min(soonest or self._next_room_sweep(), self._next_room_sweep())
        timeout = RECHECK_SECONDS if soonest is None else (soonest - now).total_seconds()
        if self._upkeep.next_gc is not None:
            timeout = min(timeout, (self._upkeep.next_gc - now).total_seconds())
        report = self._next_report(now)
        if report is not None:
            timeout = min(timeout, (report - now).total_seconds())
        if timeout > 0 and not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        else:
            await asyncio.sleep(0)  # the steps and the watches run before the next cycle
        self._wake.clear()

    def cycle(self) -> int:
        """Start the steps that are due now; return how many were started."""
        now = self.clock()
        for uid, when in list(self._wake_at.items()):
            if when <= now:
                del self._wake_at[uid]
                if uid in self._room.claims:  # after a pass (see WaitingRoom.rechecked)
                    self._room.rechecked.add(uid)
                    self._room.freed = True
                else:
                    self._due.add(uid)
        rechecked: set[str] = set()
        if self._room.freed and (self._room.swept is None or now >= self._next_room_sweep()):
            # at most once a RECHECK_SECONDS however often room is freed
            self._room.freed = False
            self._room.swept = now
            self._due |= self._fitting_now()
            rechecked = self._room.rechecked - self._due
            self._room.rechecked.clear()
        started = 0
        for uid, gone in list(self._deleted.items()):
            if uid not in self._running:
                del self._deleted[uid]
                started += self._start(uid, self.release(gone))
        for uid in sorted(self._due):
            started += self._start_due(uid)
        for uid in sorted(rechecked):  # their steps start after those of the pass
            self._due.add(uid)
            started += self._start_due(uid)
        started += self._start_queued()
        log.debug(
            "cycle: %d claims, %d started, %d running, %d queued, %d open, %d timed",
            len(self.claims), started, len(self._running), len(self._queued),
            len(self.inflight), len(self._wake_at),
        )  # fmt: skip
        return started + self._start_ledger_work(now)

    def _start_due(self, uid: str) -> int:
        body = self.claims.get(uid)
        if body is not None and uid in self._running:
            return 0  # after the running step: its end wakes the loop
        self._due.discard(uid)
        if body is None:
            return 0
        claim = self._parsed[uid]
        if pending(claim):
            self._queued[uid] = (claim.metadata.creation_timestamp, claim_key(claim))
            return 0
        return self._start(uid, self.reconcile(body))

    def _start_ledger_work(self, now: datetime) -> int:
        """The ledger's garbage collection and report, when due."""
        started = 0
        if self._upkeep.next_gc is None:
            self._upkeep.next_gc = now + timedelta(seconds=self.settings.ledger_gc_seconds)
        elif now >= self._upkeep.next_gc and "ledger-gc" not in self._running:
            self._upkeep.next_gc = now + timedelta(seconds=self.settings.ledger_gc_seconds)
            started += self._start("ledger-gc", self.collect_garbage())
        if "ledger-report" not in self._running and self._reports_due(now):
            started += self._start("ledger-report", self.report_ledger())
        return started

    def _report_at(self, name: str, since: datetime) -> datetime:
        """When the report of ``name``, changed since ``since``, is due: once the commits of
        the moment have gathered (``ledger_report_gather_seconds`` after the first change),
        and no sooner than ``ledger_report_seconds`` after its last report."""
        due = since + timedelta(seconds=self.settings.ledger_report_gather_seconds)
        last = self._upkeep.at.get(name)
        if last is not None:
            due = max(due, last + timedelta(seconds=self.settings.ledger_report_seconds))
        return due

    def _reports_due(self, now: datetime) -> list[str]:
        return sorted(
            name
            for name, since in self._upkeep.unreported.items()
            if self._report_at(name, since) <= now
        )

    def _next_report(self, now: datetime) -> datetime | None:
        if not self._upkeep.unreported or "ledger-report" in self._running:
            return None  # a report under way wakes the loop when it ends
        return min(self._report_at(name, since) for name, since in self._upkeep.unreported.items())

    async def report_ledger(self) -> int:
        """Write the ledger into ``status.allocated`` of the nodes whose report differs from
        it: ``ledger_report_gather_seconds`` after the first change since a quiet spell, then
        at most once per ``ledger_report_seconds`` per node, however many commits land there
        meanwhile (a report, for users, ``capctl`` and the agent's headroom reading; no
        decision reads it). Returns the nodes written."""
        now = self.clock()
        written = 0
        for name in self._reports_due(now):
            self._upkeep.unreported.pop(name, None)
            node = self.nodes.get(name)
            if node is None:
                continue
            current = _allocated(node)
            wanted = self._report_of(name, current)
            if _same_allocations(current, wanted):
                continue
            self._upkeep.at[name] = now
            patch: JSON = {s: a.wire() for s, a in wanted.items()}
            patch.update({s: None for s in current if s not in wanted})
            try:
                body = await self.kube.patch_node_status(name, {"allocated": patch})
            except NotFoundError:
                continue
            except Exception as exc:  # said, and tried again after the spacing
                log.warning("ledger of %s not reported: %s", name, exc)
                self._upkeep.changed(name, now)
                continue
            self.observe_node(body)
            written += 1
            log.debug("ledger of %s reported: %s", name, _summary(wanted))
        return written

    def _fitting_now(self) -> set[str]:
        """Room was freed: the claims waiting for it, oldest first, against one snapshot of
        the nodes (as Kueue's scheduler takes its queue in a cycle). Those that fit now get a
        step, and the room each takes counts for the next; the others stay waiting, not
        looked at again, so that room freed is taken by the oldest claims it fits, and a
        thousand waiting claims cost one pass of placement (of the ``ROOM_PASS_CLAIMS``
        oldest), not a thousand steps."""
        floor = datetime.min.replace(tzinfo=UTC)
        waiting = sorted(
            ((claim.metadata.creation_timestamp or floor, claim_key(claim)), uid)
            for uid in self._room.claims
            if (claim := self._parsed.get(uid)) is not None
        )[:ROOM_PASS_CLAIMS]
        views = {view.name: view for view in self.views()}
        iso = self._in_force.theta_iso
        fitting: set[str] = set()
        for _, uid in waiting:
            claim = self._parsed[uid]
            try:
                substrate = claim_substrate(claim.spec)
            except ClaimError:
                fitting.add(uid)  # its step rejects it
                continue
            refused = dict(claim.status.refusals or {}) if claim.status else {}
            plan = plan_placement(
                claim.spec, substrate, list(views.values()), refused, min_isolation=iso
            )
            if isinstance(plan, PlacementPlan):
                fitting.add(uid)
                for name in plan.placement:
                    views[name] = views[name].with_reserved(substrate, plan.share)
        return fitting

    def _start_queued(self) -> int:
        """Flow control: queued Pending claims propose, oldest first, while fewer than
        ``max_open_proposals`` epochs are open."""
        open_now = len(set(self.inflight) | self._queued_started)
        if open_now >= self.settings.max_open_proposals or not self._queued:
            return 0
        for uid in [u for u in self._queued if u not in self.claims]:
            del self._queued[uid]
        waiting = [(uid, *key) for uid, key in self._queued.items() if uid not in self._running]
        started = 0
        for uid in admit_order(waiting, open_now, self.settings.max_open_proposals):
            del self._queued[uid]
            self._queued_started.add(uid)
            started += self._start(uid, self.reconcile(self.claims[uid]))
        return started

    def _start(self, key: str, step: Coroutine[Any, Any, Any]) -> int:
        async def bounded() -> None:
            async with self._slots:
                await step

        task = asyncio.create_task(bounded(), name=f"claim-{key}")
        self._running[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))
        return 1

    def _finished(self, key: str, task: asyncio.Task[None]) -> None:
        self._running.pop(key, None)
        self._queued_started.discard(key)
        body = self.claims.get(key)
        if not task.cancelled() and task.exception() is not None:
            log.error("claim %s: step failed: %r", key, task.exception(), exc_info=task.exception())
            if body is not None:  # look again after a pause, not in a tight loop
                self._wake_at[key] = self.clock() + timedelta(seconds=RECHECK_SECONDS)
        elif body is not None and key not in self._wake_at:
            # a step that wrote nothing (still waiting for capacity) sets no time to look again
            recheck = timedelta(seconds=RECHECK_SECONDS)
            when = wake_at(self._parsed[key], self.clock(), recheck)
            if when is not None:
                self._wake_at[key] = when
        self._wake.set()

    async def drain(self) -> None:
        """Wait until no step and no background deletion is running (tests; a clean stop)."""
        while self._running or self._background:
            await asyncio.gather(*self._running.values(), *self._background, return_exceptions=True)

    def _report_of(self, name: str, current: Mapping[str, Allocation]) -> dict[str, Allocation]:
        """What the node's ``status.allocated`` should say: the ledger; for an operator that
        serves some namespaces only, with the holders of other namespaces' claims kept as
        they are (another operator's to report)."""
        wanted = self.ledger.allocations(name)
        served = set(self.settings.claim_namespaces)
        if not served:
            return wanted
        for substrate, alloc in current.items():
            theirs = [h for h in alloc.holders if h.claim.partition("/")[0] not in served]
            if theirs:
                ours = wanted[substrate].holders if substrate in wanted else []
                wanted[substrate] = allocation([*ours, *theirs])
        return wanted

    async def collect_garbage(self) -> int:
        """Forget claims that no longer exist (a deletion this operator did not see: a watch
        gap, or a pause): their holders leave the ledger. The claims the ledger knows are
        taken before the list is asked for, so a uid missing from the list belongs to a claim
        deleted since, never to one created meanwhile. Returns the claims freed that held
        something."""
        known = self.ledger.uids()
        if not known:
            return 0
        alive = {b["metadata"].get("uid", "") for b in await self._served_claims()}
        freed = 0
        for uid in sorted(known - alive):
            nodes = self.ledger.nodes_of(uid)
            if nodes:
                freed += 1
                log.info("ledger: freeing the holders of deleted claim %s on %s", uid,
                         ", ".join(sorted(nodes)))  # fmt: skip
            self._ledger_changed(self.ledger.forget(uid))
        return freed

    # -- reconcile -----------------------------------------------------------------------------

    async def reconcile(self, body: JSON) -> None:
        """Take the next protocol step for a claim, re-reading on conflicts."""
        uid = body["metadata"].get("uid", "")
        async with self._claim_locks[uid]:
            cached = self.claims.get(uid)
            if cached is not None and _rv_newer(
                cached["metadata"].get("resourceVersion", ""),
                body["metadata"].get("resourceVersion", ""),
            ):
                body = cached  # an event came in while this step waited for its turn
            for _ in range(self.settings.commit_retries):
                parsed = self._parsed.get(uid)
                claim = parsed if parsed and self.claims.get(uid) is body else parse_claim(body)
                if claim.metadata.deletion_timestamp is not None:
                    return
                try:
                    await self._step(self.with_votes(claim), body)
                except ConflictError:
                    try:
                        body = await self.kube.get_claim(
                            claim.metadata.namespace or "", claim.metadata.name or ""
                        )
                    except NotFoundError:
                        return
                    if uid in self.claims:
                        self.observe_claim(body, own=True)
                    continue
                return
            log.warning("claim %s: gave up after repeated conflicts", claim_key(claim))

    async def _step(self, claim: CapacityClaim, body: JSON) -> None:
        step = next_step(claim, self.clock())
        status = claim.status
        if step.action is Action.PROPOSE:
            await self._propose(claim, body)
        elif step.action is Action.RESTART:
            await self._abort(
                claim,
                body,
                reasons.SPEC_CHANGED,
                "the spec changed while voting; admission starts over",
                refused={},
                restart=True,
            )
        elif step.action in (Action.COMMIT, Action.ABORT, Action.WAIT):
            assert status is not None
            assert status.proposal is not None
            assert step.tally is not None
            self._track(claim, status.proposal)
            result = step.tally
            if step.action is Action.COMMIT:
                await self._commit(claim, body, result)
            elif step.action is Action.ABORT:
                refused = {n: result.counted[n].reason or "voted NO" for n in result.refused_by}
                reason = reasons.VOTE_REFUSED if refused else reasons.DEADLINE_PASSED
                await self._abort(claim, body, reason, result.reason, refused=refused)
            # WAIT: nothing to write. The tally is recorded with the commit or the abort only,
            # since a write per arriving vote would race every other voter's patch.
        elif step.action is Action.NOTE_SPEC_CHANGE:
            await self._admitted(claim, body)
        elif step.action is Action.RECOVER:
            await self._recovering(claim, body)

    async def _admitted(self, claim: CapacityClaim, body: JSON) -> None:
        status = claim.status
        assert status is not None
        generation = claim.metadata.generation
        if generation is None or generation == status.observed_generation:
            return
        message = (
            f"spec changes after admission are not applied (generation {generation}); the "
            "admission stands as committed; delete and re-create the claim to change it"
        )
        await self._write_claim(
            claim,
            {
                "observedGeneration": generation,
                "conditions": with_condition(
                    claim,
                    type_=reasons.ADMITTED,
                    value=True,
                    reason=reasons.SPEC_CHANGED,
                    message=message,
                    generation=generation,
                ),
            },
        )
        self.emit(body, "Warning", reasons.SPEC_CHANGED, message)

    # -- propose -------------------------------------------------------------------------------

    async def _propose(
        self,
        claim: CapacityClaim,
        body: JSON,
        *,
        refused: dict[str, str] | None = None,
        attempts: int | None = None,
        cleared_votes: Iterable[str] = (),
        note: str = "",
    ) -> None:
        status = claim.status
        refusals = (
            dict(status.refusals or {}) if status and refused is None else dict(refused or {})
        )
        tries = attempts if attempts is not None else (status.attempts or 0) if status else 0
        try:
            substrate = claim_substrate(claim.spec)
        except ClaimError as exc:
            await self._reject(claim, body, exc.reason, str(exc))
            return
        uid = claim.metadata.uid or ""
        iso = (await self.thresholds()).theta_iso
        plan = plan_placement(
            claim.spec, substrate, self.views(exclude_claim=uid), refusals, min_isolation=iso,
            pack=self._packing(uid),
        )  # fmt: skip
        if isinstance(plan, NoPlacement) and not plan.final and not plan.wait:
            # no room now: only open proposals of other claims in the way (they may abort)?
            unreserved = plan_placement(
                claim.spec, substrate, self.views(ignore_inflight=True), refusals, min_isolation=iso
            )
            plan = no_room(plan, refusals, isinstance(unreserved, PlacementPlan))
        if isinstance(plan, NoPlacement):
            if plan.wait:
                await self._wait(claim, body, plan)
                return
            message = plan.message
            if refusals:
                message += "; refused by " + "; ".join(f"{n}: {r}" for n, r in refusals.items())
            await self._reject(claim, body, plan.reason, message, refusals=refusals)
            return
        proposal = self._next_proposal(status.proposal if status else None, plan, substrate)
        message = (
            f"epoch {proposal.epoch}: asking {', '.join(plan.voters)} to vote on "
            f"{plan.share:.3f} of {substrate.value} on {', '.join(plan.placement)}"
        )
        if note:
            message += f" (after: {note})"
        await self._write_proposal(
            claim,
            body,
            proposal,
            message,
            {
                "phase": Phase.VOTING.value,
                "votes": dict.fromkeys(cleared_votes),
                "attempts": tries + 1,
                "refusals": refusals or None,
                "reason": reasons.PROPOSED,
                "nodes": None,
                "observedGeneration": claim.metadata.generation,
            },
        )

    def _packing(self, uid: str) -> Counter[str]:
        """The placement nodes of the other open proposals, with how many ask each: a new
        proposal fills the most asked first while it has room, so that one node answers the
        proposals of a busy moment in one ballot write instead of several nodes taking turns.
        Claims far enough apart that their epochs do not overlap are still spread by
        headroom."""
        now = self.clock()
        return Counter(
            node
            for other, flight in self.inflight.items()
            if other != uid and flight.deadline > now
            for node in flight.nodes
        )

    def _next_proposal(
        self,
        previous: Proposal | None,
        plan: PlacementPlan,
        substrate: Substrate,
        holding: Iterable[str] = (),
    ) -> Proposal:
        window = self.settings.witness_attestation_seconds
        return new_proposal(
            previous,
            plan,
            substrate,
            self.clock(),
            timedelta(seconds=self.settings.vote_timeout_seconds),
            holding=holding,
            attestation=timedelta(seconds=window) if window > 0 else None,
        )

    async def _write_proposal(
        self, claim: CapacityClaim, body: JSON, proposal: Proposal, message: str, status: JSON
    ) -> None:
        """Write a new epoch's proposal (with ``status``). The share is reserved before the
        write, so that concurrent proposals of other claims already see it, and dropped again
        when the write fails. No Event: the proposal is in the claim's status (``capctl
        explain`` shows it with the live tally), and an Event per proposal was a request per
        claim; the decision (admitted, rejected, aborted) is said in one."""
        self._track(claim, proposal)
        try:
            await self._write_claim(
                claim,
                {
                    **status,
                    "proposal": proposal.wire(),
                    "message": _clip(message),
                    "voteCount": f"0/{quorum(len(proposal.voters))}",
                },
            )
        except BaseException:
            self._end_inflight(claim.metadata.uid or "")
            raise

    async def _wait(self, claim: CapacityClaim, body: JSON, plan: NoPlacement) -> None:
        """Keep the claim Pending (a timer looks again) while the cluster cannot decide yet."""
        reason = (
            plan.reason
            if plan.reason == reasons.WAITING_FOR_CAPACITY
            else (reasons.WAITING_FOR_NODES)
        )
        status = claim.status
        message = _clip(plan.message)
        if (
            status
            and status.phase is Phase.PENDING
            and status.reason == reason
            and same_wait(status.message, message)
        ):
            return
        await self._write_claim(
            claim,
            {
                "phase": Phase.PENDING.value,
                "reason": reason,
                "message": message,
                "observedGeneration": claim.metadata.generation,
            },
        )
        if reason == reasons.WAITING_FOR_CAPACITY and not (status and status.reason == reason):
            # one Event when it starts waiting; none while it goes on waiting
            self.emit(body, "Normal", reason, message)

    def _track(self, claim: CapacityClaim, proposal: Proposal) -> None:
        uid = claim.metadata.uid or ""
        if proposal.substrate is None or proposal.share is None:
            return
        self.inflight[uid] = Inflight(
            substrate=proposal.substrate.value,
            nodes=tuple(proposal.placement),
            share=proposal.share,
            deadline=proposal.deadline,
        )

    # -- commit --------------------------------------------------------------------------------

    async def _commit(self, claim: CapacityClaim, body: JSON, result: Tally) -> None:
        status = claim.status
        assert status is not None
        assert status.proposal is not None
        proposal = status.proposal
        substrate = proposal.substrate or Substrate.HOST
        share = proposal.share or 0.0
        holder = Holder(
            claim=claim_key(claim), uid=claim.metadata.uid or "", epoch=proposal.epoch, share=share
        )
        iso = (await self.thresholds()).theta_iso
        taken = self._hold(claim, substrate, holder, proposal.placement, iso)
        if taken is not None:
            node, why = taken
            await self._abort(
                claim,
                body,
                reasons.CAPACITY_TAKEN,
                f"{node}: {why}",
                refused={**(status.refusals or {}), node: why},
            )
            return
        placements = [
            Placement(node=n, substrate=substrate, share=share, epoch=proposal.epoch)
            for n in proposal.placement
        ]
        message = (
            f"admitted on {', '.join(proposal.placement)} with {result.yes}/{result.needed} YES "
            f"votes (epoch {proposal.epoch})"
        )
        await self._write_holding(
            claim,
            {
                "phase": Phase.ADMITTED.value,
                "placements": [p.wire() for p in placements],
                "reason": reasons.QUORUM_REACHED,
                "message": message,
                "nodes": ",".join(proposal.placement),
                "voteCount": result.vote_count,
                "votes": votes_wire(result.counted),
                "refusals": None,
                "observedGeneration": claim.metadata.generation,
                "conditions": with_condition(
                    claim,
                    type_=reasons.ADMITTED,
                    value=True,
                    reason=reasons.QUORUM_REACHED,
                    message=message,
                    generation=claim.metadata.generation,
                ),
            },
        )
        self.inflight.pop(holder.uid, None)  # committed: no room freed
        log.info("claim %s %s", holder.claim, message)
        self.emit(body, "Normal", reasons.QUORUM_REACHED, message)

    def _hold(
        self,
        claim: CapacityClaim,
        substrate: Substrate,
        holder: Holder,
        placement: Iterable[str],
        iso: float,
        *,
        replace_older: bool = False,
    ) -> tuple[str, str] | None:
        """Check the commit against the ledger on every placement node and, when it fits
        everywhere, hold its shares there until its claim write is seen. None when held, else
        (node, why not): beyond capacity, leaving less promised slack than theta_iso (the
        isolation gate is a function of promises only, so the commit is where it holds
        whatever the votes saw), or a ledger too large for its CapacityNode. With
        ``replace_older``, the claim's holders of older epochs on those nodes are replaced.

        Synchronous: no other step runs between the check and the hold."""
        nodes = sorted(set(placement))
        for name in nodes:
            node = self.nodes.get(name)
            if node is None:
                return name, "its CapacityNode is gone"
            why = _admit_holder(
                self.with_ledger(name, node), substrate, holder, iso, replace_older=replace_older
            )
            if why is not None:
                return name, why
        self.ledger.hold(
            holder.uid,
            {(name, substrate.value): holder for name in nodes},
            claim.metadata.resource_version or "",
        )
        self._ledger_changed(False)
        return None

    async def _write_holding(self, claim: CapacityClaim, status: JSON) -> JSON:
        """Write the status of a commit that :meth:`_hold` holds. When the write surely failed
        (a conflict: the claim moved on), the hold goes at once; when its outcome is unknown
        (a timeout, an API server error), it stays until the claim is seen again, so that a
        commit that did land is never missing from the ledger."""
        try:
            return await self._write_claim(claim, status)
        except (ConflictError, NotFoundError):
            self._ledger_changed(self.ledger.unhold(claim.metadata.uid or ""))
            raise

    # -- abort, reject, release ----------------------------------------------------------------

    async def _abort(
        self,
        claim: CapacityClaim,
        body: JSON,
        reason: str,
        message: str,
        *,
        refused: dict[str, str],
        restart: bool = False,
    ) -> None:
        status = claim.status
        assert status is not None
        self._end_inflight(claim.metadata.uid or "")
        refusals = {} if restart else {**(status.refusals or {}), **refused}
        attempts = 0 if restart else (status.attempts or 0)
        self.emit(body, "Warning" if refused else "Normal", reason, _clip(message))
        if attempts >= self.settings.max_attempts:
            await self._reject(
                claim,
                body,
                reasons.ATTEMPTS_EXHAUSTED,
                f"no quorum after {attempts} proposals; last: {message}",
                refusals=refusals,
            )
            return
        await self._propose(
            claim,
            body,
            refused=refusals,
            attempts=attempts,
            cleared_votes=(status.votes or {}).keys(),
            note=message,
        )

    async def _reject(
        self,
        claim: CapacityClaim,
        body: JSON,
        reason: str,
        message: str,
        *,
        refusals: dict[str, str] | None = None,
    ) -> None:
        self._end_inflight(claim.metadata.uid or "")
        await self._write_claim(
            claim,
            {
                "phase": Phase.REJECTED.value,
                "reason": reason,
                "message": _clip(message),
                "votes": votes_wire(claim.status.votes if claim.status else None),
                "refusals": refusals or None,
                "nodes": None,
                "observedGeneration": claim.metadata.generation,
                "conditions": with_condition(
                    claim,
                    type_=reasons.ADMITTED,
                    value=False,
                    reason=reason,
                    message=_clip(message),
                    generation=claim.metadata.generation,
                ),
            },
        )
        self.emit(body, "Warning", reason, _clip(message))

    async def release(self, body: JSON) -> None:
        """The claim was deleted: its holders left the ledger with the deletion event (there is
        no finalizer: every write of one would cost two requests per claim; a deletion this
        operator does not see is caught by :meth:`collect_garbage`, and by the ledger built on
        start). Its open proposal ends, and an Event says what was freed."""
        claim = parse_claim(body)
        uid = claim.metadata.uid or ""
        async with self._claim_locks[uid]:
            self._end_inflight(uid)
            placed = [p.node for p in (claim.status.placements or [])] if claim.status else []
            if placed:
                self.emit(body, "Normal", reasons.RELEASED, "deleted; its allocation is freed")
        self._claim_locks.pop(uid, None)

    # -- recovery (DESIGN section 6) ------------------------------------------------------------

    async def recover(self, body: JSON, decision: RecoveryDecision) -> None:
        """Start what :func:`capacity_api.recovery.decide` said for an Admitted claim whose
        placement nodes failed: Recovering (then re-admission of the lost part), or Failed."""
        uid = body["metadata"].get("uid", "")
        async with self._claim_locks[uid]:
            claim = parse_claim(body)
            status = claim.status
            if status is None or status.phase is not Phase.ADMITTED:
                return
            now = self.clock()
            if decision.decision is Decision.FAIL:
                await self._fail(claim, body, decision.reason, decision.message)
                return
            entries = [r.wire() for r in status.recoveries or []]
            entries += [
                Recovery.model_validate(
                    {"from": node, "at": now, "reason": decision.message}
                ).wire()
                for node in decision.lost
            ]
            message = f"{decision.message}: re-admitting its share elsewhere"
            body = await self._write_claim(
                claim,
                {
                    "phase": Phase.RECOVERING.value,
                    "reason": reasons.NODE_FAILED,
                    "message": _clip(message),
                    "recoveries": entries,
                    "attempts": 0,
                    "refusals": None,
                    "conditions": with_condition(
                        claim,
                        type_=reasons.RECOVERED,
                        value=False,
                        reason=reasons.RECOVERING,
                        message=_clip(message),
                        generation=claim.metadata.generation,
                    ),
                },
            )
            log.warning("claim %s recovering: %s", claim_key(claim), message)
            self.emit(body, "Warning", reasons.RECOVERING, _clip(message))
            await self._recovering(parse_claim(body), body)

    async def _fail(self, claim: CapacityClaim, body: JSON, reason: str, message: str) -> None:
        """The claim lost capacity it cannot get back: Failed, Recovered=False, an Event."""
        message = _clip(message)
        await self._write_claim(
            claim,
            {
                "phase": Phase.FAILED.value,
                "reason": reason,
                "message": message,
                "conditions": with_condition(
                    claim,
                    type_=reasons.RECOVERED,
                    value=False,
                    reason=reason,
                    message=message,
                    generation=claim.metadata.generation,
                ),
            },
        )
        log.warning("claim %s failed: %s", claim_key(claim), message)
        self.emit(body, "Warning", reason, message)
        # a Failed claim holds nothing: its shares on the surviving nodes leave the ledger
        # with this write
        self._end_inflight(claim.metadata.uid or "")

    def _lost(self, claim: CapacityClaim) -> list[str]:
        """The failed nodes whose share the claim is moving (open entries of its recoveries)."""
        status = claim.status
        return sorted(
            {
                r.from_node
                for r in (status.recoveries or [])
                if r.to_node is None and r.epoch is None
            }
            if status
            else set()
        )

    def _open_recovery_proposal(self, claim: CapacityClaim, lost: Iterable[str]) -> Proposal | None:
        """The recovery proposal still to be tallied: newer than every placement, and on none
        of the surviving ones (a lost node trusted again may be proposed for its own share)."""
        status = claim.status
        if status is None or status.proposal is None:
            return None
        held = status.placements or []
        newest = max((p.epoch or 0 for p in held), default=0)
        proposal = status.proposal
        surviving = {p.node for p in held} - set(lost)
        if proposal.epoch > newest and surviving.isdisjoint(proposal.placement):
            return proposal
        return None

    async def _recovering(self, claim: CapacityClaim, body: JSON) -> None:
        status = claim.status
        assert status is not None
        lost = self._lost(claim)
        if not lost:
            return
        proposal = self._open_recovery_proposal(claim, lost)
        if proposal is not None:
            result = tally(proposal, status.votes, self.clock())
            self._track(claim, proposal)
            if result.outcome is Outcome.COMMIT:
                await self._commit_recovery(claim, body, proposal, lost, result)
            elif result.outcome is Outcome.ABORT:
                self._end_inflight(claim.metadata.uid or "")
                refused = {n: result.counted[n].reason or "voted NO" for n in result.refused_by}
                await self._propose_recovery(
                    claim, body, lost, refused={**(status.refusals or {}), **refused},
                    note=result.reason,
                )  # fmt: skip
            return
        await self._propose_recovery(claim, body, lost, refused=dict(status.refusals or {}))

    async def _propose_recovery(
        self,
        claim: CapacityClaim,
        body: JSON,
        lost: list[str],
        *,
        refused: dict[str, str],
        note: str = "",
    ) -> None:
        status = claim.status
        assert status is not None
        uid = claim.metadata.uid or ""
        substrate = claim_substrate(claim.spec)
        iso = (await self.thresholds()).theta_iso
        attempts = status.attempts or 0
        plan: PlacementPlan | NoPlacement
        if attempts >= self.settings.max_attempts:
            plan = NoPlacement(
                reasons.WAITING_FOR_CAPACITY,
                f"no quorum after {attempts} proposals; waiting for a node to free up",
                final=False,
            )
            refused = {}
        else:
            plan = plan_recovery(
                claim, substrate, self.views(exclude_claim=uid), lost, refused, min_isolation=iso,
                distrusted={*self.failed, *self.returning},
            )  # fmt: skip
        if isinstance(plan, NoPlacement):
            started = min(
                (r.at for r in status.recoveries or [] if r.from_node in lost), default=None
            )
            waited = (self.clock() - started).total_seconds() if started else 0.0
            if waited > self.settings.recovery_wait_seconds:
                message = (
                    f"no node could take over the share of {', '.join(lost)} within "
                    f"{self.settings.recovery_wait_seconds:g} s: {plan.message}"
                )
                await self._fail(claim, body, reasons.RECOVERY_GAVE_UP, message)
                return
            message = f"recovering the share of {', '.join(lost)}: {plan.message}"
            if status.reason == reasons.WAITING_FOR_CAPACITY and attempts == 0:
                return  # said so already; the timer looks again
            await self._write_claim(
                claim,
                {
                    "reason": reasons.WAITING_FOR_CAPACITY,
                    "message": _clip(message),
                    "attempts": 0,
                    "refusals": None,
                },
            )
            return
        # the surviving placement nodes are named too, so their agents keep hearing the claim
        holding = [p.node for p in survivors(claim, lost)]
        proposal = self._next_proposal(status.proposal, plan, substrate, holding)
        message = (
            f"epoch {proposal.epoch}: asking {', '.join(plan.voters)} to vote on taking over "
            f"{plan.share:.3f} of {substrate.value} from {', '.join(lost)} on "
            f"{', '.join(plan.placement)}"
        )
        if note:
            message += f" (after: {note})"
        await self._write_proposal(
            claim,
            body,
            proposal,
            message,
            {
                "votes": dict.fromkeys((status.votes or {}).keys()),
                "attempts": attempts + 1,
                "refusals": refused or None,
                "reason": reasons.RECOVERING,
            },
        )

    async def _commit_recovery(
        self,
        claim: CapacityClaim,
        body: JSON,
        proposal: Proposal,
        lost: list[str],
        result: Tally,
    ) -> None:
        status = claim.status
        assert status is not None
        substrate = proposal.substrate or Substrate.HOST
        share = proposal.share or 0.0
        uid = claim.metadata.uid or ""
        holder = Holder(claim=claim_key(claim), uid=uid, epoch=proposal.epoch, share=share)
        iso = (await self.thresholds()).theta_iso
        # a lost node trusted again that takes its share back: the new holder replaces the old
        # one, so the share is never counted twice
        taken = self._hold(claim, substrate, holder, proposal.placement, iso, replace_older=True)
        if taken is not None:
            node, why = taken
            self._end_inflight(uid)
            await self._propose_recovery(
                claim, body, lost, refused={**(status.refusals or {}), node: why},
                note=f"{node}: {why}",
            )  # fmt: skip
            return
        now = self.clock()
        moves = recovery_moves(lost, proposal.placement)
        gone = [n for n in lost if n not in proposal.placement]
        entries = []
        for entry in status.recoveries or []:
            wire = entry.wire()
            if entry.to_node is None and entry.epoch is None and entry.from_node in moves:
                wire.update(to=moves[entry.from_node], at=_iso(now), epoch=proposal.epoch)
            entries.append(wire)
        placements = [
            *(p.wire() for p in survivors(claim, lost)),
            *(
                Placement(node=n, substrate=substrate, share=share, epoch=proposal.epoch).wire()
                for n in proposal.placement
            ),
        ]
        nodes = [p["node"] for p in placements]
        message = (
            "recovered: "
            + ", ".join(f"{a} -> {b}" for a, b in moves.items())
            + f" with {result.yes}/{result.needed} YES votes (epoch {proposal.epoch})"
        )
        await self._write_holding(
            claim,
            {
                "phase": Phase.ADMITTED.value,
                "placements": placements,
                "recoveries": entries,
                "reason": reasons.RECOVERED_REASON,
                "message": message,
                "nodes": ",".join(nodes),
                "voteCount": result.vote_count,
                "votes": votes_wire(result.counted),
                "refusals": None,
                "attempts": 0,
                "conditions": with_condition(
                    claim,
                    type_=reasons.RECOVERED,
                    value=True,
                    reason=reasons.RECOVERED_REASON,
                    message=message,
                    generation=claim.metadata.generation,
                ),
            },
        )
        self.inflight.pop(uid, None)  # committed: no room freed
        log.info("claim %s %s", holder.claim, message)
        self.emit(body, "Normal", reasons.RECOVERED_REASON, message)
        # the failed nodes are fenced: their old shares left the ledger with the write, their
        # pods are deleted so that their controllers recreate them, bound to the new placement
        # by the webhook
        namespace = claim.metadata.namespace or ""
        selector = f"{CLAIM_LABEL}={claim.metadata.name}"
        for pod in await self.kube.list_pods(namespace, selector) if gone else []:
            where = stranded_on(pod, gone)
            if where is None:
                continue
            name = pod["metadata"]["name"]
            await self.kube.force_delete_pod(namespace, name)
            log.info("claim %s: deleted pod %s/%s (%s)", holder.claim, namespace, name, where)

    # -- writes --------------------------------------------------------------------------------

    async def _write_claim(self, claim: CapacityClaim, status: JSON) -> JSON:
        """Merge ``status`` into the claim's, if the claim is still as we decided on it.

        A claim with a phase is written with a JSON patch guarded by its generation, phase and
        proposal epoch (:func:`guarded_status_patch`): the agents' votes land on the same object
        all the time, and a resourceVersion check failed on every one of them (a conflict, a
        re-read and a second write, 0.8 requests per claim at 30 claims/s). What the operator
        decides from is exactly what the guard pins: other fields are the operator's own, and
        votes for the epoch do not change a decision taken with a quorum. A claim without a
        phase (nothing to pin yet) is written with the resourceVersion check."""
        namespace, name = claim.metadata.namespace or "", claim.metadata.name or ""
        status_now = claim.status
        if status_now is None or status_now.phase is None:
            body = await self.kube.patch_claim_status_cas(
                namespace, name, claim.metadata.resource_version or "", status
            )
        else:
            ops = guarded_status_patch(claim, status)
            body = await self.kube.patch_claim_status_guarded(namespace, name, ops)
        if body.get("metadata", {}).get("uid") in self.claims:
            self.observe_claim(body, own=True)
        return body

    async def _fresh_node(self, name: str) -> CapacityNode | None:
        try:
            body = await self.kube.get_node(name)
        except NotFoundError:
            self.nodes.pop(name, None)
            return None
        self.observe_node(body)
        return parse_node(body)

    async def _write_node(self, name: str, node: CapacityNode, status: JSON) -> None:
        body = await self.kube.patch_node_status_cas(
            name, node.metadata.resource_version or "", status
        )
        self.observe_node(body)


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass
class SeenBallot:
    """A node's ballot as the engine last saw it."""

    votes: dict[str, tuple[JSON, Vote]] = field(default_factory=dict)
    """Its votes by claim uid, as sent and parsed (an unchanged entry is not parsed again)."""
    alive_sent: JSON | None = None
    """Its attestations as sent (parsed again only when they change)."""
    alive: dict[str, datetime] = field(default_factory=dict)
    """Its attestations: node -> seen alive at."""


@dataclass
class _LedgerUpkeep:
    """What the ledger's report (:meth:`Engine.report_ledger`) still has to write, and when
    its garbage collection (:meth:`Engine.collect_garbage`) runs next."""

    unreported: dict[str, datetime] = field(default_factory=dict)
    """Nodes whose ``status.allocated`` may differ from the ledger, with when it first may
    have (since their last report)."""
    at: dict[str, datetime] = field(default_factory=dict)
    """Per node, when its ledger was last written."""
    next_gc: datetime | None = None
    """When the ledger's garbage collection runs next."""

    def changed(self, name: str, now: datetime) -> None:
        """The node's report may differ from the ledger from ``now`` on (unless it already
        did: the report's time counts from the first change)."""
        self.unreported.setdefault(name, now)


def _admit_holder(
    node: CapacityNode, substrate: Substrate, holder: Holder, iso: float, *, replace_older: bool
) -> str | None:
    """Why the holder cannot join the node's ledger (``status.allocated`` as the ledger has
    it), or None when it fits (or is there already)."""
    current = _holders(node, substrate)
    if any(h.uid == holder.uid and h.epoch == holder.epoch for h in current):
        return None
    kept = [h for h in current if h.uid != holder.uid] if replace_older else current
    held = sum(h.share for h in kept)
    if held + holder.share > 1.0 + EPSILON:
        return (
            f"allocated {held:.3f} + request {holder.share:.3f} exceeds capacity "
            "(taken by claims committed meanwhile)"
        )
    if 1.0 - held - holder.share < iso - EPSILON:
        return (
            f"isolation {max(0.0, 1.0 - held - holder.share):.2f} < theta_iso "
            f"{iso:.2f} (allocated {held:.3f} + request {holder.share:.3f}, taken by "
            "claims committed meanwhile)"
        )
    return ledger_full(node, substrate, holder, {substrate.value: kept})


def _holders(node: CapacityNode, substrate: Substrate) -> list[Holder]:
    status = node.status
    alloc = (status.allocated or {}).get(substrate.value) if status else None
    return list(alloc.holders) if alloc else []


def _allocated(node: CapacityNode) -> dict[str, Allocation]:
    return dict((node.status.allocated or {}) if node.status else {})


def _same_allocations(a: dict[str, Allocation], b: dict[str, Allocation]) -> bool:
    def key(d: dict[str, Allocation]) -> dict[str, list[tuple[str, str, int, float]]]:
        return {
            s: sorted((h.claim, h.uid, h.epoch, round(h.share, 9)) for h in alloc.holders)
            for s, alloc in d.items()
            if alloc.holders
        }

    return key(a) == key(b)


def _summary(allocs: dict[str, Allocation]) -> str:
    return ", ".join(f"{s}={a.share:.3f} ({a.claims} claims)" for s, a in sorted(allocs.items()))


def _rv_newer(candidate: str, known: str) -> bool:
    try:
        return int(candidate) > int(known)
    except ValueError:
        return candidate != known


def guarded_status_patch(claim: CapacityClaim, status: JSON) -> list[JSON]:
    """The JSON patch that merges ``status`` (a merge patch of top-level status fields, None
    removing one) into the claim's, guarded by ``test`` operations on what the operator decided
    from: the generation, the phase and the proposal's epoch. ``votes`` is replaced whole: by
    an empty map for a new epoch, by the counted votes at a decision."""
    current = claim.status
    assert current is not None
    assert current.phase is not None
    present = current.model_dump(by_alias=True, exclude_none=True)
    ops: list[JSON] = [
        {"op": "test", "path": "/metadata/generation", "value": claim.metadata.generation},
        {"op": "test", "path": "/status/phase", "value": current.phase.value},
    ]
    if current.proposal is not None:
        epoch = current.proposal.epoch
        ops.append({"op": "test", "path": "/status/proposal/epoch", "value": epoch})
    for key, value in status.items():
        if key == "votes":  # replaced whole: cleared (a new epoch) or the counted votes
            kept = {n: v for n, v in (value or {}).items() if v is not None}
            ops.append({"op": "add", "path": "/status/votes", "value": kept})
        elif value is None:
            if key in present:
                ops.append({"op": "remove", "path": f"/status/{key}"})
        else:
            ops.append({"op": "add", "path": f"/status/{key}", "value": value})
    return ops


def votes_wire(votes: Mapping[str, Vote] | None) -> JSON:
    """Votes as the claim keeps them at a decision (``capctl explain``, calibration)."""
    return {node: vote.wire() for node, vote in sorted((votes or {}).items())}


def with_condition(
    claim: CapacityClaim,
    *,
    type_: str,
    value: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> list[JSON]:
    """The claim's conditions with one replaced; lastTransitionTime kept unless status flips."""
    now = _iso(_now())
    status_value = "True" if value else "False"
    out: list[JSON] = []
    replaced = False
    for cond in (claim.status.conditions or []) if claim.status else []:
        wire = cond.wire()
        if cond.type == type_:
            replaced = True
            wire.update(
                status=status_value,
                reason=reason,
                message=message,
                observedGeneration=generation,
                lastTransitionTime=wire.get("lastTransitionTime", now)
                if cond.status.value == status_value
                else now,
            )
        out.append(wire)
    if not replaced:
        out.append(
            {
                "type": type_,
                "status": status_value,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now,
            }
        )
    return out


__all__ = ["Engine", "Inflight"]
