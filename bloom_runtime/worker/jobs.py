"""What a worker does with one task: run a shell command, or call a Python handler.

A job starts, finishes on its own (``done``), or is killed. The loop around it
owns timing, heartbeats and reporting; a job only knows how to run and stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol

STDERR_TAIL_BYTES = 4096  # how much of stderr an error result carries
READ_CHUNK_BYTES = 65_536
PIPE_DRAIN_TIMEOUT_S = 5.0  # after the process group is gone its pipes close at once; this only bounds odd cases
SHELL = "/bin/sh"
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch.py")
# The worker's own key never reaches the command it runs.
SCRUBBED_ENV = ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY", "MEMBRIDGE_ADMIN_KEY", "MEMBRIDGE_AGENT_KEY")

Handler = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Outcome:
    """What a finished job reports: the body of ``complete`` minus lease and metrics."""

    status: str  # "success" | "error"
    output: str | None = None
    error_message: str | None = None
    retryable: bool = True

    @classmethod
    def success(cls, output: str) -> Outcome:
        return cls("success", output=output)

    @classmethod
    def error(cls, message: str, *, retryable: bool = True, output: str | None = None) -> Outcome:
        return cls("error", output=output, error_message=message, retryable=retryable)


def check_format(outcome: Outcome, desired_format: str) -> Outcome:
    """A success whose output should be JSON and is not becomes an error."""
    if outcome.status != "success" or desired_format != "json":
        return outcome
    try:
        json.loads(outcome.output or "")
    except ValueError as exc:
        return Outcome.error(f"output is not valid JSON ({exc})", output=outcome.output)
    return outcome


class Job(Protocol):
    """One task being worked on."""

    done: threading.Event

    def start(self) -> None: ...

    def kill(self) -> None: ...

    def outcome(self) -> Outcome: ...

    def join(self, timeout_s: float | None = None) -> bool: ...


def task_environment(task: Mapping[str, Any], lease: Mapping[str, Any], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: ours without secrets, plus the task's fields."""
    env = dict(os.environ if base is None else base)
    for name in SCRUBBED_ENV:
        env.pop(name, None)
    policy = task.get("policy") or {}
    env.update(
        BLOOM_TASK_ID=str(task.get("id", "")),
        BLOOM_CONTEXT_ID=str(task.get("context_id", "")),
        BLOOM_AGENT_SLUG=str(task.get("agent_slug", "")),
        BLOOM_DESIRED_FORMAT=str(task.get("desired_format") or "text"),
        BLOOM_CONTEXT_HINTS=json.dumps(list(task.get("context_hints") or []), ensure_ascii=False),
        BLOOM_ATTEMPT=str(task.get("attempts", "")),
        BLOOM_MAX_ATTEMPTS=str(task.get("max_attempts", "")),
        BLOOM_TIMEOUT_SEC=str(policy.get("timeout_sec", "")),
        BLOOM_LEASE_ID=str(lease.get("id", "")),
    )
    return env


