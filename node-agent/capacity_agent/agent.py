"""The agent runtime: per hosted node a measurement loop, a publisher and a lease renewer, as
asyncio tasks, plus the voter and the /metrics + /healthz server for the whole process.

Blocking work (collectors reading /proc, /sys, NVML or a database; every Kubernetes API call) runs
in the loop's default executor, a thread pool of ``settings.threads`` workers. The windows are only
ever touched on the event loop: collectors run in threads, their samples are recorded on the loop
(:meth:`NodeMeasurements.record`), so the voter reads them without locks.

The clock (Unix seconds) and the sleep are injected, so tests can drive the loops without waiting.

Extension point for the voter (and anything else that serves every hosted node)::

    VoterFactory = Callable[[Sequence[NodeAgent], Client], Awaitable[None]]

``run_agents(settings, api, voter_factory=f)`` calls ``f(agents, api)`` once every hosted node's
agent is built and its loops started, and runs the awaitable as one more task. Each
:class:`NodeAgent` offers ``name``, ``settings``, ``measurements`` (the :class:`NodeMeasurements`:
``series``, ``samples``, ``newest_time``, ``is_stale``, ``pressure_conditions``) and
``lease.last_renewed()``. If any task ends (a crash: the loops themselves never return), the
runtime stops every task and :func:`run_agents` raises, so the process exits and is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from lightkube import Client

from capacity_agent.backoff import Backoff
from capacity_agent.collectors.base import Collector
from capacity_agent.collectors.gpu import GpuCollector
from capacity_agent.collectors.host import HostCollector
from capacity_agent.collectors.network import NetworkCollector
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.sources import (
    ReplayCollector,
    SourceKind,
    SyntheticCollector,
    SyntheticKind,
)
from capacity_agent.collectors.storage import StorageCollector
from capacity_agent.collectors.thermal import ThermalCollector
from capacity_agent.lease import KubeLeaseApi, LeaseApi, LeaseRenewer
from capacity_agent.measurement import NodeMeasurements, discover
from capacity_agent.metrics import AgentMetrics, HealthServer
from capacity_agent.publisher import KubeNodeApi, NodeApi, Publisher
from capacity_agent.settings import AgentSettings
from capacity_agent.witness import endpoint_url
from capacity_api.models import Substrate

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
DSN_VARIABLES = ("CAPACITY_DB_DSN", "CAPACITY_DB_DSN_FILE")
"""Where the database collector finds its DSN (collectors.database.resolve_dsn)."""
CollectorFactory = Callable[[AgentSettings, int, Clock], list[Collector]]
"""Builds the collectors of hosted node number ``index`` (0 for a real agent)."""


class NodeAgent:
    """One hosted node: its measurements, publisher and lease renewer."""

    def __init__(
        self,
        name: str,
        settings: AgentSettings,
        measurements: NodeMeasurements,
        publisher: Publisher,
        lease: LeaseRenewer,
        *,
        metrics: AgentMetrics,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = name
        self.settings = settings
        self.measurements = measurements
        self.publisher = publisher
        self.lease = lease
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.ticks = 0
        self.last_tick: float | None = None
        """Clock time of the newest completed measurement tick (health)."""

    async def tick(self) -> None:
        """Sample every substrate once (collectors in worker threads, concurrently) and record
        the samples on the loop."""
        outcomes = await asyncio.gather(
            *(
                asyncio.to_thread(self.measurements.collect_one, substrate)
                for substrate in self.measurements.substrates
            )
        )
        now = self.clock()
        result = self.measurements.record(now, outcomes)
        for substrate in result.sampled:
            self.metrics.samples.labels(node=self.name, substrate=substrate.value).inc()
        for substrate in result.failed:
            self.metrics.collector_errors.labels(node=self.name, substrate=substrate.value).inc()
        self.ticks += 1
        self.last_tick = now
        self.metrics.last_tick.labels(node=self.name).set(now)

    async def measure(self) -> None:
        """Tick every ``interval`` on a fixed schedule; never bursts to catch up. Never returns."""
        interval = self.settings.interval
        next_at = self.clock()
        while True:
            await self.tick()
            next_at += interval
            now = self.clock()
            delay = next_at - now
            if delay < 0:  # a slow tick: start the next one now, without catching up
                next_at, delay = now, 0.0
            elif delay > interval:  # the clock stepped back
                next_at, delay = now + interval, interval
            await self.sleep(delay)


VoterFactory = Callable[[Sequence[NodeAgent], Client], Awaitable[None]]
"""Called once with every hosted node's agent; the awaitable runs as a task until shutdown."""
WitnessFactory = Callable[[Sequence[NodeAgent], Client, str | None], Awaitable[None]]
"""As :data:`VoterFactory`, plus the URL of this process's health endpoint (None: none)."""


