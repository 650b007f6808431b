"""The truth loop checks the claims of kopf's index each pass, and none while this operator copy
is paused by peering (its indexes stopped with kopf's watches; the active copy checks them)."""

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
    claims = {("ns", "c"): [{"metadata": {"name": "c", "uid": "u"}}]}

    async def scenario() -> None:
        indexed = asyncio.Event()
        indexed.set()
        engine.ready.set()
        task = asyncio.create_task(keeper.run(claims, {}, {}, indexed))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    return checked


def test_an_active_copy_checks_every_pass() -> None:
    assert len(passes(paused=False)) >= 3


def test_a_paused_copy_checks_nothing() -> None:
    assert passes(paused=True) == []
