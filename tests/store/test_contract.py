"""The store contract (bloom_runtime/sql/store.py), run against SQLite and PostgreSQL.

Every test takes the ``store`` fixture, parametrized over both dialects. Times are
explicit integers (epoch ms); nothing sleeps. A refused operation must leave the
database exactly as it was: ``assert_refused`` snapshots every table through the
read API before and after, and runs the operation inside a transaction that it
then commits, so an operation that wrote half its work would show.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from bloom_runtime.engine.errors import (
    Conflict,
    InvalidInput,
    NoCapacity,
    NotFound,
    SchemaTooNew,
    StaleLease,
    StoreUnavailable,
)
from bloom_runtime.engine.models import (
    CANCELLABLE,
    HOLDING_LEASE,
    LEASABLE,
    LEASE_STATUSES,
    REQUEUEABLE,
    TASK_STATUSES,
    WORKER_STATUSES,
    AuditEntry,
    Capabilities,
    Completion,
    Delivery,
    Fence,
    LeaseGrant,
    NewTask,
    Policy,
    Task,
    Worker,
    WorkerUpsert,
    new_id,
)
from bloom_runtime.sql import migrate as migrations
from bloom_runtime.sql.store import MAX_PAGE, Store, Transaction, TransientConflict

T0 = 1_700_000_000_000  # a fixed "now" (epoch ms)
TTL_S = 60
ALL_STATUSES = sorted(TASK_STATUSES)


# --- helpers -----------------------------------------------------------------


def delay(attempts: int) -> int:
    """Retry backoff used by the tests: 1 s per attempt used."""
    return 1000 * attempts


def new_task(**kw: Any) -> NewTask:
    kw.setdefault("context_id", "ctx-1")
    kw.setdefault("agent_slug", "writer")
    kw.setdefault("prompt", "say hi")
    return NewTask(**kw)


def add_task(store: Store, now: int = T0, task_id: str | None = None, **kw: Any) -> Task:
    task, created = store.run(lambda tx: tx.create_task(new_task(**kw), task_id or new_id(), now))
    assert created
    return task


def add_worker(
    store: Store,
    worker_id: str | None = None,
    now: int = T0,
    max_concurrency: int = 1,
    labels: tuple[str, ...] = (),
    claude_cli: bool = True,
    **kw: Any,
) -> Worker:
    caps = Capabilities(claude_cli=claude_cli, max_concurrency=max_concurrency, labels=list(labels))
    upsert = WorkerUpsert(id=worker_id or f"w-{new_id()}", capabilities=caps, **kw)
    worker, _ = store.run(lambda tx: tx.upsert_worker(upsert, now))
    return worker


def acquire(
    store: Store, task_id: str, worker_ids: list[str], now: int = T0 + 1, ttl: int = TTL_S, lease_id: str | None = None
) -> LeaseGrant:
    return store.run(lambda tx: tx.acquire_lease(task_id, worker_ids, ttl, lease_id or new_id(), now))


def complete(
    store: Store, task_id: str, completion: Completion, now: int = T0 + 10, fence: Fence = Fence()
) -> Any:
    return store.run(lambda tx: tx.complete(task_id, fence, completion, new_id(), new_id(), delay, now))


OK = Completion(status="success", output="hello")
ERR = Completion(status="error", error_message="boom")


def in_state(store: Store, status: str, now: int = T0) -> Task:
    """A fresh task driven to ``status`` through the store's own operations."""
    worker = add_worker(store, max_concurrency=10, now=now)
    task = add_task(store, now=now, max_attempts=1 if status in ("failed", "dead") else 3)
    if status == "queued":
        return task
    if status == "cancelled":
        store.run(lambda tx: tx.cancel(task.id, now + 1))
        return store.get_task(task.id)
    ttl = 1 if status == "dead" else TTL_S
    acquire(store, task.id, [worker.id], now=now + 1, ttl=ttl)
    if status == "running":
        store.run(lambda tx: tx.heartbeat(task.id, Fence(), now + 2))
    elif status == "completed":
        complete(store, task.id, OK, now=now + 2)
    elif status == "failed":
        complete(store, task.id, ERR, now=now + 2)
    elif status == "dead":
        expired = store.run(lambda tx: tx.expire_due(now + 1 + 1000, 100))
        assert [e.task.id for e in expired] == [task.id]
    got = store.get_task(task.id)
    assert got.status == status
    return got


def snapshot(store: Store) -> dict[str, Any]:
    """Every row of every table the contract touches, through the read API."""
    return {
        "tasks": store.list_tasks(None, MAX_PAGE, None).items,
        "leases": store.list_leases(None, MAX_PAGE, None).items,
        "workers": store.list_workers(),
        "artifacts": store.list_artifacts(None, MAX_PAGE, None).items,
        "results": store.list_results(None, MAX_PAGE, None).items,
        "audit": store.list_audit(MAX_PAGE, None).items,
        "settings": store.get_settings(),
    }


def assert_refused(store: Store, op: Callable[[Transaction], Any], error: type[Exception]) -> Exception:
    """``op`` raises ``error``, writes nothing, and leaves its transaction usable."""
    before = snapshot(store)
    marker = AuditEntry(id=new_id(), timestamp=T0, action="after", entity_type="test", entity_id="x", actor="t")
    with store.transaction() as tx:
        with pytest.raises(error) as info:
            op(tx)
        tx.insert_audit([marker])  # the batch goes on after a refusal
    after = snapshot(store)
    by_id = lambda e: e.id  # noqa: E731
    assert sorted(after.pop("audit"), key=by_id) == sorted([marker, *before.pop("audit")], key=by_id)
    assert after == before
    return info.value


def all_pages(fetch: Callable[[int, str | None], Any], limit: int) -> list[Any]:
    items: list[Any] = []
    cursor = None
    for _ in range(1000):
        page = fetch(limit, cursor)
        assert len(page.items) <= limit
        items.extend(page.items)
        if page.next_cursor is None:
            return items
        assert page.items, "a page with a next cursor is never empty"
        cursor = page.next_cursor
    raise AssertionError("pagination never ended")


# --- lifecycle, migrations, transactions --------------------------------------


def test_kind_and_ping(store: Store) -> None:
    assert store.kind in ("sqlite", "postgresql")
    store.ping()


def test_migrate_twice_applies_nothing_the_second_time(store: Store) -> None:
    assert store.migrate() == []
    assert store.migrate() == []
    store.check_schema()


@pytest.fixture
def execute_raw(store: Store, request: pytest.FixtureRequest) -> Iterator[Callable[[str], None]]:
    """Run one statement on the store's database behind its back (for schema tests)."""
    if store.kind == "sqlite":

        def run(sql: str) -> None:
            conn = sqlite3.connect(store.path)  # type: ignore[attr-defined]
            try:
                with conn:
                    conn.execute(sql)
            finally:
                conn.close()

    else:
        import psycopg

        url = request.getfixturevalue("pg_url")

        def run(sql: str) -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql)

    yield run


def test_newer_migration_in_database_is_schema_too_new(store: Store, execute_raw: Callable[[str], None]) -> None:
    execute_raw("INSERT INTO schema_migrations (version, applied_at) VALUES ('9999_from_the_future', 0)")
    try:
        with pytest.raises(SchemaTooNew):
            store.migrate()
        with pytest.raises(SchemaTooNew):
            store.check_schema()
    finally:
        execute_raw("DELETE FROM schema_migrations WHERE version = '9999_from_the_future'")
    store.check_schema()


def test_transaction_commits_on_exit_and_rolls_back_on_error(store: Store) -> None:
    with store.transaction() as tx:
        kept, _ = tx.create_task(new_task(), "t-kept", T0)
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.create_task(new_task(), "t-lost", T0)
            raise RuntimeError("caller failed")
    assert store.get_task("t-kept") == kept
    with pytest.raises(NotFound):
        store.get_task("t-lost")


def test_reads_do_not_see_an_open_write_transaction(store: Store) -> None:
    with store.transaction() as tx:
        tx.create_task(new_task(), "t-pending", T0)
        # A read runs on its own connection: it neither waits for this writer nor sees its work.
        with pytest.raises(NotFound):
            store.get_task("t-pending")
    assert store.get_task("t-pending").id == "t-pending"


def test_savepoint_undoes_only_what_it_wrapped(store: Store) -> None:
    with store.transaction() as tx:
        tx.create_task(new_task(), "t-a", T0)
        with pytest.raises(RuntimeError):
            with tx.savepoint():
                tx.create_task(new_task(), "t-b", T0)
                raise RuntimeError("undo t-b")
        with tx.savepoint():
            tx.create_task(new_task(), "t-c", T0)
    assert {t.id for t in store.list_tasks(None, 10, None).items} == {"t-a", "t-c"}


