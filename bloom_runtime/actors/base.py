"""What the actors share: replies, group commit, periodic ticks and job health.

Callers at the edge (the engine facade) send a message carrying a
``pykka.ThreadingFuture`` and block on it with a timeout; actors never block on
each other. A ``BatchingActor`` gathers the write messages waiting in its inbox
and runs them in one transaction, then hands the audit entries and the replies
to the ``AuditWriter``, which answers the callers once their entries are
committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.errors import BloomError, StoreUnavailable, public_summary
from bloom_runtime.engine.models import AuditEntry, new_id
from bloom_runtime.sql.store import Op, Store, Transaction, TransientConflict

log = logging.getLogger(__name__)

TRANSIENT_RETRIES = 3
TRANSIENT_PAUSE_S = 0.005  # grows linearly per retry after a deadlock


def audit(now: int, action: str, entity_type: str, entity_id: str, actor: str, detail: str | None = None) -> AuditEntry:
    return AuditEntry(
        id=new_id(), timestamp=now, action=action, entity_type=entity_type, entity_id=entity_id, actor=actor, detail=detail
    )


@dataclass
class Tick:
    """Sent by a ``Ticker``; the actor runs its periodic job. ``reply`` (optional)
    is answered when the job's work, audit entries included, is committed."""

    reply: pykka.ThreadingFuture | None = None


@dataclass
class Flush:
    """Sent by an actor to itself: run everything gathered so far."""


@dataclass
class Write:
    """A write for a ``BatchingActor``; ``reply`` receives its value once its audit
    entries are committed, or the error.

    Either ``op`` runs inside the batch transaction and returns ``(value, audit
    entries)``, or ``spec`` is an operation the batch hands to ``Transaction.apply``
    together with the others of its kind: its result is the value, and
    ``entries(result, now)`` words its audit entries unless the store wrote them."""

    op: Callable[[Transaction], tuple[Any, list[AuditEntry]]] | None
    reply: pykka.ThreadingFuture
    after: Callable[[Any], None] | None = None  # runs on success, after commit
    key: str = ""  # the task it locks first; a batch runs in key order so batches cannot deadlock on tasks
    spec: Op | None = None
    entries: Callable[[Any, int], list[AuditEntry]] | None = None


@dataclass
class Record:
    """Audit entries for the ``AuditWriter``; ``reply`` (optional) gets ``value`` once they are committed."""

    entries: list[AuditEntry]
    reply: pykka.ThreadingFuture | None = None
    value: Any = None


@dataclass
class JobHealth:
    """The health of one periodic job, shared with ``/health`` and metrics."""

    name: str
    interval_s: float
    last_success_ms: int | None = None
    last_error: str | None = None  # while the latest run failed
    last_failure_ms: int | None = None
    runs: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def succeeded(self, now_ms: int) -> None:
        with self._lock:
            self.runs += 1
            self.last_success_ms = now_ms
            self.last_error = None

    def failed(self, error: BaseException, now_ms: int | None = None) -> None:
        with self._lock:
            self.runs += 1
            self.failures += 1
            self.last_error = public_summary(error)  # shown by the open /health; details are logged where it failed
            self.last_failure_ms = now_ms

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "interval_s": self.interval_s,
                "last_success": self.last_success_ms,
                "last_error": self.last_error,
                "last_failure": self.last_failure_ms,
                "runs": self.runs,
                "failures": self.failures,
            }


