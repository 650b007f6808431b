"""The rolling measurement window: the last W samples of every signal of one substrate.

Pure, no I/O. Each :meth:`Window.add` is one sample (one tick of the sampling interval) carrying any
number of named signals. The window covers the newest ``size`` samples; a signal's series is its
finite values within those samples, oldest first. A non-finite (or non-numeric, or absent) value is
a missing reading for that signal: it is dropped, never stored as 0, so that signal simply has fewer
values (see :meth:`Window.count`) while the others keep theirs and stay aligned in time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from capacity_api.gates import WINDOW, summarize
from capacity_api.models import SignalSummary


class Window:
    """A ring buffer of the newest ``size`` samples (default :data:`~capacity_api.gates.WINDOW`)
    per signal."""

    __slots__ = ("_seq", "_size", "_times", "_values")

    def __init__(self, size: int = WINDOW) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"window size must be a positive int, got {size!r}")
        self._size = size
        # Samples ever added; sample i (1-based) is in the window while i > _seq - size.
        self._seq = 0
        self._times: deque[float] = deque(maxlen=size)
        self._values: dict[str, deque[tuple[int, float]]] = {}

    @property
    def size(self) -> int:
        """Capacity of the window in samples (W)."""
        return self._size

    @property
    def samples(self) -> int:
        """Samples in the window (at most :attr:`size`), whatever signals they carried."""
        return len(self._times)

    @property
    def newest_time(self) -> float | None:
        """Time of the most recently added sample; None when the window is empty."""
        return self._times[-1] if self._times else None

    @property
    def oldest_time(self) -> float | None:
        """Time of the oldest sample still in the window; None when the window is empty."""
        return self._times[0] if self._times else None

    def add(self, time: float, signals: Mapping[str, float]) -> None:
        """Add one sample taken at ``time`` (Unix seconds, finite; ValueError otherwise).

        Signals whose value is not a finite number are dropped for this sample. Samples are taken
        in the order added; ``time`` is not required to increase (wall clocks step).
        """
        if not math.isfinite(time):
            raise ValueError(f"sample time must be finite, got {time!r}")
        self._seq += 1
        self._times.append(float(time))
        for name, raw in signals.items():
            try:
                value = float(raw)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                continue
            series = self._values.get(name)
            if series is None:
                series = self._values[name] = deque(maxlen=self._size)
            series.append((self._seq, value))
        self._expire()

    def _expire(self) -> None:
        """Forget values older than the window, and signals left without any."""
        first = self._seq - self._size  # sequence numbers <= first are out of the window
        for name in list(self._values):
            series = self._values[name]
            while series and series[0][0] <= first:
                series.popleft()
            if not series:
                del self._values[name]

    def names(self) -> list[str]:
        """Signals with at least one value in the window, sorted."""
        return sorted(self._values)

    def count(self, name: str) -> int:
        """Finite values of ``name`` in the window (0 for an unknown signal)."""
        series = self._values.get(name)
        return len(series) if series is not None else 0

    def series(self, name: str) -> list[float]:
        """The values of ``name`` in the window, oldest first (a copy; empty when unknown)."""
        series = self._values.get(name)
        if series is None:
            return []
        return [value for _, value in series]

    def summaries(self) -> dict[str, SignalSummary]:
        """Mean, p95 and max of every signal with values in the window."""
        result: dict[str, SignalSummary] = {}
        for name in self.names():
            summary = summarize(self.series(name))
            if summary is not None:
                result[name] = summary
        return result

    def clear(self) -> None:
        """Forget every sample (e.g. after a node comes back and must fill minSamples again)."""
        self._seq = 0
        self._times.clear()
        self._values.clear()

    def __len__(self) -> int:
        return self.samples

    def __repr__(self) -> str:
        return f"Window(size={self._size}, samples={self.samples}, signals={self.names()})"
