"""PostgreSQL's write transaction: every state change a set statement, a batch one round trip.

Several engine processes may share one database, so every change runs under row
locks taken in one order, never backwards:

    task rows (ascending id)  ->  worker rows (ascending id)  ->  lease rows

- A batch first locks every task it changes (``lock_tasks``: by id, or through the
  lease it fails), then the workers it grants leases to (``lock_workers``). Its set
  statements then run in fresh READ COMMITTED snapshots taken after the locks, so
  they see everything the previous holders committed. Lease rows are written only by
  a holder of their task's lock, so lease statements never wait.
- Worker capacity is exact: every lease for a worker is inserted under that worker's
  row lock and counted in a statement after the lock.
- A claim takes its worker, then tasks with ``FOR UPDATE SKIP LOCKED``: it never waits
  for a task lock, so that edge cannot close a cycle. The sweep takes tasks with SKIP
  LOCKED as well, then their leases.
- A heartbeat touches its worker last (task -> lease -> worker), and only a stale row.
- mark_stale_workers_offline locks workers in ascending id, as do the registry's
  liveness writes (one worker_liveness per worker, in id order); set_settings and
  add_settings_if_absent lock settings keys in sorted order.

What a batch's first message cannot hold runs after it, one operation at a time, in
the same transaction: a second operation on a task already in the batch (or a second
create of an id, a second claim of a worker, a second sweep), and an acquire offering
several workers. Later operations lock later rows, out of the order above: two
processes doing that can deadlock, PostgreSQL aborts one, and that surfaces as
``TransientConflict`` (retry the batch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import psycopg

from bloom_runtime.engine.errors import NoCapacity, NotFound
from bloom_runtime.engine.models import AuditEntry, Delivery, HistoryPoint, Worker, WorkerUpsert, new_worker
from bloom_runtime.sql import refusals
from bloom_runtime.sql.pg_batch import Batch, statements
from bloom_runtime.sql.pg_errors import translate, translating
from bloom_runtime.sql.pg_messages import Messages
from bloom_runtime.sql.pg_records import WORKER_N, delivery_record, encode, to_json, worker_columns, worker_row
from bloom_runtime.sql.store import AcquireOp, Op, Transaction, history_params


class PostgresTransaction(Transaction):
    """Operations on one open transaction of one pooled connection."""

    def __init__(self, conn: psycopg.Connection[Any], where: str, prepared: set[str]) -> None:
        self._conn = conn
        self._where = where
        self._messages = Messages(conn, where, prepared)
        # Entries written apart from the changes go out with COMMIT: one round trip fewer.
        self._audit: list[AuditEntry] = []

    # --- the state changes -----------------------------------------------------

    @translating
    def apply(self, ops: Sequence[Op], now: int, commit: bool = False) -> list[Any]:
        """A batch in one round trip (see ``Transaction.apply``).

        Each kind of change goes out as one set statement over JSON rows, after the
        tasks and workers they name are locked in id order. PostgreSQL applies a batch
        in this order: creates, acquires, claims, heartbeats and completes, cancels,
        requeues, failed leases, the sweep; then, one at a time in list order, what the
        first message cannot hold (see the module's docstring). The answers to creates
        whose idempotency key was used show the task as the batch left it."""
        out: list[Any] = [None] * len(ops)
        batch = Batch(ops, out)
        sent, readers = statements(ops, batch, now, out.__setitem__)
        one_message = commit and not batch.later
        if one_message:
            sent += self._take_audit()
        if sent:
            results = self._messages.send(sent, end=b"COMMIT" if one_message else None)
            if one_message:
                self._messages.begun = False  # committed: later statements open a new transaction
            for read, rows in zip(readers, results, strict=False):
                read(rows)
        for i in batch.creates:
            if out[i] is None:  # its insert was skipped, and no task has its key: the id is taken
                out[i] = refusals.refusal(refusals.ID_TAKEN, task_id=ops[i].task_id)  # type: ignore[union-attr]
        for i in batch.later:
            op = ops[i]
            if isinstance(op, AcquireOp) and len(op.worker_ids) != 1:
                out[i] = self._acquire_any(op, now)
            else:
                out[i] = self.apply([op], now)[0]
        if commit and not one_message:
            self.commit()
            self._messages.begun = False
        return out

    def _acquire_any(self, op: AcquireOp, now: int) -> Any:
        """An acquire offering several workers: the first with room takes it. The candidates
        are locked together first, in id order, so two such acquires cannot cross."""
        self._messages.send([("lock_workers", {"ids": sorted(set(op.worker_ids))})])
        for worker_id in op.worker_ids:
            answer = self.apply([AcquireOp(op.task_id, (worker_id,), op.ttl_seconds, op.lease_id, op.actor)], now)[0]
            if isinstance(answer, NotFound) and answer.details.get("worker_id") == worker_id:
                continue  # one of several candidates: skip it
            if not isinstance(answer, NoCapacity):
                return answer
        return refusals.refusal(refusals.NO_CAPACITY, task_id=op.task_id)

    # --- statements and messages -----------------------------------------------

    def _take_audit(self) -> list[tuple[str, dict[str, Any]]]:
        """The statement inserting the pending audit entries (none if there are none)."""
        if not self._audit:
            return []
        rows, self._audit = encode(self._audit).decode(), []
        return [("insert_audit", {"rows": rows})]

    def commit(self) -> None:
        """Write the pending audit entries and commit, in one message."""
        pending = self._take_audit()
        if not self._messages.begun:
            # Nothing ran yet: one message of statements is a transaction by itself.
            if pending:
                self._messages.send(pending, begin=False)
            return
        self._messages.send(pending, end=b"COMMIT")

    def rollback(self) -> None:
        if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._conn.execute(b"ROLLBACK")

    # --- workers -------------------------------------------------------------

    @translating
    def upsert_worker(self, upsert: WorkerUpsert, now: int) -> tuple[Worker, bool]:
        caps = upsert.capabilities
        fresh = new_worker(upsert, now)  # what an insert stores
        row = self._messages.fetch_one(
            "upsert_worker",
            {
                "id": upsert.id,
                "node_id": upsert.node_id,
                "url": upsert.url,
                "status": upsert.status,
                "capabilities": to_json(caps) if caps is not None else None,
                "last_heartbeat": upsert.last_heartbeat,
                "ip_addrs": to_json(upsert.ip_addrs) if upsert.ip_addrs is not None else None,
                "obs_count": upsert.obs_count,
                "db_sha": upsert.db_sha,
                "now": now,
                "agent_version": upsert.agent_version,
                "os_info": upsert.os_info,
                "install_method": upsert.install_method,
                "source": upsert.source,
                **{f"new_{name}": value for name, value in worker_columns(fresh).items()},
            },
        )
        return worker_row(row), bool(row[WORKER_N + 1])

    @translating
    def lock_worker(self, worker_id: str) -> Worker:
        self._messages.fetch_all("lock_workers", {"ids": [worker_id]})
        row = self._messages.fetch_one("get_worker", {"id": worker_id})
        if row is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return worker_row(row)

    @translating
    def remove_worker(self, worker_id: str) -> Worker:
        row = self._messages.fetch_one("delete_worker", {"id": worker_id})
        if row is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return worker_row(row)

    @translating
    def touch_worker(self, worker_id: str, now: int) -> None:
        if self._messages.fetch_one("touch_worker", {"id": worker_id, "now": now}) is None:
            raise NotFound("worker not found", worker_id=worker_id)

    @translating
    def mark_stale_workers_offline(self, seen_before: int, now: int, vouched: bool = False) -> list[Worker]:
        rows = self._messages.fetch_all("mark_stale_workers_offline", {"seen_before": seen_before, "vouched": vouched})
        return sorted((worker_row(r) for r in rows), key=lambda w: w.id)

    @translating
    def worker_liveness(self, worker_id: str, alive: bool, at: int) -> tuple[str, str] | None:
        row = self._messages.fetch_one("worker_liveness", {"id": worker_id, "alive": alive, "at": at})
        return (row[0], row[1]) if row is not None else None

    # --- push dispatch (the dispatcher's and the registry's own tables) --------

    @translating
    def vouch_worker_url(self, worker_id: str, url: str, by: str, now: int) -> None:
        self._messages.fetch_all("vouch_worker_url", {"worker_id": worker_id, "url": url, "by": by, "now": now})

    @translating
    def forget_worker_url(self, worker_id: str) -> str | None:
        row = self._messages.fetch_one("forget_worker_url", {"worker_id": worker_id})
        return row[0] if row is not None else None

    @translating
    def insert_delivery(self, delivery: Delivery) -> None:
        self._messages.fetch_all("insert_delivery", msgspec.structs.asdict(delivery))

    @translating
    def finish_delivery(self, delivery_id: str, state: str, agent_status: int | None, detail: str | None, now: int) -> Delivery | None:
        row = self._messages.fetch_one(
            "finish_delivery", {"id": delivery_id, "state": state, "agent_status": agent_status, "detail": detail, "now": now}
        )
        return delivery_record(row) if row is not None else None

    @translating
    def expire_deliveries(self, now: int, detail: str, limit: int) -> list[Delivery]:
        rows = self._messages.fetch_all("expire_deliveries", {"now": now, "detail": detail, "limit": limit})
        return [delivery_record(r) for r in rows]

    # --- audit and settings --------------------------------------------------

    def insert_audit(self, entries: Sequence[AuditEntry]) -> None:
        # Written at commit, in the same message as COMMIT: one round trip fewer.
        self._audit.extend(entries)

    @translating
    def set_settings(self, values: dict[str, str]) -> None:
        if not values:
            return
        keys = sorted(values)
        self._messages.fetch_all("set_settings", {"keys": keys, "values": [values[k] for k in keys], "now": time.time_ns() // 1_000_000})

    @translating
    def add_settings_if_absent(self, values: dict[str, str], now: int) -> None:
        if not values:
            return
        keys = sorted(values)
        self._messages.fetch_all("add_settings_if_absent", {"keys": keys, "values": [values[k] for k in keys], "now": now})

    @translating
    def record_history(self, points: Sequence[HistoryPoint], now: int) -> int:
        added = 0
        for p in points:
            added += len(self._messages.fetch_all("record_history", {**history_params(p), "now": now}))
        return added

    @translating
    def prune_history(self, before: int) -> None:
        self._messages.fetch_all("prune_history", {"before": before})

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested ``conn.transaction()``: an exception undoes only this block."""
        self._messages.begin()
        try:
            with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise translate(exc, self._where) from exc


