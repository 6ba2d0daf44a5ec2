"""Every transition of the task state machine through the engine facade, and every refusal."""

from __future__ import annotations

import pytest

from bloom_runtime.engine.errors import Conflict, InvalidInput, NoCapacity, NotFound, StaleLease, Unauthorized
from bloom_runtime.engine.models import Completion, Fence, Policy

from .conftest import check_invariants, new_task, worker


def audit_actions(engine, entity_id: str) -> list[str]:
    return [e.action for e in reversed(engine.audit.list(limit=1000, entity_id=entity_id).items)]


def test_create_lease_heartbeat_complete(engine, clock, raw_sql):
    engine.workers.register(worker("w1"))
    task, created = engine.tasks.create(new_task(policy=Policy(timeout_sec=60)), actor="ops")
    assert created and task.status == "queued" and task.attempts == 0

    grant = engine.leases.acquire(task.id, actor="ops")
    assert grant.task.status == "leased" and grant.task.attempts == 1
    assert grant.worker.id == "w1"
    assert grant.lease.ttl_seconds == 90  # policy.timeout_sec + 30
    assert grant.lease.expires_at == clock.now_ms() + 90_000

    clock.advance(5_000)
    t, lease = engine.leases.heartbeat(task.id, Fence(lease_id=grant.lease.id))
    assert t.status == "running"
    assert lease.expires_at == clock.now_ms() + 90_000

    out = engine.tasks.complete(task.id, Completion(status="success", output="hi", metrics={"tokens_used": None}),
                                Fence(worker_id="w1"))
    assert out.task.status == "completed"
    assert out.result.output == "hi" and out.result.artifact_id == out.artifact.id
    assert out.artifact.content == "hi"
    assert engine.leases.get(grant.lease.id).status == "released"
    assert engine.tasks.result(task.id).id == out.result.id
    assert audit_actions(engine, task.id) == ["task_created", "task_leased", "task_completed"]
    created_entry = engine.audit.list(entity_id=task.id).items[-1]
    assert created_entry.actor == "ops"
    completed_entry = engine.audit.list(entity_id=task.id).items[0]
    assert completed_entry.actor == "w1"
    check_invariants(raw_sql)


def test_explicit_ttl_and_bad_ttl(engine):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task())
    for bad in (0, -5, 10**12, 1.5, "abc", True):
        with pytest.raises(InvalidInput):
            engine.leases.acquire(task.id, ttl_seconds=bad)
    assert engine.tasks.get(task.id).status == "queued"
    grant = engine.leases.acquire(task.id, ttl_seconds=45)
    assert grant.lease.ttl_seconds == 45


def test_error_with_attempts_left_backs_off_then_fails(engine, clock):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(max_attempts=2))
    g = engine.leases.acquire(task.id)
    out = engine.tasks.complete(task.id, Completion(status="error", error_message="boom"), Fence(lease_id=g.lease.id))
    assert out.task.status == "queued"
    assert out.task.not_before is not None and out.task.not_before > clock.now_ms()
    assert out.result.status == "error" and out.artifact.content == "boom"
    # Not leasable while backing off.
    with pytest.raises(Conflict):
        engine.leases.acquire(task.id)
    assert engine.leases.claim("w1") is None
    clock.set(out.task.not_before)
    g2 = engine.leases.claim("w1")
    assert g2 is not None and g2.task.id == task.id and g2.task.attempts == 2
    out2 = engine.tasks.complete(task.id, Completion(status="error", error_message="boom again"), Fence(lease_id=g2.lease.id))
    assert out2.task.status == "failed"
    assert audit_actions(engine, task.id)[-1] == "task_failed"


def test_backoff_grows_and_is_capped(engine):
    b = engine.retry_backoff
    b.jitter = 0
    assert [b.delay_ms(n) for n in (1, 2, 3, 4, 5, 6)] == [1000, 2000, 4000, 8000, 8000, 8000]


