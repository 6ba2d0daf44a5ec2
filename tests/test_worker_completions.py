"""Results finishing together share one request, against the real server on loopback
(both stores) and against a runtime that takes no batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bloom_runtime.worker import run
from bloom_runtime.worker.client import RuntimeClient
from bloom_runtime.worker.completions import CompletionSender

from .fake_runtime import FakeRuntime

WAIT_S = 10.0


def _bounded(predicate: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S} s")
        threading.Event().wait(0.005)  # other threads' progress has no event to wait on


def _together(sender: CompletionSender, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Send every item from a thread of its own while a request is out, so that they all
    wait; then let them go: what one request carries is then certain."""
    answers: list[Any] = [None] * len(items)

    def send(n: int) -> None:
        try:
            answers[n] = sender.complete(*items[n])
        except Exception as exc:
            answers[n] = exc

    with sender._cond:
        sender._sending = True  # as if a request were out
    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(items))]
    for t in threads:
        t.start()
    _bounded(lambda: len(sender._waiting) == len(items), "every result waiting")
    with sender._cond:
        sender._sending = False
        sender._cond.notify_all()
    for t in threads:
        t.join(WAIT_S)
        assert not t.is_alive()
    return answers


def _body(grant: dict[str, Any], output: str = "done") -> dict[str, Any]:
    return {"status": "success", "output": output, "metrics": {"duration_ms": 1}, "lease_id": grant["lease"]["id"],
            "lease_token": grant["lease_token"], "worker_id": "w1", "retryable": True}


@pytest.fixture
def server(live_server, database_url):
    return live_server(database_url=database_url, auto_dispatch=False)


def test_results_waiting_together_go_in_one_request(server) -> None:
    client = RuntimeClient(server.base, None)
    client.register({"name": "w1", "capabilities": {"max_concurrency": 8}})
    server.engine.tasks.create_many([_new(n) for n in range(8)])
    grants = [{"task": g.task, "lease": g.lease, "lease_token": g.token} for g in client.claim("w1", 0, None, max_tasks=8)]
    assert len(grants) == 8
    stale = grants[7]
    server.engine.tasks.cancel(stale["task"]["id"])
    sender = CompletionSender(client, "w1", max_batch=8)
    answers = _together(sender, [(g["task"]["id"], _body(g, f"out-{n}")) for n, g in enumerate(grants)])
    assert sender.requests == 1
    assert [a["task"]["status"] for a in answers[:7]] == ["completed"] * 7
    assert answers[7] is None  # its lease ended: the result is not taken, as complete would say
    for n, g in enumerate(grants[:7]):
        assert server.engine.tasks.result(g["task"]["id"]).output == f"out-{n}"
    audit = server.engine.audit.list(limit=100, action="task_completed").items
    assert sorted(e.entity_id for e in audit) == sorted(g["task"]["id"] for g in grants[:7])
    assert {e.actor for e in audit} == {"w1"}


def test_a_lone_result_goes_as_before(server) -> None:
    client = RuntimeClient(server.base, None)
    client.register({"name": "w1", "capabilities": {"max_concurrency": 2}})
    server.engine.tasks.create(_new(0))
    (grant,) = client.claim("w1", 0, None, max_tasks=2)
    sender = CompletionSender(client, "w1", max_batch=2)
    answer = sender.complete(grant.task["id"], _body({"task": grant.task, "lease": grant.lease, "lease_token": grant.token}))
    assert answer["task"]["status"] == "completed" and sender.requests == 1


def test_a_worker_of_many_slots_drains_the_queue_exactly_once(server) -> None:
    n = 60
    server.engine.tasks.create_many([_new(k) for k in range(n)])
    ran: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def handler(task: dict[str, Any]) -> str:
        with lock:
            ran.append(task["id"])
        return "ok " + task["prompt"]

    loop = threading.Thread(target=run, args=(handler,), kwargs={
        "runtime_url": server.base, "name": "w1", "concurrency": 8, "stop_event": stop, "poll_wait_s": 0.2, "grace_s": 5.0})
    loop.start()
    try:
        _bounded(lambda: len(server.engine.tasks.list("completed", 1000).items) == n, "every task completed")
    finally:
        stop.set()
        loop.join(WAIT_S)
    assert not loop.is_alive()
    assert len(ran) == len(set(ran)) == n
    assert len(server.engine.audit.list(limit=1000, action="task_completed").items) == n


def test_a_runtime_without_batches_gets_each_result_on_its_own() -> None:
    with FakeRuntime() as fake:
        tasks = [fake.add_task(f"p{n}") for n in range(3)]
        client = RuntimeClient(fake.url, None)
        client.register({"name": "w1", "capabilities": {"max_concurrency": 3}})
        grants = client.claim("w1", 0, None, max_tasks=3)
        sender = CompletionSender(client, "w1", max_batch=3)
        answers = _together(sender, [(g.task["id"], _body({"task": g.task, "lease": g.lease, "lease_token": g.token}))
                                     for g in grants])
        assert [a["task"]["status"] for a in answers] == ["completed"] * 3
        assert len(fake.calls_to("/completions")) == 1  # asked once, then one by one
        assert sorted(c.path for c in fake.calls_to("/complete")) == sorted(
            f"/api/runtime/llm-tasks/{t['id']}/complete" for t in tasks)
        assert not sender._batches


def _new(n: int) -> Any:
    from bloom_runtime.engine.models import NewTask

    return NewTask(context_id="ctx", agent_slug="a", prompt=f"p{n}")
