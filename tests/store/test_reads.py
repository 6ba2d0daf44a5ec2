"""The store's read side for operators (search, leases of a task, expiries, audit by
action, activity and history), run against SQLite and PostgreSQL like the contract."""

from __future__ import annotations

import pytest

from bloom_runtime.engine.errors import InvalidInput
from bloom_runtime.engine.models import TASK_STATUSES, AuditEntry, Fence, HistoryPoint
from bloom_runtime.sql.store import MAX_PAGE, Store

from .test_contract import ERR, OK, T0, _walk_check, acquire, add_task, add_worker, complete

MINUTE = 60_000


def test_search_by_context_and_agent_pages_newest_first(store: Store) -> None:
    worker = add_worker(store, max_concurrency=50)
    ids = []
    for i in range(12):
        # Ties on created_at (two tasks per ms) page by id.
        task = add_task(store, now=T0 + i // 2, task_id=f"t-{i:02d}", context_id="ctx-a" if i % 3 else "ctx-b",
                        agent_slug="writer" if i < 8 else "critic")
        ids.append(task.id)
    for task_id in ids[:4]:
        acquire(store, task_id, [worker.id])
    complete(store, ids[1], OK)
    complete(store, ids[2], ERR)

    tasks = {t.id: t for t in store.list_tasks(None, MAX_PAGE, None).items}
    newest = sorted(ids, key=lambda i: (tasks[i].created_at, i), reverse=True)

    def expect(field: str, value: str, statuses: tuple[str, ...]) -> list[str]:
        return [i for i in newest if getattr(tasks[i], field) == value and tasks[i].status in statuses]

    for field, value in (("context_id", "ctx-a"), ("context_id", "ctx-b"), ("agent_slug", "writer"), ("agent_slug", "critic")):
        for statuses in (TASK_STATUSES, ("queued",), ("leased", "completed"), ("dead",)):
            expected = expect(field, value, statuses)
            if expected:
                _walk_check(lambda limit, cur, f=field, v=value, s=statuses: store.search_tasks(f, v, s, limit, cur), expected)
            else:
                assert store.search_tasks(field, value, statuses, 5, None).items == []
    assert store.search_tasks("context_id", "nowhere", TASK_STATUSES, 10, None).items == []
    # Values are matched exactly, never as patterns.
    assert store.search_tasks("context_id", "ctx-%", TASK_STATUSES, 10, None).items == []


