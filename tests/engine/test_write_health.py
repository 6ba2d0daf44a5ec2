"""/health reflects whether writes succeed: the last write error and its age, the audit backlog and its age."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator

import pytest

from bloom_runtime.actors.base import audit
from bloom_runtime.engine.clock import ManualClock
from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import StoreUnavailable
from bloom_runtime.engine.models import new_id
from bloom_runtime.sql.sqlite import SqliteStore

from ..http.conftest import wait_for
from .conftest import new_task, settings

BIG = "x" * 20_000  # a few pages


def _writer(engine: Engine) -> sqlite3.Connection:
    conn = engine.store._writer  # type: ignore[attr-defined]
    assert conn is not None
    return conn


@contextlib.contextmanager
def _full(engine: Engine) -> Iterator[None]:
    """The database file may not grow: SQLite answers SQLITE_FULL, as on a full disk."""
    conn = _writer(engine)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    try:
        yield
    finally:
        conn.execute("PRAGMA max_page_count = 1073741823")


def test_full_sqlite_turns_health_unhealthy_and_a_write_that_passes_turns_it_back(tmp_path):
    clock = ManualClock()
    with Engine.start(settings(database_url=f"sqlite:///{tmp_path}/full.db"), clock=clock) as engine:
        engine.tasks.create(new_task())
        assert engine.health()["status"] == "ok" and engine.health()["writes"]["ok"] is True
        with _full(engine):
            with pytest.raises(StoreUnavailable, match="full"):
                engine.tasks.create(new_task(prompt=BIG))
            clock.advance(3_000)
            report = engine.health()
            assert report["storage_ok"] is True  # reads still work: only the writes tell
            assert report["status"] == "unhealthy"
            writes = report["writes"]
            assert writes["ok"] is False and writes["last_error"] == "StoreFull: storage is full"
            assert writes["last_error_age_s"] == 3.0
        engine.tasks.create(new_task(prompt=BIG))
        report = engine.health()
        assert report["status"] == "ok" and report["writes"]["ok"] is True and report["writes"]["last_error"] is None


def test_a_real_full_disk_turns_health_unhealthy(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        with Engine.start(settings(database_url=f"sqlite:///{mount}/bloom.db")) as engine:
            with pytest.raises(StoreUnavailable):
                for _ in range(200):
                    engine.tasks.create(new_task(prompt=BIG))
            report = engine.health()
            assert report["status"] == "unhealthy" and report["writes"]["last_error"] == "StoreFull: storage is full"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_jammed_audit_writer_turns_health_unhealthy_until_its_backlog_drains(tmp_path):
    """Another process holds SQLite's write lock: the audit writer cannot write, its backlog ages."""
    path = str(tmp_path / "jam.db")
    store = SqliteStore(path, busy_timeout_s=0.05)
    store.open()
    store.migrate()
    engine = Engine.start(settings(audit_backlog_max_s=0.3), store=store)
    try:
        assert engine.health()["audit"] == {"pending": 0, "oldest_age_s": None}
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            engine.record([audit(engine.clock.now_ms(), "probe", "test", new_id(), "test")], wait=False)
            report = wait_for(lambda: ((r := engine.health())["audit"]["oldest_age_s"] or 0) >= 0.3 and r)
            assert report["status"] == "unhealthy" and report["audit"]["pending"] == 1
            assert report["storage_ok"] is True
        finally:
            other.execute("ROLLBACK")
            other.close()
        wait_for(lambda: engine.health()["status"] == "ok")
        assert engine.health()["audit"] == {"pending": 0, "oldest_age_s": None}
        assert any(e.action == "probe" for e in engine.audit.list().items)
    finally:
        engine.stop()


@pytest.mark.postgres
def test_postgres_writes_failing_and_a_hung_audit_writer_show_in_health(proxied_pg_url, fault_proxy, live_server):
    import requests

    server = live_server(database_url=proxied_pg_url, db_statement_timeout_s=0.5, audit_backlog_max_s=0.5,
                         lease_sweep_interval_s=3600.0)
    s = requests.Session()
    assert s.post(server.url + "/llm-tasks", json={"context_id": "c", "agent_slug": "a", "prompt": "p"}).status_code == 201
    fault_proxy.hang()
    try:
        server.engine.record([audit(server.engine.clock.now_ms(), "probe", "test", new_id(), "test")], wait=False)
        # 503 when the pool's check of the connection timed out before anything was sent, 504 when the
        # create's message was sent and never answered: which one depends on the connection's age.
        assert s.post(server.url + "/llm-tasks", json={"context_id": "c", "agent_slug": "a", "prompt": "p"}).status_code in (503, 504)
        body = wait_for(lambda: (b := s.get(server.url + "/health", timeout=5).json())["audit"]["pending"] and
                        b["audit"]["oldest_age_s"] >= 0.5 and b)
        assert body["status"] == "unhealthy" and body["writes"]["ok"] is False
        assert body["writes"]["last_error"].split(":")[0] in ("StoreTimeout", "OutcomeUnknown")
    finally:
        fault_proxy.forward()
    wait_for(lambda: s.get(server.url + "/health", timeout=5).json()["audit"]["pending"] == 0, timeout_s=20)
    assert s.post(server.url + "/llm-tasks", json={"context_id": "c", "agent_slug": "a", "prompt": "p"}).status_code == 201
    wait_for(lambda: s.get(server.url + "/health", timeout=5).json()["status"] == "ok", timeout_s=20)



def test_entries_whose_caller_gave_up_are_not_written_and_leave_the_backlog(sqlite_store):
    from bloom_runtime.actors.audit_writer import AuditBacklog, AuditWriter
    from bloom_runtime.actors.base import JobHealth, Record, Reply

    backlog = AuditBacklog()
    ref = AuditWriter.start(sqlite_store, ManualClock(), JobHealth("audit_flush", 0.5), backlog=backlog)
    try:
        gone, waiting = Reply(), Reply()
        assert gone.abandon()  # its caller was told nothing changed
        for reply in (gone, waiting):
            backlog.added(1, 0)
            ref.tell(Record([audit(1, "probe", "test", new_id(), "test")], reply, "done"))
        assert waiting.get(timeout=10) == "done"
        assert backlog.snapshot(0) == {"pending": 0, "oldest_age_s": None}
        assert len(sqlite_store.list_audit(10, None).items) == 1
    finally:
        ref.stop()
