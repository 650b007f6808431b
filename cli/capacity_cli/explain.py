"""``capctl explain``: a claim's proposal, each vote with its gate readings against the
thresholds, refusals, placements, recoveries, conditions, events and one sentence saying why.

:func:`explain` computes everything once from parsed models and the clock (pure);
:func:`explanation_text` and :func:`explanation_json` render it.

Where the votes are: while a claim's proposal is open (Voting, or Recovering with a proposal newer
than every placement) the agents' votes are in their nodes' CapacityBallots, keyed by the claim's
uid, and the claim's ``status.votes`` is empty; the operator copies the counted ones into the
claim when it commits. The caller reads the ballots of :func:`ballot_voters` and hands
:func:`votes_in_ballots` of them to :func:`explain`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from capacity_api import gate_table
from capacity_api.admission import Tally, ballot_votes, proposal_open, with_ballot_votes
from capacity_api.gate_table import GATES
from capacity_api.gates import Thresholds
from capacity_api.models import (
    CapacityBallot,
    CapacityClaim,
    Condition,
    Proposal,
    Vote,
    VoterRole,
)
from capacity_cli.output import JSON, age_text, iso, shown, table
from capacity_cli.why import claim_tally, why

MAX_EVENTS = 10
"""Events of a claim shown by ``explain`` (the newest ones, newest last)."""
STALE_NOTE = "stale, not counted"
NOT_A_VOTER_NOTE = "not a voter, not counted"
NO_VOTE_NOTE = "no vote yet"
NO_VOTE_CLOSED_NOTE = "no vote"


# ---------------------------------------------------------------------------------------------
# Inputs of the renderers that are not CRD models


@dataclass(frozen=True, slots=True)
class Calibration:
    """The thresholds votes are judged against, and where they came from."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    source: str = "defaults"
    """``namespace/name`` of the ConfigMap, or ``defaults (...)`` saying why."""
    warnings: tuple[str, ...] = ()
    """Keys of the ConfigMap that were not taken as written."""

    @classmethod
    def from_configmap(
        cls, data: Mapping[str, str] | None, source: str = "defaults"
    ) -> Calibration:
        """The thresholds of the calibration ConfigMap's ``data`` (None: defaults)."""
        thresholds, warnings = Thresholds.from_configmap(data)
        return cls(thresholds, source, warnings)


@dataclass(frozen=True, slots=True)
class EventInfo:
    """One core/v1 Event of a claim, reduced to what is printed."""

    type: str
    reason: str
    message: str
    time: datetime | None = None
    count: int = 1
    source: str = ""

    def wire(self) -> JSON:
        """The event as ``capctl explain -o json`` prints it."""
        return {
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
            "time": iso(self.time),
            "count": self.count,
            "source": self.source,
        }


def recent_events(events: Iterable[EventInfo], limit: int = MAX_EVENTS) -> list[EventInfo]:
    """The newest ``limit`` events, oldest first (undated events sort first)."""
    ordered = sorted(events, key=lambda e: e.time or datetime.min.replace(tzinfo=UTC))
    return ordered[-limit:] if limit > 0 else []


# ---------------------------------------------------------------------------------------------
# Gates of a vote


@dataclass(frozen=True, slots=True)
class GateCheck(gate_table.GateCheck):
    """A gate judged on a vote's readings (:class:`capacity_api.gate_table.GateCheck`), as capctl
    prints it."""

    @property
    def mark(self) -> str:
        return {True: "✓", False: "✗", None: "?"}[self.passed]

    def cell(self) -> str:
        """``0.1651 ✗``: the reading, with enough decimals to tell it from the threshold."""
        if self.value is None:
            return "-"
        return f"{shown(self.value, self.threshold)} {self.mark}"

    def wire(self) -> JSON:
        return {
            "reading": self.gate.reading,
            "value": self.value,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "thresholdValue": self.threshold,
            "pass": self.passed,
        }


def gate_checks(readings: Mapping[str, float] | None, thresholds: Thresholds) -> list[GateCheck]:
    """Each threshold gate of a vote's readings, judged against ``thresholds``
    (:func:`capacity_api.gate_table.gate_checks`)."""
    return [
        GateCheck(c.gate, c.threshold, c.value)
        for c in gate_table.gate_checks(readings, thresholds)
    ]


