"""Calibration's pure decisions: replaying outcomes, moving thresholds, pins, rollback, the
ConfigMap round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capacity_api.calibration import (
    BY_CALIBRATION,
    BY_ROLLBACK,
    BY_USER,
    CalibrationError,
    NodeVote,
    Outcome,
    Policy,
    State,
    admitted_with,
    calibrate,
    counters,
    rates,
    rollback,
    set_pinned,
    updated_data,
)
from capacity_api.gates import THRESHOLD_BOUNDS, Thresholds
from capacity_api.models import Phase, Verdict
from capacity_cli.calibration import calibration_json, calibration_text

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
POLICY = Policy(min_outcomes=6, window=100, max_step=0.1)


def readings(iso: float = 0.5, fit: float = 0.0, glue: float = 0.02, burst: float = 0.3) -> dict:
    return {
        "fitError": fit,
        "isolation": iso,
        "gluingDelta": glue,
        "lambdaInt": burst,
        "allocated": 0.1,
        "request": 0.2,
    }


def admitted(verdict: Verdict, at: int, **values: float) -> Outcome:
    return Outcome(
        decision=Phase.ADMITTED,
        verdict=verdict,
        decided_at=T0 + timedelta(seconds=at),
        substrate="host",
        placement=("n1",),
        votes={"n1": NodeVote(yes=True, readings=readings(**values))},
    )


def rejected(verdict: Verdict, at: int, gate: str, **values: float) -> Outcome:
    return Outcome(
        decision=Phase.REJECTED,
        verdict=verdict,
        decided_at=T0 + timedelta(seconds=at),
        substrate="host",
        votes={"n1": NodeVote(yes=False, gate=gate, readings=readings(**values))},
    )


def packed_stream(n: int = 12) -> list[Outcome]:
    """Admissions under the loosest isolation: those that left less than 0.2 of slack failed."""
    stream = []
    for i in range(n):
        iso = 0.02 + 0.04 * (i % 10)
        verdict = Verdict.FALSIFIED if iso < 0.2 else Verdict.CONFIRMED
        stream.append(admitted(verdict, i, iso=iso))
    return stream


def loose() -> State:
    return State(thresholds=Thresholds(theta_iso=0.01))


def test_falsified_admissions_at_low_isolation_move_theta_iso_up_by_a_bounded_step() -> None:
    result = calibrate(loose(), packed_stream(), {}, POLICY, now=T0)
    (change,) = result.changes
    low, high = THRESHOLD_BOUNDS["theta_iso"]
    assert change.key == "thetaIso"
    assert change.before == 0.01
    assert change.after == pytest.approx(0.01 + 0.1 * (high - low))  # the step bound, 0.059
    assert result.state.thresholds.theta_iso == change.after
    assert change.by == BY_CALIBRATION
    assert change.outcomes == 12
    assert "step bounded" in change.why
    assert "falsified" in change.why


def test_rounds_converge_where_no_falsification_is_left_and_no_good_admission_lost() -> None:
    state = loose()
    path = [state.thresholds.theta_iso]
    for k in range(10):
        state = calibrate(state, packed_stream(), {}, POLICY, now=T0 + timedelta(minutes=k)).state
        path.append(state.thresholds.theta_iso)
    assert path == sorted(path)  # always toward fewer falsifications
    # the cheapest value: just above the worst failure (0.18) and at most the best success (0.22)
    assert 0.18 < path[-1] <= 0.22
    assert [c.after for c in state.history] == path[1 : len(state.history) + 1]
    final = calibrate(state, packed_stream(), {}, POLICY, now=T0 + timedelta(hours=1))
    assert final.changes == ()  # settled: nothing cheaper in bounds


def test_missed_opportunities_loosen_theta_fit() -> None:
    stream = [rejected(Verdict.MISSED_OPPORTUNITY, i, "fit", fit=0.2 + 0.01 * i) for i in range(8)]
    result = calibrate(State(thresholds=Thresholds()), stream, {}, POLICY, now=T0)
    (change,) = result.changes
    assert change.key == "thetaFit"
    assert change.after > change.before == 0.165
    assert "missed" in change.why


def test_a_no_for_a_reason_no_threshold_decides_is_never_replayed_as_a_yes() -> None:
    stale = rejected(Verdict.MISSED_OPPORTUNITY, 0, "freshness")
    assert not admitted_with(stale, Thresholds(theta_fit=0.5, theta_iso=0.01))
    full = Outcome(
        decision=Phase.REJECTED,
        verdict=Verdict.MISSED_OPPORTUNITY,
        decided_at=T0,
        votes={"n1": NodeVote(yes=False, gate="capacity", readings=readings())},
    )
    assert not admitted_with(full, Thresholds(theta_iso=0.01))
    stream = [rejected(Verdict.MISSED_OPPORTUNITY, i, "pressure") for i in range(10)]
    assert calibrate(State(thresholds=Thresholds()), stream, {}, POLICY, now=T0).changes == ()


def test_a_rejection_needs_replicas_passing_nodes_to_replay_as_an_admission() -> None:
    votes = {
        "n1": NodeVote(yes=False, gate="isolation", readings=readings(iso=0.1)),
        "n2": NodeVote(yes=False, gate="isolation", readings=readings(iso=0.12)),
        "n3": NodeVote(yes=False, gate="samples", readings=readings(iso=0.5)),
    }
    two = Outcome(Phase.REJECTED, Verdict.MISSED_OPPORTUNITY, T0, votes=votes, replicas=2)
    assert admitted_with(two, Thresholds(theta_iso=0.1))
    assert not admitted_with(two, Thresholds(theta_iso=0.11))  # only n2 passes, n3 never


def test_no_move_before_min_outcomes() -> None:
    result = calibrate(loose(), packed_stream(5), {}, POLICY, now=T0)
    assert result.changes == ()
    iso = next(a for a in result.assessments if a.key == "thetaIso")
    assert "fewer than the 6" in iso.note


def test_a_pinned_threshold_never_moves() -> None:
    pinned = set_pinned(loose(), ["thetaIso"], pinned=True)
    state = pinned
    for k in range(5):
        state = calibrate(state, packed_stream(), {}, POLICY, now=T0 + timedelta(minutes=k)).state
    assert state.thresholds.theta_iso == 0.01
    assert "thetaIso" not in {c.key for c in state.history}
    iso = next(a for a in calibrate(state, packed_stream(), {}, POLICY, now=T0).assessments
               if a.key == "thetaIso")  # fmt: skip
    assert iso.note == "pinned: never moved"
    unpinned = set_pinned(pinned, ["thetaIso"], pinned=False)
    assert unpinned.pinned == frozenset()
    (change,) = calibrate(unpinned, packed_stream(), {}, POLICY, now=T0).changes
    assert change.key == "thetaIso"


def test_pinning_an_unknown_key_names_it() -> None:
    with pytest.raises(CalibrationError, match="'minSamples' is not a calibrated threshold"):
        set_pinned(loose(), ["minSamples"], pinned=True)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(Verdict)[1:]),
            st.floats(0, 1),
            st.floats(0, 1),
            st.floats(0, 1),
            st.floats(0, 1),
            st.booleans(),
        ),
        min_size=0,
        max_size=40,
    ),
    st.integers(1, 6),
)
def test_thresholds_never_leave_their_bounds(rows: list, rounds: int) -> None:
    stream = []
    for i, (verdict, fit, iso, glue, burst, admit) in enumerate(rows):
        values = {"fit": fit, "iso": iso, "glue": glue, "burst": burst}
        if admit and verdict in (Verdict.CONFIRMED, Verdict.FALSIFIED):
            stream.append(admitted(verdict, i, **values))
        elif verdict in (Verdict.MISSED_OPPORTUNITY, Verdict.RIGHTLY_REJECTED):
            stream.append(rejected(verdict, i, "fit", **values))
    state = State(thresholds=Thresholds())
    policy = Policy(min_outcomes=1, max_step=1.0)
    for k in range(rounds):
        state = calibrate(state, stream, {}, policy, now=T0 + timedelta(minutes=k)).state
        for name, (low, high) in THRESHOLD_BOUNDS.items():
            assert low <= getattr(state.thresholds, name) <= high


def test_rollback_restores_the_thresholds_right_after_an_entry() -> None:
    state = loose()
    for k in range(3):
        state = calibrate(state, packed_stream(), {}, POLICY, now=T0 + timedelta(minutes=k)).state
    first, _, third = state.history
    back = rollback(state, first.id, T0 + timedelta(hours=1), "alice")
    assert back.thresholds.theta_iso == first.after
    entry = back.history[-1]
    assert (entry.before, entry.after, entry.by) == (third.after, first.after, BY_ROLLBACK)
    assert "entry 1 by alice" in entry.why
    # outcomes decided before the rollback no longer count, for any threshold: nothing moves
    again = calibrate(back, packed_stream(), {}, POLICY, now=T0 + timedelta(hours=2))
    assert again.changes == ()
    assert rollback(state, 0, T0, "bob").thresholds.theta_iso == 0.01
    with pytest.raises(CalibrationError, match="entry 99 is not kept"):
        rollback(state, 99, T0, "bob")


def test_an_edit_by_hand_is_recorded_and_restarts_that_thresholds_evidence() -> None:
    state = calibrate(loose(), packed_stream(), {}, POLICY, now=T0).state
    data = state.to_configmap() | {"thetaIso": "0.3"}
    edited = State.from_configmap(data, state.thresholds)
    later = T0 + timedelta(minutes=5)
    result = calibrate(edited, packed_stream(), {}, POLICY, now=later, previous=state.thresholds)
    (change,) = result.changes
    assert (change.key, change.after, change.by) == ("thetaIso", 0.3, BY_USER)
    assert result.state.evidence_since() == later


def test_the_configmap_round_trip_and_a_refused_value_is_not_overwritten() -> None:
    result = calibrate(loose(), packed_stream(), {"host": {"Falsified": 3}}, POLICY, now=T0)
    data = updated_data({"thetaIso": "0.01", "thetaFit": "banana"}, result.state, result.changes)
    assert data["thetaFit"] == "banana"  # refused by whoever reads it; not ours to rewrite
    assert float(data["thetaIso"]) == result.state.thresholds.theta_iso
    history = json.loads(data["history"])
    assert (history[0]["from"], history[0]["key"]) == (0.01, "thetaIso")
    assert json.loads(data["counters"])["host"]["falsified"] == 3
    parsed = State.from_configmap(data)
    assert parsed.history == result.state.history
    assert parsed.thresholds.theta_iso == result.state.thresholds.theta_iso


def test_garbage_pins_and_history_are_warned_about_and_never_crash() -> None:
    state = State.from_configmap({"pinned": "thetaIso,bogus", "history": "{oops", "counters": "7"})
    assert state.pinned == {"theta_iso"}
    assert state.history == ()
    assert any("bogus" in w for w in state.warnings)
    assert any("history" in w for w in state.warnings)


def test_counters_and_rates() -> None:
    counts = counters({"host": {"Falsified": 2, "Confirmed": 6, "MissedOpportunity": 1,
                                "RightlyRejected": 3, "Observing": 4}})  # fmt: skip
    assert counts["host"] == {"confirmed": 6, "falsified": 2, "missed": 1, "rightlyRejected": 3}
    assert rates(counts["host"]) == (0.25, 0.25)
    assert rates({}) == (None, None)


def test_an_outcome_row_of_the_store_is_read_with_its_votes() -> None:
    row = {
        "decision": "Admitted",
        "verdict": "Falsified",
        "decided_at": T0,
        "substrate": "host",
        "nodes": ["n1"],
        "request": {"replicas": 1},
        "readings": {"n1": {**readings(iso=0.05), "vote": "YES", "gate": None}},
    }
    outcome = Outcome.from_row(row)
    assert outcome is not None
    assert outcome.votes["n1"].readings["isolation"] == 0.05
    assert outcome.votes["n1"].yes
    assert Outcome.from_row({**row, "verdict": "Observing"}) is None


def test_capctl_calibration_shows_thresholds_rates_and_history() -> None:
    counts = {"host": {"Falsified": 1, "Confirmed": 3, "RightlyRejected": 1}}
    state = set_pinned(loose(), ["thetaFit"], pinned=True)
    state = calibrate(state, packed_stream(), counts, POLICY, now=T0).state
    text = calibration_text(state, now=T0 + timedelta(seconds=90))
    assert "thetaFit" in text
    assert "pinned" in text
    assert "25.0%" in text  # 1 of 4 admissions falsified
    assert "0.01" in text
    assert "0.059" in text
    assert "1m30s" in text or "90s" in text
    data = calibration_json(state)
    (iso,) = [t for t in data["thresholds"] if t["key"] == "thetaIso"]
    assert (iso["value"], iso["bounds"], iso["pinned"]) == (0.059, [0.01, 0.5], False)
    assert data["substrates"]["host"]["falsificationRate"] == 0.25
    assert data["history"][0]["to"] == 0.059


def test_a_split_that_does_not_hold_on_the_newer_outcomes_moves_nothing() -> None:
    """In the older half the one failure has the burstiest reading; in the newer half a success
    does: a chance split, not a cause. theta_burst stays."""
    rows = [
        (Verdict.FALSIFIED, 0.9), (Verdict.CONFIRMED, 0.35), (Verdict.CONFIRMED, 0.35),
        (Verdict.CONFIRMED, 0.35),  # older half
        (Verdict.FALSIFIED, 0.35), (Verdict.CONFIRMED, 0.9), (Verdict.CONFIRMED, 0.35),
        (Verdict.CONFIRMED, 0.35),  # newer half
    ]  # fmt: skip
    stream = [admitted(v, i, burst=b) for i, (v, b) in enumerate(rows)]
    state = State(thresholds=Thresholds(theta_burst=1.0))
    result = calibrate(state, stream, {}, POLICY, now=T0)
    (burst,) = [a for a in result.assessments if a.key == "thetaBurst"]
    assert burst.best is not None
    assert burst.best < 0.9  # over all eight, refusing the burstiest looks cheaper ...
    assert burst.moved_to is None  # ... but it does not hold on the newer four
    assert "raises the newer 4's cost 1 (1 falsified, 0 missed) to cost 1.5" in burst.note
    assert result.changes == ()


def test_a_move_that_saves_less_than_min_gain_is_not_made() -> None:
    """Six failures, four of them at the higher gluing delta: refusing it would trade those four
    for seven refused successes, cost 5.5 against 6, too little to be worth a move."""
    older = (
        [(Verdict.FALSIFIED, 0.06)] * 2
        + [(Verdict.FALSIFIED, 0.01)]
        + [(Verdict.CONFIRMED, 0.06)] * 4
        + [(Verdict.CONFIRMED, 0.01)] * 7
    )
    newer = (
        [(Verdict.FALSIFIED, 0.06)] * 2
        + [(Verdict.FALSIFIED, 0.01)]
        + [(Verdict.CONFIRMED, 0.06)] * 3
        + [(Verdict.CONFIRMED, 0.01)] * 8
    )
    stream = [admitted(v, i, glue=g) for i, (v, g) in enumerate(older + newer)]
    state = State(thresholds=Thresholds(theta_glue=0.5), pinned=frozenset({"theta_iso"}))
    result = calibrate(state, stream, {}, POLICY, now=T0)
    (glue,) = [a for a in result.assessments if a.key == "thetaGlue"]
    assert glue.moved_to is None
    assert "less than 20% of the cost" in glue.note
    assert calibrate(state, stream, {}, replace(POLICY, min_gain=0.0), now=T0).changes