def test_refusal_inside_a_batch_keeps_earlier_and_later_work(store: Store) -> None:
    done = in_state(store, "completed")
    with store.transaction() as tx:
        tx.create_task(new_task(), "t-before", T0)
        with pytest.raises(Conflict):
            tx.cancel(done.id, T0 + 5)
        tx.create_task(new_task(), "t-after", T0)
    assert store.get_task("t-before").status == "queued"
    assert store.get_task("t-after").status == "queued"
    assert store.get_task(done.id) == done


# --- tasks: create, read, idempotency -------------------------------------------


def test_create_task_defaults_and_round_trip(store: Store) -> None:
    new = new_task(
        context_hints=["a.md", "b.md"],
        policy=Policy(timeout_sec=30, budget=1.5),
        desired_format="json",
        max_attempts=5,
        labels=["gpu", "eu"],
    )
    task, created = store.run(lambda tx: tx.create_task(new, "t-1", T0))
    assert created
    assert task == Task(
        id="t-1",
        context_id="ctx-1",
        agent_slug="writer",
        prompt="say hi",
        context_hints=["a.md", "b.md"],
        policy=Policy(timeout_sec=30, budget=1.5),
        desired_format="json",
        status="queued",
        created_at=T0,
        updated_at=T0,
        lease_id=None,
        worker_id=None,
        attempts=0,
        max_attempts=5,
        labels=["gpu", "eu"],
        not_before=None,
        idempotency_key=None,
    )
    assert store.get_task("t-1") == task


def test_get_unknown_task_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_task("nope")


def test_idempotency_key_returns_the_first_task(store: Store) -> None:
    first, created = store.run(lambda tx: tx.create_task(new_task(idempotency_key="key-1"), "t-1", T0))
    assert created
    again, created_again = store.run(
        lambda tx: tx.create_task(new_task(idempotency_key="key-1", prompt="other"), "t-2", T0 + 5)
    )
    assert not created_again
    assert again == first
    with pytest.raises(NotFound):
        store.get_task("t-2")
    assert store.get_task_by_idempotency_key("key-1") == first
    assert store.get_task_by_idempotency_key("key-unknown") is None
    # Without a key, identical requests are distinct tasks.
    add_task(store, task_id="t-3")
    add_task(store, task_id="t-4")
    assert len(store.list_tasks(None, 10, None).items) == 3


def test_idempotency_key_still_answers_after_the_task_moved_on(store: Store) -> None:
    worker = add_worker(store)
    _first, _ = store.run(lambda tx: tx.create_task(new_task(idempotency_key="k"), "t-1", T0))
    acquire(store, "t-1", [worker.id])
    again, created = store.run(lambda tx: tx.create_task(new_task(idempotency_key="k"), "t-2", T0 + 5))
    assert not created
    assert again.id == "t-1" and again.status == "leased"


# --- acquire_lease -------------------------------------------------------------


def test_acquire_lease_grants_and_counts(store: Store) -> None:
    worker = add_worker(store, "w-1", max_concurrency=2)
    task = add_task(store, context_id="ctx-9")
    grant = acquire(store, task.id, ["w-1"], now=T0 + 100, ttl=90, lease_id="l-1")
    assert grant.task.status == "leased"
    assert grant.task.attempts == 1
    assert grant.task.lease_id == "l-1" and grant.task.worker_id == "w-1"
    assert grant.task.updated_at == T0 + 100
    assert grant.lease.id == "l-1"
    assert grant.lease.task_id == task.id and grant.lease.worker_id == "w-1"
    assert grant.lease.status == "active"
    assert grant.lease.started_at == T0 + 100
    assert grant.lease.expires_at == T0 + 100 + 90_000
    assert grant.lease.ttl_seconds == 90
    assert grant.lease.context_id == "ctx-9"
    assert grant.worker.id == worker.id and grant.worker.active_leases == 1
    assert store.get_task(task.id) == grant.task
    assert store.get_lease("l-1") == grant.lease
    assert store.get_worker("w-1").active_leases == 1
    assert store.sticky_workers("ctx-9") == {"w-1"}
    assert store.sticky_workers("ctx-other") == set()


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - LEASABLE))
def test_acquire_lease_refused_unless_queued(store: Store, status: str) -> None:
    task = in_state(store, status)
    worker = add_worker(store, max_concurrency=5)
    error = assert_refused(store, lambda tx: tx.acquire_lease(task.id, [worker.id], TTL_S, new_id(), T0 + 50), Conflict)
    assert not isinstance(error, StaleLease)


def test_acquire_lease_unknown_task_or_worker(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store)
    assert_refused(store, lambda tx: tx.acquire_lease("nope", [worker.id], TTL_S, new_id(), T0), NotFound)
    assert_refused(store, lambda tx: tx.acquire_lease(task.id, ["w-nope"], TTL_S, new_id(), T0), NotFound)
    # Among several candidates, unknown ids are skipped; none known means no capacity.
    assert_refused(store, lambda tx: tx.acquire_lease(task.id, ["w-x", "w-y"], TTL_S, new_id(), T0), NoCapacity)
    grant = acquire(store, task.id, ["w-nope", worker.id])
    assert grant.worker.id == worker.id


def test_acquire_lease_respects_max_concurrency(store: Store) -> None:
    busy = add_worker(store, "w-busy", max_concurrency=2)
    spare = add_worker(store, "w-spare", max_concurrency=1)
    t1, t2, t3, t4 = (add_task(store, now=T0 + i) for i in range(4))
    assert acquire(store, t1.id, [busy.id]).worker.active_leases == 1
    assert acquire(store, t2.id, [busy.id]).worker.active_leases == 2
    assert_refused(store, lambda tx: tx.acquire_lease(t3.id, [busy.id], TTL_S, new_id(), T0 + 5), NoCapacity)
    # The first candidate with room wins, in the order given.
    assert acquire(store, t3.id, [busy.id, spare.id]).worker.id == spare.id
    assert_refused(
        store, lambda tx: tx.acquire_lease(t4.id, [busy.id, spare.id], TTL_S, new_id(), T0 + 5), NoCapacity
    )
    assert_refused(store, lambda tx: tx.acquire_lease(t4.id, [], TTL_S, new_id(), T0 + 5), NoCapacity)
    # Finishing a lease frees its slot.
    complete(store, t1.id, OK)
    assert acquire(store, t4.id, [busy.id, spare.id]).worker.id == busy.id


def test_acquire_lease_honours_not_before(store: Store) -> None:
    worker = add_worker(store, max_concurrency=3)
    task = add_task(store)
    acquire(store, task.id, [worker.id], now=T0 + 1)
    requeued = complete(store, task.id, ERR, now=T0 + 10).task
    assert requeued.status == "queued" and requeued.not_before == T0 + 10 + delay(1)
    assert_refused(
        store, lambda tx: tx.acquire_lease(task.id, [worker.id], TTL_S, new_id(), requeued.not_before - 1), Conflict
    )
    grant = acquire(store, task.id, [worker.id], now=requeued.not_before)
    assert grant.task.attempts == 2


# --- claim_next ------------------------------------------------------------------


def test_claim_next_takes_the_oldest_and_records_contact(store: Store) -> None:
    worker = add_worker(store, "w-1", max_concurrency=5, status="offline", source="api")
    newer = add_task(store, now=T0 + 20, task_id="t-newer")
    older = add_task(store, now=T0 + 10, task_id="t-older", policy=Policy(timeout_sec=200))
    grant = store.run(lambda tx: tx.claim_next(worker.id, None, "l-1", T0 + 100))
    assert grant is not None
    assert grant.task.id == older.id
    assert grant.task.status == "leased" and grant.task.attempts == 1
    assert grant.task.lease_id == "l-1" and grant.task.worker_id == "w-1"
    # ttl None: the task's default, policy.timeout_sec + 30.
    assert grant.lease.ttl_seconds == 230
    assert grant.lease.expires_at == T0 + 100 + 230_000
    assert grant.worker.active_leases == 1
    claimed_by = store.get_worker("w-1")
    assert claimed_by.last_heartbeat == T0 + 100
    assert claimed_by.status == "online" and claimed_by.source == "pull"
    second = store.run(lambda tx: tx.claim_next(worker.id, 45, "l-2", T0 + 200))
    assert second is not None and second.task.id == newer.id
    assert second.lease.ttl_seconds == 45 and second.lease.expires_at == T0 + 200 + 45_000
    assert store.run(lambda tx: tx.claim_next(worker.id, None, "l-3", T0 + 300)) is None


