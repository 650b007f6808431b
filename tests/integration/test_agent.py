"""The node agent on a real API server: it creates its CapacityNode and Lease, renews the lease,
writes only on change (plus the heartbeat), recovers a deleted object, and rides out an API server
that stops and starts again (on a private control plane, so the shared one is left alone).

The agent runs in-process (its asyncio tasks in the test's event loop) with a synthetic source and
short intervals; the tests read its metrics to count writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_agent import cluster as agent_cluster
from capacity_agent.agent import AgentRuntime
from capacity_agent.publisher import MAX_OBJECT_BYTES
from capacity_agent.settings import FIELD_MANAGER, AgentSettings
from capacity_api import GROUP, VERSION
from tests import kube

T = TypeVar("T")
JSON = dict[str, Any]
CONTROL_PLANE = kube.REPO / "hack" / "control-plane"


def agent_settings(name: str, namespace: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "node_name": name,
        "source": "synthetic:steady",
        "interval": 0.05,
        "publish_interval": 1.0,
        "heartbeat_intervals": 3,
        "lease_namespace": namespace,
        "lease_duration_seconds": 10,
        "lease_renew_interval": 0.5,
        "health_port": 0,
        "threads": 4,
        "request_timeout": 3.0,
        "vote": False,
    }
    values.update(overrides)
    return AgentSettings(**values)


def unique_node() -> str:
    return f"it-agent-{uuid.uuid4().hex[:8]}"


async def until(
    what: str, probe: Callable[[], T | None], within: float = 20.0, every: float = 0.1
) -> T:
    """Poll ``probe`` (run in a thread, it may call the API) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(every)


def read_node(custom: client.CustomObjectsApi, name: str) -> JSON | None:
    try:
        body: JSON = custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return body


