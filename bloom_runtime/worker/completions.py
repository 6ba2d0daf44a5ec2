"""Results that are ready at the same time go to the runtime in one request.

While one request is out, the results that finish meanwhile gather, and the next
request carries them all (``POST /completions``, one transaction on the runtime):
a worker running many short tasks at once sends a few requests, not one per task.
A result that finds no request out goes at once, on its own, as before: batching
never makes a result wait for others.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from bloom_runtime.worker.client import RuntimeClient, Unbatched, encode_body

MAX_BATCH = 100  # results one request carries
BATCH_BODY_BYTES = 2 * 1024 * 1024 - 64 * 1024  # under the runtime's request body limit


@dataclass(eq=False)
class _Pending:
    task_id: str
    body: Any
    size: int
    done: bool = False
    answer: Any = None  # what ``RuntimeClient.complete`` returns, or the exception it raised


class CompletionSender:
    """``complete`` as ``RuntimeClient.complete`` (same answers, same exceptions), with the
    results of several threads sharing requests. The thread that finds no request out
    sends what is waiting, its own among it; the others wait for their answers."""

    def __init__(self, client: RuntimeClient, worker_id: str, max_batch: int = MAX_BATCH) -> None:
        self._client = client
        self._worker_id = worker_id
        self._max_batch = max_batch
        self._batches = max_batch > 1  # False once the runtime takes no batch
        self._cond = threading.Condition()
        self._waiting: list[_Pending] = []
        self._sending = False
        self.requests = 0  # requests sent, batches and single results alike

    def complete(self, task_id: str, body: Any) -> Any:
        mine = _Pending(task_id, body, len(encode_body(body)))
        with self._cond:
            self._waiting.append(mine)
            while not mine.done:
                if self._sending:
                    self._cond.wait()
                    continue
                self._sending = True
                batch = self._take()
                self._cond.release()
                try:
                    self._send(batch)
                finally:
                    self._cond.acquire()
                    self._sending = False
                    self._cond.notify_all()
        if isinstance(mine.answer, BaseException):
            raise mine.answer
        return mine.answer

    def _take(self) -> list[_Pending]:
        """The oldest waiting results, as many as one request carries (at least one)."""
        size, n = 0, 0
        for p in self._waiting[: self._max_batch if self._batches else 1]:
            if n and size + p.size > BATCH_BODY_BYTES:
                break
            size += p.size
            n += 1
        batch, self._waiting = self._waiting[:n], self._waiting[n:]
        return batch

    def _send(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) > 1:
                try:
                    self.requests += 1
                    answers = self._client.complete_many(self._worker_id, [(p.task_id, p.body) for p in batch])
                except Unbatched as exc:
                    # Refused whole (one result too large, say): one by one, each hears its own answer.
                    self._batches = self._batches and exc.supported  # an older runtime takes none
                else:
                    for p, answer in zip(batch, answers, strict=True):
                        p.answer, p.done = answer, True
                    return
            for p in batch:
                self.requests += 1
                try:
                    p.answer = self._client.complete(p.task_id, p.body)
                except Exception as exc:
                    p.answer = exc
                p.done = True
        except Exception as exc:  # the whole request failed: each result hears why
            for p in batch:
                if not p.done:
                    p.answer, p.done = exc, True
