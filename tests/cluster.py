"""Run the real operator and real agents as processes against a test cluster, and read results.

Used by the integration tier and the benchmarks. Processes log to files (shown when a test
fails) and are always stopped, SIGKILL as the last resort.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from tests.services import free_port

T = TypeVar("T")
FINAL_PHASES = frozenset({"Admitted", "Rejected", "Failed"})


def decided(claim: dict[str, Any]) -> bool:
    """The operator is done with the claim for now: a final phase, or Pending until other
    claims free the room it needs (nothing it can do about that by itself)."""
    status = claim.get("status") or {}
    waiting = status.get("phase") == "Pending" and status.get("reason") == "WaitingForCapacity"
    return waiting or status.get("phase") in FINAL_PHASES


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.2,
) -> T:
    """Poll until ``probe`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def wait_events(
    core: client.CoreV1Api,
    namespace: str | None,
    field_selector: str,
    match: Callable[[Any], bool] = lambda _: True,
    timeout: float = 15.0,
) -> list[Any]:
    """The Events that ``field_selector`` selects (in ``namespace``, or in all namespaces) and
    ``match`` accepts, waited for until there is one: an Event is posted after the write it tells
    of, so it can come a moment after the state a test waited on."""

    def found() -> list[Any]:
        if namespace is None:
            items = core.list_event_for_all_namespaces(field_selector=field_selector).items
        else:
            items = core.list_namespaced_event(namespace, field_selector=field_selector).items
        return [e for e in items if match(e)]

    return wait_for(f"an Event with {field_selector}", found, timeout=timeout)


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            start_new_session=True,
        )
        handle.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a node or pod dies."""
        if self.popen is not None and self.alive:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is None or not self.alive:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def output(self) -> str:
        """Everything the process has logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def operator_proc(
    kubeconfig: Path,
    namespace: str,
    log: Path,
    *,
    standalone: bool = True,
    peering: str | None = None,
    priority: int | None = None,
    vote_timeout: float = 5.0,
    claim_namespace: str | None = None,
    extra: Iterable[str] = (),
) -> Proc:
    argv = [
        sys.executable,
        "-m",
        "capacity_operator",
        "--kubeconfig",
        str(kubeconfig),
        "--namespace",
        namespace,
        "--vote-timeout",
        str(vote_timeout),
        *extra,
    ]
    if priority is not None:
        argv += ["--priority", str(priority)]
    if claim_namespace is not None:
        argv += ["--claim-namespace", claim_namespace]
    if standalone:
        argv.append("--standalone")
    if peering:
        argv += ["--peering", peering]
    # the outcome store's SQLite file beside the log (not in the user's state directory)
    env = {"CAPACITY_OPERATOR_STORE_PATH": str(log.with_suffix(".outcomes.db"))}
    return Proc("operator", argv, log, env=env)


def agents_proc(
    kubeconfig: Path,
    namespace: str,
    log: Path,
    *,
    prefix: str,
    count: int | None,
    source: str = "synthetic:steady",
    interval: float = 0.1,
    publish_interval: float = 1.0,
    lease_duration: int = 6,
    lease_renew_interval: float = 1.0,
    extra: Iterable[str] = (),
) -> Proc:
    """``count`` simulated nodes named ``<prefix>-<i>`` in one agent process (short leases, so
    a killed agent's nodes expire within seconds); with ``count`` None, the agent of the node
    named ``prefix`` itself (pass a ``source`` such as ``live``)."""
    simulate = [] if count is None else ["--simulate", str(count)]
    argv = [
        sys.executable,
        "-m",
        "capacity_agent",
        "--kubeconfig",
        str(kubeconfig),
        "--node-name",
        prefix,
        *simulate,
        "--source",
        source,
        "--interval",
        str(interval),
        "--publish-interval",
        str(publish_interval),
        "--lease-namespace",
        namespace,
        "--health-port",  # witnesses probe each other's /healthz on loopback
        str(free_port()),
        "--advertise-address",
        "127.0.0.1",
        *extra,
    ]
    env = {
        "CAPACITY_AGENT_LEASE_DURATION_SECONDS": str(lease_duration),
        "CAPACITY_AGENT_LEASE_RENEW_INTERVAL": str(lease_renew_interval),
    }
    return Proc("agents", argv, log, env=env)


def show(*procs: Proc, lines: int = 60) -> str:
    """The last lines of each process's log, for assertion messages."""
    return "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(lines)}" for p in procs)


@contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    for proc in procs:
        proc.start()
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


class Cluster:
    """Reads and writes of claims and nodes, for assertions."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    def create_claim(self, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CapacityClaim",
            "metadata": {"name": name},
            "spec": spec,
        }
        out: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "capacityclaims", body
        )
        return out

    def claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "capacityclaims", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return out

    def delete_claim(self, namespace: str, name: str) -> None:
        """Delete a claim (no error when it is gone already)."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, "capacityclaims", name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def claims(self, namespace: str) -> list[dict[str, Any]]:
        out = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "capacityclaims")
        return list(out["items"])

    def phase(self, namespace: str, name: str) -> str | None:
        body = self.claim(namespace, name)
        return ((body or {}).get("status") or {}).get("phase")

    def wait_phase(
        self, namespace: str, name: str, phases: Iterable[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        wanted = set(phases)

        def probe() -> dict[str, Any] | None:
            body = self.claim(namespace, name)
            if body and (body.get("status") or {}).get("phase") in wanted:
                return body
            return None

        return wait_for(f"claim {namespace}/{name} in {sorted(wanted)}", probe, timeout)

    def nodes(self, prefix: str) -> dict[str, dict[str, Any]]:
        out = self.custom.list_cluster_custom_object(GROUP, VERSION, "capacitynodes")
        return {
            item["metadata"]["name"]: item
            for item in out["items"]
            if item["metadata"]["name"].startswith(prefix + "-")
        }

    def delete_nodes(self, prefix: str) -> None:
        """Delete the simulated nodes' CapacityNodes and their ballots."""
        ballots = self.custom.list_cluster_custom_object(GROUP, VERSION, "capacityballots")
        named = [b["metadata"]["name"] for b in ballots.get("items", [])]
        doomed = [("capacitynodes", n) for n in self.nodes(prefix)]
        doomed += [("capacityballots", n) for n in named if n.startswith(prefix)]
        for plural, name in doomed:
            try:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def wait_nodes_ready(self, prefix: str, count: int, timeout: float = 60.0) -> None:
        def probe() -> bool:
            ready = [
                n
                for n in self.nodes(prefix).values()
                if any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (n.get("status") or {}).get("conditions", [])
                )
                and all(
                    r.get("samples", 0) >= 16
                    for r in ((n.get("status") or {}).get("readings") or {}).values()
                )
            ]
            return len(ready) >= count

        wait_for(f"{count} Ready nodes {prefix}-*", probe, timeout)


def node_holders(node: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    allocated = (node.get("status") or {}).get("allocated") or {}
    return {substrate: list(a.get("holders") or []) for substrate, a in allocated.items()}


REPORT_SECONDS = 30.0
"""How long a test waits for the nodes' ``status.allocated`` to report the operator's ledger (it
is written at most every 10 s per node, a second after the first change after a quiet spell)."""


def reported(
    cluster: Cluster, prefix: str, namespace: str, timeout: float = REPORT_SECONDS
) -> dict[str, dict[str, Any]]:
    """Wait until every node ``prefix``-* reports in ``status.allocated`` exactly the holders
    of the admitted claims of ``namespace`` (claim, epoch and share of each placement there);
    return the nodes."""

    def agree() -> dict[str, dict[str, Any]] | None:
        nodes = cluster.nodes(prefix)
        wanted = {
            key: {(claim, epoch, round(share, 6)) for claim, epoch, share in held}
            for key, held in holders_from_claims(cluster.claims(namespace)).items()
            if key[0] in nodes
        }
        shown = {
            (name, substrate): {
                (h["claim"], int(h["epoch"]), round(float(h["share"]), 6)) for h in holders
            }
            for name, node in nodes.items()
            for substrate, holders in node_holders(node).items()
            if holders
        }
        return nodes if shown == wanted else None

    return wait_for(f"the nodes {prefix}-* to report the ledger of the claims", agree, timeout)


def holders_from_claims(
    claims: Iterable[dict[str, Any]],
) -> dict[tuple[str, str], list[tuple[str, int, float]]]:
    """(node, substrate) -> (namespace/name, epoch, share) of each admitted (or recovering)
    claim placed there: the ledger as the claims say it."""
    ledger: dict[tuple[str, str], list[tuple[str, int, float]]] = {}
    for claim in claims:
        status = claim.get("status") or {}
        if status.get("phase") not in ("Admitted", "Recovering"):
            continue
        key = f"{claim['metadata']['namespace']}/{claim['metadata']['name']}"
        for placement in status.get("placements") or []:
            holder = (key, int(placement.get("epoch") or 1), float(placement["share"]))
            ledger.setdefault((placement["node"], placement["substrate"]), []).append(holder)
    return ledger


def ledger_from_claims(claims: Iterable[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(node, substrate) -> sum of shares of the admitted claims placed there."""
    return {
        key: sum(share for _, _, share in held) for key, held in holders_from_claims(claims).items()
    }