def test_claim_next_with_nothing_to_do_still_records_contact(store: Store) -> None:
    # An idle pull worker polls and finds nothing: it is alive, so it must not go stale.
    add_worker(store, "w-idle", status="offline", source="pull", last_heartbeat=T0 - 100_000)
    assert store.run(lambda tx: tx.claim_next("w-idle", None, new_id(), T0)) is None
    idle = store.get_worker("w-idle")
    assert idle.last_heartbeat == T0 and idle.status == "online" and idle.source == "pull"


def test_a_fresh_claim_leaves_the_worker_row_alone(store: Store) -> None:
    # Liveness needs no finer grain than 5 s: a busy pull worker's claims need not queue on its row.
    add_worker(store, "w-1", max_concurrency=5, status="online", source="pull", last_heartbeat=T0)
    store.run(lambda tx: tx.claim_next("w-1", None, new_id(), T0 + 4000))
    assert store.get_worker("w-1").last_heartbeat == T0
    store.run(lambda tx: tx.claim_next("w-1", None, new_id(), T0 + 5001))
    assert store.get_worker("w-1").last_heartbeat == T0 + 5001


def test_claim_of_several_takes_the_oldest_within_free_capacity(store: Store) -> None:
    worker = add_worker(store, "w-1", max_concurrency=4, labels=("gpu",))
    held = add_task(store, now=T0 + 1, task_id="t-held")
    acquire(store, held.id, [worker.id], now=T0 + 2)
    add_task(store, now=T0 + 3, task_id="t-tpu", labels=["tpu"])
    for n in range(5):
        add_task(store, now=T0 + 10 + n, task_id=f"t-{n}", labels=["gpu"] if n % 2 else [])
    lease_ids = [f"l-{n}" for n in range(8)]
    grants = store.run(lambda tx: tx.claim(worker.id, 8, 60, lease_ids, T0 + 100))
    assert [g.task.id for g in grants] == ["t-0", "t-1", "t-2"]  # three slots were free
    assert [g.lease.id for g in grants] == ["l-0", "l-1", "l-2"]
    assert [g.worker.active_leases for g in grants] == [2, 3, 4]
    assert all(g.task.status == "leased" and g.task.worker_id == "w-1" and g.lease.ttl_seconds == 60 for g in grants)
    assert store.run(lambda tx: tx.claim(worker.id, 2, None, ["l-x", "l-y"], T0 + 200)) == []  # full
    assert store.get_worker(worker.id).active_leases == 4


@pytest.mark.parametrize("max_tasks, lease_ids", [(0, ["l-1"]), (3, ["l-1", "l-2"])])
def test_claim_of_several_needs_a_lease_id_for_each(store: Store, max_tasks: int, lease_ids: list[str]) -> None:
    worker = add_worker(store, max_concurrency=4)
    add_task(store)
    assert_refused(store, lambda tx: tx.claim(worker.id, max_tasks, None, lease_ids, T0), InvalidInput)


@pytest.mark.parametrize("ttl", [0, -5])
def test_lease_ttl_below_one_second_is_invalid(store: Store, ttl: int) -> None:
    worker = add_worker(store)
    task = add_task(store)
    assert_refused(store, lambda tx: tx.acquire_lease(task.id, [worker.id], ttl, new_id(), T0), InvalidInput)
    assert_refused(store, lambda tx: tx.claim_next(worker.id, ttl, new_id(), T0), InvalidInput)


def test_claim_next_unknown_worker_is_not_found(store: Store) -> None:
    add_task(store)
    assert_refused(store, lambda tx: tx.claim_next("w-nope", None, new_id(), T0), NotFound)


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - LEASABLE))
def test_claim_next_skips_tasks_not_queued(store: Store, status: str) -> None:
    task = in_state(store, status)
    worker = add_worker(store, max_concurrency=5)
    leases_before = store.list_leases(None, MAX_PAGE, None).items
    assert store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), T0 + 50)) is None
    assert store.get_task(task.id) == task
    assert store.list_leases(None, MAX_PAGE, None).items == leases_before


def test_claim_next_routes_by_label_subset(store: Store) -> None:
    add_task(store, now=T0 + 1, task_id="t-tpu", labels=["tpu"])
    add_task(store, now=T0 + 2, task_id="t-gpu-eu", labels=["gpu", "eu"])
    add_task(store, now=T0 + 3, task_id="t-none", labels=[])
    add_task(store, now=T0 + 4, task_id="t-gpu", labels=["gpu"])
    add_task(store, now=T0 + 5, task_id="t-gpu-us", labels=["gpu", "us"])
    plain = add_worker(store, "w-plain", max_concurrency=10)
    gpu_eu = add_worker(store, "w-gpu-eu", max_concurrency=10, labels=("eu", "gpu", "fast"))

    def claim(worker: Worker) -> str | None:
        grant = store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), T0 + 100))
        return grant.task.id if grant else None

    assert claim(gpu_eu) == "t-gpu-eu"  # oldest it can take; t-tpu needs a label it lacks
    assert claim(plain) == "t-none"  # a worker without labels takes only unlabelled tasks
    assert claim(plain) is None
    assert claim(gpu_eu) == "t-gpu"
    assert claim(gpu_eu) is None
    assert store.get_task("t-tpu").status == "queued"
    assert store.get_task("t-gpu-us").status == "queued"


def test_claim_next_honours_not_before(store: Store) -> None:
    worker = add_worker(store, max_concurrency=3)
    task = add_task(store)
    acquire(store, task.id, [worker.id], now=T0 + 1)
    requeued = complete(store, task.id, ERR, now=T0 + 10).task
    assert store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), requeued.not_before - 1)) is None
    assert store.get_task(task.id).status == "queued"
    grant = store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), requeued.not_before))
    assert grant is not None and grant.task.id == task.id


def test_claim_next_respects_max_concurrency(store: Store) -> None:
    worker = add_worker(store, max_concurrency=2)
    tasks = [add_task(store, now=T0 + i) for i in range(3)]
    assert store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), T0 + 10)) is not None
    assert store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), T0 + 10)) is not None
    assert store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), T0 + 10)) is None
    assert store.get_task(tasks[2].id).status == "queued"
    assert store.get_worker(worker.id).active_leases == 2


def test_concurrent_claims_never_double_lease(store: Store) -> None:
    workers = [add_worker(store, f"w-{i}", max_concurrency=3) for i in range(6)]
    for i in range(12):
        add_task(store, now=T0 + i)
    barrier = threading.Barrier(len(workers))
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def claimer(worker: Worker) -> None:
        try:
            barrier.wait(timeout=30)
            got = []
            for _ in range(10):
                try:
                    grant = store.run(lambda tx: tx.claim_next(worker.id, None, new_id(), T0 + 100))
                except TransientConflict:
                    continue
                if grant is None:
                    break
                got.append(grant.task.id)
            claimed[worker.id] = got
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    every = [task_id for got in claimed.values() for task_id in got]
    assert len(every) == len(set(every))
    assert all(len(got) <= 3 for got in claimed.values())
    for worker_id, got in claimed.items():
        assert store.get_worker(worker_id).active_leases == len(got)
        for task_id in got:
            assert store.get_task(task_id).worker_id == worker_id
    assert store.stats()["leases"]["active"] == len(every)


# --- heartbeat -------------------------------------------------------------------


def test_heartbeat_renews_and_runs(store: Store) -> None:
    worker = add_worker(store, "w-1")
    task = add_task(store)
    grant = acquire(store, task.id, ["w-1"], now=T0 + 1, ttl=30, lease_id="l-1")
    t, lease = store.run(lambda tx: tx.heartbeat(task.id, Fence(), T0 + 10_000))
    assert t.status == "running" and t.updated_at == T0 + 10_000
    assert lease.id == "l-1" and lease.status == "active"
    assert lease.expires_at == T0 + 10_000 + 30_000 and lease.last_heartbeat == T0 + 10_000
    assert lease.started_at == grant.lease.started_at
    assert store.get_worker(worker.id).last_heartbeat == T0 + 10_000
    # A running task's lease renews again; a matching fence is accepted.
    t, lease = store.run(lambda tx: tx.heartbeat(task.id, Fence(lease_id="l-1", worker_id="w-1"), T0 + 20_000))
    assert t.status == "running" and lease.expires_at == T0 + 20_000 + 30_000
    assert store.get_lease("l-1") == lease
    assert store.get_task(task.id) == t