def test_error_not_retryable_fails_at_once(engine):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(max_attempts=5))
    engine.leases.acquire(task.id)
    out = engine.tasks.complete(task.id, Completion(status="error", error_message="bad prompt", retryable=False))
    assert out.task.status == "failed" and out.task.attempts == 1


def test_requeue_and_cancel(engine):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(max_attempts=1))
    engine.leases.acquire(task.id)
    engine.tasks.complete(task.id, Completion(status="error", error_message="x"))
    assert engine.tasks.get(task.id).status == "failed"
    t = engine.tasks.requeue(task.id)
    assert t.status == "queued" and t.attempts == 0 and t.not_before is None
    g = engine.leases.acquire(task.id)
    t = engine.tasks.cancel(task.id)
    assert t.status == "cancelled"
    assert engine.leases.get(g.lease.id).status == "released"
    assert engine.workers.get("w1").active_leases == 0


@pytest.mark.parametrize("state", ["leased", "running", "completed", "failed", "dead", "cancelled"])
def test_refused_transitions_change_nothing(engine, clock, state):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(max_attempts=1))
    if state != "queued":
        g = engine.leases.acquire(task.id)
    if state == "running":
        engine.leases.heartbeat(task.id)
    elif state == "completed":
        engine.tasks.complete(task.id, Completion(status="success", output="x"))
    elif state == "failed":
        engine.tasks.complete(task.id, Completion(status="error", error_message="x"))
    elif state == "dead":
        clock.advance(g.lease.ttl_seconds * 1000 + 1)
        engine.leases.sweep_now()
    elif state == "cancelled":
        engine.tasks.cancel(task.id)
    before = engine.tasks.get(task.id)
    assert before.status == state
    n_audit = len(engine.audit.list(limit=1000).items)

    with pytest.raises(Conflict):
        engine.leases.acquire(task.id)
    if state not in ("leased", "running"):
        with pytest.raises(Conflict):
            engine.leases.heartbeat(task.id)
        with pytest.raises(Conflict):
            engine.tasks.complete(task.id, Completion(status="success", output="late"))
    if state not in ("failed", "dead"):
        with pytest.raises(Conflict):
            engine.tasks.requeue(task.id)
    if state not in ("leased", "running"):
        with pytest.raises(Conflict):
            engine.tasks.cancel(task.id)
    assert engine.tasks.get(task.id) == before
    assert len(engine.audit.list(limit=1000).items) == n_audit


def test_unknown_ids(engine):
    with pytest.raises(NotFound):
        engine.tasks.get("nope")
    with pytest.raises(NotFound):
        engine.leases.acquire("nope")
    with pytest.raises(NotFound):
        engine.tasks.complete("nope", Completion(status="success"))
    with pytest.raises(NotFound):
        engine.leases.heartbeat("nope")
    with pytest.raises(NotFound):
        engine.workers.remove("nope")
    task, _ = engine.tasks.create(new_task())
    with pytest.raises(NotFound):
        engine.leases.acquire(task.id, worker_id="ghost")
    with pytest.raises(NotFound):
        engine.tasks.result(task.id)


def test_stale_worker_refused(engine, clock):
    engine.workers.register(worker("w1"))
    engine.workers.register(worker("w2"))
    task, _ = engine.tasks.create(new_task(max_attempts=3, policy=Policy(timeout_sec=10)))
    g1 = engine.leases.acquire(task.id, worker_id="w1")
    clock.advance(g1.lease.ttl_seconds * 1000 + 1)
    engine.leases.sweep_now()
    g2 = engine.leases.acquire(task.id, worker_id="w2")
    before = engine.tasks.get(task.id)
    with pytest.raises(StaleLease):
        engine.tasks.complete(task.id, Completion(status="success", output="old"), Fence(lease_id=g1.lease.id))
    with pytest.raises(StaleLease):
        engine.tasks.complete(task.id, Completion(status="success", output="old"), Fence(worker_id="w1"))
    with pytest.raises(StaleLease):
        engine.leases.heartbeat(task.id, Fence(lease_id=g1.lease.id))
    assert engine.tasks.get(task.id) == before
    out = engine.tasks.complete(task.id, Completion(status="success", output="new"), Fence(lease_id=g2.lease.id))
    assert out.result.output == "new"
    # A late callback after completion is still stale, never a second result.
    with pytest.raises(Conflict):
        engine.tasks.complete(task.id, Completion(status="success", output="old"), Fence(lease_id=g1.lease.id))
    assert len(engine.tasks.results(task.id).items) == 1


