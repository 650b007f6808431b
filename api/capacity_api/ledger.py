"""The allocation ledger, kept in memory as a pure function of the claims' status.

DESIGN section 5: the ledger is what the admitted claims hold (:func:`expected_holders`), rebuilt
from the claims on start before anything is admitted. The operator keeps it here, fed by every
claim it sees (its list on start, watch events, the responses of its own writes), and checks
every commit against it; ``CapacityNode.status.allocated`` is a report of it, written now and
then (docs/admission.md, "The ledger"), never read back to decide.

A commit under way holds its shares here before its claim write goes out (:meth:`Ledger.hold`),
so that a second commit on the same node, decided while the first one's write is in flight,
already counts it. The hold ends when the claim is seen at a newer version than the one the
write was decided on (the write's response, or a watch event), or when the write is known to
have failed; a write whose outcome is unknown (a timeout) keeps holding until the claim is seen
again, so a commit that did land is never missing from the ledger.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from capacity_api.admission import allocation, expected_holders
from capacity_api.models import Allocation, CapacityClaim, Holder

Key = tuple[str, str]
"""(node, substrate)."""


def _newer(candidate: str, known: str) -> bool:
    """Whether resourceVersion ``candidate`` is newer than ``known`` (opaque strings that the
    API server makes integers; compared as such, else as different)."""
    try:
        return int(candidate) > int(known)
    except ValueError:
        return candidate != known


@dataclass(frozen=True, slots=True)
class _Hold:
    holders: Mapping[Key, Holder]
    version: str
    """The claim's resourceVersion the commit was decided on."""


class Ledger:
    """What every node has promised, per substrate and claim."""

    def __init__(self) -> None:
        self._held: dict[str, dict[Key, Holder]] = {}
        """Per claim uid, its holders as its status says."""
        self._versions: dict[str, str] = {}
        """Per claim uid, the resourceVersion its holders were taken from."""
        self._holds: dict[str, _Hold] = {}
        """Per claim uid, the holders of a commit being written."""
        self._nodes: defaultdict[str, defaultdict[str, dict[str, Holder]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        """Per node and substrate, every claim's holder there (status and holds together)."""
        self.changes: defaultdict[str, int] = defaultdict(int)
        """Per node, a count that grows whenever its holders change."""
        self.dirty: set[str] = set()
        """Nodes whose holders changed since the owner last cleared this set."""

    # -- what the claims say ---------------------------------------------------------------

    def observe(self, claim: CapacityClaim) -> bool:
        """Take the claim's holders from its status (when it is newer than what was seen);
        return whether some node lost a holder (room was freed)."""
        uid = claim.metadata.uid or ""
        version = claim.metadata.resource_version or ""
        known = self._versions.get(uid)
        if known is not None and not _newer(version, known):
            return False
        self._versions[uid] = version
        held: dict[Key, Holder] = {}
        for key, holders in expected_holders([claim]).items():
            for holder in holders:
                held[key] = holder
        before = self._effective(uid)
        hold = self._holds.get(uid)
        if hold is not None and _newer(version, hold.version):
            del self._holds[uid]  # the claim as written (or moved on since): its status says
        if held:
            self._held[uid] = held
        else:
            self._held.pop(uid, None)
        return self._reindex(uid, before)

    def forget(self, uid: str) -> bool:
        """The claim is gone: it holds nothing. Returns whether room was freed."""
        before = self._effective(uid)
        self._versions.pop(uid, None)
        self._holds.pop(uid, None)
        self._held.pop(uid, None)
        return self._reindex(uid, before)

    def hold(self, uid: str, holders: Mapping[Key, Holder], version: str) -> None:
        """A commit of the claim at ``version`` is being written: count ``holders`` now (each
        replaces the claim's holder of the same node and substrate)."""
        before = self._effective(uid)
        self._holds[uid] = _Hold(dict(holders), version)
        self._reindex(uid, before)

    def unhold(self, uid: str) -> bool:
        """The commit's write failed: its holders go. Returns whether room was freed."""
        before = self._effective(uid)
        if self._holds.pop(uid, None) is None:
            return False
        return self._reindex(uid, before)

    def _reindex(self, uid: str, before: Mapping[Key, Holder]) -> bool:
        """Bring the per-node index from the claim's holders ``before`` to its holders now;
        return whether some node lost a holder or a part of one."""
        after = self._effective(uid)
        freed = False
        for key in before.keys() | after.keys():
            old, new = before.get(key), after.get(key)
            if old == new:
                continue
            node, substrate = key
            slot = self._nodes[node][substrate]
            if new is None:
                slot.pop(uid, None)
                if not slot:
                    del self._nodes[node][substrate]
                if not self._nodes[node]:
                    del self._nodes[node]
            else:
                slot[uid] = new
            freed = freed or (old is not None and (new is None or new.share < old.share))
            self.changes[node] += 1
            self.dirty.add(node)
        return freed

    def _effective(self, uid: str) -> dict[Key, Holder]:
        held = self._held.get(uid, {})
        hold = self._holds.get(uid)
        if hold is None:
            return held
        return {**held, **hold.holders}

    # -- what it tells -----------------------------------------------------------------------

    def allocations(self, node: str) -> dict[str, Allocation]:
        """The node's ledger per substrate, as ``status.allocated`` carries it."""
        return {
            substrate: allocation(holders.values())
            for substrate, holders in self._nodes.get(node, {}).items()
        }

    def holds(self, node: str, uid: str) -> bool:
        """Whether the claim holds a share of the node (a commit being written included)."""
        return any(uid in holders for holders in self._nodes.get(node, {}).values())

    def claims_on(self, node: str) -> set[str]:
        """The keys (namespace/name) of the claims holding a share of the node."""
        return {h.claim for holders in self._nodes.get(node, {}).values() for h in holders.values()}

    def nodes_of(self, uid: str) -> set[str]:
        """The nodes the claim holds a share of."""
        return {node for node, _ in self._effective(uid)}

    def uids(self) -> set[str]:
        """Every claim that holds something or was seen with a version."""
        return set(self._versions) | set(self._held) | set(self._holds)
