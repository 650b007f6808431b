"""Truth (DESIGN section 7): every decision checked against what really happened afterwards.

Pure functions, no I/O. The operator feeds them the pods bound to a claim (the claim label), the
CapacityNodes of its placement and the time; they say what falsifies an admission, and what
the verdict is:

- an admitted claim is **Falsified** as soon as any of its pods, during the observation period,
  has a container killed by the kernel's OOM killer (``OOMKilled``), is ``Evicted``, or restarts
  ``restart_limit`` times or more after SIGKILL (exit code 137) without an OOM reason, or one of
  its placement nodes reports a pressure condition while placed: our agent's (``MemoryPressure``,
  ``CPUPressure``, ``IOPressure`` True on the CapacityNode) or the kubelet's
  (``MemoryPressure``, ``DiskPressure``, ``PIDPressure`` True on the Node). It is
  **Confirmed** when the period ends clean;
- a rejected claim is a **MissedOpportunity** when, for the whole period afterwards, at least
  ``replicas`` of its candidate nodes kept a headroom of at least its share (it would have
  fitted), and **RightlyRejected** otherwise. The lowest headroom each candidate showed so far is
  kept in the claim's status, so an operator restart loses nothing of the period.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from capacity_api import reasons
from capacity_api.models import CapacityNode, Evidence, Phase, Truth, Verdict

OOM_KILLED = "OOMKilled"
EVICTED = "Evicted"
REPEATED_RESTARTS = "RepeatedRestarts"
NODE_PRESSURE = "NodePressure"
SIGKILL_EXIT = 137
MAX_EVIDENCE = 8
FINAL = frozenset(
    {Verdict.CONFIRMED, Verdict.FALSIFIED, Verdict.MISSED_OPPORTUNITY, Verdict.RIGHTLY_REJECTED}
)


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _after(at: datetime | None, since: datetime) -> bool:
    """``at`` is not before ``since``, at the kubelet's precision: container times are whole
    seconds, so an OOM kill 0.3 s after an admission at 12:00:00.9 reads 12:00:01, and one in
    the same second reads 12:00:00. Unknown times count: a termination without a time is not
    proof that it came before."""
    return at is None or at >= since.replace(microsecond=0)


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def pod_evidence(pod: Mapping[str, Any], since: datetime, restart_limit: int) -> list[Evidence]:
    """What in one pod (a Kubernetes Pod as JSON) falsifies an admission made at ``since``."""
    name = _get(pod, "metadata", "name")
    node = _get(pod, "spec", "nodeName") or None
    found: list[Evidence] = []
    status = _get(pod, "status")
    if not isinstance(status, Mapping):
        return []
    if status.get("reason") == EVICTED:
        found.append(
            Evidence(
                kind=EVICTED, node=node, pod=name, reason=EVICTED,
                message=str(status.get("message") or "")[:1024] or None,
                time=_time(_get(pod, "metadata", "deletionTimestamp")) or _time(
                    status.get("startTime")
                ),
            )
        )  # fmt: skip
    containers = [
        *(status.get("containerStatuses") or []),
        *(status.get("initContainerStatuses") or []),
    ]
    for cs in containers:
        if not isinstance(cs, Mapping):
            continue
        container = cs.get("name")
        for state in (_get(cs, "state", "terminated"), _get(cs, "lastState", "terminated")):
            if not isinstance(state, Mapping) or state.get("reason") != OOM_KILLED:
                continue
            at = _time(state.get("finishedAt"))
            if _after(at, since):
                found.append(
                    Evidence(
                        kind=OOM_KILLED, node=node, pod=name, container=container,
                        reason=OOM_KILLED,
                        message=f"exit code {state.get('exitCode')}, restarts "
                        f"{cs.get('restartCount', 0)}",
                        time=at,
                    )
                )  # fmt: skip
                break
        else:
            last = _get(cs, "lastState", "terminated")
            restarts = _int(cs.get("restartCount"))
            if (
                isinstance(last, Mapping)
                and restarts >= restart_limit
                and last.get("exitCode") == SIGKILL_EXIT
                and _after(_time(last.get("finishedAt")), since)
            ):
                found.append(
                    Evidence(
                        kind=REPEATED_RESTARTS, node=node, pod=name, container=container,
                        reason=str(last.get("reason") or "Killed"),
                        message=f"{restarts} restarts, the last killed (exit code 137)",
                        time=_time(last.get("finishedAt")),
                    )
                )  # fmt: skip
    return found


def node_evidence(node: CapacityNode, since: datetime) -> list[Evidence]:
    """Pressure conditions a placement node reports True (seen while the claim is placed)."""
    found = []
    for c in (node.status.conditions or []) if node.status else []:
        if c.type in reasons.PRESSURE_CONDITIONS and c.status.value == "True":
            at = c.last_transition_time
            found.append(
                Evidence(
                    kind=NODE_PRESSURE, node=node.metadata.name or node.spec.node_name,
                    reason=c.type, message=(c.message or "")[:1024] or None,
                    time=at if at is not None and at >= since else since,
                )
            )  # fmt: skip
    return found


KUBELET_PRESSURE = ("MemoryPressure", "DiskPressure", "PIDPressure")
"""The kubelet's pressure conditions on a Kubernetes Node (it evicts pods under them)."""


