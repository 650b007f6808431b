"""A scripted Kubernetes API server for the agent's lightkube client, in memory: httpx's
MockTransport answers every request from a queue of answers, and records what was sent. No socket
is opened."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
from lightkube import ApiError, Client, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.models.meta_v1 import Status

JSON = dict[str, Any]
SERVER = "https://api.test:6443"

REASONS = {
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def status_body(code: int, message: str = "") -> JSON:
    """The ``Status`` object the API server answers an error with."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message or f"{code} from the fake API server",
        "reason": REASONS.get(code, "Unknown"),
        "code": code,
    }


def api_error(code: int, message: str = "") -> ApiError:
    """What the client raises for an error answer, as a fake API raises it."""
    return ApiError(status=Status.from_dict(status_body(code, message)))


Answer = JSON | int | Callable[[httpx2.Request], httpx2.Response] | BaseException
"""A JSON body (200), a status code (an error Status), a handler, or an exception to raise."""


class FakeApiServer:
    """Answers requests in order from :attr:`answers`; records them in :attr:`requests`."""

    def __init__(self, *answers: Answer) -> None:
        self.answers: list[Answer] = list(answers)
        self.requests: list[httpx2.Request] = []

    def client(self, *, timeout: float = 10.0) -> Client:
        config = KubeConfig.from_one(cluster=Cluster(server=SERVER), user=User(token="t0ken"))
        return Client(
            config,
            timeout=httpx2.Timeout(timeout),
            trust_env=False,
            transport=httpx2.MockTransport(self.handle),
        )

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.requests.append(request)
        if not self.answers:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, int):
            return httpx2.Response(answer, json=status_body(answer))
        if isinstance(answer, dict):
            return httpx2.Response(200, json=answer)
        return answer(request)

    # -- what was sent -------------------------------------------------------------------------

    def sent(self, index: int = -1) -> tuple[str, str, dict[str, str], str, Any]:
        """(method, path, query, content type, JSON body) of request ``index``."""
        request = self.requests[index]
        body = json.loads(request.content) if request.content else None
        query = dict(request.url.params)
        return request.method, request.url.path, query, request.headers.get("content-type"), body


def watch_stream(*events: tuple[str, JSON]) -> Callable[[httpx2.Request], httpx2.Response]:
    """A watch answer: one JSON line per (type, object) event, then the end of the stream."""
    lines = b"".join(
        json.dumps({"type": kind, "object": obj}).encode() + b"\n" for kind, obj in events
    )

    def answer(request: httpx2.Request) -> httpx2.Response:
        del request
        return httpx2.Response(200, content=lines, headers={"Content-Type": "application/json"})

    return answer
