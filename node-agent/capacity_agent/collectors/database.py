"""The database substrate: a PostgreSQL server's connection pool, read over a real connection.

The collector holds one connection (psycopg 3, autocommit, no server-side prepared statements, so
it also works through a transaction-mode pooler), opened with a short ``connect_timeout`` and a
session ``statement_timeout``, and reads everything in one statement per sample:

- the pool size: ``max_connections - superuser_reserved_connections - reserved_connections``
  (``reserved_connections`` exists from PostgreSQL 16 on and counts as 0 before), unless a
  ``pool_size`` is configured, which then overrides it (use that when a pooler or the
  application's own pool is the real limit);
- from ``pg_stat_activity``, client backends only (background workers and WAL senders have slots
  of their own): total, active, idle, idle in transaction (aborted included), and waiting
  (``wait_event_type = 'Lock'``). The collector's own connection counts in the total (it holds a
  slot) but not as active (it is only active because it is measuring);
- from ``pg_locks``: lock requests not granted.

Signals, in [0, 1], all relative to the pool size and clamped at 1: ``connections`` (total),
``active``, ``waiting`` and ``lock_waits``. ``load = connections``: a pool is full when its slots
are taken, busy or not. Counts are kept in ``raw``.

Privileges: a role without ``pg_read_all_stats`` (or ``pg_monitor``) sees other roles' sessions
without their state, so active, idle and waiting would be undercounted. Such sessions are counted in
``raw["unknown_state"]`` and logged once; grant ``pg_monitor`` to the agent's role.

Failures: a lost connection (or any error that leaves it broken) raises :class:`CollectorError` and
drops the connection. The next samples reconnect, but no sooner than a backoff that starts at
``backoff_initial`` seconds and doubles up to ``backoff_max`` with jitter (half to all of the
delay), so a fleet of agents does not hammer a restarting server; a sample inside the backoff
raises :class:`CollectorError` at once, without touching the network. A statement that fails on a
healthy connection (for instance ``statement_timeout``) raises :class:`CollectorError` and keeps
the connection.

The DSN comes from the constructor; :func:`resolve_dsn` finds it in the environment
(``CAPACITY_DB_DSN``, or ``CAPACITY_DB_DSN_FILE`` naming a file, e.g. a mounted Secret). DSNs carry
passwords: they are never logged, only host, port and database name are.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_api.models import Geometry, Substrate

log = logging.getLogger(__name__)

DSN_ENV = "CAPACITY_DB_DSN"
"""Environment variable holding the DSN itself."""
DSN_FILE_ENV = "CAPACITY_DB_DSN_FILE"
"""Environment variable naming a file whose content is the DSN (a mounted Secret)."""

_QUERY = """
SELECT
    current_setting('max_connections')::int,
    current_setting('superuser_reserved_connections')::int,
    coalesce(current_setting('reserved_connections', true), '0')::int,
    a.total, a.active, a.idle, a.idle_in_transaction, a.waiting, a.unknown_state,
    (SELECT count(*) FROM pg_locks WHERE NOT granted)
FROM (
    SELECT
        count(*),
        count(*) FILTER (WHERE state = 'active' AND pid <> pg_backend_pid()),
        count(*) FILTER (WHERE state = 'idle'),
        count(*) FILTER (
            WHERE state IN ('idle in transaction', 'idle in transaction (aborted)')
        ),
        count(*) FILTER (WHERE wait_event_type = 'Lock'),
        count(*) FILTER (WHERE state IS NULL)
    FROM pg_stat_activity
    WHERE backend_type = 'client backend'
) AS a(total, active, idle, idle_in_transaction, waiting, unknown_state)
"""


def resolve_dsn(env: Mapping[str, str] = os.environ) -> str | None:
    """The DSN from ``CAPACITY_DB_DSN`` or the file named by ``CAPACITY_DB_DSN_FILE``.

    Returns None when neither is set (the database substrate is not configured). Raises
    ValueError when both are set (ambiguous), when the file cannot be read, or when the DSN is
    empty. Surrounding whitespace (a trailing newline in a Secret) is stripped.
    """
    direct = env.get(DSN_ENV, "").strip()
    path = env.get(DSN_FILE_ENV, "").strip()
    if direct and path:
        raise ValueError(f"set only one of {DSN_ENV} and {DSN_FILE_ENV}, not both")
    if direct:
        return direct
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{DSN_FILE_ENV}={path}: cannot read the DSN: {exc.strerror}") from exc
    if not text:
        raise ValueError(f"{DSN_FILE_ENV}={path}: the file is empty")
    return text


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, without user or password, for logs."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or params.get("user") or ""
    return f"{host}:{port}/{dbname}"


@dataclass(frozen=True, slots=True)
class PoolReading:
    """One reading of the server's connection counts."""

    max_connections: int
    superuser_reserved: int
    reserved: int
    total: int
    active: int
    idle: int
    idle_in_transaction: int
    waiting: int
    unknown_state: int
    lock_waits: int

    @property
    def server_pool(self) -> int:
        return self.max_connections - self.superuser_reserved - self.reserved


