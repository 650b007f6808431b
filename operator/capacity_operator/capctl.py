"""``capctl``: explain claims and nodes from the command line.

``capctl explain CLAIM`` prints a claim's proposal, each vote with its gate readings against the
thresholds, and one sentence saying why the claim is where it is. ``capctl nodes`` prints each
node's lease, headroom, allocation and gate readings. ``-o json`` prints the same facts as JSON.

The module keeps I/O thin: :func:`main` reads objects from the API server and hands parsed models
to pure renderers (:func:`explain_text`, :func:`explain_json`, :func:`nodes_text`,
:func:`nodes_json`, :func:`why`), which take the clock as a parameter, so they are unit-tested
without a cluster. Vote counts come from :func:`capacity_api.admission.tally`, so they match the
operator's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from capacity_api import GROUP, VERSION, __version__, reasons
from capacity_api.admission import Outcome, Tally, allocated_share, tally
from capacity_api.gates import CALIBRATION_CONFIGMAP, Thresholds
from capacity_api.lease import LeaseInfo, parse_lease
from capacity_api.models import (
    CapacityClaim,
    CapacityNode,
    Condition,
    Phase,
    Proposal,
    Substrate,
    Vote,
    VoterRole,
)

JSON = dict[str, Any]

PLATFORM_NAMESPACE = "capacity-system"
"""Where the calibration ConfigMap and the node Leases live (the operator's default)."""
MAX_EVENTS = 10
"""Events of a claim shown by ``explain`` (the newest ones, newest last)."""
REQUEST_TIMEOUT = (5.0, 30.0)
"""Seconds to connect to and then to hear from the API server before capctl gives up."""
STALE_NOTE = "stale, not counted"
NOT_A_VOTER_NOTE = "not a voter, not counted"
NO_VOTE_NOTE = "no vote yet"
NO_VOTE_CLOSED_NOTE = "no vote"

EXIT_OK = 0
EXIT_ERROR = 1
"""The object is missing or the API server refused the request."""
EXIT_UNREACHABLE = 2
"""No usable kubeconfig, or the API server cannot be reached."""


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
        return {
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
            "time": _iso(self.time),
            "count": self.count,
            "source": self.source,
        }


def event_info(event: Any) -> EventInfo:
    """An :class:`EventInfo` from a ``kubernetes.client.CoreV1Event``."""
    meta = event.metadata
    when = (
        event.last_timestamp
        or event.event_time
        or event.first_timestamp
        or (meta.creation_timestamp if meta is not None else None)
    )
    source = ""
    if event.source is not None and event.source.component:
        source = str(event.source.component)
    elif event.reporting_component:
        source = str(event.reporting_component)
    return EventInfo(
        type=str(event.type or ""),
        reason=str(event.reason or ""),
        message=str(event.message or ""),
        time=_aware(when) if isinstance(when, datetime) else None,
        count=int(event.count or 1),
        source=source,
    )


def recent_events(events: Iterable[EventInfo], limit: int = MAX_EVENTS) -> list[EventInfo]:
    """The newest ``limit`` events, oldest first (undated events sort first)."""
    ordered = sorted(events, key=lambda e: e.time or datetime.min.replace(tzinfo=UTC))
    return ordered[-limit:] if limit > 0 else []


# ---------------------------------------------------------------------------------------------
# Small formatting helpers


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return _aware(value).astimezone(UTC).isoformat().replace("+00:00", "Z")


def _clock(value: datetime) -> str:
    """``12:00:03 UTC``."""
    return _aware(value).astimezone(UTC).strftime("%H:%M:%S UTC")


def human_duration(seconds: float) -> str:
    """kubectl-style short duration: 7s, 3m05s, 42m, 5h12m, 2d3h."""
    s = int(max(0.0, seconds))
    if s < 120:
        return f"{s}s"
    minutes, sec = divmod(s, 60)
    if minutes < 10:
        return f"{minutes}m{sec:02d}s"
    if minutes < 180:
        return f"{minutes}m"
    hours, minute = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minute:02d}m" if hours < 8 else f"{hours}h"
    days, hour = divmod(hours, 24)
    return f"{days}d{hour}h" if days < 8 else f"{days}d"


def _age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    delta = (now - _aware(value)).total_seconds()
    if delta < 0:
        return "in " + human_duration(-delta)
    return human_duration(delta)


