"""A reference pull worker: ``bloom-runtime worker`` and an embeddable loop.

``bloom-runtime worker --exec COMMAND`` runs a shell command per task;
``run(handler, runtime_url=…, name=…)`` runs a Python callable per task. Both are
the same loop (``loop.Worker``) with a different job.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from bloom_runtime.engine.errors import ConfigError
from bloom_runtime.worker.client import Backoff, RuntimeClient, WorkerError
from bloom_runtime.worker.jobs import CommandJob, Handler, HandlerJob, Outcome
from bloom_runtime.worker.loop import (
    MAX_OUTPUT_BYTES,
    MAX_POLL_WAIT_S,
    Worker,
    WorkerConfig,
)

__all__ = [
    "Backoff",
    "Handler",
    "Outcome",
    "RuntimeClient",
    "Worker",
    "WorkerConfig",
    "WorkerError",
    "run",
    "run_command",
]

log = logging.getLogger("bloom_runtime.worker")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")  # a worker id (models.Id)
DEFAULT_GRACE_S = 30.0
DEFAULT_POLL_WAIT_S = 10.0  # also bounds how long an idle worker takes to stop


def worker_api_key(spec: str | None) -> str | None:
    """The key to send, from a flag or ``$RUNTIME_API_KEY``.

    A node that shares the server's environment file holds the server's list
    (``old=k1,new=k2``); the worker sends the last key, so rotation adds the new
    key at the end.
    """
    if not spec or not spec.strip():
        return None
    last = [part.strip() for part in spec.split(",") if part.strip()][-1]
    _name, sep, secret = last.partition("=")
    return secret.strip() if sep and secret.strip() else last


def build_config(
    runtime_url: str,
    name: str,
    *,
    api_key: str | None,
    concurrency: int,
    labels: Iterable[str],
    ttl_seconds: int | None,
    grace_s: float,
    poll_wait_s: float,
) -> WorkerConfig:
    if not runtime_url or not runtime_url.startswith(("http://", "https://")):
        raise ConfigError(f"runtime URL must be http(s)://host[:port], got {runtime_url!r}")
    if not name or not NAME_PATTERN.match(name):
        raise ConfigError(f"worker name must be letters, digits and . _ : @ - (at most 128), got {name!r}")
    if not 1 <= concurrency <= 32:
        raise ConfigError("concurrency must be between 1 and 32")
    if ttl_seconds is not None and not 1 <= ttl_seconds <= 86_400:
        raise ConfigError("ttl must be between 1 and 86400 seconds")
    if grace_s < 0:
        raise ConfigError("grace must not be negative")
    if not 0 <= poll_wait_s <= MAX_POLL_WAIT_S:
        raise ConfigError(f"poll wait must be between 0 and {MAX_POLL_WAIT_S} seconds")
    return WorkerConfig(
        runtime_url=runtime_url,
        name=name,
        api_key=api_key,
        concurrency=concurrency,
        labels=tuple(label for label in labels if label),
        ttl_seconds=ttl_seconds,
        grace_s=grace_s,
        poll_wait_s=poll_wait_s,
    )


def run(
    handler: Handler,
    *,
    runtime_url: str,
    name: str,
    api_key: str | None = None,
    concurrency: int = 1,
    labels: Iterable[str] = (),
    ttl_seconds: int | None = None,
    stop_event: threading.Event | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    poll_wait_s: float = DEFAULT_POLL_WAIT_S,
    backoff: Callable[[], Backoff] = Backoff,
    sleep: Callable[[float], Any] | None = None,
) -> None:
    """Claim tasks from ``runtime_url`` as worker ``name`` and answer each with ``handler(task)``.

    ``handler`` gets the task as a dict and returns its output (a str; a dict
    or list is sent as JSON). An exception becomes a retryable error result with
    its message. Runs until ``stop_event`` is set (or Ctrl-C), then lets running
    handlers finish within ``grace_s``; handlers still running after that are
    reported as retryable errors (Python code cannot be killed: their results
    are discarded). ``backoff`` builds the retry delays and ``sleep`` replaces
    the retry wait (both for tests). Raises ``WorkerError`` if the runtime
    refuses the worker for good (wrong key).
    """
    fn = handler

    def factory(task: Any, lease: Any, on_done: Callable[[], None]) -> HandlerJob:
        return HandlerJob(fn, task, on_done=on_done)

    _run_jobs(factory, stop_event, backoff, sleep, runtime_url, name, api_key=api_key, concurrency=concurrency,
              labels=labels, ttl_seconds=ttl_seconds, grace_s=grace_s, poll_wait_s=poll_wait_s)


def run_command(
    command: str,
    *,
    runtime_url: str,
    name: str,
    api_key: str | None = None,
    concurrency: int = 1,
    labels: Iterable[str] = (),
    ttl_seconds: int | None = None,
    stop_event: threading.Event | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    poll_wait_s: float = DEFAULT_POLL_WAIT_S,
    backoff: Callable[[], Backoff] = Backoff,
    sleep: Callable[[float], Any] | None = None,
) -> None:
    """Like ``run`` but each task runs ``command`` through ``/bin/sh -c`` (what ``--exec`` does)."""
    _run_jobs(command_factory(command), stop_event, backoff, sleep, runtime_url, name, api_key=api_key,
              concurrency=concurrency, labels=labels, ttl_seconds=ttl_seconds, grace_s=grace_s,
              poll_wait_s=poll_wait_s)


def _run_jobs(
    factory: Callable[[Any, Any, Callable[[], None]], Any],
    stop_event: threading.Event | None,
    backoff: Callable[[], Backoff],
    sleep: Callable[[float], Any] | None,
    runtime_url: str,
    name: str,
    **options: Any,
) -> None:
    Worker(build_config(runtime_url, name, **options), factory, backoff=backoff, sleep=sleep).run(stop_event)


def command_factory(command: str) -> Callable[[Any, Any, Callable[[], None]], CommandJob]:
    def factory(task: Any, lease: Any, on_done: Callable[[], None]) -> CommandJob:
        return CommandJob(command, task, lease, max_output_bytes=MAX_OUTPUT_BYTES, on_done=on_done)

    return factory
