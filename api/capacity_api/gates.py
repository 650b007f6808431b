"""Gate math of DESIGN section 4, as pure functions.

Let u be a substrate's load series in [0, 1] (its worst dimension), a the allocated fraction of the
node's substrate (the ledger of admitted claims and live reservations) and r the requested fraction.
The readings, all in [0, 1], are:

- ``headroom = min(1 - a, max(0, 1 - p95(u)))``: ranks nodes for placement;
- ``fit_error(r) = max(0, r - max(0, 1 - p95(u))) / r``: the share of the request the measured
  peak leaves no room for;
- ``isolation(r) = max(0, 1 - a - r)``: promised slack left around the workload;
- ``gluing_delta = |mean(newest W/4) - mean(oldest W/4)|``: drift inside the window;
- the spectrum ``P = |rfft(u - mean(u))|²`` without the DC bin (32 bins), its fingerprint
  ``P / sum(P)``, ``lambda1 = max(P) / sum(P)`` (periodicity), ``lambda_int`` = upper 16 bins over
  ``sum(P)`` (burstiness) and the normalised Shannon entropy of the fingerprint.

Degenerate inputs are defined, never NaN and never an exception:

- Every series is cleaned first: non-finite values (NaN, ±inf) are dropped, the rest is clipped to
  [0, 1]. A dropped value is a missing reading, never a zero load.
- Scalar inputs (p95, a, r) are clipped to [0, 1]; a NaN is read as the worst case, 1.0 (a missing
  measurement or allocation is never read as zero load).
- A series without any finite value has p95 = 1.0 in the gates (full load, so headroom 0 and
  fit_error 1): an empty window can only make a node look full, never empty.
- Flat series have no spectrum: an empty series, one sample, or a series whose peak-to-peak range is
  at most :data:`FLAT_TOLERANCE` gives ``P = 0`` in every bin, an all-zero fingerprint, and
  ``lambda1 = lambda_int = entropy = 0``. A flat node is neither periodic nor bursty, and every
  derived reading is a function of the fingerprint alone (``lambda1 = max(f)``,
  ``lambda_int = sum(f[16:])``, ``entropy = H(f) / log 32`` with ``H(0) = 0``). The cosine
  similarity of an all-zero fingerprint with anything, itself included, is 0.0: a flat series has no
  shape to compare.
- Windows shorter than W = 64 are zero-padded (after removing their mean) to 64 samples, so the
  spectrum always has 32 bins on the same frequency axis (bin k = k / 64 cycles per sample) and the
  fingerprints of short and full windows are comparable; padding smooths a short spectrum, it does
  not shift it. Series longer than W use their newest 64 samples.
- ``gluing_delta`` of fewer than 2 samples is 0.0 (no drift can be seen); the quarter is
  ``max(1, len // 4)`` samples. ``minSamples`` is what stops a short window from voting.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from functools import reduce
from operator import add
from typing import Any, NamedTuple

from capacity_api.models import GateReading, SignalSummary

WINDOW = 64
"""Samples per signal in the measurement window (W)."""
BINS = 32
"""Bins of the power spectrum and the fingerprint: rfft of W samples without its DC bin."""
UPPER_BINS = BINS // 2
"""The upper half of the spectrum whose share of the power is lambda_int."""
FLAT_TOLERANCE = 1e-9
"""A series whose peak-to-peak range is at most this (in load units) is flat: it has no spectrum."""
CALIBRATION_CONFIGMAP = "capacity-calibration"
"""Name of the ConfigMap (in the platform namespace) that holds the calibrated thresholds."""
P95 = 0.95
"""The quantile of the p95 readings."""

Series = Collection[float]
"""A load or signal series, oldest sample first: a list, tuple or deque of floats, or a 1-D numpy
array (accepted, never required)."""

_LOG_BINS = math.log(BINS)
_SUM_BLOCK = 128
"""numpy's pairwise summation block (see :func:`_sum`)."""
_COS = tuple(math.cos(math.tau * m / WINDOW) for m in range(WINDOW))
_SIN = tuple(math.sin(math.tau * m / WINDOW) for m in range(WINDOW))
_PHASES = tuple(tuple(j * k % WINDOW for j in range(WINDOW)) for k in range(BINS + 1))
"""``_PHASES[k][j] = j·k mod W``: sample j enters bin k times ``exp(-2πi·_PHASES[k][j] / W)``."""


