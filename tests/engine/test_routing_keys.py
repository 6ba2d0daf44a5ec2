"""The routing keys the engine remembers from creation, so acquire need not read the task."""

from __future__ import annotations

import msgspec

from bloom_runtime.engine.models import Task
from bloom_runtime.engine.routing_keys import RoutingKeys

from .conftest import new_task, worker


def _task(n: int, desired_format: str = "text") -> Task:
    return msgspec.convert({"id": f"t{n}", "context_id": f"ctx-{n}", "agent_slug": "a", "prompt": "p", "labels": [f"l{n}"],
                            "desired_format": desired_format, "status": "queued", "created_at": 0, "updated_at": 0,
                            "context_hints": [], "policy": {}, "lease_id": None, "worker_id": None, "attempts": 0,
                            "max_attempts": 3, "not_before": None, "idempotency_key": None}, Task)


def test_keeps_the_newest_entries_up_to_its_capacity() -> None:
    keys = RoutingKeys(capacity=3)
    for n in range(5):
        keys.remember(_task(n))
    assert len(keys) == 3
    assert keys.get("t0") is None and keys.get("t1") is None
    assert keys.get("t4") == ("ctx-4", ("l4",), "text")


def test_reads_a_task_only_once() -> None:
    keys = RoutingKeys()
    reads: list[str] = []

    def read(task_id: str) -> Task:
        reads.append(task_id)
        return _task(7, "json")

    assert keys.of("t7", read).desired_format == "json"
    assert keys.of("t7", read) == ("ctx-7", ("l7",), "json")
    assert reads == ["t7"]


def test_acquire_routes_a_task_another_engine_created(make_engine) -> None:
    """The creating engine remembers the task; the other has to read it, and routes it the same."""
    a = make_engine()
    b = make_engine(shared_store=False)
    a.workers.register(worker("w-cpu"))
    a.workers.register(worker("w-gpu", labels=("gpu",)))
    task, _ = a.tasks.create(new_task(labels=["gpu"]))
    assert b.routing_keys.get(task.id) is None
    grant = b.leases.acquire(task.id)
    assert grant.worker.id == "w-gpu"
    assert b.routing_keys.get(task.id) == ("ctx-1", ("gpu",), "text")
