"""The measurement window: a W-sample ring per signal that drops missing readings instead of
storing them as zero, and keeps signals aligned to the same newest W samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capacity_agent.window import Window
from capacity_api.gates import WINDOW, summarize

pytestmark = pytest.mark.unit

FAST = settings(max_examples=100, deadline=None)


def test_empty_window() -> None:
    window = Window()
    assert window.size == WINDOW
    assert window.samples == len(window) == 0
    assert window.newest_time is None
    assert window.oldest_time is None
    assert window.names() == []
    assert window.series("cpu") == []
    assert window.count("cpu") == 0
    assert window.summaries() == {}


def test_series_is_oldest_first_and_capped_at_w() -> None:
    window = Window()
    for i in range(100):
        window.add(1000.0 + i, {"cpu": i / 100, "memory": 0.5})
    assert window.samples == WINDOW
    assert window.newest_time == 1099.0
    assert window.oldest_time == 1000.0 + 100 - WINDOW
    np.testing.assert_allclose(window.series("cpu"), [i / 100 for i in range(100 - WINDOW, 100)])
    assert window.count("memory") == WINDOW
    assert window.names() == ["cpu", "memory"]


def test_non_finite_values_are_dropped_not_zeroed() -> None:
    window = Window()
    for i, value in enumerate([0.8, math.nan, 0.8, math.inf, 0.8, -math.inf, 0.8]):
        window.add(float(i), {"cpu": value, "memory": 0.4})
    assert window.samples == 7
    assert window.count("cpu") == 4
    assert list(window.series("cpu")) == [0.8] * 4
    summary = window.summaries()["cpu"]
    assert (summary.mean, summary.p95, summary.max) == pytest.approx((0.8, 0.8, 0.8))


def test_non_numeric_and_absent_values_are_missing() -> None:
    window = Window()
    window.add(0.0, {"cpu": 0.5, "gpu": None})  # type: ignore[dict-item]
    window.add(1.0, {"cpu": "garbage"})  # type: ignore[dict-item]
    window.add(2.0, {})
    assert window.samples == 3
    assert window.count("cpu") == 1
    assert "gpu" not in window.names()


def test_a_signal_that_stops_reporting_ages_out() -> None:
    window = Window(size=8)
    for i in range(4):
        window.add(float(i), {"cpu": 0.1, "gpu": 0.9})
    for i in range(4, 12):
        window.add(float(i), {"cpu": 0.2, "gpu": math.nan})
    # the last 8 samples carry no gpu value: it is gone, not zero and not stale data
    assert window.count("gpu") == 0
    assert window.names() == ["cpu"]
    assert "gpu" not in window.summaries()
    assert list(window.series("cpu")) == [0.2] * 8


def test_signals_stay_aligned_in_time() -> None:
    window = Window(size=4)
    window.add(0.0, {"cpu": 0.1, "gpu": 0.5})
    window.add(1.0, {"cpu": 0.2})
    window.add(2.0, {"cpu": 0.3})
    window.add(3.0, {"cpu": 0.4})
    assert list(window.series("gpu")) == [0.5]
    window.add(4.0, {"cpu": 0.5})  # the gpu value belonged to the evicted sample
    assert window.count("gpu") == 0
    assert list(window.series("cpu")) == [0.2, 0.3, 0.4, 0.5]


def test_series_is_a_copy() -> None:
    window = Window()
    window.add(0.0, {"cpu": 0.5})
    window.series("cpu")[0] = 99.0
    assert list(window.series("cpu")) == [0.5]


def test_clear_forgets_everything() -> None:
    window = Window()
    for i in range(20):
        window.add(float(i), {"cpu": 0.3})
    window.clear()
    assert window.samples == 0
    assert window.newest_time is None
    assert window.names() == []
    window.add(50.0, {"cpu": 0.7})
    assert list(window.series("cpu")) == [0.7]
    assert window.samples == 1


def test_newest_time_is_the_last_added() -> None:
    window = Window()
    window.add(10.0, {"cpu": 0.1})
    window.add(5.0, {"cpu": 0.2})  # the wall clock stepped back
    assert window.newest_time == 5.0
    assert window.oldest_time == 10.0


@pytest.mark.parametrize("time", [math.nan, math.inf, -math.inf])
def test_non_finite_time_is_refused(time: float) -> None:
    window = Window()
    with pytest.raises(ValueError, match="finite"):
        window.add(time, {"cpu": 0.1})
    assert window.samples == 0


@pytest.mark.parametrize("size", [0, -1, True, 2.5])
def test_invalid_size_is_refused(size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        Window(size=size)  # type: ignore[arg-type]


def test_summaries_match_summarize() -> None:
    window = Window()
    rng = np.random.default_rng(3)
    for i in range(80):
        window.add(float(i), {"cpu": float(rng.uniform()), "io": float(rng.uniform())})
    summaries = window.summaries()
    assert set(summaries) == {"cpu", "io"}
    for name, summary in summaries.items():
        assert summary == summarize(window.series(name))


values = st.one_of(
    st.floats(min_value=0.0, max_value=1.0),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
samples = st.lists(
    st.dictionaries(st.sampled_from(["cpu", "memory", "gpu"]), values, max_size=3),
    max_size=3 * 16,
)


@FAST
@given(samples=samples, size=st.integers(1, 16))
def test_window_matches_a_reference_model(samples: list[dict[str, float]], size: int) -> None:
    window = Window(size=size)
    for i, signals in enumerate(samples):
        window.add(float(i), signals)
    kept = samples[-size:] if samples else []
    assert window.samples == len(kept)
    for name in ("cpu", "memory", "gpu"):
        expected = [s[name] for s in kept if name in s and math.isfinite(s[name])]
        assert list(window.series(name)) == expected
        assert window.count(name) == len(expected)
        assert (name in window.names()) == bool(expected)
        assert (name in window.summaries()) == bool(expected)