def kubelet_pressure(conditions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The kubelet pressure conditions that are True among a Node's ``status.conditions``
    (what the operator's index keeps of a Node: type, message, lastTransitionTime)."""
    return [
        {"type": c.get("type"), "message": c.get("message"),
         "lastTransitionTime": c.get("lastTransitionTime")}
        for c in conditions
        if isinstance(c, Mapping) and c.get("type") in KUBELET_PRESSURE
        and c.get("status") == "True"
    ]  # fmt: skip


def kubelet_evidence(
    node: str, pressure: Iterable[Mapping[str, Any]], since: datetime
) -> list[Evidence]:
    """A placement node's kubelet pressure conditions (from :func:`kubelet_pressure`) seen
    while the claim is placed: falsifying, like our agents' own pressure conditions."""
    found = []
    for c in pressure:
        at = _time(c.get("lastTransitionTime"))
        message = str(c.get("message") or "")
        found.append(
            Evidence(
                kind=NODE_PRESSURE, node=node, reason=str(c.get("type")),
                message=f"kubelet: {message}"[:1024] if message else "kubelet",
                time=at if at is not None and at >= since else since,
            )
        )  # fmt: skip
    return found


def start(decision: Phase, since: datetime, period: timedelta) -> Truth:
    """The observation of one decision (Admitted or Rejected) made at ``since``."""
    return Truth(decision=decision, verdict=Verdict.OBSERVING, since=since, until=since + period)


def judge_admitted(truth: Truth, evidence: Iterable[Evidence], now: datetime) -> Truth:
    """The next state of an admission under observation (unchanged once final)."""
    if truth.verdict in FINAL:
        return truth
    seen = _merge(truth.evidence or [], evidence)
    if seen:
        return truth.model_copy(
            update={"verdict": Verdict.FALSIFIED, "decided_at": now, "evidence": seen}
        )
    if now >= truth.until:
        return truth.model_copy(update={"verdict": Verdict.CONFIRMED, "decided_at": now})
    return truth


def _merge(old: Iterable[Evidence], new: Iterable[Evidence]) -> list[Evidence]:
    """Evidence without repeats (one item per kind, pod, container, node, reason), oldest first,
    at most :data:`MAX_EVIDENCE`."""
    out: list[Evidence] = []
    keys: set[tuple[str, str | None, str | None, str | None, str]] = set()
    for item in [*old, *new]:
        key = (item.kind, item.pod, item.container, item.node, item.reason)
        if key not in keys:
            keys.add(key)
            out.append(item)
    return out[:MAX_EVIDENCE]


@dataclass(frozen=True, slots=True)
class Rejection:
    """What a rejected claim asked for: ``replicas`` of its candidate nodes, each with the share
    the claim would take of it (``shares``: node -> share, the nodes that could ever hold it)."""

    shares: Mapping[str, float]
    replicas: int


def judge_rejected(
    truth: Truth, rejection: Rejection, headroom: Mapping[str, float | None], now: datetime
) -> Truth:
    """Fold the candidates' current headroom (None or absent: no reading now, counts as none)
    into the lowest seen, and decide once the period is over."""
    if truth.verdict in FINAL:
        return truth
    lowest = dict(truth.headroom or {})
    for name in rejection.shares:
        value = headroom.get(name)
        seen = 0.0 if value is None else value
        lowest[name] = round(min(lowest.get(name, seen), seen), 4)
    if now < truth.until:
        return truth.model_copy(update={"headroom": lowest})
    fits = sum(
        1 for name, share in rejection.shares.items() if lowest.get(name, 0.0) + 1e-9 >= share
    )
    verdict = Verdict.MISSED_OPPORTUNITY if fits >= rejection.replicas else Verdict.RIGHTLY_REJECTED
    return truth.model_copy(update={"verdict": verdict, "decided_at": now, "headroom": lowest})


def summary(truth: Truth) -> str:
    """One sentence for the condition message and the Event."""
    if truth.verdict is Verdict.FALSIFIED:
        items = "; ".join(_describe(e) for e in truth.evidence or [])
        return f"admission falsified: {items}"
    if truth.verdict is Verdict.CONFIRMED:
        return f"ran clean from {_iso(truth.since)} to {_iso(truth.until)}: admission confirmed"
    if truth.verdict is Verdict.MISSED_OPPORTUNITY:
        return (
            f"rejected, yet its candidate nodes kept enough headroom from {_iso(truth.since)} to "
            f"{_iso(truth.until)}: a missed opportunity (lowest headroom {_headroom(truth)})"
        )
    if truth.verdict is Verdict.RIGHTLY_REJECTED:
        return f"rejected, and too few candidate nodes kept enough headroom ({_headroom(truth)})"
    return f"observing until {_iso(truth.until)}"


def _describe(e: Evidence) -> str:
    where = "/".join(p for p in (e.pod, e.container) if p)
    parts = [e.reason, f"pod {where}" if where else "", f"on {e.node}" if e.node else ""]
    text = " ".join(p for p in parts if p)
    return f"{text} at {_iso(e.time)}" if e.time else text


def _headroom(truth: Truth) -> str:
    return ", ".join(f"{n} {v:.2f}" for n, v in sorted((truth.headroom or {}).items())) or "none"


def _iso(value: datetime | None) -> str:
    if value is None:
        return "?"
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")