def test_strict_fencing_requires_the_lease_token(make_engine):
    engine = make_engine(lease_fencing="strict")
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task())
    g = engine.leases.acquire(task.id)
    token = engine.leases.token(g.lease.id)
    with pytest.raises(InvalidInput):
        engine.leases.heartbeat(task.id)
    with pytest.raises(InvalidInput):
        engine.leases.heartbeat(task.id, Fence(lease_id=g.lease.id))
    with pytest.raises(InvalidInput):
        engine.tasks.complete(task.id, Completion(status="success"), Fence(worker_id="w1"))
    engine.leases.heartbeat(task.id, Fence(lease_id=g.lease.id, lease_token=token))
    engine.leases.heartbeat(task.id, Fence(lease_token=token))  # the token alone names the lease


def test_lease_tokens_prove_one_lease_and_change_nothing_when_wrong(make_engine, raw_sql):
    engine = make_engine()
    engine.workers.register(worker("w1"))
    first, _ = engine.tasks.create(new_task())
    other, _ = engine.tasks.create(new_task())
    g1, g2 = engine.leases.acquire(first.id), engine.leases.acquire(other.id)
    t1, t2 = engine.leases.token(g1.lease.id), engine.leases.token(g2.lease.id)
    assert t1 != t2 and engine.leases.token(g1.lease.id) == t1  # derived, so stable
    # Another engine on the same database derives the same tokens (one secret, created once).
    assert make_engine(shared_store=False).leases.token(g1.lease.id) == t1
    before = raw_sql("SELECT id, status, expires_at, last_heartbeat FROM leases ORDER BY id")
    with pytest.raises(Unauthorized):  # a forged token
        engine.leases.heartbeat(first.id, Fence(lease_id=g1.lease.id, lease_token="A" * 43))
    with pytest.raises(Unauthorized):  # another lease's token
        engine.leases.heartbeat(first.id, Fence(lease_id=g1.lease.id, lease_token=t2))
    with pytest.raises(StaleLease):  # a token that is not the task's active lease's
        engine.tasks.complete(first.id, Completion(status="success"), Fence(lease_token=t2))
    with pytest.raises(Unauthorized):
        engine.leases.callback(g1.lease.id, t2)
    assert raw_sql("SELECT id, status, expires_at, last_heartbeat FROM leases ORDER BY id") == before
    assert engine.tasks.get(first.id).status == "leased"
    engine.tasks.complete(first.id, Completion(status="success", output="ok"), Fence(lease_token=t1))
    with pytest.raises(StaleLease):  # stale: that lease is over
        engine.leases.heartbeat(first.id, Fence(lease_id=g1.lease.id, lease_token=t1))
    assert "lease_token_secret" in engine.store.get_settings()


