"""Publishes one node's CapacityNode: spec and readings, written only when they changed.

Every ``publish_interval`` the publisher builds the node's spec (substrates, geometry, capacity)
and status (readings, gates, conditions) and compares them with what it last wrote. It writes only
when something changed beyond ``tolerance`` (:func:`changes`), or when ``heartbeat_intervals``
cycles passed without a write, so the API server sees O(nodes / publish_interval) writes at most
and far fewer from quiet nodes, like kubelet's node status.

Writes are server-side apply (field manager ``capacity-agent``, ``force=true``): the spec to the
resource, which creates the object when it does not exist, and the status to the ``status``
subresource. The status body carries readings, gates, conditions and observedGeneration only,
never ``status.allocated``, which the operator owns under its own field manager; fields the agent
stops sending (a signal that disappeared) are removed by the apply. A status apply that finds no
object (someone deleted it) applies the spec again and retries the status, so the next write
recreates the object. A publish counts as done only when both applies succeeded; until then the
last published state is unchanged and the next attempt sends everything again (applies are
idempotent), so nothing is ever recorded as half-applied. Failed attempts are retried with
exponential backoff and jitter (:class:`Backoff`, 1 s doubling up to 30 s).

What counts as a change (:func:`changes`), on the flattened objects:

- spec fields, integers (samples, limits), strings and the set of fields: any difference;
- float readings (summaries, headroom, gluing_delta, cgroup throttling): an absolute difference
  above ``tolerance``; PSI values (percent) are compared as fractions (divided by 100);
- the spectral readings (fingerprint, lambda1, lambda_int, entropy): the difference times the
  peak-to-peak range of the substrate's load window. The shape of a series that hardly moves is
  noise: a steady node's fingerprint changes completely from one window to the next, and writing
  it would make every quiet node write every cycle. A series that moves by 0.5 needs its spectrum
  to move by 2 x tolerance;
- conditions: type, status and reason; messages, observedAt, lastTransitionTime and
  observedGeneration never trigger a write on their own (they ride along with the next one).

The publisher learns ``status.allocated`` (the operator's ledger) from the response of its own
status apply, and uses it for the headroom gate, so it never reads the object separately.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from lightkube import Client
from lightkube.types import PatchType

from capacity_agent.backoff import Backoff
from capacity_agent.cluster import CapacityNodes, describe_failure, http_status
from capacity_agent.measurement import NodeMeasurements
from capacity_agent.metrics import AgentMetrics
from capacity_agent.settings import FIELD_MANAGER
from capacity_api import API_VERSION
from capacity_api.admission import LEDGER_BYTES, NODE_BYTES
from capacity_api.models import CapacityNode, CapacityNodeSpec, CapacityNodeStatus, ObjectMeta

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

MAX_OBJECT_BYTES = NODE_BYTES - LEDGER_BYTES
"""The agent's spec and status (as JSON) stay below this, so that with the operator's ledger at
its budget (``status.allocated``, at most LEDGER_BYTES) a CapacityNode stays under 16 KiB
(DESIGN section 4)."""
SPECTRAL_KEYS = frozenset({"fingerprint", "lambda1", "lambdaInt", "entropy"})
IGNORED_KEYS = frozenset({"observedAt", "lastTransitionTime", "message", "observedGeneration"})
MANAGED_BY = {"app.kubernetes.io/managed-by": FIELD_MANAGER}


# ---------------------------------------------------------------------------------------------
# Change detection


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a JSON value by dotted path; conditions are keyed by their type, not position."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        keyed = prefix.endswith("conditions") and all(
            isinstance(item, dict) and "type" in item for item in value
        )
        for index, item in enumerate(value):
            key = item["type"] if keyed else str(index)
            out.update(flatten(item, f"{prefix}.{key}"))
    else:
        out[prefix] = value
    return out


def _substrate_of(path: str) -> str | None:
    parts = path.split(".")
    if len(parts) > 2 and parts[0] == "status" and parts[1] in ("readings", "gates"):
        return parts[2]
    return None


def changes(
    previous: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    tolerance: float,
    load_ranges: Mapping[str, float] | None = None,
) -> list[str]:
    """Paths of ``current`` (a flattened object) that differ from ``previous`` enough to write
    (rules in the module docstring). Everything differs from None."""
    if previous is None:
        return ["(never published)"]
    ranges = load_ranges or {}
    changed: list[str] = []
    for path in sorted(previous.keys() | current.keys()):
        parts = path.split(".")
        if parts[-1] in IGNORED_KEYS:
            continue
        if path not in previous or path not in current:
            changed.append(path)
            continue
        old, new = previous[path], current[path]
        if _is_float(old) and _is_float(new) and not path.startswith("spec."):
            delta = abs(float(new) - float(old))
            if "pressure" in parts:
                delta /= 100.0
            elif SPECTRAL_KEYS.intersection(parts[3:5]):
                delta *= min(1.0, ranges.get(_substrate_of(path) or "", 1.0))
            if delta > tolerance or math.isnan(delta):
                changed.append(path)
        elif old != new:
            changed.append(path)
    return changed


def _is_float(value: Any) -> bool:
    return isinstance(value, float)


# ---------------------------------------------------------------------------------------------
# Bodies


def node_object(name: str, spec: CapacityNodeSpec, status: CapacityNodeStatus) -> CapacityNode:
    """The whole CapacityNode as the agent sees it (for size checks and tests)."""
    return CapacityNode(metadata=ObjectMeta(name=name), spec=spec, status=status)


def spec_body(name: str, spec: CapacityNodeSpec) -> JSON:
    """The apply configuration of the resource: the spec, never the status."""
    return {
        "apiVersion": API_VERSION,
        "kind": CapacityNode.kind,
        "metadata": {"name": name, "labels": dict(MANAGED_BY)},
        "spec": spec.wire(),
    }


def status_body(name: str, status: CapacityNodeStatus) -> JSON:
    """The apply configuration of the status subresource: never ``status.allocated``."""
    wire = status.wire()
    wire.pop("allocated", None)
    return {
        "apiVersion": API_VERSION,
        "kind": CapacityNode.kind,
        "metadata": {"name": name},
        "status": wire,
    }


def object_size(spec: JSON, status: JSON) -> int:
    """Bytes of the JSON of spec and status together (what a CapacityNode carries)."""
    merged = {**spec, "status": status.get("status", {})}
    return len(json.dumps(merged, separators=(",", ":")).encode())


def fit(spec: JSON, status: JSON, limit: int = MAX_OBJECT_BYTES) -> JSON:
    """``status`` trimmed until spec and status together are under ``limit`` bytes.

    A node measuring a few substrates is far under the limit (2-4 KB here); one measuring every
    substrate with 16 signals each of long names and every condition at its longest message is
    about 14 KB, over the agent's 10 KiB share (the operator's ledger has the other 6 KiB), and
    so are collectors with unforeseen signal names: signals are cut to the busiest 8, then 4,
    then none, then fingerprints and messages go. Load summaries, gates and condition statuses
    are always kept.
    """
    if object_size(spec, status) < limit:
        return status
    body = copy.deepcopy(status)
    readings: dict[str, JSON] = body["status"].get("readings") or {}
    for keep in (8, 4, 0):
        for reading in readings.values():
            signals = reading.pop("signals", None) or {}
            busiest = sorted(signals.items(), key=lambda item: -float(item[1].get("p95", 0)))
            if keep and busiest:
                reading["signals"] = dict(sorted(busiest[:keep]))
        if object_size(spec, body) < limit:
            return body
    for reading in readings.values():
        reading.pop("fingerprint", None)
    for condition in body["status"].get("conditions") or []:
        condition["message"] = str(condition.get("message", ""))[:64]
    return body


def allocated_shares(body: Mapping[str, Any] | None) -> dict[str, float]:
    """``status.allocated.<substrate>.share`` of a CapacityNode body (the operator's ledger)."""
    status = (body or {}).get("status") or {}
    shares: dict[str, float] = {}
    for substrate, allocation in (status.get("allocated") or {}).items():
        try:
            share = float(allocation.get("share", 0.0))
        except (AttributeError, TypeError, ValueError):
            continue
        if math.isfinite(share):
            shares[str(substrate)] = min(1.0, max(0.0, share))
    return shares


# ---------------------------------------------------------------------------------------------
# The API


class NodeApi(Protocol):
    """Server-side apply of one CapacityNode (blocking)."""

    def apply(self, body: JSON, *, status: bool) -> JSON:
        """Apply ``body`` to the resource (``status=False``) or its status subresource; returns
        the object. Raises the client's error (404 when applying status to a missing object:
        :func:`capacity_agent.cluster.http_status` tells)."""
        ...


class KubeNodeApi:
    """:class:`NodeApi` over the agent's lightkube client (its timeout bounds each apply)."""

    def __init__(self, api: Client) -> None:
        self.api = api

    def apply(self, body: JSON, *, status: bool, field_manager: str = FIELD_MANAGER) -> JSON:
        name = body["metadata"]["name"]
        resource = CapacityNodes.Status if status else CapacityNodes
        result = self.api.patch(
            resource,
            name,
            body,
            patch_type=PatchType.APPLY,
            field_manager=field_manager,
            force=True,
        )
        return dict(result)


# ---------------------------------------------------------------------------------------------
# The publisher


class Publisher:
    """Writes one node's CapacityNode on change, plus a heartbeat (module docstring)."""

    def __init__(
        self,
        name: str,
        measurements: NodeMeasurements,
        api: NodeApi,
        *,
        publish_interval: float = 10.0,
        tolerance: float = 0.02,
        heartbeat_intervals: int = 2,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        backoff: Backoff | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.name = name
        self.measurements = measurements
        self.api = api
        self.publish_interval = publish_interval
        self.tolerance = tolerance
        self.heartbeat_intervals = heartbeat_intervals
        self.clock = clock
        self.sleep = sleep
        self.backoff = backoff or Backoff()
        self.metrics = metrics
        self.allocated: dict[str, float] = {}
        """The operator's allocation per substrate, from the newest apply response."""
        self.generation: int | None = None
        self.resource_version: str | None = None
        self.writes = 0
        self.skipped = 0
        self.failures = 0
        self.recreated = 0
        """Times the object was found deleted and recreated."""
        self.cycles_since_write = 0
        self.published = asyncio.Event()
        """Set once the CapacityNode has been written by this process (it exists)."""
        self._published: dict[str, Any] | None = None
        self._spec_applied: JSON | None = None
        self._failing_since: float | None = None
        self._trimmed = False

    async def run(self, first_delay: float = 0.0, stagger: float | None = None) -> None:
        """Publish every ``publish_interval``, the first time after ``first_delay`` (so that the
        first object already carries readings); retry failures with backoff. Never returns.

        ``stagger`` (0 to ``publish_interval``): the wait after the first write that succeeded,
        instead of a whole interval, so that the nodes of one process (simulated ones, or a
        DaemonSet rolled out at once) spread their writes over the interval instead of writing
        all together every period."""
        if first_delay > 0:
            await self.sleep(first_delay)
        while True:
            started = self.clock()
            try:
                await self.publish_once(started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the publisher must outlive any API failure
                delay = self._failed(exc, started)
            else:
                if self._failing_since is not None:
                    log.info(
                        "%s: CapacityNode published again after %d failed attempts",
                        self.name,
                        self.backoff.attempts,
                    )
                    self._failing_since = None
                self.backoff.reset()
                period = self.publish_interval
                if stagger is not None and self.published.is_set():
                    period, stagger = min(stagger, period), None
                delay = period - (self.clock() - started)
            await self.sleep(max(0.0, delay))

    def _failed(self, exc: Exception, now: float) -> float:
        self.failures += 1
        if self.metrics is not None:
            self.metrics.publish_failures.labels(node=self.name).inc()
        delay = self.backoff.next()
        if self._failing_since is None:
            self._failing_since = now
        detail = describe_failure(exc)
        log.warning(
            "%s: publishing the CapacityNode failed (attempt %d: %s); retrying in %.1f s",
            self.name,
            self.backoff.attempts,
            detail,
            delay,
        )
        return delay

    async def snapshot(self, now: float) -> tuple[JSON, JSON]:
        """(spec body, status body) as of ``now``, within :data:`MAX_OBJECT_BYTES` (:func:`fit`).
        The spec reads the collectors' geometry and capacity, so it is built in a worker thread;
        the status is built on the loop."""
        spec = await asyncio.to_thread(self.measurements.spec, self.name)
        status = self.measurements.build_status(now, self.allocated, generation=self.generation)
        spec_json, status_json = spec_body(self.name, spec), status_body(self.name, status)
        fitted = fit(spec_json, status_json)
        if fitted is not status_json and not self._trimmed:
            self._trimmed = True
            log.warning(
                "%s: CapacityNode over %d bytes; signals trimmed to fit (%d bytes); logged once",
                self.name,
                MAX_OBJECT_BYTES,
                object_size(spec_json, fitted),
            )
        return spec_json, fitted

    def pending_changes(self, spec: JSON, status: JSON) -> list[str]:
        """Why these bodies would be written now (empty: skip this cycle)."""
        current = flatten({"spec": spec["spec"], "status": status["status"]})
        ranges = {s.value: self.measurements.load_range(s) for s in self.measurements.substrates}
        return changes(self._published, current, tolerance=self.tolerance, load_ranges=ranges)

    async def publish_once(self, now: float) -> bool:
        """Write the CapacityNode if it changed or the heartbeat is due; True when it wrote.

        Raises whatever the API raised; the published state is then left as it was.
        """
        spec_json, status_json = await self.snapshot(now)
        reasons = self.pending_changes(spec_json, status_json)
        heartbeat = self.cycles_since_write + 1 >= self.heartbeat_intervals
        if not reasons and not heartbeat:
            self.cycles_since_write += 1
            self.skipped += 1
            if self.metrics is not None:
                self.metrics.publishes_skipped.labels(node=self.name).inc()
            return False
        started = time.perf_counter()
        result = await asyncio.to_thread(self._write, spec_json, status_json)
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.publish_seconds.labels(node=self.name).observe(elapsed)
            self.metrics.publishes.labels(node=self.name).inc()
        self.writes += 1
        self.cycles_since_write = 0
        self._published = flatten({"spec": spec_json["spec"], "status": status_json["status"]})
        metadata = result.get("metadata") or {}
        self.resource_version = metadata.get("resourceVersion")
        generation = metadata.get("generation")
        self.generation = int(generation) if isinstance(generation, int) else self.generation
        self.allocated = allocated_shares(result)
        self.published.set()
        log.debug(
            "%s: published (%s) in %.3f s",
            self.name,
            ", ".join(reasons[:5]) or "heartbeat",
            elapsed,
        )
        return True

    def _write(self, spec: JSON, status: JSON) -> JSON:
        """Apply spec (when it changed since the last successful apply) and status (blocking)."""
        if self._spec_applied != spec:
            self._observe_generation(self.api.apply(spec, status=False), status)
            self._spec_applied = spec
        try:
            return self.api.apply(status, status=True)
        except Exception as exc:
            if http_status(exc) != 404:
                raise
        # the object is gone (deleted by someone): recreate it, then write the status again
        self._spec_applied = None
        log.warning("%s: CapacityNode was deleted; recreating it", self.name)
        self._observe_generation(self.api.apply(spec, status=False), status)
        self._spec_applied = spec
        self.recreated += 1
        return self.api.apply(status, status=True)

    def _observe_generation(self, result: JSON, status: JSON) -> None:
        """Stamp the generation the spec apply produced onto the status about to be written."""
        generation = (result.get("metadata") or {}).get("generation")
        if not isinstance(generation, int):
            return
        self.generation = generation
        body = status["status"]
        body["observedGeneration"] = generation
        for condition in body.get("conditions") or []:
            condition["observedGeneration"] = generation
