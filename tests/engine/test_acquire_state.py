"""Leasing a task that can never be leased says so (409) even when no worker is free."""

from __future__ import annotations

import pytest

from bloom_runtime.engine.errors import Conflict, NoCapacity, NotFound

from .conftest import new_task, worker


@pytest.mark.parametrize("finish", ["cancel", "complete"])
def test_lease_on_a_finished_task_is_409_with_no_worker_free(engine, finish):
    task, _ = engine.tasks.create(new_task())
    if finish == "cancel":
        engine.tasks.cancel(task.id)
        status = "cancelled"
    else:
        from bloom_runtime.engine.models import Completion, Fence

        engine.workers.register(worker("w1", max_concurrency=1))
        grant = engine.leases.acquire(task.id)
        engine.tasks.complete(task.id, Completion(status="success", output="ok"), Fence(lease_id=grant.lease.id))
        engine.workers.remove("w1")
        status = "completed"
    with pytest.raises(Conflict, match=f"task is {status}, not queued") as caught:
        engine.leases.acquire(task.id)
    assert caught.value.details["status"] == status


def test_lease_on_a_queued_task_with_no_worker_is_still_no_capacity(engine):
    task, _ = engine.tasks.create(new_task())
    with pytest.raises(NoCapacity):
        engine.leases.acquire(task.id)
    engine.workers.register(worker("busy", max_concurrency=1))
    other, _ = engine.tasks.create(new_task())
    engine.leases.acquire(other.id)
    with pytest.raises(NoCapacity):
        engine.leases.acquire(task.id)  # the fleet is full: the task may be leased later


def test_lease_on_an_unknown_task_is_404_with_no_worker(engine):
    with pytest.raises(NotFound):
        engine.leases.acquire("00000000-0000-0000-0000-000000000000")