def test_expiry_requeues_then_dead(engine, clock, raw_sql):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(max_attempts=2, policy=Policy(timeout_sec=10)))
    g = engine.leases.acquire(task.id)
    engine.leases.heartbeat(task.id)  # running tasks expire too
    clock.advance(40_000 - 1)
    engine.leases.sweep_now()
    assert engine.tasks.get(task.id).status == "running"
    clock.advance(2)
    engine.leases.sweep_now()
    t = engine.tasks.get(task.id)
    assert t.status == "queued" and t.lease_id is None and t.worker_id is None
    assert engine.leases.get(g.lease.id).status == "expired"
    engine.leases.acquire(task.id)
    clock.advance(41_000)
    engine.leases.sweep_now()
    assert engine.tasks.get(task.id).status == "dead"
    expiries = engine.audit.list(entity_id=task.id, action="lease_expired").items  # newest first
    assert [e.detail.split(" ")[2] for e in expiries] == ["dead", "queued"]  # type: ignore[union-attr]
    assert all(e.actor == "lease-supervisor" for e in expiries)
    check_invariants(raw_sql)


def test_capacity_and_no_capacity(engine):
    engine.workers.register(worker("w1", max_concurrency=2))
    tasks = [engine.tasks.create(new_task(context_id=f"c{i}"))[0] for i in range(3)]
    engine.leases.acquire(tasks[0].id)
    engine.leases.acquire(tasks[1].id)
    with pytest.raises(NoCapacity):
        engine.leases.acquire(tasks[2].id)
    with pytest.raises(NoCapacity):
        engine.leases.acquire(tasks[2].id, worker_id="w1")
    assert engine.tasks.get(tasks[2].id).status == "queued"


def test_sticky_then_free_capacity_then_freshest(engine, clock):
    engine.workers.register(worker("small", max_concurrency=2, last_heartbeat=clock.now_ms()))
    engine.workers.register(worker("big", max_concurrency=8, last_heartbeat=clock.now_ms() - 1000))
    t1, _ = engine.tasks.create(new_task(context_id="ctx-a"))
    assert engine.leases.acquire(t1.id).worker.id == "big"  # most free capacity
    engine.workers.register(worker("big2", max_concurrency=8, last_heartbeat=clock.now_ms()))
    t_other, _ = engine.tasks.create(new_task(context_id="ctx-b"))
    assert engine.leases.acquire(t_other.id).worker.id == "big2"  # big has 7 free, big2 has 8
    # Sticky: another task of ctx-a goes to the worker already holding ctx-a, though big2 has more room.
    t2, _ = engine.tasks.create(new_task(context_id="ctx-a"))
    assert engine.leases.acquire(t2.id).worker.id == "big"
    # Equal capacity: freshest heartbeat wins.
    engine.workers.register(worker("f1", max_concurrency=16, last_heartbeat=clock.now_ms() - 5))
    engine.workers.register(worker("f2", max_concurrency=16, last_heartbeat=clock.now_ms()))
    t3, _ = engine.tasks.create(new_task(context_id="ctx-c"))
    assert engine.leases.acquire(t3.id).worker.id == "f2"


def test_label_routing(engine):
    engine.workers.register(worker("cpu", max_concurrency=8))
    engine.workers.register(worker("gpu", max_concurrency=1, labels=("gpu", "cuda")))
    t, _ = engine.tasks.create(new_task(labels=["gpu"]))
    assert engine.leases.acquire(t.id).worker.id == "gpu"
    t2, _ = engine.tasks.create(new_task(labels=["gpu"]))
    with pytest.raises(NoCapacity):
        engine.leases.acquire(t2.id)  # the only gpu worker is full
    # Pull mode: the cpu worker never claims a gpu task.
    assert engine.leases.claim("cpu") is None
    t3, _ = engine.tasks.create(new_task(labels=[]))
    assert engine.leases.claim("cpu").task.id == t3.id


def test_offline_and_non_cli_workers_not_picked(engine):
    engine.workers.register(worker("off", status="offline"))
    from bloom_runtime.engine.models import Capabilities, WorkerUpsert

    engine.workers.register(WorkerUpsert(id="nocli", status="online", capabilities=Capabilities(claude_cli=False, max_concurrency=4)))
    t, _ = engine.tasks.create(new_task())
    with pytest.raises(NoCapacity):
        engine.leases.acquire(t.id)