def build_collectors(settings: AgentSettings, index: int, clock: Clock) -> list[Collector]:
    """The collectors of hosted node ``index`` for ``settings.source`` (presence not checked).

    ``live``: host, storage, network, thermal and GPU from the host's /proc and /sys, and the
    database when ``CAPACITY_DB_DSN`` (or ``CAPACITY_DB_DSN_FILE``) names one; restricted to
    ``settings.substrates`` when given. ``synthetic:KIND``: one synthetic collector per substrate
    in ``settings.substrates`` (default: host), seeded by the node's index so simulated nodes
    differ. ``replay:FILE`` and ``prometheus:URL``: the host substrate from that source.
    """
    source = settings.source_spec
    wanted = settings.substrates
    if source.kind is SourceKind.SYNTHETIC:
        kind = source.synthetic or SyntheticKind.STEADY
        return [
            SyntheticCollector(
                kind,
                substrate=substrate,
                seed=index * len(Substrate) + position,
                clock=clock,
                step=settings.interval,
            )
            for position, substrate in enumerate(wanted or [Substrate.HOST])
        ]
    if source.kind is SourceKind.REPLAY:
        assert source.path is not None
        return [ReplayCollector(source.path, Substrate.HOST, clock)]
    if source.kind is SourceKind.PROMETHEUS:
        from capacity_agent.collectors.prometheus import PrometheusHostCollector  # noqa: PLC0415

        assert source.url is not None
        return [
            PrometheusHostCollector(source.url, instance=settings.prometheus_instance, clock=clock)
        ]
    paths = HostPaths(proc=settings.proc_root, sys=settings.sys_root)
    collectors: list[Collector] = [
        HostCollector(paths, cgroup_path=settings.cgroup_path, clock=clock),
        StorageCollector(paths, clock=clock),
        NetworkCollector(paths, netns_pid=settings.netns_pid, clock=clock),
        ThermalCollector(paths, clock=clock),
        GpuCollector(clock=clock),
    ]
    configured = any(os.environ.get(key, "").strip() for key in DSN_VARIABLES)
    if configured and (wanted is None or Substrate.DATABASE in wanted):
        # psycopg costs ~20 MiB of RSS: imported only where a database is measured
        from capacity_agent.collectors.database import (  # noqa: PLC0415
            DatabaseCollector,
            resolve_dsn,
        )

        try:
            dsn = resolve_dsn()
        except ValueError as exc:
            log.error("database substrate not measured: %s", exc)
            dsn = None
        if dsn is not None:
            collectors.append(DatabaseCollector(dsn, clock=clock))
    elif wanted is not None and Substrate.DATABASE in wanted:
        log.warning(
            "database substrate asked for, but neither %s is set", " nor ".join(DSN_VARIABLES)
        )
    if wanted is not None:
        collectors = [c for c in collectors if c.substrate in wanted]
    return collectors


