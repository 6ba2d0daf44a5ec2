"""How a failed batch is answered, driven on the actor itself: a database that does not
answer is asked once for the whole batch, a refused value is split off, and a write
whose caller has gone is not tried again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from bloom_runtime.actors.base import Reply
from bloom_runtime.actors.messages import CreateTasks
from bloom_runtime.actors.task_queue import TaskQueue
from bloom_runtime.engine.clock import ManualClock
from bloom_runtime.engine.errors import EngineTimeout, StoreRefused, StoreTimeout, StoreUnavailable

from .conftest import new_task


class Failing:
    """A store whose every transaction fails with ``error``, counting the attempts."""

    def __init__(self, error: StoreUnavailable) -> None:
        self.error = error
        self.attempts = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        self.attempts += 1
        raise self.error
        yield  # pragma: no cover - a generator, never reached


def queue_on(store: Failing) -> TaskQueue:
    return TaskQueue(store, ManualClock(), lambda record: None, retry_delay=lambda attempts: 0, on_queued=lambda tasks: None)  # type: ignore[arg-type]


def creates(queue: TaskQueue, replies: list[pykka.ThreadingFuture]) -> list[Any]:
    writes = [queue.plan(CreateTasks([new_task(prompt=f"p{n}")], "test", reply)) for n, reply in enumerate(replies)]
    assert all(w is not None for w in writes)
    return writes


def errors(replies: list[pykka.ThreadingFuture]) -> list[BaseException]:
    out = []
    for reply in replies:
        with pytest.raises(StoreUnavailable) as caught:
            reply.get(timeout=0)
        out.append(caught.value)
    return out


def test_a_database_that_does_not_answer_is_asked_once_for_the_whole_batch() -> None:
    store = Failing(StoreTimeout("PostgreSQL did not answer within 6.0 s"))
    queue = queue_on(store)
    replies = [Reply(time.monotonic() + 30) for _ in range(4)]
    queue._run_batch(creates(queue, replies))
    assert store.attempts == 1
    assert all(isinstance(e, StoreTimeout) for e in errors(replies))


def test_a_refused_value_splits_the_batch_into_single_writes() -> None:
    store = Failing(StoreRefused("PostgreSQL refused a value"))
    queue = queue_on(store)
    replies = [Reply(time.monotonic() + 30) for _ in range(3)]
    queue._run_batch(creates(queue, replies))
    assert store.attempts == 1 + 3
    assert all(isinstance(e, StoreRefused) for e in errors(replies))


def test_writes_whose_callers_have_gone_are_not_tried_one_by_one() -> None:
    store = Failing(StoreRefused("PostgreSQL refused a value"))
    queue = queue_on(store)
    waiting = Reply(time.monotonic() + 30)
    gone = Reply(time.monotonic() + 30)
    writes = creates(queue, [waiting, gone])
    assert waiting.start() and gone.start()  # both under way, as the batch takes them
    gone.deadline = time.monotonic()  # then its caller's time runs out
    queue._run_batch(writes)
    assert store.attempts == 1 + 1
    with pytest.raises(StoreRefused):
        waiting.get(timeout=0)
    with pytest.raises(EngineTimeout, match="nothing was changed"):
        gone.get(timeout=0)
