"""The agent as a witness of other nodes (DESIGN section 6).

Every ``interval`` the witness reads the platform namespace's Leases itself (its own live read,
not the operator's); for each node whose Lease it finds expired it probes that node's agent
health endpoint (``status.witness.endpoint`` of its CapacityNode, where one is published) and
records what it saw in ``status.witness.reports`` of its own CapacityNode. The operator fails a
suspect node at once when enough alive witnesses cannot see it either, and never while one still
can (its pods may run: moving them would count their capacity twice).

One process is one vantage point: a process hosting many simulated nodes reports as its first
node only, so that one process never counts as several witnesses.

The status is written by server-side apply under its own field manager
(:data:`WITNESS_FIELD_MANAGER`), so the publisher's applies and this one never remove each
other's fields; it is written when what it says changes, not on every pass.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx2
from lightkube import Client
from lightkube.resources.coordination_v1 import Lease

from capacity_agent.backoff import Backoff
from capacity_agent.cluster import CapacityNodes, describe_failure, http_status, lease_info
from capacity_agent.publisher import KubeNodeApi
from capacity_api import GROUP, VERSION
from capacity_api.lease import LeaseInfo
from capacity_api.models import CapacityNode, Probe, WitnessReport, WitnessStatus
from capacity_api.recovery import same_reports, suspects, witness_report

log = logging.getLogger(__name__)

WITNESS_FIELD_MANAGER = "capacity-agent-witness"
PROBE_TIMEOUT = 1.0

Sleep = Callable[[float], Awaitable[None]]


def probe(endpoint: str | None, timeout: float = PROBE_TIMEOUT) -> Probe:
    """GET the agent's health endpoint: Reachable on a 200, Unreachable on any other
    answer (an agent whose loops stopped answers 503), a refusal or a timeout."""
    if not endpoint:
        return Probe.NO_ENDPOINT
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:  # noqa: S310 - http(s) URL from the node's status
            return Probe.REACHABLE if response.status == 200 else Probe.UNREACHABLE
    except (urllib.error.URLError, OSError, ValueError):
        return Probe.UNREACHABLE


class Witness:
    """Reports, as node ``name``, on the nodes whose Leases it finds expired."""

    def __init__(
        self,
        api: Client,
        name: str,
        hosted: list[str],
        namespace: str,
        *,
        endpoint: str | None,
        interval: float,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.api = api
        self.name = name
        self.hosted = hosted
        self.namespace = namespace
        self.endpoint = endpoint
        self.interval = interval
        self.sleep = sleep
        self.nodes = KubeNodeApi(api)
        self.backoff = Backoff(initial=1.0, cap=30.0)
        self.written: list[WitnessReport] | None = None
        """The reports of the last successful write (None: nothing written yet by this
        process, not even the endpoint)."""

    async def run(self) -> None:
        """One pass every ``interval``; a failed pass is retried with backoff. Never returns."""
        while True:
            try:
                await self.step(datetime.now(UTC))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server down, a malformed object: try again
                delay = self.backoff.next()
                log.warning(
                    "witness pass failed (%s); retrying in %.1fs", describe_failure(exc), delay
                )
                await self.sleep(delay)
                continue
            self.backoff.reset()
            await self.sleep(self.interval)

    async def step(self, now: datetime) -> list[WitnessReport]:
        leases = await asyncio.to_thread(self._leases)
        reports = []
        for lease in suspects(leases, self.hosted, now):
            endpoint = await asyncio.to_thread(self._endpoint_of, lease.name)
            found = await asyncio.to_thread(probe, endpoint)
            reports.append(witness_report(lease, found, now))
        if self.written is not None and same_reports(self.written, reports):
            return reports
        await asyncio.to_thread(self._apply, reports)
        self.written = reports
        for report in reports:
            log.info(
                "witness: node %s %s (lease renewed %s, probe %s)",
                report.node,
                "alive" if report.alive else "not seen alive",
                report.lease_renew_time.isoformat() if report.lease_renew_time else "never",
                report.probe.value,
            )
        return reports

    # -- I/O ----------------------------------------------------------------------------------

    def _leases(self) -> list[LeaseInfo]:
        return [lease_info(lease) for lease in self.api.list(Lease, namespace=self.namespace)]

    def _endpoint_of(self, node: str) -> str | None:
        try:
            body = self.api.get(CapacityNodes, node)
        except httpx2.HTTPStatusError as exc:
            if http_status(exc) == 404:
                return None
            raise
        witness = (body.get("status") or {}).get("witness") or {}
        endpoint = witness.get("endpoint")
        return str(endpoint) if endpoint else None

    def _apply(self, reports: list[WitnessReport]) -> None:
        status = WitnessStatus(endpoint=self.endpoint, reports=reports)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": CapacityNode.kind,
            "metadata": {"name": self.name},
            "status": {"witness": status.wire()},
        }
        try:
            self.nodes.apply(body, status=True, field_manager=WITNESS_FIELD_MANAGER)
        except httpx2.HTTPStatusError as exc:
            if http_status(exc) == 404:  # the publisher has not created the object yet
                raise RuntimeError(f"CapacityNode {self.name} does not exist yet") from exc
            raise


def endpoint_url(address: str | None, port: int) -> str | None:
    """The health URL other agents probe (None without an advertised address or a server)."""
    if not address or not port:
        return None
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/healthz"