# ---------------------------------------------------------------------------------------------
# Cleaning and plain statistics
#
# The gate math is plain Python, not numpy: the node agent imports this module, and importing
# numpy alone costs about 12 MiB of RSS, for windows of 64 samples. Means and percentiles are
# computed with numpy's operations in numpy's order (bit for bit what numpy.mean and the linear
# numpy.percentile give); the spectrum is a direct DFT, equal to numpy.fft.rfft to within rounding.
# tests/unit/test_gates_numpy.py compares every reading with numpy.


def _finite(values: Series) -> list[float]:
    """The finite values of ``values`` as floats, in order (non-finite values dropped)."""
    floats = [float(v) for v in values]
    return [v for v in floats if math.isfinite(v)]


def clean_series(u: Series) -> list[float]:
    """The finite values of a load series, clipped to [0, 1], oldest first."""
    return [min(1.0, max(0.0, v)) for v in _finite(u)]


def _sum(x: Sequence[float]) -> float:
    """The sum of ``x``, added in numpy's order so that it rounds as ``numpy.sum`` does (the
    readings stay what they were with numpy, bit for bit, nearly flat windows included).

    numpy sums float64 pairwise: fewer than 8 values one after the other; up to
    :data:`_SUM_BLOCK` values in 8 interleaved partial sums, combined as a tree, and the rest of the
    values after them; a longer run is split in two halves (the first a multiple of 8). An
    overflowing sum is ±inf, never an exception.
    """
    n = len(x)
    if n < 8:
        return reduce(add, x, 0.0)
    if n <= _SUM_BLOCK:
        end = n - n % 8
        r = [reduce(add, x[j:end:8]) for j in range(8)]
        total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        return reduce(add, x[end:], total)
    half = n // 2
    half -= half % 8
    return _sum(x[:half]) + _sum(x[half:])