def test_heartbeat_refreshes_the_worker_at_most_every_5_s(store: Store) -> None:
    worker = add_worker(store, "w-1", now=T0 - 10_000)
    task = add_task(store)
    acquire(store, task.id, ["w-1"], now=T0, ttl=60)
    assert store.get_worker(worker.id).last_heartbeat == T0 - 10_000  # registered then
    store.run(lambda tx: tx.heartbeat(task.id, Fence(), T0 + 1000))
    assert store.get_worker(worker.id).last_heartbeat == T0 + 1000
    _, lease = store.run(lambda tx: tx.heartbeat(task.id, Fence(), T0 + 3000))
    assert lease.last_heartbeat == T0 + 3000  # the lease always renews
    assert store.get_worker(worker.id).last_heartbeat == T0 + 1000  # the worker row only when stale
    store.run(lambda tx: tx.heartbeat(task.id, Fence(), T0 + 7000))
    assert store.get_worker(worker.id).last_heartbeat == T0 + 7000


def test_active_lease_owners(store: Store) -> None:
    add_worker(store, "w-1", max_concurrency=5)
    add_worker(store, "w-2", max_concurrency=5)
    assert store.active_lease_owners() == []
    a = add_task(store, context_id="ctx-a")
    b = add_task(store, context_id="ctx-a")
    c = add_task(store, context_id="ctx-b")
    acquire(store, a.id, ["w-1"])
    acquire(store, b.id, ["w-2"])
    acquire(store, c.id, ["w-1"])
    complete(store, b.id, OK)
    assert sorted(store.active_lease_owners()) == [("ctx-a", "w-1"), ("ctx-b", "w-1")]


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - HOLDING_LEASE))
def test_heartbeat_refused_without_a_lease(store: Store, status: str) -> None:
    task = in_state(store, status)
    error = assert_refused(store, lambda tx: tx.heartbeat(task.id, Fence(), T0 + 50), Conflict)
    assert not isinstance(error, StaleLease)  # the caller named nothing stale


def test_heartbeat_unknown_task(store: Store) -> None:
    assert_refused(store, lambda tx: tx.heartbeat("nope", Fence(), T0), NotFound)


@pytest.mark.parametrize("status", sorted(HOLDING_LEASE))
@pytest.mark.parametrize("fence", ["other-lease", "other-worker"])
def test_heartbeat_and_complete_refuse_a_stale_fence(store: Store, status: str, fence: str) -> None:
    task = in_state(store, status)
    stale = Fence(lease_id=new_id()) if fence == "other-lease" else Fence(worker_id="w-someone-else")
    assert_refused(store, lambda tx: tx.heartbeat(task.id, stale, T0 + 50), StaleLease)
    assert_refused(
        store, lambda tx: tx.complete(task.id, stale, OK, new_id(), new_id(), delay, T0 + 50), StaleLease
    )


def test_late_callback_from_an_earlier_lease(store: Store) -> None:
    w1 = add_worker(store, "w-1")
    w2 = add_worker(store, "w-2")
    task = add_task(store)
    acquire(store, task.id, [w1.id], now=T0 + 1, ttl=1, lease_id="l-old")
    store.run(lambda tx: tx.expire_due(T0 + 2000, 10))
    old = Fence(lease_id="l-old", worker_id="w-1")
    # The task holds no lease now: refused either way (StaleLease or plain Conflict).
    assert_refused(store, lambda tx: tx.heartbeat(task.id, old, T0 + 2500), Conflict)
    assert_refused(store, lambda tx: tx.complete(task.id, old, OK, new_id(), new_id(), delay, T0 + 2500), Conflict)
    acquire(store, task.id, [w2.id], now=T0 + 3000, lease_id="l-new")
    # Now it holds another lease: the old one is stale.
    assert_refused(store, lambda tx: tx.heartbeat(task.id, old, T0 + 3500), StaleLease)
    assert_refused(
        store, lambda tx: tx.complete(task.id, old, OK, new_id(), new_id(), delay, T0 + 3500), StaleLease
    )
    assert_refused(store, lambda tx: tx.heartbeat(task.id, Fence(lease_id="l-old"), T0 + 3500), StaleLease)
    t, _ = store.run(lambda tx: tx.heartbeat(task.id, Fence(lease_id="l-new", worker_id="w-2"), T0 + 3600))
    assert t.status == "running"


# --- complete ---------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(HOLDING_LEASE))
def test_complete_success(store: Store, status: str) -> None:
    task = in_state(store, status)
    lease_id, worker_id = task.lease_id, task.worker_id
    completion = Completion(
        status="success",
        output="the answer",
        metrics={"duration_ms": 12.5, "tokens_used": None},
        artifact_type="markdown",
        artifact_tags=["final", "v1"],
    )
    out = store.run(
        lambda tx: tx.complete(task.id, Fence(lease_id=lease_id, worker_id=worker_id), completion, "r-1", "a-1", delay, T0 + 99)
    )
    assert out.task.status == "completed"
    assert out.task.lease_id == lease_id and out.task.worker_id == worker_id  # kept for the record
    assert out.task.updated_at == T0 + 99
    assert out.lease is not None and out.lease.id == lease_id and out.lease.status == "released"
    assert out.result.id == "r-1" and out.result.task_id == task.id
    assert out.result.worker_id == worker_id and out.result.artifact_id == "a-1"
    assert out.result.status == "success" and out.result.output == "the answer"
    assert out.result.error_message is None
    assert out.result.metrics == {"duration_ms": 12.5, "tokens_used": None}
    assert out.result.completed_at == T0 + 99
    assert out.artifact.id == "a-1" and out.artifact.task_id == task.id
    assert out.artifact.type == "markdown" and out.artifact.tags == ["final", "v1"]
    assert out.artifact.content == "the answer" and out.artifact.created_at == T0 + 99
    assert store.get_task(task.id) == out.task
    assert store.get_lease(lease_id) == out.lease
    assert store.get_result(task.id) == out.result
    assert store.list_artifacts(task.id, 10, None).items == [out.artifact]
    assert store.list_results(task.id, 10, None).items == [out.result]
    assert store.get_worker(worker_id).active_leases == 0


def test_complete_error_with_attempts_left_requeues_after_backoff(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=3)
    acquire(store, task.id, [worker.id])

    def backoff(attempts: int) -> int:
        return 7000 + attempts  # the delay for the attempts used, here 1

    out = store.run(lambda tx: tx.complete(task.id, Fence(), ERR, "r-1", "a-1", backoff, T0 + 50))
    assert out.task.status == "queued" and out.task.not_before == T0 + 50 + 7001
    assert out.task.lease_id is None and out.task.worker_id is None
    assert out.task.attempts == 1
    assert out.result.status == "error" and out.result.error_message == "boom" and out.result.output is None
    assert out.result.worker_id == worker.id
    assert out.artifact.content == "boom"  # no output: the artifact keeps the error
    assert out.lease is not None and out.lease.status == "released"


def test_complete_error_not_retryable_fails(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=3)
    acquire(store, task.id, [worker.id])
    no_retry = Completion(status="error", error_message="bad prompt", retryable=False)
    out = complete(store, task.id, no_retry)
    assert out.task.status == "failed"
    assert out.task.lease_id is None and out.task.worker_id is None


def test_complete_error_out_of_attempts_fails(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=2)
    for i in range(2):
        acquire(store, task.id, [worker.id], now=T0 + 100_000 * i)
        out = complete(store, task.id, ERR, now=T0 + 100_000 * i + 10)
    assert out.task.attempts == 2
    assert out.task.status == "failed"
    assert [r.status for r in store.list_results(task.id, 10, None).items] == ["error", "error"]
    assert store.get_result(task.id) == out.result  # the latest


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - HOLDING_LEASE))
def test_complete_refused_without_a_lease(store: Store, status: str) -> None:
    task = in_state(store, status)
    error = assert_refused(
        store, lambda tx: tx.complete(task.id, Fence(), OK, new_id(), new_id(), delay, T0 + 50), Conflict
    )
    assert not isinstance(error, StaleLease)


def test_complete_unknown_task(store: Store) -> None:
    assert_refused(store, lambda tx: tx.complete("nope", Fence(), OK, new_id(), new_id(), delay, T0), NotFound)


def test_get_result_without_one_is_not_found(store: Store) -> None:
    task = add_task(store)
    with pytest.raises(NotFound):
        store.get_result(task.id)


# --- fail_lease --------------------------------------------------------------------


