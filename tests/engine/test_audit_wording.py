"""Audit entries read the same whoever writes them.

On PostgreSQL the set statements write the audit entries of the rows they change
themselves (queries/postgres.sql); SQLite's store and the actors (without group
commit) word them in Python (sql/audit_trail.py). The same story, through every
kind of change (push deliveries and liveness too), on both stores and with audit
group commit on and off, must leave the same log: one entry per change, naming the
task and its lease.
"""

from __future__ import annotations

import re

import pytest

from bloom_runtime.actors.messages import RecordLiveness, Sighting
from bloom_runtime.engine.errors import Conflict
from bloom_runtime.engine.models import Completion, Delivery, Fence, WorkerUpsert, new_id

from ..conftest import wait_for
from .conftest import new_task, worker

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")
_MS = re.compile(r"\b\d{13}\b")

EXPECTED = [
    ("worker_registered", "worker", "w1", "api", "status=online"),
    ("task_created", "task", "<id1>", "api", "agent=writer context=ctx-1"),
    ("task_leased", "task", "<id1>", "api", "lease=<id2> worker=w1 ttl=45s attempt=1"),
    ("lease_renewed", "lease", "<id2>", "w1", "task=<id1> expires_at=<ms>"),
    ("task_retry", "task", "<id1>", "w1", "result=error attempts=1/3 not_before=<ms> lease=<id2>"),
    ("task_leased", "task", "<id1>", "api", "lease=<id3> worker=w1 ttl=150s attempt=2"),
    ("lease_renewed", "lease", "<id3>", "api", "task=<id1> expires_at=<ms>"),
    ("task_completed", "task", "<id1>", "api", "result=success attempts=2/3 lease=<id3>"),
    ("task_created", "task", "<id4>", "api", "agent=writer context=ctx-2"),
    ("task_leased", "task", "<id4>", "w1", "lease=<id5> worker=w1 ttl=150s attempt=1 claimed"),
    ("task_cancelled", "task", "<id4>", "ops", "lease=<id5> released"),
    ("task_created", "task", "<id6>", "api", "agent=writer context=ctx-3"),
    ("task_cancelled", "task", "<id6>", "ops", ""),
    ("task_created", "task", "<id7>", "api", "agent=writer context=ctx-4"),
    ("task_leased", "task", "<id7>", "api", "lease=<id8> worker=w1 ttl=1s attempt=1"),
    ("lease_expired", "task", "<id7>", "lease-supervisor", "lease=<id8> worker=w1 queued attempts=1/2"),
    ("task_leased", "task", "<id7>", "w1", "lease=<id9> worker=w1 ttl=150s attempt=2 claimed"),
    ("lease_failed", "task", "<id7>", "dispatch", "lease=<id9> failed attempts=2/2: agent unreachable"),
    ("task_requeued", "task", "<id7>", "ops", "attempts reset"),
]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "no-group-commit"])
def test_a_failed_dispatch_that_gave_its_attempt_back_says_so(make_engine, group_commit: bool) -> None:
    engine = make_engine(audit_group_commit=group_commit)
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(max_attempts=1))
    grant = engine.leases.acquire(task.id, worker_id="w1")
    engine.leases.fail(grant.lease.id, "never reached the agent", refund=True)
    (entry,) = engine.audit.list(action="lease_failed").items
    assert (entry.entity_id, entry.detail) == (task.id, f"lease={grant.lease.id} queued attempts=0/1 (attempt given back): never reached the agent")


def _normalised(entries: list) -> list[tuple[str, str, str, str, str]]:
    """Ids become <id1>, <id2>, … in order of first appearance; epoch-ms numbers become <ms>."""
    names: dict[str, str] = {}

    def name(m: re.Match[str]) -> str:
        return names.setdefault(m.group(0), f"<id{len(names) + 1}>")

    def norm(text: str | None) -> str:
        return _MS.sub("<ms>", _UUID.sub(name, text or ""))

    return [(e.action, e.entity_type, norm(e.entity_id), e.actor, norm(e.detail)) for e in entries]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "no-group-commit"])
def test_a_lifecycle_leaves_the_same_log_on_every_store(make_engine, clock, group_commit: bool) -> None:
    engine = make_engine(audit_group_commit=group_commit)
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(policy={"timeout_sec": 15}, idempotency_key="once"))
    grant = engine.leases.acquire(task.id, worker_id="w1")
    engine.leases.heartbeat(task.id, Fence(lease_id=grant.lease.id, worker_id="w1"))
    engine.tasks.complete(
        task.id, Completion(status="error", error_message="rate limited"), Fence(lease_id=grant.lease.id, worker_id="w1")
    )
    clock.advance(60_000)  # past the retry backoff
    grant = engine.leases.acquire(task.id, worker_id="w1", ttl_seconds=150)
    engine.leases.heartbeat(task.id)
    engine.tasks.complete(task.id, Completion(status="success", output="hi"))
    again, created = engine.tasks.create(new_task(policy={"timeout_sec": 15}, idempotency_key="once"))
    assert (again.id, created) == (task.id, False)  # a replay writes no entry
    other, _ = engine.tasks.create(new_task(context_id="ctx-2"))
    assert engine.leases.claim("w1", ttl_seconds=150) is not None
    engine.tasks.cancel(other.id, actor="ops")
    with pytest.raises(Conflict):
        engine.tasks.requeue(other.id, actor="ops")  # a refusal writes no entry
    queued, _ = engine.tasks.create(new_task(context_id="ctx-3"))
    engine.tasks.cancel(queued.id, actor="ops")
    last, _ = engine.tasks.create(new_task(context_id="ctx-4", max_attempts=2))
    engine.leases.acquire(last.id, worker_id="w1", ttl_seconds=1)
    clock.advance(2_000)
    assert engine.leases.sweep_now() == 1
    clock.advance(1)  # the sweep's entries have random ids: keep them apart in time
    (grant,) = engine.leases.claim("w1", ttl_seconds=150, max_tasks=4)
    engine.leases.fail(grant.lease.id, "agent unreachable")
    engine.tasks.requeue(last.id, actor="ops")

    entries = sorted(engine.audit.list(limit=100).items, key=lambda e: (e.timestamp, e.id))  # oldest first
    assert _normalised(entries) == EXPECTED


