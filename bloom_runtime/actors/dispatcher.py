"""Dispatcher: owns push delivery to worker agents and the delivery records.

A ``Deliver`` message (a granted lease) is recorded as a ``sent`` delivery and
its ``POST /execute-task`` handed to a bounded pool of delivery threads, never
run on a request thread or on this actor's thread: the real agent answers only
once the whole run is over. The thread tells the outcome back as
``DeliveryDone``; this actor records it once, with its audit entry, and wakes
whoever waits for it. What the outcome means for the lease (fail it, give the
attempt back, leave it to its TTL) is decided by the delivery function, which
runs on the delivery thread and may ask other actors: no actor ever waits on
this one.

With automatic dispatch, ``PlanNow`` (told when tasks queue, when a delivery
ends, and on a timer for retries whose backoff ends) runs the planner on a
thread of its own: it leases due tasks to free push workers and tells
``Deliver`` back here. Requests that arrive while it runs are folded into one
more run, so plans never pile up.

On each ``Tick`` the dispatcher probes every worker with a verified URL
(``GET {url}/health`` through its breaker, on a small pool of its own) and
marks ``unknown`` the deliveries left ``sent`` past their deadline by a
process that stopped. Probe and delivery results go to the registry as
sightings: an answer is a sign of life (the worker comes online, its heartbeat
is refreshed when it grows old), and ``FAILURES_OFFLINE`` failures in a row
with no answer between take it offline. One failure never does, so a worker
does not flap; the registry audits only real changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pykka

from bloom_runtime.actors.base import BatchingActor, Record, Write, _fail, audit
from bloom_runtime.actors.messages import Sighting
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.models import AuditEntry, Delivery, LeaseGrant, Worker, clean_text
from bloom_runtime.sql.store import Store, Transaction

log = logging.getLogger(__name__)

ACTOR = "dispatcher"
EXPIRE_BATCH = 500
FAILURES_OFFLINE = 2  # probes or deliveries in a row that found no agent before it counts as offline
PROBE_THREADS = 8
NO_ANSWER = "no outcome recorded by the deadline (the process that sent it stopped)"


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery, as the delivery thread found it."""

    state: str
    agent_status: int | None = None
    detail: str | None = None

    def __post_init__(self) -> None:
        # The detail is a peer's words: stored as other free text is, so NUL cannot make PostgreSQL refuse the record.
        if self.detail is not None:
            object.__setattr__(self, "detail", clean_text(self.detail))


@dataclass
class Deliver:
    """Record a delivery for ``grant`` and send ``payload`` to ``url``; ``reply`` gets the ``Delivery``."""

    grant: LeaseGrant
    url: str
    payload: dict[str, Any]
    timeout_s: float
    actor: str
    reply: pykka.ThreadingFuture
    delivery_id: str


@dataclass
class DeliveryDone:
    """Told by a delivery thread."""

    delivery: Delivery
    outcome: Outcome


@dataclass
class ProbeDone:
    """Told by a probe thread: what ``GET {url}/health`` of ``worker`` found."""

    worker: Worker
    alive: bool
    cause: str


@dataclass
class PlanNow:
    """Look for queued tasks to push to free workers (automatic dispatch)."""


@dataclass
class PlanDone:
    """Told by the planner thread."""

    sent: int


# The delivery function: POST the payload, settle the lease, return the outcome.
Send = Callable[[Delivery, dict[str, Any], float], Outcome]
# The planner: lease due tasks to free push workers and have them delivered; returns how many.
Plan = Callable[[], int]
# Liveness: the workers to probe, the probe itself, and where sightings go.
Targets = Callable[[], list[Worker]]
Probe = Callable[[Worker], tuple[bool, str]]


