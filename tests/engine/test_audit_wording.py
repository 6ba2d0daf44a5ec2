"""Audit entries read the same whoever writes them.

On PostgreSQL the set statements of a batch write the audit entries of the rows
they change themselves (queries/postgres.sql); everywhere else the actors word
them in Python. The same story, on both stores and with audit group commit on
and off, must leave the same log.
"""

from __future__ import annotations

import re

import pytest

from bloom_runtime.engine.models import Completion, Fence

from .conftest import new_task, worker

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")
_MS = re.compile(r"\b\d{13}\b")

EXPECTED = [
    ("worker_registered", "worker", "w1", "api", "status=online"),
    ("task_created", "task", "<id1>", "api", "agent=writer context=ctx-1"),
    ("task_leased", "task", "<id1>", "api", "lease=<id2> worker=w1 ttl=45s attempt=1"),
    ("lease_renewed", "lease", "<id2>", "w1", "task=<id1> expires_at=<ms>"),
    ("task_retry", "task", "<id1>", "w1", "result=error attempts=1/3 not_before=<ms>"),
    ("lease_released", "lease", "<id2>", "w1", "task=<id1>"),
    ("task_leased", "task", "<id1>", "api", "lease=<id3> worker=w1 ttl=150s attempt=2"),
    ("lease_renewed", "lease", "<id3>", "api", "task=<id1> expires_at=<ms>"),
    ("task_completed", "task", "<id1>", "api", "result=success attempts=2/3"),
    ("lease_released", "lease", "<id3>", "api", "task=<id1>"),
    ("task_created", "task", "<id4>", "api", "agent=writer context=ctx-2"),
]


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
    engine.tasks.create(new_task(context_id="ctx-2"))

    entries = list(reversed(engine.audit.list(limit=100).items))  # oldest first
    assert _normalised(entries) == EXPECTED
