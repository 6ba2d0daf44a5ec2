"""Push dispatch: ``engine.dispatch``, the facade over the Dispatcher actor.

``dispatch(task_id)`` leases the task to a worker with a verified URL (named,
or picked as ``pick`` does among push workers whose breaker is closed), has the
Dispatcher record the delivery and send it, and returns at once; with
``wait_s`` it waits that long for the agent's answer. A task already sent is
answered with its delivery, not refused.

``send`` is what a delivery thread runs: ``POST {url}/execute-task`` waiting up
to ``policy.timeout_sec + DISPATCH_GRACE`` (the real agent answers only after
its run and its complete callback), then settling the lease by what happened:

- provably never reached the agent (connection refused, address refused,
  breaker open): the lease fails and its attempt is given back;
- refused by the agent (4xx, or 503 without the CLI): the lease fails, using the
  attempt (nothing ran, but retrying the same refusal forever would loop);
- answered (``ok`` true or false) while the lease is still active: the agent's
  result never reached the runtime (its callback was refused or late), so the
  lease fails and the task is retried rather than waiting for the TTL;
- no answer (timed out, connection dropped, 5xx): the run may still be going,
  so the lease is left to its TTL and no second run starts meanwhile.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec

from bloom_runtime.actors.base import Tick
from bloom_runtime.actors.dispatcher import Deliver, Outcome

from .errors import (
    BloomError,
    Conflict,
    InvalidInput,
    MembridgeError,
    MembridgeUnavailable,
    NoCapacity,
    NotFound,
    OutcomeUnknown,
    UnsafeURL,
)
from .models import DELIVERY_STATES, Delivery, LeaseGrant, Task, Worker, new_id
from .outgoing import MembridgeResponse, upstream_reason
from .urls import join, validate_outgoing_url
from .worker_trust import require_verified, with_verification

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("bloom_runtime.dispatch")

LEASE_PREFIX = "/api/leases"  # runtime_url = public URL + /api/leases/{lease_id}/{lease_token}
MAX_WAIT_S = 30.0
POLL_OTHER_PROCESS_S = 0.5  # a delivery another process sent is only seen in the store
MAX_DETAIL_CHARS = 500
AUTO_ACTOR = "auto-dispatch"
NOT_CONFIGURED_RETRY_AFTER_S = 60
PROBE_TIMEOUT_S = 5.0  # a round waits for its slowest probe before the next starts
MAX_PLAN_SCAN = 500  # queued tasks one plan looks at, at most
PLAN_SCAN_FACTOR = 4  # ... and at most this many per free slot (some may need labels no push worker has)
PLAN_CONCURRENCY = 16  # leases a plan asks for at once
TRUST_RECHECK_S = 1.0  # with no URL vouched for, how often a plan reads that again
# Delivery states in which the agent took the task (dispatched: true).
TAKEN = frozenset({"sent", "answered", "agent_error", "callback_missing", "unknown"})


class DispatchOutcome(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    worker: Worker | None  # None once the worker was removed
    delivery: Delivery
    lease_token: str | None  # only to the caller that created the delivery
    created: bool  # False: the task had been sent already; this is that delivery
    execution: Any = None  # the agent's answer, when waited for and given


class DispatchService:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._waiters: dict[str, threading.Event] = {}
        self._answers: dict[str, Any] = {}  # delivery id → the agent's answer, for waiting callers
        self._in_flight = 0
        self._outcomes: dict[str, int] = dict.fromkeys(DELIVERY_STATES[1:], 0)  # recorded here, since start
        # When no URL was vouched for, the planner looks again only after this (monotonic),
        # or once this process changed a worker: a plan per queued task reads nothing then.
        self._untrusted_until = float("-inf")
        self._worker_changes = 0

    # --- the facade ----------------------------------------------------------------

    def dispatch(
        self, task_id: str, worker_id: str | None = None, ttl_seconds: int | None = None, *, wait_s: float = 0.0,
        actor: str = "api",
    ) -> DispatchOutcome:
        """Lease the task to a push worker and send it; see the module docstring.

        Raises ``NotFound``, ``Conflict`` (not queued and never sent; or the named
        worker cannot be pushed to), ``NoCapacity`` (no push worker free, or every
        delivery thread busy) and ``MembridgeUnavailable`` (the worker's breaker is open)."""
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= MAX_WAIT_S:
            raise InvalidInput(f"wait_seconds must be between 0 and {MAX_WAIT_S:g}")
        engine = self._engine
        if not engine.settings.callback_known:
            raise MembridgeUnavailable("push dispatch needs RUNTIME_PUBLIC_URL: the URL worker agents call back on",
                                       retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)
        task = engine.store.get_task(task_id)
        if task.status != "queued" and task.lease_id is not None:
            existing = engine.store.latest_delivery(task_id)
            if existing is not None and existing.lease_id == task.lease_id:
                try:
                    return self._answer(existing, wait_s, None, created=False)
                finally:
                    self._unwatch(existing.id)
        exclude = self._open_breakers()
        if worker_id is not None:
            self._check_target(worker_id, exclude)
        if not self._reserve():
            raise NoCapacity("every delivery thread is busy; retry shortly", task_id=task_id)
        try:
            grant = engine.leases.acquire(task_id, worker_id, ttl_seconds, actor=actor, push=True, exclude=exclude)
        except NoCapacity:
            self._release()
            retry = self._soonest_retry(exclude)
            if retry is not None and worker_id is None:
                raise MembridgeUnavailable("every push worker that could take this task has its circuit breaker open",
                                           retry_after_s=retry, task_id=task_id) from None
            raise
        except BaseException:
            self._release()
            raise
        delivery_id = new_id()
        if wait_s > 0:
            self._watch(delivery_id)  # before it is sent: a fast agent may answer at once
        try:
            delivery = self.deliver(grant, actor=actor, reserved=True, delivery_id=delivery_id)
            return self._answer(delivery, wait_s, engine.leases.token(grant.lease.id), created=True)
        finally:
            self._unwatch(delivery_id)

    def deliver(self, grant: LeaseGrant, *, actor: str, reserved: bool = False, delivery_id: str | None = None) -> Delivery:
        """Record and send a delivery for a granted lease (the slot reserved, or reserve one)."""
        engine = self._engine
        if not reserved and not self._reserve():
            engine.leases.fail(grant.lease.id, "dispatch failed: every delivery thread is busy", actor=actor, refund=True)
            raise NoCapacity("every delivery thread is busy; retry shortly", task_id=grant.task.id)
        try:
            url = validate_outgoing_url(grant.worker.url, engine.allowed)
            timeout_s = grant.task.policy.timeout_sec + engine.settings.dispatch_grace_s
            payload = self._payload(grant)
            return engine.call("dispatcher", lambda r: Deliver(grant, url, payload, timeout_s, actor, r, delivery_id or new_id()))
        except OutcomeUnknown:
            # The dispatcher was recording it when the ask ran out: it may be sent yet, so
            # the lease is left to its TTL rather than handed to a second worker.
            self._release()
            raise
        except BaseException as exc:
            self._release()
            # Nothing was sent: give the lease back without using its attempt.
            try:
                engine.leases.fail(grant.lease.id, f"dispatch failed before sending: {getattr(exc, 'message', type(exc).__name__)}",
                                   actor=actor, refund=True)
            except BloomError as fail_exc:
                log.warning("could not fail lease %s after a failed delivery: %s", grant.lease.id, fail_exc.message)
            raise

    def latest(self, task_id: str) -> Delivery | None:
        """The task's latest delivery (None if it was never pushed)."""
        return self._engine.store.latest_delivery(task_id)

    def expire_now(self) -> int:
        """Mark unknown the deliveries left unanswered past their deadline; returns how many."""
        return self._engine.call("dispatcher", lambda r: Tick(r))

    def runtime_url(self, lease_id: str) -> str:
        """The callback base handed to an agent: it embeds the lease's token, which authorises
        that lease's heartbeat and complete (no API key needed) and fences late callbacks."""
        return self._engine.settings.callback_base_url + join(LEASE_PREFIX, lease_id, self._engine.leases.token(lease_id))

    # --- automatic dispatch (the planner thread) ---------------------------------------------

    def plan_once(self) -> int:
        """Push due queued tasks, oldest first, to free workers with a verified URL, as many
        as they have room for; returns how many were sent. Pull workers claim from the same
        queue and other engine processes plan too: the lease grant decides who gets a task."""
        engine = self._engine
        if not engine.running:
            return 0
        if engine.allowed is None and time.monotonic() < self._untrusted_until:
            return 0
        changes = self._worker_changes
        vouched = engine.store.worker_trust()
        if not vouched and engine.allowed is None and changes == self._worker_changes:
            # No URL is vouched for and no host allowed: no worker can be pushed to. Another
            # process's vouching is seen within TRUST_RECHECK_S, this one's at once.
            self._untrusted_until = time.monotonic() + TRUST_RECHECK_S
            return 0
        exclude = self._open_breakers()
        workers = [w for w in (with_verification(w, vouched, engine.allowed) for w in engine.store.list_workers("online"))
                   if w.url_verified and w.capabilities.claude_cli and w.id not in exclude]
        room = sum(max(0, w.free_capacity) for w in workers)
        room = min(room, engine.settings.dispatch_max_in_flight - self.in_flight)
        if room <= 0:
            return 0
        chosen = [
            task for task in engine.store.due_tasks(engine.clock.now_ms(), min(MAX_PLAN_SCAN, room * PLAN_SCAN_FACTOR))
            if any(set(task.labels) <= set(w.capabilities.labels) for w in workers)  # else for pull workers (or nobody)
        ][:room]
        if not chosen:
            return 0
        # Several at once: the registry still routes them one by one, and the lease
        # supervisor and the dispatcher then write them in shared transactions.
        with ThreadPoolExecutor(max_workers=min(len(chosen), PLAN_CONCURRENCY), thread_name_prefix="auto-dispatch-push") as pool:
            return sum(pool.map(lambda task: self._push(task, exclude), chosen))

    def workers_changed(self) -> None:
        """A worker was registered, updated or removed here: its URL may be vouched for now."""
        self._worker_changes += 1
        self._untrusted_until = float("-inf")

    def _push(self, task: Task, exclude: frozenset[str]) -> bool:
        """Lease one due task to a push worker and send it; False when it went elsewhere."""
        engine = self._engine
        if not engine.running or not self._reserve():
            return False
        try:
            grant = self._lease_for_retry(task, exclude) if task.attempts else None
            grant = grant or engine.leases.acquire(task.id, actor=AUTO_ACTOR, push=True, exclude=exclude)
        except (Conflict, NotFound, NoCapacity):
            self._release()  # taken meanwhile (a pull worker, another process), or no fit after all
            return False
        except BloomError as exc:
            self._release()
            log.warning("automatic dispatch of task %s: %s", task.id, exc.message)
            return False
        try:
            self.deliver(grant, actor=AUTO_ACTOR, reserved=True)
        except BloomError as exc:
            log.warning("automatic dispatch of task %s failed before sending: %s", task.id, exc.message)
            return False
        return True

    def _lease_for_retry(self, task: Task, exclude: frozenset[str]) -> LeaseGrant | None:
        """A retry goes to another worker than the one its last delivery went to, if one can take it."""
        last = self._engine.store.latest_delivery(task.id)
        if last is None:
            return None
        try:
            return self._engine.leases.acquire(task.id, actor=AUTO_ACTOR, push=True, exclude=exclude | {last.worker_id})
        except NoCapacity:
            return None

    # --- liveness probes (probe threads) -----------------------------------------------------

    def probe_targets(self) -> list[Worker]:
        """Workers the runtime probes: every one with a verified URL, whatever its status."""
        return [w for w in self._engine.workers.list() if w.url_verified]

    def probe(self, worker: Worker) -> tuple[bool, str]:
        """``GET {url}/health`` in one attempt through the worker's breaker: (answered 2xx, why)."""
        try:
            response = self._engine.membridge.agents.health(worker.url, timeout_s=PROBE_TIMEOUT_S)
        except BloomError as exc:
            return False, f"probe: {exc.message}"
        if not response.ok:
            return False, f"probe: agent answered {response.status}"
        return True, "probe answered"

    # --- what a delivery thread runs ------------------------------------------------------

    def send(self, delivery: Delivery, payload: dict[str, Any], timeout_s: float) -> Outcome:
        try:
            outcome, answer = self._post(delivery, payload, timeout_s)
            outcome = self._settle(delivery, outcome)
        finally:
            self._release()
        if answer is not None:
            with self._lock:
                if delivery.id in self._waiters:
                    self._answers[delivery.id] = answer
        return outcome

    def _post(self, delivery: Delivery, payload: dict[str, Any], timeout_s: float) -> tuple[Outcome, Any]:
        membridge = self._engine.membridge
        try:
            response = membridge.agents.post_execute_task(delivery.url, payload, membridge.agent_key(), timeout_s=timeout_s)
        except MembridgeUnavailable as exc:  # breaker open: not sent
            return Outcome("unreachable", detail=exc.message), None
        except UnsafeURL as exc:
            return Outcome("unreachable", detail=exc.message), None
        except MembridgeError as exc:
            status = exc.details.get("status")
            if exc.details.get("reached") is False:
                return Outcome("unreachable", detail=exc.message), None
            if status == 503:  # the agent has no CLI: nothing ran
                return Outcome("refused", agent_status=503, detail=exc.message), None
            return Outcome("unknown", agent_status=status, detail=exc.message), None
        return self._read_answer(response), response.data

    @staticmethod
    def _read_answer(response: MembridgeResponse) -> Outcome:
        data = response.data if isinstance(response.data, dict) else {}
        if not response.ok:
            reason = upstream_reason(response.data) or f"agent answered {response.status}"
            return Outcome("refused", agent_status=response.status, detail=reason[:MAX_DETAIL_CHARS])
        if data.get("ok") is False:
            error = data.get("error") if isinstance(data.get("error"), str) else None
            return Outcome("agent_error", agent_status=response.status, detail=(error or "the agent answered ok: false")[:MAX_DETAIL_CHARS])
        return Outcome("answered", agent_status=response.status)

    def _settle(self, delivery: Delivery, outcome: Outcome) -> Outcome:
        """Fail the lease as the outcome calls for; the state may become callback_missing."""
        leases = self._engine.leases
        reason = f"dispatch to worker {delivery.worker_id} {outcome.state}" + (f": {outcome.detail}" if outcome.detail else "")
        if outcome.state in ("unreachable", "refused"):
            self._fail(delivery, reason, refund=outcome.state == "unreachable")
            return outcome
        if outcome.state == "unknown":
            # No answer: the lease is left to its TTL either way, but say whether the result got in.
            try:
                if leases.get(delivery.lease_id).status == "released":
                    return Outcome("unknown", agent_status=outcome.agent_status,
                                   detail=f"{outcome.detail} (its result did arrive)"[:MAX_DETAIL_CHARS])
            except BloomError:
                pass
            return outcome
        if outcome.state in ("answered", "agent_error"):
            # The agent sends its result before it answers, so the lease tells whether the
            # result got in: released (it did), still active (it was refused: retry now rather
            # than after the TTL), or expired / failed (it came too late).
            try:
                lease_status = leases.get(delivery.lease_id).status
            except BloomError:
                return outcome
            if lease_status == "released":
                return outcome
            if lease_status == "active":
                missing = "the agent answered but its result never reached the runtime"
                if not self._fail(delivery, missing, refund=False):
                    return outcome  # the result landed meanwhile after all
            else:
                missing = f"the agent answered after its lease had {lease_status}: its result was not taken"
            detail = missing if outcome.state == "answered" else f"{outcome.detail} ({missing})"
            return Outcome("callback_missing" if outcome.state == "answered" else "agent_error",
                           agent_status=outcome.agent_status, detail=detail[:MAX_DETAIL_CHARS])
        return outcome

    def _fail(self, delivery: Delivery, reason: str, *, refund: bool) -> bool:
        try:
            self._engine.leases.fail(delivery.lease_id, reason[:MAX_DETAIL_CHARS], actor="dispatcher", refund=refund)
            return True
        except Conflict:
            return False  # the lease moved on meanwhile (completed, expired, cancelled)
        except BloomError as exc:
            log.warning("could not fail lease %s after delivery %s: %s", delivery.lease_id, delivery.id, exc.message)
            return False

    # --- the actor's callback -------------------------------------------------------------

    def finished(self, delivery: Delivery) -> None:
        """A delivery's outcome was recorded: wake whoever waits for it."""
        with self._lock:
            self._outcomes[delivery.state] = self._outcomes.get(delivery.state, 0) + 1
            event = self._waiters.get(delivery.id)
        if event is not None:
            event.set()

    # --- helpers ------------------------------------------------------------------------------

    def _payload(self, grant: LeaseGrant) -> dict[str, Any]:
        task, lease = grant.task, grant.lease
        return {
            "task_id": task.id,
            "lease_id": lease.id,
            "context_id": task.context_id,
            "agent_slug": task.agent_slug,
            "prompt": task.prompt,
            "context_hints": task.context_hints,
            "policy": msgspec.to_builtins(task.policy),
            "desired_format": task.desired_format,
            "labels": task.labels,
            "attempt": task.attempts,
            "ttl_seconds": lease.ttl_seconds,
            "expires_at": lease.expires_at,
            "runtime_url": self.runtime_url(lease.id),
        }

    def _answer(self, delivery: Delivery, wait_s: float, token: str | None, *, created: bool) -> DispatchOutcome:
        answer = None
        if wait_s > 0:
            if delivery.state == "sent":
                delivery, answer = self._wait(delivery, wait_s)
            else:
                with self._lock:
                    answer = self._answers.pop(delivery.id, None)
        engine = self._engine
        task = engine.store.get_task(delivery.task_id)
        try:
            worker: Worker | None = engine.workers.get(delivery.worker_id)
        except NotFound:
            worker = None
        return DispatchOutcome(task=task, worker=worker, delivery=delivery, lease_token=token, created=created, execution=answer)

    def _watch(self, delivery_id: str) -> threading.Event:
        with self._lock:
            return self._waiters.setdefault(delivery_id, threading.Event())

    def _unwatch(self, delivery_id: str) -> None:
        with self._lock:
            self._waiters.pop(delivery_id, None)
            self._answers.pop(delivery_id, None)

    def _wait(self, delivery: Delivery, wait_s: float) -> tuple[Delivery, Any]:
        """Wait up to ``wait_s`` for the delivery's outcome: woken by this process's dispatcher,
        or seen in the store (a delivery another process sent)."""
        event = self._watch(delivery.id)
        deadline = time.monotonic() + wait_s
        current = delivery
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._engine.running:
                break
            event.wait(min(remaining, POLL_OTHER_PROCESS_S))
            latest = self._engine.store.latest_delivery(delivery.task_id)
            if latest is not None and latest.id == delivery.id:
                current = latest
            if current.state != "sent":
                break
        with self._lock:
            answer = self._answers.pop(delivery.id, None)
        return current, answer

    def _check_target(self, worker_id: str, open_breakers: frozenset[str]) -> None:
        engine = self._engine
        worker = engine.workers.get(worker_id)
        require_verified(worker)
        if worker_id in open_breakers:
            retry = engine.membridge.agents.breaker_retry_after(worker.url) or 1.0
            raise MembridgeUnavailable(f"worker {worker_id}'s circuit breaker is open", retry_after_s=retry, worker_id=worker_id)

    def _open_breakers(self) -> frozenset[str]:
        """Workers whose agent breaker refuses calls now (known URLs only)."""
        agents = self._engine.membridge.agents
        open_urls = {url for url, state in agents.breakers.states().items() if state == "open"}
        if not open_urls:
            return frozenset()
        out = set()
        for w in self._engine.store.list_workers():
            if not w.url:
                continue
            try:
                if validate_outgoing_url(w.url, self._engine.allowed) in open_urls:
                    out.add(w.id)
            except UnsafeURL:
                continue
        return frozenset(out)

    def _soonest_retry(self, open_breakers: frozenset[str]) -> float | None:
        if not open_breakers:
            return None
        agents = self._engine.membridge.agents
        waits = [agents.breaker_retry_after(self._engine.store.get_worker(w).url) for w in open_breakers]
        known = [w for w in waits if w is not None]
        return max(1.0, math.ceil(min(known))) if known else None

    def _reserve(self) -> bool:
        with self._lock:
            if self._in_flight >= self._engine.settings.dispatch_max_in_flight:
                return False
            self._in_flight += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def state(self) -> dict[str, Any]:
        """For /health and metrics: deliveries in flight and recorded (by state) in this process,
        worker agents whose breaker is open, and the settings that shape dispatch."""
        settings = self._engine.settings
        with self._lock:
            outcomes = dict(self._outcomes)
            in_flight = self._in_flight
        breakers = self._engine.membridge.agents.breakers.states()
        return {
            "auto_dispatch": settings.auto_dispatch,
            "probe_interval_s": settings.agent_probe_interval_s,
            "in_flight": in_flight,
            "max_in_flight": settings.dispatch_max_in_flight,
            "deliveries": outcomes,
            "open_breakers": sum(1 for s in breakers.values() if s == "open"),
        }


__all__ = ["DispatchOutcome", "DispatchService"]
