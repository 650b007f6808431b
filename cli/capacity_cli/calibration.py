"""``capctl calibration``: the thresholds in force, their bounds and pins, the falsification and
miss rates per substrate, and the history of every change; ``pin``, ``unpin`` and ``rollback``
write the ConfigMap through :mod:`capacity_api.calibration` (renderers pure, writers thin)."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from datetime import datetime

from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api.calibration import (
    CALIBRATED,
    CalibrationError,
    Change,
    State,
    rates,
    rollback,
    set_pinned,
    updated_data,
)
from capacity_api.gates import CALIBRATION_CONFIGMAP, CONFIGMAP_KEYS, THRESHOLD_BOUNDS
from capacity_cli.errors import CapctlError
from capacity_cli.output import JSON, age_text, iso, num, table

HISTORY_SHOWN = 10
"""History entries ``capctl calibration`` prints (``-o json`` has them all)."""
WRITE_RETRIES = 5


def calibration_json(state: State) -> JSON:
    thresholds = []
    for name in CONFIGMAP_KEYS:
        key = CONFIGMAP_KEYS[name]
        low, high = THRESHOLD_BOUNDS[name]
        thresholds.append(
            {
                "key": key,
                "value": getattr(state.thresholds, name),
                "bounds": [low, high],
                "calibrated": name in CALIBRATED,
                "pinned": name in state.pinned,
            }
        )
    substrates = {}
    for substrate, counts in sorted(state.counters.items()):
        falsification, miss = rates(counts)
        substrates[substrate] = {
            **counts,
            "falsificationRate": falsification,
            "missRate": miss,
        }
    return {
        "thresholds": thresholds,
        "substrates": substrates,
        "history": [c.wire() for c in state.history],
        "calibratedAt": iso(state.calibrated_at),
        "warnings": list(state.warnings),
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def calibration_text(state: State, *, now: datetime) -> str:
    data = calibration_json(state)
    rows = []
    for t in data["thresholds"]:
        low, high = t["bounds"]
        mode = "pinned" if t["pinned"] else "calibrated" if t["calibrated"] else "fixed"
        rows.append([t["key"], f"{t['value']:g}", f"{low:g}-{high:g}", mode])
    parts = [table(["THRESHOLD", "VALUE", "BOUNDS", "MODE"], rows, indent=0)]
    if data["substrates"]:
        rows = [
            [
                name,
                str(s.get("confirmed", 0)),
                str(s.get("falsified", 0)),
                _rate(s["falsificationRate"]),
                str(s.get("rightlyRejected", 0)),
                str(s.get("missed", 0)),
                _rate(s["missRate"]),
            ]
            for name, s in data["substrates"].items()
        ]
        headers = ["SUBSTRATE", "CONFIRMED", "FALSIFIED", "FALSIFIED%", "RIGHTLY-REJECTED",
                   "MISSED", "MISSED%"]  # fmt: skip
        parts.append(table(headers, rows, indent=0))
    else:
        parts.append("No decision has ended its observation yet.")
    if state.history:
        shown = state.history[-HISTORY_SHOWN:]
        rows = [_history_row(c, now) for c in reversed(shown)]
        title = f"History (newest first, {len(shown)} of {len(state.history)} kept):"
        parts.append(title + "\n" + table(["ID", "KEY", "FROM", "TO", "AGE", "BY", "OUTCOMES",
                                           "WHY"], rows, indent=0))  # fmt: skip
    else:
        parts.append("History: no change yet.")
    when = state.calibrated_at
    parts.append(f"Last written by calibration: {age_text(when, now)} ago" if when else
                 "Calibration has not written this ConfigMap yet.")  # fmt: skip
    parts.extend(f"warning: {w}" for w in state.warnings)
    return "\n\n".join(parts) + "\n"


def _history_row(change: Change, now: datetime) -> list[str]:
    return [
        str(change.id),
        change.key,
        num(change.before, 4),
        num(change.after, 4),
        age_text(change.at, now),
        change.by,
        str(change.outcomes),
        change.why,
    ]


def read_state(api: client.ApiClient, namespace: str) -> tuple[State, str | None, dict[str, str]]:
    """The calibration state, the ConfigMap's resourceVersion (None: there is none) and data."""
    core = client.CoreV1Api(api)
    try:
        cm = core.read_namespaced_config_map(CALIBRATION_CONFIGMAP, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return State.from_configmap(None), None, {}
        raise CapctlError(
            f"cannot read ConfigMap {namespace}/{CALIBRATION_CONFIGMAP}: {exc.reason}"
        ) from exc
    data = dict(cm.data or {})
    return State.from_configmap(data), str(cm.metadata.resource_version), data


def change_state(api: client.ApiClient, namespace: str, change: Callable[[State], State]) -> State:
    """Read, change, compare-and-swap write (again from the read on a conflict)."""
    core = client.CoreV1Api(api)
    where = f"{namespace}/{CALIBRATION_CONFIGMAP}"
    for _ in range(WRITE_RETRIES):
        state, version, data = read_state(api, namespace)
        if version is None:
            raise CapctlError(f"ConfigMap {where} not found (the chart or the operator creates it)")
        try:
            new = change(state)
        except CalibrationError as exc:
            raise CapctlError(str(exc)) from exc
        added = new.history[len(state.history) :]  # capctl never drops history: the operator does
        written: dict[str, str | None] = dict(updated_data(data, new, added))
        # a key left out (an empty pin list) is removed: null in a strategic merge patch
        removed: dict[str, str | None] = {k: None for k in data if k not in written}
        patch = {"metadata": {"resourceVersion": version}, "data": removed | written}
        try:
            core.patch_namespaced_config_map(CALIBRATION_CONFIGMAP, namespace, patch)
        except ApiException as exc:
            if exc.status == 409:
                continue
            raise CapctlError(f"cannot write ConfigMap {where}: {exc.reason}") from exc
        return new
    raise CapctlError(f"ConfigMap {where} kept changing; try again")


def who() -> str:
    """Who a rollback is recorded as done by (the local user)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "capctl"


def do_rollback(entry: int, now: datetime) -> Callable[[State], State]:
    by = f"{who()} (capctl)"
    return lambda state: rollback(state, entry, now, by, len(state.history) + len(CALIBRATED))


def do_pin(keys: list[str], pinned: bool) -> Callable[[State], State]:
    return lambda state: set_pinned(state, keys, pinned)


__all__ = [
    "calibration_json",
    "calibration_text",
    "change_state",
    "do_pin",
    "do_rollback",
    "read_state",
]