class AgentRuntime:
    """Builds and runs the hosted nodes' agents (see the module docstring)."""

    def __init__(
        self,
        settings: AgentSettings,
        api: Client,
        *,
        voter_factory: VoterFactory | None = None,
        witness_factory: WitnessFactory | None = None,
        collector_factory: CollectorFactory = build_collectors,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        metrics: AgentMetrics | None = None,
        node_api: NodeApi | None = None,
        lease_api: LeaseApi | None = None,
        backoff_cap: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.api = api
        self.voter_factory = voter_factory
        self.witness_factory = witness_factory
        self.collector_factory = collector_factory
        self.clock = clock
        self.sleep = sleep
        self.metrics = metrics or AgentMetrics()
        self.node_api = node_api or KubeNodeApi(api)
        self.lease_api = lease_api or KubeLeaseApi(api)
        self.backoff_cap = backoff_cap
        self.rng = rng
        self.agents: list[NodeAgent] = []
        self.server: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started_at: float | None = None

    async def _build(self, index: int, name: str) -> NodeAgent:
        s = self.settings
        collectors = await asyncio.to_thread(
            lambda: discover(
                self.collector_factory(s, index, self.clock), required=s.substrates or ()
            )
        )
        measurements = NodeMeasurements(collectors, stale_after=s.stale_seconds, node=name)
        log.info(
            "%s: measuring %s every %g s (source %s)",
            name,
            ", ".join(x.value for x in measurements.substrates) or "nothing",
            s.interval,
            s.source,
        )
        publisher = Publisher(
            name,
            measurements,
            self.node_api,
            publish_interval=s.publish_interval,
            tolerance=s.publish_tolerance,
            heartbeat_intervals=s.heartbeat_intervals,
            clock=self.clock,
            sleep=self.sleep,
            backoff=Backoff(initial=min(1.0, self.backoff_cap), cap=self.backoff_cap, rng=self.rng),
            metrics=self.metrics,
        )
        lease = LeaseRenewer(
            name,
            s.lease_namespace,
            self.lease_api,
            duration_seconds=s.lease_duration_seconds,
            renew_interval=s.lease_renew_interval,
            clock=self.clock,
            sleep=self.sleep,
            metrics=self.metrics,
        )
        return NodeAgent(
            name,
            s,
            measurements,
            publisher,
            lease,
            metrics=self.metrics,
            clock=self.clock,
            sleep=self.sleep,
        )

    async def start(self) -> None:
        """Build every hosted node's agent and start its loops (and the voter, and the server)."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            ThreadPoolExecutor(self.settings.threads, thread_name_prefix="capacity-agent")
        )
        self._started_at = self.clock()
        names = self.settings.node_names()
        self.agents = list(
            await asyncio.gather(*(self._build(i, name) for i, name in enumerate(names)))
        )
        # the first write waits for two ticks (delta collectors prime on the first one); after
        # it, each node's publishing and renewals take a random phase of their period, so that
        # the nodes of this process (and the agents of a DaemonSet started together) do not all
        # write in the same instant of every period
        first_publish = min(self.settings.publish_interval, 2.5 * self.settings.interval)
        for agent in self.agents:
            phases = random.random(), random.random()  # noqa: S311 - phases, not secrets
            publish = agent.publisher.run(
                first_delay=first_publish, stagger=phases[0] * self.settings.publish_interval
            )
            renew = agent.lease.run(stagger=phases[1] * self.settings.lease_renew_interval)
            self._tasks += [
                asyncio.create_task(agent.measure(), name=f"{agent.name}/measure"),
                asyncio.create_task(publish, name=f"{agent.name}/publish"),
                asyncio.create_task(renew, name=f"{agent.name}/lease"),
            ]
        if self.voter_factory is not None:
            voter = self.voter_factory(self.agents, self.api)
            self._tasks.append(asyncio.create_task(_awaited(voter), name="voter"))
        self._serve()
        if self.witness_factory is not None and self.agents:
            port = self.server.port if self.server is not None else 0
            endpoint = endpoint_url(self.settings.advertise_address, port)
            witness = self.witness_factory(self.agents, self.api, endpoint)
            self._tasks.append(asyncio.create_task(_awaited(witness), name="witness"))

    def _serve(self) -> None:
        if self.settings.health_port:
            try:
                self.server = HealthServer(
                    self.metrics.registry,
                    self.healthy,
                    address=self.settings.health_address,
                    port=self.settings.health_port,
                )
            except OSError as exc:  # measuring matters more than being scraped
                log.error(
                    "cannot serve /metrics and /healthz on %s:%d (%s); running without them",
                    self.settings.health_address,
                    self.settings.health_port,
                    exc,
                )
            else:
                self.server.start()

    def healthy(self) -> tuple[bool, str]:
        """Whether every hosted node's measurement loop ticked recently (for /healthz)."""
        now = self.clock()
        limit = max(5.0 * self.settings.interval, 10.0)
        started = self._started_at if self._started_at is not None else now
        late = [
            a.name
            for a in self.agents
            if (a.last_tick if a.last_tick is not None else started) < now - limit
        ]
        if not self.agents:
            return False, "no agent running"
        if late:
            return False, f"no measurement tick within {limit:g} s: {', '.join(late[:10])}"
        return True, f"ok: {len(self.agents)} node(s) measuring"

    async def wait(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise when a task ended by itself (a crash)."""
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                [stopper, *self._tasks], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        for task in done:
            if task is stopper:
                continue
            error = None if task.cancelled() else task.exception()
            raise RuntimeError(f"agent task {task.get_name()} ended unexpectedly") from error

    async def stop(self) -> None:
        """Cancel every task, close the collectors and stop the server."""
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for task, result in zip(self._tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("agent task %s failed: %s", task.get_name(), result)
        self._tasks = []
        for agent in self.agents:
            await asyncio.to_thread(agent.measurements.close)
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


async def run_agents(
    settings: AgentSettings,
    api: Client,
    *,
    voter_factory: VoterFactory | None = None,
    witness_factory: WitnessFactory | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Run every hosted node's agent until SIGTERM/SIGINT (or ``stop`` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    runtime = AgentRuntime(
        settings, api, voter_factory=voter_factory, witness_factory=witness_factory
    )
    try:
        await runtime.start()
        await runtime.wait(stop)
        log.info("stopping")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await runtime.stop()
