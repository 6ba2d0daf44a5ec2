"""PostgreSQL behind a fault proxy: every database call is bounded, and the answers say so.

The proxy's ``hang`` stops forwarding without closing anything, as a hung server or a
path that swallows packets would: the kernel still acknowledges, so only a client-side
bound ends a wait. Every wait here is bounded; nothing sleeps to let time pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import requests

from bloom_runtime.engine.errors import OutcomeUnknown, StoreTimeout, StoreUnavailable
from bloom_runtime.engine.models import NewTask, new_id
from bloom_runtime.sql.pg_connection import Unanswered
from bloom_runtime.sql.pg_errors import session_lost, translate
from bloom_runtime.sql.postgres import PING_TIMEOUT_S, PostgresStore
from bloom_runtime.sql.store import CreateOp, SessionLost

from ..conftest import backend_pids, terminate
from ..http.conftest import new_task, wait_for

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parents[2]
STATEMENT_TIMEOUT_S = 1.0  # scaled down: a read gives up after this plus the 1 s grace


@pytest.fixture
def hung_server(proxied_pg_url, fault_proxy, live_server):
    server = live_server(database_url=proxied_pg_url, db_statement_timeout_s=STATEMENT_TIMEOUT_S, rate_limit_per_s=0)
    s = requests.Session()
    task = s.post(server.url + "/llm-tasks", json=new_task()).json()
    assert s.get(server.url + f"/llm-tasks/{task['id']}").status_code == 200
    fault_proxy.hang()
    try:
        yield server, s, task
    finally:
        fault_proxy.forward()


def _timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_health_answers_within_a_second_while_the_database_hangs(hung_server):
    server, s, _ = hung_server
    for _ in range(3):
        r, took = _timed(lambda: s.get(server.url + "/health", timeout=10))
        assert took < 1.0, took
        assert r.status_code == 503 and r.json()["storage_ok"] is False
        assert r.json()["storage_error"] == "storage did not answer in time"


def test_reads_fail_fast_with_503_while_the_database_hangs_and_recover_after(hung_server, fault_proxy):
    server, s, task = hung_server
    bound = STATEMENT_TIMEOUT_S + 1.0 + 1.0  # statement timeout, the client's grace, slack for a loaded machine
    for path in (f"/llm-tasks/{task['id']}", "/llm-tasks", "/workers", "/stats"):
        r, took = _timed(lambda p=path: s.get(server.url + p, timeout=15))
        assert r.status_code == 503 and r.headers["Retry-After"], (path, r.status_code, r.text)
        assert r.json()["error"] in ("storage did not answer in time", "storage unavailable")
        assert took < bound, (path, took)
    fault_proxy.forward()
    wait_for(lambda: s.get(server.url + "/health", timeout=10).status_code == 200)
    assert s.get(server.url + f"/llm-tasks/{task['id']}", timeout=10).json()["id"] == task["id"]


def test_a_store_read_and_ping_give_up_in_time(proxied_pg_url, fault_proxy):
    store = PostgresStore(proxied_pg_url, pool_min=2, pool_max=4, statement_timeout_s=STATEMENT_TIMEOUT_S)
    store.open(wait_s=10)
    try:
        store.ping()
        fault_proxy.hang()
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(StoreTimeout):
                store.ping()
            assert time.monotonic() - started < PING_TIMEOUT_S + 0.3
        started = time.monotonic()
        with pytest.raises(StoreTimeout):
            store.get_task("00000000-0000-0000-0000-000000000000")
        assert time.monotonic() - started < STATEMENT_TIMEOUT_S + 1.0 + 1.0
        fault_proxy.forward()
        wait_for(lambda: _pings(store))
    finally:
        fault_proxy.forward()
        store.close()


def test_a_commit_the_database_does_not_answer_is_reported_as_an_unknown_outcome(proxied_pg_url, fault_proxy):
    """It may have been applied: 504, not a 503."""
    store = PostgresStore(proxied_pg_url, pool_min=1, pool_max=1, statement_timeout_s=STATEMENT_TIMEOUT_S)
    store.open(wait_s=10)
    try:
        def create() -> None:
            with store.transaction() as tx:
                tx.apply([CreateOp(NewTask(**new_task()), new_id())], 0, commit=True)

        create()  # the one connection has its statements prepared, and is lent again unchecked
        fault_proxy.hang()
        with pytest.raises(OutcomeUnknown):
            create()
    finally:
        fault_proxy.forward()
        store.close()


def test_a_server_that_did_not_answer_is_a_timeout_not_a_lost_session():
    """A lost session is retried once on another connection; an unanswered one is not,
    since that would only double the wait."""
    silent = Unanswered("did not answer within 2.0 s")
    assert not session_lost(silent)
    assert isinstance(translate(silent, "db"), StoreTimeout)
    assert not isinstance(translate(silent, "db"), SessionLost)


def _pings(store: PostgresStore) -> bool:
    try:
        store.ping()
        return True
    except StoreUnavailable:
        return False


def test_sessions_carry_a_statement_timeout_keepalives_and_our_name(pg_url):
    store = PostgresStore(pg_url, pool_min=1, pool_max=1, statement_timeout_s=2.5)
    store.open(wait_s=10)
    try:
        with store._conn() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("2500ms",)
            assert conn.execute("SHOW application_name").fetchone() == ("bloom-runtime",)
            params = conn.info.get_parameters()
            assert params["keepalives"] == "1" and int(params["tcp_user_timeout"]) >= 3500
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(5)")
    finally:
        store.close()


def test_migrations_are_not_bounded_by_the_statement_timeout(pg_url):
    store = PostgresStore(pg_url, pool_min=1, pool_max=1, statement_timeout_s=0.5)
    store.open(wait_s=10)
    try:
        assert store.migrate() == []
        with store._conn() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("500ms",)  # SET LOCAL ended with its transaction
            assert conn.io_timeout_s == 1.5
    finally:
        store.close()


@pytest.mark.parametrize("fault", ["hang", "refuse"])
def test_open_gives_up_at_db_open_wait_and_not_later(proxied_pg_url, fault_proxy, fault):
    getattr(fault_proxy, fault)()
    store = PostgresStore(proxied_pg_url, pool_min=2, pool_max=4)  # connect_timeout 5 s, longer than the wait
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL"):
        store.open(wait_s=1.5)
    took = time.monotonic() - started
    assert 1.4 <= took < 2.0, took


def test_migrate_against_a_hung_database_exits_2_at_db_open_wait(proxied_pg_url, fault_proxy):
    fault_proxy.hang()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DB_OPEN_WAIT"] = "2"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bloom_runtime.cli", "migrate", "--database-url", proxied_pg_url],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    took = time.monotonic() - started
    assert done.returncode == 2 and "did not answer in time" in done.stderr, done.stderr
    assert took < 2.0 + 2.5, took  # the wait, plus an interpreter's start on a busy machine (connect_timeout alone was 5 s)


def test_reads_after_the_sessions_were_terminated_do_not_fail(pg_url):
    """A pooled connection whose session the server ended is only found out when used: a read repeats once."""
    store = PostgresStore(pg_url, pool_min=4, pool_max=4)
    store.open(wait_s=10)
    try:
        for _ in range(8):
            store.list_tasks(None, 10, None)  # every connection was just used: the pool will lend them unchecked
        terminate(pg_url, backend_pids(pg_url))
        for _ in range(8):
            store.list_tasks(None, 10, None)
            store.stats()
    finally:
        store.close()
