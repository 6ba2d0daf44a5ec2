"""LeaseSupervisor: owns leases; grants (acquire, claim), renews and fails them, and sweeps the expired."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bloom_runtime.actors.base import (
    BatchingActor,
    JobHealth,
    Record,
    Write,
    _fail,
    audit,
)
from bloom_runtime.actors.messages import AcquireLease, ClaimNext, FailLease, Heartbeat
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.models import (
    AuditEntry,
    Expiry,
    Lease,
    LeaseGrant,
    Task,
    new_id,
)
from bloom_runtime.sql.store import AcquireOp, HeartbeatOp, RetryDelay, Store, Transaction

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
        on_queued: Callable[[], None],
        batch_max: int = 256,
        inline_audit: bool = True,
        fault: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(store, clock, audit_sink, batch_max, inline_audit)
        self.health = health
        self.retry_delay = retry_delay
        self.on_queued = on_queued
        self.expired_total = 0
        self.dead_total = 0
        self._fault = fault  # tests inject failures into the sweep through this

    def plan(self, m: Any) -> Write | None:
        now = self.clock.now_ms
        if isinstance(m, AcquireLease):

            def leased(grant: LeaseGrant, t: int) -> list:
                return [
                    audit(
                        t, "task_leased", "task", grant.task.id, m.actor,
                        f"lease={grant.lease.id} worker={grant.worker.id} ttl={grant.lease.ttl_seconds}s attempt={grant.task.attempts}",
                    )
                ]

            spec = AcquireOp(m.task_id, tuple(m.worker_ids), m.ttl_seconds, new_id(), **self.audit_by_store(m.actor))
            return Write(None, m.reply, key=m.task_id, spec=spec, entries=leased)

        if isinstance(m, Heartbeat):

            def renewed(result: tuple[Task, Lease], t: int) -> list:
                task, lease = result
                return [audit(t, "lease_renewed", "lease", lease.id, m.actor, f"task={task.id} expires_at={lease.expires_at}")]

            beat = HeartbeatOp(m.task_id, m.fence, **self.audit_by_store(m.actor))
            return Write(None, m.reply, key=m.task_id, spec=beat, entries=renewed)

        if isinstance(m, FailLease):

            def fail(tx: Transaction) -> tuple[tuple[Task, Lease], list]:
                t = now()
                task, lease = tx.fail_lease(m.lease_id, m.reason, self.retry_delay, t, refund=m.refund)
                attempts = f"attempts={task.attempts}/{task.max_attempts}" + (" (attempt given back)" if m.refund else "")
                return (task, lease), [
                    audit(t, "lease_failed", "lease", lease.id, m.actor, f"task={task.id}: {m.reason}"[:1000]),
                    audit(t, "task_retry" if task.status == "queued" else "task_failed", "task", task.id, m.actor, attempts),
                ]

            return Write(fail, m.reply, after=lambda v: v[0].status == "queued" and self.on_queued())

        if isinstance(m, ClaimNext):

            def claim(tx: Transaction) -> tuple[LeaseGrant | None, list]:
                t = now()
                grant = tx.claim_next(m.worker_id, m.ttl_seconds, new_id(), t)
                if grant is None:
                    return None, []
                return grant, [
                    audit(
                        t, "task_leased", "task", grant.task.id, m.actor,
                        f"lease={grant.lease.id} worker={grant.worker.id} attempt={grant.task.attempts} claimed",
                    )
                ]

            return Write(claim, m.reply)
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
        while True:
            now = self.clock.now_ms()
            with self.store.transaction() as tx:
                expired = tx.expire_due(now, SWEEP_BATCH)
                entries = [entry for e in expired for entry in self._expiry_entries(now, e)]
                if self.inline_audit:
                    tx.insert_audit(entries)
                else:
                    pending += entries
            self.expired_total += len(expired)
            self.dead_total += sum(1 for e in expired if e.task.status == "dead")
            total += len(expired)
            if any(e.task.status == "queued" for e in expired):
                self.on_queued()
            if len(expired) < SWEEP_BATCH:
                return total, pending

    @staticmethod
    def _expiry_entries(now: int, e: Expiry) -> list[AuditEntry]:
        attempts = f"lease expired, attempts={e.task.attempts}/{e.task.max_attempts}"
        action = "task_requeued" if e.task.status == "queued" else "task_dead"
        return [
            audit(now, "lease_expired", "lease", e.lease.id, ACTOR, f"task={e.task.id} worker={e.lease.worker_id}"),
            audit(now, action, "task", e.task.id, ACTOR, attempts),
        ]
