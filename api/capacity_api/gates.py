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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

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

Series = Sequence[float] | npt.NDArray[Any]
"""A load or signal series, oldest sample first."""
FloatArray = npt.NDArray[np.float64]

_LOG_BINS = math.log(BINS)


# ---------------------------------------------------------------------------------------------
# Cleaning


def _as_array(values: Series) -> FloatArray:
    """The finite values of ``values`` as a 1-D float64 array (non-finite values dropped)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def clean_series(u: Series) -> FloatArray:
    """The finite values of a load series, clipped to [0, 1], oldest first."""
    return np.clip(_as_array(u), 0.0, 1.0)


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
    x = _as_array(values)
    if x.size == 0:
        return None
    low = float(x.min())
    high = float(x.max())
    with np.errstate(all="ignore"):
        mean = float(np.mean(x))
        p95 = float(np.percentile(x, 95))
    if not math.isfinite(mean):
        scale = max(abs(low), abs(high))
        mean = scale * float(np.mean(x / scale))
    if not math.isfinite(p95):
        p95 = float(np.percentile(x, 95, method="higher"))
    return SignalSummary(
        mean=min(high, max(low, mean)),
        p95=min(high, max(low, p95)),
        max=high,
    )


def load_p95(u: Series) -> float:
    """p95 of the cleaned load series; 1.0 (full load) when it has no finite value."""
    x = clean_series(u)
    if x.size == 0:
        return 1.0
    return _unit(float(np.percentile(x, 95)))


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
    if x.size < 2:
        return 0.0
    quarter = max(1, x.size // 4)
    return _unit(abs(float(np.mean(x[-quarter:])) - float(np.mean(x[:quarter]))))


# ---------------------------------------------------------------------------------------------
# Spectrum


def power_spectrum(u: Series) -> FloatArray:
    """``|rfft(u - mean(u))|²`` without the DC bin: exactly :data:`BINS` non-negative values.

    The newest :data:`WINDOW` cleaned samples are used; a shorter series is zero-padded to
    :data:`WINDOW` after its mean is removed. A flat series (fewer than 2 samples, or a range of at
    most :data:`FLAT_TOLERANCE`) has all-zero power.
    """
    x = clean_series(u)[-WINDOW:]
    if x.size < 2 or float(np.ptp(x)) <= FLAT_TOLERANCE:
        return np.zeros(BINS, dtype=np.float64)
    padded = np.zeros(WINDOW, dtype=np.float64)
    padded[: x.size] = x - np.mean(x)
    power: FloatArray = np.abs(np.fft.rfft(padded)) ** 2
    return power[1 : BINS + 1]


def _normalise(power: FloatArray) -> FloatArray:
    total = float(np.sum(power))
    if not total > 0.0:
        return np.zeros(BINS, dtype=np.float64)
    return np.clip(power / total, 0.0, 1.0)


def fingerprint(u: Series) -> FloatArray:
    """``P / sum(P)``: :data:`BINS` shares summing to 1, or all zeros for a flat series."""
    return _normalise(power_spectrum(u))


def _entropy_of(f: FloatArray) -> float:
    p = f[f > 0.0]
    if p.size == 0:
        return 0.0
    return _unit(float(-np.sum(p * np.log(p))) / _LOG_BINS)


class Spectrum(NamedTuple):
    """The spectral readings of one load series, from one FFT."""

    fingerprint: FloatArray
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
    total = float(np.sum(power))
    if not total > 0.0:
        return Spectrum(f, 0.0, 0.0, 0.0)
    return Spectrum(
        fingerprint=f,
        lambda1=_unit(float(np.max(power)) / total),
        lambda_int=_unit(float(np.sum(power[BINS - UPPER_BINS :])) / total),
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
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"fingerprints differ in length: {x.size} and {y.size}")
    x = np.where(np.isfinite(x) & (x > 0.0), x, 0.0)
    y = np.where(np.isfinite(y) & (y > 0.0), y, 0.0)
    if x.size == 0 or not (np.max(x) > 0.0 and np.max(y) > 0.0):
        return 0.0
    x = x / np.max(x)  # cosine is scale-free; scaling first rules out overflow
    y = y / np.max(y)
    norms = float(np.linalg.norm(x)) * float(np.linalg.norm(y))
    return _unit(float(np.dot(x, y)) / norms)


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
    have = min(samples, int(clean_series(u).size))
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
