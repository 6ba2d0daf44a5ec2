"""Shared fixtures: a PostgreSQL server for the run, clean stores for each test.

PostgreSQL comes from ``BLOOM_TEST_DATABASE_URL`` when set (the suite creates its
own database there and drops it afterwards), otherwise from a throwaway cluster
started from the installed binaries.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from bloom_runtime.engine.settings import Settings
from bloom_runtime.sql.store import Store

from .fault_proxy import FaultProxy
from .live_server import LiveServer
from .pgcluster import ClusterUnavailable, ThrowawayCluster


def run_together(n: int, body: Callable[[int], Any]) -> list[Any]:
    """Run ``body(i)`` on ``n`` threads released at once; return results (or exceptions) by index."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            out[i] = body(i)
        except BaseException as exc:  # collected, asserted on by the test
            out[i] = exc

    threads = [threading.Thread(target=target, args=(i,), name=f"conc-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a thread hung"
    return out


def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition", interval_s: float = 0.005) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(interval_s)


STORE_FIXTURE = {"sqlite": "sqlite_store", "postgres": "pg_store"}

TABLES = (
    "llm_tasks",
    "leases",
    "workers",
    "runtime_artifacts",
    "llm_results",
    "audit_logs",
    "runtime_settings",
    "users",
    "dispatch_deliveries",
    "worker_trust",
    "runtime_history",
)


def _with_dbname(url: str, dbname: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("BLOOM_TEST_DATABASE_URL")
    if url:
        yield url
        return
    try:
        cluster = ThrowawayCluster()
        url = cluster.start()
    except ClusterUnavailable as exc:
        pytest.fail(f"PostgreSQL tests need a server: {exc}", pytrace=False)
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A database this test run created (and drops), migrated once."""
    name = f"bloom_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, not input
    url = _with_dbname(pg_server_url, name)
    from bloom_runtime.sql.postgres import PostgresStore

    store = PostgresStore(url, pool_min=1, pool_max=2)
    store.open(wait_s=10)
    store.migrate()
    store.close()
    try:
        yield url
    finally:
        with psycopg.connect(pg_server_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def truncate_pg(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE " + ", ".join(TABLES))


def backend_pids(url: str) -> list[int]:
    """The server processes of every session on the database of ``url`` but the caller's."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [r[0] for r in rows]


def terminate(url: str, pids: list[int]) -> None:
    """``pg_terminate_backend`` each session and wait until the server has ended it."""
    with psycopg.connect(url, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # The server ends each process asynchronously.
        wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone() == (0,),
                 what=f"sessions {pids} ended")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    """A database URL for an engine, the same test on both stores: a SQLite file of this
    test's, or the run's PostgreSQL database, emptied."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "bloom.db")
    url = request.getfixturevalue("pg_url")
    truncate_pg(url)
    return url


@contextlib.contextmanager
def fresh_pg_store(pg_url: str, pool_min: int = 2, pool_max: int = 40) -> Iterator[Any]:
    """An open PostgresStore on the emptied test database, closed afterwards."""
    from bloom_runtime.sql.postgres import PostgresStore

    truncate_pg(pg_url)
    store = PostgresStore(pg_url, pool_min=pool_min, pool_max=pool_max)
    store.open(wait_s=10)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    with fresh_pg_store(pg_url) as store:
        yield store


@pytest.fixture
def sqlite_store(tmp_path) -> Iterator[Store]:
    from bloom_runtime.sql.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "bloom.db"))
    store.open()
    store.migrate()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request) -> Store:
    """The same test against both stores."""
    return request.getfixturevalue(STORE_FIXTURE[request.param])


@pytest.fixture
def agents() -> Iterator[Callable[..., Any]]:
    """``agents(node_id, **options)`` starts one more membridge agent stand-in; all close at teardown."""
    from .agent_standin import AgentStandIn

    running: list[AgentStandIn] = []

    def start(node_id: str = "node-1", **kwargs: Any) -> AgentStandIn:
        agent = AgentStandIn(node_id, **kwargs).start()
        running.append(agent)
        return agent

    yield start
    for agent in running:
        agent.close()


# --- faults and real servers ------------------------------------------------------------


@pytest.fixture
def fault_proxy(pg_url: str) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the test PostgreSQL server (forwarding)."""
    from urllib.parse import urlsplit

    parts = urlsplit(pg_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxy


@pytest.fixture
def proxied_pg_url(pg_url: str, fault_proxy: FaultProxy) -> str:
    """The (truncated) test database, reached through ``fault_proxy``."""
    truncate_pg(pg_url)
    return fault_proxy.url_for(pg_url)


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    """Start ``LiveServer``s from ``Settings`` fields; all are closed at the end.

    With ``fault_proxy``, ask for this one after it, so the servers stop before the proxy does."""
    started: list[LiveServer] = []

    def start(**fields: Any) -> LiveServer:
        server = LiveServer(Settings(**fields))
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.close()
