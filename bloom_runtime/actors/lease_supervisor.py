"""LeaseSupervisor: owns leases; grants (acquire, claim), renews and fails them, and sweeps the expired."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from bloom_runtime.actors.base import BatchingActor, JobHealth, Record, Write, _fail
from bloom_runtime.actors.messages import AcquireLease, ClaimNext, FailLease, Heartbeat
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.models import AuditEntry, Task, new_id
from bloom_runtime.sql import audit_trail
from bloom_runtime.sql.store import AcquireOp, ClaimOp, ExpireOp, FailOp, HeartbeatOp, RetryDelay, Store

log = logging.getLogger(__name__)

ACTOR = "lease-supervisor"
SWEEP_BATCH = 500  # leases expired per transaction; a big backlog takes several


class LeaseSupervisor(BatchingActor):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit_sink: Callable[[Record], None],
        *,
        health: JobHealth,
        retry_delay: RetryDelay,
        on_queued: Callable[[Sequence[Task]], None],
        batch_max: int = 256,
        inline_audit: bool = True,
        fault: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(store, clock, audit_sink, batch_max, inline_audit)
        self.health = health
        self.retry_delay = retry_delay
        self.on_queued = on_queued  # told which tasks became claimable
        self.expired_total = 0
        self.dead_total = 0
        self._fault = fault  # tests inject failures into the sweep through this

    def plan(self, m: Any) -> Write | None:
        if isinstance(m, AcquireLease):
            acquire = AcquireOp(m.task_id, tuple(m.worker_ids), m.ttl_seconds, new_id())
            return self.change(m.reply, m.actor, acquire, key=m.task_id)

        if isinstance(m, Heartbeat):
            return self.change(m.reply, m.actor, HeartbeatOp(m.task_id, m.fence), key=m.task_id)

        if isinstance(m, FailLease):
            fail = FailOp(m.lease_id, m.reason, self.retry_delay, refund=m.refund)
            return self.change(m.reply, m.actor, fail, after=lambda v: v[0].status == "queued" and self.on_queued([v[0]]))

        if isinstance(m, ClaimNext):
            lease_ids = tuple(new_id() for _ in range(m.max_tasks))
            return self.change(m.reply, m.actor, ClaimOp(m.worker_id, m.max_tasks, m.ttl_seconds, lease_ids))
        return None

    def on_tick(self, reply: Any = None) -> None:
        try:
            if self._fault is not None:
                self._fault()
            total, pending = self.sweep()
        except Exception as exc:
            self.health.failed(exc)
            log.warning("lease sweep failed: %s", exc)
            _fail(reply, exc)
            return
        self.health.succeeded(self.clock.now_ms())
        if pending:
            self._audit_sink(Record(pending, reply, total))
        elif reply is not None:
            reply.set(total)

    def sweep(self) -> tuple[int, list[AuditEntry]]:
        """Expire every lease past its deadline, in transactions of ``SWEEP_BATCH``.

        Returns how many expired and the audit entries still to be written
        (none when they were committed with the expiries)."""
        total = 0
        pending: list[AuditEntry] = []
        op = ExpireOp(SWEEP_BATCH, actor=ACTOR if self.inline_audit else None)
        while True:
            now = self.clock.now_ms()
            with self.store.transaction() as tx:
                expired = tx.apply([op], now, commit=True)[0]
            if not self.inline_audit:
                pending += audit_trail.entries(op, expired, now, ACTOR)
            self.expired_total += len(expired)
            self.dead_total += sum(1 for e in expired if e.task.status == "dead")
            total += len(expired)
            queued = [e.task for e in expired if e.task.status == "queued"]
            if queued:
                self.on_queued(queued)
            if len(expired) < SWEEP_BATCH:
                return total, pending
