"""Claimers woken when tasks queue: one per task, not the whole herd."""

from __future__ import annotations

import threading

from bloom_runtime.engine.models import Policy, Task
from bloom_runtime.engine.wakeup import ClaimWakeup

from ..conftest import run_together
from ..http.conftest import wait_for


def _task(labels: list[str]) -> Task:
    return Task(id="t", context_id="c", agent_slug="a", prompt="p", context_hints=[], policy=Policy(),
                desired_format="text", status="queued", created_at=0, updated_at=0, lease_id=None, worker_id=None,
                attempts=0, max_attempts=3, labels=labels, not_before=None, idempotency_key=None)


def _waiting(wakeup: ClaimWakeup, n: int) -> list[bool]:
    """Start ``n`` waiters; once all wait, return their answers as they come (list filled in place)."""
    answers: list[bool] = []
    seen = wakeup.generation

    def wait() -> None:
        answers.append(wakeup.wait(seen, 30))

    for _ in range(n):
        threading.Thread(target=wait).start()
    wait_for(lambda: len(wakeup._cond._waiters) == n)  # type: ignore[attr-defined]
    return answers


def test_one_task_wakes_one_claimer() -> None:
    wakeup = ClaimWakeup()
    answers = _waiting(wakeup, 8)
    wakeup.queued([_task([])])
    wait_for(lambda: answers == [True])
    assert len(wakeup._cond._waiters) == 7  # type: ignore[attr-defined]  # the others sleep on
    wakeup.close()
    wait_for(lambda: len(answers) == 8)
    assert sorted(answers) == [False] * 7 + [True]


def test_a_task_that_needs_labels_wakes_every_claimer() -> None:
    wakeup = ClaimWakeup()
    answers = _waiting(wakeup, 4)
    wakeup.queued([_task(["gpu"])])
    wait_for(lambda: len(answers) == 4)
    assert answers == [True] * 4


def test_a_task_queued_while_no_claimer_waits_is_not_missed() -> None:
    wakeup = ClaimWakeup()
    seen = wakeup.generation  # a claimer looked, found nothing, and is about to wait
    wakeup.queued([_task([])])
    assert run_together(1, lambda i: wakeup.wait(seen, 30)) == [True]
