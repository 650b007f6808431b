"""The agent's Prometheus metrics and its /metrics + /healthz server.

Metrics live in a registry of their own (one per process, never the global default registry), so
that tests can build as many agents as they like. Every series carries the ``node`` label, because
one process may host many simulated nodes.

The server is prometheus_client's WSGI app behind the standard library's threading WSGI server, in
a daemon thread, with one extra route: ``/healthz`` answers 200 while every hosted node's
measurement loop has ticked recently, 503 (naming the nodes) otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

log = logging.getLogger(__name__)

PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Health = Callable[[], tuple[bool, str]]
"""Returns whether the agent is healthy and a one-line explanation."""


class AgentMetrics:
    """Every metric the agent exports (names carry the ``capacity_agent_`` prefix)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        node_substrate = ["node", "substrate"]
        self.samples = Counter(
            "capacity_agent_samples",
            "Samples taken and added to a window",
            node_substrate,
            registry=r,
        )
        self.collector_errors = Counter(
            "capacity_agent_collector_errors",
            "Samples that failed (skipped, never read as zero load)",
            node_substrate,
            registry=r,
        )
        self.publish_seconds = Histogram(
            "capacity_agent_publish_seconds",
            "Latency of one CapacityNode write (server-side apply of spec and status)",
            ["node"],
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self.publishes = Counter(
            "capacity_agent_publishes", "CapacityNode writes that succeeded", ["node"], registry=r
        )
        self.publishes_skipped = Counter(
            "capacity_agent_publishes_skipped",
            "Publish cycles without a write: nothing changed beyond the tolerance",
            ["node"],
            registry=r,
        )
        self.publish_failures = Counter(
            "capacity_agent_publish_failures",
            "CapacityNode writes that failed (retried with backoff)",
            ["node"],
            registry=r,
        )
        self.lease_renewals = Counter(
            "capacity_agent_lease_renewals", "Lease renewals that succeeded", ["node"], registry=r
        )
        self.lease_renew_failures = Counter(
            "capacity_agent_lease_renew_failures",
            "Lease renewals that failed (retried with backoff)",
            ["node"],
            registry=r,
        )
        self.last_tick = Gauge(
            "capacity_agent_last_tick_timestamp_seconds",
            "Unix time of the newest measurement tick",
            ["node"],
            registry=r,
        )

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample, e.g. ``value("capacity_agent_publishes_total",
        node="n1")``; 0.0 when the series does not exist yet."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else float(found)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)  # noqa: G003 - the stdlib hands us a %-format


def make_app(registry: CollectorRegistry, health: Health) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: /metrics (Prometheus text format) and /healthz."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok, text = health()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode() + b"\n"]
        if path == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class HealthServer:
    """Serves /metrics and /healthz from a daemon thread. Port 0 picks a free port."""

    def __init__(
        self, registry: CollectorRegistry, health: Health, *, address: str, port: int
    ) -> None:
        self._server = make_server(
            address,
            port,
            make_app(registry, health),
            server_class=_Server,
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="capacity-agent-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()
        log.info("serving /metrics and /healthz on port %d", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
