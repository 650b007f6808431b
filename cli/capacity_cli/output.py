"""Text and JSON output of capctl: aligned tables, durations, numbers, times (all pure)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]
"""A JSON object as capctl prints it with ``-o json``."""


def aware(value: datetime) -> datetime:
    """``value``, read as UTC when it carries no time zone."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, as the API server writes times."""
    if value is None:
        return None
    return aware(value).astimezone(UTC).isoformat().replace("+00:00", "Z")


def clock_time(value: datetime) -> str:
    """``12:00:03 UTC``."""
    return aware(value).astimezone(UTC).strftime("%H:%M:%S UTC")


def human_duration(seconds: float) -> str:
    """kubectl-style short duration: 7s, 3m05s, 42m, 5h12m, 2d3h."""
    s = int(max(0.0, seconds))
    if s < 120:
        return f"{s}s"
    minutes, sec = divmod(s, 60)
    if minutes < 10:
        return f"{minutes}m{sec:02d}s"
    if minutes < 180:
        return f"{minutes}m"
    hours, minute = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minute:02d}m" if hours < 8 else f"{hours}h"
    days, hour = divmod(hours, 24)
    return f"{days}d{hour}h" if days < 8 else f"{days}d"


def age_text(value: datetime | None, now: datetime) -> str:
    """How long before ``now`` (``in ...`` when after it); ``-`` for no time."""
    if value is None:
        return "-"
    delta = (now - aware(value)).total_seconds()
    if delta < 0:
        return "in " + human_duration(-delta)
    return human_duration(delta)


def num(value: float | None, decimals: int = 3) -> str:
    """A fixed-point number, ``-`` for none."""
    return "-" if value is None else f"{value:.{decimals}f}"


def shown(value: float, threshold: float) -> str:
    """``value`` with 3 to 6 decimals: the fewest at which it does not print as the threshold
    unless it equals it, so ``0.1651 > 0.165`` never reads as ``0.165 > 0.165``."""
    for decimals in range(3, 7):
        text = f"{value:.{decimals}f}"
        if value == threshold or float(text) != threshold:
            return text
    return repr(value)


def sentence(text: str) -> str:
    """``text`` ending with a full stop (unless it already ends a sentence)."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: int = 2) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        cells.append(row[-1])
        lines.append((" " * indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def emit(output: str, data: Any, text: str) -> None:
    """Write ``data`` as indented JSON (``-o json``) or ``text`` to stdout."""
    if output == "json":
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(text)


__all__ = [
    "JSON",
    "age_text",
    "aware",
    "clock_time",
    "emit",
    "human_duration",
    "iso",
    "num",
    "sentence",
    "shown",
    "table",
]
