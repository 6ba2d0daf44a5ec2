"""The AuditWriter keeps entries it could not write and answers callers only after commit."""

from __future__ import annotations

import contextlib

import pykka
import pytest

from bloom_runtime.actors.audit_writer import AuditWriter
from bloom_runtime.actors.base import JobHealth, Record, Tick, audit
from bloom_runtime.engine.clock import ManualClock
from bloom_runtime.engine.errors import StoreUnavailable
from bloom_runtime.engine.models import new_id


class FlakyStore:
    """Delegates to a real store; the first ``failures`` transactions fail as if it were down."""

    def __init__(self, store, failures: int) -> None:
        self._store = store
        self.failures = failures

    @contextlib.contextmanager
    def transaction(self):
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("database down")
        with self._store.transaction() as tx:
            yield tx


def test_entries_survive_a_failed_write_and_callers_wait_for_commit(sqlite_store):
    health = JobHealth("audit_flush", 0.5)
    ref = AuditWriter.start(FlakyStore(sqlite_store, failures=1), ManualClock(), health)
    try:
        reply = pykka.ThreadingFuture()
        entries = [audit(1, "probe", "test", new_id(), "test") for _ in range(3)]
        ref.tell(Record(entries, reply, "done"))
        ref.ask(Tick(), timeout=10)  # the first flush failed; this one retries
        assert reply.get(timeout=10) == "done"
        assert health.failures == 1 and health.last_error is None
        assert len(sqlite_store.list_audit(10, None).items) == 3
    finally:
        ref.stop()


def test_no_answer_while_the_store_stays_down(sqlite_store):
    ref = AuditWriter.start(FlakyStore(sqlite_store, failures=10**6), ManualClock(), JobHealth("audit_flush", 0.5))
    try:
        reply = pykka.ThreadingFuture()
        ref.tell(Record([audit(1, "probe", "test", new_id(), "test")], reply, "done"))
        ref.ask(Tick(), timeout=10)
        with pytest.raises(pykka.Timeout):
            reply.get(timeout=0.2)
    finally:
        ref.stop()
