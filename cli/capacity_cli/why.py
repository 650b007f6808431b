"""One sentence saying why a claim is in its phase, from its status alone (pure).

Vote counts come from :func:`capacity_api.admission.tally`, so they match the operator's. While a
claim's proposal is open its votes are in the voters' CapacityBallots, not in ``status.votes``:
``capctl explain`` hands over the claim with those votes in place
(:func:`capacity_cli.explain.with_ballot_votes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from capacity_api import reasons
from capacity_api.admission import Outcome, Tally, tally
from capacity_api.models import CapacityClaim, Phase, Proposal
from capacity_cli.output import clock_time, sentence


def claim_tally(claim: CapacityClaim, now: datetime) -> Tally | None:
    """The tally of the claim's last proposal at ``now``, as the operator counts it."""
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
    return explain_phase(claim, claim_tally(claim, now))


def _message(claim: CapacityClaim) -> str:
    status = claim.status
    return ((status.message if status else None) or "").strip().rstrip(".")


def _why_pending(claim: CapacityClaim, _: Tally | None) -> str:
    status = claim.status
    assert status is not None
    if status.reason == reasons.WAITING_FOR_NODES:
        return "Pending: waiting for nodes with fresh readings."
    return sentence(f"Pending: {_message(claim) or status.reason or 'not proposed yet'}")


def _why_recovering(claim: CapacityClaim, _: Tally | None) -> str:
    status = claim.status
    assert status is not None
    if status.recoveries:
        last = status.recoveries[-1]
        return sentence(
            f"Recovering: {last.from_node} failed ({last.reason.rstrip('.')}); its share is "
            "being re-admitted on healthy nodes"
        )
    return sentence(f"Recovering: {_message(claim) or 'a placement node failed'}")


def _why_other(claim: CapacityClaim, _: Tally | None) -> str:
    status = claim.status
    assert status is not None
    if status.phase is Phase.RELEASED:
        return "Released: the claim was deleted and its allocation freed."
    detail = _message(claim) or status.reason or "no reason recorded"
    return sentence(f"{status.phase.value if status.phase else 'Unknown'}: {detail}")


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
            f"Voting: waiting for {', '.join(missing)} until {clock_time(proposal.deadline)} "
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
            f"Voting: the deadline {clock_time(proposal.deadline)} passed with {score} and no vote "
            f"from {', '.join(missing) or 'nobody'}; the operator aborts epoch {epoch} next."
        )
    detail = result.reason.removeprefix("quorum can no longer be reached: ")
    return sentence(
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
    return sentence(text)


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
        return sentence(f"{lead}: {_refusal_text(refusals)}")
    if refusals:
        head = message.split("; refused by ", 1)[0]
        return sentence(f"Rejected ({reason}): {head}; {_refusal_text(refusals)}")
    label = f"Rejected ({reason})" if reason else "Rejected"
    return sentence(f"{label}: {message or 'no reason recorded'}")


_WHY: dict[Phase, Callable[[CapacityClaim, Tally | None], str]] = {
    Phase.PENDING: _why_pending,
    Phase.VOTING: _why_voting,
    Phase.ADMITTED: _why_admitted,
    Phase.REJECTED: _why_rejected,
    Phase.RECOVERING: _why_recovering,
}


__all__ = ["claim_tally", "why"]
