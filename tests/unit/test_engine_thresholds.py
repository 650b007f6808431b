"""The engine's threshold cache: concurrent callers share one ConfigMap read (at 30 claims a
second every reconcile that found the cache expired sent its own read, 4 per claim)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from capacity_operator.protocol import Engine
from capacity_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit


class CountingKube:
    """Only what Engine.thresholds calls: a ConfigMap read that takes a moment."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_configmap_data(self, namespace: str, name: str) -> dict[str, str]:
        self.reads += 1
        await asyncio.sleep(0.01)
        return {"thetaIso": "0.25"}


def test_concurrent_callers_share_one_read() -> None:
    kube = CountingKube()
    engine = Engine(kube, OperatorSettings(), lambda *_: None)  # type: ignore[arg-type]

    async def many() -> list[Any]:
        return await asyncio.gather(*(engine.thresholds() for _ in range(50)))

    results = asyncio.run(many())
    assert kube.reads == 1
    assert {t.theta_iso for t in results} == {0.25}
    asyncio.run(engine.thresholds())  # within 5 s: the cached value, no read
    assert kube.reads == 1
