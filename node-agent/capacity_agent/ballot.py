"""A hosted node's ballot: its votes on every open proposal that names it, in one object.

The voter decides claim by claim, but a node's votes reach the API server together: a vote is
queued in the node's :class:`BallotWriter`, and one status write of the node's CapacityBallot
carries every vote queued since the last write (a group commit). Two writes of one ballot start
at least ``spacing`` apart (the agent's ``ballot_interval``, 0.15 s by default): a vote that
comes after a quiet spell goes out at once, and the votes that come within the spacing of the
last write wait for the rest of it and go out together. A witness votes on every proposal of
the cluster, so under load it answers several per write instead of one each (at 30 claims a
second, about three), for at most the spacing of delay; at rest a vote costs one write, at once.

When the API server is slow to answer, the spacing stretches to four times the last write's
duration, up to five times ``spacing`` (:attr:`BallotWriter.gap`): a loaded server gets fewer,
larger writes instead of more of them.

The write is a JSON merge patch of ``status.votes`` keyed by claim uid, without a precondition:
only this node's agent writes this ballot (node restriction), and a merge patch of a key
replaces that key only. A vote for an old epoch never counts, because the operator counts only
the entry whose epoch is the claim's proposal epoch. Votes of claims that left the epoch are
removed (``null``) with the next write, so the ballot holds the open epochs only.

A witness may answer a proposal by attestation instead (docs/admission.md, "Witness
attestations"): ``status.alive`` says which nodes it saw alive and when, and the operator counts
an attestation of every placement node at or after the proposal's ``attestedSince`` as the
witness's YES. :meth:`BallotWriter.attest` queues attestations; they go out with the next
write, the map as a whole (only this agent writes it).

A failed write is retried with backoff, carrying everything queued meanwhile; nothing is half
applied (one patch) and nothing is lost (a vote queued later for the same claim replaces the
earlier one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from lightkube import Client
from lightkube.types import PatchType

from capacity_agent.backoff import Backoff
from capacity_agent.cluster import CapacityBallots, describe_failure, http_status
from capacity_agent.settings import BALLOT_INTERVAL, FIELD_MANAGER
from capacity_api.models import (
    MAX_ATTESTED,
    MAX_BALLOT_VOTES,
    BallotVote,
    CapacityBallot,
    CapacityBallotSpec,
    CapacityBallotStatus,
    ObjectMeta,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
FORGET_BATCH = 32
"""Removals alone start a write once this many are queued (otherwise they go with a vote)."""
SPACING_PER_WRITE_TIME = 4.0
"""The spacing follows the API server: at least this many times the last write's duration, so
that a ballot has a write in flight at most a quarter of the time."""
MAX_SPACING_FACTOR = 5.0
"""... but never more than this many times the configured spacing (0.75 s at 0.15 s)."""
LEFT_BEFORE = datetime.min.replace(tzinfo=UTC)
"""The time given to attestations found in the ballot at start, whatever they say."""


class BallotWriter:
    """The queue and the writes of one node's ballot."""

    def __init__(
        self,
        api: Client,
        node: str,
        backoff: Backoff | None = None,
        spacing: float = BALLOT_INTERVAL,
    ) -> None:
        self.api = api
        self.node = node
        self.backoff = backoff or Backoff(initial=0.05, cap=5.0)
        self.spacing = spacing
        """Seconds at least between the starts of two writes (see the module docstring)."""
        self._last_write: float | None = None
        """When the last write started (the event loop's clock)."""
        self._last_took = 0.0
        """How long the last successful write took, in seconds."""
        self.pending: dict[str, JSON | None] = {}
        """Claim uid -> the vote to write, or None to remove the claim's vote."""
        self.held: dict[str, int] = {}
        """Claim uid -> epoch of the votes the ballot holds (as last written)."""
        self.synced = False
        """Whether the ballot is known to exist and its earlier votes were cleared."""
        self.votes_written = 0
        self.alive: dict[str, datetime] = {}
        """The attestations the ballot is to hold: written, or going out with the next write."""
        self.alive_held: dict[str, datetime] = {}
        """The attestations the ballot holds: as last written, or as found when the ballot was
        created or found at start (what an earlier run left); a write is due while they differ
        from ``alive``."""
        self.relied: dict[str, tuple[int, tuple[str, ...]]] = {}
        """Claim uid -> (epoch, placement nodes) of the open proposals answered by attestation:
        their nodes' attestations stay while the proposal is open, however old."""
        self._task: asyncio.Task[None] | None = None

    def put(self, uid: str, vote: BallotVote) -> None:
        """Queue a vote; it goes out with the next write (at once when none is in flight)."""
        self.pending[uid] = vote.wire()
        self._kick()

    def attested(self, node: str) -> datetime | None:
        """When ``node`` was last attested alive here, written or queued (None: not at all)."""
        return self.alive.get(node)

    def attested_since(self, node: str, since: datetime) -> bool:
        """Whether ``node`` is attested alive here (written or queued) at or after ``since``."""
        at = self.alive.get(node)
        return at is not None and at >= since

    def rely(self, uid: str, epoch: int, nodes: Iterable[str]) -> None:
        """The claim's open epoch is answered by the attestations of ``nodes``: they stay until
        the claim leaves the epoch (:meth:`forget`)."""
        self.relied[uid] = (epoch, tuple(nodes))

    def attest(
        self,
        alive: Mapping[str, datetime],
        drop: Iterable[str] = (),
        older_than: datetime | None = None,
    ) -> None:
        """Queue attestations: ``alive`` (node -> seen alive at) over what is held or queued,
        where newer; ``drop``: nodes no longer seen alive; ``older_than``: attestations made
        before it go too, unless an open proposal relies on them (:meth:`rely`). The newest
        MAX_ATTESTED stay. Goes out with the next write (at once when none is in flight)."""
        merged = dict(self.alive)
        for node, at in alive.items():
            if node not in merged or merged[node] < at:
                merged[node] = at
        for node in drop:
            merged.pop(node, None)
        if older_than is not None:
            kept = {n for _, nodes in self.relied.values() for n in nodes}
            merged = {n: at for n, at in merged.items() if at >= older_than or n in kept}
        if len(merged) > MAX_ATTESTED:
            newest = sorted(merged, key=lambda n: merged[n], reverse=True)[:MAX_ATTESTED]
            merged = {n: merged[n] for n in newest}
        if merged == self.alive:
            return
        self.alive = merged
        self._kick()

    def forget(self, uid: str, epoch: int) -> None:
        """The claim's open epoch is now ``epoch`` (-1: none): remove its vote for any other,
        and let go of the attestations its other epochs relied on."""
        relied = self.relied.get(uid)
        if relied is not None and relied[0] != epoch:
            del self.relied[uid]
        queued = self.pending.get(uid)
        if queued is not None and queued.get("epoch") != epoch:
            del self.pending[uid]
        held = self.held.get(uid)
        if held is not None and held != epoch and uid not in self.pending:
            self.pending[uid] = None
            removals = sum(1 for v in self.pending.values() if v is None)
            if removals >= FORGET_BATCH:
                self._kick()

    @property
    def gap(self) -> float:
        """Seconds between the starts of two writes now: the configured spacing, or four times
        what the last write took when the API server answers slower than that (up to five times
        the spacing). A loaded API server then gets fewer, larger ballot writes, which is load it
        no longer has to carry, while an idle one still gets a vote within the spacing."""
        return min(
            max(self.spacing, SPACING_PER_WRITE_TIME * self._last_took),
            MAX_SPACING_FACTOR * self.spacing,
        )

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def idle(self) -> None:
        """Wait until everything queued so far is written."""
        while self._task is not None and self.busy:
            await asyncio.shield(self._task)

    def open(self) -> None:
        """Create the ballot now, and clear what an earlier run left in it, instead of with the
        first vote: the agent does so at start, so that every node's ballot is there before any
        proposal and a first vote is a plain patch. Retried with backoff until it succeeds."""
        self._kick()

    def _kick(self) -> None:
        if not self.busy:
            self._task = asyncio.create_task(self._drain(), name=f"ballot-{self.node}")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending or self.alive != self.alive_held or not self.synced:
            if self._last_write is not None:
                # within the spacing of the last write: wait for the rest of it, and take every
                # vote that comes meanwhile along
                await asyncio.sleep(max(0.0, self._last_write + self.gap - loop.time()))
            batch, self.pending = self.pending, {}
            # the whole map as it is now: what is attested meanwhile goes with the next write
            alive = dict(self.alive)
            self._last_write = started = loop.time()
            try:
                await asyncio.to_thread(self._write, batch, alive)
            except Exception as exc:  # any failure: keep the votes, write them again later
                for uid, vote in batch.items():
                    self.pending.setdefault(uid, vote)  # a newer vote queued meanwhile wins
                if http_status(exc) == 404 and self.synced:
                    # the ballot was deleted (the operator does so with its CapacityNode):
                    # create it again, at once
                    self.synced = False
                    self.held.clear()
                    log.info("ballot of %s was deleted; creating it again", self.node)
                    continue
                delay = self.backoff.next()
                log.warning(
                    "ballot of %s not written (%s); retrying in %.2fs",
                    self.node,
                    describe_failure(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self.backoff.reset()
            self._last_took = loop.time() - started
            self.alive_held = alive
            for uid, vote in batch.items():
                if vote is None:
                    self.held.pop(uid, None)
                else:
                    self.held[uid] = int(vote["epoch"])
                    self.votes_written += 1

    def _write(self, batch: dict[str, JSON | None], alive: dict[str, datetime]) -> None:
        if not self.synced:
            self._sync(batch)
        attested = self._attestations(alive)
        if not batch and attested is None:
            return  # the ballot created, nothing left in it to clear
        self._bound(batch)
        status: JSON = {"votes": batch} if batch else {}
        if attested is not None:
            status["alive"] = attested
        self.api.patch(
            CapacityBallots.Status,
            self.node,
            {"status": status},
            patch_type=PatchType.MERGE,
            field_manager=FIELD_MANAGER,
        )

    def _attestations(self, alive: dict[str, datetime]) -> JSON | None:
        """The merge patch of ``status.alive`` that leaves exactly ``alive`` where the ballot
        holds ``alive_held``; None: they are the same."""
        if alive == self.alive_held:
            return None
        patch: JSON = {n: None for n in self.alive_held if n not in alive}
        patch.update(CapacityBallotStatus(alive=alive).wire().get("alive") or {})
        return patch

    def _bound(self, batch: dict[str, JSON | None]) -> None:
        """Keep the ballot within its schema's bound (MAX_BALLOT_VOTES): should more votes be
        held than that (an operator allowed more open epochs than the bound, or claims whose
        decision this agent has not seen yet), the oldest held votes go first. A vote removed
        so is for an epoch the operator has long counted or aborted; were one still open, it
        aborts at its deadline and is proposed again, as for a lost vote."""
        kept = {uid for uid, vote in batch.items() if vote is not None}
        kept |= {uid for uid in self.held if uid not in batch}
        excess = len(kept) - MAX_BALLOT_VOTES
        for uid in list(self.held):
            if excess <= 0:
                break
            if batch.get(uid, self.held) is None:
                continue  # already being removed
            batch[uid] = None
            excess -= 1
            log.warning("ballot of %s is full: dropping its vote on claim %s", self.node, uid)

    def _sync(self, batch: dict[str, JSON | None]) -> None:
        """Before the first write: create the ballot (server-side apply of its spec, which
        answers with the object), and clear what an earlier run left in it (votes this process
        does not hold, for it votes again on every open proposal; and attestations)."""
        ballot = CapacityBallot(
            metadata=ObjectMeta(name=self.node), spec=CapacityBallotSpec(node_name=self.node)
        )
        body = self.api.patch(
            CapacityBallots,
            self.node,
            ballot.wire(),
            patch_type=PatchType.APPLY,
            field_manager=FIELD_MANAGER,
            force=True,
        )
        status = dict(body).get("status") or {}
        for uid in status.get("votes") or {}:
            batch.setdefault(uid, None)
        # what the ballot holds now (an earlier run's, or nothing in one created again): its
        # times do not matter, it is replaced by this run's
        self.alive_held = dict.fromkeys(status.get("alive") or {}, LEFT_BEFORE)
        self.synced = True
