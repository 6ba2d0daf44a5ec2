"""The ``bloom-runtime worker`` subcommand: flags (each backed by an environment
variable), signal handling, and the command loop of ``bloom_runtime.worker``."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

from bloom_runtime.engine.errors import ConfigError
from bloom_runtime.worker import (
    DEFAULT_GRACE_S,
    DEFAULT_POLL_WAIT_S,
    build_config,
    command_factory,
    log,
    worker_api_key,
)
from bloom_runtime.worker.client import WorkerError
from bloom_runtime.worker.loop import Worker, WorkerConfig


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
    config = build_config(
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


def run(args: argparse.Namespace) -> int:
    """Run the worker until SIGTERM/SIGINT; 0 on a clean stop, 2 if the runtime refuses it."""
    config, command = _config_from_args(args)
    worker = Worker(config, command_factory(command))

    with _SignalWatcher(worker.request_stop):
        try:
            worker.run()
        except WorkerError as exc:
            log.error("worker stopped: %s", exc.message)
            return 2
    return 0


class _SignalWatcher:
    """Calls ``on_signal`` for every SIGTERM/SIGINT, at once, on a thread of its own.

    CPython runs Python signal handlers only in the main thread, and only when it
    next executes bytecode; a signal the kernel delivers to another thread can
    wait there. The C-level handler writes each signal number to a wakeup pipe
    straight away, so this thread reads it instead. A second signal therefore
    also arrives promptly (it skips the grace).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_signal: Any) -> None:
        self._on_signal = on_signal
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(target=self._watch, name="bloom-signals")

    def __enter__(self) -> _SignalWatcher:
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        # A Python handler must be set for the wakeup pipe to be written; the work is done by _watch.
        self._previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in self.SIGNALS}
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.write(self._write, b"\0")  # no signal is numbered 0: it tells _watch to end
        self._thread.join()
        os.close(self._read)
        os.close(self._write)

    def _watch(self) -> None:
        while True:
            for signum in os.read(self._read, 64):
                if signum == 0:
                    return
                if signum in self.SIGNALS:
                    log.info("received %s", signal.Signals(signum).name)
                    self._on_signal()
