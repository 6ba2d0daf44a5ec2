"""WorkerRegistry: owns workers; registers them, routes tasks to them, offlines the silent."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from bloom_runtime.actors.base import BatchingActor, JobHealth, Record, Write, _fail, audit
from bloom_runtime.actors.messages import PickWorkers, RegisterWorker, RemoveWorker, UpsertWorkers
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.models import Worker
from bloom_runtime.sql.store import Store, Transaction

log = logging.getLogger(__name__)


def rank(candidates: Sequence[Worker], sticky: set[str]) -> list[Worker]:
    """Best first: sticky to the context, then most free capacity, then freshest heartbeat."""
    return sorted(
        candidates,
        key=lambda w: (w.id not in sticky, -w.free_capacity, -(w.last_heartbeat or 0), w.id),
    )


class WorkerRegistry(BatchingActor):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit_sink: Callable[[Record], None],
        *,
        health: JobHealth,
        offline_after_ms: int,
        batch_max: int = 256,
    ) -> None:
        super().__init__(store, clock, audit_sink, batch_max)
        self.health = health
        self.offline_after_ms = offline_after_ms

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, PickWorkers):
            try:
                message.reply.set(self.pick(message.context_id, message.labels))
            except Exception as exc:
                _fail(message.reply, exc)
            return None
        return super().on_receive(message)

    def pick(self, context_id: str, labels: Sequence[str]) -> list[str]:
        """Ids of the workers that can take a task, best first (the lease transaction re-checks)."""
        candidates = self.store.worker_candidates(labels)
        if not candidates:
            return []
        sticky = self.store.sticky_workers(context_id) if len(candidates) > 1 else set()
        return [w.id for w in rank(candidates, sticky)]

    def plan(self, m: Any) -> Write | None:
        now = self.clock.now_ms
        if isinstance(m, RegisterWorker):

            def register(tx: Transaction) -> tuple[tuple[Worker, bool], list]:
                t = now()
                worker, created = tx.upsert_worker(m.upsert, t)
                action = "worker_registered" if created else "worker_updated"
                return (worker, created), [audit(t, action, "worker", worker.id, m.actor, f"status={worker.status}")]

            return Write(register, m.reply)

        if isinstance(m, UpsertWorkers):

            def upsert_many(tx: Transaction) -> tuple[list[tuple[Worker, bool]], list]:
                t = now()
                out, entries = [], []
                for u in m.upserts:
                    worker, created = tx.upsert_worker(u, t)
                    out.append((worker, created))
                    if created:
                        entries.append(audit(t, "worker_registered", "worker", worker.id, m.actor, f"status={worker.status}"))
                return out, entries

            return Write(upsert_many, m.reply or _discard())

        if isinstance(m, RemoveWorker):

            def remove(tx: Transaction) -> tuple[Worker, list]:
                t = now()
                worker = tx.remove_worker(m.worker_id)
                return worker, [audit(t, "worker_removed", "worker", worker.id, m.actor)]

            return Write(remove, m.reply)
        return None

    def on_tick(self, reply: Any = None) -> None:
        try:
            now = self.clock.now_ms()
            with self.store.transaction() as tx:
                changed = tx.mark_stale_workers_offline(now - self.offline_after_ms, now)
        except Exception as exc:
            self.health.failed(exc)
            log.warning("worker liveness check failed: %s", exc)
            _fail(reply, exc)
            return
        self.health.succeeded(now)
        if not changed:
            if reply is not None:
                reply.set(0)
            return
        log.info("workers offline (not seen for %d s): %s", self.offline_after_ms // 1000, ", ".join(w.id for w in changed))
        entries = [audit(now, "worker_offline", "worker", w.id, "worker-registry", "not seen") for w in changed]
        self._audit_sink(Record(entries, reply, len(changed)))


def _discard() -> Any:
    import pykka

    return pykka.ThreadingFuture()
