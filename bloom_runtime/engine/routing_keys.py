"""What routing needs to know about a task, remembered from its creation.

A task's context and labels never change once it is created, so an entry can only
be missing, never wrong: ``acquire`` asks the store only for tasks another process
created or this one has forgotten. The size is bounded; the oldest entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

RoutingKey = tuple[str, tuple[str, ...]]  # (context_id, labels)


class RoutingKeys:
    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._keys: OrderedDict[str, RoutingKey] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, task_id: str, context_id: str, labels: list[str] | tuple[str, ...]) -> None:
        with self._lock:
            self._keys[task_id] = (context_id, tuple(labels))
            if len(self._keys) > self._capacity:
                self._keys.popitem(last=False)

    def get(self, task_id: str) -> RoutingKey | None:
        with self._lock:
            return self._keys.get(task_id)

    def __len__(self) -> int:
        return len(self._keys)