def _num(value: float | None, decimals: int = 3) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _shown(value: float, threshold: float) -> str:
    """``value`` with 3 to 6 decimals: the fewest at which it does not print as the threshold
    unless it equals it, so ``0.1651 > 0.165`` never reads as ``0.165 > 0.165``."""
    for decimals in range(3, 7):
        text = f"{value:.{decimals}f}"
        if value == threshold or float(text) != threshold:
            return text
    return repr(value)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: int = 2) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        cells.append(row[-1])
        lines.append((" " * indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Gates of a vote


@dataclass(frozen=True, slots=True)
class GateSpec:
    reading: str
    """Key in ``Vote.readings``."""
    op: str
    """``<=`` or ``>=``: how the reading must relate to the threshold to pass."""
    threshold: str
    """Field of :class:`Thresholds`."""
    key: str
    """The threshold's key in the calibration ConfigMap."""


GATES: tuple[GateSpec, ...] = (
    GateSpec("fitError", "<=", "theta_fit", "thetaFit"),
    GateSpec("isolation", ">=", "theta_iso", "thetaIso"),
    GateSpec("gluingDelta", "<=", "theta_glue", "thetaGlue"),
    GateSpec("lambdaInt", "<=", "theta_burst", "thetaBurst"),
)
"""The threshold gates of a fit vote (DESIGN section 4), in the order the agent applies them."""
_SYMBOL = {"<=": "≤", ">=": "≥"}


@dataclass(frozen=True, slots=True)
class GateCheck:
    gate: GateSpec
    threshold: float
    value: float | None
    """None when the vote carries no such reading."""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        if self.gate.op == "<=":
            return self.value <= self.threshold
        return self.value >= self.threshold

    @property
    def mark(self) -> str:
        return {True: "✓", False: "✗", None: "?"}[self.passed]

    def cell(self) -> str:
        if self.value is None:
            return "-"
        return f"{_shown(self.value, self.threshold)} {self.mark}"

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
    """Each threshold gate of a vote's readings, judged against ``thresholds``."""
    readings = readings or {}
    return [
        GateCheck(g, float(getattr(thresholds, g.threshold)), readings.get(g.reading))
        for g in GATES
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
        vote = self.vote
        return {
            "node": self.node,
            "role": self.role,
            "vote": vote.vote.value if vote else None,
            "epoch": vote.epoch if vote else None,
            "counted": self.counted,
            "note": self.note,
            "reason": vote.reason if vote else None,
            "time": _iso(vote.time) if vote else None,
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


# ---------------------------------------------------------------------------------------------
# Why a claim is where it is


def _tally(claim: CapacityClaim, now: datetime) -> Tally | None:
    status = claim.status
    if status is None or status.proposal is None:
        return None
    return tally(status.proposal, status.votes, now)


def _refusal_text(refusals: Mapping[str, str]) -> str:
    return "; ".join(f"{node} refused ({reason})" for node, reason in refusals.items())


def _refusals(claim: CapacityClaim, result: Tally | None) -> dict[str, str]:
    """Earlier epochs' refusals plus the NO votes of the last proposal's placement nodes."""
    status = claim.status
    merged = dict((status.refusals or {}) if status else {})
    if result is not None:
        for node in result.refused_by:
            merged.setdefault(node, result.counted[node].reason or "voted NO")
    return merged


def why(claim: CapacityClaim, now: datetime) -> str:
    """One sentence: why the claim is in its phase, from its status alone."""
    status = claim.status
    if claim.metadata.deletion_timestamp is not None and (
        status is None or status.phase is not Phase.RELEASED
    ):
        return "Deleting: the operator is freeing the claim's allocation before it goes."
    if status is None or status.phase is None:
        return "Pending: the operator has not picked the claim up yet."
    explain_phase = _WHY.get(status.phase, _why_other)
    return explain_phase(claim, _tally(claim, now))


def _message(claim: CapacityClaim) -> str:
    status = claim.status
    return ((status.message if status else None) or "").strip().rstrip(".")


def _why_pending(claim: CapacityClaim, _: Tally | None) -> str:
    status = claim.status
    assert status is not None
    if status.reason == reasons.WAITING_FOR_NODES:
        return "Pending: waiting for nodes with fresh readings."
    return _sentence(f"Pending: {_message(claim) or status.reason or 'not proposed yet'}")


def _why_recovering(claim: CapacityClaim, _: Tally | None) -> str:
    status = claim.status
    assert status is not None
    if status.recoveries:
        last = status.recoveries[-1]
        return _sentence(
            f"Recovering: {last.from_node} failed ({last.reason.rstrip('.')}); its share is "
            "being re-admitted on healthy nodes"
        )
    return _sentence(f"Recovering: {_message(claim) or 'a placement node failed'}")


def _why_other(claim: CapacityClaim, _: Tally | None) -> str:
    status = claim.status
    assert status is not None
    if status.phase is Phase.RELEASED:
        return "Released: the claim was deleted and its allocation freed."
    detail = _message(claim) or status.reason or "no reason recorded"
    return _sentence(f"{status.phase.value if status.phase else 'Unknown'}: {detail}")


def _why_voting(claim: CapacityClaim, result: Tally | None) -> str:
    proposal = claim.status.proposal if claim.status else None
    if proposal is None or result is None:
        return "Voting: no proposal is recorded yet."
    epoch = proposal.epoch
    score = f"{result.yes}/{result.needed} YES"
    status = claim.status
    generation = claim.metadata.generation
    if status is not None and generation not in (None, status.observed_generation):
        return (
            f"Voting: the spec changed during epoch {epoch} (generation {generation}); "
            "the operator starts the admission over."
        )
    if result.outcome is Outcome.WAIT:
        missing = [n for n in dict.fromkeys(proposal.voters) if n not in result.counted]
        return (
            f"Voting: waiting for {', '.join(missing)} until {_clock(proposal.deadline)} "
            f"({score} so far)."
        )
    if result.outcome is Outcome.COMMIT:
        return f"Voting: quorum reached with {score} in epoch {epoch}; the operator commits next."
    return _why_aborting(proposal, result)


def _why_aborting(proposal: Proposal, result: Tally) -> str:
    """The epoch is decided against the claim; the operator has not aborted it yet."""
    epoch = proposal.epoch
    score = f"{result.yes}/{result.needed} YES"
    if result.refused_by:
        refused = {n: result.counted[n].reason or "voted NO" for n in result.refused_by}
        return (
            f"Voting: epoch {epoch} fails because {_refusal_text(refused)}; "
            "the operator aborts it next."
        )
    if result.reason.startswith("deadline passed"):
        missing = [n for n in dict.fromkeys(proposal.voters) if n not in result.counted]
        return (
            f"Voting: the deadline {_clock(proposal.deadline)} passed with {score} and no vote "
            f"from {', '.join(missing) or 'nobody'}; the operator aborts epoch {epoch} next."
        )
    detail = result.reason.removeprefix("quorum can no longer be reached: ")
    return _sentence(
        f"Voting: epoch {epoch} can no longer reach a quorum ({score}; {detail}); "
        "the operator aborts it next"
    )


def _why_admitted(claim: CapacityClaim, result: Tally | None) -> str:
    status = claim.status
    assert status is not None
    placements = status.placements or []
    nodes = [p.node for p in placements] or (
        list(status.proposal.placement) if status.proposal else []
    )
    epochs = sorted({p.epoch for p in placements if p.epoch is not None})
    epoch = epochs[-1] if epochs else (status.proposal.epoch if status.proposal else None)
    score = result.vote_count if result is not None else (status.vote_count or "?")
    text = f"Admitted on {', '.join(nodes) or 'no recorded node'} with {score} YES votes"
    if epoch is not None:
        text += f" in epoch {epoch}"
    for condition in status.conditions or []:
        if condition.type == reasons.FALSIFIED and condition.status.value == "True":
            evidence = (condition.message or condition.reason or "").rstrip(".")
            text += f"; since falsified: {evidence}"
    return _sentence(text)


def _why_rejected(claim: CapacityClaim, result: Tally | None) -> str:
    status = claim.status
    assert status is not None
    refusals = _refusals(claim, result)
    reason = status.reason or ""
    message = (status.message or "").strip().rstrip(".")
    if refusals and reason in ("", reasons.VOTE_REFUSED, reasons.ATTEMPTS_EXHAUSTED):
        lead = "Rejected"
        if reason == reasons.ATTEMPTS_EXHAUSTED and status.attempts:
            lead += f" after {status.attempts} proposal{'s' if status.attempts != 1 else ''}"
        return _sentence(f"{lead}: {_refusal_text(refusals)}")
    if refusals:
        head = message.split("; refused by ", 1)[0]
        return _sentence(f"Rejected ({reason}): {head}; {_refusal_text(refusals)}")
    label = f"Rejected ({reason})" if reason else "Rejected"
    return _sentence(f"{label}: {message or 'no reason recorded'}")


_WHY: dict[Phase, Callable[[CapacityClaim, Tally | None], str]] = {
    Phase.PENDING: _why_pending,
    Phase.VOTING: _why_voting,
    Phase.ADMITTED: _why_admitted,
    Phase.REJECTED: _why_rejected,
    Phase.RECOVERING: _why_recovering,
}


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
    calibration: Calibration
    events: list[EventInfo]
    now: datetime
    result: Tally | None
    rows: list[VoteRow]
    why: str


def explain(
    claim: CapacityClaim,
    calibration: Calibration | None = None,
    events: Iterable[EventInfo] = (),
    *,
    now: datetime,
) -> Explanation:
    """Everything ``capctl explain`` shows, computed once (pure)."""
    calibration = calibration or Calibration()
    status = claim.status
    result = _tally(claim, now)
    rows = vote_rows(
        status.proposal if status else None,
        status.votes if status else None,
        result.counted if result else {},
        calibration.thresholds,
        open_epoch=status is not None and status.phase is Phase.VOTING,
    )
    return Explanation(
        claim=claim,
        calibration=calibration,
        events=recent_events(events),
        now=now,
        result=result,
        rows=rows,
        why=why(claim, now),
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
) -> JSON:
    """``capctl explain -o json``: one JSON-ready dict."""
    return explanation_json(explain(claim, calibration, events, now=now))


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
            "created": _iso(meta.creation_timestamp),
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
        "refusals": [
            {"node": node, "reason": reason}
            for node, reason in ((status.refusals or {}) if status else {}).items()
        ],
        "placements": [p.wire() for p in (status.placements or [])] if status else [],
        "recoveries": [r.wire() for r in (status.recoveries or [])] if status else [],
        "conditions": [c.wire() for c in (status.conditions or [])] if status else [],
        "events": [ev.wire() for ev in e.events],
    }


def explain_text(
    claim: CapacityClaim,
    calibration: Calibration | None = None,
    events: Iterable[EventInfo] = (),
    *,
    now: datetime,
) -> str:
    """``capctl explain``: the human-readable report."""
    return explanation_text(explain(claim, calibration, events, now=now))


def _conditions_table(conditions: Sequence[Condition], now: datetime) -> str:
    rows = [
        [
            c.type,
            c.status.value,
            c.reason or "-",
            _age(c.last_transition_time, now),
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
    deadline = f"{_iso(proposal.deadline.replace(microsecond=0))} ({_age(proposal.deadline, e.now)}"
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
    lines = [
        f"Votes{summary}:",
        table(["NODE", "ROLE", "VOTE", "EPOCH", "COUNTED", "REASON"], rows),
    ]
    gated = [r for r in e.rows if r.gates]
    if gated:
        t = e.calibration.thresholds
        headers = ["NODE"] + [
            f"{g.reading} {_SYMBOL[g.op]} {getattr(t, g.threshold):g}" for g in GATES
        ]
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
        [r.from_node, r.to_node or "-", _age(r.at, e.now), str(r.epoch or "-"), r.reason]
        for r in recoveries
    ]
    return ["Recoveries:", table(["FROM", "TO", "AGE", "EPOCH", "REASON"], rows)]


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
        [_age(ev.time, e.now), ev.type, ev.reason, str(ev.count), ev.message] for ev in e.events
    ]
    return [
        f"Events (newest last, at most {MAX_EVENTS}):",
        table(["AGE", "TYPE", "REASON", "COUNT", "MESSAGE"], rows),
    ]


# ---------------------------------------------------------------------------------------------
# nodes


def _condition(node: CapacityNode, type_: str) -> str | None:
    for c in (node.status.conditions or []) if node.status else []:
        if c.type == type_:
            return c.status.value
    return None


def _substrates(node: CapacityNode) -> list[str]:
    status = node.status
    seen = [s.value for s in node.spec.substrates]
    extra: set[str] = set()
    if status is not None:
        for part in (status.readings, status.gates, status.allocated):
            extra.update(part or {})
    return seen + sorted(extra - set(seen))


def lease_json(lease: LeaseInfo | None, now: datetime) -> JSON | None:
    if lease is None:
        return None
    age = (now - lease.renew_time).total_seconds() if lease.renew_time else None
    return {
        "name": lease.name,
        "renewTime": _iso(lease.renew_time),
        "durationSeconds": lease.duration_seconds,
        "ageSeconds": None if age is None else round(age, 3),
        "expired": not lease.live(now),
    }


def _lease_cell(lease: LeaseInfo | None, now: datetime) -> str:
    if lease is None:
        return "none"
    if lease.renew_time is None:
        return "never renewed"
    age = human_duration((now - lease.renew_time).total_seconds())
    return age if lease.live(now) else f"expired ({age})"


def node_json(node: CapacityNode, lease: LeaseInfo | None, now: datetime) -> JSON:
    """One node's entry of ``capctl nodes -o json``."""
    status = node.status
    substrates = []
    for name in _substrates(node):
        reading = (status.readings or {}).get(name) if status else None
        gates = (status.gates or {}).get(name) if status else None
        alloc = (status.allocated or {}).get(name) if status else None
        try:
            share = allocated_share(node, Substrate(name))
        except ValueError:
            share = sum(h.share for h in alloc.holders) if alloc else 0.0
        substrates.append(
            {
                "substrate": name,
                "samples": reading.samples if reading else None,
                "observedAt": _iso(reading.observed_at) if reading else None,
                "readingsAgeSeconds": round((now - _aware(reading.observed_at)).total_seconds(), 3)
                if reading
                else None,
                "p95": reading.load.p95 if reading else None,
                "headroom": gates.headroom if gates else None,
                "allocated": share,
                "claims": (len(alloc.holders) or alloc.claims) if alloc else 0,
                "holders": [h.wire() for h in alloc.holders] if alloc else [],
                "gluingDelta": gates.gluing_delta if gates else None,
                "lambda1": gates.lambda1 if gates else None,
                "lambdaInt": gates.lambda_int if gates else None,
                "entropy": gates.entropy if gates else None,
            }
        )
    return {
        "name": node.metadata.name or node.spec.node_name,
        "nodeName": node.spec.node_name,
        "ready": _condition(node, reasons.READY),
        "stale": _condition(node, reasons.STALE),
        "conditions": [c.wire() for c in (status.conditions or [])] if status else [],
        "lease": lease_json(lease, now),
        "substrates": substrates,
    }


def _sorted_nodes(nodes: Iterable[CapacityNode]) -> list[CapacityNode]:
    return sorted(nodes, key=lambda n: n.metadata.name or n.spec.node_name)


def nodes_json(
    nodes: Iterable[CapacityNode], leases: Mapping[str, LeaseInfo], *, now: datetime
) -> list[JSON]:
    """``capctl nodes -o json``: one dict per node, sorted by name (pure)."""
    out = []
    for node in _sorted_nodes(nodes):
        name = node.metadata.name or node.spec.node_name
        out.append(node_json(node, leases.get(name), now))
    return out


NODE_HEADERS = (
    "NODE",
    "READY",
    "STALE",
    "LEASE",
    "SUBSTRATE",
    "OBSERVED",
    "P95",
    "HEADROOM",
    "ALLOC",
    "CLAIMS",
    "GLUE",
    "LAMBDA_INT",
    "ENTROPY",
)


def nodes_text(
    nodes: Iterable[CapacityNode], leases: Mapping[str, LeaseInfo], *, now: datetime
) -> str:
    """``capctl nodes``: an aligned table, one line per node and substrate (pure)."""
    rows: list[list[str]] = []
    for node in _sorted_nodes(nodes):
        name = node.metadata.name or node.spec.node_name
        data = node_json(node, leases.get(name), now)
        lead = [
            name,
            data["ready"] or "-",
            data["stale"] or "-",
            _lease_cell(leases.get(name), now),
        ]
        if not data["substrates"]:
            rows.append([*lead, *["-"] * (len(NODE_HEADERS) - len(lead))])
        for i, s in enumerate(data["substrates"]):
            age = s["readingsAgeSeconds"]
            rows.append(
                [
                    *(lead if i == 0 else [""] * len(lead)),
                    s["substrate"],
                    "-" if age is None else human_duration(age),
                    _num(s["p95"], 2),
                    _num(s["headroom"], 2),
                    _num(s["allocated"], 2),
                    str(s["claims"]),
                    _num(s["gluingDelta"], 3),
                    _num(s["lambdaInt"], 3),
                    _num(s["entropy"], 3),
                ]
            )
    if not rows:
        return "No CapacityNodes found.\n"
    return table(NODE_HEADERS, rows, indent=0) + "\n"


# ---------------------------------------------------------------------------------------------
# I/O


class CapctlError(Exception):
    """An expected failure: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _warn(message: str) -> None:
    print(f"capctl: warning: {message}", file=sys.stderr)


def _api_reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _missing_kind(exc: ApiException) -> bool:
    """A 404 for the resource type itself (CRD not installed), not for one object."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return True
    details = body.get("details") if isinstance(body, dict) else None
    return not (isinstance(details, dict) and details.get("name"))


def load_client(kubeconfig: str | None) -> tuple[client.ApiClient, str | None]:
    """An API client and the current context's namespace (None when it names none).

    Without ``--kubeconfig`` this is $KUBECONFIG or ~/.kube/config, as for kubectl; inside a pod
    with neither, the service account.
    """
    configuration = client.Configuration()
    namespace: str | None = None
    default = Path("~/.kube/config").expanduser()
    in_cluster = (
        kubeconfig is None
        and not os.environ.get("KUBECONFIG")
        and not default.exists()
        and os.environ.get("KUBERNETES_SERVICE_HOST")
    )
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            namespace = ns_file.read_text().strip() if ns_file.exists() else None
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            namespace = ((active or {}).get("context") or {}).get("namespace")
    except (config.ConfigException, OSError, yaml.YAMLError, TypeError, KeyError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or str(default)
        raise CapctlError(
            f"no usable kubeconfig ({where}): {exc}".replace("\n", " "), EXIT_UNREACHABLE
        ) from exc
    configuration.retries = 1
    return client.ApiClient(configuration), namespace


def read_claim(api: client.ApiClient, namespace: str, name: str) -> CapacityClaim:
    custom = client.CustomObjectsApi(api)
    try:
        body = custom.get_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            CapacityClaim.plural,
            name,
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status == 404:
            if _missing_kind(exc):
                raise CapctlError(
                    f"the CapacityClaim API ({CapacityClaim.plural}.{GROUP}) is not installed "
                    "on this cluster; apply the CRDs first"
                ) from exc
            raise CapctlError(f"capacityclaim {namespace}/{name} not found") from exc
        raise CapctlError(
            f"cannot read capacityclaim {namespace}/{name}: {_api_reason(exc)}"
        ) from exc
    try:
        return CapacityClaim.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CapctlError(
            f"capacityclaim {namespace}/{name} does not parse: {where}: {first['msg']}"
        ) from exc


def read_calibration(api: client.ApiClient, namespace: str) -> Calibration:
    core = client.CoreV1Api(api)
    where = f"{namespace}/{CALIBRATION_CONFIGMAP}"
    try:
        cm = core.read_namespaced_config_map(
            CALIBRATION_CONFIGMAP, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return Calibration.from_configmap(None, f"defaults: ConfigMap {where} not found")
        _warn(f"cannot read ConfigMap {where}: {_api_reason(exc)}; using default thresholds")
        return Calibration.from_configmap(None, f"defaults: ConfigMap {where} not readable")
    return Calibration.from_configmap(dict(cm.data or {}), f"ConfigMap {where}")


def read_events(api: client.ApiClient, claim: CapacityClaim) -> list[EventInfo]:
    uid = claim.metadata.uid
    if not uid:
        return []
    core = client.CoreV1Api(api)
    try:
        out = core.list_namespaced_event(
            claim.metadata.namespace or "default",
            field_selector=f"involvedObject.uid={uid}",
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        _warn(f"cannot list events: {_api_reason(exc)}")
        return []
    return [event_info(item) for item in out.items]


def read_nodes(api: client.ApiClient) -> list[CapacityNode]:
    custom = client.CustomObjectsApi(api)
    try:
        out = custom.list_cluster_custom_object(
            GROUP, VERSION, CapacityNode.plural, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            raise CapctlError(
                f"the CapacityNode API ({CapacityNode.plural}.{GROUP}) is not installed on this "
                "cluster; apply the CRDs first"
            ) from exc
        raise CapctlError(f"cannot list capacitynodes: {_api_reason(exc)}") from exc
    nodes = []
    for item in out.get("items", []):
        try:
            nodes.append(CapacityNode.model_validate(item))
        except ValidationError as exc:
            name = (item.get("metadata") or {}).get("name", "?")
            _warn(f"skipping capacitynode {name}: it does not parse ({exc.error_count()} errors)")
    return nodes


def read_leases(api: client.ApiClient, namespace: str) -> dict[str, LeaseInfo]:
    coordination = client.CoordinationV1Api(api)
    try:
        out = coordination.list_namespaced_lease(
            namespace, _request_timeout=REQUEST_TIMEOUT, _preload_content=False
        )
    except ApiException as exc:
        _warn(f"cannot list leases in {namespace}: {_api_reason(exc)}")
        return {}
    leases = [parse_lease(item) for item in json.loads(out.data).get("items", [])]
    return {lease.name: lease for lease in leases}


# ---------------------------------------------------------------------------------------------
# Command line


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global flags; on subcommands with SUPPRESS defaults, so they work on either side."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--kubeconfig",
        default=default(None),
        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=default(None),
        help="namespace of the claim (default: the context's namespace, else 'default')",
    )
    parser.add_argument(
        "--platform-namespace",
        default=default(PLATFORM_NAMESPACE),
        help="namespace of the calibration ConfigMap and the node Leases "
        f"(default: {PLATFORM_NAMESPACE})",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default=default("text"),
        help="output format (default: text)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capctl", description="Explain Capacity Platform claims and nodes."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    explain_cmd = sub.add_parser(
        "explain",
        help="why a claim is where it is: proposal, votes, gate readings, events",
        description="Explain a CapacityClaim: its proposal, each vote with its gate readings "
        "against the thresholds, refusals, placements, conditions and recent events.",
    )
    explain_cmd.add_argument("claim", metavar="CLAIM", help="name of the CapacityClaim")
    _common(explain_cmd, suppress=True)
    nodes_cmd = sub.add_parser(
        "nodes",
        help="each node's lease, headroom, allocation and gate readings",
        description="List CapacityNodes with their Ready and Stale conditions, lease age and, per "
        "substrate, p95 load, headroom, allocation and gate readings.",
    )
    _common(nodes_cmd, suppress=True)
    return parser


def _emit(output: str, data: Any, text: str) -> None:
    if output == "json":
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(text)


def _run(args: argparse.Namespace, now: Callable[[], datetime]) -> int:
    api, context_namespace = load_client(args.kubeconfig)
    try:
        return _command(api, context_namespace, args, now)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        reason = getattr(exc, "reason", None) or exc
        raise CapctlError(
            f"cannot reach the Kubernetes API server at {api.configuration.host}: {reason}".replace(
                "\n", " "
            ),
            EXIT_UNREACHABLE,
        ) from exc
    finally:
        api.close()


def _command(
    api: client.ApiClient,
    context_namespace: str | None,
    args: argparse.Namespace,
    now: Callable[[], datetime],
) -> int:
    if args.command == "explain":
        namespace = args.namespace or context_namespace or "default"
        claim = read_claim(api, namespace, args.claim)
        calibration = read_calibration(api, args.platform_namespace)
        events = read_events(api, claim)
        e = explain(claim, calibration, events, now=now())
        _emit(args.output, explanation_json(e), explanation_text(e))
    else:
        nodes = read_nodes(api)
        leases = read_leases(api, args.platform_namespace)
        at = now()
        _emit(args.output, nodes_json(nodes, leases, now=at), nodes_text(nodes, leases, now=at))
    return EXIT_OK


def _fail(message: str, code: int) -> NoReturn:
    print(f"capctl: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return _run(args, lambda: datetime.now(UTC))
    except CapctlError as exc:
        _fail(str(exc), exc.code)
    except BrokenPipeError:  # `capctl ... | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
