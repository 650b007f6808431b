"""The outcome store (DESIGN section 7): every decision and its outcome, in a real database.

SQLite on the operator's volume by default (``store_path``), PostgreSQL when ``store_dsn`` is set.
One table, ``outcomes``, one row per decision: claim, request, substrate, nodes, the votes' gate
readings and the nodes' fingerprints at decision time, the thresholds in force, then the verdict,
its evidence and when it came. Its schema is created and upgraded by Alembic migrations
(``capacity_operator/migrations``), run when the store connects.

Writes never block admission or truth keeping. :meth:`OutcomeStore.record` puts the row in an
in-memory map keyed by decision (a newer row of the same decision replaces an older one that was
not written yet) and returns at once. A writer thread upserts what is pending in batches. A
decision recorded twice is still one row, keyed by ``decision_id``. When the database is full or
unreachable, the rows stay pending and the writer retries with exponential backoff (1 s doubling
to 30 s). :attr:`OutcomeStore.health` reports the failure, and the log says so once per outage.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()
outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("decision_id", sa.String(400), primary_key=True),
    sa.Column("claim", sa.String(320), nullable=False),
    sa.Column("claim_uid", sa.String(64), nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("substrate", sa.String(16)),
    sa.Column("request", sa.JSON),
    sa.Column("nodes", sa.JSON),
    sa.Column("readings", sa.JSON),
    sa.Column("fingerprints", sa.JSON),
    sa.Column("thresholds", sa.JSON),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("verdict", sa.String(32), nullable=False),
    sa.Column("evidence", sa.JSON),
    sa.Column("headroom", sa.JSON),
    sa.Column("outcome_at", sa.DateTime(timezone=True)),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("outcomes_claim_uid", "claim_uid"),
    sa.Index("outcomes_decided_at", "decided_at"),
)
"""The schema as the code reads it; the migrations create the same (a unit test checks)."""

_COLUMNS = [c.name for c in outcomes.columns]
DECISION_INPUTS = frozenset({"readings", "fingerprints", "thresholds"})
"""Columns recorded with the decision; a later record without them keeps the stored values."""


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """One decision and what is known of its outcome so far."""

    decision_id: str
    claim: str
    claim_uid: str
    decision: str
    decided_at: datetime
    verdict: str
    substrate: str | None = None
    request: Mapping[str, Any] | None = None
    nodes: list[str] | None = None
    readings: Mapping[str, Any] | None = None
    fingerprints: Mapping[str, Any] | None = None
    thresholds: Mapping[str, Any] | None = None
    evidence: list[Mapping[str, Any]] | None = None
    headroom: Mapping[str, float] | None = None
    outcome_at: datetime | None = None

    def values(self, now: datetime) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _COLUMNS if name != "recorded_at"}
        data["recorded_at"] = now
        return data


def decision_id(claim_uid: str, decision: str, since: datetime) -> str:
    """The key of one decision: a claim decides again (a new observation) after a spec change."""
    return f"{claim_uid}/{decision}/{since.astimezone(UTC).isoformat()}"


def default_path() -> str:
    """``$XDG_STATE_HOME`` (or ``~/.local/state``) ``/capacity-platform/operator/outcomes.db``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "capacity-platform" / "operator" / "outcomes.db")


def database_url(path: str | None, dsn: str | None) -> str:
    """PostgreSQL when a DSN is given (``postgresql://`` taken as psycopg 3), else the SQLite
    file ``path`` (:func:`default_path` when None)."""
    if dsn:
        if dsn.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + dsn.split("://", 1)[1]
        return dsn
    return f"sqlite:///{path or default_path()}"


def migrate(connection: Connection) -> None:
    """Create or upgrade the schema to the newest migration (Alembic, on this connection)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def upsert(connection: Connection, rows: list[OutcomeRow], now: datetime) -> None:
    """Insert or update every row by decision_id, in the caller's transaction: one statement
    (executed for many rows) per set of columns to update, not one per row; a statement per
    row was most of the store's cost at tens of decisions a second."""
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        values = row.values(now)
        # a later record of a decision leaves out what was decided on (None): keep it as stored
        kept = frozenset(k for k in DECISION_INPUTS if values[k] is None)
        groups.setdefault(kept, []).append(values)
    for kept, batch in groups.items():
        statement = insert(outcomes)
        updates = {
            name: statement.excluded[name]
            for name in _COLUMNS
            if name != "decision_id" and name not in kept
        }
        connection.execute(
            statement.on_conflict_do_update(index_elements=["decision_id"], set_=updates), batch
        )


@dataclass
class StoreHealth:
    """What ``capctl`` and the logs say of the store."""

    connected: bool = False
    pending: int = 0
    written: int = 0
    """Rows upserted (a decision recorded twice counts twice)."""
    transactions: int = 0
    """Transactions committed (one per batch)."""
    failures: int = 0
    last_error: str | None = None
    since: datetime | None = None
    """When the current outage began (None while healthy)."""


