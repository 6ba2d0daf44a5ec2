"""Cross-process wake-ups: a dedicated connection listening for ``bloom_tasks`` notifications."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from bloom_runtime.sql.pg_connection import parse_url, session_params
from bloom_runtime.sql.pg_errors import reason
from bloom_runtime.sql.pg_messages import Q

log = logging.getLogger(__name__)


class ListenBackoff:
    """Reconnect delays of the listener: doubling from ``initial_s`` up to ``max_s``.

    Tests shrink the constants instead of sleeping."""

    initial_s = 0.1
    max_s = 5.0

    def __init__(self) -> None:
        self._next = self.initial_s

    def reset(self) -> None:
        self._next = self.initial_s

    def next_s(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


class TaskListener:
    """Hold a dedicated autocommit connection doing ``LISTEN bloom_tasks``; call
    ``callback()`` on each notification (any process queued a task).

    After every (re)connect it calls ``callback()`` once as well, since
    notifications sent while disconnected are lost."""

    POLL_S = 0.2  # how often the loop looks at the stop event while idle

    def __init__(
        self,
        url: str,
        callback: Callable[[], None],
        *,
        connect_timeout_s: int = 5,
        backoff: ListenBackoff | None = None,
        session: dict[str, Any] | None = None,
    ) -> None:
        params, self._where = parse_url(url)
        self._session = session if session is not None else session_params(params, None)
        self._url = url
        self._callback = callback
        self._connect_timeout = max(2, int(connect_timeout_s))
        self._backoff = backoff or ListenBackoff()
        self.connected = threading.Event()  # set while LISTEN is active (tests wait on it)

    def _fire(self) -> None:
        try:
            self._callback()
        except Exception:  # a faulty callback must not stop the wake-ups
            log.exception("task listener callback failed")

    def run(self, stop_event: threading.Event) -> None:
        """Listen until ``stop_event`` is set; reconnect with backoff on errors."""
        while not stop_event.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout, **self._session) as conn:
                    conn.execute(Q["listen_tasks"])
                    self._backoff.reset()
                    self._fire()
                    self.connected.set()
                    while not stop_event.is_set():
                        for _ in conn.notifies(timeout=self.POLL_S):
                            self._fire()
                            if stop_event.is_set():
                                break
            except psycopg.Error as exc:
                self.connected.clear()
                delay = self._backoff.next_s()
                log.warning("task listener lost PostgreSQL at %s (%s); retrying in %.1f s", self._where, reason(exc), delay)
                stop_event.wait(delay)
            finally:
                self.connected.clear()