def _mean(x: Sequence[float]) -> float:
    """Mean of ``x`` (not empty), as ``numpy.mean`` rounds it; ±inf when the sum overflows."""
    return _sum(x) / len(x)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Quantile ``q`` of sorted finite values (not empty), interpolated linearly between the
    neighbouring order statistics (numpy's default ``linear`` method, the same operations)."""
    last = len(ordered) - 1
    index = last * q
    if index >= last:
        return ordered[last]
    below = math.floor(index)
    t = index - below
    a, b = ordered[below], ordered[below + 1]
    diff = b - a
    # as numpy's lerp: from the nearer neighbour, so that t close to 1 ends exactly at b
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def _unit(value: float) -> float:
    """Clip a computed reading to [0, 1]; NaN (which the code paths never produce) reads as 1."""
    if math.isnan(value):
        return 1.0
    return min(1.0, max(0.0, value))


def _fraction(value: float) -> float:
    """Clip an input fraction to [0, 1]; NaN is the worst case, 1.0 (never read as zero load)."""
    return _unit(float(value))


# ---------------------------------------------------------------------------------------------
# Summaries


def summarize(values: Series) -> SignalSummary | None:
    """Mean, p95 (linear interpolation) and max over the finite values; None when there are none.

    The values are not clipped (signals other than the load may be in natural units). Rounding
    never lets the mean or the p95 leave [min, max]; sums that would overflow float64 are computed
    on scaled values instead.
    """
    x = _finite(values)
    if not x:
        return None
    ordered = sorted(x)
    low = ordered[0]
    high = ordered[-1]
    mean = _mean(x)
    p95 = _percentile(ordered, P95)
    if not math.isfinite(mean):
        scale = max(abs(low), abs(high))
        mean = scale * _mean([v / scale for v in x])
    if not math.isfinite(p95):  # the neighbours' difference overflowed: take the upper one
        p95 = ordered[math.ceil((len(ordered) - 1) * P95)]
    return SignalSummary(
        mean=min(high, max(low, mean)),
        p95=min(high, max(low, p95)),
        max=high,
    )


def load_p95(u: Series) -> float:
    """p95 of the cleaned load series; 1.0 (full load) when it has no finite value."""
    x = clean_series(u)
    if not x:
        return 1.0
    return _unit(_percentile(sorted(x), P95))


# ---------------------------------------------------------------------------------------------
# Room


def headroom(p95_load: float, allocated: float) -> float:
    """``min(1 - a, max(0, 1 - p95))``: room both measured and promised, for ranking nodes."""
    p = _fraction(p95_load)
    a = _fraction(allocated)
    return _unit(min(1.0 - a, max(0.0, 1.0 - p)))


def fit_error(request: float, p95_load: float) -> float:
    """``max(0, r - max(0, 1 - p95)) / r``: share of the request the measured peak leaves no room
    for. 0.0 for a request of zero or less (nothing to fit). Non-decreasing in the request."""
    r = _fraction(request)
    if r <= 0.0:
        return 0.0
    room = max(0.0, 1.0 - _fraction(p95_load))
    # 1 - room/r equals (r - room)/r and is monotone in r under IEEE rounding.
    return _unit(max(0.0, 1.0 - room / r))


def isolation(request: float, allocated: float) -> float:
    """``max(0, 1 - a - r)``: promised slack left after admission. Non-increasing in the request."""
    r = _fraction(request)
    a = _fraction(allocated)
    return _unit(max(0.0, (1.0 - a) - r))


def gluing_delta(u: Series) -> float:
    """``|mean(newest quarter) - mean(oldest quarter)|`` of the cleaned series.

    The quarter is ``max(1, len // 4)`` samples; fewer than 2 samples give 0.0.
    """
    x = clean_series(u)
    if len(x) < 2:
        return 0.0
    quarter = max(1, len(x) // 4)
    return _unit(abs(_mean(x[-quarter:]) - _mean(x[:quarter])))


# ---------------------------------------------------------------------------------------------
# Spectrum


def power_spectrum(u: Series) -> list[float]:
    """``|rfft(u - mean(u))|²`` without the DC bin: exactly :data:`BINS` non-negative values.

    The newest :data:`WINDOW` cleaned samples are used; a shorter series is zero-padded to
    :data:`WINDOW` after its mean is removed. A flat series (fewer than 2 samples, or a range of at
    most :data:`FLAT_TOLERANCE`) has all-zero power.

    The transform is a direct DFT of the (at most 64) samples, bins 1 to 32, each sum correctly
    rounded: padding zeros add nothing, so they are not summed.
    """
    x = clean_series(u)[-WINDOW:]
    if len(x) < 2 or max(x) - min(x) <= FLAT_TOLERANCE:
        return [0.0] * BINS
    mean = _mean(x)
    centred = [v - mean for v in x]
    power: list[float] = []
    for k in range(1, BINS + 1):
        phases = _PHASES[k]
        re = math.fsum([v * _COS[m] for v, m in zip(centred, phases, strict=False)])
        im = math.fsum([v * _SIN[m] for v, m in zip(centred, phases, strict=False)])
        power.append(re * re + im * im)
    return power


def _normalise(power: Sequence[float]) -> list[float]:
    total = _sum(power)
    if not total > 0.0:
        return [0.0] * BINS
    return [min(1.0, max(0.0, p / total)) for p in power]


def fingerprint(u: Series) -> list[float]:
    """``P / sum(P)``: :data:`BINS` shares summing to 1, or all zeros for a flat series."""
    return _normalise(power_spectrum(u))


def _entropy_of(f: Sequence[float]) -> float:
    p = [v for v in f if v > 0.0]
    if not p:
        return 0.0
    return _unit(-_sum([v * math.log(v) for v in p]) / _LOG_BINS)


class Spectrum(NamedTuple):
    """The spectral readings of one load series, from one transform."""

    fingerprint: list[float]
    """``P / sum(P)`` (:data:`BINS` values), all zeros for a flat series."""
    lambda1: float
    """Periodicity: the largest bin's share of the power."""
    lambda_int: float
    """Burstiness: the upper :data:`UPPER_BINS` bins' share of the power."""
    entropy: float
    """Normalised Shannon entropy of the fingerprint (0 flat or one tone, 1 white)."""


def spectrum(u: Series) -> Spectrum:
    """Fingerprint, lambda1, lambda_int and entropy of ``u`` (all 0 for a flat series)."""
    power = power_spectrum(u)
    f = _normalise(power)
    total = _sum(power)
    if not total > 0.0:
        return Spectrum(f, 0.0, 0.0, 0.0)
    return Spectrum(
        fingerprint=f,
        lambda1=_unit(max(power) / total),
        lambda_int=_unit(_sum(power[BINS - UPPER_BINS :]) / total),
        entropy=_entropy_of(f),
    )


def lambda1(u: Series) -> float:
    """``max(P) / sum(P)``; 0.0 for a flat series."""
    return spectrum(u).lambda1


def lambda_int(u: Series) -> float:
    """Sum of the upper 16 bins over ``sum(P)``; 0.0 for a flat series."""
    return spectrum(u).lambda_int


def spectral_entropy(u: Series) -> float:
    """Shannon entropy of ``P / sum(P)`` over ``log(32)``; 0.0 for a flat series."""
    return spectrum(u).entropy


def cosine_similarity(a: Series, b: Series) -> float:
    """Cosine similarity of two fingerprints, in [0, 1].

    Non-finite and negative entries count as 0. A zero vector (a flat series' fingerprint, or an
    empty one) has similarity 0.0 with anything. Raises ValueError when the lengths differ.
    """
    x = [float(v) for v in a]
    y = [float(v) for v in b]
    if len(x) != len(y):
        raise ValueError(f"fingerprints differ in length: {len(x)} and {len(y)}")
    x = [v if math.isfinite(v) and v > 0.0 else 0.0 for v in x]
    y = [v if math.isfinite(v) and v > 0.0 else 0.0 for v in y]
    if not x or not (max(x) > 0.0 and max(y) > 0.0):
        return 0.0
    x_max, y_max = max(x), max(y)  # cosine is scale-free; scaling first rules out overflow
    x = [v / x_max for v in x]
    y = [v / y_max for v in y]
    norms = math.hypot(*x) * math.hypot(*y)
    return _unit(math.fsum([p * q for p, q in zip(x, y, strict=True)]) / norms)


# ---------------------------------------------------------------------------------------------
# Readings


def gate_reading(u: Series, allocated: float) -> GateReading:
    """The unconditional gate readings of one substrate (``status.gates``)."""
    s = spectrum(u)
    return GateReading(
        headroom=headroom(load_p95(u), allocated),
        gluing_delta=gluing_delta(u),
        lambda1=s.lambda1,
        lambda_int=s.lambda_int,
        entropy=s.entropy,
    )


# ---------------------------------------------------------------------------------------------
# Thresholds

THRESHOLD_BOUNDS: Mapping[str, tuple[float, float]] = {
    "theta_fit": (0.05, 0.50),
    "theta_iso": (0.01, 0.50),
    "theta_glue": (0.01, 0.50),
    "theta_burst": (0.30, 1.00),
    "min_samples": (4, WINDOW),
    "max_age_seconds": (1.0, 3600.0),
}
"""Inclusive bounds of every threshold; calibration moves thresholds only inside them.

theta_fit and theta_iso are DESIGN's. theta_burst stays at or above 0.30 because white noise puts
about half its power in the upper bins, so a lower threshold would reject every noisy node;
minSamples of at least 4 gives each quarter of the gluing window one sample, and at most W, so a
full window always qualifies.
"""

CONFIGMAP_KEYS: Mapping[str, str] = {
    "theta_fit": "thetaFit",
    "theta_iso": "thetaIso",
    "theta_glue": "thetaGlue",
    "theta_burst": "thetaBurst",
    "min_samples": "minSamples",
    "max_age_seconds": "maxAgeSeconds",
}
"""Threshold field -> key in the ``capacity-calibration`` ConfigMap data."""


class ThresholdsParse(NamedTuple):
    """What :meth:`Thresholds.from_configmap` returns: the thresholds and why any key was not
    taken as written. Unpacks as ``thresholds, warnings = Thresholds.from_configmap(data)``."""

    thresholds: Thresholds
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Gate thresholds (DESIGN sections 4 and 7). Out-of-bounds values raise ValueError here;
    :meth:`from_configmap` clamps instead. ``dataclasses.replace`` re-validates."""

    theta_fit: float = 0.165
    """fit_error must be at most this."""
    theta_iso: float = 0.15
    """isolation must be at least this."""
    theta_glue: float = 0.10
    """gluing_delta must be at most this."""
    theta_burst: float = 0.60
    """lambda_int must be at most this."""
    min_samples: int = 16
    """Samples the window needs before the node may vote YES."""
    max_age_seconds: float = 30.0
    """Readings older than this are stale."""

    def __post_init__(self) -> None:
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int):
            raise TypeError(f"min_samples must be an int, got {self.min_samples!r}")
        for field in fields(self):
            value = getattr(self, field.name)
            low, high = THRESHOLD_BOUNDS[field.name]
            if not low <= value <= high:  # also refuses NaN
                raise ValueError(f"{field.name} {value!r} is outside [{low:g}, {high:g}]")

    @classmethod
    def from_configmap(
        cls, data: Mapping[str, str] | None, last_good: Thresholds | None = None
    ) -> ThresholdsParse:
        """Parse the ``capacity-calibration`` ConfigMap data.

        Missing keys take the default; values outside :data:`THRESHOLD_BOUNDS` are clamped to the
        bound; values that are not finite numbers (or, for minSamples, not integers) are refused:
        the threshold keeps its ``last_good`` value (the one in force before this read; the
        default when there is none). Each clamp and each refusal adds a warning naming the key.
        Other keys (counters, history) are ignored.
        """
        defaults = cls()
        kept = last_good or defaults
        values: dict[str, Any] = {}
        warnings: list[str] = []
        data = data or {}
        for name, key in CONFIGMAP_KEYS.items():
            default = getattr(defaults, name)
            if key not in data:
                values[name] = default
                continue
            raw = data[key]
            parsed = _parse_number(raw, integer=name == "min_samples")
            if parsed is None:
                kind = "an integer" if name == "min_samples" else "a finite number"
                previous = getattr(kept, name)
                source = "the last good value" if last_good is not None else "the default"
                warnings.append(
                    f"{key}: {str(raw)[:64]!r} is not {kind}; refused, keeping {source} "
                    f"{previous:g}"
                )
                values[name] = previous
                continue
            low, high = THRESHOLD_BOUNDS[name]
            if parsed < low or parsed > high:
                bound = low if parsed < low else high
                side = "below" if parsed < low else "above"
                warnings.append(f"{key}: {parsed:g} is {side} the bound {bound:g}; clamped")
                parsed = bound
            values[name] = int(parsed) if name == "min_samples" else float(parsed)
        return ThresholdsParse(cls(**values), tuple(warnings))

    def to_configmap(self) -> dict[str, str]:
        """The ConfigMap data keys of these thresholds (round-trips through from_configmap)."""
        return {key: repr(getattr(self, name)) for name, key in CONFIGMAP_KEYS.items()}


def _parse_number(raw: object, *, integer: bool) -> float | int | None:
    text = str(raw).strip()
    try:
        if integer:
            return int(text)
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------------------------------------
# The vote


class Gate(StrEnum):
    """The checks of a fit vote, in the order they are applied."""

    SAMPLES = "samples"
    FRESHNESS = "freshness"
    CAPACITY = "capacity"
    FIT = "fit"
    ISOLATION = "isolation"
    GLUING = "gluing"
    BURST = "burst"
    PRESSURE = "pressure"


@dataclass(frozen=True, slots=True)
class Decision:
    """A node's fit vote: YES or NO, why, and the readings it was decided on."""

    yes: bool
    reason: str
    """One human sentence naming the failing gate, its value and its threshold."""
    gate: str | None
    """The first failing :class:`Gate` (None for YES)."""
    readings: dict[str, float]
    """headroom, fitError, isolation, gluingDelta, lambda1, lambdaInt, entropy, allocated,
    request, p95: all finite and in [0, 1]."""


def _shown(value: float, threshold: float) -> str:
    """``value`` with 2 to 6 decimals, the fewest at which it does not print as the threshold
    (its full repr when even 6 decimals would)."""
    for decimals in range(2, 7):
        text = f"{value:.{decimals}f}"
        if float(text) != threshold:
            return text
    return repr(value)


def evaluate_fit(
    *,
    u: Series,
    allocated: float,
    request: float,
    samples: int,
    age_seconds: float,
    pressure: Sequence[str],
    thresholds: Thresholds,
) -> Decision:
    """Decide a placement node's vote on a request of ``request`` of its substrate.

    YES only when, in this order: the window has at least ``min_samples`` samples (the smaller of
    ``samples`` and the finite values of ``u`` counts); the readings are at most
    ``max_age_seconds`` old (a negative age, clock skew, is fresh; NaN is stale); the hard rule
    ``allocated + request <= 1`` holds exactly on the values as given (negative values count as 0,
    NaN fails; no tolerance: rounding can only refuse, never over-promise); fit_error <= theta_fit;
    isolation >= theta_iso; gluing_delta <= theta_glue; lambda_int <= theta_burst; and no pressure
    condition is set. ``gate`` names the first check that fails. The readings are always computed
    in full, so a NO vote carries them too.
    """
    t = thresholds
    p95 = load_p95(u)
    s = spectrum(u)
    a = _fraction(allocated)
    r = _fraction(request)
    fit = fit_error(r, p95)
    iso = isolation(r, a)
    glue = gluing_delta(u)
    readings = {
        "headroom": headroom(p95, a),
        "fitError": fit,
        "isolation": iso,
        "gluingDelta": glue,
        "lambda1": s.lambda1,
        "lambdaInt": s.lambda_int,
        "entropy": s.entropy,
        "allocated": a,
        "request": r,
        "p95": p95,
    }
    conditions = [pressure] if isinstance(pressure, str) else list(pressure)
    conditions = [c for c in conditions if c]
    have = min(samples, len(clean_series(u)))
    within_capacity = (
        math.isfinite(allocated)
        and math.isfinite(request)
        and max(0.0, allocated) + max(0.0, request) <= 1.0
    )
    burst = s.lambda_int
    checks: list[tuple[Gate, bool, str]] = [
        (
            Gate.SAMPLES,
            have >= t.min_samples,
            f"window has {have} samples, fewer than minSamples {t.min_samples}",
        ),
        (
            Gate.FRESHNESS,
            age_seconds <= t.max_age_seconds,
            f"readings are {age_seconds:.1f} s old, older than maxAgeSeconds "
            f"{t.max_age_seconds:g} (stale)",
        ),
        (
            Gate.CAPACITY,
            within_capacity,
            f"allocated {allocated:.2f} + request {request:.2f} exceeds capacity "
            f"(sum {_shown(allocated + request, 1.0)} > 1)",
        ),
        (
            Gate.FIT,
            fit <= t.theta_fit,
            f"fit_error {_shown(fit, t.theta_fit)} > theta_fit {t.theta_fit:g}",
        ),
        (
            Gate.ISOLATION,
            iso >= t.theta_iso,
            f"isolation {_shown(iso, t.theta_iso)} < theta_iso {t.theta_iso:g}",
        ),
        (
            Gate.GLUING,
            glue <= t.theta_glue,
            f"gluing_delta {_shown(glue, t.theta_glue)} > theta_glue {t.theta_glue:g}",
        ),
        (
            Gate.BURST,
            burst <= t.theta_burst,
            f"lambda_int {_shown(burst, t.theta_burst)} > theta_burst {t.theta_burst:g}",
        ),
        (
            Gate.PRESSURE,
            not conditions,
            f"pressure condition set: {', '.join(conditions)}",
        ),
    ]
    for gate, passed, reason in checks:
        if not passed:
            return Decision(yes=False, reason=reason, gate=gate.value, readings=readings)
    return Decision(
        yes=True,
        reason=(
            f"fits: fit_error {_shown(fit, t.theta_fit)} <= {t.theta_fit:g}, "
            f"isolation {_shown(iso, t.theta_iso)} >= {t.theta_iso:g}, "
            f"gluing_delta {_shown(glue, t.theta_glue)} <= {t.theta_glue:g}, "
            f"lambda_int {_shown(burst, t.theta_burst)} <= {t.theta_burst:g}"
        ),
        gate=None,
        readings=readings,
    )
