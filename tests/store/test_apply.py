"""``Transaction.apply`` of a batch against the same operations one at a time, on both stores.

A batch must answer each operation exactly as a batch of one would if the list ran
in order in one transaction. Each scenario therefore runs twice on identically
prepared databases (fixed ids, explicit times): first each operation as a batch of
its own (the reference), then the whole list as one batch (PostgreSQL: one set
statement per kind, where rows of one statement cannot see each other). The
answers must match position by position, and every table must end the same. On
SQLite a batch is the loop over its operations, so there the scenarios check the
expected outcomes more than the store against itself.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import psycopg
import pytest

from bloom_runtime.engine.errors import BloomError, Conflict, InvalidInput, NoCapacity, NotFound, StaleLease, StoreUnavailable
from bloom_runtime.engine.models import (
    AuditEntry,
    Completion,
    CompletionOutcome,
    Fence,
    LeaseGrant,
    Policy,
    WorkerUpsert,
    new_id,
)
from bloom_runtime.sql.store import (
    MAX_PAGE,
    AcquireOp,
    CancelOp,
    ClaimOp,
    CompleteOp,
    CreateOp,
    ExpireOp,
    FailOp,
    HeartbeatOp,
    Op,
    RequeueOp,
    Store,
)

from ..conftest import TABLES, run_together, truncate_pg
from .test_contract import OK, T0, acquire, add_task, add_worker, delay, new_task, snapshot

NOW = T0 + 60_000  # when every batch runs: well after the setup, so worker heartbeats are stale
LEASE_TTL = 600  # setup leases outlive NOW
ERR_RETRY = Completion(status="error", error_message="try again", retryable=True)
ERR_FINAL = Completion(status="error", error_message="no good", retryable=False)
NO_FENCE = Fence()

Setup = Callable[[Store], None]


# --- harness -------------------------------------------------------------------


class Db:
    """The database behind ``store``, reached directly: to empty it and to check invariants."""

    def __init__(self, store: Store, pg_url: str | None) -> None:
        self.store = store
        self.pg_url = pg_url

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        if self.pg_url is None:
            conn = sqlite3.connect(self.store.path)  # type: ignore[attr-defined]
            try:
                return conn.execute(query).fetchall()
            finally:
                conn.close()
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return conn.execute(query).fetchall()

    def wipe(self) -> None:
        """Empty every table, so the second run of a scenario starts where the first did."""
        if self.pg_url is not None:
            truncate_pg(self.pg_url)
            return
        conn = sqlite3.connect(self.store.path)  # type: ignore[attr-defined]
        try:
            with conn:
                for table in TABLES:
                    conn.execute(f"DELETE FROM {table}")  # names are ours, not input
        finally:
            conn.close()


@pytest.fixture
def db(store: Store, request: pytest.FixtureRequest) -> Db:
    return Db(store, request.getfixturevalue("pg_url") if store.kind == "postgresql" else None)


def describe(op: Op) -> str:
    """A short name for an operation in assertion messages (prompts may be megabytes)."""
    name = op.task_id if not isinstance(op, CreateOp) else f"{op.task_id}, key={op.new.idempotency_key}"
    return f"{type(op).__name__}({name})"


def differences(expected: Any, got: Any, path: str = "") -> list[str]:
    """Where ``got`` differs from ``expected``, field by field. Refusals compare on class,
    message and details; values on every field."""
    if type(got) is not type(expected):
        return [f"{path or 'answer'}: expected {expected!r:.200}, got {got!r:.200}"]
    if isinstance(expected, BloomError):
        if (got.message, got.details) != (expected.message, expected.details):
            return [f"{path or 'refusal'}: expected {expected.to_dict()}, got {got.to_dict()}"]
        return []
    if isinstance(expected, msgspec.Struct):
        return [
            d for f in expected.__struct_fields__
            for d in differences(getattr(expected, f), getattr(got, f), f"{path}.{f}" if path else f)
        ]
    if isinstance(expected, tuple) and len(expected) == len(got):
        return [d for n, (e, g) in enumerate(zip(expected, got, strict=False)) for d in differences(e, g, f"{path}[{n}]")]
    return [] if got == expected else [f"{path}: expected {expected!r:.200}, got {got!r:.200}"]


def assert_invariants(db: Db) -> None:
    """The lease invariants the set statements must keep, whatever a batch holds."""
    two_active = db.sql(
        "SELECT task_id FROM leases WHERE status = 'active' GROUP BY task_id HAVING COUNT(*) > 1"
    )
    assert two_active == [], f"tasks with several active leases: {two_active}"
    held_wrong = db.sql(
        "SELECT t.id FROM llm_tasks t WHERE t.status IN ('leased', 'running') AND "
        "((SELECT COUNT(*) FROM leases l WHERE l.task_id = t.id AND l.status = 'active') <> 1 OR "
        " NOT EXISTS (SELECT 1 FROM leases l WHERE l.id = t.lease_id AND l.task_id = t.id "
        "             AND l.status = 'active' AND l.worker_id = t.worker_id))"
    )
    assert held_wrong == [], f"leased/running tasks without exactly their one active lease: {held_wrong}"
    orphans = db.sql(
        "SELECT l.id FROM leases l JOIN llm_tasks t ON t.id = l.task_id WHERE l.status = 'active' "
        "AND (t.status NOT IN ('leased', 'running') OR t.lease_id IS NULL OR t.lease_id <> l.id)"
    )
    assert orphans == [], f"active leases their task does not hold: {orphans}"
    assert db.sql("SELECT id FROM llm_tasks WHERE attempts > max_attempts") == []
    over = [w.id for w in db.store.list_workers() if w.active_leases > w.capabilities.max_concurrency]
    assert over == [], f"workers over capacity: {over}"


def run_apply(
    store: Store, ops: Sequence[Op], now: int, reference: bool, begun: bool, order: Sequence[int] | None = None
) -> list[Any]:
    with store.transaction() as tx:
        if begun:  # a statement first: PostgreSQL then cannot send BEGIN with the batch
            tx.upsert_worker(WorkerUpsert(id="w-bystander"), now)
        if not reference:
            return tx.apply(ops, now)
        out: list[Any] = [None] * len(ops)
        for i in order if order is not None else range(len(ops)):
            out[i] = tx.apply([ops[i]], now)[0]  # a batch of one
        return out


def check_apply(
    db: Db, setup: Setup, ops: Sequence[Op], now: int = NOW, begun: bool = False, order: Sequence[int] | None = None
) -> list[Any]:
    """Run ``ops`` in one ``apply`` and in the reference loop on equal databases; assert
    they answer and write the same. The reference applies them in list order, or in
    ``order`` (positions) where the store documents an order of its own. Returns the
    store's answers, its database left as the store's ``apply`` wrote it."""
    store = db.store
    db.wipe()
    setup(store)
    expected = run_apply(store, ops, now, reference=True, begun=begun, order=order)
    expected_state = snapshot(store)
    assert_invariants(db)

    db.wipe()
    setup(store)
    got = run_apply(store, ops, now, reference=False, begun=begun)
    got_state = snapshot(store)

    assert len(got) == len(ops)
    wrong = [f"#{i} {describe(op)} {d}" for i, op in enumerate(ops) for d in differences(expected[i], got[i])]
    assert not wrong, "apply answered unlike the one-by-one methods:\n" + "\n".join(wrong)
    for table in expected_state:
        assert got_state[table] == expected_state[table], f"{table} differ from the one-by-one run"
    assert_invariants(db)
    return got


def hold(store: Store, task_id: str, worker_id: str, lease_id: str, now: int = T0 + 1, **task: Any) -> None:
    """A task leased to ``worker_id`` under ``lease_id``."""
    add_task(store, task_id=task_id, **task)
    acquire(store, task_id, [worker_id], now=now, ttl=LEASE_TTL, lease_id=lease_id)


def fail_once(store: Store, task_id: str, retry_after_ms: int, now: int = T0 + 2) -> None:
    """Use one attempt of a leased task on a retryable error; it waits ``retry_after_ms``."""
    store.run(
        lambda tx: tx.complete(
            task_id, Fence(), ERR_RETRY, f"r-setup-{task_id}", f"a-setup-{task_id}", lambda a: retry_after_ms, now
        )
    )


def complete_op(task_id: str, completion: Completion, fence: Fence = NO_FENCE, n: int = 0) -> CompleteOp:
    return CompleteOp(task_id, fence, completion, f"r-{task_id}-{n}", f"a-{task_id}-{n}", delay)


def expect_refusal(answer: Any, error: type[BloomError]) -> None:
    assert type(answer) is error, answer


# --- 1. a mixed batch ------------------------------------------------------------


def mixed_setup(store: Store) -> None:
    add_worker(store, "w-a", max_concurrency=1)
    add_worker(store, "w-b", max_concurrency=2)
    add_worker(store, "w-c", max_concurrency=20)
    add_task(store, task_id="t-existing", idempotency_key="key-old")
    for tid in ("t-q1", "t-q3", "t-q4", "t-q5", "t-q6", "t-q7", "t-q8", "t-q9", "t-q10"):
        add_task(store, task_id=tid)
    add_task(store, task_id="t-q2", policy=Policy(timeout_sec=100))
    hold(store, "t-leased", "w-c", "l-leased")
    hold(store, "t-backoff", "w-c", "l-backoff")
    fail_once(store, "t-backoff", retry_after_ms=10**9)  # queued, not before far ahead
    for tid in ("t-h1", "t-h2", "t-h3", "t-h4", "t-k1", "t-k3", "t-k5"):
        hold(store, tid, "w-c", "l-" + tid[2:])
    hold(store, "t-k4", "w-c", "l-k4", max_attempts=1)
    # t-k2 on its second attempt: a retry waits delay(2).
    hold(store, "t-k2", "w-c", "l-k2-first")
    fail_once(store, "t-k2", retry_after_ms=0)
    acquire(store, "t-k2", ["w-c"], now=T0 + 3, ttl=LEASE_TTL, lease_id="l-k2")


MIXED_OPS: list[Op] = [
    CreateOp(new_task(prompt="fresh"), "t-new-1"),
    CreateOp(new_task(prompt="again", idempotency_key="key-old"), "t-new-2"),
    CreateOp(new_task(prompt="first of two", idempotency_key="key-new"), "t-new-3"),
    CreateOp(new_task(prompt="second of two", idempotency_key="key-new"), "t-new-4"),
    AcquireOp("t-q1", ("w-c",), 60, "l-a1"),
    AcquireOp("t-q2", ("w-c",), None, "l-a2"),
    AcquireOp("t-missing", ("w-c",), 60, "l-a3"),
    AcquireOp("t-q3", ("w-nobody",), 60, "l-a4"),
    AcquireOp("t-leased", ("w-c",), 60, "l-a5"),
    AcquireOp("t-backoff", ("w-c",), 60, "l-a6"),
    AcquireOp("t-q4", ("w-a",), 60, "l-a7"),
    AcquireOp("t-q5", ("w-a",), 60, "l-a8"),
    AcquireOp("t-q6", ("w-b",), 60, "l-a9"),
    AcquireOp("t-q7", ("w-b",), 60, "l-a10"),
    AcquireOp("t-q8", ("w-b",), 60, "l-a11"),
    AcquireOp("t-q9", ("w-c",), 0, "l-a12"),
    HeartbeatOp("t-h1", Fence(lease_id="l-h1")),
    HeartbeatOp("t-h2", Fence()),
    HeartbeatOp("t-h3", Fence(lease_id="l-bogus")),
    HeartbeatOp("t-h4", Fence(worker_id="w-a")),
    HeartbeatOp("t-q10", Fence()),
    HeartbeatOp("t-missing2", Fence()),
    complete_op("t-k1", Completion(status="success", output="done", metrics={"tokens": 3}), Fence(lease_id="l-k1")),
    complete_op("t-k2", ERR_RETRY),
    complete_op("t-k3", ERR_FINAL),
    complete_op("t-k4", ERR_RETRY),
    complete_op("t-k5", OK, Fence(lease_id="l-k1")),
    complete_op("t-missing3", OK),
]


@pytest.mark.parametrize("begun", [False, True], ids=["fresh-tx", "begun-tx"])
def test_mixed_batch_answers_like_the_single_methods(db: Db, begun: bool) -> None:
    """Every outcome each kind of operation can have, in one batch."""
    out = dict(zip((describe(op) for op in MIXED_OPS), check_apply(db, mixed_setup, MIXED_OPS, begun=begun), strict=False))
    store = db.store

    created, was_new = out["CreateOp(t-new-1, key=None)"]
    assert (created.id, created.status, created.prompt, was_new) == ("t-new-1", "queued", "fresh", True)
    existing, was_new = out["CreateOp(t-new-2, key=key-old)"]
    assert (existing.id, existing.status, was_new) == ("t-existing", "queued", False)
    first, was_new = out["CreateOp(t-new-3, key=key-new)"]
    assert (first.id, first.prompt, was_new) == ("t-new-3", "first of two", True)
    again, was_new = out["CreateOp(t-new-4, key=key-new)"]
    assert (again, was_new) == (first, False)

    grant = out["AcquireOp(t-q1)"]
    assert isinstance(grant, LeaseGrant)
    assert (grant.task.status, grant.task.attempts, grant.task.lease_id, grant.task.worker_id) == (
        "leased", 1, "l-a1", "w-c"
    )
    assert (grant.lease.status, grant.lease.expires_at, grant.worker.id) == ("active", NOW + 60_000, "w-c")
    default_ttl = out["AcquireOp(t-q2)"]
    assert (default_ttl.lease.ttl_seconds, default_ttl.lease.expires_at) == (130, NOW + 130_000)
    expect_refusal(out["AcquireOp(t-missing)"], NotFound)
    expect_refusal(out["AcquireOp(t-q3)"], NotFound)
    expect_refusal(out["AcquireOp(t-leased)"], Conflict)
    expect_refusal(out["AcquireOp(t-backoff)"], Conflict)
    assert out["AcquireOp(t-q4)"].worker.active_leases == 1
    expect_refusal(out["AcquireOp(t-q5)"], NoCapacity)
    assert [out[f"AcquireOp(t-q{n})"].worker.active_leases for n in (6, 7)] == [1, 2]
    expect_refusal(out["AcquireOp(t-q8)"], NoCapacity)
    expect_refusal(out["AcquireOp(t-q9)"], InvalidInput)

    for tid in ("t-h1", "t-h2"):
        task, lease = out[f"HeartbeatOp({tid})"]
        assert (task.status, lease.id, lease.expires_at, lease.last_heartbeat) == (
            "running", "l-" + tid[2:], NOW + LEASE_TTL * 1000, NOW
        )
    expect_refusal(out["HeartbeatOp(t-h3)"], StaleLease)
    expect_refusal(out["HeartbeatOp(t-h4)"], StaleLease)
    expect_refusal(out["HeartbeatOp(t-q10)"], Conflict)
    expect_refusal(out["HeartbeatOp(t-missing2)"], NotFound)

    done = out["CompleteOp(t-k1)"]
    assert isinstance(done, CompletionOutcome)
    assert (done.task.status, done.task.lease_id, done.task.worker_id) == ("completed", "l-k1", "w-c")
    assert (done.lease.status, done.result.output, done.result.metrics, done.artifact.content) == (
        "released", "done", {"tokens": 3}, "done"
    )
    retry = out["CompleteOp(t-k2)"].task
    assert (retry.status, retry.attempts, retry.not_before, retry.lease_id, retry.worker_id) == (
        "queued", 2, NOW + delay(2), None, None
    )
    assert out["CompleteOp(t-k3)"].task.status == "failed"
    assert out["CompleteOp(t-k4)"].task.status == "failed"  # its one attempt is used
    expect_refusal(out["CompleteOp(t-k5)"], StaleLease)
    expect_refusal(out["CompleteOp(t-missing3)"], NotFound)

    assert store.get_worker("w-a").active_leases == 1
    assert store.get_worker("w-b").active_leases == 2
    assert store.get_task("t-k5").status == "leased"  # refused: untouched
    assert store.get_task("t-q9").status == "queued"


# --- 1b. every other kind of change in one batch -------------------------------------


def kinds_setup(store: Store) -> None:
    add_worker(store, "w-c", max_concurrency=20)
    add_worker(store, "w-p", max_concurrency=3, labels=("gpu",))
    hold(store, "t-p-held", "w-p", "l-p-held")  # w-p has room for two more
    add_task(store, task_id="t-c0", labels=["tpu"])  # oldest, but not for w-p
    for tid in ("t-c1", "t-c2", "t-c3"):
        add_task(store, task_id=tid, labels=["gpu"] if tid == "t-c2" else [])
    add_task(store, task_id="t-cancel-q")
    hold(store, "t-cancel-l", "w-c", "l-cancel-l")
    for tid, done in (("t-done", OK), ("t-failed", ERR_FINAL)):
        hold(store, tid, "w-c", "l-" + tid[2:], max_attempts=1)
        store.run(lambda tx, tid=tid, done=done: tx.complete(tid, Fence(), done, f"r-setup-{tid}", f"a-setup-{tid}", delay, T0 + 2))
    hold(store, "t-fail", "w-c", "l-fail")
    hold(store, "t-fail-last", "w-c", "l-fail-last", max_attempts=1)
    add_task(store, task_id="t-expire")
    acquire(store, "t-expire", ["w-c"], now=T0 + 1, ttl=1, lease_id="l-expire")


KIND_OPS: list[Op] = [
    ClaimOp("w-p", 3, 60, ("lc-1", "lc-2", "lc-3")),
    ClaimOp("w-nobody", 1, None, ("lc-x",)),
    ClaimOp("w-c", 1, 0, ("lc-y",)),
    CancelOp("t-cancel-q"),
    CancelOp("t-cancel-l"),
    CancelOp("t-done"),
    CancelOp("t-missing"),
    RequeueOp("t-failed"),
    RequeueOp("t-c3"),
    RequeueOp("t-missing2"),
    FailOp("l-fail", "agent unreachable", delay),
    FailOp("l-fail-last", "agent unreachable", delay),
    FailOp("l-done", "too late", delay),
    FailOp("l-bogus", "no such lease", delay),
    ExpireOp(100),
]


def test_claims_cancels_requeues_fails_and_the_sweep_answer_like_the_single_methods(db: Db) -> None:
    out = check_apply(db, kinds_setup, KIND_OPS)
    grants = out[0]
    assert [g.task.id for g in grants] == ["t-c1", "t-c2"]  # up to its free capacity, oldest first, labels fit
    assert [(g.lease.id, g.lease.ttl_seconds, g.worker.active_leases) for g in grants] == [("lc-1", 60, 2), ("lc-2", 60, 3)]
    expect_refusal(out[1], NotFound)
    expect_refusal(out[2], InvalidInput)
    assert out[3][0].status == "cancelled" and out[3][1] is None
    assert out[4][0].status == "cancelled" and out[4][1].id == "l-cancel-l" and out[4][1].status == "released"
    expect_refusal(out[5], Conflict)
    expect_refusal(out[6], NotFound)
    assert (out[7].status, out[7].attempts) == ("queued", 0)
    expect_refusal(out[8], Conflict)
    expect_refusal(out[9], NotFound)
    task, lease = out[10]
    assert (task.status, task.not_before, lease.status) == ("queued", NOW + delay(1), "failed")
    assert out[11][0].status == "failed"
    expect_refusal(out[12], Conflict)
    expect_refusal(out[13], NotFound)
    assert [(e.lease.id, e.task.status) for e in out[14]] == [("l-expire", "queued")]
    worker = db.store.get_worker("w-p")
    assert (worker.status, worker.source, worker.last_heartbeat) == ("online", "pull", NOW)


def claimers_setup(store: Store) -> None:
    for wid in ("w-1", "w-2"):
        add_worker(store, wid, max_concurrency=3)
    for n in range(5):
        add_task(store, task_id=f"t-{n}")


def test_claims_of_several_workers_in_one_batch_take_different_tasks(db: Db) -> None:
    ops = [ClaimOp("w-1", 3, 60, ("l-1a", "l-1b", "l-1c")), ClaimOp("w-2", 3, 60, ("l-2a", "l-2b", "l-2c")),
           ClaimOp("w-1", 1, 60, ("l-1d",))]
    first, second, third = check_apply(db, claimers_setup, ops)
    assert [g.task.id for g in first] == ["t-0", "t-1", "t-2"]
    assert [g.task.id for g in second] == ["t-3", "t-4"]
    assert third == []  # w-1 is full


# --- 2. the same task more than once in a batch -----------------------------------


def one_worker_setup(store: Store) -> None:
    add_worker(store, "w-c", max_concurrency=20)
    add_task(store, task_id="t-q")
    hold(store, "t-held", "w-c", "l-held")


def test_acquire_then_heartbeat_sees_the_new_lease(db: Db) -> None:
    """The heartbeat runs after the acquire that made its lease."""
    ops = [AcquireOp("t-q", ("w-c",), 60, "l-new"), HeartbeatOp("t-q", Fence(lease_id="l-new"))]
    grant, (task, lease) = check_apply(db, one_worker_setup, ops)
    assert grant.lease.id == "l-new"
    assert (task.status, task.lease_id, lease.id, lease.expires_at) == ("running", "l-new", "l-new", NOW + 60_000)


def test_heartbeat_then_complete_of_one_task(db: Db) -> None:
    ops = [HeartbeatOp("t-held", Fence(lease_id="l-held")), complete_op("t-held", OK, Fence(lease_id="l-held"))]
    (task, _), done = check_apply(db, one_worker_setup, ops)
    assert task.status == "running"
    assert (done.task.status, done.lease.status, done.lease.id) == ("completed", "released", "l-held")


def test_complete_then_acquire_of_one_task_meets_the_backoff(db: Db) -> None:
    """A retry requeued earlier in the batch waits for its backoff; with none it is leased again."""
    no_wait = CompleteOp("t-held", Fence(), ERR_RETRY, "r-1", "a-1", lambda attempts: 0)
    ops = [no_wait, AcquireOp("t-held", ("w-c",), 60, "l-again"), complete_op("t-held", ERR_RETRY, n=2),
           AcquireOp("t-held", ("w-c",), 60, "l-late")]
    first, grant, second, late = check_apply(db, one_worker_setup, ops)
    assert (first.task.status, first.task.not_before) == ("queued", NOW)
    assert (grant.task.attempts, grant.task.lease_id) == (2, "l-again")
    assert (second.task.status, second.task.not_before) == ("queued", NOW + delay(2))
    expect_refusal(late, Conflict)


def test_twenty_completes_of_one_task_finish_it_once(db: Db) -> None:
    """One success; the others find the task completed and write nothing."""
    fences = [Fence(lease_id="l-held") if n % 2 == 0 else Fence() for n in range(20)]
    ops = [complete_op("t-held", OK, fences[n], n) for n in range(20)]
    out = check_apply(db, one_worker_setup, ops)
    assert isinstance(out[0], CompletionOutcome) and out[0].task.status == "completed"
    for n in range(1, 20):
        expect_refusal(out[n], StaleLease if fences[n].lease_id else Conflict)
    assert [r.id for r in db.store.list_results("t-held", MAX_PAGE, None).items] == ["r-t-held-0"]
    assert [a.id for a in db.store.list_artifacts("t-held", MAX_PAGE, None).items] == ["a-t-held-0"]


# --- 3. several candidate workers ------------------------------------------------


def candidates_setup(store: Store) -> None:
    add_worker(store, "w-full", max_concurrency=1)
    add_worker(store, "w-free1", max_concurrency=1)
    add_worker(store, "w-free2", max_concurrency=1)
    hold(store, "t-busy", "w-full", "l-busy")
    for tid in ("t-1", "t-2", "t-3", "t-4"):
        add_task(store, task_id=tid)


def test_acquire_offering_several_workers_takes_the_first_with_room(db: Db) -> None:
    offer = ("w-full", "w-ghost", "w-free1", "w-free2")
    ops = [
        AcquireOp("t-1", offer, 60, "l-1"),
        AcquireOp("t-2", offer, 60, "l-2"),
        AcquireOp("t-3", offer, 60, "l-3"),
        AcquireOp("t-4", ("w-ghost", "w-ghost2"), 60, "l-4"),
    ]
    first, second, third, nobody = check_apply(db, candidates_setup, ops)
    assert (first.worker.id, first.task.worker_id, first.lease.worker_id) == ("w-free1", "w-free1", "w-free1")
    assert second.worker.id == "w-free2"
    expect_refusal(third, NoCapacity)
    expect_refusal(nobody, NoCapacity)  # several named, none exists: no capacity, not NotFound


# --- 4. payloads larger than one statement ------------------------------------------


def big_text(n: int, size: int = 900 * 1024) -> str:
    """``size`` characters, distinct per ``n``, with text that needs quoting or escaping."""
    unit = f"<{n}> it's \"q\" \\ %s $1; -- é中😀\n"
    return (unit * (size // len(unit) + 1))[:size]


def big_setup(store: Store) -> None:
    add_worker(store, "w-c", max_concurrency=20)
    for n in range(5):
        hold(store, f"t-big-{n}", "w-c", f"l-big-{n}")


def test_batch_larger_than_a_statement_round_trips(db: Db) -> None:
    """12 prompts of 900 KiB (over 8 MiB in all) and 5 outputs of 900 KiB: split into several
    statements and messages on PostgreSQL, every byte stored as given."""
    creates: list[Op] = [CreateOp(new_task(prompt=big_text(n)), f"t-new-{n:02d}") for n in range(12)]
    completes: list[Op] = [
        complete_op(f"t-big-{n}", Completion(status="success", output=big_text(100 + n))) for n in range(5)
    ]
    out = check_apply(db, big_setup, creates + completes)
    store = db.store
    for n in range(12):
        assert out[n][1] is True
        assert store.get_task(f"t-new-{n:02d}").prompt == big_text(n)
    for n in range(5):
        assert out[12 + n].task.status == "completed"
        assert store.get_result(f"t-big-{n}").output == big_text(100 + n)
        (artifact,) = store.list_artifacts(f"t-big-{n}", MAX_PAGE, None).items
        assert artifact.content == big_text(100 + n)


# --- 5. text that needs quoting ----------------------------------------------------

ODD = [
    "it's",
    'say "hi"',
    "back\\slash \\n \\\\ \\u0041",
    "%s %(x)s %% $1 $$ ?",
    "a; DROP TABLE llm_tasks; --",
    "line\nnext\ttab\r\n",
    "emoji 😀🎉 中文字 ñ é \u2028 \ufeff",
    '{"json": ["looking", 1, null, true], "x": "\\"y\\""}',
    "[1,2,3]",
    "null",
    "{a,b}",
    "",
]
ODD_METRICS = {
    "nested": {"a": [1, 2.5, None, True, False], "b": {"c": "it's \"q\""}},
    "ratio": 0.30000000000000004,
    "small": 1e-07,
    "flag": False,
    "none": None,
    "text": "%s {a,b} \\ $1",
    "unicode": "中😀",
}
ODD_LABELS = ["gpu", "a.b:c/d-e", "{a,b}", "c,d"]  # the store keeps what it is given
ODD_TAGS = ["{a,b}", "c,d", 'q"uote', "back\\slash", "", "中"]


def odd_setup(store: Store) -> None:
    add_worker(store, "w-c", max_concurrency=20, labels=tuple(ODD_LABELS))
    for n in range(len(ODD)):
        hold(store, f"t-odd-{n}", "w-c", f"l-odd-{n}")


def test_odd_text_round_trips_exactly(db: Db) -> None:
    """Quotes, escapes, placeholders and JSON-looking text are data, never syntax."""
    creates: list[Op] = [
        CreateOp(
            new_task(
                prompt=text or "x",
                context_id="ctx 'odd' {a,b}",
                context_hints=[text, "{a,b}"],
                labels=ODD_LABELS,
                idempotency_key=f"key {n} {text}"[:255],
            ),
            f"t-new-{n:02d}",
        )
        for n, text in enumerate(ODD)
    ]
    completes: list[Op] = []
    for n, text in enumerate(ODD):
        if n % 2:
            c = Completion(status="error", error_message=text, metrics=ODD_METRICS, artifact_tags=ODD_TAGS,
                           retryable=False)
        else:
            c = Completion(status="success", output=text, metrics=ODD_METRICS, artifact_tags=ODD_TAGS,
                           artifact_type="odd 'type'")
        completes.append(complete_op(f"t-odd-{n}", c))
    out = check_apply(db, odd_setup, creates + completes)
    store = db.store
    for n, text in enumerate(ODD):
        task = store.get_task(f"t-new-{n:02d}")
        assert out[n] == (task, True)
        assert (task.prompt, task.context_id, task.context_hints, task.labels, task.idempotency_key) == (
            text or "x", "ctx 'odd' {a,b}", [text, "{a,b}"], ODD_LABELS, f"key {n} {text}"[:255]
        )
        result = store.get_result(f"t-odd-{n}")
        (artifact,) = store.list_artifacts(f"t-odd-{n}", MAX_PAGE, None).items
        assert out[len(ODD) + n].result == result
        assert result.metrics == ODD_METRICS
        assert artifact.tags == ODD_TAGS
        assert artifact.content == text
        assert (result.output, result.error_message) == ((None, text) if n % 2 else (text, None))


# --- 6, 7. nothing to do; no audit --------------------------------------------------


def test_empty_batch_answers_nothing_and_writes_nothing(store: Store, db: Db) -> None:
    mixed_setup(store)
    before = snapshot(store)
    with store.transaction() as tx:
        assert tx.apply([], NOW) == []
    assert snapshot(store) == before
    assert_invariants(db)


def audited_setup(store: Store) -> None:
    mixed_setup(store)
    entry = AuditEntry(id="audit-1", timestamp=T0, action="setup", entity_type="test", entity_id="x", actor="t")
    store.run(lambda tx: tx.insert_audit([entry]))


def test_apply_writes_no_audit_entries(db: Db) -> None:
    """The actor records what a batch did; apply itself must not."""
    check_apply(db, audited_setup, MIXED_OPS)
    assert [e.id for e in db.store.list_audit(MAX_PAGE, None).items] == ["audit-1"]


# --- the order PostgreSQL applies a batch in -------------------------------------------
#
# The operations of one apply are concurrent requests, answered as if applied one at a
# time in an order the store chooses. SQLite takes list order. PostgreSQL runs each kind
# as one statement: creates, acquires, heartbeats, completes; then, in list order,
# repeats on a task or task id, creates whose insert was skipped and acquires offering
# several workers. These batches answer differently in the two orders; each store must
# answer exactly as the one-by-one loop does in its own order.


def pg_order(store: Store, sqlite_order: list[int], postgres_order: list[int]) -> list[int]:
    return postgres_order if store.kind == "postgresql" else sqlite_order


def capacity_setup(store: Store) -> None:
    add_worker(store, "w-a", max_concurrency=1)
    add_worker(store, "w-x", max_concurrency=1)
    add_worker(store, "w-y", max_concurrency=1)
    hold(store, "t-busy", "w-a", "l-busy")
    add_task(store, task_id="t-existing", idempotency_key="key-old")
    for tid in ("t-1", "t-2"):
        add_task(store, task_id=tid)


def test_acquire_and_complete_freeing_its_worker(store: Store, db: Db) -> None:
    ops = [complete_op("t-busy", OK), AcquireOp("t-1", ("w-a",), 60, "l-1")]
    done, grant = check_apply(db, capacity_setup, ops, order=pg_order(store, [0, 1], [1, 0]))
    assert done.task.status == "completed"
    if store.kind == "postgresql":
        expect_refusal(grant, NoCapacity)  # the grant came first: w-a was still busy
    else:
        assert grant.worker.id == "w-a"


def test_acquire_offering_several_workers_runs_after_single_ones(store: Store, db: Db) -> None:
    ops = [AcquireOp("t-1", ("w-x", "w-y"), 60, "l-1"), AcquireOp("t-2", ("w-x",), 60, "l-2")]
    first, second = check_apply(db, capacity_setup, ops, order=pg_order(store, [0, 1], [1, 0]))
    if store.kind == "postgresql":
        assert (first.worker.id, second.worker.id) == ("w-y", "w-x")
    else:
        assert first.worker.id == "w-x"
        expect_refusal(second, NoCapacity)


def test_acquire_listed_before_the_create_of_its_task(store: Store, db: Db) -> None:
    ops = [AcquireOp("t-late", ("w-x",), 60, "l-1"), CreateOp(new_task(), "t-late")]
    grant, (task, created) = check_apply(db, capacity_setup, ops, order=pg_order(store, [0, 1], [1, 0]))
    assert created
    if store.kind == "postgresql":
        assert grant.task.id == "t-late"
    else:
        expect_refusal(grant, NotFound)
        assert task.status == "queued"


def test_create_with_used_key_answers_the_task_as_it_is_in_its_turn(store: Store, db: Db) -> None:
    ops = [CreateOp(new_task(idempotency_key="key-old"), "t-dup"), AcquireOp("t-existing", ("w-x",), 60, "l-1")]
    (task, created), grant = check_apply(db, capacity_setup, ops, order=pg_order(store, [0, 1], [1, 0]))
    assert (task.id, created) == ("t-existing", False)
    assert grant.task.status == "leased"
    assert task.status == ("leased" if store.kind == "postgresql" else "queued")


def test_second_create_with_the_same_id_is_a_conflict(store: Store, db: Db) -> None:
    ops = [CreateOp(new_task(prompt="one"), "t-same"), CreateOp(new_task(prompt="two"), "t-same")]
    (task, created), second = check_apply(db, capacity_setup, ops)
    assert (task.prompt, created) == ("one", True)
    expect_refusal(second, Conflict)


def test_create_with_used_key_then_a_create_of_its_id(store: Store, db: Db) -> None:
    ops = [CreateOp(new_task(idempotency_key="key-old"), "t-same"), CreateOp(new_task(prompt="two"), "t-same")]
    (existing, created), (task, created_too) = check_apply(db, capacity_setup, ops)
    assert (existing.id, created) == ("t-existing", False)
    assert (task.id, task.prompt, created_too) == ("t-same", "two", True)


def test_acquire_and_heartbeat_on_one_worker(store: Store, db: Db) -> None:
    def roomy_setup(s: Store) -> None:
        capacity_setup(s)
        add_worker(s, "w-a", max_concurrency=2)

    ops = [HeartbeatOp("t-busy", Fence()), AcquireOp("t-1", ("w-a",), 60, "l-1")]
    _, grant = check_apply(db, roomy_setup, ops, order=pg_order(store, [0, 1], [1, 0]))
    # The worker as the grant saw it: before the heartbeat touched it on PostgreSQL (registered at T0).
    assert grant.worker.last_heartbeat == (T0 if store.kind == "postgresql" else NOW)


# --- concurrent batches over the same tasks (PostgreSQL) ------------------------------


ROUNDS = 8
TASKS_PER_ROUND = 50


def heartbeats_and_completes(ids: list[str], seed: int) -> list[Op]:
    """Heartbeats of 30 of ``ids`` and completes of 30, in an order of this batch's own; the
    10 tasks that get both take the one-by-one path for their complete."""
    order = random.Random(seed).sample(ids, len(ids))
    ops: list[Op] = [HeartbeatOp(tid, NO_FENCE) for tid in order[:30]]
    ops += [CompleteOp(tid, NO_FENCE, OK, new_id(), new_id(), delay) for tid in order[20:]]
    return ops


@pytest.mark.postgres
def test_concurrent_batches_in_different_orders_do_not_deadlock(pg_store: Store, pg_url: str) -> None:
    """Two transactions batching heartbeats and completes of the same 50 tasks in different
    orders: the set path locks the tasks in id order, so neither waits in a cycle."""
    db = Db(pg_store, pg_url)
    workers = [f"w-{n}" for n in range(4)]
    for wid in workers:
        add_worker(pg_store, wid, max_concurrency=32)
    for rnd in range(ROUNDS):
        now = NOW + rnd * 10_000
        ids = [f"t-{rnd:02d}-{n:02d}" for n in range(TASKS_PER_ROUND)]
        setup: list[Op] = [CreateOp(new_task(prompt=tid), tid) for tid in ids]
        setup += [AcquireOp(tid, (workers[n % 4],), 60, f"l-{tid}") for n, tid in enumerate(ids)]
        with pg_store.transaction() as tx:
            assert not [r for r in tx.apply(setup, now) if isinstance(r, BloomError)]

        batches = [heartbeats_and_completes(ids, rnd * 2 + k) for k in range(2)]
        answers = run_together(len(batches), lambda k, batches=batches, now=now: pg_store.run(lambda tx: tx.apply(batches[k], now + 1)))

        for k in range(2):
            assert isinstance(answers[k], list), f"round {rnd}, batch {k} failed: {answers[k]!r}"
            for op, answer in zip(batches[k], answers[k], strict=True):
                # A task the other batch completed first refuses (no fence: Conflict).
                assert isinstance(answer, (CompletionOutcome, tuple, Conflict)), (rnd, describe(op), answer)
        for tid in ids:
            finished = pg_store.get_task(tid).status == "completed"
            assert len(pg_store.list_results(tid, MAX_PAGE, None).items) == (1 if finished else 0), tid
        assert_invariants(db)


@pytest.mark.postgres
def test_a_connection_that_lost_its_prepared_statements_prepares_again(pg_url: str) -> None:
    """After DISCARD ALL (as a pooler may do) one transaction fails cleanly and the next
    on the same connection works."""
    from bloom_runtime.sql.postgres import PostgresStore

    store = PostgresStore(pg_url, pool_min=1, pool_max=1)
    store.open()
    try:
        _task, _ = store.run(lambda tx: tx.apply([CreateOp(new_task(), new_id())], NOW))[0]
        with store._conn() as conn:  # the pool's only connection
            conn.execute("DISCARD ALL")
        with pytest.raises(StoreUnavailable):
            store.run(lambda tx: tx.apply([CreateOp(new_task(), new_id())], NOW))
        again, created = store.run(lambda tx: tx.apply([CreateOp(new_task(prompt="again"), new_id())], NOW))[0]
        assert created and again.prompt == "again"
    finally:
        store.close()
