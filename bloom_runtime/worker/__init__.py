"""A reference pull worker: ``bloom-runtime worker`` and an embeddable loop.

``bloom-runtime worker --exec COMMAND`` runs a shell command per task;
``run(handler, runtime_url=…, name=…)`` runs a Python callable per task. Both are
the same loop (``loop.Worker``) with a different job.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any, overload

from bloom_runtime.engine.errors import ConfigError
from bloom_runtime.worker.client import Backoff, RuntimeClient, WorkerError
from bloom_runtime.worker.jobs import CommandJob, Handler, HandlerJob, Outcome
from bloom_runtime.worker.loop import MAX_OUTPUT_BYTES, MAX_POLL_WAIT_S, Worker, WorkerConfig

__all__ = [
    "Backoff",
    "Handler",
    "Outcome",
    "RuntimeClient",
    "Worker",
    "WorkerConfig",
    "WorkerError",
    "add_arguments",
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
    name, sep, secret = last.partition("=")
    return secret.strip() if sep and secret.strip() else last


def _config(
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


@overload
def run(handler: argparse.Namespace) -> int: ...


@overload
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
) -> None: ...


def run(
    handler: Handler | argparse.Namespace,
    *,
    runtime_url: str | None = None,
    name: str | None = None,
    api_key: str | None = None,
    concurrency: int = 1,
    labels: Iterable[str] = (),
    ttl_seconds: int | None = None,
    stop_event: threading.Event | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    poll_wait_s: float = DEFAULT_POLL_WAIT_S,
    backoff: Callable[[], Backoff] = Backoff,
    sleep: Callable[[float], Any] | None = None,
) -> int | None:
    """Claim tasks from ``runtime_url`` as worker ``name`` and answer each with ``handler(task)``.

    ``handler`` gets the task as a dict and returns its output (a str; a dict
    or list is sent as JSON). An exception becomes a retryable error result with
    its message. Runs until ``stop_event`` is set (or Ctrl-C), then lets running
    handlers finish within ``grace_s``; handlers still running after that are
    reported as retryable errors (Python code cannot be killed: their results
    are discarded). ``backoff`` builds the retry delays and ``sleep`` replaces
    the retry wait (both for tests). Raises ``WorkerError`` if the runtime
    refuses the worker for good (wrong key).

    Called with an ``argparse.Namespace`` this is the ``bloom-runtime worker``
    subcommand and returns its exit status.
    """
    if isinstance(handler, argparse.Namespace):
        return _run_cli(handler)
    if runtime_url is None or name is None:
        raise TypeError("run() needs runtime_url and name")
    config = _config(
        runtime_url,
        name,
        api_key=api_key,
        concurrency=concurrency,
        labels=labels,
        ttl_seconds=ttl_seconds,
        grace_s=grace_s,
        poll_wait_s=poll_wait_s,
    )
    fn = handler

    def factory(task: Any, lease: Any, on_done: Callable[[], None]) -> HandlerJob:
        return HandlerJob(fn, task, on_done=on_done)

    Worker(config, factory, backoff=backoff, sleep=sleep).run(stop_event)
    return None


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
    config = _config(
        runtime_url,
        name,
        api_key=api_key,
        concurrency=concurrency,
        labels=labels,
        ttl_seconds=ttl_seconds,
        grace_s=grace_s,
        poll_wait_s=poll_wait_s,
    )
    Worker(config, _command_factory(command), backoff=backoff, sleep=sleep).run(stop_event)


def _command_factory(command: str) -> Callable[[Any, Any, Callable[[], None]], CommandJob]:
    def factory(task: Any, lease: Any, on_done: Callable[[], None]) -> CommandJob:
        return CommandJob(command, task, lease, max_output_bytes=MAX_OUTPUT_BYTES, on_done=on_done)

    return factory


# --- the CLI subcommand -----------------------------------------------------------


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else None
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``worker``; each falls back to the environment variable named in its help."""
    parser.add_argument("--runtime-url", help="base URL of the runtime, e.g. http://127.0.0.1:5000 ($RUNTIME_URL)")
    parser.add_argument("--api-key", help="key sent as X-Runtime-API-Key ($RUNTIME_API_KEY; of a list, the last)")
    parser.add_argument("--name", help="worker id, unique per runtime ($WORKER_NAME)")
    parser.add_argument(
        "--exec",
        dest="exec_command",
        metavar="COMMAND",
        help="shell command run per task: prompt on stdin, output on stdout ($WORKER_EXEC)",
    )
    parser.add_argument("--concurrency", type=int, help="tasks run at once, 1..32 ($WORKER_CONCURRENCY, default 1)")
    parser.add_argument("--labels", help="comma-separated labels this worker offers ($WORKER_LABELS)")
    parser.add_argument("--ttl", type=int, help="lease TTL in seconds to ask for (default: the runtime's, timeout + 30)")
    parser.add_argument(
        "--grace",
        type=float,
        help=f"seconds running tasks get to finish after SIGTERM ($WORKER_GRACE, default {DEFAULT_GRACE_S:g})",
    )
    parser.add_argument(
        "--poll-wait",
        type=float,
        help=f"seconds one claim waits for a task, 0..30 ($WORKER_POLL_WAIT, default {DEFAULT_POLL_WAIT_S:g})",
    )


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _config_from_args(args: argparse.Namespace) -> tuple[WorkerConfig, str]:
    env = os.environ
    command = _first(args.exec_command, env.get("WORKER_EXEC") or None)
    if not command:
        raise ConfigError("worker needs --exec COMMAND (or $WORKER_EXEC)")
    labels_spec = _first(args.labels, env.get("WORKER_LABELS"), "")
    config = _config(
        _first(args.runtime_url, env.get("RUNTIME_URL")) or "",
        _first(args.name, env.get("WORKER_NAME")) or "",
        api_key=worker_api_key(_first(args.api_key, env.get("RUNTIME_API_KEY"))),
        concurrency=_first(args.concurrency, _env_int("WORKER_CONCURRENCY"), 1),
        labels=[label.strip() for label in labels_spec.split(",")],
        ttl_seconds=_first(args.ttl, _env_int("WORKER_TTL")),
        grace_s=_first(args.grace, _env_float("WORKER_GRACE"), DEFAULT_GRACE_S),
        poll_wait_s=_first(args.poll_wait, _env_float("WORKER_POLL_WAIT"), DEFAULT_POLL_WAIT_S),
    )
    return config, command


def _run_cli(args: argparse.Namespace) -> int:
    config, command = _config_from_args(args)
    worker = Worker(config, _command_factory(command))

    def stop(signame: str) -> None:
        log.info("received %s", signame)
        worker.request_stop()

    def on_signal(signum: int, frame: Any) -> None:
        # Setting events and logging take locks the interrupted main thread may
        # hold: do both on another thread.
        threading.Thread(target=stop, args=(signal.Signals(signum).name,), name="bloom-signal").start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
    except WorkerError as exc:
        log.error("worker stopped: %s", exc.message)
        return 2
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 0
