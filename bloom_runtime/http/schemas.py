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
    NO_NUL,
    Artifact,
    Capabilities,
    Completion,
    EpochMs,
    Fence,
    Id,
    IpAddrs,
    Lease,
    Name,
    ObsCount,
    OsInfo,
    Result,
    Tag,
    Task,
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
    wait_seconds: WaitSeconds = 0
    ttl_seconds: TtlSeconds | None = None


class LeaseRequest(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: Id | None = None
    ttl_seconds: TtlSeconds | None = None


class CompleteRequest(Completion, frozen=True, kw_only=True):
    """A completion plus the optional fence naming the lease or worker (``Fence``'s fields)."""

    lease_id: Id | None = None
    worker_id: Id | None = None

    def completion(self) -> Completion:
        return Completion(**{f: getattr(self, f) for f in Completion.__struct_fields__})

    def fence(self) -> Fence:
        return Fence(lease_id=self.lease_id, worker_id=self.worker_id)


class DispatchRequest(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: Id | None = None
    ttl_seconds: TtlSeconds | None = None


class ConfigUpdate(msgspec.Struct, frozen=True, kw_only=True):
    membridge_server_url: Annotated[str, Meta(max_length=2048, pattern=NO_NUL)] | None = None
    admin_key: Annotated[str, Meta(max_length=1024, pattern=NO_NUL)] | None = None


# --- responses ----------------------------------------------------------------


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str


class LeaseResponse(msgspec.Struct, frozen=True, kw_only=True):
    lease: Lease
    worker: Worker


class TaskLease(msgspec.Struct, frozen=True, kw_only=True):
    """Heartbeat and claim answers."""

    task: Task
    lease: Lease


class CompleteResponse(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    result: Result
    artifact: Artifact


class DispatchResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The lease granted and the worker that accepted the task."""

    lease: Lease
    worker: Worker
    task: Task
    dispatched: bool
    worker_status: int | None = None


class ConnectionTestResult(msgspec.Struct, frozen=True, kw_only=True):
    """Membridge /health as seen through the client: status and parsed scalar fields only."""

    connected: bool
    status: int
    health: dict[str, Any]
    latency_ms: float
    tested_at: int


class ConfigView(msgspec.Struct, frozen=True, kw_only=True):
    membridge_server_url: str | None
    admin_key: str | None  # masked
    configured: bool


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
    jobs: dict[str, Any] = {}
    actors: dict[str, Any] = {}


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    tasks: dict[str, int]
    leases: dict[str, int]
    workers: dict[str, int]


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
