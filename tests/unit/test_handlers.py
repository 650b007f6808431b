"""The operator's kopf registrations: no change detection, so kopf's diff base can stay empty."""

from __future__ import annotations

import kopf
import pytest

from capacity_api import GROUP, VERSION
from capacity_operator import handlers

pytestmark = pytest.mark.unit

WATCHED = [
    kopf.Resource(GROUP, VERSION, "capacityclaims", namespaced=True),
    kopf.Resource(GROUP, VERSION, "capacitynodes", namespaced=False),
    kopf.Resource(GROUP, VERSION, "capacityballots", namespaced=False),
    kopf.Resource("coordination.k8s.io", "v1", "leases", namespaced=True),
    kopf.Resource("", "v1", "pods", namespaced=True),
    kopf.Resource("", "v1", "nodes", namespaced=False),
]


@pytest.mark.parametrize("resource", WATCHED, ids=lambda r: r.plural)
def test_no_handler_detects_changes(resource: kopf.Resource) -> None:
    """NoChangeDetection hands kopf an empty essence: a create/update/resume/field handler
    registered later would never see a change, so adding one must change the storage too."""
    registry = kopf.get_default_registry()
    assert registry._changing.has_handlers(resource=resource) is False
    assert registry._watching.has_handlers(resource=resource) or resource.plural in (
        "pods",
        "nodes",
    )


def test_the_essence_is_empty_and_no_previous_one_is_read() -> None:
    storage = handlers.NoChangeDetection(prefix=GROUP, key="last-handled-configuration")
    body = kopf.Body(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CapacityClaim",
            "metadata": {
                "name": "c",
                "annotations": {f"{GROUP}/last-handled-configuration": '{"spec": {"a": 1}}'},
            },
            "spec": {"replicas": 1},
            "status": {"phase": "Voting"},
        }
    )
    assert storage.build(body=body) == {}
    assert storage.fetch(body=body) is None