@dataclass
class OutcomeStore:
    """The outcome store of one operator process (see the module docstring)."""

    url: str
    batch: int = 200
    backoff_max: float = 30.0
    health: StoreHealth = field(default_factory=StoreHealth)
    _pending: dict[str, OutcomeRow] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _engine: Engine | None = None
    _migrated: bool = False

    def start(self) -> None:
        """Start the writer (connecting, migrating and writing are its work, so that a database
        that is not there yet never stops the operator from starting)."""
        if self.url.startswith("sqlite:///"):
            try:
                Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # reported by the writer's first attempt, like any outage
                log.warning("outcome store directory: %s", exc)
        self._engine = sa.create_engine(self.url, pool_pre_ping=True)
        self._thread = threading.Thread(target=self._run, name="outcome-store", daemon=True)
        self._thread.start()

    @property
    def migrated(self) -> bool:
        """Whether the writer has created or upgraded the schema (its first connection)."""
        return self._migrated

    def record(self, row: OutcomeRow) -> None:
        """Queue the row (never blocks, never raises); the writer upserts it."""
        with self._lock:
            self._pending[row.decision_id] = row
            self.health.pending = len(self._pending)
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is pending (True) or ``timeout`` passed (False)."""
        deadline = threading.Event()
        waited = 0.0
        while waited < timeout:
            with self._lock:
                if not self._pending:
                    return True
            self._wake.set()
            deadline.wait(0.05)
            waited += 0.05
        return False

    def stop(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        h = self.health
        log.info(
            "outcome store: %d rows written in %d transactions, %d failed attempts, %d pending "
            "dropped", h.written, h.transactions, h.failures, h.pending,
        )  # fmt: skip
        if self._engine is not None:
            self._engine.dispose()

    def rows(self) -> list[dict[str, Any]]:
        """Every stored row, oldest decision first (for capctl and tests; blocking)."""
        assert self._engine is not None
        with self._engine.connect() as connection:
            result = connection.execute(sa.select(outcomes).order_by(outcomes.c.decided_at))
            return [{k: _aware(v) for k, v in r._mapping.items()} for r in result]

    def calibration_input(
        self, window: int, verdicts: frozenset[str]
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
        """The newest ``window`` rows whose verdict is one of ``verdicts`` (newest first), and
        the count of every row per substrate and verdict (blocking; raises when the database
        cannot be read: calibration waits for it)."""
        assert self._engine is not None
        final = outcomes.c.verdict.in_(sorted(verdicts))
        with self._engine.connect() as connection:
            result = connection.execute(
                sa.select(outcomes)
                .where(final)
                .order_by(outcomes.c.decided_at.desc())
                .limit(window)
            )
            rows = [{k: _aware(v) for k, v in r._mapping.items()} for r in result]
            counted = connection.execute(
                sa.select(outcomes.c.substrate, outcomes.c.verdict, sa.func.count()).group_by(
                    outcomes.c.substrate, outcomes.c.verdict
                )
            )
            counts: dict[str, dict[str, int]] = {}
            for substrate, verdict, n in counted:
                counts.setdefault(substrate or "unknown", {})[verdict] = int(n)
        return rows, counts

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._wake.wait(timeout=delay if self.health.since else 1.0)
            self._wake.clear()
            try:
                self._write_pending()
            except Exception as exc:  # the database: full, down, refusing; never fatal here
                self._failed(exc)
                self._stop.wait(delay)
                delay = min(self.backoff_max, delay * 2)
                continue
            delay = 1.0
            self._recovered()

    def _write_pending(self) -> None:
        assert self._engine is not None
        while True:
            with self._lock:
                batch = list(self._pending.values())[: self.batch]
            if not batch and self._migrated:
                return
            with self._engine.begin() as connection:
                if not self._migrated:
                    migrate(connection)
                    self._migrated = True
                    self.health.connected = True
                if batch:
                    upsert(connection, batch, datetime.now(UTC))
            with self._lock:
                for row in batch:
                    # a newer row of the same decision that came meanwhile stays pending
                    if self._pending.get(row.decision_id) is row:
                        del self._pending[row.decision_id]
                self.health.pending = len(self._pending)
                self.health.written += len(batch)
                self.health.transactions += 1
            if not batch:
                return

    def _failed(self, exc: Exception) -> None:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        self.health.failures += 1
        self.health.last_error = text
        self.health.connected = False
        if self.health.since is None:
            self.health.since = datetime.now(UTC)
            log.warning(
                "outcome store %s unavailable (%d outcomes pending; admission goes on, retrying "
                "with backoff): %s", _safe(self.url), self.health.pending, text,
            )  # fmt: skip

    def _recovered(self) -> None:
        if self.health.since is not None:
            log.info(
                "outcome store %s reachable again after %d failed attempts; caught up",
                _safe(self.url), self.health.failures,
            )  # fmt: skip
            self.health.since = None
        self.health.connected = True


def _aware(value: Any) -> Any:
    """SQLite hands back naive datetimes for what was stored as UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)
