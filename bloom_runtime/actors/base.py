"""What the actors share: replies, group commit, periodic ticks and job health.

Callers at the edge (the engine facade) send a message carrying a ``Reply``
and block on it until its deadline; actors never block on each other. A
``BatchingActor`` gathers the write messages waiting in its inbox and runs them
in one transaction, audit entries included, then answers the callers.

A write runs only if the actor starts it before its caller gives up: the two
race for the ``Reply``, and whichever comes first decides. A caller whose time
ran out on a write that never started says so for certain (nothing changed);
one that ran out on a write under way cannot know its outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.errors import BloomError, EngineTimeout, OutcomeUnknown, StoreTimeout, StoreUnavailable, public_summary
from bloom_runtime.engine.models import AuditEntry
from bloom_runtime.sql import audit_trail
from bloom_runtime.sql.store import Op, SessionLost, Store, Transaction, TransientConflict

log = logging.getLogger(__name__)

TRANSIENT_RETRIES = 3
TRANSIENT_PAUSE_S = 0.005  # grows linearly per retry after a deadlock


_REPLY_LOCK = threading.Lock()  # held for a state check only; shared by every Reply


class Reply(pykka.ThreadingFuture):
    """The answer to one command, and the one decision of whether it runs: the actor
    ``start``s it, or its caller, out of time, ``abandon``s it; the first one wins.
    ``deadline`` (``time.monotonic()``; None: none) is when the caller stops waiting;
    past it the actor abandons the command itself rather than start it."""

    def __init__(self, deadline: float | None = None) -> None:
        super().__init__()
        self.deadline = deadline
        self._state: str | None = None  # "started" or "abandoned", once decided

    def start(self) -> bool:
        """Claim the command for running; False if it was abandoned (never run it then)."""
        with _REPLY_LOCK:
            if self._state is None:
                late = self.deadline is not None and time.monotonic() >= self.deadline
                self._state = "abandoned" if late else "started"
            return self._state == "started"

    def abandon(self) -> bool:
        """Give the command up; False if it had already started (its outcome is then unknown)."""
        with _REPLY_LOCK:
            if self._state is None:
                self._state = "abandoned"
            return self._state == "abandoned"

    @property
    def overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def started(reply: pykka.ThreadingFuture | None) -> bool:
    """Whether a command may run: its ``Reply`` was not abandoned (plain futures always may)."""
    return not isinstance(reply, Reply) or reply.start()


def not_applied(name: str) -> EngineTimeout:
    return EngineTimeout(f"{name} did not start the write before its deadline; nothing was changed")


audit = audit_trail.entry  # one audit entry, for writes outside the state changes


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
    """A write for a ``BatchingActor``; ``reply`` receives its value once it is committed
    with its audit entries, or the error.

    A state change is ``ops``: the batch hands them to ``Transaction.apply`` with the
    other writes', and the answer is the value (``many``: the list of answers, refusals
    as values; else the one answer, a refusal raised). The store writes the audit
    entries of operations naming an actor; without group commit they name none, and
    the actor words the entries for ``actor`` and sends them to the ``AuditWriter``.
    Any other write is ``run``, which returns ``(value, audit entries)``."""

    run: Callable[[Transaction], tuple[Any, list[AuditEntry]]] | None
    reply: pykka.ThreadingFuture
    after: Callable[[Any], None] | None = None  # runs on success, after commit
    key: str = ""  # the task it locks first; a batch runs in key order
    ops: tuple[Op, ...] = ()
    many: bool = False
    actor: str = ""


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
            if not started(message.reply):
                return None  # its caller gave up; the next periodic tick does the work
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

    def change(self, reply: pykka.ThreadingFuture, actor: str, *ops: Op, many: bool = False, **kw: Any) -> Write:
        """A ``Write`` of state changes by ``actor``. With group commit the store writes
        their audit entries; without, each entry gets a transaction of its own."""
        if self.inline_audit:
            ops = tuple(dataclasses.replace(op, actor=actor) for op in ops)
        return Write(None, reply, ops=ops, many=many, actor=actor, **kw)

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
        """Run the batch in one transaction; return each write's value and the audit
        entries left to record (None: it was refused, the value is the refusal)."""
        outcomes: list[tuple[Write, Any, list[AuditEntry] | None]] = []
        ordered = sorted(batch, key=_lock_order)
        changes = [w for w in ordered if w.ops]
        others = [w for w in ordered if not w.ops]
        with self.store.transaction() as tx:
            if changes:
                now = self.clock.now_ms()
                # Nothing else in the transaction: the store commits with the changes.
                answers = iter(tx.apply([op for w in changes for op in w.ops], now, commit=not others))
                for w in changes:
                    mine = [next(answers) for _ in w.ops]
                    outcomes.append(self._outcome(w, mine, now))
            for w in others:
                assert w.run is not None
                try:
                    value, entries = w.run(tx)
                except BloomError as exc:
                    if isinstance(exc, (StoreUnavailable, OutcomeUnknown)):
                        raise
                    outcomes.append((w, exc, None))
                    continue
                outcomes.append((w, value, entries))
            if self.inline_audit and others:
                # The entries commit with the changes they record: neither exists without the other.
                tx.insert_audit([e for w, _, entries in outcomes if entries and not w.ops for e in entries])
        return outcomes

    def _outcome(self, w: Write, answers: list[Any], now: int) -> tuple[Write, Any, list[AuditEntry] | None]:
        """A write's outcome from its operations' answers, and the entries still to write."""
        entries: list[AuditEntry] = []
        if not self.inline_audit:
            for op, answer in zip(w.ops, answers, strict=True):
                if not isinstance(answer, BloomError):
                    entries += audit_trail.entries(op, answer, now, w.actor)
        if w.many:
            return w, answers, entries
        if isinstance(answers[0], BloomError):
            return w, answers[0], None
        return w, answers[0], entries

    def _run_batch(self, batch: list[Write]) -> None:
        batch = [w for w in batch if started(w.reply)]
        for attempt in (1, 2):
            if attempt == 2:
                batch = self._still_awaited(batch)
            if not batch:
                return
            try:
                outcomes = self._attempt(batch)
            except SessionLost as exc:
                if attempt == 1:
                    continue  # nothing of it can have committed: once more, on another connection
                for w in batch:
                    _fail(w.reply, exc)
                return
            except OutcomeUnknown as exc:
                for w in batch:
                    _fail(w.reply, exc)
                return
            except StoreUnavailable as exc:
                if (len(batch) == 1 or isinstance(exc, StoreTimeout)) and not isinstance(exc, TransientConflict):
                    # Nothing of it was applied. A database that did not answer the batch
                    # would not answer each write either: one by one, the wait would multiply.
                    for w in batch:
                        _fail(w.reply, exc)
                    return
                # One bad write or a deadlock must not fail its neighbours: go one by one,
                # those whose callers still wait.
                for w in self._still_awaited(batch):
                    self._run_single(w)
                return
            except Exception:
                log.exception("%s: batch failed", type(self).__name__)
                for w in batch:
                    _fail(w.reply, StoreUnavailable("internal error while writing"))
                return
            self._deliver(outcomes)
            return

    def _run_single(self, w: Write) -> None:
        conflicts = 0
        session_retried = False
        while True:
            try:
                outcomes = self._attempt([w])
            except TransientConflict:
                conflicts += 1
                if conflicts >= TRANSIENT_RETRIES:
                    _fail(w.reply, StoreUnavailable("database busy, retry"))
                    return
                time.sleep(TRANSIENT_PAUSE_S * conflicts)
                continue
            except SessionLost as exc:
                if session_retried:
                    _fail(w.reply, exc)
                    return
                if not self._still_awaited([w]):
                    return
                session_retried = True
                continue
            except (StoreUnavailable, OutcomeUnknown) as exc:
                _fail(w.reply, exc)
                return
            except Exception:
                log.exception("%s: write failed", type(self).__name__)
                _fail(w.reply, StoreUnavailable("internal error while writing"))
                return
            self._deliver(outcomes)
            return

    def _still_awaited(self, batch: list[Write]) -> list[Write]:
        """The writes whose callers still wait; the others, which provably did not
        commit, are answered "not applied" and not run again."""
        awaited = []
        for w in batch:
            if isinstance(w.reply, Reply) and w.reply.overdue:
                _fail(w.reply, not_applied(type(self).__name__))
            else:
                awaited.append(w)
        return awaited

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
