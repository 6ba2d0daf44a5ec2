"""The worker loop: register, claim while a slot is free, supervise each task, report.

Threads, all non-daemon:
- the caller's thread waits for the stop request, then drains (``Worker.run``);
- one claimer registers and long-polls ``claim`` whenever a slot is free;
- one supervisor per task starts the job, heartbeats its lease, enforces the
  task's timeout, and completes it.

Every heartbeat and completion names the lease and the worker, so a worker
whose lease went stale changes nothing on the runtime.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bloom_runtime import __version__
from bloom_runtime.worker.client import (
    Backoff,
    Busy,
    Grant,
    Rejected,
    RuntimeClient,
    Transient,
    UnknownWorker,
    WorkerError,
    encode_body,
)
from bloom_runtime.worker.completions import CompletionSender
from bloom_runtime.worker.jobs import Job, Outcome, check_format

log = logging.getLogger("bloom_runtime.worker")

MAX_BODY_BYTES = 2 * 1024 * 1024  # the runtime's request body limit
MAX_OUTPUT_BYTES = MAX_BODY_BYTES - 64 * 1024  # room for the rest of the completion body
DEFAULT_TIMEOUT_SEC = 120  # a task without policy.timeout_sec (the runtime's default)
LEASE_GRACE_S = 30  # the runtime's default TTL is timeout + this
MIN_HEARTBEAT_S = 0.2  # never heartbeat faster than this, whatever the TTL
FINAL_REPORT_S = 10.0  # after the grace, how long results may still try to reach the runtime
MAX_POLL_WAIT_S = 30
# A claim waits this long at most for the results being sent, whose slots free together
# when the answer comes: one claim then takes them all, not one claim per freed slot.
REPORTS_WAIT_S = 0.5
STOP_CHECK_S = 0.5  # longest the main thread blocks at once, so signal handlers and inside stops run promptly

JobFactory = Callable[[Mapping[str, Any], Mapping[str, Any], Callable[[], None]], Job]


@dataclass(frozen=True)
class WorkerConfig:
    """Who the worker is and how it behaves (CLI flags map one to one)."""

    runtime_url: str
    name: str
    api_key: str | None = None
    concurrency: int = 1
    labels: Sequence[str] = ()
    ttl_seconds: int | None = None
    grace_s: float = 30.0
    poll_wait_s: float = 10.0
    agent_version: str = f"bloom-runtime {__version__}"
    install_method: str = "bloom-runtime worker"
    extra_capabilities: Mapping[str, Any] = field(default_factory=dict)

    def registration(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": "online",
            "capabilities": {
                **self.extra_capabilities,
                "claude_cli": True,
                "max_concurrency": self.concurrency,
                "labels": list(self.labels),
            },
            "agent_version": self.agent_version,
            "os_info": platform.platform(),
            "install_method": self.install_method,
        }


@dataclass(eq=False)  # identity: slots live in a set
class _Slot:
    """One task in flight."""

    grant: Grant
    job: Job | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    reported: threading.Event = field(default_factory=threading.Event)
    reporting: bool = False  # its result is being sent
    thread: threading.Thread | None = None


class Worker:
    """A pull worker bound to one runtime; ``run`` blocks until stopped and drained."""

    def __init__(
        self,
        config: WorkerConfig,
        job_factory: JobFactory,
        *,
        backoff: Callable[[], Backoff] = Backoff,
        sleep: Callable[[float], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= config.concurrency <= 32:
            raise WorkerError("concurrency must be between 1 and 32")
        if not 0 <= config.poll_wait_s <= MAX_POLL_WAIT_S:
            raise WorkerError(f"poll wait must be between 0 and {MAX_POLL_WAIT_S} seconds")
        self.config = config
        self._job_factory = job_factory
        self._new_backoff = backoff
        self._sleep = sleep
        self._clock = clock
        # a connection per task thread plus the claimer's long poll
        self._client = RuntimeClient(config.runtime_url, config.api_key, max_connections=config.concurrency + 2)
        # Results finishing together share a request (one transaction on the runtime).
        self._completions = CompletionSender(self._client, config.name, max_batch=config.concurrency)
        self._cond = threading.Condition()
        self._slots: set[_Slot] = set()  # running or reporting; a slot frees when its job has ended
        self._stop = threading.Event()  # no more claims
        self._kill_now = threading.Event()  # the grace is over: kill what still runs
        self._give_up = threading.Event()  # results that could not be delivered by now are dropped
        self._fatal: WorkerError | None = None
        self._claiming = True  # the claimer thread may still start a task
        self._stop_requests = 0
        self.registered = threading.Event()

    # --- public ---------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop claiming; a second request skips the grace and kills running tasks."""
        with self._cond:
            self._stop_requests += 1
            again = self._stop_requests > 1
            self._stop.set()
            self._cond.notify_all()
        if again:
            self._end_grace()

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Work until ``stop_event`` is set (or ``request_stop``), then drain within the grace.

        Raises ``WorkerError`` after draining if the runtime refused the worker
        for good (wrong key, invalid registration).
        """
        claimer = threading.Thread(target=self._claim_loop, name=f"bloom-claimer-{self.config.name}")
        claimer.start()
        try:
            try:
                # Wait in short steps: a signal delivered to another thread only runs its
                # Python handler once the main thread wakes, and a stop from inside (a
                # fatal refusal) must be noticed too.
                wait = stop_event.wait if stop_event is not None else self._stop.wait
                while not self._stop.is_set() and not wait(STOP_CHECK_S):
                    pass
            except KeyboardInterrupt:
                pass  # embedded in a program run from a terminal: Ctrl-C drains like SIGTERM
            if not self._stop.is_set():
                self.request_stop()
            self._drain(claimer)
        finally:
            # Whatever way we leave (a crash, an interrupt in the drain), no command outlives
            # us, and no result is retried after we are gone.
            self._kill_running()
            self._give_up.set()
            self._client.close()
        if self._fatal is not None:
            raise self._fatal

    # --- claiming ---------------------------------------------------------------

    def _pause(self, delay_s: float, cancel: threading.Event) -> None:
        if self._sleep is not None:
            self._sleep(delay_s)
        else:
            cancel.wait(delay_s)

    def _claim_loop(self) -> None:
        backoff = self._new_backoff()
        registered = False
        try:
            while not self._stop.is_set():
                if not registered:
                    try:
                        self._client.register(self.config.registration())
                    except Transient as exc:
                        delay = exc.retry_after_s if exc.retry_after_s is not None else backoff.next_delay()
                        log.warning("register failed (%s); retrying in %.2f s", exc, delay)
                        self._pause(delay, self._stop)
                        continue
                    registered = True
                    self.registered.set()
                    log.info("worker %s registered at %s (concurrency %d)", self.config.name, self.config.runtime_url, self.config.concurrency)
                with self._cond:
                    self._cond.wait_for(lambda: self._stop.is_set() or len(self._slots) < self.config.concurrency)
                    if self._stop.is_set():
                        break
                    if self.config.concurrency > 1:
                        self._cond.wait_for(lambda: self._stop.is_set() or not any(s.reporting for s in self._slots),
                                            REPORTS_WAIT_S)
                    free = self.config.concurrency - len(self._slots)
                try:
                    # One claim for every free slot: the runtime leases them in one transaction.
                    grants = self._client.claim(self.config.name, self.config.poll_wait_s, self.config.ttl_seconds, free)
                except UnknownWorker:
                    # Paced like a failure: a runtime that forgets us at once must not be hammered.
                    delay = backoff.next_delay()
                    log.warning("runtime does not know worker %s (restarted or deleted it); registering again in %.2f s", self.config.name, delay)
                    registered = False
                    self._pause(delay, self._stop)
                    continue
                except Transient as exc:
                    delay = exc.retry_after_s if exc.retry_after_s is not None else backoff.next_delay()
                    # a busy runtime's short poll is routine, not worth a warning each time
                    log.log(logging.DEBUG if isinstance(exc, Busy) else logging.WARNING, "claim failed (%s); retrying in %.2f s", exc, delay)
                    self._pause(delay, self._stop)
                    continue
                backoff.reset()
                for grant in grants:
                    # Taken even if a stop arrived during the poll: the lease is ours now,
                    # and running the task beats burning one of its attempts.
                    self._start(grant)
        except WorkerError as exc:
            log.error("%s", exc.message)
            self._fatal = exc
            self._stop.set()
        except Exception:  # a bug here must not leave the caller waiting forever
            log.exception("claim loop crashed")
            self._fatal = WorkerError("claim loop crashed; see the log")
            self._stop.set()
        finally:
            with self._cond:
                self._claiming = False
                self._cond.notify_all()  # the drain waits for the claimer to end

    def _start(self, grant: Grant) -> None:
        slot = _Slot(grant)
        slot.thread = threading.Thread(target=self._supervise, args=(slot,), name=f"bloom-task-{str(grant.task.get('id'))[:8]}")
        with self._cond:
            self._slots.add(slot)
        slot.thread.start()

    # --- one task ------------------------------------------------------------------

    def _supervise(self, slot: _Slot) -> None:
        task, lease = slot.grant.task, slot.grant.lease
        task_id, lease_id = str(task["id"]), str(lease["id"])
        policy = task.get("policy") or {}
        timeout_s = float(policy.get("timeout_sec") or DEFAULT_TIMEOUT_SEC)
        ttl = float(lease.get("ttl_seconds") or self.config.ttl_seconds or timeout_s + LEASE_GRACE_S)
        beat_every = max(ttl / 3, MIN_HEARTBEAT_S)
        started = self._clock()
        lease_deadline = started + ttl
        next_beat = started + beat_every
        timeout_at = started + timeout_s
        beat_backoff = self._new_backoff()
        job: Job | None = None
        outcome: Outcome | None = None
        try:
            job = slot.job = self._job_factory(task, lease, slot.wake.set)
            try:
                job.start()
            except OSError as exc:
                outcome = Outcome.error(f"could not start the command: {exc}")
                job = None
            while outcome is None and job is not None:
                now = self._clock()
                if job.done.is_set():
                    outcome = job.outcome()
                elif self._kill_now.is_set():
                    job.kill()
                    outcome = Outcome.error(f"worker shutting down: stopped after the {self.config.grace_s:g} s grace")
                elif now >= timeout_at:
                    job.kill()
                    outcome = Outcome.error(f"timed out after {timeout_s:g} s")
                elif now >= lease_deadline:
                    # No renewal got through for a whole TTL: the runtime has (or will)
                    # hand the task to someone else, so our result would be stale.
                    job.kill()
                    self._log_task(task_id, "lost", started, "lease expired before a heartbeat got through; result dropped")
                    return
                elif now >= next_beat:
                    try:
                        renewed = self._client.heartbeat(task_id, lease_id, self.config.name, slot.grant.token)
                    except Transient as exc:
                        delay = min(beat_backoff.next_delay(), beat_every)
                        log.warning("heartbeat for task %s failed (%s); retrying in %.2f s", task_id, exc, delay)
                        next_beat = self._clock() + delay
                        continue
                    if renewed is None:
                        job.kill()
                        self._log_task(task_id, "stale", started, "lease is no longer ours; task killed, result dropped")
                        return
                    beat_backoff.reset()
                    new_ttl = (renewed.get("lease") or {}).get("ttl_seconds")
                    if new_ttl:
                        ttl = float(new_ttl)
                        beat_every = max(ttl / 3, MIN_HEARTBEAT_S)
                    lease_deadline = self._clock() + ttl
                    next_beat = self._clock() + beat_every
                else:
                    slot.wake.wait(max(0.0, min(next_beat, timeout_at, lease_deadline) - now))
                    slot.wake.clear()
            assert outcome is not None
            outcome = check_format(outcome, str(task.get("desired_format") or "text"))
            slot.reporting = True  # read under the lock by the claimer; it frees with the slot
            self._report(task_id, lease_id, slot.grant.token, outcome, started, lease_deadline)
        except WorkerError as exc:  # e.g. the key was revoked mid-task
            log.error("task %s abandoned: %s", task_id, exc.message)
            if job is not None:
                job.kill()
        except Exception:
            log.exception("supervising task %s crashed", task_id)
            if job is not None:
                job.kill()
        finally:
            slot.reported.set()
            with self._cond:
                self._cond.notify_all()
            if job is not None:
                job.join()  # a Python handler we could not kill keeps its slot until it returns
            with self._cond:
                self._slots.discard(slot)
                self._cond.notify_all()

    def _report(self, task_id: str, lease_id: str, token: str | None, outcome: Outcome, started: float, lease_deadline: float) -> None:
        duration_ms = round((self._clock() - started) * 1000, 3)
        body = self._completion(outcome, lease_id, token, duration_ms)
        if len(encode_body(body)) > MAX_BODY_BYTES:
            outcome = Outcome.error(f"output too large for the runtime ({len(outcome.output or '')} characters)", retryable=False)
            body = self._completion(outcome, lease_id, token, duration_ms)
        backoff = self._new_backoff()
        while True:
            try:
                accepted = self._completions.complete(task_id, body)
            except Transient as exc:
                delay = exc.retry_after_s if exc.retry_after_s is not None else backoff.next_delay()
                if self._clock() + delay > lease_deadline or self._give_up.is_set():
                    self._log_task(task_id, outcome.status, started, f"result not delivered ({exc}); the runtime will retry the task", duration_ms)
                    return
                log.warning("complete for task %s failed (%s); retrying in %.2f s", task_id, exc, delay)
                self._pause(delay, self._give_up)
                continue
            except Rejected as exc:
                if outcome.status == "success" or outcome.output is not None:
                    # Keep the attempt: report why the result could not be taken.
                    outcome = Outcome.error(f"runtime rejected the result: {exc}", retryable=outcome.retryable)
                    body = self._completion(outcome, lease_id, token, duration_ms)
                    continue
                self._log_task(task_id, outcome.status, started, f"runtime rejected the result: {exc}", duration_ms)
                return
            if accepted is None:
                self._log_task(task_id, "stale", started, "lease is no longer ours; result dropped", duration_ms)
            else:
                self._log_task(task_id, outcome.status, started, outcome.error_message, duration_ms)
            return

    def _completion(self, outcome: Outcome, lease_id: str, token: str | None, duration_ms: float) -> dict[str, Any]:
        body = {
            "status": outcome.status,
            "output": outcome.output,
            "error_message": outcome.error_message,
            "metrics": {"duration_ms": duration_ms, "tokens_used": None},
            "lease_id": lease_id,
            "worker_id": self.config.name,
            "retryable": outcome.retryable,
        }
        if token is not None:
            body["lease_token"] = token
        return body

    def _log_task(self, task_id: str, status: str, started: float, detail: str | None, duration_ms: float | None = None) -> None:
        ms = duration_ms if duration_ms is not None else (self._clock() - started) * 1000
        level = logging.INFO if status == "success" else logging.WARNING
        log.log(level, "task %s %s %.0f ms%s", task_id, status, ms, f": {detail}" if detail else "")

    # --- stopping ----------------------------------------------------------------

    def _kill_running(self) -> None:
        self._kill_now.set()
        with self._cond:
            jobs = [slot.job for slot in self._slots if slot.job is not None]
        for job in jobs:
            job.kill()

    def _end_grace(self) -> None:
        self._kill_now.set()
        with self._cond:
            for slot in self._slots:
                slot.wake.set()
            self._cond.notify_all()  # the drain stops waiting out the grace

    def _drain(self, claimer: threading.Thread) -> None:
        deadline = self._clock() + self.config.grace_s
        if self._slots:
            log.info("stopping: no new claims; waiting up to %g s for %d running task(s)", self.config.grace_s, len(self._slots))
        else:
            log.info("stopping: no new claims; waiting for the claim in flight (at most %g s)", self.config.poll_wait_s)

        def settled() -> bool:
            return not self._claiming and all(s.reported.is_set() for s in self._slots)

        with self._cond:
            while not settled() and not self._kill_now.is_set():
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(min(left, STOP_CHECK_S))
        self._end_grace()
        # A claim in flight may still bring a task; it is killed at once and reported.
        claimer.join()
        self._end_grace()
        final = self._clock() + FINAL_REPORT_S
        with self._cond:
            while not all(s.reported.is_set() for s in self._slots):
                left = final - self._clock()
                if left <= 0:
                    break
                self._cond.wait(min(left, STOP_CHECK_S))
        self._give_up.set()
        with self._cond:
            pending = [s for s in self._slots if not s.reported.is_set()]
        for slot in pending:
            assert slot.thread is not None
            slot.thread.join(FINAL_REPORT_S)
        log.info("worker %s stopped", self.config.name)
