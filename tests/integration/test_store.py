"""The outcome store on a real PostgreSQL (the fixtures start one from the Debian packages):
the store cases of tests/unit/test_store.py, then the operator writing its outcomes there while
the database becomes unreachable mid-run and comes back.

"Unreachable" is a TCP proxy (socat) between the operator and PostgreSQL that the test stops and
starts again on the same port: the database itself keeps running, as it would behind a network
cut, so that what the operator stored before is still there when it returns.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from capacity_operator.store import database_url, outcomes
from tests.cluster import Proc, show, unique, wait_for
from tests.integration.test_recovery import Running, agent, operator
from tests.integration.test_truth import counters
from tests.integration.test_webhook import Env, env
from tests.services import PostgresServer, free_port, postgres_fixture
from tests.unit.test_store import recorded_twice_is_one_row_with_the_newest_outcome

__all__ = ["env", "postgres_fixture"]  # fixtures used here

PERIOD = 4.0


@pytest.fixture
def database(postgres: PostgresServer) -> Iterator[str]:
    """A database of this test's own on the session's PostgreSQL; its name."""
    name = f"outcomes_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def url(postgres: PostgresServer, database: str, port: int | None = None) -> str:
    return database_url(
        None,
        f"postgresql://{postgres.user}:{postgres.password}@127.0.0.1:{port or postgres.port}/"
        f"{database}",
    )


def test_the_store_cases_hold_on_postgresql(postgres: PostgresServer, database: str) -> None:
    recorded_twice_is_one_row_with_the_newest_outcome(url(postgres, database))


def stored(dsn: str, namespace: str) -> dict[str, dict[str, Any]]:
    """claim name -> row of the claims of ``namespace``, read straight from the database (not
    through the store; the operator also records claims other tests left behind)."""
    engine = sa.create_engine(dsn)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(outcomes)).mappings().all()
    except sa.exc.ProgrammingError:
        return {}  # no table yet: the operator has not migrated
    finally:
        engine.dispose()
    return {
        str(r["claim"]).split("/", 1)[1]: dict(r)
        for r in rows
        if str(r["claim"]).startswith(f"{namespace}/")
    }


def test_admission_goes_on_while_the_database_is_unreachable_and_the_store_catches_up(
    env: Env, postgres: PostgresServer, database: str
) -> None:
    cluster, ns = env.cluster, env.namespace
    prefix = unique("cp-store")
    port = free_port()

    def proxy() -> Proc:
        return Proc(
            "db-proxy",
            ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
             f"TCP:127.0.0.1:{postgres.port}"],
            env.logs / "proxy.log",
        )  # fmt: skip

    direct = url(postgres, database)

    def operator_proc() -> Proc:
        # only this test's namespace: claims other tests left behind would be recorded too
        proc = operator(env.kubeconfig, env.platform, env.logs / "op.log", ns)
        proc.env.update(
            CAPACITY_OPERATOR_TRUTH_OBSERVATION_SECONDS=str(PERIOD),
            CAPACITY_OPERATOR_TRUTH_INTERVAL_SECONDS="1",
            CAPACITY_OPERATOR_CALIBRATION_INTERVAL_SECONDS="1",
            CAPACITY_OPERATOR_STORE_DSN=(
                f"postgresql://{postgres.user}:{postgres.password}@127.0.0.1:{port}/{database}"
            ),
        )
        return proc

    def confirmed() -> int:
        """Confirmed outcomes counted in the calibration ConfigMap (the database is this
        test's own, so every outcome in it is one of this test's claims)."""
        return counters(env).get("confirmed", 0)

    def verdict(name: str, wanted: str) -> bool:
        truth = (cluster.claim(ns, name) or {}).get("status", {}).get("truth") or {}
        return truth.get("verdict") == wanted

    with ExitStack() as stack:
        link = stack.enter_context(Running(proxy()))
        op = stack.enter_context(Running(operator_proc()))
        stack.enter_context(Running(agent(env.kubeconfig, env.platform, env.logs, prefix)))
        stack.callback(cluster.delete_nodes, prefix)
        cluster.wait_nodes_ready(prefix, 1)
        cluster.create_claim(ns, "before", cGeo=0.05, substrate="host")
        cluster.wait_phase(ns, "before", {"Admitted"}, timeout=60)
        wait_for("before Confirmed", lambda: verdict("before", "Confirmed"), timeout=PERIOD + 30)
        try:
            wait_for(
                "before's outcome stored",
                lambda: stored(direct, ns).get("before", {}).get("verdict") == "Confirmed",
                timeout=30,
            )
        except AssertionError:
            raise AssertionError(show(op)) from None
        first = stored(direct, ns)["before"]
        assert first["decision"] == "Admitted"
        assert first["nodes"] == [f"{prefix}-0"]
        assert first["readings"][f"{prefix}-0"]["headroom"] > 0
        assert first["thresholds"]["thetaFit"]
        # calibration reads the store: it counts the outcome (and creates its ConfigMap for it)
        wait_for("calibration counts before", lambda: confirmed() == 1, timeout=30)

        # the database is cut off: admission and truth go on, the store says so and waits
        link.stop()
        cluster.create_claim(ns, "during", cGeo=0.05, substrate="host")
        cluster.wait_phase(ns, "during", {"Admitted"}, timeout=60)
        wait_for("during Confirmed", lambda: verdict("during", "Confirmed"), timeout=PERIOD + 30)
        wait_for(
            "the store reports the outage",
            lambda: "outcome store" in op.output() and "unavailable" in op.output(),
            timeout=30,
        )
        assert "during" not in stored(direct, ns)
        wait_for(
            "calibration says it waits", lambda: "calibration waits" in op.output(), timeout=30
        )
        assert confirmed() == 1

        # back: what was pending is written, once
        stack.enter_context(Running(proxy()))
        wait_for(
            "during's outcome caught up",
            lambda: stored(direct, ns).get("during", {}).get("verdict") == "Confirmed",
            timeout=60,
        )
        wait_for(
            "the log says reachable again", lambda: "reachable again" in op.output(), timeout=5
        )
        wait_for("calibration caught up", lambda: confirmed() == 2, timeout=30)
        assert "calibration resumes" in op.output()

        # an operator restart loses nothing and records nothing twice
        op.stop()
        op = stack.enter_context(Running(operator_proc()))
        cluster.create_claim(ns, "after", cGeo=0.05, substrate="host")
        wait_for("after Confirmed", lambda: verdict("after", "Confirmed"), timeout=PERIOD + 60)
        wait_for("after stored", lambda: "after" in stored(direct, ns), timeout=30)
        rows = stored(direct, ns)
        assert sorted(rows) == ["after", "before", "during"]
        engine = sa.create_engine(direct)
        with engine.connect() as connection:
            mine = outcomes.c.claim.like(f"{ns}/%")
            count = connection.execute(
                sa.select(sa.func.count()).select_from(outcomes).where(mine)
            ).scalar()
        engine.dispose()
        assert count == 3
        wait_for("calibration counts after", lambda: confirmed() == 3, timeout=30)
