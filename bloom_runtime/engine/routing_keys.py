"""What routing and completion need to know about a task, remembered from its creation.

A task's context, labels and desired format never change once it is created, so an
entry can only be missing, never wrong: ``acquire`` (routing) and ``complete`` (is the
output meant to be JSON?) ask the store only for tasks another process created or this
one has forgotten. The size is bounded; the oldest entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from bloom_runtime.engine.models import Task


class RoutingKey(NamedTuple):
    context_id: str
    labels: tuple[str, ...]
    desired_format: str


class RoutingKeys:
    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._keys: OrderedDict[str, RoutingKey] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, task: Task) -> RoutingKey:
        key = RoutingKey(task.context_id, tuple(task.labels), task.desired_format)
        with self._lock:
            self._keys[task.id] = key
            if len(self._keys) > self._capacity:
                self._keys.popitem(last=False)
        return key

    def get(self, task_id: str) -> RoutingKey | None:
        with self._lock:
            return self._keys.get(task_id)

    def of(self, task_id: str, read: Callable[[str], Task]) -> RoutingKey:
        """The task's key, remembered or else ``read`` (and then remembered)."""
        return self.get(task_id) or self.remember(read(task_id))

    def __len__(self) -> int:
        return len(self._keys)
