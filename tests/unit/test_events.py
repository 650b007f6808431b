"""The operator's Events, built as the JSON the API server takes (pure, no client)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from kubernetes import client

from capacity_operator.kube import COMPONENT, event_body

pytestmark = pytest.mark.unit

CLAIM = {
    "apiVersion": "capacity.platform.dev/v1alpha1",
    "kind": "CapacityClaim",
    "metadata": {"name": "web", "namespace": "team", "uid": "u-1", "resourceVersion": "7"},
}


class Answer:
    """What the client's deserializer reads: the API server's JSON answer."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.data = json.dumps(body)


def test_an_event_is_a_core_v1_event_about_the_object_from_this_operator_copy() -> None:
    now = datetime(2026, 12, 5, 23, 0, 1, 500000, tzinfo=timezone(timedelta(hours=2)))
    body = event_body(
        CLAIM, "Normal", "QuorumReached", "admitted on n1", instance="host-42", now=now
    )
    # read back through the client's own model: every field lands where kubectl shows it
    event = client.ApiClient().deserialize(Answer(body), "CoreV1Event")
    assert event.metadata.generate_name == "web."
    ref = event.involved_object
    assert (ref.api_version, ref.kind, ref.namespace, ref.name, ref.uid) == (
        "capacity.platform.dev/v1alpha1",
        "CapacityClaim",
        "team",
        "web",
        "u-1",
    )
    assert (event.type, event.reason, event.message, event.count) == (
        "Normal",
        "QuorumReached",
        "admitted on n1",
        1,
    )
    assert event.source.component == event.reporting_component == COMPONENT
    assert event.reporting_instance == "host-42"
    # RFC 3339 in UTC, whole seconds (the API server's metav1.Time)
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-12-05T21:00:01Z"
    assert event.first_timestamp == datetime(2026, 12, 5, 21, 0, 1, tzinfo=UTC)


def test_an_events_message_is_cut_at_1024_characters() -> None:
    now = datetime(2026, 12, 5, tzinfo=UTC)
    body = event_body(CLAIM, "Warning", "Rejected", "x" * 5000, instance="i", now=now)
    assert len(body["message"]) == 1024
    unnamed = event_body({"metadata": {}}, "Normal", "R", "m", instance="i", now=now)
    assert unnamed["metadata"] == {"generateName": "object."}
