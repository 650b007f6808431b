"""The operator's requests (capacity_operator.kube over aiohttp): what goes on the wire and how
the API server's answers come back as errors.

A plain-HTTP server on loopback stands in for the API server and records each request; nothing
leaves the machine. The integration tests run the same calls against the real kube-apiserver.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from capacity_operator import cluster
from capacity_operator.kube import (
    ApiError,
    ConflictError,
    Kube,
    NotFoundError,
    api_error,
    patch_not_applicable,
)
from tests.loopback import http_server

pytestmark = pytest.mark.unit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeServer:
    """Answers every request with the next (status, body) of ``answers``; records the requests."""

    answers: list[tuple[int, dict[str, Any]]]
    seen: list[Seen] = field(default_factory=list)


@contextmanager
def api_server(fake: FakeServer) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            fake.seen.append(
                Seen(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    json.loads(raw) if raw else None,
                )
            )
            status, body = fake.answers.pop(0)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer()

        def do_PATCH(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def do_DELETE(self) -> None:
            self._answer()

        def log_message(self, *_: Any) -> None:
            pass

    with http_server(Handler) as url:
        yield url


def kubeconfig(path: Path, server: str) -> str:
    body = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(body))
    return str(path)


def status(code: int, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Status", "status": "Failure", "message": message, "code": code}
    if details is not None:
        out["details"] = details
    return out


def run(fake: FakeServer, tmp_path: Path, calls: Any) -> list[Any]:
    """Run ``calls(kube)`` (a coroutine function) against the fake server; its results."""

    async def main(url: str) -> list[Any]:
        kube = Kube(cluster.load(kubeconfig(tmp_path / "kc.yaml", url)), pool=4)
        try:
            out: list[Any] = await calls(kube)
            return out
        finally:
            await kube.close()

    with api_server(fake) as url:
        return asyncio.run(main(url))


def test_status_writes_carry_the_token_the_patch_type_and_the_resource_version(
    tmp_path: Path,
) -> None:
    claim = {"metadata": {"name": "web", "resourceVersion": "8"}}
    fake = FakeServer([(200, claim), (200, claim), (200, {"metadata": {"name": "n1"}})])

    async def calls(kube: Kube) -> list[Any]:
        return [
            await kube.patch_claim_status_cas("team", "web", "7", {"phase": "Proposed"}),
            await kube.patch_claim_status_guarded(
                "team", "web", [{"op": "test", "path": "/status/epoch", "value": 3}]
            ),
            await kube.patch_node_status("n1", {"allocated": {"cpu": None}}),
        ]

    answers = run(fake, tmp_path, calls)
    assert answers[0] == claim
    cas, guarded, report = fake.seen
    assert (cas.method, cas.path) == (
        "PATCH",
        "/apis/capacity.platform.dev/v1alpha1/namespaces/team/capacityclaims/web/status"
        "?fieldManager=capacity-operator",  # managedFields name the operator
    )
    assert cas.headers["user-agent"].startswith("capacity-operator/")
    assert cas.headers["authorization"] == "Bearer secret-token"
    assert cas.headers["content-type"] == "application/merge-patch+json"
    assert cas.body == {"metadata": {"resourceVersion": "7"}, "status": {"phase": "Proposed"}}
    assert guarded.headers["content-type"] == "application/json-patch+json"
    assert guarded.body == [{"op": "test", "path": "/status/epoch", "value": 3}]
    assert report.path == (
        "/apis/capacity.platform.dev/v1alpha1/capacitynodes/n1/status?fieldManager=capacity-operator"
    )
    assert report.body == {"status": {"allocated": {"cpu": None}}}  # null removes the key


def test_answers_become_errors_a_caller_can_tell_apart(tmp_path: Path) -> None:
    not_applied = status(422, "the server rejected our request due to an error in our request")
    invalid = status(
        422,
        'CapacityClaim "web" is invalid: status.phase: Unsupported value',
        {"name": "web", "causes": [{"field": "status.phase"}]},
    )
    fake = FakeServer(
        [
            (409, status(409, "the object has been modified")),
            (404, status(404, 'capacitynodes "n9" not found')),
            (422, not_applied),
            (422, invalid),
            (404, status(404, "gone")),  # a pod already gone is what a force delete wants
            (403, status(403, 'leases is forbidden: User "x" cannot list')),
        ]
    )

    async def calls(kube: Kube) -> list[Any]:
        out: list[Any] = []
        for call in (
            kube.patch_claim_status_cas("team", "web", "7", {}),
            kube.get_node("n9"),
            kube.patch_claim_status_guarded("team", "web", []),
            kube.patch_claim_status_guarded("team", "web", []),
            kube.force_delete_pod("team", "p"),
            kube.list_leases("capacity-system"),
        ):
            try:
                out.append(await call)
            except ApiError as exc:
                out.append(exc)
        return out

    conflict, missing, moved_on, rejected, deleted, forbidden = run(fake, tmp_path, calls)
    assert isinstance(conflict, ConflictError)
    assert isinstance(missing, NotFoundError)
    assert 'capacitynodes "n9" not found' in str(missing)
    assert isinstance(moved_on, ConflictError)  # a failed test operation: the guard moved on
    assert type(rejected) is ApiError  # a real validation error
    assert rejected.status == 422
    assert "status.phase: Unsupported value" in str(rejected)
    assert deleted is None
    assert type(forbidden) is ApiError
    assert forbidden.status == 403
    assert str(forbidden).startswith("(403) Forbidden: leases is forbidden")
    assert fake.seen[4].path == "/api/v1/namespaces/team/pods/p?gracePeriodSeconds=0"


def test_a_configmap_is_created_or_patched_at_its_version(tmp_path: Path) -> None:
    fake = FakeServer([(201, {}), (200, {}), (200, {"metadata": {"resourceVersion": "5"}})])

    async def calls(kube: Kube) -> list[Any]:
        await kube.write_configmap("ns", "cal", None, {"a": "1"})
        await kube.write_configmap("ns", "cal", "4", {"b": "2"}, previous={"a": "1"})
        return [await kube.get_configmap("ns", "cal")]

    (read,) = run(fake, tmp_path, calls)
    create, patch, _ = fake.seen
    assert (create.method, create.path) == (
        "POST",
        "/api/v1/namespaces/ns/configmaps?fieldManager=capacity-operator",
    )
    assert create.body["metadata"] == {"name": "cal"}
    assert create.body["data"] == {"a": "1"}
    assert patch.path == "/api/v1/namespaces/ns/configmaps/cal?fieldManager=capacity-operator"
    assert patch.body == {"metadata": {"resourceVersion": "4"}, "data": {"a": None, "b": "2"}}
    assert read == ("5", {})


def test_errors_without_a_status_body_keep_the_answer() -> None:
    error = api_error(500, "Internal Server Error", "upstream connect error")
    assert type(error) is ApiError
    assert str(error) == "(500) Internal Server Error: upstream connect error"
    assert isinstance(api_error(409, "Conflict", ""), ConflictError)
    assert isinstance(api_error(404, "Not Found", ""), NotFoundError)
    assert patch_not_applicable(json.dumps(status(422, "test failed")))
    assert not patch_not_applicable(json.dumps(status(422, "x", {"causes": [{"field": "f"}]})))
    assert not patch_not_applicable("not json")


def test_the_engines_connection_holds_a_connection_per_concurrent_step(tmp_path: Path) -> None:
    """As many connections as steps run at once: fewer would queue the steps' writes."""
    path = kubeconfig(tmp_path / "kc.yaml", "https://127.0.0.1:6443")

    async def limit() -> int:
        session = cluster.http_session(cluster.load(path), pool=64)
        try:
            return session.connector.limit if session.connector else 0
        finally:
            await session.close()

    assert asyncio.run(limit()) == 64
