"""The gate math is plain Python so that the node agent never imports numpy (about 12 MiB of its
RSS). These tests hold it to numpy: every reading equals what the numpy formulas give, to within
1e-9, on any series; means and percentiles equal numpy's to the last bit. numpy stays a test
dependency for this."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capacity_api import gates
from capacity_api.gates import BINS, FLAT_TOLERANCE, UPPER_BINS, WINDOW

pytestmark = pytest.mark.unit

FAST = settings(max_examples=300, deadline=None)
TOLERANCE = 1e-9

FloatArray = npt.NDArray[np.float64]

any_float = st.floats(allow_nan=True, allow_infinity=True)
unit_float = st.floats(min_value=0.0, max_value=1.0)
# Loads as measured (in [0, 1]), arbitrary floats (cleaned first), nearly flat windows (whose
# spectrum is ill-conditioned: the mean removed decides it), short and long windows.
any_series = st.one_of(
    st.lists(unit_float, max_size=2 * WINDOW + 8),
    st.lists(any_float, max_size=2 * WINDOW + 8),
    st.builds(
        lambda level, noise: [level + v for v in noise],
        unit_float,
        st.lists(st.floats(-1e-7, 1e-7), min_size=2, max_size=WINDOW),
    ),
    st.lists(st.sampled_from([0.0, 1.0, math.nan, math.inf, 0.5]), max_size=WINDOW),
)
natural_series = st.lists(any_float, max_size=300)  # signals in natural units: not clipped


# ---------------------------------------------------------------------------------------------
# The formulas in numpy


def np_finite(values: Any) -> FloatArray:
    array = np.asarray(values, dtype=np.float64).ravel()
    finite: FloatArray = array[np.isfinite(array)]
    return finite


def np_clean(u: Any) -> FloatArray:
    clipped: FloatArray = np.clip(np_finite(u), 0.0, 1.0)
    return clipped


def np_summary(values: Any) -> tuple[float, float, float] | None:
    x = np_finite(values)
    if x.size == 0:
        return None
    low, high = float(x.min()), float(x.max())
    with np.errstate(all="ignore"):
        mean = float(np.mean(x))
        p95 = float(np.percentile(x, 95))
    if not math.isfinite(mean):
        scale = max(abs(low), abs(high))
        mean = scale * float(np.mean(x / scale))
    if not math.isfinite(p95):
        p95 = float(np.percentile(x, 95, method="higher"))
    return min(high, max(low, mean)), min(high, max(low, p95)), high


def np_power(u: Any) -> FloatArray:
    x = np_clean(u)[-WINDOW:]
    if x.size < 2 or float(np.ptp(x)) <= FLAT_TOLERANCE:
        return np.zeros(BINS, dtype=np.float64)
    padded = np.zeros(WINDOW, dtype=np.float64)
    padded[: x.size] = x - np.mean(x)
    power: FloatArray = np.abs(np.fft.rfft(padded)) ** 2
    return power[1 : BINS + 1]


def np_spectrum(u: Any) -> tuple[FloatArray, float, float, float]:
    power = np_power(u)
    total = float(np.sum(power))
    if not total > 0.0:
        return np.zeros(BINS, dtype=np.float64), 0.0, 0.0, 0.0
    f: FloatArray = np.clip(power / total, 0.0, 1.0)
    p = f[f > 0.0]
    entropy = min(1.0, max(0.0, float(-np.sum(p * np.log(p))) / math.log(BINS)))
    lambda_int = min(1.0, float(np.sum(power[BINS - UPPER_BINS :])) / total)
    return f, min(1.0, float(np.max(power)) / total), lambda_int, entropy


def np_gluing(u: Any) -> float:
    x = np_clean(u)
    if x.size < 2:
        return 0.0
    quarter = max(1, x.size // 4)
    return min(1.0, abs(float(np.mean(x[-quarter:])) - float(np.mean(x[:quarter]))))


def np_cosine(a: Any, b: Any) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    x = np.where(np.isfinite(x) & (x > 0.0), x, 0.0)
    y = np.where(np.isfinite(y) & (y > 0.0), y, 0.0)
    if x.size == 0 or not (np.max(x) > 0.0 and np.max(y) > 0.0):
        return 0.0
    x, y = x / np.max(x), y / np.max(y)
    norms = float(np.linalg.norm(x)) * float(np.linalg.norm(y))
    return min(1.0, max(0.0, float(np.dot(x, y)) / norms))


# ---------------------------------------------------------------------------------------------
# Equal to numpy


@FAST
@given(u=any_series)
def test_spectrum_equals_numpy(u: list[float]) -> None:
    f, lambda1, lambda_int, entropy = np_spectrum(u)
    s = gates.spectrum(u)
    np.testing.assert_allclose(gates.power_spectrum(u), np_power(u), rtol=1e-12, atol=TOLERANCE)
    np.testing.assert_allclose(s.fingerprint, f, rtol=0.0, atol=TOLERANCE)
    assert s.lambda1 == pytest.approx(lambda1, rel=0.0, abs=TOLERANCE)
    assert s.lambda_int == pytest.approx(lambda_int, rel=0.0, abs=TOLERANCE)
    assert s.entropy == pytest.approx(entropy, rel=0.0, abs=TOLERANCE)


@FAST
@given(u=any_series)
def test_load_readings_equal_numpy_exactly(u: list[float]) -> None:
    x = np_clean(u)
    assert gates.clean_series(u) == list(x)
    assert gates.load_p95(u) == (float(np.percentile(x, 95)) if x.size else 1.0)
    assert gates.gluing_delta(u) == np_gluing(u)


@FAST
@given(values=natural_series)
def test_summary_equals_numpy_exactly(values: list[float]) -> None:
    expected = np_summary(values)
    summary = gates.summarize(values)
    if expected is None:
        assert summary is None
        return
    assert summary is not None
    assert (summary.mean, summary.p95, summary.max) == expected


def test_sums_in_numpy_order() -> None:
    rng = np.random.default_rng(7)
    for n in [*range(20), 63, 64, 65, 127, 128, 129, 200, 257, 1000]:
        x = rng.uniform(-1.0, 1.0, n) * 10.0 ** rng.integers(-6, 6, n)
        assert gates._sum(list(x)) == float(np.sum(x)), n
    with np.errstate(over="ignore"):
        huge = [1e308, 1e308, -1e308, 5.0]
        assert gates._sum(huge) == float(np.sum(huge)) == math.inf


@pytest.mark.parametrize("seed", range(16))
def test_random_windows_equal_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 2 * WINDOW))
    level, width = rng.uniform(0.0, 1.0), 10.0 ** rng.uniform(-8, 0)
    u = np.clip(level + width * rng.standard_normal(n), 0.0, 1.0)
    f, lambda1, lambda_int, entropy = np_spectrum(u)
    s = gates.spectrum(u)
    np.testing.assert_allclose(s.fingerprint, f, rtol=0.0, atol=TOLERANCE)
    assert (s.lambda1, s.lambda_int, s.entropy) == pytest.approx(
        (lambda1, lambda_int, entropy), rel=0.0, abs=TOLERANCE
    )
    reading = gates.gate_reading(u, allocated=0.25)
    assert reading.gluing_delta == np_gluing(u)
    assert reading.headroom == min(0.75, max(0.0, 1.0 - float(np.percentile(u, 95))))


@FAST
@given(
    a=st.lists(any_float, min_size=BINS, max_size=BINS),
    b=st.lists(any_float, min_size=BINS, max_size=BINS),
)
def test_cosine_equals_numpy(a: list[float], b: list[float]) -> None:
    assert gates.cosine_similarity(a, b) == pytest.approx(np_cosine(a, b), rel=0.0, abs=TOLERANCE)


@FAST
@given(u=any_series, v=any_series)
def test_cosine_of_fingerprints_equals_numpy(u: list[float], v: list[float]) -> None:
    f, g = gates.fingerprint(u), gates.fingerprint(v)
    assert gates.cosine_similarity(f, g) == pytest.approx(np_cosine(f, g), rel=0.0, abs=TOLERANCE)


# ---------------------------------------------------------------------------------------------
# The agent does not load numpy


def test_the_agent_imports_neither_numpy_nor_psutil() -> None:
    code = (
        "import sys, capacity_agent.__main__; "
        "print(sorted({'numpy', 'psutil'} & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
