"""The outcome store on a real SQLite file: migrations, idempotent upserts, failures reported
and caught up (the same store on a real PostgreSQL: tests/integration/test_store.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from capacity_operator.store import (
    OutcomeRow,
    OutcomeStore,
    database_url,
    decision_id,
    metadata,
    migrate,
)

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def row(uid: str = "u1", verdict: str = "Observing", **extra: object) -> OutcomeRow:
    return OutcomeRow(
        decision_id=decision_id(uid, "Admitted", T0), claim="ns/web", claim_uid=uid,
        decision="Admitted", decided_at=T0, verdict=verdict, substrate="host",
        request={"cGeo": 0.1}, nodes=["n1"], readings={"n1": {"headroom": 0.6}},
        thresholds={"thetaFit": 0.165}, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_migrations_create_exactly_the_schema_the_code_reads(tmp_path: Path) -> None:
    engine = sa.create_engine(database_url(str(tmp_path / "o.db"), None))
    with engine.begin() as connection:
        migrate(connection)
        migrate(connection)  # a second run is a no-op
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    assert diff == []


def recorded_twice_is_one_row_with_the_newest_outcome(url: str) -> None:
    """The store case shared with tests/integration/test_store.py (PostgreSQL)."""
    store = OutcomeStore(url)
    store.start()
    evidence = [{"kind": "OOMKilled", "pod": "web-1"}]
    later = T0 + timedelta(seconds=30)
    try:
        store.record(row())
        assert store.flush()
        store.record(row())  # the same again (an operator restart records it again)
        # the outcome comes without the decision's inputs: those stay as stored
        final = row(verdict="Falsified", evidence=evidence, outcome_at=later)
        store.record(replace(final, readings=None, thresholds=None))
        store.record(row("u2"))
        assert store.flush()
        rows = {r["claim_uid"]: r for r in store.rows()}
        assert set(rows) == {"u1", "u2"}
        assert rows["u1"]["verdict"] == "Falsified"
        assert rows["u1"]["evidence"] == evidence
        assert rows["u1"]["outcome_at"] == later
        assert rows["u1"]["readings"] == {"n1": {"headroom": 0.6}}
        assert rows["u1"]["thresholds"] == {"thetaFit": 0.165}
        assert store.health.connected
        assert store.health.failures == 0
    finally:
        store.stop()
    # a new process on the same database sees every row, and adds none twice
    again = OutcomeStore(url)
    again.start()
    try:
        again.record(row(verdict="Falsified", evidence=evidence, outcome_at=later))
        assert again.flush()
        assert len(again.rows()) == 2
    finally:
        again.stop()


def test_a_decision_recorded_twice_is_one_row_with_the_newest_outcome(tmp_path: Path) -> None:
    recorded_twice_is_one_row_with_the_newest_outcome(database_url(str(tmp_path / "o.db"), None))


def test_an_unusable_database_is_reported_and_nothing_pending_is_lost(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    path = blocked / "o.db"
    path.mkdir()  # a directory where the file should be: SQLite cannot open it
    store = OutcomeStore(database_url(str(path), None), backoff_max=0.2)
    store.start()
    try:
        store.record(row())
        store.record(row("u2"))
        assert not store.flush(timeout=1.5)
        assert store.health.failures >= 1
        assert not store.health.connected
        assert store.health.since is not None
        assert store.health.last_error
        assert store.health.pending == 2
        path.rmdir()  # the database comes back
        assert store.flush(timeout=10.0)
        assert {r["claim_uid"] for r in store.rows()} == {"u1", "u2"}
        assert store.health.connected
        assert store.health.since is None
    finally:
        store.stop()


def test_database_url_takes_a_postgresql_dsn_as_psycopg3() -> None:
    assert database_url(None, "postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert database_url("/var/lib/x.db", None) == "sqlite:////var/lib/x.db"
