"""AuditWriter: owns ``audit_logs``; writes entries in groups and answers callers after commit."""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from typing import Any

import msgspec
import pykka

from bloom_runtime.actors.base import Flush, JobHealth, Record, Tick, started
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.errors import BloomError, StoreRefused
from bloom_runtime.engine.models import NUL_REPLACEMENT, AuditEntry
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
    durable. An entry the database refuses (``StoreRefused``, or a value the driver
    cannot encode) is found by splitting its batch, stored with its unsafe
    characters replaced, and the rest go on: one bad entry never holds up the others.
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
        # Entries whose caller gave up before they were taken are not written: that
        # caller was told nothing changed. They leave the backlog as well.
        kept = deque(rec for rec in self._pending if started(rec.reply))
        if len(kept) != len(self._pending):
            self.backlog.removed(self.pending_count() - sum(len(rec.entries) for rec in kept))
            self._pending = kept
        while self._pending:
            if self.group_commit:
                batch, count = [], 0
                while self._pending and (count == 0 or count + len(self._pending[0].entries) <= self.batch_max):
                    rec = self._pending.popleft()
                    batch.append(rec)
                    count += len(rec.entries)
            else:
                batch = [self._pending.popleft()]
            if not self._write_batch(batch):
                return

    def _write_batch(self, batch: list[Record]) -> bool:
        """Commit the batch's entries, splitting around any the database refuses.

        A refused entry is stored with its unsafe characters replaced, and its
        neighbours are answered as usual. If the database itself fails, what is left
        goes back to the front of the queue for the next tick; returns False then."""
        entries = [e for rec in batch for e in rec.entries]
        done = [False] * len(entries)
        failure: BaseException | None = None
        ranges = [(0, len(entries))]
        while ranges and failure is None:
            lo, hi = ranges.pop()
            error = self._insert(entries[lo:hi])
            if error is not None and _refused(error):
                if hi - lo > 1:
                    mid = (lo + hi) // 2
                    ranges += [(mid, hi), (lo, mid)]  # the first half first: entries keep their order
                    continue
                error = self._store_safe(entries[lo], error)
            if error is not None:
                failure = error
                continue
            done[lo:hi] = [True] * (hi - lo)
        self._settle(batch, done)
        now = self.clock.now_ms()
        if failure is None:
            self.health.succeeded(now)
            return True
        self.health.failed(failure, now)
        if isinstance(failure, BloomError):
            log.warning("audit: write failed, %d entries pending: %s", self.pending_count(), failure)
        return False

    def _insert(self, entries: list[AuditEntry]) -> BaseException | None:
        try:
            with self.store.transaction() as tx:
                tx.insert_audit(entries)
        except (BloomError, UnicodeError) as exc:  # UnicodeError: a value the driver cannot encode
            return exc
        except Exception as exc:
            log.exception("audit: write failed")
            return exc
        return None

    def _store_safe(self, entry: AuditEntry, refusal: BaseException) -> BaseException | None:
        """Store a refused entry with its unsafe characters replaced; None once done (or given up on)."""
        safe = safe_entry(entry)
        error = self._insert([safe]) if safe != entry else refusal
        if error is None:
            log.warning("audit: entry %s (%s) refused as it was (%s); stored with unsafe characters replaced",
                        entry.id, entry.action, refusal)
            return None
        if _refused(error):
            # Nothing more can be done for it; the change it records stands either way.
            log.error("audit: entry %s (%s) cannot be stored in any form (%s); dropped", entry.id, entry.action, error)
            return None
        return error

    def _settle(self, batch: list[Record], done: list[bool]) -> None:
        """Answer the records whose entries are all stored; put the rest back, in order, at the front."""
        left: list[Record] = []
        at = 0
        for rec in batch:
            flags, at = done[at : at + len(rec.entries)], at + len(rec.entries)
            stored = sum(flags)
            self.written += stored
            self.backlog.removed(stored)
            if stored == len(rec.entries):
                if rec.reply is not None:
                    rec.reply.set(rec.value)
            else:
                left.append(Record([e for e, ok in zip(rec.entries, flags, strict=True) if not ok], rec.reply, rec.value))
        self._pending.extendleft(reversed(left))


_UNSAFE = re.compile("[\x00\ud800-\udfff]")  # NUL (PostgreSQL refuses it) and lone surrogates (no encoding has them)


def safe_entry(entry: AuditEntry) -> AuditEntry:
    """``entry`` with every NUL and lone surrogate in its text replaced by U+FFFD."""
    texts = {f: getattr(entry, f) for f in entry.__struct_fields__}
    return msgspec.structs.replace(entry, **{f: _UNSAFE.sub(NUL_REPLACEMENT, v) for f, v in texts.items() if isinstance(v, str)})


def _refused(error: BaseException) -> bool:
    """The database (or the driver) refused a value: splitting can isolate it. Anything else is an outage."""
    return isinstance(error, StoreRefused) or not isinstance(error, BloomError)
