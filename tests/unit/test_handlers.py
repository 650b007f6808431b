"""The operator's kopf registrations: no change detection, so kopf's diff base can stay empty."""

from __future__ import annotations

import asyncio

import kopf
import pytest

from capacity_api import GROUP, VERSION
from capacity_operator import handlers
from capacity_operator.protocol import Engine
from capacity_operator.settings import OperatorSettings

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


def test_a_graceful_stop_lets_the_steps_under_way_finish_their_writes() -> None:
    # a recovery frees the failed node's holders after its claim write: stopped in between,
    # the holders would stay until the next start's rebuild
    engine = Engine(None, OperatorSettings(), lambda *_: None)  # type: ignore[arg-type]
    written: list[str] = []

    async def step() -> None:
        await asyncio.sleep(0.05)  # a write under way
        written.append("holders freed")

    async def scenario() -> None:
        engine.ready.set()
        admission = asyncio.create_task(engine.run())  # the admission loop, as started
        engine._start("claim", step())
        await asyncio.sleep(0)  # both running
        # cleanup cancels the admission loop first: that must not cancel the steps
        await handlers.cleanup(memo=kopf.Memo(engine=engine, admission=admission))
        assert written == ["holders freed"]
        assert not engine._running
        assert admission.cancelled()

    asyncio.run(scenario())