class Ticker:
    """Tells an actor ``message()`` (``Tick()`` unless told otherwise) every ``interval_s`` on a
    non-daemon thread.

    It only sends messages, never touches the actor's state; ``stop`` returns
    once the thread has ended.
    """

    def __init__(
        self, name: str, interval_s: float, target: Callable[[], pykka.ActorRef[Any] | None],
        message: Callable[[], Any] = Tick,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._target = target
        self._message = message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ticker-{name}", daemon=False)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            ref = self._target()
            if ref is None:
                continue
            try:
                ref.tell(self._message())
            except pykka.ActorDeadError:
                pass  # the engine's watchdog restarts it; the next tick reaches the new one

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


class BatchingActor(pykka.ThreadingActor):
    """Runs ``Write`` messages in groups: one transaction for all that are waiting,
    audit entries included."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit_sink: Callable[[Record], None],
        batch_max: int,
        inline_audit: bool = True,
    ) -> None:
        super().__init__()
        self.store = store
        # With group commit, a batch's audit entries go into its own transaction;
        # without, each goes through the AuditWriter in a transaction of its own.
        self.inline_audit = inline_audit
        self.clock = clock
        self._audit_sink = audit_sink
        self._batch_max = batch_max
        self._pending: list[Write] = []
        self._flush_scheduled = False

    def on_receive(self, message: Any) -> Any:
        if not isinstance(message, (Write, Flush, Tick)):
            planned = self.plan(message)
            if planned is None:
                log.warning("%s: unexpected message %s", type(self).__name__, type(message).__name__)
                return None
            message = planned
        if isinstance(message, Write):
            self._pending.append(message)
            if len(self._pending) >= self._batch_max:
                self._flush()
            elif not self._flush_scheduled:
                # Everything already in the inbox arrives before this Flush.
                self._flush_scheduled = True
                self.actor_ref.tell(Flush())
            return None
        if isinstance(message, Flush):
            self._flush_scheduled = False
            self._flush()
            return None
        if isinstance(message, Tick):
            self._flush()
            try:
                self.on_tick(message.reply)
            except Exception as exc:  # a periodic job must never stop the actor
                log.exception("%s: periodic job failed", type(self).__name__)
                _fail(message.reply, exc)
            return None
        return None

    def plan(self, message: Any) -> Write | None:
        """Turn one of this actor's command messages into a ``Write``; override."""
        return None

    def audit_by_store(self, actor: str, entries: int = 1) -> dict[str, Any]:
        """The ``actor``/``audit_ids`` of an operation whose audit entries the store may
        write itself (with group commit only: otherwise each entry has a transaction of its own)."""
        if not self.inline_audit:
            return {}
        return {"actor": actor, "audit_ids": tuple(new_id() for _ in range(entries))}

    def on_tick(self, reply: pykka.ThreadingFuture | None) -> None:
        """Periodic job; override. Answer ``reply`` (if any) when done."""

    def on_stop(self) -> None:
        self._flush()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        for w in self._pending:
            _fail(w.reply, StoreUnavailable("actor failed"))
        self._pending.clear()

    # --- group commit --------------------------------------------------------

    def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._batch_max], self._pending[self._batch_max :]
            self._run_batch(batch)

    def _attempt(self, batch: list[Write]) -> list[tuple[Write, Any, list[AuditEntry] | None]]:
        """Run the batch in one transaction; domain refusals are outcomes, not failures.

        The store may commit the operations it applies as a set (with their audit
        entries) before the rest of the batch runs: if the rest then fails, that part
        stands and ``_PartlyDone`` says which writes are left."""
        committed: list[tuple[Write, Any, list[AuditEntry] | None]] = []
        outcomes: list[tuple[Write, Any, list[AuditEntry] | None]] = []
        ordered = sorted(batch, key=_lock_order)
        try:
            with self.store.transaction() as tx:
                applied = [(w, w.spec) for w in ordered if w.spec is not None]
                if applied:
                    now = self.clock.now_ms()
                    results = tx.apply([spec for _, spec in applied], now, commit=True)
                    for n, ((w, _), result) in enumerate(zip(applied, results, strict=True)):
                        if isinstance(result, BloomError):
                            outcome: tuple[Write, Any, list[AuditEntry] | None] = (w, result, None)
                        else:
                            entries = [] if n in tx.audited or w.entries is None else w.entries(result, now)
                            outcome = (w, result, entries)
                        (committed if n in tx.committed else outcomes).append(outcome)
                for w in ordered:
                    if w.op is None:
                        continue
                    try:
                        value, entries = w.op(tx)
                    except BloomError as exc:
                        if isinstance(exc, StoreUnavailable):
                            raise
                        outcomes.append((w, exc, None))
                        continue
                    outcomes.append((w, value, entries))
                if self.inline_audit:
                    # The entries commit with the changes they record: neither exists without the other.
                    tx.insert_audit([e for _, _, entries in outcomes if entries for e in entries])
        except Exception as exc:
            if committed:
                done = {id(w) for w, _, _ in committed}
                raise _PartlyDone(committed, [w for w in batch if id(w) not in done]) from exc
            raise
        return committed + outcomes

    def _run_batch(self, batch: list[Write]) -> None:
        try:
            outcomes = self._attempt(batch)
        except _PartlyDone as part:
            self._deliver(part.done)
            for w in part.rest:
                self._run_single(w)
            return
        except StoreUnavailable as exc:
            if len(batch) == 1 and not isinstance(exc, TransientConflict):
                _fail(batch[0].reply, exc)
                return
            # One bad write or a deadlock must not fail its neighbours: go one by one.
            for w in batch:
                self._run_single(w)
            return
        except Exception:
            log.exception("%s: batch failed", type(self).__name__)
            for w in batch:
                _fail(w.reply, StoreUnavailable("internal error while writing"))
            return
        self._deliver(outcomes)

    def _run_single(self, w: Write) -> None:
        for attempt in range(TRANSIENT_RETRIES):
            try:
                outcomes = self._attempt([w])
            except _PartlyDone as part:  # its one write was committed; only the tail failed
                outcomes = part.done
            except TransientConflict:
                time.sleep(TRANSIENT_PAUSE_S * (attempt + 1))
                continue
            except StoreUnavailable as exc:
                _fail(w.reply, exc)
                return
            except Exception:
                log.exception("%s: write failed", type(self).__name__)
                _fail(w.reply, StoreUnavailable("internal error while writing"))
                return
            self._deliver(outcomes)
            return
        _fail(w.reply, StoreUnavailable("database busy, retry"))

    def _deliver(self, outcomes: list[tuple[Write, Any, list[AuditEntry] | None]]) -> None:
        for w, value, entries in outcomes:
            if entries is None:
                _fail(w.reply, value)
                continue
            if w.after is not None:
                try:
                    w.after(value)
                except Exception:
                    log.exception("%s: after-commit hook failed", type(self).__name__)
            if entries and not self.inline_audit:
                self._audit_sink(Record(entries, w.reply, value))
            else:
                w.reply.set(value)


class _PartlyDone(Exception):
    """A batch failed after the store had committed some of its writes."""

    def __init__(self, done: list[tuple[Write, Any, list[AuditEntry] | None]], rest: list[Write]) -> None:
        super().__init__(f"{len(done)} writes committed, {len(rest)} left")
        self.done = done
        self.rest = rest


def _lock_order(w: Write) -> str:
    return w.key


def _fail(reply: pykka.ThreadingFuture | None, exc: BaseException) -> None:
    if reply is None:
        return
    try:
        raise exc
    except BaseException:
        import sys

        reply.set_exception(sys.exc_info())