def test_idempotency_key(engine):
    t1, c1 = engine.tasks.create(new_task(idempotency_key="k-1"))
    t2, c2 = engine.tasks.create(new_task(idempotency_key="k-1", prompt="different"))
    assert c1 and not c2 and t1 == t2
    assert len(engine.tasks.list().items) == 1
    assert audit_actions(engine, t1.id) == ["task_created"]


def test_invalid_new_task(engine):
    for bad in (
        new_task(prompt=""),
        new_task(max_attempts=0),
        new_task(max_attempts=11),
        new_task(policy=Policy(timeout_sec=0)),
        new_task(policy=Policy(timeout_sec=3601)),
        new_task(labels=["x"] * 257),
        new_task(context_id="a" * 129),
    ):
        with pytest.raises(InvalidInput):
            engine.tasks.create(bad)
    assert engine.tasks.list().items == []


def test_list_filters_and_pages(engine):
    ids = [engine.tasks.create(new_task(prompt=f"p{i}"))[0].id for i in range(25)]
    seen, cursor = [], None
    while True:
        page = engine.tasks.list(limit=10, cursor=cursor)
        seen += [t.id for t in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 25
    assert len(engine.tasks.list(status="queued").items) == 25
    with pytest.raises(InvalidInput):
        engine.tasks.list(status="bogus")
    for limit in (0, -1, 1001):
        with pytest.raises(InvalidInput):
            engine.tasks.list(limit=limit)
    with pytest.raises(InvalidInput):
        engine.tasks.list(cursor="garbage!!")


def test_claim_counts_as_heartbeat_and_offline_after_silence(make_engine, clock):
    engine = make_engine(agent_probe_interval_s=0)
    engine.workers.register(worker("puller"))
    engine.workers.register(worker("pushed", url="http://127.0.0.1:9/"))
    assert engine.leases.claim("puller") is None
    w = engine.workers.get("puller")
    assert w.last_heartbeat == clock.now_ms() and w.source == "pull"
    clock.advance(61_000)
    engine.workers.check_liveness_now()
    assert engine.workers.get("puller").status == "offline"
    assert engine.workers.get("pushed").status == "online"  # unprobed API push targets keep their status
    engine.leases.claim("puller")
    assert engine.workers.get("puller").status == "online"


def test_remove_worker(engine):
    engine.workers.register(worker("w1"))
    removed = engine.workers.remove("w1", actor="admin")
    assert removed.id == "w1"
    with pytest.raises(NotFound):
        engine.workers.get("w1")
    assert audit_actions(engine, "w1") == ["worker_registered", "worker_removed"]


def test_fail_lease_requeues(engine):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task())
    g = engine.leases.acquire(task.id)
    t, lease = engine.leases.fail(g.lease.id, "connection refused")
    assert lease.status == "failed" and t.status == "queued"
    with pytest.raises(Conflict):
        engine.leases.fail(g.lease.id, "again")


def test_json_tasks_only_complete_with_json_whoever_the_worker(engine, clock):
    engine.workers.register(worker("w1"))
    wants_json, _ = engine.tasks.create(new_task(desired_format="json", max_attempts=2))
    engine.leases.acquire(wants_json.id)
    out = engine.tasks.complete(wants_json.id, Completion(status="success", output="Sure! Here is the JSON: {"))
    assert out.task.status == "queued" and out.result.status == "error"
    assert out.result.error_message.startswith("desired_format is json but the output is not valid JSON")
    assert out.result.output == "Sure! Here is the JSON: {"  # kept, for whoever looks into it
    clock.advance(60_000)  # past the retry backoff
    engine.leases.acquire(wants_json.id)
    assert engine.tasks.complete(wants_json.id, Completion(status="success", output='{"a": [1, 2]}')).task.status == "completed"
    text, _ = engine.tasks.create(new_task())
    engine.leases.acquire(text.id)
    assert engine.tasks.complete(text.id, Completion(status="success", output="not json {")).task.status == "completed"
