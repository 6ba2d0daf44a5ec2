"""Many at once through the engine facade, on both stores: ``create_many`` (one
transaction) and ``claim(…, max_tasks=)``."""

from __future__ import annotations

import threading

import pytest

from bloom_runtime.engine.errors import InvalidInput, OutcomeUnknown
from bloom_runtime.engine.models import MAX_CREATE_BATCH

from ..http.conftest import wait_for
from .conftest import new_task, worker
from .test_deadlines import ASK_TIMEOUT_S, Hold, in_thread


def test_create_many_answers_each_task_in_order(engine):
    engine.tasks.create(new_task(idempotency_key="used"))
    answers = engine.tasks.create_many(
        [new_task(prompt="a"), new_task(idempotency_key="used"), new_task(idempotency_key="new"), new_task(idempotency_key="new")]
    )
    assert [created for _, created in answers] == [True, False, True, False]
    assert answers[3][0] == answers[2][0]
    assert len(engine.tasks.list().items) == 3
    assert len(engine.audit.list(action="task_created").items) == 3


def test_create_many_refuses_a_bad_list_whole(engine):
    with pytest.raises(InvalidInput) as bad:
        engine.tasks.create_many([new_task(), new_task(max_attempts=0)])
    assert bad.value.details["index"] == 1
    with pytest.raises(InvalidInput):
        engine.tasks.create_many([])
    with pytest.raises(InvalidInput):
        engine.tasks.create_many([new_task()] * (MAX_CREATE_BATCH + 1))
    assert engine.tasks.list().items == []


def test_a_claim_of_several_waits_for_tasks_and_takes_up_to_the_free_capacity(engine):
    engine.workers.register(worker("w1", max_concurrency=3))
    assert engine.leases.claim("w1", max_tasks=3) == []
    waiting = in_thread(lambda: engine.leases.claim("w1", wait_seconds=10, max_tasks=3))
    engine.tasks.create_many([new_task(prompt=f"p{n}") for n in range(5)])
    grants = waiting()
    assert 1 <= len(grants) <= 3 and all(g.worker.id == "w1" for g in grants)
    more = engine.leases.claim("w1", max_tasks=3)
    assert len(grants) + len(more) == 3  # never past its capacity
    assert engine.leases.claim("w1", max_tasks=3) == []
    with pytest.raises(InvalidInput):
        engine.leases.claim("w1", max_tasks=0)


def test_create_many_whose_outcome_is_unknown_is_safe_to_retry(make_engine, request, dialect):
    engine = make_engine(ask_timeout_s=ASK_TIMEOUT_S)
    hold = Hold(engine.store, request.getfixturevalue("pg_url") if dialect == "postgres" else None)
    batch = [new_task(prompt=f"p{n}", idempotency_key=f"job-{n}") for n in range(3)]
    with hold:
        answer = in_thread(lambda: engine.tasks.create_many(batch))
        wait_for(hold.writer_waiting)
        assert isinstance(answer(), OutcomeUnknown)
    retried = engine.tasks.create_many(batch)  # queued behind the write under way
    assert [created for _, created in retried] == [False, False, False]
    assert len(engine.tasks.list().items) == 3


def test_create_many_wakes_a_claimer_in_another_thread(engine):
    engine.workers.register(worker("w1", max_concurrency=1))
    got = threading.Event()

    def claim() -> None:
        if engine.leases.claim("w1", wait_seconds=10) is not None:
            got.set()

    t = threading.Thread(target=claim)
    t.start()
    engine.tasks.create_many([new_task()])
    t.join(20)
    wait_for(got.is_set)
