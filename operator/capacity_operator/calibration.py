"""The calibration loop (DESIGN section 7, docs/calibration.md): the operator reads the outcome
store and the ``capacity-calibration`` ConfigMap, :func:`capacity_api.calibration.calibrate`
decides, and the operator writes the ConfigMap back with compare-and-swap.

Only the active operator copy calibrates (the same peering check as the node lifecycle). A store
that cannot be read skips the round, said once per outage: admission goes on with the
thresholds in force, calibration catches up when the store is back (the outcomes were kept).
Agents and the operator re-read the ConfigMap every few seconds, so a move is in force within
seconds of its write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from capacity_api import reasons
from capacity_api.calibration import (
    BY_CALIBRATION,
    FINAL_VERDICTS,
    Outcome,
    Policy,
    Round,
    State,
    calibrate,
    same_but_time,
    updated_data,
)
from capacity_api.gates import CALIBRATION_CONFIGMAP, Thresholds
from capacity_operator.kube import JSON, ConflictError, Kube, NotFoundError
from capacity_operator.protocol import EventSink
from capacity_operator.settings import OperatorSettings
from capacity_operator.store import OutcomeStore

log = logging.getLogger(__name__)


def policy_of(settings: OperatorSettings) -> Policy:
    return Policy(
        min_outcomes=settings.calibration_min_outcomes,
        window=settings.calibration_window,
        max_step=settings.calibration_max_step,
        weight_falsified=settings.calibration_weight_falsified,
        weight_missed=settings.calibration_weight_missed,
        history_limit=settings.calibration_history_limit,
        min_gain=settings.calibration_min_gain,
    )


class Calibrator:
    """One calibration round per ``calibration_interval_seconds`` while this copy is active."""

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        store: OutcomeStore,
        emit: EventSink,
        *,
        active: Callable[[], Awaitable[bool]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.store = store
        self.emit = emit
        self.active = active
        self.clock = clock
        self.policy = policy_of(settings)
        self.last: Thresholds | None = None
        """The thresholds of the last round (an edit by hand is what differs from them)."""
        self._store_down = False
        self._warnings: tuple[str, ...] = ()

    async def run(self) -> None:
        interval = self.settings.calibration_interval_seconds
        while True:
            try:
                if await self.active():
                    await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("calibration round failed; next round in %gs", interval)
            await asyncio.sleep(interval)

    async def round(self) -> Round | None:
        """One round; returns what it wrote (None: the store could not be read, or the
        ConfigMap kept moving under it)."""
        if not self.store.migrated and self.store.health.since is None:
            # the store's writer has neither reached the database yet (its first connection
            # creates the table) nor failed to: nothing to read, and no outage to report
            return None
        try:
            rows, counts = await asyncio.to_thread(
                self.store.calibration_input,
                self.policy.window,
                frozenset(v.value for v in FINAL_VERDICTS),
            )
        except Exception as exc:  # the database: down, refusing; calibration waits for it
            if not self._store_down:
                self._store_down = True
                log.warning(
                    "calibration waits: the outcome store cannot be read (%s); admission goes "
                    "on with the thresholds in force",
                    str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc,
                )
            return None
        if self._store_down:
            self._store_down = False
            log.info("calibration resumes: the outcome store can be read again")
        outcomes = [o for o in (Outcome.from_row(r) for r in rows) if o is not None]
        namespace = self.settings.namespace
        for _ in range(self.settings.commit_retries):
            current = await self.kube.get_configmap(namespace, CALIBRATION_CONFIGMAP)
            version, data = current if current is not None else (None, {})
            state = State.from_configmap(data, self.last)
            self._say(state.warnings)
            result = calibrate(
                state, outcomes, counts, self.policy, now=self.clock(), previous=self.last
            )
            new = updated_data(data, result.state, result.changes)
            if not counts and not result.changes:
                self.last = result.state.thresholds
                return result  # nothing decided yet: nothing to write
            if same_but_time(new, data):
                self.last = result.state.thresholds
                return result
            try:
                await self.kube.write_configmap(
                    namespace, CALIBRATION_CONFIGMAP, version, new, data
                )
            except ConflictError:
                continue  # edited meanwhile (a user, capctl): read it again
            except NotFoundError:
                continue  # deleted meanwhile: created on the next try
            self.last = result.state.thresholds
            self._announce(result)
            return result
        log.warning("calibration ConfigMap kept changing under this round; next round retries")
        return None

    def _configmap(self) -> JSON:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CALIBRATION_CONFIGMAP, "namespace": self.settings.namespace},
        }

    def _say(self, warnings: tuple[str, ...]) -> None:
        if warnings == self._warnings:
            return
        self._warnings = warnings
        for warning in warnings:
            log.warning("calibration ConfigMap: %s", warning)
            self.emit(self._configmap(), "Warning", reasons.INVALID_CALIBRATION, warning)

    def _announce(self, result: Round) -> None:
        for change in result.changes:
            text = f"{change.key} {change.before:g} -> {change.after:g} (entry {change.id}): "
            text += change.why
            log.info("calibration: %s", text)
            reason = (
                reasons.THRESHOLD_MOVED
                if change.by == BY_CALIBRATION
                else (reasons.THRESHOLD_CHANGED)
            )
            self.emit(self._configmap(), "Normal", reason, text[:1024])
