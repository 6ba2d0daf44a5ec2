"""The routing keys the engine remembers from creation, so acquire need not read the task."""

from __future__ import annotations

from bloom_runtime.engine.routing_keys import RoutingKeys

from .conftest import new_task, worker


def test_keeps_the_newest_entries_up_to_its_capacity() -> None:
    keys = RoutingKeys(capacity=3)
    for n in range(5):
        keys.remember(f"t{n}", f"ctx-{n}", [f"l{n}"])
    assert len(keys) == 3
    assert keys.get("t0") is None and keys.get("t1") is None
    assert keys.get("t4") == ("ctx-4", ("l4",))


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
    assert b.routing_keys.get(task.id) == ("ctx-1", ("gpu",))
