"""The gate table capctl prints agrees with the gates the agents vote by."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capacity_api.gate_table import GATES, GateCheck, gate_checks
from capacity_api.gates import CONFIGMAP_KEYS, WINDOW, Gate, Thresholds, evaluate_fit

pytestmark = pytest.mark.unit

unit = st.floats(min_value=0.0, max_value=1.0)


def test_every_gate_names_a_reading_a_threshold_and_a_configmap_key() -> None:
    fields = {f.name for f in dataclasses.fields(Thresholds)}
    readings = evaluate_fit(
        u=[0.2] * WINDOW,
        allocated=0.0,
        request=0.1,
        samples=WINDOW,
        age_seconds=0.0,
        pressure=(),
        thresholds=Thresholds(),
    ).readings
    for spec in GATES:
        assert spec.reading in readings
        assert spec.threshold in fields
        assert spec.key == CONFIGMAP_KEYS[spec.threshold]
        assert spec.symbol == {"<=": "≤", ">=": "≥"}[spec.op]
    order = list(Gate)
    assert [order.index(s.gate) for s in GATES] == sorted(order.index(s.gate) for s in GATES)
    assert [s.key for s in GATES] == ["thetaFit", "thetaIso", "thetaGlue", "thetaBurst"]


def test_checks_pass_on_the_threshold_and_have_no_verdict_without_a_reading() -> None:
    t = Thresholds()
    checks = gate_checks({"fitError": t.theta_fit, "isolation": t.theta_iso - 0.01}, t)
    assert [c.passed for c in checks] == [True, False, None, None]
    assert checks[0] == GateCheck(GATES[0], t.theta_fit, t.theta_fit)
    assert gate_checks(None, t)[0].value is None
    assert not GATES[0].passes(float("nan"), 1.0)
    assert not GATES[1].passes(float("nan"), 0.0)


@settings(max_examples=150, deadline=None)
@given(
    u=st.lists(unit, min_size=WINDOW, max_size=WINDOW),
    allocated=unit,
    request=st.floats(min_value=0.01, max_value=1.0),
)
def test_the_first_failing_check_is_the_gate_the_vote_names(
    u: list[float], allocated: float, request: float
) -> None:
    thresholds = Thresholds()
    decision = evaluate_fit(
        u=u,
        allocated=allocated,
        request=request,
        samples=WINDOW,
        age_seconds=0.0,
        pressure=(),
        thresholds=thresholds,
    )
    if decision.gate == Gate.CAPACITY.value:
        return  # decided before the threshold gates
    failed = [c.gate.gate.value for c in gate_checks(decision.readings, thresholds) if not c.passed]
    assert (failed[0] if failed else None) == decision.gate
    assert all(c.passed is not None for c in gate_checks(decision.readings, thresholds))
