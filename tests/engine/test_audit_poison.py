"""An audit entry the database refuses is split off, stored in a safe form, and the writer moves on.

One NUL in a membridge node name used to jam the audit writer on PostgreSQL for good: it
retried the same batch forever, later changes waited out their ask timeout although they
had taken effect, and the entries were lost at shutdown. A lone surrogate (which a
membridge answer can carry: JSON allows the escape) is refused by both stores.
"""

from __future__ import annotations

import threading

import pytest

from bloom_runtime.actors.base import audit
from bloom_runtime.engine.models import new_id

POISON = {"surrogate": "\ud800", "nul": "\u0000"}
REPLACED = "\ufffd"


def _entry(engine, detail: str, action: str = "probe"):
    return audit(engine.clock.now_ms(), action, "test", new_id(), "test", detail)


def _stored(raw_sql, ids) -> dict[str, str]:
    listed = ", ".join(f"'{i}'" for i in ids)
    return dict(raw_sql(f"SELECT id, detail FROM audit_logs WHERE id IN ({listed})"))


@pytest.mark.parametrize("poison", ["surrogate", "nul"])
def test_a_refused_entry_is_split_off_and_stored_safe(make_engine, raw_sql, dialect, poison):
    if poison == "nul" and dialect == "sqlite":
        pytest.skip("SQLite stores NUL as it is; requests have it replaced before any store")
    engine = make_engine(ask_timeout_s=5.0)
    char = POISON[poison]
    first, bad, last = _entry(engine, "before"), _entry(engine, f"node=a{char}b"), _entry(engine, "after")
    engine.record([first, bad, last])  # one record, one batch: answered once all three are stored
    later = [_entry(engine, f"later {i}") for i in range(3)]
    for entry in later:
        engine.record([entry])  # each answered: the writer did not stay stuck on the batch before
    stored = _stored(raw_sql, [e.id for e in (first, bad, last, *later)])
    assert stored[first.id] == "before" and stored[last.id] == "after"
    assert stored[bad.id] == f"node=a{REPLACED}b"
    assert all(stored[e.id] == e.detail for e in later)
    health = engine.health()
    assert health["audit"]["pending"] == 0 and health["jobs"]["audit_flush"]["last_error"] is None


def test_callers_of_good_entries_sent_with_a_poisoned_one_are_answered(make_engine, raw_sql):
    engine = make_engine(ask_timeout_s=5.0)
    answered: list[str] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        entry = _entry(engine, f"good {i}" if i % 5 else f"bad {i}{POISON['surrogate']}")
        engine.record([entry])
        with lock:
            answered.append(entry.id)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answered) == 20
    stored = _stored(raw_sql, answered)
    assert len(stored) == 20 and sum(REPLACED in d for d in stored.values()) == 4


def test_nothing_is_lost_at_shutdown_behind_a_poisoned_entry(make_engine, raw_sql):
    engine = make_engine()
    entries = [_entry(engine, f"n{i}" + (POISON["surrogate"] if i == 3 else ""), action="drain") for i in range(50)]
    for e in entries:
        engine.record([e], wait=False)
    engine.stop()
    assert raw_sql("SELECT COUNT(*) FROM audit_logs WHERE action = 'drain'") == [(50,)]


def test_a_store_that_is_down_keeps_entries_pending_without_splitting(sqlite_store):
    """Only a refused value is split off: an outage is waited out, entries kept in order."""
    import contextlib

    import pykka

    from bloom_runtime.actors.audit_writer import AuditWriter
    from bloom_runtime.actors.base import JobHealth, Record, Tick
    from bloom_runtime.engine.clock import ManualClock
    from bloom_runtime.engine.errors import StoreUnavailable

    class Down:
        attempts = 0
        down = True

        @contextlib.contextmanager
        def transaction(self):
            if self.down:
                self.attempts += 1
                raise StoreUnavailable("connection refused")
            with sqlite_store.transaction() as tx:
                yield tx

    store = Down()
    health = JobHealth("audit_flush", 0.5)
    ref = AuditWriter.start(store, ManualClock(), health)
    try:
        reply = pykka.ThreadingFuture()
        ref.tell(Record([audit(1, "probe", "test", new_id(), "test") for _ in range(8)], reply, "done"))
        ref.ask(Tick(), timeout=10)
        ref.ask(Tick(), timeout=10)  # the Flush the record scheduled has run before this
        assert store.attempts == 3  # one per flush: the batch was not split while the store was down
        store.down = False
        ref.ask(Tick(), timeout=10)
        assert reply.get(timeout=10) == "done" and len(sqlite_store.list_audit(10, None).items) == 8
    finally:
        ref.stop()


@pytest.mark.parametrize("group_commit", [True, False])
def test_a_fail_reason_holding_nul_is_stored_replaced_with_its_change(make_engine, raw_sql, group_commit):
    """The reason (often an agent's answer) goes into the change's audit entry, written in the
    change's own transaction (group commit) or by the audit writer: neither may refuse it."""
    from .conftest import new_task, worker

    engine = make_engine(audit_group_commit=group_commit)
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task())
    grant = engine.leases.acquire(task.id)
    failed, lease = engine.leases.fail(grant.lease.id, f"agent said a{POISON['nul']}b")
    assert failed.status == "queued" and lease.status == "failed"
    [(detail,)] = raw_sql(f"SELECT detail FROM audit_logs WHERE action = 'lease_failed' AND entity_id = '{task.id}'")
    assert detail.endswith(f"agent said a{REPLACED}b")