class CommandJob:
    """``/bin/sh -c COMMAND`` in its own process group, prompt on stdin (see ``command_argv``).

    Stdout is kept up to ``max_output_bytes`` (beyond that the job is an error;
    the rest is drained so the command never blocks on a full pipe); stderr
    keeps only its tail. When the shell exits, whatever it left behind in its
    group is killed too, before the shell is reaped, so the group id cannot
    have been reused by an unrelated process.
    """

    def __init__(
        self,
        command: str,
        task: Mapping[str, Any],
        lease: Mapping[str, Any],
        *,
        max_output_bytes: int,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.command = command
        self.task = task
        self.lease = lease
        self.max_output_bytes = max_output_bytes
        self.done = threading.Event()
        self._on_done = on_done
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # guards _reaped against kill() racing the reaper
        self._reaped = False
        self._killed = False
        self._stdout = bytearray()
        self._stdout_overflow = False
        self._stderr_tail = b""
        self._threads: list[threading.Thread] = []
        self._reaper: threading.Thread | None = None

    def start(self) -> None:
        proc = subprocess.Popen(
            command_argv(self.command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=task_environment(self.task, self.lease),
            start_new_session=True,  # own process group: one killpg reaches every child
            close_fds=True,
        )
        self._proc = proc
        tid = str(self.task.get("id", ""))[:8]
        assert proc.stdin and proc.stdout and proc.stderr
        self._threads = [
            threading.Thread(target=self._feed, args=(proc.stdin,), name=f"bloom-stdin-{tid}"),
            threading.Thread(target=self._read_stdout, args=(proc.stdout,), name=f"bloom-stdout-{tid}"),
            threading.Thread(target=self._read_stderr, args=(proc.stderr,), name=f"bloom-stderr-{tid}"),
        ]
        for t in self._threads:
            t.start()
        self._reaper = threading.Thread(target=self._reap, name=f"bloom-reap-{tid}")
        self._reaper.start()

    def kill(self) -> None:
        with self._lock:
            if self._proc is None or self._reaped:
                return
            self._killed = True
            _killpg(self._proc.pid)

    def join(self, timeout_s: float | None = None) -> bool:
        if self._reaper is not None:
            self._reaper.join(timeout_s)
        return self.done.is_set()

    def outcome(self) -> Outcome:
        assert self._proc is not None and self.done.is_set()
        rc = self._proc.returncode
        tail = self._stderr_tail.decode("utf-8", errors="replace").strip()
        if rc == 0:
            if self._stdout_overflow:
                return Outcome.error(f"output exceeds {self.max_output_bytes} bytes", retryable=False)
            return Outcome.success(self._stdout.decode("utf-8", errors="replace"))
        reason = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        return Outcome.error(f"{reason}: {tail}" if tail else reason)

    # --- threads -----------------------------------------------------------------

    def _feed(self, pipe: IO[bytes]) -> None:
        prompt = str(self.task.get("prompt") or "").encode("utf-8")
        try:
            pipe.write(prompt)
        except OSError:
            pass  # the command exited without reading all of its stdin: its choice
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def _read_stdout(self, pipe: IO[bytes]) -> None:
        with pipe:
            while chunk := pipe.read1(READ_CHUNK_BYTES):  # type: ignore[attr-defined]
                room = self.max_output_bytes - len(self._stdout)
                if len(chunk) > room:
                    self._stdout_overflow = True
                    chunk = chunk[: max(room, 0)]
                self._stdout += chunk

    def _read_stderr(self, pipe: IO[bytes]) -> None:
        with pipe:
            while chunk := pipe.read1(READ_CHUNK_BYTES):  # type: ignore[attr-defined]
                self._stderr_tail = (self._stderr_tail + chunk)[-STDERR_TAIL_BYTES:]

    def _reap(self) -> None:
        proc = self._proc
        assert proc is not None
        try:
            # Wait for the shell to exit without reaping it, so its pid stays ours
            # while we clean up the group it leads.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        with self._lock:
            _killpg(proc.pid)
            proc.wait()
            self._reaped = True
        for t in self._threads:
            t.join(PIPE_DRAIN_TIMEOUT_S)
        self.done.set()
        self._on_done()


def command_argv(command: str) -> list[str]:
    """``/bin/sh -c COMMAND``, on Linux under ``launch.py`` so it dies with the worker, even by SIGKILL."""
    shell = [SHELL, "-c", command]
    if not sys.platform.startswith("linux") or not sys.executable:
        return shell
    return [sys.executable, "-I", "-S", LAUNCHER, str(os.getpid()), *shell]


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


class HandlerJob:
    """A Python callable run in its own thread.

    Python code cannot be killed from outside: ``kill`` only stops the loop from
    waiting; the handler runs on, its result is discarded, and its slot stays
    taken until it returns so the worker never runs more than its concurrency.
    """

    def __init__(self, handler: Handler, task: Mapping[str, Any], *, on_done: Callable[[], None] = lambda: None) -> None:
        self.handler = handler
        self.task = task
        self.done = threading.Event()
        self._on_done = on_done
        self._result: Outcome | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._call, name=f"bloom-handler-{str(self.task.get('id', ''))[:8]}")
        self._thread.start()

    def kill(self) -> None:
        pass  # see the class docstring

    def join(self, timeout_s: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.done.is_set()

    def outcome(self) -> Outcome:
        assert self._result is not None
        return self._result

    def _call(self) -> None:
        try:
            value = self.handler(dict(self.task))
            if isinstance(value, str):
                self._result = Outcome.success(value)
            elif value is None:
                self._result = Outcome.success("")
            elif isinstance(value, (dict, list)):
                self._result = Outcome.success(json.dumps(value, ensure_ascii=False))
            else:
                self._result = Outcome.error(f"handler returned {type(value).__name__}, expected str", retryable=False)
        except Exception as exc:  # the handler's failure is the task's error, never the worker's
            self._result = Outcome.error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        finally:
            self.done.set()
            self._on_done()