# ---------------------------------------------------------------------------------------------
# Votes


@dataclass(frozen=True, slots=True)
class VoteRow:
    """One line of the votes table: a cast vote, or a voter that has not voted."""

    node: str
    role: str
    vote: Vote | None
    counted: bool
    note: str
    """``counted``, ``stale, not counted``, ``not a voter, not counted``, ``no vote yet`` (the
    epoch is open) or ``no vote``."""
    gates: list[GateCheck]
    """Threshold gates of a placement vote with readings; empty otherwise."""

    def wire(self) -> JSON:
        """The row as ``capctl explain -o json`` prints it."""
        vote = self.vote
        return {
            "node": self.node,
            "role": self.role,
            "vote": vote.vote.value if vote else None,
            "epoch": vote.epoch if vote else None,
            "counted": self.counted,
            "note": self.note,
            "reason": vote.reason if vote else None,
            "time": iso(vote.time) if vote else None,
            "readings": dict(vote.readings or {}) if vote else None,
            "gates": [g.wire() for g in self.gates],
        }


def vote_rows(
    proposal: Proposal | None,
    votes: Mapping[str, Vote] | None,
    counted: Mapping[str, Vote],
    thresholds: Thresholds,
    *,
    open_epoch: bool = True,
) -> list[VoteRow]:
    """Voters in proposal order (placement first), then any other node's vote by name.

    ``open_epoch`` says whether votes may still arrive (the claim is Voting), so a missing vote
    reads "no vote yet" rather than "no vote"."""
    votes = votes or {}
    voters = list(dict.fromkeys(proposal.voters)) if proposal else []
    order = voters + sorted(n for n in votes if n not in voters)
    rows = []
    for node in order:
        vote = votes.get(node)
        if proposal is not None and node in proposal.placement:
            role = VoterRole.PLACEMENT.value
        elif node in voters:
            role = VoterRole.WITNESS.value
        else:
            role = vote.role.value if vote else "-"
        if vote is None:
            note = NO_VOTE_NOTE if open_epoch else NO_VOTE_CLOSED_NOTE
        elif node in counted:
            note = "counted"
        elif node not in voters:
            note = NOT_A_VOTER_NOTE
        else:
            note = STALE_NOTE
        checks: list[GateCheck] = []
        if vote is not None and vote.readings and VoterRole.PLACEMENT.value in (vote.role, role):
            checks = gate_checks(vote.readings, thresholds)
        rows.append(VoteRow(node, role, vote, node in counted, note, checks))
    return rows


def ballot_voters(claim: CapacityClaim) -> list[str]:
    """The nodes whose CapacityBallots hold the claim's live votes: the voters of its open
    proposal; none when the proposal is closed (its counted votes are in the claim)."""
    if not proposal_open(claim):
        return []
    status = claim.status
    assert status is not None
    assert status.proposal is not None
    return list(dict.fromkeys(status.proposal.voters))


def votes_in_ballots(
    claim: CapacityClaim, ballots: Mapping[str, CapacityBallot | None]
) -> dict[str, Vote]:
    """Node -> the vote on the claim in that voter's ballot (``ballots`` by ballot name, which is
    the node's; the entry keyed by the claim's uid). A voter without a ballot or without an entry
    has not voted. An entry for another epoch than the proposal's is kept: it is shown as stale
    and, as by the operator, not counted (``capacity_api.admission.ballot_votes``). A witness's
    attestations in its ballot that cover the proposal are its YES, as the operator counts
    them."""

    def entry(node: str, uid: str) -> Vote | None:
        ballot = ballots.get(node)
        if ballot is None or ballot.status is None:
            return None
        found = (ballot.status.votes or {}).get(uid)
        if found is None:
            return None
        return Vote.model_validate(found.model_dump(include=set(Vote.model_fields)))

    def alive(node: str) -> Mapping[str, datetime] | None:
        ballot = ballots.get(node)
        return ballot.status.alive if ballot is not None and ballot.status is not None else None

    return ballot_votes(claim, entry, other_epochs=True, alive=alive)


# ---------------------------------------------------------------------------------------------
# explain