def test_search_rejects_a_malformed_cursor(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.search_tasks("agent_slug", "writer", TASK_STATUSES, 10, "not-a-cursor")


def test_leases_of_tasks_every_lease_however_it_ended(store: Store) -> None:
    worker = add_worker(store, max_concurrency=10)
    task = add_task(store, max_attempts=5)
    other = add_task(store)
    # released (error, retried), expired, then the active one
    acquire(store, task.id, [worker.id], now=T0 + 1, ttl=60, lease_id="l-1")
    complete(store, task.id, ERR, now=T0 + 2)
    acquire(store, task.id, [worker.id], now=T0 + 5000, ttl=1, lease_id="l-2")
    store.run(lambda tx: tx.expire_due(T0 + 7000, 10))
    acquire(store, task.id, [worker.id], now=T0 + 9000, ttl=60, lease_id="l-3")
    acquire(store, other.id, [worker.id], now=T0 + 9001, ttl=60, lease_id="l-other")

    page = store.list_task_leases([task.id], None, MAX_PAGE, None)
    assert [(lease.id, lease.status) for lease in page.items] == [("l-3", "active"), ("l-2", "expired"), ("l-1", "released")]
    _walk_check(lambda limit, cur: store.list_task_leases([task.id], None, limit, cur), ["l-3", "l-2", "l-1"])
    assert [lease.id for lease in store.list_task_leases([task.id], "expired", 10, None).items] == ["l-2"]
    both = store.list_task_leases([task.id, other.id], "active", 10, None).items
    assert [lease.id for lease in both] == ["l-other", "l-3"]
    assert store.list_task_leases(["t-unknown"], None, 10, None).items == []


def test_expired_leases_latest_expiry_first(store: Store) -> None:
    worker = add_worker(store, max_concurrency=10)
    ttls = {"l-a": 30, "l-b": 5, "l-c": 20, "l-d": 10}  # started together, so expiry order differs from start order
    for n, (lease_id, ttl) in enumerate(ttls.items()):
        task = add_task(store)
        acquire(store, task.id, [worker.id], now=T0 + n, ttl=ttl, lease_id=lease_id)
    kept = add_task(store)
    acquire(store, kept.id, [worker.id], now=T0, ttl=3600, lease_id="l-active")
    store.run(lambda tx: tx.expire_due(T0 + 60_000, 100))
    expected = sorted(ttls, key=lambda i: ttls[i] * 1000 + list(ttls).index(i), reverse=True)
    _walk_check(lambda limit, cur: store.list_expired_leases(limit, cur), expected)


def test_audit_by_action_and_by_entity_and_action(store: Store) -> None:
    entries = [
        AuditEntry(id=f"e-{i:02d}", timestamp=T0 + i // 2, action=("task_cancelled", "task_created", "lease_renewed")[i % 3],
                   entity_type="task", entity_id="t-1" if i < 6 else "t-2", actor="ops")
        for i in range(13)
    ]
    store.run(lambda tx: tx.insert_audit(entries))
    newest = sorted(entries, key=lambda e: (e.timestamp, e.id), reverse=True)
    for action in ("task_cancelled", "lease_renewed"):
        _walk_check(lambda limit, cur, a=action: store.list_audit(limit, cur, action=a), [e.id for e in newest if e.action == action])
        _walk_check(lambda limit, cur, a=action: store.list_audit(limit, cur, entity_id="t-2", action=a),
                    [e.id for e in newest if e.action == action and e.entity_id == "t-2"])
    assert store.list_audit(10, None, action="nothing_like_it").items == []


def test_live_depth_and_oldest_queued(store: Store) -> None:
    assert store.live_depth() == {"queued": 0, "leased": 0, "running": 0}
    assert store.oldest_queued() is None
    worker = add_worker(store, max_concurrency=10)
    first = add_task(store, now=T0 + 5, task_id="t-first")
    add_task(store, now=T0 + 7)
    leased = add_task(store, now=T0 + 1)  # older, but not queued
    running = add_task(store, now=T0 + 2)
    acquire(store, leased.id, [worker.id])
    acquire(store, running.id, [worker.id])
    store.run(lambda tx: tx.heartbeat(running.id, Fence(), T0 + 3))
    done = add_task(store, now=T0)
    acquire(store, done.id, [worker.id])
    complete(store, done.id, OK)
    assert store.live_depth() == {"queued": 2, "leased": 1, "running": 1}
    assert store.oldest_queued() == (first.id, T0 + 5)


def test_activity_counts_per_minute(store: Store) -> None:
    base = (T0 // MINUTE + 1) * MINUTE  # a minute boundary
    worker = add_worker(store, max_concurrency=10)
    a = add_task(store, now=base + 10)
    b = add_task(store, now=base + MINUTE - 1)
    c = add_task(store, now=base + MINUTE, max_attempts=1)
    d = add_task(store, now=base + MINUTE + 1)
    acquire(store, a.id, [worker.id], now=base + 20)
    complete(store, a.id, OK, now=base + MINUTE + 5)
    acquire(store, b.id, [worker.id], now=base + MINUTE + 6)
    complete(store, b.id, ERR, now=base + MINUTE + 7)
    acquire(store, c.id, [worker.id], now=base + MINUTE + 8, ttl=60)
    store.run(lambda tx: tx.expire_due(base + 3 * MINUTE, 10))  # c's lease was due at base + 2 min + 8 ms
    acquire(store, d.id, [worker.id], now=base + 3 * MINUTE + 1)
    complete(store, d.id, OK, now=base + 3 * MINUTE + 2)

    got = store.activity(base, base + 3 * MINUTE)
    assert got == {
        base: {"created": 2},
        base + MINUTE: {"created": 2, "completed": 1, "failed": 1},
        base + 2 * MINUTE: {"expired": 1},
    }
    assert store.activity(base + 3 * MINUTE, base + 4 * MINUTE) == {base + 3 * MINUTE: {"completed": 1}}
    assert store.activity(base - MINUTE, base) == {}


def test_history_record_prune_and_first_row_wins(store: Store) -> None:
    base = (T0 // MINUTE) * MINUTE
    assert store.last_history_minute() is None
    points = [
        HistoryPoint(at=base + i * MINUTE, queued=i if i else None, leased=None if not i else 0, running=None if not i else 1,
                     created=i, completed=2 * i, failed=1, expired=0)
        for i in range(4)
    ]
    assert store.run(lambda tx: tx.record_history(points, base + 4 * MINUTE)) == 4
    again = [HistoryPoint(at=base + MINUTE, queued=99, leased=99, running=99, created=99)]
    assert store.run(lambda tx: tx.record_history(again, base + 5 * MINUTE)) == 0
    assert store.history(base, base + 4 * MINUTE) == points
    assert store.history(base + MINUTE, base + 3 * MINUTE) == points[1:3]
    assert store.last_history_minute() == base + 3 * MINUTE
    store.run(lambda tx: tx.prune_history(base + 2 * MINUTE))
    assert store.history(0, base + 10 * MINUTE) == points[2:]