def test_fail_lease_requeues_with_attempts_left(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=2)
    acquire(store, task.id, [worker.id], lease_id="l-1")
    t, lease = store.run(lambda tx: tx.fail_lease("l-1", "connection refused", delay, T0 + 20))
    assert lease.id == "l-1" and lease.status == "failed"
    assert t.status == "queued" and t.not_before == T0 + 20 + delay(1)
    assert t.lease_id is None and t.worker_id is None
    assert store.get_lease("l-1") == lease and store.get_task(task.id) == t
    assert store.get_worker(worker.id).active_leases == 0


def test_fail_lease_out_of_attempts_fails_the_task(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=1)
    acquire(store, task.id, [worker.id], lease_id="l-1")
    t, lease = store.run(lambda tx: tx.fail_lease("l-1", "connection refused", delay, T0 + 20))
    assert lease.status == "failed"
    assert t.status == "failed" and t.lease_id is None


def test_fail_lease_that_never_reached_the_worker_gives_the_attempt_back(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=1)
    acquire(store, task.id, [worker.id], lease_id="l-1")
    t, lease = store.run(lambda tx: tx.fail_lease("l-1", "connection refused", delay, T0 + 20, refund=True))
    assert lease.status == "failed"
    assert (t.status, t.attempts, t.not_before) == ("queued", 0, T0 + 20 + delay(1))
    acquire(store, task.id, [worker.id], now=T0 + 20 + delay(1), lease_id="l-2")  # its one attempt is still there
    assert store.get_task(task.id).attempts == 1


@pytest.mark.parametrize("ended_by", ["complete", "expire", "fail", "cancel"])
def test_fail_lease_refused_when_lease_not_active(store: Store, ended_by: str) -> None:
    worker = add_worker(store)
    task = add_task(store)
    acquire(store, task.id, [worker.id], now=T0 + 1, ttl=1, lease_id="l-1")
    if ended_by == "complete":
        complete(store, task.id, OK, now=T0 + 2)
    elif ended_by == "expire":
        store.run(lambda tx: tx.expire_due(T0 + 5000, 10))
    elif ended_by == "fail":
        store.run(lambda tx: tx.fail_lease("l-1", "x", delay, T0 + 2))
    else:
        store.run(lambda tx: tx.cancel(task.id, T0 + 2))
    assert store.get_lease("l-1").status != "active"
    assert_refused(store, lambda tx: tx.fail_lease("l-1", "again", delay, T0 + 9000), Conflict)


def test_fail_lease_unknown(store: Store) -> None:
    assert_refused(store, lambda tx: tx.fail_lease("l-nope", "x", delay, T0), NotFound)


def test_fail_lease_with_refund_gives_the_attempt_back(store: Store) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=1)
    acquire(store, task.id, [worker.id], lease_id="l-1")
    assert store.get_task(task.id).attempts == 1
    # Its last attempt, but the dispatch never reached the worker: queued again, attempt unused.
    t, lease = store.run(lambda tx: tx.fail_lease("l-1", "connection refused", delay, T0 + 20, refund=True))
    assert lease.status == "failed"
    assert (t.status, t.attempts, t.not_before, t.lease_id) == ("queued", 0, T0 + 20 + delay(1), None)
    assert store.get_task(task.id) == t
    acquire(store, task.id, [worker.id], now=T0 + 20 + delay(1), lease_id="l-2")
    assert store.get_task(task.id).attempts == 1


# --- requeue and cancel --------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(REQUEUEABLE))
def test_requeue_resets_attempts(store: Store, status: str) -> None:
    task = in_state(store, status)
    assert task.attempts == 1
    t = store.run(lambda tx: tx.requeue(task.id, T0 + 5000))
    assert t.status == "queued" and t.attempts == 0 and t.not_before is None
    assert t.lease_id is None and t.worker_id is None and t.updated_at == T0 + 5000
    assert store.get_task(task.id) == t
    worker = add_worker(store)
    assert acquire(store, task.id, [worker.id], now=T0 + 6000).task.attempts == 1


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - REQUEUEABLE))
def test_requeue_refused(store: Store, status: str) -> None:
    task = in_state(store, status)
    assert_refused(store, lambda tx: tx.requeue(task.id, T0 + 50), Conflict)


def test_requeue_unknown(store: Store) -> None:
    assert_refused(store, lambda tx: tx.requeue("nope", T0), NotFound)


def test_cancel_queued(store: Store) -> None:
    task = add_task(store)
    t, lease = store.run(lambda tx: tx.cancel(task.id, T0 + 5))
    assert t.status == "cancelled" and t.updated_at == T0 + 5
    assert lease is None
    assert store.get_task(task.id) == t


@pytest.mark.parametrize("status", sorted(HOLDING_LEASE))
def test_cancel_releases_the_lease(store: Store, status: str) -> None:
    task = in_state(store, status)
    t, lease = store.run(lambda tx: tx.cancel(task.id, T0 + 50))
    assert t.status == "cancelled"
    assert lease is not None and lease.id == task.lease_id and lease.status == "released"
    assert store.get_lease(task.lease_id) == lease
    assert store.get_worker(task.worker_id).active_leases == 0
    assert store.sticky_workers(task.context_id) == set()


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - CANCELLABLE))
def test_cancel_refused(store: Store, status: str) -> None:
    task = in_state(store, status)
    assert_refused(store, lambda tx: tx.cancel(task.id, T0 + 50), Conflict)


def test_cancel_unknown(store: Store) -> None:
    assert_refused(store, lambda tx: tx.cancel("nope", T0), NotFound)


# --- expire_due ------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(HOLDING_LEASE))
def test_expire_due_requeues_with_attempts_left(store: Store, status: str) -> None:
    task = in_state(store, status)  # leased at T0 + 1 for TTL_S; running renewed at T0 + 2
    lease = store.get_lease(task.lease_id)
    assert store.run(lambda tx: tx.expire_due(lease.expires_at - 1, 10)) == []
    assert store.get_task(task.id) == task
    expired = store.run(lambda tx: tx.expire_due(lease.expires_at, 10))  # due at exactly expires_at
    assert len(expired) == 1
    assert expired[0].lease.id == lease.id and expired[0].lease.status == "expired"
    t = expired[0].task
    assert t.id == task.id and t.status == "queued"
    assert t.lease_id is None and t.worker_id is None and t.attempts == 1
    assert store.get_task(task.id) == t and store.get_lease(lease.id) == expired[0].lease
    assert store.get_worker(task.worker_id).active_leases == 0
    assert store.run(lambda tx: tx.expire_due(lease.expires_at + 10**9, 10)) == []


@pytest.mark.parametrize("status", sorted(HOLDING_LEASE))
def test_expire_due_kills_tasks_out_of_attempts(store: Store, status: str) -> None:
    worker = add_worker(store)
    task = add_task(store, max_attempts=1)
    acquire(store, task.id, [worker.id], now=T0, ttl=10)
    if status == "running":
        store.run(lambda tx: tx.heartbeat(task.id, Fence(), T0 + 1))
    [expiry] = store.run(lambda tx: tx.expire_due(T0 + 20_000, 10))
    assert expiry.task.status == "dead" and expiry.task.lease_id is None and expiry.task.worker_id is None
    assert expiry.lease.status == "expired"


def test_expire_due_honours_limit_and_leaves_the_rest(store: Store) -> None:
    worker = add_worker(store, max_concurrency=10)
    tasks = [add_task(store, now=T0 + i) for i in range(5)]
    for i, task in enumerate(tasks):
        acquire(store, task.id, [worker.id], now=T0 + 100 * i, ttl=1)
    first = store.run(lambda tx: tx.expire_due(T0 + 10_000, 2))
    assert len(first) == 2
    rest = store.run(lambda tx: tx.expire_due(T0 + 10_000, 10))
    assert len(rest) == 3
    assert {e.task.id for e in first + rest} == {t.id for t in tasks}
    # Oldest expiry first.
    assert {e.task.id for e in first} == {tasks[0].id, tasks[1].id}
    assert all(t.status == "queued" for t in store.list_tasks(None, 10, None).items)
    assert store.stats()["leases"]["expired"] == 5


# --- workers ------------------------------------------------------------------------


def test_upsert_worker_create_with_defaults(store: Store) -> None:
    """The first version's defaults; registering counts as being heard from."""
    worker, created = store.run(lambda tx: tx.upsert_worker(WorkerUpsert(id="w-1"), T0))
    assert created
    assert worker == Worker(
        id="w-1",
        node_id="w-1",
        url="",
        status="online",
        capabilities=Capabilities(),
        last_heartbeat=T0,
        ip_addrs=[],
        obs_count=0,
        db_sha="",
        registered_at=T0,
        active_leases=0,
        agent_version="unknown",
        os_info="",
        install_method="manual",
        source="api",
    )
    assert store.get_worker("w-1") == worker