PUSHED_TASK = [
    ("task_created", "task", "<id1>", "api", "agent=writer context=ctx-1"),
    ("task_leased", "task", "<id1>", "api", "lease=<id2> worker=node-1 ttl=150s attempt=1"),
    ("task_dispatched", "task", "<id1>", "api", "lease=<id2> worker=node-1 delivery=<id3>"),
    ("lease_failed", "task", "<id1>", "dispatcher",
     "lease=<id2> queued attempts=0/3 (attempt given back): dispatch to worker node-1 unreachable: worker agent unreachable: <why>"),
    ("dispatch_unreachable", "task", "<id1>", "dispatcher", "lease=<id2> worker=node-1: worker agent unreachable: <why>"),
    ("task_leased", "task", "<id1>", "api", "lease=<id4> worker=node-1 ttl=150s attempt=1"),
    ("task_dispatched", "task", "<id1>", "api", "lease=<id4> worker=node-1 delivery=<id5>"),
    ("lease_failed", "task", "<id1>", "dispatcher",
     "lease=<id4> queued attempts=0/3 (attempt given back): dispatch to worker node-1 unreachable: worker agent unreachable: <why>"),
    ("dispatch_unreachable", "task", "<id1>", "dispatcher", "lease=<id4> worker=node-1: worker agent unreachable: <why>"),
    ("dispatch_unknown", "task", "<id1>", "dispatcher",
     "lease=<id6> worker=node-1: no outcome recorded by the deadline (the process that sent it stopped)"),
]
PUSH_WORKER = [
    ("worker_registered", "worker", "node-1", "api", "status=online url=<url> (vouched for)"),
    ("worker_offline", "worker", "node-1", "dispatcher", "online -> offline: delivery unreachable (2 in a row)"),
    ("worker_online", "worker", "node-1", "dispatcher", "offline -> online: probe answered"),
    ("worker_removed", "worker", "node-1", "api", ""),
]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "no-group-commit"])
def test_push_dispatch_and_liveness_leave_the_same_log_on_every_store(make_engine, clock, agents, group_commit: bool) -> None:
    engine = make_engine(audit_group_commit=group_commit, auto_dispatch=False, agent_probe_interval_s=0,
                         extra={"membridge_agent_retries": 0, "membridge_agent_breaker_fail_max": 100})
    agent = agents("node-1")
    engine.workers.register(WorkerUpsert(id="node-1", url=agent.url, status="online"))  # an admin vouches for it
    agent.refuse()
    task, _ = engine.tasks.create(new_task())
    for _ in range(2):  # two deliveries that find nobody: each gives its attempt back
        out = engine.dispatch.dispatch(task.id, "node-1", wait_s=10)
        assert out.delivery.state == "unreachable"
        clock.advance(60_000)  # past the retry backoff
    wait_for(lambda: engine.workers.get("node-1").status == "offline", what="offline after two deliveries found nobody")
    # A delivery some stopped process left unanswered past its deadline.
    now = clock.now_ms()
    left = Delivery(id=new_id(), task_id=task.id, lease_id=new_id(), worker_id="node-1", url=agent.url, state="sent",
                    agent_status=None, detail=None, actor="api", created_at=now - 2_000, deadline_at=now - 1_000, finished_at=None)
    engine.store.run(lambda tx: tx.insert_delivery(left))
    assert engine.dispatch.expire_now() == 1
    assert engine.dispatch.expire_now() == 0  # recorded once
    for _ in range(2):
        engine.call("registry", lambda r: RecordLiveness([Sighting("node-1", True, now, "probe answered")], "dispatcher", r))
    engine.workers.remove("node-1")

    def trail(entity_id: str) -> list[tuple[str, str, str, str, str]]:
        entries = sorted(engine.audit.list(limit=100, entity_id=entity_id).items, key=lambda e: (e.timestamp, e.id))
        # The transport's own words for the refused connection follow "agent unreachable: ".
        return [(action, kind, i, who, re.sub(r"agent unreachable: .*", "agent unreachable: <why>", d.replace(agent.url, "<url>")))
                for action, kind, i, who, d in _normalised(entries)]

    assert trail(task.id) == PUSHED_TASK
    assert trail("node-1") == PUSH_WORKER  # a second sighting that changes nothing writes nothing