class Dispatcher(BatchingActor):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit_sink: Callable[[Record], None],
        *,
        send: Send,
        on_finished: Callable[[Delivery], None],
        pool_size: int,
        plan: Plan | None = None,
        targets: Targets | None = None,
        probe: Probe | None = None,
        sightings: Callable[[list[Sighting]], None] | None = None,
        refresh_ms: int = 30_000,
        batch_max: int = 256,
        inline_audit: bool = True,
    ) -> None:
        super().__init__(store, clock, audit_sink, batch_max, inline_audit)
        self._send = send
        self._on_finished = on_finished
        self._pool_size = pool_size
        self._plan = plan  # None: automatic dispatch is off
        self._pool: ThreadPoolExecutor | None = None
        self._planner: ThreadPoolExecutor | None = None
        self._planning = False
        self._plan_again = False
        self._targets = targets  # None: no probes
        self._probe = probe
        self._sightings = sightings or (lambda seen: None)
        self._refresh_ms = refresh_ms  # refresh a live worker's heartbeat once it is this old
        self._prober: ThreadPoolExecutor | None = None
        self._probing = 0
        self._failures: dict[str, int] = {}  # worker id → probes/deliveries in a row that found nobody

    # --- lifecycle ---------------------------------------------------------------

    def on_start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self._pool_size, thread_name_prefix="delivery")
        if self._targets is not None:
            self._prober = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="agent-probe")
        if self._plan is not None:
            self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auto-dispatch")
            self.actor_ref.tell(PlanNow())  # tasks may have queued while no process was dispatching

    def on_stop(self) -> None:
        super().on_stop()
        self._shutdown()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        super().on_failure(exception_type, exception_value, traceback)
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            # Calls in flight end when the engine aborts them; their DeliveryDone finds
            # the actor gone and the rows stay 'sent' until a tick marks them unknown.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._planner is not None:
            self._planner.shutdown(wait=False, cancel_futures=True)
            self._planner = None
        if self._prober is not None:
            self._prober.shutdown(wait=False, cancel_futures=True)
            self._prober = None

    # --- messages --------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, PlanNow):
            self._request_plan()
            return None
        if isinstance(message, PlanDone):
            self._planning = False
            if self._plan_again:
                self._request_plan()
            return None
        if isinstance(message, ProbeDone):
            self._probing -= 1
            self._observe(message.worker.id, message.alive, message.cause, message.worker)
            return None
        return super().on_receive(message)

    def plan(self, m: Any) -> Write | None:
        now = self.clock.now_ms
        if isinstance(m, Deliver):
            grant = m.grant

            def record(tx: Transaction) -> tuple[Delivery, list[AuditEntry]]:
                t = now()
                delivery = Delivery(
                    id=m.delivery_id, task_id=grant.task.id, lease_id=grant.lease.id, worker_id=grant.worker.id, url=m.url,
                    state="sent", agent_status=None, detail=None, actor=m.actor, created_at=t,
                    deadline_at=t + int(m.timeout_s * 1000), finished_at=None,
                )
                tx.insert_delivery(delivery)
                return delivery, [audit(t, "task_dispatched", "task", grant.task.id, m.actor,
                                        f"lease={grant.lease.id} worker={grant.worker.id} delivery={delivery.id}")]

            return Write(record, m.reply, after=lambda d: self._submit(d, m.payload, m.timeout_s))

        if isinstance(m, DeliveryDone):
            d, outcome = m.delivery, m.outcome
            self._observe(d.worker_id, outcome.state != "unreachable", f"delivery {outcome.state}", None)

            def finish(tx: Transaction) -> tuple[Delivery | None, list[AuditEntry]]:
                t = now()
                done = tx.finish_delivery(d.id, outcome.state, outcome.agent_status, outcome.detail, t)
                if done is None:
                    return None, []  # another process marked it unknown meanwhile
                detail = f"lease={d.lease_id} worker={d.worker_id}"
                if outcome.agent_status is not None:
                    detail += f" status={outcome.agent_status}"
                if outcome.detail:
                    detail += f": {outcome.detail}"
                return done, [audit(t, f"dispatch_{outcome.state}", "task", d.task_id, ACTOR, detail[:1000])]

            return Write(finish, pykka.ThreadingFuture(), after=self._finished)
        return None

    def on_tick(self, reply: pykka.ThreadingFuture | None = None) -> None:
        self._probe_round()
        try:
            now = self.clock.now_ms()
            with self.store.transaction() as tx:
                expired = tx.expire_deliveries(now, NO_ANSWER, EXPIRE_BATCH)
                entries = [audit(now, "dispatch_unknown", "task", d.task_id, ACTOR, f"lease={d.lease_id} worker={d.worker_id}: {NO_ANSWER}")
                           for d in expired]
                if self.inline_audit:
                    tx.insert_audit(entries)
        except Exception as exc:
            log.warning("expiring deliveries failed: %s", exc)
            _fail(reply, exc)
            return
        for d in expired:
            self._finished(d)
        if entries and not self.inline_audit:
            self._audit_sink(Record(entries, reply, len(expired)))
        elif reply is not None:
            reply.set(len(expired))

    # --- deliveries --------------------------------------------------------------

    def _submit(self, delivery: Delivery, payload: dict[str, Any], timeout_s: float) -> None:
        if self._pool is None:
            return
        self._pool.submit(self._run_delivery, delivery, payload, timeout_s)

    def _run_delivery(self, delivery: Delivery, payload: dict[str, Any], timeout_s: float) -> None:
        """Runs on a delivery thread."""
        try:
            outcome = self._send(delivery, payload, timeout_s)
        except Exception:
            log.exception("delivery %s of task %s failed unexpectedly", delivery.id, delivery.task_id)
            outcome = Outcome("unknown", detail="internal error while delivering")
        try:
            self.actor_ref.tell(DeliveryDone(delivery, outcome))
        except pykka.ActorDeadError:
            log.info("delivery %s ended after the dispatcher stopped; its outcome is not recorded", delivery.id)

    def _finished(self, delivery: Delivery | None) -> None:
        if delivery is not None:
            self._on_finished(delivery)
            self._request_plan()  # its worker has room again

    # --- liveness ----------------------------------------------------------------

    def _probe_round(self) -> None:
        if self._prober is None or self._targets is None or self._probing:
            return  # off, or the last round is still going: rounds never pile up
        try:
            targets = self._targets()
        except Exception as exc:
            log.warning("agent probes skipped: %s", exc)
            return
        for worker in targets:
            self._probing += 1
            self._prober.submit(self._run_probe, worker)

    def _run_probe(self, worker: Worker) -> None:
        """Runs on a probe thread."""
        assert self._probe is not None
        try:
            alive, cause = self._probe(worker)
        except Exception:
            log.exception("probe of worker %s failed unexpectedly", worker.id)
            alive, cause = False, "internal error while probing"
        try:
            self.actor_ref.tell(ProbeDone(worker, alive, cause))
        except pykka.ActorDeadError:
            pass

    def _observe(self, worker_id: str, alive: bool, cause: str, known: Worker | None) -> None:
        """Count a probe's or a delivery's finding; tell the registry what deserves a write.

        ``known`` is the worker as the probe round read it (None for a delivery)."""
        now = self.clock.now_ms()
        if alive:
            self._failures.pop(worker_id, None)
            if known is None:
                return  # a delivery's callbacks already refreshed its heartbeat
            stale = now - known.last_heartbeat >= self._refresh_ms
            if known.status != "online" or stale:
                self._sightings([Sighting(worker_id, True, now, cause)])
                if known.status != "online":
                    self._request_plan()  # room to push to
            return
        failures = self._failures[worker_id] = self._failures.get(worker_id, 0) + 1
        if failures >= FAILURES_OFFLINE and (known is None or known.status != "offline"):
            self._sightings([Sighting(worker_id, False, now, f"{cause} ({failures} in a row)")])

    # --- automatic dispatch ------------------------------------------------------

    def _request_plan(self) -> None:
        if self._planner is None:
            return
        if self._planning:
            self._plan_again = True
            return
        self._planning, self._plan_again = True, False
        self._planner.submit(self._run_plan)

    def _run_plan(self) -> None:
        """Runs on the planner thread."""
        assert self._plan is not None
        sent = 0
        try:
            sent = self._plan()
        except Exception:
            log.exception("automatic dispatch failed")
        try:
            self.actor_ref.tell(PlanDone(sent))
        except pykka.ActorDeadError:
            pass