def test_upsert_worker_update_changes_only_given_fields(store: Store) -> None:
    full = WorkerUpsert(
        id="w-1",
        node_id="node-a",
        url="http://10.0.0.1:8001",
        status="syncing",
        capabilities=Capabilities(claude_cli=True, max_concurrency=4, labels=["gpu"]),
        last_heartbeat=T0 - 5,
        ip_addrs=["10.0.0.1"],
        obs_count=7,
        db_sha="abc",
        agent_version="1.2",
        os_info="linux",
        install_method="pip",
        source="membridge",
    )
    _created_worker, created = store.run(lambda tx: tx.upsert_worker(full, T0))
    assert created
    updated, created = store.run(lambda tx: tx.upsert_worker(WorkerUpsert(id="w-1", url="http://10.0.0.2:8001"), T0 + 500))
    assert not created
    assert updated == Worker(
        id="w-1",
        node_id="node-a",
        url="http://10.0.0.2:8001",
        status="syncing",
        capabilities=Capabilities(claude_cli=True, max_concurrency=4, labels=["gpu"]),
        last_heartbeat=T0 - 5,
        ip_addrs=["10.0.0.1"],
        obs_count=7,
        db_sha="abc",
        registered_at=T0,
        active_leases=0,
        agent_version="1.2",
        os_info="linux",
        install_method="pip",
        source="membridge",
    )
    caps = Capabilities(claude_cli=False, max_concurrency=1, labels=[])
    again, _ = store.run(
        lambda tx: tx.upsert_worker(WorkerUpsert(id="w-1", status="online", capabilities=caps, obs_count=0), T0 + 600)
    )
    assert again.status == "online" and again.capabilities == caps and again.obs_count == 0
    assert again.registered_at == T0 and again.node_id == "node-a"
    assert store.get_worker("w-1") == again


