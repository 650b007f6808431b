"""The node's Lease: ``coordination.k8s.io/v1``, named after the node, in the platform namespace.

Renewed every ``renew_interval`` with one merge patch of ``spec`` (holderIdentity = the node name,
leaseDurationSeconds, renewTime), without a read first. A patch that finds no Lease creates it
(acquireTime = renewTime) by server-side apply, whose body goes out as written: a typed lightkube
Lease would drop the fraction of a whole second, and the API server refuses a MicroTime without
its six digits. Both writes name the field manager ``capacity-agent``.

A renewal that fails is counted and retried with exponential backoff and jitter, starting at a
quarter of the renew interval and never waiting longer than the renew interval itself, so a short
API outage costs the lease at most one renewal period more than the outage (the lease stays valid
through outages shorter than leaseDurationSeconds minus the renew interval). A missing namespace
is logged as the configuration error it is and retried the same way; the agent never creates
namespaces.

:meth:`LeaseRenewer.last_renewed` is the Unix time of the newest successful renewal: the voter uses
it to refuse YES votes while its own lease may have expired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from lightkube import Client
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

from capacity_agent.backoff import Backoff
from capacity_agent.cluster import describe_failure, http_status
from capacity_agent.metrics import AgentMetrics
from capacity_agent.publisher import MANAGED_BY
from capacity_agent.settings import FIELD_MANAGER

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class LeaseNamespaceMissingError(RuntimeError):
    """The Lease namespace does not exist (the chart creates it; the agent never does)."""


def micro_time(ts: float) -> str:
    """A Kubernetes MicroTime: RFC 3339 with exactly six fractional digits, in UTC."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseApi(Protocol):
    """Renews (or creates) one Lease (blocking)."""

    def renew(
        self, name: str, namespace: str, *, holder: str, duration_seconds: int, now: float
    ) -> None: ...


class KubeLeaseApi:
    """:class:`LeaseApi` over the agent's lightkube client (its timeout bounds each request)."""

    def __init__(self, api: Client) -> None:
        self.api = api

    def renew(
        self, name: str, namespace: str, *, holder: str, duration_seconds: int, now: float
    ) -> None:
        stamp = micro_time(now)
        spec = {"holderIdentity": holder, "leaseDurationSeconds": duration_seconds}
        try:
            self._patch(name, namespace, {"spec": {**spec, "renewTime": stamp}})
            return
        except Exception as exc:
            if http_status(exc) != 404:
                raise
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "spec": {**spec, "acquireTime": stamp, "renewTime": stamp},
        }
        try:
            self.api.patch(
                Lease,
                name,
                body,
                namespace=namespace,
                patch_type=PatchType.APPLY,
                field_manager=FIELD_MANAGER,
            )
        except Exception as exc:
            status = http_status(exc)
            if status == 404:
                raise LeaseNamespaceMissingError(
                    f"namespace {namespace!r} for the node Leases does not exist; create it (the "
                    "Helm chart does) or set CAPACITY_AGENT_LEASE_NAMESPACE"
                ) from exc
            if status != 409:  # 409: created meanwhile by another writer (a conflict); renew it
                raise
            self._patch(name, namespace, {"spec": {**spec, "renewTime": stamp}})

    def _patch(self, name: str, namespace: str, body: dict[str, object]) -> None:
        self.api.patch(
            Lease,
            name,
            body,
            namespace=namespace,
            patch_type=PatchType.MERGE,
            field_manager=FIELD_MANAGER,
        )


class LeaseRenewer:
    """Keeps one node's Lease renewed (module docstring)."""

    def __init__(
        self,
        name: str,
        namespace: str,
        api: LeaseApi,
        *,
        duration_seconds: int = 40,
        renew_interval: float = 10.0,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        backoff: Backoff | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.api = api
        self.duration_seconds = duration_seconds
        self.renew_interval = renew_interval
        self.clock = clock
        self.sleep = sleep
        self.backoff = backoff or Backoff(initial=min(1.0, renew_interval / 4), cap=renew_interval)
        self.metrics = metrics
        self.renewals = 0
        self.failures = 0
        self._renewed_at: float | None = None

    def last_renewed(self) -> float | None:
        """Unix time of the newest successful renewal; None before the first."""
        return self._renewed_at

    async def renew_once(self, now: float) -> None:
        """Renew (or create) the Lease once; raises on failure."""
        await asyncio.to_thread(
            self.api.renew,
            self.name,
            self.namespace,
            holder=self.name,
            duration_seconds=self.duration_seconds,
            now=now,
        )
        self._renewed_at = now
        self.renewals += 1
        if self.metrics is not None:
            self.metrics.lease_renewals.labels(node=self.name).inc()

    async def run(self, stagger: float | None = None) -> None:
        """Renew every ``renew_interval``; back off on failure. Never returns. ``stagger`` (0 to
        ``renew_interval``): the wait after the first renewal, instead of a whole interval, so
        that the nodes of one process do not all renew at the same moment of every period."""
        while True:
            started = self.clock()
            try:
                await self.renew_once(started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # renewals must outlive any API failure
                delay = self._failed(exc)
            else:
                if self.backoff.attempts:
                    log.info(
                        "%s: lease renewed again after %d failures",
                        self.name,
                        self.backoff.attempts,
                    )
                self.backoff.reset()
                period = self.renew_interval
                if stagger is not None:
                    period, stagger = min(stagger, period), None
                delay = period - (self.clock() - started)
            await self.sleep(max(0.0, delay))

    def _failed(self, exc: Exception) -> float:
        self.failures += 1
        if self.metrics is not None:
            self.metrics.lease_renew_failures.labels(node=self.name).inc()
        delay = self.backoff.next()
        if isinstance(exc, LeaseNamespaceMissingError):
            detail = str(exc)
            log.error(
                "%s: cannot renew the lease: %s; retrying in %.1f s", self.name, detail, delay
            )
            return delay
        detail = describe_failure(exc)
        log.warning(
            "%s: lease renewal failed (attempt %d: %s); retrying in %.1f s",
            self.name,
            self.backoff.attempts,
            detail,
            delay,
        )
        return delay