def _request(claim: CapacityClaim) -> str:
    spec = claim.spec
    if spec.resources is not None:
        wire = spec.resources.model_dump(by_alias=True, exclude_none=True)
        return ", ".join(f"{k}={v}" for k, v in wire.items())
    parts = []
    if spec.c_geo is not None:
        parts.append(f"cGeo {spec.c_geo:g}")
    if spec.c_int is not None:
        parts.append(f"cInt {spec.c_int:g}")
    return ", ".join(parts) or "-"


@dataclass(frozen=True, slots=True)
class Explanation:
    claim: CapacityClaim
    """The claim, its ``status.votes`` the ballots' while its proposal is open."""
    calibration: Calibration
    events: list[EventInfo]
    now: datetime
    result: Tally | None
    rows: list[VoteRow]
    why: str
    votes_from: str = "claim"
    """``ballots`` (the live votes of an open proposal) or ``claim`` (its ``status.votes``)."""


def explain(
    claim: CapacityClaim,
    calibration: Calibration | None = None,
    events: Iterable[EventInfo] = (),
    *,
    now: datetime,
    ballot_votes: Mapping[str, Vote] | None = None,
) -> Explanation:
    """Everything ``capctl explain`` shows, computed once (pure).

    ``ballot_votes`` are the votes on the claim in its voters' ballots
    (:func:`votes_in_ballots`); while the proposal is open they stand for ``status.votes``
    (None: not read, the claim's own are shown)."""
    calibration = calibration or Calibration()
    live = ballot_votes is not None and proposal_open(claim)
    claim = with_ballot_votes(claim, ballot_votes)
    status = claim.status
    result = claim_tally(claim, now)
    rows = vote_rows(
        status.proposal if status else None,
        status.votes if status else None,
        result.counted if result else {},
        calibration.thresholds,
        open_epoch=proposal_open(claim),
    )
    return Explanation(
        claim=claim,
        calibration=calibration,
        events=recent_events(events),
        now=now,
        result=result,
        rows=rows,
        why=why(claim, now),
        votes_from="ballots" if live else "claim",
    )


def _thresholds_wire(calibration: Calibration) -> JSON:
    t = calibration.thresholds
    return {
        "thetaFit": t.theta_fit,
        "thetaIso": t.theta_iso,
        "thetaGlue": t.theta_glue,
        "thetaBurst": t.theta_burst,
        "minSamples": t.min_samples,
        "maxAgeSeconds": t.max_age_seconds,
        "source": calibration.source,
        "warnings": list(calibration.warnings),
    }


def explain_json(
    claim: CapacityClaim,
    calibration: Calibration | None = None,
    events: Iterable[EventInfo] = (),
    *,
    now: datetime,
    ballot_votes: Mapping[str, Vote] | None = None,
) -> JSON:
    """``capctl explain -o json``: one JSON-ready dict."""
    return explanation_json(explain(claim, calibration, events, now=now, ballot_votes=ballot_votes))


def explanation_json(e: Explanation) -> JSON:
    claim = e.claim
    status = claim.status
    meta = claim.metadata
    result = e.result
    return {
        "claim": {
            "namespace": meta.namespace,
            "name": meta.name,
            "uid": meta.uid,
            "generation": meta.generation,
            "observedGeneration": status.observed_generation if status else None,
            "created": iso(meta.creation_timestamp),
            "deleting": meta.deletion_timestamp is not None,
        },
        "spec": claim.spec.wire(),
        "phase": status.phase.value if status and status.phase else None,
        "reason": status.reason if status else None,
        "message": status.message if status else None,
        "why": e.why,
        "attempts": status.attempts if status else None,
        "thresholds": _thresholds_wire(e.calibration),
        "proposal": status.proposal.wire() if status and status.proposal else None,
        "tally": {
            "outcome": result.outcome.value,
            "yes": result.yes,
            "needed": result.needed,
            "voters": result.voters,
            "voteCount": result.vote_count,
            "reason": result.reason,
        }
        if result
        else None,
        "votes": [row.wire() for row in e.rows],
        "votesFrom": e.votes_from,
        "refusals": [
            {"node": node, "reason": reason}
            for node, reason in ((status.refusals or {}) if status else {}).items()
        ],
        "placements": [p.wire() for p in (status.placements or [])] if status else [],
        "recoveries": [r.wire() for r in (status.recoveries or [])] if status else [],
        "truth": status.truth.wire() if status and status.truth else None,
        "conditions": [c.wire() for c in (status.conditions or [])] if status else [],
        "events": [ev.wire() for ev in e.events],
    }


