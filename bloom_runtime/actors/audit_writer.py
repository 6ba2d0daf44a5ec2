"""AuditWriter: owns ``audit_logs``; writes entries in groups and answers callers after commit."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import pykka

from bloom_runtime.actors.base import Flush, JobHealth, Record, Tick
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.errors import BloomError
from bloom_runtime.sql.store import Store

log = logging.getLogger(__name__)

STOP_FLUSH_ATTEMPTS = 5


class AuditBacklog:
    """Audit entries sent to the writer and not yet committed, and since when.

    Counted by the senders (``added``, as they tell the writer) and the writer
    (``removed``, once committed or given up on), so a writer that is stuck, not
    only one that fails, shows as an ageing backlog. Entries leave in the order
    they came, near enough for an age."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: deque[list[int]] = deque()  # [sent at ms, entries left]
        self.pending = 0

    def added(self, count: int, now_ms: int) -> None:
        if count:
            with self._lock:
                self._batches.append([now_ms, count])
                self.pending += count

    def removed(self, count: int) -> None:
        with self._lock:
            self.pending = max(0, self.pending - count)
            while count and self._batches:
                head = self._batches[0]
                taken = min(head[1], count)
                head[1] -= taken
                count -= taken
                if not head[1]:
                    self._batches.popleft()

    def snapshot(self, now_ms: int) -> dict[str, Any]:
        with self._lock:
            oldest = self._batches[0][0] if self._batches else None
            return {"pending": self.pending, "oldest_age_s": None if oldest is None else max(0, now_ms - oldest) / 1000}


class AuditWriter(pykka.ThreadingActor):
    """Commits every pending entry in one transaction (or one each, with group commit off).

    If the store is down, entries stay pending and the next tick tries again;
    the callers waiting on them time out rather than hear a success that is not
    durable.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        health: JobHealth,
        *,
        group_commit: bool = True,
        batch_max: int = 2000,
        backlog: AuditBacklog | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.clock = clock
        self.health = health
        self.backlog = backlog or AuditBacklog()  # the engine's, which its sink fills
        self.group_commit = group_commit
        self.batch_max = batch_max
        self._pending: deque[Record] = deque()
        self._flush_scheduled = False
        self.written = 0

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Record):
            self._pending.append(message)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.actor_ref.tell(Flush())
            return None
        if isinstance(message, Flush):
            self._flush_scheduled = False
            self._flush()
            return None
        if isinstance(message, Tick):
            self._flush()
            return None
        return None

    def on_stop(self) -> None:
        for _ in range(STOP_FLUSH_ATTEMPTS):
            if not self._pending:
                return
            self._flush()
        if self._pending:
            lost = sum(len(r.entries) for r in self._pending)
            self.backlog.removed(lost)
            log.error("audit: %d entries could not be written before stop", lost)

    def pending_count(self) -> int:
        return sum(len(r.entries) for r in self._pending)

    def _flush(self) -> None:
        while self._pending:
            if self.group_commit:
                batch, count = [], 0
                while self._pending and (count == 0 or count + len(self._pending[0].entries) <= self.batch_max):
                    rec = self._pending.popleft()
                    batch.append(rec)
                    count += len(rec.entries)
            else:
                batch = [self._pending.popleft()]
            try:
                with self.store.transaction() as tx:
                    tx.insert_audit([e for rec in batch for e in rec.entries])
            except BloomError as exc:
                self._pending.extendleft(reversed(batch))
                self.health.failed(exc, self.clock.now_ms())
                log.warning("audit: write failed, %d entries pending: %s", self.pending_count(), exc)
                return
            except Exception as exc:
                self._pending.extendleft(reversed(batch))
                self.health.failed(exc, self.clock.now_ms())
                log.exception("audit: write failed")
                return
            self.health.succeeded(self.clock.now_ms())
            for rec in batch:
                self.written += len(rec.entries)
                self.backlog.removed(len(rec.entries))
                if rec.reply is not None:
                    rec.reply.set(rec.value)