class DatabaseCollector(Collector):
    """A PostgreSQL server's connection pool, measured over one connection.

    ``dsn`` is a libpq connection string or URL. ``pool_size`` overrides the pool size read from
    the server. ``connect_timeout`` (seconds, libpq rounds to whole seconds, at least 2) is used
    unless the DSN sets its own; ``statement_timeout`` (seconds) bounds every query.
    """

    substrate = Substrate.DATABASE

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int | None = None,
        connect_timeout: float = 3.0,
        statement_timeout: float = 2.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        application_name: str = "capacity-agent",
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("backoff needs 0 < backoff_initial <= backoff_max")
        self._dsn = dsn
        self._where = describe_dsn(dsn)
        self._pool_size = pool_size
        self._connect_timeout = max(2, round(connect_timeout))
        self._statement_timeout_ms = max(1, round(statement_timeout * 1000))
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._application_name = application_name
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._conn: psycopg.Connection[Any] | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._last_error = ""
        self._last: PoolReading | None = None
        self._warned_privileges = False

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        """Open the connection, or raise CollectorError; respects the reconnect backoff."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._drop()
        now = self._monotonic()
        if now < self._next_attempt:
            raise CollectorError(
                f"database {self._where}: reconnecting in {self._next_attempt - now:.1f}s "
                f"(last error: {self._last_error})"
            )
        kwargs: dict[str, Any] = {"application_name": self._application_name}
        try:
            if "connect_timeout" not in conninfo.conninfo_to_dict(self._dsn):
                kwargs["connect_timeout"] = self._connect_timeout
            conn = psycopg.connect(self._dsn, autocommit=True, prepare_threshold=None, **kwargs)
        except psycopg.Error as exc:
            self._schedule_retry(exc)
            raise CollectorError(f"database {self._where}: cannot connect: {exc}") from exc
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (str(self._statement_timeout_ms),),
            )
        except psycopg.Error as exc:
            conn.close()
            self._schedule_retry(exc)
            raise CollectorError(f"database {self._where}: cannot set up session: {exc}") from exc
        if self._failures:
            log.info("database %s: reconnected after %d failures", self._where, self._failures)
        self._failures = 0
        self._next_attempt = 0.0
        self._conn = conn
        return conn

    def _schedule_retry(self, exc: BaseException) -> None:
        delay = min(self._backoff_max, self._backoff_initial * 2.0**self._failures)
        delay *= 0.5 + 0.5 * self._rng.random()
        self._failures += 1
        self._last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        self._next_attempt = self._monotonic() + delay
        log.warning("database %s: %s; next attempt in %.1fs", self._where, self._last_error, delay)

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error as exc:  # pragma: no cover - close of a broken socket
                log.debug("database %s: close failed: %s", self._where, exc)
            self._conn = None

    @property
    def connected(self) -> bool:
        """Whether a usable connection is held right now."""
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    # -- Collector ---------------------------------------------------------------------------

    def present(self) -> bool:
        """Whether a connection succeeds (and the pool can be read). Never raises."""
        try:
            self._read()
        except CollectorError as exc:
            log.warning("database substrate not available: %s", exc)
            return False
        return True

    def pool_size(self) -> int | None:
        """The configured pool size, or the server's, or None before the first reading."""
        if self._pool_size is not None:
            return self._pool_size
        return self._last.server_pool if self._last is not None else None

    def geometry(self) -> Geometry | None:
        pool = self.pool_size()
        if pool is None:
            return None
        if self._pool_size is not None or self._last is None:
            return Geometry(units=pool, detail={"poolSize": pool})
        return Geometry(
            units=pool,
            detail={
                "maxConnections": self._last.max_connections,
                "superuserReservedConnections": self._last.superuser_reserved,
                "reservedConnections": self._last.reserved,
            },
        )

    def capacity(self) -> dict[str, str]:
        pool = self.pool_size()
        return {} if pool is None else {"db-connections": str(pool)}

    def _read(self) -> PoolReading:
        conn = self._connect()
        try:
            row = conn.execute(_QUERY).fetchone()
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                self._drop()
                self._schedule_retry(exc)
                raise CollectorError(f"database {self._where}: connection lost: {exc}") from exc
            raise CollectorError(f"database {self._where}: query failed: {exc}") from exc
        if row is None:  # pragma: no cover - an aggregate always returns one row
            raise CollectorError(f"database {self._where}: no row from pg_stat_activity")
        reading = PoolReading(*(int(value) for value in row))
        self._last = reading
        return reading

    def sample(self) -> Sample:
        reading = self._read()
        pool = self.pool_size() or 0
        if pool < 1:
            raise CollectorError(
                f"database {self._where}: pool size {pool} (max_connections "
                f"{reading.max_connections} minus reserved connections) is not positive"
            )
        if reading.unknown_state and not self._warned_privileges:
            self._warned_privileges = True
            log.warning(
                "database %s: %d sessions show no state: grant pg_monitor to the agent's role, "
                "or active/idle/waiting are undercounted",
                self._where,
                reading.unknown_state,
            )

        def share(count: int) -> float:
            return min(1.0, count / pool)

        signals = {
            "connections": share(reading.total),
            "active": share(reading.active),
            "waiting": share(reading.waiting),
            "lock_waits": share(reading.lock_waits),
        }
        raw = {
            "pool_size": float(pool),
            "max_connections": float(reading.max_connections),
            "total": float(reading.total),
            "active": float(reading.active),
            "idle": float(reading.idle),
            "idle_in_transaction": float(reading.idle_in_transaction),
            "waiting": float(reading.waiting),
            "lock_waits": float(reading.lock_waits),
            "unknown_state": float(reading.unknown_state),
        }
        return Sample(
            substrate=self.substrate,
            time=self._clock(),
            load=signals["connections"],
            signals=signals,
            raw=raw,
        )

    def close(self) -> None:
        self._drop()