def explain_text(
    claim: CapacityClaim,
    calibration: Calibration | None = None,
    events: Iterable[EventInfo] = (),
    *,
    now: datetime,
    ballot_votes: Mapping[str, Vote] | None = None,
) -> str:
    """``capctl explain``: the human-readable report."""
    return explanation_text(explain(claim, calibration, events, now=now, ballot_votes=ballot_votes))


def _conditions_table(conditions: Sequence[Condition], now: datetime) -> str:
    rows = [
        [
            c.type,
            c.status.value,
            c.reason or "-",
            age_text(c.last_transition_time, now),
            c.message or "",
        ]
        for c in conditions
    ]
    return table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], rows)


def explanation_text(e: Explanation) -> str:
    sections = [
        _head_lines(e),
        _proposal_lines(e),
        _threshold_lines(e),
        _vote_lines(e),
        _refusal_lines(e),
        _placement_lines(e),
        _recovery_lines(e),
        _truth_lines(e),
        _condition_lines(e),
        _event_lines(e),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _head_lines(e: Explanation) -> list[str]:
    claim = e.claim
    status, meta, spec = claim.status, claim.metadata, claim.spec
    witnesses = "default" if spec.witnesses is None else str(spec.witnesses)
    phase = status.phase.value if status and status.phase else "Pending (no status yet)"
    if status and status.reason:
        phase += f" ({status.reason})"
    head = [
        ("Claim", f"{meta.namespace}/{meta.name}"),
        (
            "Request",
            f"{_request(claim)}, substrate {spec.substrate.value}, {spec.replicas} "
            f"replica(s), witnesses {witnesses}",
        ),
        ("Phase", phase),
    ]
    if status and status.message:
        head.append(("Message", status.message))
    if status and status.attempts:
        head.append(("Attempts", str(status.attempts)))
    observed = status.observed_generation if status else None
    if meta.generation is not None and observed is not None and meta.generation != observed:
        head.append(("Generation", f"{meta.generation} (status reflects {observed})"))
    head.append(("Why", e.why))
    return [f"{label + ':':<10} {value}" for label, value in head]


def _proposal_lines(e: Explanation) -> list[str]:
    status = e.claim.status
    proposal = status.proposal if status else None
    if proposal is None:
        return ["Proposal: none"]
    when = iso(proposal.deadline.replace(microsecond=0))
    deadline = f"{when} ({age_text(proposal.deadline, e.now)}"
    deadline += ")" if proposal.deadline > e.now else " ago, passed)"
    share = "-" if proposal.share is None else f"{proposal.share:.3f}"
    substrate = proposal.substrate.value if proposal.substrate else "-"
    fields = (
        ("placement", ", ".join(proposal.placement) or "-"),
        ("voters", ", ".join(proposal.voters) or "-"),
        ("deadline", deadline),
        ("share", f"{share} of {substrate} per placement node"),
    )
    return [f"Proposal: epoch {proposal.epoch}", *(f"  {k:<10} {v}" for k, v in fields)]


def _threshold_lines(e: Explanation) -> list[str]:
    t = e.calibration.thresholds
    text = (
        f"thetaFit {t.theta_fit:g}, thetaIso {t.theta_iso:g}, thetaGlue {t.theta_glue:g}, "
        f"thetaBurst {t.theta_burst:g}, minSamples {t.min_samples}, "
        f"maxAgeSeconds {t.max_age_seconds:g}"
    )
    lines = [f"Thresholds: {text}", f"  from {e.calibration.source}"]
    lines.extend(f"  warning: {w}" for w in e.calibration.warnings)
    return lines


def _vote_lines(e: Explanation) -> list[str]:
    if not e.rows:
        return ["Votes: none"]
    result = e.result
    summary = (
        f" ({result.yes}/{result.needed} YES counted; {result.needed} of {result.voters} "
        "voters needed)"
        if result
        else ""
    )
    rows = [
        [
            r.node,
            r.role,
            r.vote.vote.value if r.vote else "-",
            str(r.vote.epoch) if r.vote else "-",
            r.note,
            (r.vote.reason or "") if r.vote else "",
        ]
        for r in e.rows
    ]
    source = ", from the voters' CapacityBallots" if e.votes_from == "ballots" else ""
    lines = [
        f"Votes{summary}{source}:",
        table(["NODE", "ROLE", "VOTE", "EPOCH", "COUNTED", "REASON"], rows),
    ]
    gated = [r for r in e.rows if r.gates]
    if gated:
        t = e.calibration.thresholds
        headers = ["NODE"] + [f"{g.reading} {g.symbol} {g.threshold_value(t):g}" for g in GATES]
        gate_rows = [[_gate_node(r), *(c.cell() for c in r.gates)] for r in gated]
        lines += [
            "",
            "Gate readings of placement votes (against the thresholds above):",
            table(headers, gate_rows),
        ]
    return lines


def _gate_node(row: VoteRow) -> str:
    if row.counted:
        return row.node
    return f"{row.node} (stale)" if row.note == STALE_NOTE else f"{row.node} (not counted)"


def _refusal_lines(e: Explanation) -> list[str]:
    status = e.claim.status
    refusals = (status.refusals or {}) if status else {}
    if not refusals:
        return []
    return [
        "Refusals (earlier epochs; not proposed again):",
        table(["NODE", "REASON"], [[n, r] for n, r in refusals.items()]),
    ]


def _placement_lines(e: Explanation) -> list[str]:
    status = e.claim.status
    placements = (status.placements or []) if status else []
    if not placements:
        return ["Placements: none"]
    rows = [[p.node, p.substrate.value, f"{p.share:.3f}", str(p.epoch or "-")] for p in placements]
    return ["Placements:", table(["NODE", "SUBSTRATE", "SHARE", "EPOCH"], rows)]


def _recovery_lines(e: Explanation) -> list[str]:
    status = e.claim.status
    recoveries = (status.recoveries or []) if status else []
    if not recoveries:
        return []
    rows = [
        [r.from_node, r.to_node or "-", age_text(r.at, e.now), str(r.epoch or "-"), r.reason]
        for r in recoveries
    ]
    return ["Recoveries:", table(["FROM", "TO", "AGE", "EPOCH", "REASON"], rows)]


def _truth_lines(e: Explanation) -> list[str]:
    status = e.claim.status
    truth = status.truth if status else None
    if truth is None:
        return []
    lines = [
        f"Truth: {truth.verdict.value} (the {truth.decision.value.lower()} decision, observed "
        f"from {iso(truth.since)} to {iso(truth.until)})"
    ]
    if truth.evidence:
        rows = [
            [ev.kind, ev.node or "-", "/".join(x for x in (ev.pod, ev.container) if x) or "-",
             age_text(ev.time, e.now) if ev.time else "-", ev.message or ""]
            for ev in truth.evidence
        ]  # fmt: skip
        lines.append(table(["EVIDENCE", "NODE", "POD/CONTAINER", "AGE", "MESSAGE"], rows))
    if truth.headroom:
        rows = [[node, f"{value:.3f}"] for node, value in sorted(truth.headroom.items())]
        lines.append(table(["CANDIDATE", "LOWEST HEADROOM"], rows))
    return lines


def _condition_lines(e: Explanation) -> list[str]:
    status = e.claim.status
    conditions = (status.conditions or []) if status else []
    if not conditions:
        return ["Conditions: none"]
    return ["Conditions:", _conditions_table(conditions, e.now)]


def _event_lines(e: Explanation) -> list[str]:
    if not e.events:
        return ["Events: none"]
    rows = [
        [age_text(ev.time, e.now), ev.type, ev.reason, str(ev.count), ev.message] for ev in e.events
    ]
    return [
        f"Events (newest last, at most {MAX_EVENTS}):",
        table(["AGE", "TYPE", "REASON", "COUNT", "MESSAGE"], rows),
    ]


__all__ = [
    "MAX_EVENTS",
    "NOT_A_VOTER_NOTE",
    "NO_VOTE_CLOSED_NOTE",
    "NO_VOTE_NOTE",
    "STALE_NOTE",
    "Calibration",
    "EventInfo",
    "Explanation",
    "GateCheck",
    "VoteRow",
    "ballot_voters",
    "explain",
    "explain_json",
    "explain_text",
    "explanation_json",
    "explanation_text",
    "gate_checks",
    "proposal_open",
    "recent_events",
    "vote_rows",
    "votes_in_ballots",
    "with_ballot_votes",
]
