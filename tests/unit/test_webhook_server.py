"""The webhook server's request handling, with a fake claim source and no sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, cast

import pytest
from aiohttp import web

from capacity_api.webhook import CLAIM_LABEL, Hook
from capacity_operator.webhook import ClaimReader, Readiness, Webhook

NS = "shop"


class FakeClaims:
    """Claims by (namespace, name); records every read."""

    def __init__(self, claims: dict[tuple[str, str], dict[str, Any]], fail: bool = False) -> None:
        self.claims = claims
        self.fail = fail
        self.reads: list[tuple[str, str]] = []

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append((namespace, name))
        if self.fail:
            raise TimeoutError("read timed out")
        return self.claims.get((namespace, name))


class FakeRequest:
    """What the handler reads of an aiohttp request."""

    remote = "127.0.0.1"

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self) -> bytes:
        return self.body


def review_body(namespace: str = NS, label: str | None = "web") -> bytes:
    labels = {CLAIM_LABEL: label} if label is not None else {}
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "uid-7",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": namespace,
                "operation": "CREATE",
                "object": {
                    "metadata": {"generateName": "web-", "labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "i"}]},
                },
            },
        }
    ).encode()


ADMITTED = {
    "metadata": {"name": "web", "namespace": NS},
    "status": {
        "phase": "Admitted",
        "placements": [{"node": "n1", "substrate": "host", "share": 0.5}],
    },
}


def answer(webhook: Webhook, hook: Hook, body: bytes) -> web.Response:
    request = cast(web.Request, FakeRequest(body))
    return asyncio.run(webhook.review(hook, request))


def make(claims: FakeClaims, skip: frozenset[str] = frozenset({"kube-system"})) -> Webhook:
    return Webhook(cast(ClaimReader, claims), Readiness(), skip)


def test_an_admitted_claim_gets_the_patch_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    claims = FakeClaims({(NS, "web"): ADMITTED})
    caplog.set_level(logging.INFO, logger="capacity_operator.webhook")
    resp = answer(make(claims), Hook.MUTATE, review_body())
    assert resp.status == 200
    assert resp.text is not None
    response = json.loads(resp.text)["response"]
    assert response["uid"] == "uid-7"
    assert response["allowed"] is True
    (op,) = json.loads(base64.b64decode(response["patch"]))
    assert op["path"] == "/spec/affinity"
    assert claims.reads == [(NS, "web")]
    assert [r.getMessage() for r in caplog.records] == [
        "mutate shop/web-* claim=web allowed: requires n1 (JSON Patch: 1 op)"
    ]


def test_a_claim_that_cannot_be_read_is_a_500_so_the_failure_policy_decides() -> None:
    resp = answer(make(FakeClaims({}, fail=True)), Hook.VALIDATE, review_body())
    assert resp.status == 500
    assert resp.text == "cannot judge shop/web-*: read timed out\n"


def test_malformed_reviews_are_a_400_saying_what_is_wrong() -> None:
    webhook = make(FakeClaims({}))
    resp = answer(webhook, Hook.VALIDATE, b'{"apiVersion": "admission.k8s.io/v1"}')
    assert resp.status == 400
    assert resp.text == "malformed AdmissionReview: kind is None, expected 'AdmissionReview'\n"
    assert answer(webhook, Hook.MUTATE, b"\x00garbage").status == 400


def test_skipped_namespaces_are_allowed_without_reading_a_claim() -> None:
    claims = FakeClaims({})
    resp = answer(make(claims), Hook.VALIDATE, review_body(namespace="kube-system"))
    assert resp.text is not None
    assert json.loads(resp.text)["response"] == {"uid": "uid-7", "allowed": True}
    assert claims.reads == []


def test_an_invalid_label_is_refused_without_reading_a_claim() -> None:
    claims = FakeClaims({})
    resp = answer(make(claims), Hook.VALIDATE, review_body(label="Not_A_Name"))
    assert resp.text is not None
    response = json.loads(resp.text)["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert 'label capacity.platform.dev/claim="Not_A_Name"' in response["status"]["message"]
    assert claims.reads == []


def test_readiness_lists_what_is_missing() -> None:
    webhook = make(FakeClaims({}))
    webhook.readiness.set("caBundle", "MutatingWebhookConfiguration x not found")
    resp = asyncio.run(webhook.readyz(cast(web.Request, None)))
    assert (resp.status, resp.text) == (503, "caBundle: MutatingWebhookConfiguration x not found\n")
    webhook.readiness.set("caBundle", None)
    resp = asyncio.run(webhook.readyz(cast(web.Request, None)))
    assert (resp.status, resp.text) == (200, "ok\n")
