"""Calibration (DESIGN section 7): thresholds that learn from the truth of past decisions.

Pure functions, no I/O. The operator reads the ``capacity-calibration`` ConfigMap and the recent
outcomes of the outcome store, calls :func:`calibrate`, and writes back what it returns; capctl
calls :func:`rollback` and :func:`set_pinned` the same way.

How a threshold is chosen. Every final outcome carries the votes it was decided on: each node's
gate readings (fitError, isolation, gluingDelta, lambdaInt, ...) and, for a NO, the gate that
failed. For one threshold and a candidate value, each outcome is replayed with that value and the
other thresholds as they are now:

- an admitted claim is still admitted when every placement node's readings pass;
- a rejected claim would have been admitted when at least ``replicas`` of the nodes that voted
  pass, not counting nodes that said NO for a reason no threshold decides (too few samples,
  stale readings, no capacity, a pressure condition).

A replayed admission of a claim that was Falsified, or of a claim RightlyRejected, is a
falsification; a replayed refusal of a claim that was Confirmed, or of a MissedOpportunity, is a
missed opportunity. The cost of a value is ``weight_falsified * falsifications + weight_missed *
misses`` over the outcomes: the newest ``window`` final outcomes decided after the last change
by hand (a user's edit or a rollback of any threshold; before there is one, all of them). A
threshold can move when there are at least ``min_outcomes`` of them and some value in its
bounds costs less than the current one: toward the cheapest value (the nearest to the current
one when several tie), by at most ``max_step`` of the bounds' width, and only when the move
saves at least ``min_gain`` of the current cost and holds on outcomes it was not chosen on
(the value cheapest on the older half of the outcomes does not raise the cost of the newer
half: see :func:`assess`). Each round moves one
threshold, the one whose cheapest value gains most (ties: theta_fit, theta_iso, theta_glue,
theta_burst, in that order); the next round looks again with that move in force. A pinned
threshold never moves. Each move is one entry of the bounded history: from, to, when, why, and on
how many outcomes.

The ConfigMap's keys besides the thresholds (:data:`capacity_api.gates.CONFIGMAP_KEYS`):
``pinned`` (comma-separated threshold keys), ``history`` (JSON list, oldest first, at most
``history_limit`` entries), ``counters`` (JSON: per substrate, how many decisions ended in each
verdict) and ``calibratedAt`` (the last round's time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from capacity_api.gates import CONFIGMAP_KEYS, THRESHOLD_BOUNDS, Gate, Thresholds
from capacity_api.models import Phase, Verdict

CALIBRATED: Mapping[str, tuple[str, str, Gate]] = {
    "theta_fit": ("fitError", "max", Gate.FIT),
    "theta_iso": ("isolation", "min", Gate.ISOLATION),
    "theta_glue": ("gluingDelta", "max", Gate.GLUING),
    "theta_burst": ("lambdaInt", "max", Gate.BURST),
}
"""The thresholds calibration moves: field -> (reading, kind, gate). ``max``: the reading must be
at most the threshold; ``min``: at least. minSamples and maxAgeSeconds are operating settings,
not learned."""

KEY_FIELDS = {key: name for name, key in CONFIGMAP_KEYS.items()}
"""ConfigMap key -> threshold field."""
PINNED_KEY = "pinned"
HISTORY_KEY = "history"
COUNTERS_KEY = "counters"
CALIBRATED_AT_KEY = "calibratedAt"

BY_CALIBRATION = "calibration"
BY_USER = "user"
BY_ROLLBACK = "rollback"

FINAL_VERDICTS = frozenset(
    {Verdict.CONFIRMED, Verdict.FALSIFIED, Verdict.MISSED_OPPORTUNITY, Verdict.RIGHTLY_REJECTED}
)
COUNTER_NAMES: Mapping[Verdict, str] = {
    Verdict.CONFIRMED: "confirmed",
    Verdict.FALSIFIED: "falsified",
    Verdict.MISSED_OPPORTUNITY: "missed",
    Verdict.RIGHTLY_REJECTED: "rightlyRejected",
}
_PLACES = 4
"""Thresholds are written with this many decimals."""


class CalibrationError(ValueError):
    """A request calibration cannot carry out (an unknown key, a history entry not kept)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """How calibration moves thresholds (the operator's settings)."""

    min_outcomes: int = 20
    """Final outcomes a threshold needs before it moves at all."""
    window: int = 200
    """The newest final outcomes a round looks at."""
    max_step: float = 0.1
    """Largest move per round, as a share of the threshold's bounds (0.1 of theta_fit's
    0.05-0.50 is 0.045)."""
    weight_falsified: float = 1.0
    """Cost of one falsified admission."""
    weight_missed: float = 0.5
    """Cost of one missed opportunity (cheaper: a claim refused can be asked again; an
    admission that fails costs the workload)."""
    history_limit: int = 50
    """History entries kept (the oldest are dropped)."""
    min_gain: float = 0.2
    """Share of the current cost a move must save at least: trading four falsified admissions
    for seven missed opportunities saves 0.5 of 6 (8 %), which a few outcomes more or less
    would undo."""

    def __post_init__(self) -> None:
        if self.min_outcomes < 1 or self.window < 1 or self.history_limit < 1:
            raise ValueError("min_outcomes, window and history_limit must be at least 1")
        if not 0 < self.max_step <= 1:
            raise ValueError(f"max_step {self.max_step!r} is outside (0, 1]")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain {self.min_gain!r} is outside [0, 1)")
        if self.weight_falsified < 0 or self.weight_missed < 0:
            raise ValueError("weights must not be negative")


