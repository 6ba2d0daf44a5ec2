"""WorkerRegistry: owns workers; registers them, routes tasks to them, offlines the silent."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pykka

from bloom_runtime.actors.base import (
    BatchingActor,
    JobHealth,
    Record,
    Write,
    _fail,
    audit,
)
from bloom_runtime.actors.messages import (
    PickWorkers,
    RecordLiveness,
    RefreshWorker,
    RegisterWorker,
    RemoveWorker,
    UpsertWorkers,
)
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.models import Worker
from bloom_runtime.engine.urls import AllowList
from bloom_runtime.engine.worker_trust import VOUCHED_BY_SYNC, with_verification
from bloom_runtime.sql.store import Store, Transaction

log = logging.getLogger(__name__)


ROUTING_REFRESH_S = 1.0  # how stale the routing snapshot may get before a pick reloads it
PICK_CANDIDATES = 3  # candidates handed to the lease transaction, which re-checks each
REFRESH_AUDITED = ("status", "agent_version", "os_info")  # a refresh changing one of these is audited


def rank(candidates: Sequence[Worker], sticky: set[str], active: dict[str, int] | None = None) -> list[Worker]:
    """Best first: sticky to the context, then most free capacity, then freshest heartbeat."""
    counts = active or {}

    def free(w: Worker) -> int:
        return w.capabilities.max_concurrency - counts.get(w.id, w.active_leases)

    return sorted(candidates, key=lambda w: (w.id not in sticky, -free(w), -(w.last_heartbeat or 0), w.id))


def can_take(w: Worker, labels: Sequence[str], active: int) -> bool:
    caps = w.capabilities
    return (
        w.status == "online"
        and caps.claude_cli
        and active < caps.max_concurrency
        and all(label in caps.labels for label in labels)
    )


class WorkerRegistry(BatchingActor):
    """Routes from a snapshot of the fleet (workers, their active leases, the contexts they
    hold) reloaded every ``ROUTING_REFRESH_S`` and after any registry change; between
    reloads each pick counts itself against the worker it chose. The lease transaction
    re-checks capacity, so a stale snapshot costs a retry, never a wrong grant."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit_sink: Callable[[Record], None],
        *,
        health: JobHealth,
        offline_after_ms: int,
        batch_max: int = 256,
        inline_audit: bool = True,
        allowed: AllowList | None = None,
        probed: bool = False,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(store, clock, audit_sink, batch_max, inline_audit)
        self.on_change = on_change  # told after a committed change of a worker
        self.health = health
        self.offline_after_ms = offline_after_ms
        self.probed = probed  # the runtime probes workers with a verified URL: their silence counts too
        self.allowed = allowed  # MEMBRIDGE_ALLOWED_HOSTS: its hosts count as verified push targets
        self._workers: list[Worker] = []
        self._active: dict[str, int] = {}
        self._contexts: dict[str, set[str]] = {}
        self._loaded_at = float("-inf")

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, PickWorkers):
            try:
                message.reply.set(self.pick(message.context_id, message.labels, fresh=message.fresh,
                                            push=message.push, exclude=message.exclude))
            except Exception as exc:
                _fail(message.reply, exc)
            return None
        return super().on_receive(message)

    def _reload(self) -> None:
        vouched = self.store.worker_trust()
        self._workers = [with_verification(w, vouched, self.allowed) for w in self.store.list_workers()]
        self._active = {w.id: w.active_leases for w in self._workers}
        self._contexts = {}
        for context_id, worker_id in self.store.active_lease_owners():
            self._contexts.setdefault(context_id, set()).add(worker_id)
        self._loaded_at = time.monotonic()

    def pick(
        self, context_id: str, labels: Sequence[str], fresh: bool = False, push: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> list[str]:
        """Ids of up to ``PICK_CANDIDATES`` workers that can take the task, best first
        (with ``push``, only workers with a verified URL; never those in ``exclude``)."""
        reloaded = fresh or time.monotonic() - self._loaded_at > ROUTING_REFRESH_S
        if reloaded:
            self._reload()
        ranked = self._rank(context_id, labels, push, exclude)
        if not ranked and not reloaded:
            self._reload()  # "no capacity" is worth one fresh look before it is said
            ranked = self._rank(context_id, labels, push, exclude)
        if ranked:
            chosen = ranked[0].id
            self._active[chosen] = self._active.get(chosen, 0) + 1
            self._contexts.setdefault(context_id, set()).add(chosen)
        return [w.id for w in ranked[:PICK_CANDIDATES]]

    def _rank(self, context_id: str, labels: Sequence[str], push: bool, exclude: frozenset[str]) -> list[Worker]:
        candidates = [
            w for w in self._workers
            if can_take(w, labels, self._active.get(w.id, 0)) and (w.url_verified or not push) and w.id not in exclude
        ]
        return rank(candidates, self._contexts.get(context_id, set()), self._active)

    def _changed(self, value: Any) -> None:
        self._loaded_at = float("-inf")
        self.on_change()

    def _changed_if(self, changes: int) -> None:
        if changes:
            self._changed(changes)

    def plan(self, m: Any) -> Write | None:
        now = self.clock.now_ms
        if isinstance(m, RegisterWorker):

            def register(tx: Transaction) -> tuple[tuple[Worker, bool], list]:
                t = now()
                worker, created = tx.upsert_worker(m.upsert, t)
                detail = f"status={worker.status}"
                if m.upsert.url is not None:
                    if m.vouch and worker.url:
                        tx.vouch_worker_url(worker.id, worker.url, m.actor, t)
                    detail += f" url={worker.url} ({'vouched for' if m.vouch else 'unverified unless vouched for before'})"
                action = "worker_registered" if created else "worker_updated"
                return (worker, created), [audit(t, action, "worker", worker.id, m.actor, detail)]

            return Write(register, m.reply, after=self._changed)

        if isinstance(m, UpsertWorkers):

            def upsert_many(tx: Transaction) -> tuple[list[tuple[Worker, bool]], list]:
                t = now()
                out, entries = [], list(m.entries)
                for u in m.upserts:
                    worker, created = tx.upsert_worker(u, t)
                    if u.id in m.vouch:
                        tx.vouch_worker_url(worker.id, m.vouch[u.id], VOUCHED_BY_SYNC, t)
                    out.append((worker, created))
                    if created:
                        entries.append(audit(t, "worker_registered", "worker", worker.id, m.actor, f"status={worker.status}"))
                return out, entries

            return Write(upsert_many, m.reply or pykka.ThreadingFuture(), after=self._changed)

        if isinstance(m, RecordLiveness):

            def record(tx: Transaction) -> tuple[int, list]:
                t = now()
                entries, changes = [], 0
                for seen in sorted(m.sightings, key=lambda s: s.worker_id):  # lock workers in id order
                    statuses = tx.worker_liveness(seen.worker_id, seen.alive, seen.at)
                    if statuses is None or statuses[0] == statuses[1]:
                        continue
                    changes += 1
                    action = "worker_online" if seen.alive else "worker_offline"
                    entries.append(audit(t, action, "worker", seen.worker_id, m.actor, f"{statuses[0]} -> {statuses[1]}: {seen.cause}"[:1000]))
                return changes, entries

            return Write(record, m.reply or pykka.ThreadingFuture(), after=self._changed_if)

        if isinstance(m, RefreshWorker):

            def refresh(tx: Transaction) -> tuple[Worker, list]:
                t = now()
                before = tx.lock_worker(m.upsert.id)  # NotFound: it was removed meanwhile, and stays removed
                after, _ = tx.upsert_worker(m.upsert, t)
                changes = [f"{name} {getattr(before, name)} -> {getattr(after, name)}"
                           for name in REFRESH_AUDITED if getattr(before, name) != getattr(after, name)]
                if not changes:
                    return after, []
                return after, [audit(t, "worker_refreshed", "worker", after.id, m.actor, f"{', '.join(changes)} ({m.cause})")]

            return Write(refresh, m.reply, after=self._changed)

        if isinstance(m, RemoveWorker):

            def remove(tx: Transaction) -> tuple[Worker, list]:
                t = now()
                worker = tx.remove_worker(m.worker_id)
                vouched = tx.forget_worker_url(worker.id)
                worker = with_verification(worker, {worker.id: vouched} if vouched else {}, self.allowed)  # as it was
                return worker, [audit(t, "worker_removed", "worker", worker.id, m.actor)]

            return Write(remove, m.reply, after=self._changed)
        return None

    def on_tick(self, reply: Any = None) -> None:
        try:
            now = self.clock.now_ms()
            with self.store.transaction() as tx:
                changed = tx.mark_stale_workers_offline(now - self.offline_after_ms, now, vouched=self.probed)
                entries = [audit(now, "worker_offline", "worker", w.id, "worker-registry",
                                 f"not seen for {self.offline_after_ms // 1000} s") for w in changed]
                if self.inline_audit:
                    tx.insert_audit(entries)
        except Exception as exc:
            self.health.failed(exc)
            log.warning("worker liveness check failed: %s", exc)
            _fail(reply, exc)
            return
        self.health.succeeded(now)
        if changed:
            self._changed(None)
        if not changed:
            if reply is not None:
                reply.set(0)
            return
        log.info("workers offline (not seen for %d s): %s", self.offline_after_ms // 1000, ", ".join(w.id for w in changed))
        if self.inline_audit:
            if reply is not None:
                reply.set(len(changed))
        else:
            self._audit_sink(Record(entries, reply, len(changed)))

