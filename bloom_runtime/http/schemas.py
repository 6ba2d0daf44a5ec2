"""Request and response bodies of the HTTP API, as msgspec structs.

Input constraints come from ``engine.models`` (one definition validates the
request and documents it in OpenAPI). Structs here only reshape what differs on
the wire. Unknown fields in request bodies are ignored everywhere (msgspec's
default), so older and newer clients keep working; documented in OpenAPI.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from bloom_runtime.engine.errors import InvalidInput
from bloom_runtime.engine.models import (
    MAX_CLAIM_TASKS,
    MAX_COMPLETE_BATCH,
    MAX_CREATE_BATCH,
    NO_NUL,
    Artifact,
    Capabilities,
    Completion,
    Delivery,
    EpochMs,
    Fence,
    Id,
    IpAddrs,
    Lease,
    LeaseStatus,
    LeaseToken,
    Name,
    NewTask,
    ObsCount,
    OsInfo,
    Result,
    Tag,
    Task,
    TaskStatus,
    TtlSeconds,
    Worker,
    WorkerStatus,
    WorkerUrl,
    validation_message,
)

WaitSeconds = Annotated[float, Meta(ge=0, le=30)]


class WorkerRegistration(msgspec.Struct, frozen=True, kw_only=True):
    """POST /workers: the first version names a worker by ``name`` (its id here)."""

    name: Id
    node_id: Name | None = None
    url: WorkerUrl | None = None
    status: WorkerStatus | None = None
    capabilities: Capabilities | None = None
    last_heartbeat: EpochMs | None = None
    ip_addrs: IpAddrs | None = None
    obs_count: ObsCount | None = None
    db_sha: Tag | None = None
    agent_version: Tag | None = None
    os_info: OsInfo | None = None
    install_method: Tag | None = None


class ClaimRequest(msgspec.Struct, frozen=True, kw_only=True):
    """With ``max_tasks``, lease up to that many at once (and up to the worker's free
    capacity); the answer is then a list."""

    wait_seconds: WaitSeconds = 0
    max_tasks: Annotated[int, Meta(ge=1, le=MAX_CLAIM_TASKS)] | None = None
    ttl_seconds: TtlSeconds | None = None


class LeaseRequest(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: Id | None = None
    ttl_seconds: TtlSeconds | None = None


def completion_of(body: Completion) -> Completion:
    """The ``Completion`` fields of a request body that extends it."""
    return Completion(**{f: getattr(body, f) for f in Completion.__struct_fields__})


class CompleteRequest(Completion, frozen=True, kw_only=True):
    """A completion plus the optional fence naming the lease or worker (``Fence``'s fields)."""

    lease_id: Id | None = None
    worker_id: Id | None = None
    lease_token: LeaseToken | None = None

    def completion(self) -> Completion:
        return completion_of(self)

    def fence(self) -> Fence:
        return Fence(lease_id=self.lease_id, worker_id=self.worker_id, lease_token=self.lease_token)


class CompletionItem(Completion, frozen=True, kw_only=True):
    """One result of a batch: the task, the lease it ran under, and the completion."""

    task_id: Id
    lease_id: Id | None = None
    lease_token: LeaseToken | None = None


class CompletionBatch(msgspec.Struct, frozen=True, kw_only=True):
    """POST /completions: results recorded in one transaction, by ``worker_id`` when named
    (every item's fence then names it, as ``complete``'s ``worker_id`` does)."""

    worker_id: Id | None = None
    completions: Annotated[list[CompletionItem], Meta(min_length=1, max_length=MAX_COMPLETE_BATCH)]

    def items(self) -> list[tuple[str, Completion, Fence]]:
        return [
            (c.task_id, completion_of(c),
             Fence(lease_id=c.lease_id, worker_id=self.worker_id, lease_token=c.lease_token))
            for c in self.completions
        ]


class AgentUpdateRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """POST /workers/{id}/agent-update: passed on to the agent's /self-update (it defaults to its origin)."""

    repo_url: Annotated[str, Meta(max_length=1024, pattern=r"^(https?://|ssh://|git@)[^\s\x00-\x1f]+$")] | None = None
    # Never an option: the agent hands it to `git pull origin <branch>`.
    branch: Annotated[str, Meta(max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")] | None = None


class DispatchRequest(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: Id | None = None
    ttl_seconds: TtlSeconds | None = None
    wait_seconds: WaitSeconds = 0  # wait this long for the agent's answer (on the long-poll budget)


class ConfigUpdate(msgspec.Struct, frozen=True, kw_only=True):
    membridge_server_url: Annotated[str, Meta(max_length=2048, pattern=NO_NUL)] | None = None
    admin_key: Annotated[str, Meta(max_length=1024, pattern=NO_NUL)] | None = None


# --- responses ----------------------------------------------------------------


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str


class CreatedTask(msgspec.Struct, frozen=True, kw_only=True):
    """One task of a list queued at once: ``created`` false when its idempotency key was used before."""

    task: Task
    created: bool


# POST /llm-tasks takes one task or a list of them (one transaction); a list is answered in kind.
CreateBody = NewTask | Annotated[list[NewTask], Meta(min_length=1, max_length=MAX_CREATE_BATCH)]
CreateAnswer = Task | list[CreatedTask]


class LeaseResponse(msgspec.Struct, frozen=True, kw_only=True):
    lease: Lease
    worker: Worker
    lease_token: str  # authorises heartbeat/complete of this lease (and only this one)


class TaskLease(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Claim answers (with the lease's token); heartbeat answers add ``expires_at``."""

    task: Task
    lease: Lease
    lease_token: str | None = None


ClaimAnswer = TaskLease | list[TaskLease]  # a list when the claim names max_tasks


class HeartbeatAnswer(TaskLease, frozen=True, kw_only=True):
    """A renewal: the task and lease, and the first version's top-level ``expires_at``."""

    expires_at: int

    @classmethod
    def of(cls, task: Task, lease: Lease) -> HeartbeatAnswer:
        return cls(task=task, lease=lease, expires_at=lease.expires_at)


class CompleteResponse(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    result: Result
    artifact: Artifact


class CompletionAnswer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One item of a batch's answer: recorded (``ok``, with what ``complete`` answers), or
    refused with the status and error ``complete`` would have answered for it alone."""

    task_id: str
    ok: bool
    status: int
    task: Task | None = None
    result: Result | None = None
    artifact: Artifact | None = None
    error: str | None = None
    details: dict[str, Any] | None = None


class DispatchResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A delivery and where to watch it (``dispatched``, ``task_id``, ``worker_id``, ``lease_id``
    as the first version answered; ``execution`` is the agent's answer when it was waited for)."""

    dispatched: bool
    task_id: str
    worker_id: str
    lease_id: str
    task: Task
    lease: Lease
    worker: Worker | None
    delivery: Delivery
    watch: dict[str, str]
    lease_token: str | None = None  # only to the caller that created the delivery
    execution: Any = None
    error: str | None = None


class TaskView(Task, frozen=True, kw_only=True):
    """One task, with its latest push delivery (null if it was never pushed)."""

    delivery: Delivery | None = None


class WorkerDetail(Worker, frozen=True, kw_only=True):
    """GET /workers/{id}: the worker and its active leases (as the first version answers)."""

    leases: list[Lease]


class RemovedWorker(Worker, frozen=True, kw_only=True):
    """DELETE /workers/{id}: the first version's ``{removed: true, id}``, with the fields it had."""

    removed: bool = True


class ConnectionTestResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The first version's ``{connected: true, health}`` or ``{connected: false, error}``: membridge
    /health as seen through the client (its parsed scalar fields only), and how it went."""

    connected: bool
    health: dict[str, Any] | None = None
    error: str | None = None
    status: int | None = None  # membridge's answer, when it gave one
    latency_ms: float | None = None
    tested_at: int | None = None  # epoch ms; absent when nothing was tested
    retry_after_s: float | None = None  # while the circuit breaker is open
    configured: bool = True


class ConfigView(msgspec.Struct, frozen=True, kw_only=True):
    """The first version's fields, and ours. Only admin keys see the ends of the admin key."""

    membridge_server_url: str | None
    admin_key: str | None  # "****cdef" (admin), "****" (others), null: no key
    admin_key_masked: str  # "adm-****cdef" (admin), "****" (others), "": no key
    configured: bool
    connected: bool  # the last test-connection since the configuration changed reached membridge
    last_test: int | None  # when that test ran, epoch ms


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    service: str
    version: str
    uptime: float
    storage: str
    storage_ok: bool
    storage_error: str | None = None
    writes: dict[str, Any] = {}  # ok, last_success, last_error, last_failure, last_error_age_s, failures
    audit: dict[str, Any] = {}  # pending, oldest_age_s
    membridge: dict[str, Any] = {}
    dispatch: dict[str, Any] = {}
    jobs: dict[str, Any] = {}
    actors: dict[str, Any] = {}


class TaskCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Tasks: the total, ``by_status`` (every status), and the same counts flat."""

    total: int
    by_status: dict[TaskStatus, int]
    queued: int
    leased: int
    running: int
    completed: int
    failed: int
    dead: int
    cancelled: int


class LeaseCounts(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    active: int
    by_status: dict[LeaseStatus, int]
    released: int
    expired: int
    failed: int


class WorkerCounts(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    online: int
    by_status: dict[WorkerStatus, int]
    offline: int
    syncing: int
    error: int
    unknown: int


class WhoAmI(msgspec.Struct, frozen=True, kw_only=True):
    """The caller's key: its name (the audit actor) and whether it may do admin operations."""

    name: str | None
    admin: bool
    auth_enabled: bool
    authenticated: bool


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """The first version's ``{tasks: {total, by_status}, leases: {total, active}, workers: {total, online}}``,
    with every status counted."""

    tasks: TaskCounts
    leases: LeaseCounts
    workers: WorkerCounts


_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def decode(body: bytes, kind: type[Any]) -> Any:
    """Decode a JSON body into ``kind``; an empty body means ``{}``. Raises ``InvalidInput``."""
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.json.Decoder(kind)
    if not body.strip():
        body = b"{}"
    try:
        return dec.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    except RecursionError:
        # msgspec counts nesting against the interpreter's recursion limit.
        raise InvalidInput("JSON nested too deeply") from None
