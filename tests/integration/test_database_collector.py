"""DatabaseCollector against a real PostgreSQL server (started by tests.services)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from capacity_agent.collectors.base import CollectorError, Sample
from capacity_agent.collectors.database import DatabaseCollector, describe_dsn, resolve_dsn
from capacity_api.models import Substrate
from tests.services import PostgresServer, free_port, postgres_fixture  # noqa: F401

pytestmark = pytest.mark.services

WAIT = 15.0
"""Seconds any expected state gets to show up."""


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def poll(collector: DatabaseCollector, until: Callable[[Sample], bool], what: str) -> Sample:
    """Sample until ``until`` holds (bounded), returning that sample."""
    deadline = time.monotonic() + WAIT
    last: Sample | None = None
    while time.monotonic() < deadline:
        last = collector.sample()
        if until(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {WAIT}s; last sample: {last}")


@pytest.fixture
def table(postgres: PostgresServer) -> Iterator[str]:
    name = "capacity_lock_test"
    with postgres.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id int)").format(sql.Identifier(name)))
    yield name
    with postgres.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def collector(postgres: PostgresServer) -> Iterator[DatabaseCollector]:
    collector = DatabaseCollector(postgres.dsn(), connect_timeout=3, statement_timeout=2)
    yield collector
    collector.close()


def test_present_geometry_and_capacity_come_from_the_server(
    postgres: PostgresServer, collector: DatabaseCollector
) -> None:
    assert collector.substrate is Substrate.DATABASE
    assert collector.present()

    geometry = collector.geometry()
    assert geometry is not None
    assert geometry.units == postgres.pool_size == 17
    assert geometry.detail == {
        "maxConnections": 20,
        "superuserReservedConnections": 3,
        "reservedConnections": 0,
    }
    assert collector.capacity() == {"db-connections": "17"}


def test_signals_follow_connections_and_lock_waits_then_fall_back(
    postgres: PostgresServer, collector: DatabaseCollector, table: str
) -> None:
    pool = postgres.pool_size
    baseline = collector.sample()
    base_total = round(baseline.raw["total"])
    assert baseline.signals["waiting"] == 0.0
    assert baseline.signals["lock_waits"] == 0.0
    assert baseline.raw["active"] == 0  # the collector's own query is not counted as active

    idle_count, blocked_count = 3, 4
    errors: list[BaseException] = []
    with ExitStack() as stack:
        for _ in range(idle_count):
            stack.enter_context(postgres.connect(autocommit=True))
        holder = stack.enter_context(postgres.connect())
        holder.execute(  # opens a transaction
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table))
        )

        blocked = [
            stack.enter_context(postgres.connect(autocommit=True)) for _ in range(blocked_count)
        ]

        def read(conn: psycopg.Connection[Any]) -> None:
            try:
                conn.execute("SET lock_timeout = '30s'")  # bounded even if the test breaks
                conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
                ).fetchone()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(conn,), daemon=True) for conn in blocked]
        for thread in threads:
            thread.start()
        try:
            loaded = poll(
                collector,
                lambda s: s.raw["waiting"] >= blocked_count,
                f"{blocked_count} sessions waiting on the lock",
            )
            opened = idle_count + 1 + blocked_count
            assert loaded.raw["total"] == base_total + opened
            assert loaded.signals["connections"] == pytest.approx((base_total + opened) / pool)
            assert loaded.load == loaded.signals["connections"]
            assert loaded.raw["waiting"] == blocked_count
            assert loaded.signals["waiting"] == pytest.approx(blocked_count / pool)
            assert loaded.raw["active"] == blocked_count  # waiting on a lock is still active
            assert loaded.signals["active"] == pytest.approx(blocked_count / pool)
            assert loaded.raw["lock_waits"] == blocked_count  # one ungranted AccessShareLock each
            assert loaded.signals["lock_waits"] == pytest.approx(blocked_count / pool)
            assert loaded.raw["idle_in_transaction"] == 1  # the lock holder
            assert loaded.raw["idle"] >= idle_count
        finally:
            holder.rollback()  # releases the lock: the readers finish
            for thread in threads:
                thread.join(timeout=WAIT)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []

        released = poll(
            collector, lambda s: s.raw["waiting"] == 0, "waiting sessions after the release"
        )
        assert released.signals["lock_waits"] == 0.0
        assert released.signals["active"] == 0.0
        assert released.raw["total"] == base_total + idle_count + 1 + blocked_count

    after = poll(
        collector,
        lambda s: s.raw["total"] == base_total,
        "connection count back to the baseline",
    )
    assert after.signals["connections"] == pytest.approx(baseline.signals["connections"])
    assert after.signals["waiting"] == after.signals["lock_waits"] == 0.0


def test_configured_pool_size_overrides_the_server(postgres: PostgresServer) -> None:
    collector = DatabaseCollector(postgres.dsn(), pool_size=4)
    try:
        assert collector.present()
        assert collector.capacity() == {"db-connections": "4"}
        geometry = collector.geometry()
        assert geometry is not None
        assert geometry.units == 4
        with ExitStack() as stack:
            for _ in range(6):
                stack.enter_context(postgres.connect(autocommit=True))
            sample = collector.sample()
        assert sample.signals["connections"] == 1.0  # over the configured pool: clamped
        assert sample.raw["total"] >= 7
    finally:
        collector.close()


def test_connection_loss_is_an_error_then_reconnects_after_a_backoff(
    postgres: PostgresServer,
) -> None:
    monotonic = FakeMonotonic()
    collector = DatabaseCollector(
        postgres.dsn(),
        application_name="capacity-agent-loss-test",
        backoff_initial=1.0,
        monotonic=monotonic,
    )
    try:
        collector.sample()
        assert collector.connected
        with postgres.connect(autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'capacity-agent-loss-test'"
            ).fetchone()
        assert killed == (1,)

        with pytest.raises(CollectorError, match="connection lost"):
            collector.sample()
        assert not collector.connected
        # inside the backoff: refused at once, without a connection attempt
        started = time.monotonic()
        with pytest.raises(CollectorError, match="reconnecting in"):
            collector.sample()
        assert time.monotonic() - started < 0.1

        monotonic.now += 1.0  # the first delay is 0.5-1.0 s (jittered)
        assert collector.sample().substrate is Substrate.DATABASE
        assert collector.connected
    finally:
        collector.close()


def test_unreachable_server_is_not_present_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    monotonic = FakeMonotonic()
    dsn = f"host=127.0.0.1 port={free_port()} user=nobody password=secret-pw dbname=x"
    collector = DatabaseCollector(dsn, monotonic=monotonic, backoff_initial=2.0, backoff_max=8.0)

    started = time.monotonic()
    assert not collector.present()
    assert time.monotonic() - started < 5  # refused at once, far below connect_timeout
    assert collector.geometry() is None
    assert collector.capacity() == {}
    with pytest.raises(CollectorError, match="reconnecting in"):
        collector.sample()

    delays = []
    for _ in range(5):
        monotonic.now += 100.0
        with pytest.raises(CollectorError, match="cannot connect"):
            collector.sample()
        delays.append(collector._next_attempt - monotonic.now)
    assert all(1.0 <= d <= 8.0 for d in delays)
    assert delays[-1] >= 4.0  # doubled up to the cap (with jitter of half to all of it)
    assert "secret-pw" not in caplog.text  # DSNs are never logged


def test_statement_timeout_is_an_error_that_keeps_the_connection(postgres: PostgresServer) -> None:
    collector = DatabaseCollector(postgres.dsn(), statement_timeout=0.5)
    try:
        collector.sample()
        with postgres.connect() as holder:
            # An exclusive lock on the pg_locks view blocks the collector's query until its
            # statement_timeout cancels it.
            holder.execute("LOCK TABLE pg_catalog.pg_locks IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(CollectorError, match=r"query failed.*statement timeout"):
                collector.sample()
            assert time.monotonic() - started < 3
            holder.rollback()
        assert collector.connected  # a canceled statement does not drop the connection
        assert collector.sample().signals["waiting"] == 0.0
    finally:
        collector.close()


# ---------------------------------------------------------------------------------------------
# DSN resolution (pure, kept next to the collector it configures)


def test_resolve_dsn_from_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://agent:pw@db:5432/app\n", encoding="utf-8")

    assert resolve_dsn({}) is None
    assert resolve_dsn({"CAPACITY_DB_DSN": " host=db dbname=app "}) == "host=db dbname=app"
    assert resolve_dsn({"CAPACITY_DB_DSN_FILE": str(secret)}) == (
        "postgresql://agent:pw@db:5432/app"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CAPACITY_DB_DSN": "host=a", "CAPACITY_DB_DSN_FILE": "/x"}, "only one of"),
        ({"CAPACITY_DB_DSN_FILE": "/nonexistent/dsn"}, "cannot read"),
        ({"CAPACITY_DB_DSN_FILE": "EMPTY"}, "is empty"),
    ],
)
def test_resolve_dsn_refuses_ambiguous_or_broken_settings(
    env: dict[str, str], message: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    env = {key: str(empty) if value == "EMPTY" else value for key, value in env.items()}

    with pytest.raises(ValueError, match=message):
        resolve_dsn(env)


def test_describe_dsn_hides_credentials() -> None:
    assert describe_dsn("postgresql://agent:pw@db.example:6432/app") == "db.example:6432/app"
    assert describe_dsn("host=db user=agent password=pw") == "db:5432/agent"
    assert "pw" not in describe_dsn("host=db user=agent password=pw dbname=app")
