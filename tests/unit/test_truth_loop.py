"""The truth loop checks the engine's claims under observation each pass, and none while this
operator copy is paused by peering (its watches stopped with kopf's; the active copy checks
them)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from capacity_operator.protocol import Engine
from capacity_operator.settings import OperatorSettings
from capacity_operator.truth import TruthKeeper

pytestmark = pytest.mark.unit


def passes(paused: bool) -> list[str]:
    engine = Engine(None, OperatorSettings(truth_interval_seconds=0.01), lambda *_: None)  # type: ignore[arg-type]
    engine.paused = paused
    keeper = TruthKeeper(engine, lambda *_: None)
    checked: list[str] = []

    async def check(body: dict[str, Any], *_: Any) -> None:
        checked.append(body["metadata"]["name"])

    keeper.check = check  # type: ignore[method-assign]
    status = {"phase": "Admitted"}
    engine.claims = {
        "u": {"metadata": {"name": "c", "namespace": "ns", "uid": "u"}, "status": status},
        # not under observation: still voting, and a decision whose check closed
        "v": {"metadata": {"name": "v", "namespace": "ns", "uid": "v"},
              "status": {"phase": "Voting"}},
        "w": {"metadata": {"name": "w", "namespace": "ns", "uid": "w"},
              "status": {**status, "truth": {"decision": "Admitted", "verdict": "Confirmed"}}},
    }  # fmt: skip

    async def scenario() -> None:
        indexed = asyncio.Event()
        indexed.set()
        engine.ready.set()
        task = asyncio.create_task(keeper.run({}, {}, indexed))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    return checked


def test_an_active_copy_checks_every_pass() -> None:
    checked = passes(paused=False)
    assert len(checked) >= 3
    assert set(checked) == {"c"}


def test_a_paused_copy_checks_nothing() -> None:
    assert passes(paused=True) == []