def read_lease(api: client.ApiClient, namespace: str, name: str) -> Any:
    try:
        return client.CoordinationV1Api(api).read_namespaced_lease(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def delete_node(custom: client.CustomObjectsApi, name: str) -> None:
    try:
        custom.delete_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def ready_with_samples(body: JSON | None, samples: int = 1) -> bool:
    if body is None:
        return False
    status = body.get("status") or {}
    host = (status.get("readings") or {}).get("host") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return ready and host.get("samples", 0) >= samples


def run_agent(
    kubeconfig: Path,
    settings: AgentSettings,
    scenario: Callable[[AgentRuntime], Awaitable[None]],
    **options: Any,
) -> None:
    """Start the agent (with its own Kubernetes client, as ``capacity-agent`` builds it) in this
    thread's event loop, run ``scenario``, always stop the agent."""

    async def main() -> None:
        runtime = AgentRuntime(settings, agent_api, **options)
        await runtime.start()
        try:
            await scenario(runtime)
        finally:
            await runtime.stop()

    access = agent_cluster.load(str(kubeconfig))
    with agent_cluster.api_client(access, timeout=settings.request_timeout) as agent_api:
        asyncio.run(main())


def test_agent_creates_its_node_and_lease_and_renews_the_lease(
    api: client.ApiClient, custom: client.CustomObjectsApi, namespace: str, kubeconfig: Path
) -> None:
    name = unique_node()
    settings = agent_settings(name, namespace)

    async def scenario(runtime: AgentRuntime) -> None:
        node = await until(
            "a Ready CapacityNode", lambda: ready_with_samples(read_node(custom, name))
        )
        assert node
        body = read_node(custom, name)
        assert body is not None
        assert body["spec"]["nodeName"] == name
        assert body["spec"]["substrates"] == ["host"]
        assert body["spec"]["capacity"] == {"cpu": "8", "memory": "32Gi"}
        status = body["status"]
        assert "allocated" not in status
        assert set(status["readings"]) == set(status["gates"]) == {"host"}
        assert {c["type"] for c in status["conditions"]} == {
            "Ready",
            "Stale",
            "MemoryPressure",
            "CPUPressure",
            "IOPressure",
        }
        managers = {
            (m["manager"], m.get("subresource", "")) for m in body["metadata"]["managedFields"]
        }
        assert managers == {(FIELD_MANAGER, ""), (FIELD_MANAGER, "status")}
        content = {k: v for k, v in body.items() if k != "metadata"}
        assert len(json.dumps(content, separators=(",", ":"))) < MAX_OBJECT_BYTES

        lease = await until("the Lease", lambda: read_lease(api, namespace, name))
        assert lease.spec.holder_identity == name
        assert lease.spec.lease_duration_seconds == 10
        first = lease.spec.renew_time
        renewed = await until(
            "a later renewTime",
            lambda: (
                (lease := read_lease(api, namespace, name)) is not None
                and lease.spec.renew_time > first
                and lease
            ),
            within=10.0,
        )
        assert renewed.spec.acquire_time <= first < renewed.spec.renew_time
        agent = runtime.agents[0]
        assert agent.lease.renewals >= 2
        assert agent.lease.failures == 0
        renewed_at = agent.lease.last_renewed()
        assert renewed_at is not None
        assert time.time() - renewed_at < 5

    try:
        run_agent(kubeconfig, settings, scenario)
    finally:
        delete_node(custom, name)


def test_a_steady_node_writes_only_on_the_heartbeat(
    kubeconfig: Path, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name = unique_node()
    settings = agent_settings(name, namespace, heartbeat_intervals=4)

    async def scenario(runtime: AgentRuntime) -> None:
        metrics = runtime.metrics
        # the window fills in 64 x 0.05 s; wait until a full window has been published
        await until(
            "a full window published",
            lambda: ready_with_samples(read_node(custom, name), 64),
        )
        publishes = metrics.value("capacity_agent_publishes_total", node=name)
        skipped = metrics.value("capacity_agent_publishes_skipped_total", node=name)
        versions: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < 8.5:  # 8 publish cycles: heartbeats at every 4th
            body = await asyncio.to_thread(read_node, custom, name)
            assert body is not None
            version = body["metadata"]["resourceVersion"]
            if not versions or versions[-1] != version:
                versions.append(version)
            await asyncio.sleep(0.1)
        wrote = metrics.value("capacity_agent_publishes_total", node=name) - publishes
        kept = metrics.value("capacity_agent_publishes_skipped_total", node=name) - skipped
        assert 1 <= wrote <= 3, (wrote, kept)
        assert kept >= 5, (wrote, kept)
        # every resourceVersion change is one of the agent's own writes, nothing else
        assert len(versions) - 1 <= wrote, versions
        assert runtime.agents[0].publisher.failures == 0

    try:
        run_agent(kubeconfig, settings, scenario)
    finally:
        delete_node(custom, name)


def test_a_deleted_node_is_recreated(
    kubeconfig: Path, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name = unique_node()
    settings = agent_settings(name, namespace, heartbeat_intervals=2)

    async def scenario(runtime: AgentRuntime) -> None:
        await until("a Ready CapacityNode", lambda: ready_with_samples(read_node(custom, name)))
        first = read_node(custom, name)
        assert first is not None
        await asyncio.to_thread(delete_node, custom, name)
        again = await until(
            "the CapacityNode recreated",
            lambda: (
                (body := read_node(custom, name)) is not None
                and body["metadata"]["uid"] != first["metadata"]["uid"]
                and ready_with_samples(body)
                and body
            ),
            within=15.0,
        )
        assert again["spec"]["nodeName"] == name
        assert runtime.agents[0].publisher.recreated >= 1

    try:
        run_agent(kubeconfig, settings, scenario)
    finally:
        delete_node(custom, name)


# ---------------------------------------------------------------------------------------------
# API server outage, on a private control plane


def free_port_pair() -> int:
    """A port p on 127.0.0.1 such that p and p + 1 are both free right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports")


@contextmanager
def private_control_plane(state: Path) -> Iterator[tuple[Path, Callable[..., str]]]:
    """A second etcd + kube-apiserver (no controllers) in ``state``; yields its kubeconfig and a
    function running ``hack/control-plane <command>`` against it. Always purged at the end."""
    env = {
        **os.environ,
        "CAPACITY_CP_DIR": str(state),
        "CAPACITY_CP_PORT": str(free_port_pair()),
        "CAPACITY_CP_ETCD_PORT": str(free_port_pair()),
        "CAPACITY_CP_CONTROLLERS": "0",
        # the shared cluster owns the machine's real node; this one needs an API server only
        "CAPACITY_CP_REAL_NODE": "0",
        "CAPACITY_CP_KWOK_NODES": "0",
    }

    def control(*command: str) -> str:
        out = subprocess.run(
            [str(CONTROL_PLANE), *command],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return out.stdout

    try:
        kubeconfig = Path(control("up").strip().splitlines()[-1])
        yield kubeconfig, control
    finally:
        subprocess.run(
            [str(CONTROL_PLANE), "down", "--purge"],
            env=env,
            check=False,
            capture_output=True,
            timeout=120,
        )


def test_the_agent_survives_the_api_server_stopping_and_starting(tmp_path: Path) -> None:
    name = unique_node()
    with private_control_plane(tmp_path / "cp") as (kubeconfig, control):
        kube.check_test_context(kubeconfig)
        api = kube.api_client(kubeconfig)
        try:
            kube.apply_crds(api)
            namespace = "capacity-system"
            client.CoreV1Api(api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
            )
            custom = client.CustomObjectsApi(api)
            settings = agent_settings(name, namespace, heartbeat_intervals=2)

            async def scenario(runtime: AgentRuntime) -> None:
                agent = runtime.agents[0]
                await until(
                    "a Ready CapacityNode", lambda: ready_with_samples(read_node(custom, name))
                )
                await until("the Lease", lambda: read_lease(api, namespace, name))

                await asyncio.to_thread(control, "down")
                ticks, writes = agent.ticks, agent.publisher.writes
                await until(
                    "publish and lease failures counted",
                    lambda: agent.publisher.failures >= 2 and agent.lease.failures >= 2,
                    within=30.0,
                )
                await asyncio.sleep(1.0)
                assert agent.ticks > ticks + 10  # measuring all along
                assert agent.publisher.writes == writes
                metrics = runtime.metrics
                assert metrics.value("capacity_agent_publish_failures_total", node=name) >= 2
                assert metrics.value("capacity_agent_lease_renew_failures_total", node=name) >= 2

                await asyncio.to_thread(control, "up")
                back = time.time()
                await until(
                    "a write after the restart",
                    lambda: agent.publisher.writes > writes,
                    within=60.0,
                )
                body = await until(
                    "readings observed after the restart",
                    lambda: (
                        (node := read_node(custom, name)) is not None
                        and ready_with_samples(node)
                        and node["status"]["readings"]["host"]["observedAt"]
                        >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(back))
                        and node
                    ),
                    within=30.0,
                )
                assert body["spec"]["nodeName"] == name
                lease = await until(
                    "a renewal after the restart",
                    lambda: (
                        (item := read_lease(api, namespace, name)) is not None
                        and item.spec.renew_time.timestamp() >= back
                        and item
                    ),
                    within=30.0,
                )
                assert lease.spec.holder_identity == name
                assert runtime.agents[0] is agent  # the same agent, never restarted

            run_agent(kubeconfig, settings, scenario, backoff_cap=2.0)
        finally:
            api.close()
