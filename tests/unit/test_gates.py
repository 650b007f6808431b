"""Gate math (DESIGN section 4): readings stay in [0, 1], degenerate series are defined, the
spectrum tells periodic, bursty and noisy loads apart, and a vote names its failing gate."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from capacity_api.gates import (
    BINS,
    CONFIGMAP_KEYS,
    THRESHOLD_BOUNDS,
    WINDOW,
    Decision,
    Gate,
    Thresholds,
    clean_series,
    cosine_similarity,
    evaluate_fit,
    fingerprint,
    fit_error,
    gate_reading,
    gluing_delta,
    headroom,
    isolation,
    lambda1,
    lambda_int,
    load_p95,
    power_spectrum,
    spectral_entropy,
    spectrum,
    summarize,
)
from capacity_api.models import GateReading

pytestmark = pytest.mark.unit

FAST = settings(max_examples=150, deadline=None)

any_float = st.floats(allow_nan=True, allow_infinity=True)
unit_float = st.floats(min_value=0.0, max_value=1.0)
# Arbitrary series: NaN, ±inf, huge and tiny values, empty, one sample, constant, longer than W.
any_series = st.one_of(
    st.lists(any_float, max_size=2 * WINDOW + 8),
    st.lists(unit_float, min_size=0, max_size=2),
    st.builds(lambda c, n: [c] * n, any_float, st.integers(0, 2 * WINDOW)),
    st.lists(st.sampled_from([0.0, 1.0, math.nan, math.inf, -math.inf, 0.5]), max_size=WINDOW),
)
load_series = st.lists(unit_float, min_size=0, max_size=WINDOW)

T = np.arange(WINDOW)


def sine(period: float, n: int = WINDOW) -> npt.NDArray[np.float64]:
    wave: npt.NDArray[np.float64] = 0.5 + 0.4 * np.sin(2 * np.pi * np.arange(n) / period)
    return wave


def alternating(low: float = 0.0, high: float = 1.0, n: int = WINDOW) -> list[float]:
    return [high if i % 2 else low for i in range(n)]


def in_unit(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------------
# Every reading is defined and in [0, 1]


@FAST
@given(u=any_series, allocated=any_float)
def test_every_reading_is_in_unit_interval(u: list[float], allocated: float) -> None:
    reading = gate_reading(u, allocated)
    assert isinstance(reading, GateReading)
    for name, value in reading.model_dump().items():
        assert in_unit(value), (name, value)
    s = spectrum(u)
    for value in (s.lambda1, s.lambda_int, s.entropy, gluing_delta(u), load_p95(u)):
        assert in_unit(value)
    assert len(s.fingerprint) == BINS
    assert all(in_unit(float(v)) for v in s.fingerprint)
    total = float(np.sum(s.fingerprint))
    assert total == 0.0 or total == pytest.approx(1.0)
    power = power_spectrum(u)
    assert len(power) == BINS
    assert np.all(np.isfinite(power))
    assert all(p >= 0.0 for p in power)


@FAST
@given(u=any_series)
def test_readings_derive_from_the_fingerprint(u: list[float]) -> None:
    s = spectrum(u)
    f = fingerprint(u)
    np.testing.assert_allclose(s.fingerprint, f)
    assert s.lambda1 == pytest.approx(float(np.max(f)), abs=1e-9)
    assert s.lambda_int == pytest.approx(float(np.sum(f[BINS // 2 :])), abs=1e-9)
    assert (lambda1(u), lambda_int(u), spectral_entropy(u)) == (s.lambda1, s.lambda_int, s.entropy)


@FAST
@given(c=any_float, n=st.integers(0, 2 * WINDOW))
def test_constant_series_is_neither_periodic_nor_bursty(c: float, n: int) -> None:
    u = [c] * n
    s = spectrum(u)
    assert (s.lambda1, s.lambda_int, s.entropy) == (0.0, 0.0, 0.0)
    assert not np.any(s.fingerprint)
    assert not np.any(power_spectrum(u))
    assert gluing_delta(u) == 0.0


@pytest.mark.parametrize(
    "u",
    [[], [0.4], [math.nan], [math.nan, math.inf, -math.inf], [0.3, math.nan], [0.7] * WINDOW],
    ids=["empty", "one", "nan", "non-finite", "one-finite", "constant"],
)
def test_degenerate_series_are_flat(u: list[float]) -> None:
    s = spectrum(u)
    assert (s.lambda1, s.lambda_int, s.entropy) == (0.0, 0.0, 0.0)
    assert gluing_delta(u) == 0.0
    assert cosine_similarity(s.fingerprint, s.fingerprint) == 0.0


def test_flat_up_to_float_noise_is_flat() -> None:
    u = 0.3 + 1e-12 * np.random.default_rng(0).standard_normal(WINDOW)
    assert spectral_entropy(u) == 0.0
    assert lambda_int(u) == 0.0


def test_missing_load_reads_as_full_never_as_zero() -> None:
    assert load_p95([]) == 1.0
    assert load_p95([math.nan] * WINDOW) == 1.0
    reading = gate_reading([math.nan] * WINDOW, allocated=0.0)
    assert reading.headroom == 0.0


def test_non_finite_values_are_dropped_not_zeroed() -> None:
    u = [0.8, math.nan, 0.8, math.inf, 0.8, -math.inf] * 8
    assert load_p95(u) == pytest.approx(0.8)
    assert list(clean_series(u)) == [0.8] * 24
    assert spectral_entropy(u) == 0.0  # the dropped values do not make the series look bursty


# ---------------------------------------------------------------------------------------------
# Room: headroom, fit_error, isolation


@FAST
@given(p95=unit_float, allocated=unit_float)
def test_headroom_matches_the_formula(p95: float, allocated: float) -> None:
    assert headroom(p95, allocated) == min(1 - allocated, max(0.0, 1 - p95))


@FAST
@given(p95=any_float, allocated=any_float, request=any_float)
def test_room_readings_are_in_unit_interval(p95: float, allocated: float, request: float) -> None:
    assert in_unit(headroom(p95, allocated))
    assert in_unit(fit_error(request, p95))
    assert in_unit(isolation(request, allocated))


@pytest.mark.parametrize(
    ("p95", "allocated", "expected"),
    [
        (0.2, 0.1, 0.8),
        (0.2, 0.5, 0.5),
        (1.5, 0.0, 0.0),  # over-full measurement clamps to full
        (-1.0, 0.0, 1.0),
        (0.0, 2.0, 0.0),
        (math.nan, 0.0, 0.0),  # unknown load is the worst case
        (0.0, math.nan, 0.0),  # unknown allocation is the worst case
    ],
)
def test_headroom_clamps(p95: float, allocated: float, expected: float) -> None:
    assert headroom(p95, allocated) == pytest.approx(expected)


@FAST
@given(request=st.floats(min_value=1e-6, max_value=1.0), p95=unit_float)
def test_fit_error_matches_the_formula(request: float, p95: float) -> None:
    expected = max(0.0, request - max(0.0, 1 - p95)) / request
    assert fit_error(request, p95) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("r", [0.0, -0.5, -math.inf])
def test_fit_error_of_no_request_is_zero(r: float) -> None:
    assert fit_error(r, 0.99) == 0.0


@FAST
@given(r1=any_float, r2=any_float, p95=any_float, allocated=any_float)
def test_fit_error_grows_and_isolation_shrinks_with_the_request(
    r1: float, r2: float, p95: float, allocated: float
) -> None:
    assume(not math.isnan(r1) and not math.isnan(r2))
    small, large = sorted((r1, r2))
    assert fit_error(small, p95) <= fit_error(large, p95)
    assert isolation(small, allocated) >= isolation(large, allocated)


def test_isolation_and_fit_error_values() -> None:
    assert isolation(0.3, 0.5) == pytest.approx(0.2)
    assert isolation(0.6, 0.5) == 0.0
    assert fit_error(0.4, 0.8) == pytest.approx(0.5)  # room 0.2 of a 0.4 request
    assert fit_error(0.1, 0.8) == 0.0


# ---------------------------------------------------------------------------------------------
# Drift and spectrum


def test_gluing_delta_compares_newest_and_oldest_quarter() -> None:
    assert gluing_delta([0.0] * 48 + [1.0] * 16) == pytest.approx(1.0)
    assert gluing_delta([0.2] * 16 + [0.9] * 32 + [0.4] * 16) == pytest.approx(0.2)
    assert gluing_delta([0.1, 0.5]) == pytest.approx(0.4)  # quarter of 2 samples is 1
    assert gluing_delta([0.1, 0.5, 0.3]) == pytest.approx(0.2)


def test_sine_is_periodic_and_not_bursty() -> None:
    u = sine(16)
    assert lambda1(u) > 0.95
    assert lambda_int(u) < 0.05
    assert spectral_entropy(u) < 0.1
    off_grid = sine(10)  # period not a divisor of W: leakage, still one dominant tone
    assert lambda1(off_grid) > 0.5
    assert lambda_int(off_grid) < 0.1


def test_alternating_series_is_bursty() -> None:
    assert lambda_int(alternating()) > 0.95
    assert lambda_int(alternating(0.2, 0.3)) > 0.95
    assert lambda_int([-1.0, 1.0] * 32) > 0.95  # clipped to 0/1, still alternating


@pytest.mark.parametrize("seed", range(8))
def test_white_noise_has_high_entropy(seed: int) -> None:
    u = np.random.default_rng(seed).uniform(0.0, 1.0, WINDOW)
    assert spectral_entropy(u) > 0.75
    assert lambda1(u) < 0.3
    assert spectral_entropy(u) > spectral_entropy(sine(16)) + 0.5


def test_short_window_keeps_the_frequency_axis() -> None:
    long = fingerprint(sine(8))
    short = fingerprint(sine(8, n=32))
    assert len(short) == BINS
    assert int(np.argmax(short)) == int(np.argmax(long)) == WINDOW // 8 - 1
    assert cosine_similarity(long, short) > 0.8


def test_long_series_uses_the_newest_window() -> None:
    u = np.concatenate([alternating(), sine(16)])
    np.testing.assert_allclose(power_spectrum(u), power_spectrum(sine(16)))


# ---------------------------------------------------------------------------------------------
# Cosine similarity


@FAST
@given(
    a=st.lists(any_float, min_size=BINS, max_size=BINS),
    b=st.lists(any_float, min_size=BINS, max_size=BINS),
)
def test_cosine_is_in_unit_interval_and_symmetric(a: list[float], b: list[float]) -> None:
    value = cosine_similarity(a, b)
    assert in_unit(value)
    assert value == pytest.approx(cosine_similarity(b, a))


@FAST
@given(u=load_series)
def test_cosine_of_a_fingerprint_with_itself(u: list[float]) -> None:
    f = fingerprint(u)
    expected = 1.0 if np.any(f) else 0.0
    assert cosine_similarity(f, f) == pytest.approx(expected)


def test_cosine_values() -> None:
    one_hot = np.eye(BINS)
    assert cosine_similarity(one_hot[0], one_hot[1]) == 0.0
    assert cosine_similarity(np.zeros(BINS), np.zeros(BINS)) == 0.0
    assert cosine_similarity([], []) == 0.0
    assert cosine_similarity([1.0, 1.0], [1.0, 0.0]) == pytest.approx(math.sqrt(0.5))
    assert cosine_similarity(fingerprint(sine(16)), fingerprint(alternating())) < 0.05
    with pytest.raises(ValueError, match="differ in length"):
        cosine_similarity([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# Summaries


@FAST
@given(values=st.lists(any_float, max_size=2 * WINDOW))
def test_summary_is_over_the_finite_values(values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    summary = summarize(values)
    if not finite:
        assert summary is None
        return
    assert summary is not None
    assert summary.max == max(finite)
    assert min(finite) <= summary.mean <= summary.max
    assert min(finite) <= summary.p95 <= summary.max
    assert all(math.isfinite(v) for v in (summary.mean, summary.p95, summary.max))


def test_summary_values() -> None:
    summary = summarize([float(i) for i in range(1, 101)] + [math.nan])
    assert summary is not None
    assert summary.mean == pytest.approx(50.5)
    assert summary.p95 == pytest.approx(95.05)
    assert summary.max == 100.0
    assert summarize([]) is None
    assert summarize([math.inf, math.nan]) is None


# ---------------------------------------------------------------------------------------------
# Thresholds and the calibration ConfigMap


def test_threshold_defaults() -> None:
    t = Thresholds()
    assert (t.theta_fit, t.theta_iso, t.theta_glue, t.theta_burst) == (0.165, 0.15, 0.10, 0.60)
    assert (t.min_samples, t.max_age_seconds) == (16, 30.0)
    assert THRESHOLD_BOUNDS["theta_fit"] == (0.05, 0.50)
    assert THRESHOLD_BOUNDS["theta_iso"] == (0.01, 0.50)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.theta_fit = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [("theta_fit", 0.6), ("theta_fit", 0.01), ("theta_iso", math.nan), ("min_samples", 65)],
)
def test_thresholds_refuse_out_of_bounds(field: str, value: float) -> None:
    changes: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        Thresholds(**changes)
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(Thresholds(), **changes)


def test_min_samples_must_be_an_int() -> None:
    with pytest.raises(TypeError):
        Thresholds(min_samples=16.0)  # type: ignore[arg-type]


def test_configmap_missing_keys_are_defaults() -> None:
    assert Thresholds.from_configmap({}) == (Thresholds(), ())
    assert Thresholds.from_configmap(None) == (Thresholds(), ())
    thresholds, warnings = Thresholds.from_configmap({"history": "[]", "falsified.host": "3"})
    assert thresholds == Thresholds()
    assert warnings == ()


def test_configmap_values_are_parsed() -> None:
    data = {
        "thetaFit": "0.2",
        "thetaIso": " 0.05 ",
        "thetaGlue": "0.12",
        "thetaBurst": "0.7",
        "minSamples": "32",
        "maxAgeSeconds": "60",
    }
    thresholds, warnings = Thresholds.from_configmap(data)
    assert warnings == ()
    assert thresholds == Thresholds(0.2, 0.05, 0.12, 0.7, 32, 60.0)


@pytest.mark.parametrize(
    ("key", "raw", "field", "expected"),
    [
        ("thetaFit", "0.9", "theta_fit", 0.50),
        ("thetaFit", "0", "theta_fit", 0.05),
        ("thetaIso", "-1", "theta_iso", 0.01),
        ("thetaIso", "0.75", "theta_iso", 0.50),
        ("minSamples", "1000", "min_samples", WINDOW),
        ("maxAgeSeconds", "0", "max_age_seconds", 1.0),
    ],
)
def test_configmap_clamps_to_bounds(key: str, raw: str, field: str, expected: float) -> None:
    thresholds, warnings = Thresholds.from_configmap({key: raw})
    assert getattr(thresholds, field) == expected
    assert len(warnings) == 1
    assert key in warnings[0]
    assert "clamped" in warnings[0]


@pytest.mark.parametrize(
    ("key", "raw", "field"),
    [
        ("thetaFit", "abc", "theta_fit"),
        ("thetaFit", "nan", "theta_fit"),
        ("thetaIso", "inf", "theta_iso"),
        ("thetaGlue", "", "theta_glue"),
        ("thetaBurst", "0.6.1", "theta_burst"),
        ("minSamples", "16.5", "min_samples"),
        ("minSamples", "sixteen", "min_samples"),
        ("maxAgeSeconds", "30s", "max_age_seconds"),
    ],
)
def test_configmap_garbage_takes_the_default(key: str, raw: str, field: str) -> None:
    thresholds, warnings = Thresholds.from_configmap({key: raw})
    assert getattr(thresholds, field) == getattr(Thresholds(), field)
    assert len(warnings) == 1
    assert key in warnings[0]
    assert repr(raw) in warnings[0]
    assert "default" in warnings[0]


def test_configmap_garbage_keeps_the_last_good_value_and_names_the_key() -> None:
    good, _ = Thresholds.from_configmap({"thetaIso": "0.4", "thetaFit": "0.2"})
    edited = {"thetaIso": "banana", "thetaFit": "0.3"}
    thresholds, warnings = Thresholds.from_configmap(edited, good)
    assert thresholds.theta_iso == 0.4  # refused: the last good value stays in force
    assert thresholds.theta_fit == 0.3  # the valid key still takes effect
    (warning,) = warnings
    assert warning.startswith("thetaIso: 'banana' is not a finite number; refused")
    assert "keeping the last good value 0.4" in warning


@FAST
@given(
    st.builds(
        Thresholds,
        theta_fit=st.floats(*THRESHOLD_BOUNDS["theta_fit"]),
        theta_iso=st.floats(*THRESHOLD_BOUNDS["theta_iso"]),
        theta_glue=st.floats(*THRESHOLD_BOUNDS["theta_glue"]),
        theta_burst=st.floats(*THRESHOLD_BOUNDS["theta_burst"]),
        min_samples=st.integers(*(int(b) for b in THRESHOLD_BOUNDS["min_samples"])),
        max_age_seconds=st.floats(*THRESHOLD_BOUNDS["max_age_seconds"]),
    )
)
def test_configmap_round_trip(thresholds: Thresholds) -> None:
    data = thresholds.to_configmap()
    assert set(data) == set(CONFIGMAP_KEYS.values())
    assert all(isinstance(v, str) for v in data.values())
    assert Thresholds.from_configmap(data) == (thresholds, ())


@FAST
@given(st.dictionaries(st.sampled_from(sorted(CONFIGMAP_KEYS.values())), st.text(max_size=12)))
def test_configmap_never_raises(data: dict[str, str]) -> None:
    thresholds, warnings = Thresholds.from_configmap(data)
    assert isinstance(thresholds, Thresholds)
    assert len(warnings) <= len(data)


# ---------------------------------------------------------------------------------------------
# The vote

QUIET = list(0.2 + 0.02 * np.sin(2 * np.pi * T / 32))  # low, steady, slowly varying load
BASE: dict[str, Any] = {
    "u": QUIET,
    "allocated": 0.3,
    "request": 0.3,
    "samples": WINDOW,
    "age_seconds": 5.0,
    "pressure": (),
    "thresholds": Thresholds(),
}


def vote(**changes: Any) -> Decision:
    return evaluate_fit(**{**BASE, **changes})


def test_quiet_node_votes_yes() -> None:
    decision = vote()
    assert decision.yes, decision.reason
    assert decision.gate is None
    assert decision.reason.startswith("fits:")
    assert set(decision.readings) == {
        "headroom",
        "fitError",
        "isolation",
        "gluingDelta",
        "lambda1",
        "lambdaInt",
        "entropy",
        "allocated",
        "request",
        "p95",
    }
    assert decision.readings["isolation"] == pytest.approx(0.4)
    assert decision.readings["fitError"] == 0.0


@pytest.mark.parametrize(
    ("changes", "gate", "reason"),
    [
        ({"samples": 15}, Gate.SAMPLES, "window has 15 samples, fewer than minSamples 16"),
        ({"u": QUIET[:10]}, Gate.SAMPLES, "window has 10 samples, fewer than minSamples 16"),
        ({"u": [math.nan] * WINDOW}, Gate.SAMPLES, "window has 0 samples"),
        ({"age_seconds": 30.5}, Gate.FRESHNESS, "30.5 s old, older than maxAgeSeconds 30"),
        ({"age_seconds": math.nan}, Gate.FRESHNESS, "older than maxAgeSeconds 30"),
        (
            {"allocated": 0.7, "request": 0.4},
            Gate.CAPACITY,
            "allocated 0.70 + request 0.40 exceeds capacity",
        ),
        ({"allocated": 0.3, "request": 1.2}, Gate.CAPACITY, "exceeds capacity"),
        ({"allocated": math.nan}, Gate.CAPACITY, "allocated nan"),
        ({"u": [0.95] * WINDOW}, Gate.FIT, "fit_error 0.83 > theta_fit 0.165"),
        ({"allocated": 0.5, "request": 0.4}, Gate.ISOLATION, "isolation 0.10 < theta_iso 0.15"),
        (
            {"u": list(np.linspace(0.1, 0.4, WINDOW))},
            Gate.GLUING,
            "gluing_delta 0.23 > theta_glue 0.1",
        ),
        ({"u": alternating(0.2, 0.3)}, Gate.BURST, "lambda_int 1.00 > theta_burst 0.6"),
        ({"pressure": ["MemoryPressure"]}, Gate.PRESSURE, "pressure condition set: MemoryPressure"),
        ({"pressure": "CPUPressure"}, Gate.PRESSURE, "pressure condition set: CPUPressure"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_vote_names_the_failing_gate(changes: dict[str, Any], gate: Gate, reason: str) -> None:
    decision = vote(**changes)
    assert not decision.yes
    assert decision.gate == gate
    assert reason in decision.reason
    assert all(in_unit(v) for v in decision.readings.values())


def test_first_failing_gate_is_reported() -> None:
    decision = vote(samples=3, age_seconds=100.0, allocated=0.9, pressure=["IOPressure"])
    assert decision.gate == Gate.SAMPLES
    decision = vote(age_seconds=100.0, allocated=0.9, pressure=["IOPressure"])
    assert decision.gate == Gate.FRESHNESS
    decision = vote(allocated=0.9, pressure=["IOPressure"])
    assert decision.gate == Gate.CAPACITY


def test_thresholds_are_inclusive_and_respected() -> None:
    # isolation exactly at theta_iso passes; just below fails, and the reason shows the gap.
    assert vote(allocated=0.25, request=0.5, thresholds=Thresholds(theta_iso=0.25)).yes
    tight = Thresholds(theta_iso=0.25)
    decision = vote(allocated=0.2501, request=0.5, thresholds=tight)
    assert decision.gate == Gate.ISOLATION
    assert "isolation 0.2499 < theta_iso 0.25" in decision.reason
    # a looser calibrated threshold admits what the default refuses
    assert vote(u=[0.95] * WINDOW).gate == Gate.FIT
    loose = Thresholds(theta_fit=0.5)
    assert vote(u=[0.95] * WINDOW, request=0.1, thresholds=loose).yes


def test_exact_fit_is_allowed_and_float_overshoot_is_not() -> None:
    relaxed = Thresholds(theta_iso=0.01)
    assert vote(allocated=0.5, request=0.5, thresholds=relaxed).gate == Gate.ISOLATION
    over = 0.5 + 2**-52  # 0.5 + over = 1.0000000000000002 exactly: no tolerance
    assert vote(allocated=0.5, request=over, thresholds=relaxed).gate == Gate.CAPACITY
    assert vote(allocated=0.6, request=0.4, thresholds=relaxed).gate == Gate.ISOLATION


def test_empty_pressure_names_are_ignored() -> None:
    assert vote(pressure=["", ""]).yes


@FAST
@given(
    u=any_series,
    allocated=any_float,
    request=any_float,
    samples=st.integers(-5, 2 * WINDOW),
    age=any_float,
    pressure=st.lists(st.sampled_from(["", "MemoryPressure", "CPUPressure"]), max_size=2),
)
def test_vote_is_always_defined(
    *,
    u: list[float],
    allocated: float,
    request: float,
    samples: int,
    age: float,
    pressure: Sequence[str],
) -> None:
    decision = evaluate_fit(
        u=u,
        allocated=allocated,
        request=request,
        samples=samples,
        age_seconds=age,
        pressure=pressure,
        thresholds=Thresholds(),
    )
    assert all(in_unit(v) for v in decision.readings.values())
    assert decision.reason
    assert (decision.gate is None) == decision.yes
    if decision.yes:
        assert allocated + request <= 1.0
        assert decision.readings["fitError"] <= 0.165
        assert decision.readings["isolation"] >= 0.15
        assert not any(pressure)
