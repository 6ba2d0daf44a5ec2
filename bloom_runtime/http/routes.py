"""The one table of routes: path, resource, and per method its body, responses and access.

The app mounts resources from it, the middleware reads access rules from it and
the OpenAPI document is generated from it, so the three cannot disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from bloom_runtime.engine.agent_admin import CONTROLS
from bloom_runtime.engine.models import (
    LEASE_STATUSES,
    TASK_STATUSES,
    WORKER_STATUSES,
    Artifact,
    AuditEntry,
    Fence,
    HistoryWindow,
    Lease,
    QueueState,
    Result,
    Task,
    Worker,
)
from bloom_runtime.http import schemas
from bloom_runtime.http.resources import (
    agents,
    artifacts,
    audit,
    config,
    console,
    dispatch,
    health,
    history,
    leases,
    membridge,
    stats,
    tasks,
    whoami,
    workers,
)

BASE = "/api/runtime"
MEMBRIDGE_BASE = "/api/membridge"
LEASE_BASE = "/api/leases/{lease_id}"  # lease-fenced callbacks that still need an API key
TOKEN_BASE = "/api/leases/{lease_id}/{lease_token}"  # dispatched agents get runtime_url = public URL + this

# Membridge answers: 502 unreachable or bad answer, 503 breaker open (Retry-After) or not configured.
MB_502 = (schemas.ErrorBody, "membridge unreachable or answered badly")
MB_503 = (schemas.ErrorBody, "membridge not configured, or its circuit breaker is open (Retry-After)")

Access = Literal["open", "client", "admin"]
# "worker" calls are rate limited per worker and named by it in the audit;
# "long_poll" ones also draw on a separate concurrency budget.
Kind = Literal["client", "worker", "long_poll"]


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str
    where: Literal["query", "header"] = "query"


@dataclass(frozen=True)
class Op:
    summary: str
    responses: dict[int, tuple[Any, str]]  # status → (msgspec type or None, description)
    body: Any = None  # a msgspec type (a struct, or a union of one struct and one list)
    body_optional: bool = False
    params: tuple[Param, ...] = ()
    access: Access = "client"
    kind: Kind = "client"
    content: str = "application/json"  # of the 2xx answer
    waits: bool = False  # may hold its thread for a while (wait_seconds): drawn from the long-poll budget

    @property
    def long_poll(self) -> bool:
        return self.kind == "long_poll" or self.waits


@dataclass(frozen=True)
class Route:
    path: str
    make: Callable[[Any], object]  # AppContext → resource
    ops: dict[str, Op] = field(default_factory=dict)


def _status(values: tuple[str, ...]) -> Param:
    return Param("status", {"type": "string", "enum": list(values)}, "only entries with this status")


LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "page size")
CURSOR = Param("cursor", {"type": "string", "maxLength": 512}, "from the previous page's Link rel=next")
TASK_FILTER = Param("task_id", {"type": "string", "maxLength": 128}, "only entries of this task")
PAGED = (LIMIT, CURSOR)
IDEMPOTENCY = Param(
    "Idempotency-Key", {"type": "string", "minLength": 1, "maxLength": 255},
    "a retry with the same key returns the task created first (200) instead of a new one", "header",
)
NEXT_LINK = 'the page as an array; the next page in `Link: <…>; rel="next"`'
# Exact matches (never patterns); each one an index range, alone or with a status.
SEARCH = (
    Param("context_id", {"type": "string", "maxLength": 128}, "only tasks of this context (not with agent_slug)"),
    Param("agent_slug", {"type": "string", "maxLength": 128}, "only tasks of this agent (not with context_id)"),
)
TASK_IDS = Param("task_id", {"type": "string"}, "only leases of these tasks: up to 100 ids, comma-separated or repeated")

def _agent_control(c: Any, name: str) -> object:
    return agents.AgentControl(c.engine, name)


ROUTES: tuple[Route, ...] = (
    Route(f"{BASE}/health", lambda c: health.Health(c.engine), {
        "GET": Op("Liveness, storage and membridge client state", {200: (schemas.Health, "healthy"), 503: (schemas.Health, "unhealthy")}, access="open"),
    }),
    Route(f"{BASE}/config", lambda c: config.Config(c.engine, c.settings), {
        "GET": Op("Membridge configuration (key masked)", {200: (schemas.ConfigView, "configuration")}),
        "POST": Op("Change the membridge configuration", {200: (schemas.ConfigView, "new configuration")}, body=schemas.ConfigUpdate, access="admin"),
    }),
    Route(f"{BASE}/test-connection", lambda c: config.TestConnection(c.engine), {
        "POST": Op("GET membridge /health through the client; records connected and last_test for /config",
                   {200: (schemas.ConnectionTestResult, "connected: true and membridge's health, or connected: false and why")}),
    }),
    Route(f"{BASE}/workers", lambda c: workers.WorkerCollection(c.engine), {
        "GET": Op("All workers, ordered by id", {200: (list[Worker], "workers")}, params=(_status(WORKER_STATUSES),)),
        "POST": Op("Register or update a worker by name", {201: (Worker, "created"), 200: (Worker, "updated")}, body=schemas.WorkerRegistration),
    }),
    Route(f"{BASE}/workers/{{worker_id}}", lambda c: workers.WorkerItem(c.engine), {
        "GET": Op("One worker and its active leases", {200: (schemas.WorkerDetail, "the worker")}),
        "DELETE": Op("Remove a worker (its leases expire normally)",
                     {200: (schemas.RemovedWorker, "removed: true, and the removed worker's fields")}, access="admin"),
    }),
    Route(f"{BASE}/workers/{{worker_id}}/agent-health", lambda c: agents.AgentHealth(c.engine), {
        "GET": Op("GET the worker's agent /health; the worker's status and version are refreshed from it",
                  {200: (dict[str, Any], "reachable: true and the agent's scalar /health fields, or reachable: false and why"),
                   400: (schemas.ErrorBody, "the worker has no url")}),
    }),
    *(Route(f"{BASE}/workers/{{worker_id}}/agent-{name}", functools.partial(_agent_control, name=name), {
        "POST": Op(f"POST the agent's /{control.path} with the agent key (audited)",
                   {200: (dict[str, Any], f"status: {control.done}, and the agent's answer"),
                    400: (schemas.ErrorBody, "the worker has no url"),
                    409: (schemas.ErrorBody, "the worker's URL is not verified: nothing is sent"),
                    502: (schemas.ErrorBody, "the agent refused, answered badly or could not be reached"),
                    503: (schemas.ErrorBody, "the agent's circuit breaker is open (Retry-After)")},
                   body=schemas.AgentUpdateRequest if name == "update" else None, body_optional=True, access="admin"),
    }) for name, control in CONTROLS.items()),
    Route(f"{BASE}/workers/{{worker_id}}/claim", lambda c: workers.WorkerClaim(c.engine), {
        "POST": Op("Pull mode: lease the next task this worker can take, waiting up to wait_seconds; "
                   "with max_tasks, up to that many (and its free capacity) in one transaction",
                   {200: (schemas.ClaimAnswer, "leased: the task, its lease and the lease's token; with max_tasks, a list of them"),
                    204: (None, "nothing arrived in time")},
                   body=schemas.ClaimRequest, body_optional=True, kind="long_poll"),
    }),
    Route(f"{BASE}/llm-tasks", lambda c: tasks.TaskCollection(c.engine), {
        "POST": Op("Queue a task, or a list of up to 1000 in one transaction (answered with a list: each task and "
                   "whether it was created; idempotency_key per task)",
                   {201: (schemas.CreateAnswer, "created (a list: at least one was)"),
                    200: (schemas.CreateAnswer, "idempotent retry: the task created first (a list: none was new)")},
                   body=schemas.CreateBody, params=(IDEMPOTENCY,)),
        "GET": Op("Tasks, newest first", {200: (list[Task], NEXT_LINK)}, params=(_status(TASK_STATUSES), *SEARCH, *PAGED)),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}", lambda c: tasks.TaskItem(c.engine), {
        "GET": Op("One task, with its latest push delivery", {200: (schemas.TaskView, "the task")}),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}/lease", lambda c: tasks.TaskLease(c.engine), {
        "POST": Op("Push mode: lease a queued task to a named or the best worker",
                   {201: (schemas.LeaseResponse, "leased")}, body=schemas.LeaseRequest, body_optional=True),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}/heartbeat", lambda c: tasks.TaskHeartbeat(c.engine), {
        "POST": Op("Renew the active lease; the task moves to running (empty body allowed)",
                   {200: (schemas.HeartbeatAnswer, "renewed")}, body=Fence, body_optional=True, kind="worker"),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}/complete", lambda c: tasks.TaskComplete(c.engine), {
        "POST": Op("Record the result of the active lease", {200: (schemas.CompleteResponse, "recorded")},
                   body=schemas.CompleteRequest, kind="worker"),
    }),
    Route(f"{BASE}/completions", lambda c: tasks.Completions(c.engine), {
        "POST": Op("Record up to 1000 results in one transaction, each as /llm-tasks/{task_id}/complete would; "
                   "answered with a list in the same order, each recorded (ok) or refused with the status and "
                   "error that call would have answered",
                   {200: (list[schemas.CompletionAnswer], "one answer per completion")},
                   body=schemas.CompletionBatch, kind="worker"),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}/requeue", lambda c: tasks.TaskRequeue(c.engine), {
        "POST": Op("failed/dead → queued, attempts reset", {200: (Task, "requeued")}),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}/cancel", lambda c: tasks.TaskCancel(c.engine), {
        "POST": Op("queued/leased/running → cancelled", {200: (Task, "cancelled")}),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}/result", lambda c: tasks.TaskResult(c.engine), {
        "GET": Op("The task's latest result", {200: (Result, "the result")}),
    }),
    Route(f"{BASE}/llm-tasks/{{task_id}}/dispatch", lambda c: dispatch.TaskDispatch(c.engine), {
        "POST": Op("Lease the task to a worker with a verified URL and push it to its /execute-task; answers at once, "
                   "or after wait_seconds (on the long-poll budget). A task already sent answers with its delivery.",
                   {202: (schemas.DispatchResponse, "sent: the agent is running it (watch the task)"),
                    200: (schemas.DispatchResponse, "the agent answered (ok or not; see delivery.state and the task)"),
                    409: (schemas.ErrorBody, "the task is not queued, or the named worker cannot be pushed to"),
                    502: (schemas.DispatchResponse, "the agent refused it or was unreachable; the lease failed "
                                                    "(an unreachable agent costs no attempt)"),
                    503: (schemas.ErrorBody, "no push worker free, or the worker's circuit breaker is open (Retry-After)"),
                    504: (schemas.DispatchResponse, "no answer in time: the run may still be going; the lease is left to its TTL")},
                   body=schemas.DispatchRequest, body_optional=True, waits=True),
    }),
    Route(f"{TOKEN_BASE}{BASE}/llm-tasks/{{task_id}}/heartbeat", lambda c: dispatch.TokenHeartbeat(c.engine), {
        "POST": Op("Heartbeat of a dispatched agent: the lease token in its runtime_url is the credential, no API key "
                   "(401 for a wrong token, 409 once the lease is over)",
                   {200: (schemas.HeartbeatAnswer, "renewed")}, body=Fence, body_optional=True, access="open", kind="worker"),
    }),
    Route(f"{TOKEN_BASE}{BASE}/llm-tasks/{{task_id}}/complete", lambda c: dispatch.TokenComplete(c.engine), {
        "POST": Op("Completion of a dispatched agent: the lease token in its runtime_url is the credential, no API key "
                   "(401 for a wrong token, 409 once the lease is over)",
                   {200: (schemas.CompleteResponse, "recorded")}, body=schemas.CompleteRequest, access="open", kind="worker"),
    }),
    Route(f"{LEASE_BASE}{BASE}/llm-tasks/{{task_id}}/heartbeat", lambda c: dispatch.LeaseHeartbeat(c.engine), {
        "POST": Op("Heartbeat of a dispatched agent, fenced by the lease in its runtime_url (409 once it expired)",
                   {200: (schemas.HeartbeatAnswer, "renewed")}, body=Fence, body_optional=True, kind="worker"),
    }),
    Route(f"{LEASE_BASE}{BASE}/llm-tasks/{{task_id}}/complete", lambda c: dispatch.LeaseComplete(c.engine), {
        "POST": Op("Completion of a dispatched agent, fenced by the lease in its runtime_url (409 once it expired)",
                   {200: (schemas.CompleteResponse, "recorded")}, body=schemas.CompleteRequest, kind="worker"),
    }),
    Route(f"{BASE}/leases", lambda c: leases.Leases(c.engine), {
        "GET": Op("Leases, newest first", {200: (list[Lease], NEXT_LINK)}, params=(_status(LEASE_STATUSES), TASK_IDS, *PAGED)),
    }),
    Route(f"{BASE}/leases/expired", lambda c: leases.ExpiredLeases(c.engine), {
        "GET": Op("Expired leases, the latest expiry first", {200: (list[Lease], NEXT_LINK)}, params=PAGED),
    }),
    Route(f"{BASE}/artifacts", lambda c: artifacts.Artifacts(c.engine), {
        "GET": Op("Artifacts, newest first", {200: (list[Artifact], NEXT_LINK)}, params=(TASK_FILTER, *PAGED)),
    }),
    Route(f"{BASE}/results", lambda c: artifacts.Results(c.engine), {
        "GET": Op("Results, newest first", {200: (list[Result], NEXT_LINK)}, params=(TASK_FILTER, *PAGED)),
    }),
    Route(f"{BASE}/runs", lambda c: artifacts.Runs(c.engine), {
        "GET": Op("The newest tasks (50 unless limit says otherwise), as the first version's /runs",
                  {200: (list[Task], NEXT_LINK)},
                  params=(Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}, "page size"), CURSOR)),
    }),
    Route(f"{BASE}/audit", lambda c: audit.Audit(c.engine), {
        "GET": Op("Audit log, newest first", {200: (list[AuditEntry], NEXT_LINK)},
                  params=(Param("entity_id", {"type": "string", "maxLength": 128}, "only entries about this entity"),
                          Param("action", {"type": "string", "maxLength": 128}, "only entries of this action (e.g. task_cancelled)"),
                          *PAGED)),
    }),
    Route(f"{BASE}/stats", lambda c: stats.Stats(c.engine), {
        "GET": Op("Counts by status", {200: (schemas.Stats, "counts")}),
    }),
    Route(f"{BASE}/history", lambda c: history.History(c.engine), {
        "GET": Op("Per-minute history in buckets: unfinished tasks by status (largest in the bucket), tasks created, "
                  "results completed and failed, leases expired; the last bucket ends with the current minute, counted live",
                  {200: (HistoryWindow, "the buckets, oldest first")},
                  params=(Param("minutes", {"type": "integer", "minimum": 1, "default": 60}, "how far back (at most the retention)"),
                          Param("bucket_minutes", {"type": "integer", "minimum": 1}, "minutes per bucket (default: about 120 buckets)"))),
    }),
    Route(f"{BASE}/queue", lambda c: history.Queue(c.engine), {
        "GET": Op("Unfinished tasks by status and the task that has waited longest to be leased", {200: (QueueState, "the queue now")}),
    }),
    Route(f"{BASE}/whoami", lambda c: whoami.WhoAmI(c.settings), {
        "GET": Op("The caller's key: its name and whether it is an admin key (no key: authenticated false; wrong key: 401)",
                  {200: (schemas.WhoAmI, "who is calling")}, access="open"),
    }),
    Route(f"{BASE}/metrics", lambda c: c.metrics_resource, {
        "GET": Op("Prometheus metrics", {200: (None, "text exposition format")}, content="text/plain"),
    }),
    Route(f"{BASE}/openapi.json", lambda c: c.openapi_resource, {
        "GET": Op("This document", {200: (dict[str, Any], "OpenAPI 3.1")}),
    }),
    # --- membridge pass-through (4xx from membridge passed on as JSON errors) ---
    Route(f"{MEMBRIDGE_BASE}/health", lambda c: membridge.MembridgeRead(c.engine), {
        "GET": Op("Membridge /health", {200: (dict[str, Any], "membridge answer"), 502: MB_502, 503: MB_503}),
    }),
    Route(f"{MEMBRIDGE_BASE}/projects", lambda c: membridge.MembridgeRead(c.engine), {
        "GET": Op("Membridge projects", {200: (Any, "membridge answer"), 502: MB_502, 503: MB_503}),
    }),
    Route(f"{MEMBRIDGE_BASE}/projects/{{cid}}/leadership", lambda c: membridge.MembridgeRead(c.engine), {
        "GET": Op("A project's leadership", {200: (Any, "membridge answer"), 502: MB_502, 503: MB_503}),
    }),
    Route(f"{MEMBRIDGE_BASE}/projects/{{cid}}/nodes", lambda c: membridge.MembridgeRead(c.engine), {
        "GET": Op("A project's nodes", {200: (Any, "membridge answer"), 502: MB_502, 503: MB_503}),
    }),
    Route(f"{MEMBRIDGE_BASE}/projects/{{cid}}/leadership/select", lambda c: membridge.MembridgeWrite(c.engine), {
        "POST": Op("Select a project's leader", {200: (Any, "membridge answer"), 502: MB_502, 503: MB_503},
                   body=dict[str, Any], body_optional=True, access="admin"),
    }),
    # --- the operator console: static files; its data comes from the routes above ---
    Route("/", lambda c: console.ConsolePage(), {
        "GET": Op("The operator console", {200: (None, "the page")}, access="open", content="text/html"),
    }),
    Route(f"{console.ASSET_PREFIX}/{{version}}/{{asset}}", lambda c: console.ConsoleAsset(), {
        "GET": Op("A script, style sheet or icon of the console (cached for a year: the version changes with them)",
                  {200: (None, "the file")}, access="open", content="text/javascript"),
    }),
)


OPS: dict[tuple[str, str], Op] = {(r.path, m): op for r in ROUTES for m, op in r.ops.items()}



def op_for(template: str | None, method: str) -> Op | None:
    return OPS.get((template, method)) if template else None
