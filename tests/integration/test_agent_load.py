"""The live agent (HostCollector on this machine's /proc) publishes what really happens: CPU load
from stress-ng raises cpu p95 and PSI and takes headroom away, then falls back once the window has
rolled past it; memory held by stress-ng raises the memory mean.

stress-ng runs with twice as many CPU hogs as the machine has CPUs: with exactly one hog per CPU
no task waits for a CPU, so PSI cpu ``some`` hardly moves; with two per CPU every task waits about
half the time. The machine may be shared with other test runs, so every assertion compares with
the agent's own readings before and during the load, with margins, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_agent import cluster as agent_cluster
from capacity_agent.agent import AgentRuntime
from capacity_agent.settings import AgentSettings
from capacity_api import GROUP, VERSION
from capacity_api.models import Substrate
from tests.services import ensure_debs

pytestmark = pytest.mark.services

T = TypeVar("T")
JSON = dict[str, Any]
INTERVAL = 0.25
WINDOW_SECONDS = 64 * INTERVAL


def host_view(custom: client.CustomObjectsApi, name: str) -> JSON | None:
    """The host readings and gates as published, flattened for the assertions."""
    try:
        body = custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    status = body.get("status") or {}
    reading = (status.get("readings") or {}).get("host")
    gate = (status.get("gates") or {}).get("host")
    if not reading or not gate:
        return None
    signals = reading.get("signals") or {}
    view = {
        "samples": reading["samples"],
        "headroom": gate["headroom"],
        "cpu_p95": signals["cpu"]["p95"],
        "cpu_mean": signals["cpu"]["mean"],
        "memory_mean": signals["memory"]["mean"],
        "memory_max": signals["memory"]["max"],
    }
    if "psi_cpu" in signals:
        view["psi_cpu_max"] = signals["psi_cpu"]["max"]
        view["psi_cpu_mean"] = signals["psi_cpu"]["mean"]
    return view


async def until(what: str, probe: Callable[[], T | None], within: float, every: float = 0.5) -> T:
    deadline = time.monotonic() + within
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(every)


@contextmanager
def stress(*args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """stress-ng in its own process group, always killed at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["stress-ng", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_live_host_readings_follow_real_load(
    kubeconfig: Path, custom: client.CustomObjectsApi, namespace: str, tmp_path: Path
) -> None:
    ensure_debs("stress-ng")
    name = f"it-load-{uuid.uuid4().hex[:8]}"
    settings = AgentSettings(
        node_name=name,
        source="live",
        substrates=["host"],
        interval=INTERVAL,
        publish_interval=1.0,
        heartbeat_intervals=2,
        lease_namespace=namespace,
        health_port=0,
        threads=4,
        vote=False,
    )
    hogs = str(2 * (os.cpu_count() or 1))
    psi = Path("/proc/pressure/cpu").exists()

    async def scenario() -> None:
        runtime = AgentRuntime(settings, agent_api)
        await runtime.start()
        try:

            def view() -> JSON | None:
                return host_view(custom, name)

            base = await until(
                "a baseline of 8 s", lambda: (v := view()) and v["samples"] >= 32 and v, 30.0
            )

            with stress("--cpu", hogs, "--timeout", "40s", log=tmp_path / "cpu.log") as proc:
                busy = await until(
                    "cpu p95 up and headroom down",
                    lambda: (
                        (v := view())
                        and v["cpu_p95"] >= 0.9
                        and v["headroom"] <= 0.1
                        and v["cpu_mean"] >= 0.8
                        and (not psi or v["psi_cpu_max"] >= base["psi_cpu_max"] + 0.2)
                        and v
                    ),
                    within=35.0,
                )
                assert busy["cpu_p95"] > base["cpu_p95"] or base["cpu_p95"] >= 0.9
                assert busy["headroom"] < base["headroom"] or base["headroom"] <= 0.1
                proc.send_signal(signal.SIGINT)
                await asyncio.to_thread(proc.wait, 15)

            calm = await until(
                "cpu back down once the window rolled past the load",
                lambda: (
                    (v := view())
                    and v["cpu_mean"] <= busy["cpu_mean"] - 0.15
                    and v["headroom"] > busy["headroom"]
                    and v
                ),
                within=WINDOW_SECONDS + 20.0,
            )
            assert calm["cpu_p95"] <= busy["cpu_p95"]

            before = await asyncio.to_thread(view)
            assert before is not None
            vm = ("--vm", "1", "--vm-bytes", "2G", "--vm-keep", "--timeout", "40s")
            with stress(*vm, log=tmp_path / "vm.log"):
                held = await until(
                    "memory mean up",
                    lambda: (
                        (v := view())
                        and v["memory_mean"] >= before["memory_mean"] + 0.02
                        and v["memory_max"] >= before["memory_max"] + 0.04
                        and v
                    ),
                    within=35.0,
                )
            assert held["memory_mean"] > before["memory_mean"]
            # shown when the test fails, and with -s
            for label, seen in (("base", base), ("busy", busy), ("calm", calm)):
                print(f"{label}: {seen}")
            print(f"memory before: {before}\nmemory held: {held}")
            measurements = runtime.agents[0].measurements
            assert measurements.substrates == [Substrate.HOST]
            assert measurements.errors(Substrate.HOST) == 0
        finally:
            await runtime.stop()

    access = agent_cluster.load(str(kubeconfig))
    try:
        with agent_cluster.api_client(access, pool=settings.threads) as agent_api:
            asyncio.run(scenario())
    finally:
        try:
            custom.delete_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
        except ApiException as exc:
            if exc.status != 404:
                raise