@dataclass(frozen=True, slots=True)
class NodeVote:
    """One node's vote as an outcome recorded it."""

    yes: bool
    gate: str | None = None
    """The first failing gate of a NO (None: unknown, or a NO without readings)."""
    readings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One final decision, as calibration needs it."""

    decision: Phase
    """Admitted or Rejected."""
    verdict: Verdict
    decided_at: datetime
    substrate: str | None = None
    placement: tuple[str, ...] = ()
    """An admitted claim's placement nodes."""
    votes: Mapping[str, NodeVote] = field(default_factory=dict)
    replicas: int = 1

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Outcome | None:
        """From an outcome store row (None when it is not final or not a decision)."""
        try:
            decision = Phase(str(row.get("decision")))
            verdict = Verdict(str(row.get("verdict")))
        except ValueError:
            return None
        if decision not in (Phase.ADMITTED, Phase.REJECTED) or verdict not in FINAL_VERDICTS:
            return None
        decided_at = row.get("decided_at")
        if not isinstance(decided_at, datetime):
            return None
        votes: dict[str, NodeVote] = {}
        for node, recorded in (row.get("readings") or {}).items():
            if not isinstance(recorded, Mapping):
                continue
            numbers = {
                k: float(v)
                for k, v in recorded.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
            vote = recorded.get("vote")
            gate = recorded.get("gate")
            votes[str(node)] = NodeVote(
                yes=vote == "YES" if vote is not None else decision is Phase.ADMITTED,
                gate=str(gate) if gate else None,
                readings=numbers,
            )
        request = row.get("request") or {}
        replicas = request.get("replicas", 1) if isinstance(request, Mapping) else 1
        return cls(
            decision=decision,
            verdict=verdict,
            decided_at=decided_at,
            substrate=row.get("substrate"),
            placement=tuple(row.get("nodes") or ()) if decision is Phase.ADMITTED else (),
            votes=votes,
            replicas=replicas if isinstance(replicas, int) and replicas >= 1 else 1,
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the history: a threshold changed."""

    id: int
    key: str
    """The ConfigMap key (thetaIso, ...)."""
    before: float
    after: float
    at: datetime
    why: str
    outcomes: int = 0
    """How many outcomes the move was decided on (0 for changes by hand)."""
    by: str = BY_CALIBRATION
    """calibration, user (an edit of the ConfigMap) or rollback."""

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "from": self.before,
            "to": self.after,
            "at": self.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "why": self.why,
            "outcomes": self.outcomes,
            "by": self.by,
        }

    @classmethod
    def parse(cls, item: Any) -> Change | None:
        if not isinstance(item, Mapping):
            return None
        try:
            at = datetime.fromisoformat(str(item["at"]).replace("Z", "+00:00"))
            return cls(
                id=int(item["id"]),
                key=str(item["key"]),
                before=float(item["from"]),
                after=float(item["to"]),
                at=at if at.tzinfo else at.replace(tzinfo=UTC),
                why=str(item.get("why", "")),
                outcomes=int(item.get("outcomes", 0)),
                by=str(item.get("by", BY_CALIBRATION)),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class State:
    """What the ConfigMap holds, parsed."""

    thresholds: Thresholds
    pinned: frozenset[str] = frozenset()
    """Pinned threshold fields (theta_iso, ...)."""
    history: tuple[Change, ...] = ()
    counters: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    calibrated_at: datetime | None = None
    warnings: tuple[str, ...] = ()
    """What of the pins, history and counters could not be read as written (the thresholds'
    own warnings come from :meth:`Thresholds.from_configmap`)."""

    @classmethod
    def from_configmap(
        cls, data: Mapping[str, str] | None, last_good: Thresholds | None = None
    ) -> State:
        data = data or {}
        thresholds, _ = Thresholds.from_configmap(data, last_good)  # said by whoever reads them
        problems: list[str] = []
        pinned: set[str] = set()
        for key in (k.strip() for k in data.get(PINNED_KEY, "").split(",")):
            if not key:
                continue
            if KEY_FIELDS.get(key) in CALIBRATED:
                pinned.add(KEY_FIELDS[key])
            else:
                problems.append(f"{PINNED_KEY}: {key[:64]!r} is not a calibrated threshold key")
        history: list[Change] = []
        raw = _json(data.get(HISTORY_KEY), list)
        if raw is None and data.get(HISTORY_KEY):
            problems.append(f"{HISTORY_KEY}: not a JSON list; calibration starts a new history")
        for item in raw or []:
            change = Change.parse(item)
            if change is None:
                problems.append(f"{HISTORY_KEY}: an entry that is not a change was dropped")
            else:
                history.append(change)
        counters: dict[str, dict[str, int]] = {}
        for substrate, counts in (_json(data.get(COUNTERS_KEY), dict) or {}).items():
            if isinstance(counts, Mapping):
                counters[str(substrate)] = {
                    str(k): v for k, v in counts.items() if isinstance(v, int)
                }
        calibrated_at = None
        if data.get(CALIBRATED_AT_KEY):
            try:
                calibrated_at = datetime.fromisoformat(
                    data[CALIBRATED_AT_KEY].replace("Z", "+00:00")
                )
            except ValueError:
                problems.append(f"{CALIBRATED_AT_KEY}: not a time")
        return cls(
            thresholds=thresholds,
            pinned=frozenset(pinned),
            history=tuple(history),
            counters=counters,
            calibrated_at=calibrated_at,
            warnings=tuple(problems),
        )

    def to_configmap(self) -> dict[str, str]:
        """The ConfigMap data of this state (thresholds, pins, history, counters)."""
        data = self.thresholds.to_configmap()
        data[PINNED_KEY] = ",".join(sorted(CONFIGMAP_KEYS[name] for name in self.pinned))
        data[HISTORY_KEY] = json.dumps([c.wire() for c in self.history], separators=(",", ":"))
        data[COUNTERS_KEY] = json.dumps(
            {s: dict(sorted(c.items())) for s, c in sorted(self.counters.items())},
            separators=(",", ":"),
        )
        if self.calibrated_at is not None:
            data[CALIBRATED_AT_KEY] = _iso(self.calibrated_at)
        return data

    def value_of(self, name: str) -> float:
        return float(getattr(self.thresholds, name))

    def last_known(self, key: str) -> float | None:
        """The value the newest history entry of ``key`` set (None: no entry kept)."""
        for change in reversed(self.history):
            if change.key == key:
                return change.after
        return None

    def evidence_since(self) -> datetime | None:
        """Outcomes decided before the newest change by hand (an edit or a rollback, of any
        threshold) do not count: a user who sets a threshold back says the outcomes misled
        calibration, and another threshold must not step in to explain the same outcomes."""
        for change in reversed(self.history):
            if change.by in (BY_USER, BY_ROLLBACK):
                return change.at
        return None

    def with_changes(self, changes: Sequence[Change], limit: int) -> State:
        values = {c.key: c.after for c in changes}
        thresholds = _with(self.thresholds, {KEY_FIELDS[key]: v for key, v in values.items()})
        history = (*self.history, *changes)[-limit:]
        return replace(self, thresholds=thresholds, history=history)

    def next_id(self) -> int:
        return max((c.id for c in self.history), default=0) + 1


# ---------------------------------------------------------------------------------------------
# Replaying a decision with other thresholds


def _passes(vote: NodeVote, thresholds: Thresholds) -> bool:
    """Would this node say YES with ``thresholds``? A NO for a reason no calibrated threshold
    decides (samples, freshness, capacity, pressure, an expired lease) stays a NO."""
    if not vote.yes:
        if vote.gate is not None and vote.gate not in {g for _, _, g in CALIBRATED.values()}:
            return False
        if not vote.readings:
            return False
        allocated = vote.readings.get("allocated", 0.0)
        request = vote.readings.get("request", 0.0)
        if allocated + request > 1.0 + 1e-9:
            return False
    for name, (reading, kind, _) in CALIBRATED.items():
        value = vote.readings.get(reading)
        if value is None:
            continue
        limit = float(getattr(thresholds, name))
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            return False
    return True


def admitted_with(outcome: Outcome, thresholds: Thresholds) -> bool:
    """Would the decision have been an admission with ``thresholds``?"""
    if outcome.decision is Phase.ADMITTED:
        return all(
            _passes(outcome.votes[node], thresholds)
            for node in outcome.placement
            if node in outcome.votes
        )
    passing = sum(1 for vote in outcome.votes.values() if _passes(vote, thresholds))
    return passing >= outcome.replicas


@dataclass(frozen=True, slots=True)
class Cost:
    """What a threshold value would have cost over a set of outcomes."""

    falsified: int
    missed: int
    outcomes: int

    def weighted(self, policy: Policy) -> float:
        return policy.weight_falsified * self.falsified + policy.weight_missed * self.missed

    def text(self, policy: Policy) -> str:
        return f"cost {self.weighted(policy):g} ({self.falsified} falsified, {self.missed} missed)"


def cost(outcomes: Iterable[Outcome], thresholds: Thresholds) -> Cost:
    """Falsifications and misses of ``thresholds`` replayed over ``outcomes``."""
    falsified = missed = n = 0
    for outcome in outcomes:
        n += 1
        admit = admitted_with(outcome, thresholds)
        bad_to_admit = outcome.verdict in (Verdict.FALSIFIED, Verdict.RIGHTLY_REJECTED)
        if admit and bad_to_admit:
            falsified += 1
        elif not admit and not bad_to_admit:
            missed += 1
    return Cost(falsified, missed, n)


def _candidates(name: str, outcomes: Sequence[Outcome], current: float) -> list[float]:
    """The values worth trying: the bounds, the current value, and each reading of the outcomes
    (the value itself and the nearest value just past it, which is where a decision flips)."""
    reading, kind, _ = CALIBRATED[name]
    low, high = THRESHOLD_BOUNDS[name]
    step = 10.0**-_PLACES
    values = {low, high, current}
    for outcome in outcomes:
        for vote in outcome.votes.values():
            value = vote.readings.get(reading)
            if value is None:
                continue
            past = value - step if kind == "max" else value + step
            for v in (value, past):
                values.add(min(high, max(low, round(v, _PLACES))))
    return sorted(values)


@dataclass(frozen=True, slots=True)
class Assessment:
    """One threshold in one round: what it costs, what would cost least, and what was done."""

    key: str
    current: float
    outcomes: int
    current_cost: Cost | None
    best: float | None
    best_cost: Cost | None
    moved_to: float | None
    note: str
    """Why it moved or why not, one sentence."""


def _cheapest(
    state: State, name: str, outcomes: Sequence[Outcome], policy: Policy
) -> tuple[float, Cost]:
    """The value of least cost over ``outcomes`` (the nearest to the current one when several
    tie) and its cost."""
    current = state.value_of(name)
    best, best_cost = current, cost(outcomes, state.thresholds)
    for value in _candidates(name, outcomes, current):
        c = cost(outcomes, _with(state.thresholds, {name: value}))
        better = c.weighted(policy) < best_cost.weighted(policy) - 1e-12
        tie = abs(c.weighted(policy) - best_cost.weighted(policy)) <= 1e-12
        if better or (tie and abs(value - current) < abs(best - current)):
            best, best_cost = value, c
    return best, best_cost


def assess(state: State, name: str, outcomes: Sequence[Outcome], policy: Policy) -> Assessment:
    """Where one threshold should go on these outcomes (all of them count: the caller picks
    the window).

    A move must hold on outcomes it was not chosen on: the value of least cost over the older
    half of the outcomes must not cost more than the current value over the newer half. A
    threshold whose readings split the older failures from the older successes only by chance
    (the spectral gates on a noisy host) then refuses newer successes, and stays where it is."""
    key = CONFIGMAP_KEYS[name]
    current = state.value_of(name)
    n = len(outcomes)
    if name in state.pinned:
        return Assessment(key, current, n, None, None, None, None, "pinned: never moved")
    if n < policy.min_outcomes:
        return Assessment(
            key, current, n, None, None, None, None,
            f"{n} outcomes, fewer than the {policy.min_outcomes} a move needs",
        )  # fmt: skip
    here = cost(outcomes, state.thresholds)
    best, best_cost = _cheapest(state, name, outcomes, policy)
    if best == current or best_cost.weighted(policy) >= here.weighted(policy):
        return Assessment(
            key, current, n, here, best, best_cost, None,
            f"{here.text(policy)} on {n} outcomes; no value in bounds costs less",
        )  # fmt: skip
    saved = here.weighted(policy) - best_cost.weighted(policy)
    if saved < policy.min_gain * here.weighted(policy):
        return Assessment(
            key, current, n, here, best, best_cost, None,
            f"{key} {best:g} has {best_cost.text(policy)} against {here.text(policy)} on {n} "
            f"outcomes: it saves {saved:g}, less than {policy.min_gain:.0%} of the cost; "
            f"not moved",
        )  # fmt: skip
    ordered = sorted(outcomes, key=lambda o: o.decided_at)
    older, newer = ordered[: n // 2], ordered[n // 2 :]
    probe, _ = _cheapest(state, name, older, policy)
    held = cost(newer, _with(state.thresholds, {name: probe}))
    before = cost(newer, state.thresholds)
    if held.weighted(policy) > before.weighted(policy):
        return Assessment(
            key, current, n, here, best, best_cost, None,
            f"{key} {best:g} has {best_cost.text(policy)} against {here.text(policy)} on {n} "
            f"outcomes, but {probe:g}, the cheapest on the older {len(older)}, raises the "
            f"newer {len(newer)}'s {before.text(policy)} to {held.text(policy)}: not moved",
        )  # fmt: skip
    low, high = THRESHOLD_BOUNDS[name]
    limit = policy.max_step * (high - low)
    target = current + max(-limit, min(limit, best - current))
    target = min(high, max(low, round(target, _PLACES)))
    bounded = "" if target == best else f", step bounded to {limit:.4g}"
    note = (
        f"on {n} outcomes {key} {best:g} has {best_cost.text(policy)} against "
        f"{here.text(policy)} at {current:g} (holds on the newer half){bounded}"
    )
    return Assessment(key, current, n, here, best, best_cost, target, note)


# ---------------------------------------------------------------------------------------------
# A round


@dataclass(frozen=True, slots=True)
class Round:
    """What one calibration round decided: the new state and what changed."""

    state: State
    changes: tuple[Change, ...]
    assessments: tuple[Assessment, ...]


def counters(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Per substrate, decisions ending in each verdict (from the store's counts by verdict),
    as the ConfigMap's ``counters`` keeps them."""
    result: dict[str, dict[str, int]] = {}
    for substrate, by_verdict in counts.items():
        row = dict.fromkeys(COUNTER_NAMES.values(), 0)
        for verdict, n in by_verdict.items():
            try:
                name = COUNTER_NAMES.get(Verdict(verdict))
            except ValueError:
                continue
            if name is not None:
                row[name] += n
        result[substrate] = row
    return result


def rates(counts: Mapping[str, int]) -> tuple[float | None, float | None]:
    """(falsification rate, miss rate) of one substrate's counters: falsified among the
    admissions whose check ended, missed opportunities among the rejections whose check ended
    (None when there are none)."""
    admitted = counts.get("falsified", 0) + counts.get("confirmed", 0)
    rejected = counts.get("missed", 0) + counts.get("rightlyRejected", 0)
    falsification = counts.get("falsified", 0) / admitted if admitted else None
    miss = counts.get("missed", 0) / rejected if rejected else None
    return falsification, miss


def hand_changes(state: State, previous: Thresholds | None, now: datetime) -> tuple[Change, ...]:
    """Thresholds that differ from what calibration last knew of them: edits by hand, recorded
    so that the history says so and the evidence for that threshold starts again."""
    changes: list[Change] = []
    next_id = state.next_id()
    for name in CALIBRATED:
        key = CONFIGMAP_KEYS[name]
        known = state.last_known(key)
        if known is None and previous is not None:
            known = float(getattr(previous, name))
        value = state.value_of(name)
        if known is None or math.isclose(known, value, rel_tol=0, abs_tol=1e-12):
            continue
        changes.append(
            Change(next_id, key, known, value, now, "changed in the ConfigMap by hand", 0, BY_USER)
        )
        next_id += 1
    return tuple(changes)


def calibrate(
    state: State,
    outcomes: Iterable[Outcome],
    counts: Mapping[str, Mapping[str, int]],
    policy: Policy,
    *,
    now: datetime,
    previous: Thresholds | None = None,
) -> Round:
    """One round: record edits by hand, then move each threshold that has the outcomes and a
    cheaper value (module docstring). ``outcomes`` are the newest final ones, any order;
    ``counts`` the store's decisions per substrate and verdict; ``previous`` the thresholds in
    force before this read (to tell an edit by hand when the history has no entry yet)."""
    final = sorted(
        (o for o in outcomes if o.verdict in FINAL_VERDICTS),
        key=lambda o: o.decided_at,
        reverse=True,
    )[: policy.window]
    edits = hand_changes(state, previous, now)
    state = state.with_changes(edits, policy.history_limit)
    since = state.evidence_since()
    mine = [o for o in final if since is None or o.decided_at >= since]
    assessments = [assess(state, name, mine, policy) for name in CALIBRATED]
    # one threshold per round, the one whose best value gains most: the readings of one
    # decision are correlated, and each threshold alone can always refuse the failures (and
    # with them the good admissions); the next round looks again with that move in force
    movable = [a for a in assessments if a.moved_to is not None]
    moves: list[Change] = []
    if movable:
        chosen = max(movable, key=lambda a: _gain(a, policy))
        moves.append(
            Change(
                state.next_id(),
                chosen.key,
                chosen.current,
                chosen.moved_to,  # type: ignore[arg-type]
                now,
                chosen.note,
                chosen.outcomes,
                BY_CALIBRATION,
            )
        )
        later = f"; {chosen.key} gains more and moves first"
        assessments = [
            a if a is chosen or a.moved_to is None
            else replace(a, moved_to=None, note=a.note + later)
            for a in assessments
        ]  # fmt: skip
    state = state.with_changes(moves, policy.history_limit)
    state = replace(state, counters=counters(counts), calibrated_at=now)
    return Round(state, (*edits, *moves), tuple(assessments))


def _gain(assessment: Assessment, policy: Policy) -> float:
    assert assessment.current_cost is not None
    assert assessment.best_cost is not None
    return assessment.current_cost.weighted(policy) - assessment.best_cost.weighted(policy)


def rollback(state: State, entry: int, now: datetime, who: str, limit: int = 50) -> State:
    """The thresholds as they were right after history entry ``entry`` (0: before every entry
    kept): each threshold changed since is set back, one ``rollback`` entry each. Raises
    :class:`CalibrationError` for an entry not in the history."""
    ids = {c.id for c in state.history}
    if entry != 0 and entry not in ids:
        kept = f"{min(ids)}-{max(ids)}" if ids else "none"
        raise CalibrationError(f"history entry {entry} is not kept (entries kept: {kept})")
    back: dict[str, float] = {}
    for change in state.history:
        if change.id > entry and change.key not in back:
            back[change.key] = change.before
    changes: list[Change] = []
    next_id = state.next_id()
    for key, value in back.items():
        current = state.value_of(KEY_FIELDS[key])
        if math.isclose(current, value, rel_tol=0, abs_tol=1e-12):
            continue
        changes.append(
            Change(
                next_id,
                key,
                current,
                value,
                now,
                f"rolled back to entry {entry} by {who}",
                0,
                BY_ROLLBACK,
            )
        )
        next_id += 1
    return state.with_changes(changes, limit)


def set_pinned(state: State, keys: Iterable[str], pinned: bool) -> State:
    """Pin (no automatic moves) or unpin thresholds by ConfigMap key."""
    names: set[str] = set()
    for key in keys:
        name = KEY_FIELDS.get(key, "")
        if name not in CALIBRATED:
            known = ", ".join(CONFIGMAP_KEYS[n] for n in CALIBRATED)
            raise CalibrationError(f"{key!r} is not a calibrated threshold (one of {known})")
        names.add(name)
    now_pinned = state.pinned | names if pinned else state.pinned - names
    return replace(state, pinned=frozenset(now_pinned))


def updated_data(
    data: Mapping[str, str] | None, state: State, changes: Iterable[Change]
) -> dict[str, str]:
    """``data`` with what ``state`` adds: the thresholds that ``changes`` set (every other
    threshold key stays as written, so an edit by hand that was refused is not overwritten),
    and the pins, history, counters and round time."""
    new = dict(data or {})
    for change in changes:
        if change.by != BY_USER:
            new[change.key] = repr(change.after)
    full = state.to_configmap()
    for key in (PINNED_KEY, HISTORY_KEY, COUNTERS_KEY, CALIBRATED_AT_KEY):
        if key in full:
            new[key] = full[key]
    if not new.get(PINNED_KEY):
        new.pop(PINNED_KEY, None)
    return new


def same_but_time(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """The two data are equal but for the round's time (nothing worth a write)."""
    return {k: v for k, v in a.items() if k != CALIBRATED_AT_KEY} == {
        k: v for k, v in b.items() if k != CALIBRATED_AT_KEY
    }


def _with(thresholds: Thresholds, values: Mapping[str, float]) -> Thresholds:
    """``thresholds`` with the calibrated fields of ``values`` replaced (validated)."""
    fit, iso, glue, burst = (
        values.get(name, float(getattr(thresholds, name))) for name in CALIBRATED
    )
    return replace(thresholds, theta_fit=fit, theta_iso=iso, theta_glue=glue, theta_burst=burst)


def _json(text: str | None, kind: type) -> Any:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, kind) else None


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