def test_get_and_remove_worker(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_worker("w-nope")
    worker = add_worker(store, "w-1")
    task = add_task(store)
    grant = acquire(store, task.id, ["w-1"])
    removed = store.run(lambda tx: tx.remove_worker("w-1"))
    assert removed.id == "w-1" and removed.capabilities == worker.capabilities
    with pytest.raises(NotFound):
        store.get_worker("w-1")
    assert store.get_lease(grant.lease.id).status == "active"  # leases stay and expire normally
    assert_refused(store, lambda tx: tx.remove_worker("w-1"), NotFound)


def test_list_workers_ordered_by_id_with_counts(store: Store) -> None:
    add_worker(store, "w-c", max_concurrency=2)
    add_worker(store, "w-a", status="offline")
    add_worker(store, "w-b")
    acquire(store, add_task(store).id, ["w-c"])
    acquire(store, add_task(store).id, ["w-c"])
    workers = store.list_workers()
    assert [w.id for w in workers] == ["w-a", "w-b", "w-c"]
    assert [w.active_leases for w in workers] == [0, 0, 2]
    assert [w.id for w in store.list_workers("offline")] == ["w-a"]
    assert [w.id for w in store.list_workers("online")] == ["w-b", "w-c"]
    assert store.list_workers("error") == []


def test_worker_candidates(store: Store) -> None:
    add_worker(store, "w-ok", labels=("gpu", "eu"))
    add_worker(store, "w-plain")
    add_worker(store, "w-offline", labels=("gpu", "eu"), status="offline")
    add_worker(store, "w-no-cli", labels=("gpu", "eu"), claude_cli=False)
    add_worker(store, "w-full", labels=("gpu", "eu"))
    acquire(store, add_task(store).id, ["w-full"])
    assert {w.id for w in store.worker_candidates([])} == {"w-ok", "w-plain"}
    assert {w.id for w in store.worker_candidates(["gpu"])} == {"w-ok"}
    assert {w.id for w in store.worker_candidates(["eu", "gpu"])} == {"w-ok"}
    assert store.worker_candidates(["gpu", "us"]) == []
    [ok] = store.worker_candidates(["gpu"])
    assert ok == store.get_worker("w-ok")


def test_mark_stale_workers_offline_only_what_something_keeps_fresh(store: Store) -> None:
    add_worker(store, "w-api-old", source="api", last_heartbeat=T0 - 100_000)
    add_worker(store, "w-pull-old", source="pull", last_heartbeat=T0 - 100_000)
    # Registering counts as being heard from: silent since then, judged from then.
    add_worker(store, "w-mb-silent", source="membridge", now=T0 - 100_000)  # no heartbeat since registration
    add_worker(store, "w-mb-young", source="membridge", now=T0 - 1000)
    add_worker(store, "w-mb-unknown", source="membridge", status="unknown", now=T0 - 100_000)  # never heard from
    add_worker(store, "w-mb-old", source="membridge", status="syncing", last_heartbeat=T0 - 61_000)
    add_worker(store, "w-pull-fresh", source="pull", last_heartbeat=T0 - 1000)
    add_worker(store, "w-pull-edge", source="pull", last_heartbeat=T0 - 60_000)
    add_worker(store, "w-pull-offline", source="pull", status="offline", last_heartbeat=T0 - 100_000)
    add_worker(store, "w-push-vouched", source="api", url="http://10.0.0.1:8001", last_heartbeat=T0 - 100_000)
    add_worker(store, "w-push-moved", source="api", url="http://10.0.0.2:8001", last_heartbeat=T0 - 100_000)
    store.run(lambda tx: tx.vouch_worker_url("w-push-vouched", "http://10.0.0.1:8001", "root", T0))
    store.run(lambda tx: tx.vouch_worker_url("w-push-moved", "http://10.0.0.9:8001", "root", T0))  # not its URL now
    changed = store.run(lambda tx: tx.mark_stale_workers_offline(T0 - 60_000, T0))
    assert {w.id for w in changed} == {"w-pull-old", "w-mb-silent", "w-mb-old"}
    assert all(w.status == "offline" for w in changed)
    status = {w.id: w.status for w in store.list_workers()}
    assert status == {
        "w-api-old": "online",
        "w-pull-old": "offline",
        "w-mb-silent": "offline",
        "w-mb-young": "online",
        "w-mb-unknown": "unknown",  # unknown is not offline: no flapping between the two
        "w-mb-old": "offline",
        "w-pull-fresh": "online",
        "w-pull-edge": "online",  # not older than seen_before
        "w-pull-offline": "offline",
        "w-push-vouched": "online",
        "w-push-moved": "online",
    }
    assert store.run(lambda tx: tx.mark_stale_workers_offline(T0 - 60_000, T0)) == []
    # With probes on, a push worker whose URL is vouched for is kept fresh by them too.
    [vouched] = store.run(lambda tx: tx.mark_stale_workers_offline(T0 - 60_000, T0, vouched=True))
    assert vouched.id == "w-push-vouched"


def test_worker_liveness(store: Store) -> None:
    add_worker(store, "w-1", status="unknown")
    assert store.run(lambda tx: tx.worker_liveness("w-1", True, T0 + 5000)) == ("unknown", "online")
    assert store.get_worker("w-1").last_heartbeat == T0 + 5000
    assert store.run(lambda tx: tx.worker_liveness("w-1", True, T0 + 1000)) == ("online", "online")
    assert store.get_worker("w-1").last_heartbeat == T0 + 5000  # never moves back
    assert store.run(lambda tx: tx.worker_liveness("w-1", False, T0 + 9000)) == ("online", "offline")
    w = store.get_worker("w-1")
    assert (w.status, w.last_heartbeat) == ("offline", T0 + 5000)
    assert store.run(lambda tx: tx.worker_liveness("w-1", False, T0 + 9000)) == ("offline", "offline")
    assert store.run(lambda tx: tx.worker_liveness("nobody", True, T0)) is None


def test_touch_worker(store: Store) -> None:
    add_worker(store, "w-pull", source="pull", status="offline")
    add_worker(store, "w-mb", source="membridge", status="offline")
    add_worker(store, "w-api", source="api", status="offline")
    add_worker(store, "w-err", source="pull", status="error")
    for worker_id in ("w-pull", "w-mb", "w-api", "w-err"):
        store.run(lambda tx, worker_id=worker_id: tx.touch_worker(worker_id, T0 + 5))
    workers = {w.id: w for w in store.list_workers()}
    assert {w.last_heartbeat for w in workers.values()} == {T0 + 5}
    assert workers["w-pull"].status == "online"
    assert workers["w-mb"].status == "online"
    assert workers["w-api"].status == "offline"  # api workers keep what they were given
    assert workers["w-err"].status == "error"  # only offline comes back


def test_touch_unknown_worker_creates_nothing(store: Store) -> None:
    # The interface does not say whether this is NotFound or a no-op; either way nothing appears.
    try:
        store.run(lambda tx: tx.touch_worker("w-nope", T0))
    except NotFound:
        pass
    assert store.list_workers() == []


# --- pagination -------------------------------------------------------------------------


def _walk_check(fetch: Callable[[int, str | None], Any], expected_ids: list[str]) -> None:
    for limit in (1, 3, 4, len(expected_ids), len(expected_ids) + 1):
        got = [item.id for item in all_pages(fetch, limit)]
        assert got == expected_ids, f"limit {limit}"


def test_list_tasks_pages(store: Store) -> None:
    # Ties on created_at (three tasks per ms) must page by id without gaps or repeats.
    ids = []
    for i in range(14):
        ids.append(add_task(store, now=T0 + i // 3, task_id=f"t-{i:02d}").id)
    worker = add_worker(store, max_concurrency=20)
    for task_id in ids[:5]:
        acquire(store, task_id, [worker.id])
    by_key = {t.id: t for t in store.list_tasks(None, MAX_PAGE, None).items}
    newest_first = sorted(ids, key=lambda i: (by_key[i].created_at, i), reverse=True)
    _walk_check(lambda limit, cur: store.list_tasks(None, limit, cur), newest_first)
    leased = [i for i in newest_first if i in ids[:5]]
    _walk_check(lambda limit, cur: store.list_tasks("leased", limit, cur), leased)
    assert store.list_tasks("dead", 10, None) == store.list_tasks("dead", 10, None)
    assert store.list_tasks("dead", 10, None).items == []
    full = store.list_tasks(None, 14, None)
    assert len(full.items) == 14 and full.next_cursor is None


def test_list_leases_pages(store: Store) -> None:
    worker = add_worker(store, max_concurrency=20)
    lease_ids = []
    for i in range(9):
        task = add_task(store, now=T0 + i)
        lease_ids.append(acquire(store, task.id, [worker.id], now=T0 + 1000 + i // 2, lease_id=f"l-{i}").lease.id)
    complete(store, store.get_lease("l-0").task_id, OK)
    by_id = {lease.id: lease for lease in store.list_leases(None, MAX_PAGE, None).items}
    newest_first = sorted(lease_ids, key=lambda i: (by_id[i].started_at, i), reverse=True)
    _walk_check(lambda limit, cur: store.list_leases(None, limit, cur), newest_first)
    _walk_check(lambda limit, cur: store.list_leases("active", limit, cur), [i for i in newest_first if i != "l-0"])
    _walk_check(lambda limit, cur: store.list_leases("released", limit, cur), ["l-0"])


def test_list_artifacts_and_results_page(store: Store) -> None:
    worker = add_worker(store, max_concurrency=20)
    tasks = [add_task(store, now=T0 + i) for i in range(7)]
    for i, task in enumerate(tasks):
        acquire(store, task.id, [worker.id])
        store.run(
            lambda tx: tx.complete(task.id, Fence(), OK, f"r-{i}", f"a-{i}", delay, T0 + 100 + i // 2)  # noqa: B023
        )
    arts = store.list_artifacts(None, MAX_PAGE, None).items
    expected_a = [a.id for a in sorted(arts, key=lambda a: (a.created_at, a.id), reverse=True)]
    _walk_check(lambda limit, cur: store.list_artifacts(None, limit, cur), expected_a)
    res = store.list_results(None, MAX_PAGE, None).items
    expected_r = [r.id for r in sorted(res, key=lambda r: (r.completed_at, r.id), reverse=True)]
    _walk_check(lambda limit, cur: store.list_results(None, limit, cur), expected_r)
    assert [a.id for a in store.list_artifacts(tasks[3].id, 10, None).items] == ["a-3"]
    assert [r.id for r in store.list_results(tasks[3].id, 10, None).items] == ["r-3"]
    assert store.list_results("t-nope", 10, None).items == []


@pytest.mark.parametrize("cursor", ["garbage!", "", "bm90IGpzb24", "WzEsMiwzXQ", "WyJ4IiwieSJd", "A" * 600])
def test_malformed_cursor_is_invalid_input(store: Store, cursor: str) -> None:
    # "bm90IGpzb24" = "not json", "WzEsMiwzXQ" = [1,2,3], "WyJ4IiwieSJd" = ["x","y"]
    for call in (
        lambda: store.list_tasks(None, 10, cursor),
        lambda: store.list_tasks("queued", 10, cursor),
        lambda: store.list_leases(None, 10, cursor),
        lambda: store.list_artifacts(None, 10, cursor),
        lambda: store.list_results(None, 10, cursor),
        lambda: store.list_audit(10, cursor),
    ):
        with pytest.raises(InvalidInput):
            call()


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE + 1])
def test_limit_out_of_range_is_invalid_input(store: Store, limit: int) -> None:
    for call in (
        lambda: store.list_tasks(None, limit, None),
        lambda: store.list_leases(None, limit, None),
        lambda: store.list_artifacts(None, limit, None),
        lambda: store.list_results(None, limit, None),
        lambda: store.list_audit(limit, None),
    ):
        with pytest.raises(InvalidInput):
            call()


def test_rows_beyond_todays_request_limits_still_load(store: Store, execute_raw: Callable[[str], None]) -> None:
    # Request limits (timeout_sec <= 3600, max_concurrency <= 32, label syntax) apply to
    # input; rows written by the first version or before a limit changed must still read.
    add_worker(store, "w-old")
    task = add_task(store, task_id="t-old")
    execute_raw("UPDATE llm_tasks SET policy = '{\"timeout_sec\": 7200}' WHERE id = 't-old'")
    execute_raw(
        "UPDATE workers SET capabilities = '{\"max_concurrency\": 64, \"labels\": [\"has space\"]}' WHERE id = 'w-old'"
    )
    assert store.get_task(task.id).policy == Policy(timeout_sec=7200, budget=0)
    assert store.get_worker("w-old").capabilities == Capabilities(max_concurrency=64, labels=["has space"])
    grant = store.run(lambda tx: tx.claim_next("w-old", None, new_id(), T0 + 1))
    assert grant is not None and grant.lease.ttl_seconds == 7230


# --- audit, settings, stats --------------------------------------------------------------


def test_audit_insert_list_and_page(store: Store) -> None:
    entries = [
        AuditEntry(
            id=f"e-{i:02d}",
            timestamp=T0 + i // 2,
            action="task.created" if i % 2 else "lease.granted",
            entity_type="task",
            entity_id="t-1" if i < 5 else "t-2",
            actor="api",
            detail=None if i % 3 else f"detail {i}",
        )
        for i in range(11)
    ]
    store.run(lambda tx: tx.insert_audit(entries))
    store.run(lambda tx: tx.insert_audit([]))
    newest_first = sorted(entries, key=lambda e: (e.timestamp, e.id), reverse=True)
    assert store.list_audit(MAX_PAGE, None).items == newest_first
    _walk_check(lambda limit, cur: store.list_audit(limit, cur), [e.id for e in newest_first])
    t1 = [e.id for e in newest_first if e.entity_id == "t-1"]
    _walk_check(lambda limit, cur: store.list_audit(limit, cur, entity_id="t-1"), t1)
    assert store.list_audit(10, None, entity_id="t-none").items == []


def test_settings(store: Store) -> None:
    assert store.get_settings() == {}
    store.run(lambda tx: tx.set_settings({"membridge_url": "http://mb:8000", "admin_key": "s3cret"}))
    store.run(lambda tx: tx.set_settings({}))
    assert store.get_settings() == {"membridge_url": "http://mb:8000", "admin_key": "s3cret"}
    store.run(lambda tx: tx.set_settings({"membridge_url": "http://mb:9000"}))
    assert store.get_settings() == {"membridge_url": "http://mb:9000", "admin_key": "s3cret"}


def test_add_settings_if_absent_keeps_what_is_set(store: Store) -> None:
    store.run(lambda tx: tx.set_settings({"a": "1"}))
    store.run(lambda tx: tx.add_settings_if_absent({"a": "2", "b": "3"}, T0))
    store.run(lambda tx: tx.add_settings_if_absent({"b": "4"}, T0))
    store.run(lambda tx: tx.add_settings_if_absent({}, T0))
    assert store.get_settings() == {"a": "1", "b": "3"}


def test_settings_written_first_in_a_transaction_roll_back_with_it(store: Store) -> None:
    """A transaction's first statement must not run (and commit) on its own."""
    with pytest.raises(NotFound):
        with store.transaction() as tx:
            tx.set_settings({"membridge_url": "http://mb:8000"})
            tx.touch_worker("nobody", T0)
    assert store.get_settings() == {}


def test_audit_entries_larger_than_one_message_commit_together(store: Store) -> None:
    """PostgreSQL sends the entries and COMMIT in one message when they fit; these do
    not (10 MiB), and a failure must still leave none of them."""
    entries = [AuditEntry(id=f"a-{n:05d}", timestamp=T0, action="probe", entity_type="test", entity_id="e",
                          actor="test", detail="x" * 1024) for n in range(10 * 1024)]
    with store.transaction() as tx:
        tx.insert_audit(entries)
        tx.notify = True  # a second statement after the entries
    assert store.list_audit(1, None).items[0].id == "a-10239"
    more = [msgspec.structs.replace(e, id=f"b-{n:05d}", entity_id="f") for n, e in enumerate(entries)]
    with pytest.raises(StoreUnavailable):
        with store.transaction() as tx:
            tx.insert_audit([*more, entries[0]])  # a used id fails the insert
            tx.notify = True
    assert store.list_audit(MAX_PAGE, None, entity_id="f").items == []


def test_stats_every_status_present(store: Store) -> None:
    empty = store.stats()
    assert empty == {
        "tasks": dict.fromkeys(TASK_STATUSES, 0),
        "leases": dict.fromkeys(LEASE_STATUSES, 0),
        "workers": dict.fromkeys(WORKER_STATUSES, 0),
    }
    for status in ALL_STATUSES:
        in_state(store, status)
    add_worker(store, status="error")
    stats = store.stats()
    assert stats["tasks"] == dict.fromkeys(TASK_STATUSES, 1)
    # Leases: leased, running -> active; completed, failed -> released; dead -> expired.
    assert stats["leases"] == {"active": 2, "released": 2, "expired": 1, "failed": 0}
    assert stats["workers"] == {**dict.fromkeys(WORKER_STATUSES, 0), "online": 7, "error": 1}


# --- SQLite only: opening and thread safety -----------------------------------------------


def test_sqlite_open_missing_directory(tmp_path) -> None:
    from bloom_runtime.sql.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "no-such-dir" / "bloom.db"))
    with pytest.raises(StoreUnavailable) as info:
        store.open()
    assert "does not exist" in str(info.value) and "\n" not in str(info.value)
    store.close()


def test_sqlite_open_file_that_is_not_a_database(tmp_path) -> None:
    from bloom_runtime.sql.sqlite import SqliteStore

    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a database\n" * 200)
    store = SqliteStore(str(path))
    with pytest.raises(StoreUnavailable) as info:
        store.open()
    assert "not a SQLite database" in str(info.value) and "\n" not in str(info.value)
    store.close()


def test_sqlite_wal_and_pending_migrations(tmp_path) -> None:
    from bloom_runtime.sql.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "fresh.db"))
    store.open()
    try:
        with pytest.raises(StoreUnavailable, match="pending migrations"):
            store.check_schema()
        shipped = [m.version for m in migrations.available("sqlite")]
        assert shipped[:4] == ["0001_initial", "0002_fewer_index_entries", "0003_dispatch", "0004_console_reads"]
        assert store.migrate() == shipped
        store.check_schema()
    finally:
        store.close()
    conn = sqlite3.connect(str(tmp_path / "fresh.db"))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_sqlite_close_is_idempotent_and_final(sqlite_store: Store) -> None:
    errors: list[BaseException] = []

    def read() -> None:
        try:
            sqlite_store.list_tasks(None, 10, None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    sqlite_store.close()
    sqlite_store.close()
    with pytest.raises(StoreUnavailable):
        sqlite_store.get_task("x")
    with pytest.raises(StoreUnavailable):
        with sqlite_store.transaction():
            pass


def test_sqlite_locked_database_is_transient(sqlite_store: Store) -> None:
    from bloom_runtime.sql.sqlite import SqliteStore

    # Another process holds the write lock past our (shrunk) busy timeout.
    store = SqliteStore(sqlite_store.path, busy_timeout_s=0.0)  # type: ignore[attr-defined]
    store.open()
    other = sqlite3.connect(sqlite_store.path, isolation_level=None)  # type: ignore[attr-defined]
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(TransientConflict) as info:
            with store.transaction():
                pass
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        other.execute("ROLLBACK")
        with store.transaction() as tx:
            tx.set_settings({"a": "b"})
        assert store.get_settings() == {"a": "b"}
    finally:
        other.close()
        store.close()


# --- push dispatch ---------------------------------------------------------------------


def delivery(task_id: str, lease_id: str, deadline_at: int = T0 + 10_000, **kw: Any) -> Delivery:
    values: dict[str, Any] = {"id": new_id(), "task_id": task_id, "lease_id": lease_id, "worker_id": "w-1",
                              "url": "http://10.0.0.1:8001", "state": "sent", "agent_status": None, "detail": None,
                              "actor": "api", "created_at": T0, "deadline_at": deadline_at, "finished_at": None}
    values.update(kw)
    return Delivery(**values)


def test_deliveries(store: Store) -> None:
    assert store.latest_delivery("t-1") is None
    first = delivery("t-1", "l-1")
    second = delivery("t-1", "l-2", created_at=T0 + 5)
    other = delivery("t-2", "l-3", deadline_at=T0 + 1)
    store.run(lambda tx: [tx.insert_delivery(d) for d in (first, second, other)])
    assert store.latest_delivery("t-1") == second
    done = store.run(lambda tx: tx.finish_delivery(second.id, "agent_error", 200, "claude failed", T0 + 50))
    assert done == msgspec.structs.replace(second, state="agent_error", agent_status=200, detail="claude failed",
                                           finished_at=T0 + 50)
    assert store.latest_delivery("t-1") == done
    # An outcome is recorded once.
    assert store.run(lambda tx: tx.finish_delivery(second.id, "answered", 200, None, T0 + 60)) is None
    assert store.latest_delivery("t-1") == done
    with pytest.raises(StoreUnavailable):  # one delivery per lease
        store.run(lambda tx: tx.insert_delivery(delivery("t-1", "l-1")))
    # Sent and past their deadline: unknown.
    expired = store.run(lambda tx: tx.expire_deliveries(T0 + 2, "no answer recorded", 10))
    assert [(d.id, d.state, d.detail, d.finished_at) for d in expired] == [(other.id, "unknown", "no answer recorded", T0 + 2)]
    assert store.run(lambda tx: tx.expire_deliveries(T0 + 20_000, "x", 10))[0].id == first.id
    assert store.run(lambda tx: tx.expire_deliveries(T0 + 20_000, "x", 10)) == []


def test_worker_trust(store: Store) -> None:
    assert store.worker_trust() == {}
    store.run(lambda tx: tx.vouch_worker_url("w-1", "http://10.0.0.1:8001", "root", T0))
    store.run(lambda tx: tx.vouch_worker_url("w-2", "http://10.0.0.2:8001", "membridge-sync", T0))
    store.run(lambda tx: tx.vouch_worker_url("w-1", "http://10.0.0.7:8001", "membridge-sync", T0 + 1))
    assert store.worker_trust() == {"w-1": "http://10.0.0.7:8001", "w-2": "http://10.0.0.2:8001"}
    assert store.run(lambda tx: tx.forget_worker_url("w-2")) == "http://10.0.0.2:8001"
    assert store.run(lambda tx: tx.forget_worker_url("w-nobody")) is None
    assert store.worker_trust() == {"w-1": "http://10.0.0.7:8001"}


def test_due_tasks_oldest_first_and_only_leasable_now(store: Store) -> None:
    worker = add_worker(store, max_concurrency=10)
    old = add_task(store, now=T0, task_id="t-old")
    waiting = add_task(store, now=T0 + 1, task_id="t-waiting")
    leased = add_task(store, now=T0 + 2, task_id="t-leased")
    new = add_task(store, now=T0 + 3, task_id="t-new")
    acquire(store, waiting.id, [worker.id], now=T0 + 5, lease_id="l-w")
    store.run(lambda tx: tx.fail_lease("l-w", "x", delay, T0 + 6))  # queued, not before T0 + 6 + 1000
    acquire(store, leased.id, [worker.id], now=T0 + 7)
    assert [t.id for t in store.due_tasks(T0 + 100, 10)] == [old.id, new.id]
    assert [t.id for t in store.due_tasks(T0 + 6 + delay(1), 10)] == [old.id, waiting.id, new.id]
    assert [t.id for t in store.due_tasks(T0 + 6 + delay(1), 2)] == [old.id, waiting.id]
