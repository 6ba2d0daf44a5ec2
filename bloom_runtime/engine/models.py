"""Domain records and their state machines.

Records are ``msgspec.Struct``s: typed, cheap to build from database rows and
encoded to JSON directly by the HTTP layer. Ids are UUID strings, times are
epoch milliseconds.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

TaskStatus = Literal["queued", "leased", "running", "completed", "failed", "dead", "cancelled"]
LeaseStatus = Literal["active", "released", "expired", "failed"]
WorkerStatus = Literal["online", "offline", "syncing", "error", "unknown"]
ResultStatus = Literal["success", "error"]
DesiredFormat = Literal["json", "text"]
# Who keeps a worker's status fresh: `api` push targets keep what they were
# given; `pull` and `membridge` workers go offline when they stop showing up.
WorkerSource = Literal["api", "pull", "membridge"]
# What became of one push delivery (POST /execute-task of one lease):
# sent (waiting for the agent's answer), answered (ok, and its result arrived),
# agent_error (the agent answered ok:false), callback_missing (the agent answered
# but its result never reached the runtime), refused (the agent answered 4xx/503:
# it ran nothing), unreachable (the request provably never reached it), unknown
# (no answer: the run may or may not have happened).
DeliveryState = Literal["sent", "answered", "agent_error", "callback_missing", "refused", "unreachable", "unknown"]

TASK_STATUSES: tuple[str, ...] = ("queued", "leased", "running", "completed", "failed", "dead", "cancelled")
LEASE_STATUSES: tuple[str, ...] = ("active", "released", "expired", "failed")
WORKER_STATUSES: tuple[str, ...] = ("online", "offline", "syncing", "error", "unknown")
DELIVERY_STATES: tuple[str, ...] = ("sent", "answered", "agent_error", "callback_missing", "refused", "unreachable", "unknown")
UNFINISHED_STATUSES: tuple[str, ...] = ("queued", "leased", "running")  # a queue's depth, by stage

# Task transitions (DESIGN §5): the states each operation may start from.
LEASABLE: frozenset[str] = frozenset({"queued"})
HOLDING_LEASE: frozenset[str] = frozenset({"leased", "running"})
REQUEUEABLE: frozenset[str] = frozenset({"failed", "dead"})
CANCELLABLE: frozenset[str] = frozenset({"queued", "leased", "running"})
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "dead", "cancelled"})

DEFAULT_TIMEOUT_SEC = 120
DEFAULT_MAX_ATTEMPTS = 3
LEASE_GRACE_S = 30  # default lease TTL = policy.timeout_sec + this


# --- field constraints (checked when a request is decoded or ``validate`` runs) ---
# NUL: identifiers and names refuse it (PostgreSQL cannot store it, and no name needs
# it); free text keeps its place with U+FFFD (``clean_text``), on both stores alike.
NO_NUL = r"^[^\x00]*$"
NUL_REPLACEMENT = "\ufffd"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
# Context ids and slugs come from many clients: any printable text, bounded.
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Label = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]
Labels = Annotated[list[Label], Meta(max_length=256)]
Prompt = Annotated[str, Meta(min_length=1, max_length=1_048_576)]
Hint = Annotated[str, Meta(max_length=65_536)]
ShortText = Annotated[str, Meta(max_length=1024)]
LongText = Annotated[str, Meta(max_length=4 * 1_048_576)]
TimeoutSec = Annotated[int, Meta(ge=1, le=3600)]
MAX_ATTEMPTS_LIMIT = 10  # also the schema's CHECK on llm_tasks.max_attempts
MaxAttempts = Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS_LIMIT)]
MaxConcurrency = Annotated[int, Meta(ge=1, le=32)]
TtlSeconds = Annotated[int, Meta(ge=1, le=86_400)]
EpochMs = Annotated[int, Meta(ge=0, le=2**53)]
WorkerUrl = Annotated[str, Meta(max_length=2048, pattern=NO_NUL)]
IpAddrs = Annotated[list[Annotated[str, Meta(max_length=64, pattern=NO_NUL)]], Meta(max_length=64)]
ObsCount = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Tag = Annotated[str, Meta(max_length=128, pattern=NO_NUL)]  # db_sha, agent_version, install_method, artifact tags
OsInfo = Annotated[str, Meta(max_length=512, pattern=NO_NUL)]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=255, pattern=NO_NUL)]
ArtifactType = Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_NUL)]
MAX_TTL_SECONDS = 86_400
MAX_CLAIM_TASKS = 32  # one claim leases at most this many (a worker's capacity is at most 32)
MAX_CREATE_BATCH = 1000  # tasks one create of several (one transaction) takes
MAX_COMPLETE_BATCH = 1000  # results one completion of several (one transaction) takes
LeaseToken = Annotated[str, Meta(max_length=128)]
# Free-form JSON (metrics) nested deeper than this is refused: it must still encode,
# decode and display everywhere it goes, and no client needs more.
MAX_JSON_DEPTH = 32


def clean_text(text: str) -> str:
    """Free text as the stores keep it: each NUL replaced by U+FFFD."""
    return text.replace("\x00", NUL_REPLACEMENT)


def free_json(value: Any, what: str, depth: int = 1) -> Any:
    """Free-form JSON as the stores keep it: NUL replaced in every string (keys too).

    Returns ``value`` itself when nothing changes. Raises ``ValueError`` (a
    ``ValidationError`` when decoding) if it nests deeper than ``MAX_JSON_DEPTH``."""
    if isinstance(value, str):
        return clean_text(value) if "\x00" in value else value
    if isinstance(value, dict):
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        items = [(free_json(k, what), free_json(v, what, depth + 1)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, list):
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        cleaned = [free_json(v, what, depth + 1) for v in value]
        return value if all(c is v for c, v in zip(cleaned, value, strict=True)) else cleaned
    return value


_id_lock = threading.Lock()
_id_last_ms = 0
_id_seq = 0
_id_random = b""  # bytes from os.urandom, drawn 8 at a time: one system call per 512 ids
_id_random_at = 0


def _random64() -> int:
    """64 random bits; call with ``_id_lock`` held."""
    global _id_random, _id_random_at
    if _id_random_at + 8 > len(_id_random):
        _id_random, _id_random_at = os.urandom(4096), 0
    _id_random_at += 8
    return int.from_bytes(_id_random[_id_random_at - 8 : _id_random_at], "big")


def new_id() -> str:
    """A UUIDv7: time-ordered, so ids sort in creation order within a process and
    new rows land at the right edge of their indexes."""
    global _id_last_ms, _id_seq
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        bits = _random64()
        if ms > _id_last_ms:
            _id_last_ms, _id_seq = ms, bits >> 54  # a random start in the lower quarter of the counter
        else:
            _id_seq += 1
            if _id_seq >= 1 << 12:  # counter exhausted: borrow the next millisecond
                _id_last_ms, _id_seq = _id_last_ms + 1, 0
        ms, seq = _id_last_ms, _id_seq
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | (bits & ((1 << 62) - 1))
    h = f"{value:032x}"  # the canonical text of uuid.UUID(int=value), without building one
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    timeout_sec: TimeoutSec = DEFAULT_TIMEOUT_SEC
    budget: Annotated[float, Meta(ge=0, le=1e12)] = 0


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    claude_cli: bool = True
    max_concurrency: MaxConcurrency = 1
    labels: Labels = []


class Task(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    context_id: str
    agent_slug: str
    prompt: str
    context_hints: list[str]
    policy: Policy
    desired_format: DesiredFormat
    status: TaskStatus
    created_at: int
    updated_at: int
    lease_id: str | None
    worker_id: str | None
    attempts: int
    max_attempts: int
    labels: list[str]
    not_before: int | None
    idempotency_key: str | None

    @property
    def default_ttl_seconds(self) -> int:
        return self.policy.timeout_sec + LEASE_GRACE_S


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    task_id: str
    worker_id: str
    started_at: int
    expires_at: int
    ttl_seconds: int
    status: LeaseStatus
    last_heartbeat: int
    context_id: str


class Worker(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    node_id: str
    url: str  # "" when none was given (see WORKER_DEFAULTS)
    status: WorkerStatus
    capabilities: Capabilities
    last_heartbeat: int  # the registration time until the worker is heard from
    ip_addrs: list[str]
    obs_count: int
    db_sha: str
    registered_at: int
    active_leases: int
    agent_version: str
    os_info: str
    install_method: str
    source: WorkerSource = "api"
    # Its URL was set by an admin key or the membridge sync (or is in the allow-list):
    # only then does it get pushed tasks and the agent key. Computed, not stored.
    url_verified: bool = False

    @property
    def free_capacity(self) -> int:
        return self.capabilities.max_concurrency - self.active_leases


# What a worker's text fields hold when nobody gave them: the first version's values, so
# its clients never see null there. New rows are stored with them (``new_worker``); rows
# written before, holding NULL, are read with them.
WORKER_DEFAULTS: dict[str, str] = {"url": "", "db_sha": "", "agent_version": "unknown", "os_info": "", "install_method": "manual"}


def or_default(value: str | None, field: str) -> str:
    """A stored worker text field, or its default when the row holds NULL."""
    return WORKER_DEFAULTS[field] if value is None else value


class Result(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    task_id: str
    worker_id: str | None
    artifact_id: str | None
    status: ResultStatus
    output: str | None
    error_message: str | None
    metrics: dict[str, Any]
    completed_at: int


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    task_id: str
    job_id: str | None
    type: str
    created_at: int
    finalized: bool
    url: str | None
    entity_refs: list[str]
    tags: list[str]
    content: str | None


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One lease pushed to a worker agent's ``/execute-task`` and what became of it."""

    id: str
    task_id: str
    lease_id: str
    worker_id: str
    url: str
    state: DeliveryState
    agent_status: int | None  # HTTP status of the agent's answer
    detail: str | None  # the agent's error or why the delivery ended as it did
    actor: str
    created_at: int
    deadline_at: int  # when the dispatcher stops waiting for the answer
    finished_at: int | None


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    timestamp: int
    action: str
    entity_type: str
    entity_id: str
    actor: str
    detail: str | None = None


# --- inputs -----------------------------------------------------------------


class NewTask(msgspec.Struct, frozen=True, kw_only=True):
    """A validated request to create a task (ids and times assigned by the store caller)."""

    context_id: Name
    agent_slug: Name
    prompt: Prompt
    context_hints: Annotated[list[Hint], Meta(max_length=256)] = []
    policy: Policy = Policy()
    desired_format: DesiredFormat = "text"
    max_attempts: MaxAttempts = DEFAULT_MAX_ATTEMPTS
    labels: Labels = []
    idempotency_key: IdempotencyKey | None = None

    def __post_init__(self) -> None:
        if "\x00" in self.prompt:
            msgspec.structs.force_setattr(self, "prompt", clean_text(self.prompt))
        if any("\x00" in hint for hint in self.context_hints):
            msgspec.structs.force_setattr(self, "context_hints", [clean_text(hint) for hint in self.context_hints])


class WorkerUpsert(msgspec.Struct, frozen=True, kw_only=True):
    """Fields to create or update a worker by id; ``None`` keeps the stored value on update."""

    id: Id
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
    source: WorkerSource | None = None


def new_worker(upsert: WorkerUpsert, now: int) -> WorkerUpsert:
    """Every field a worker created from ``upsert`` at ``now`` is stored with: the given
    ones, defaults for the rest (``WORKER_DEFAULTS``; registered and last heard from now)."""

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    d = WORKER_DEFAULTS
    return WorkerUpsert(
        id=upsert.id,
        node_id=given(upsert.node_id, upsert.id),
        url=given(upsert.url, d["url"]),
        status=given(upsert.status, "online"),
        capabilities=given(upsert.capabilities, Capabilities()),
        last_heartbeat=given(upsert.last_heartbeat, now),
        ip_addrs=given(upsert.ip_addrs, []),
        obs_count=given(upsert.obs_count, 0),
        db_sha=given(upsert.db_sha, d["db_sha"]),
        agent_version=given(upsert.agent_version, d["agent_version"]),
        os_info=given(upsert.os_info, d["os_info"]),
        install_method=given(upsert.install_method, d["install_method"]),
        source=given(upsert.source, "api"),
    )


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's report that a task finished."""

    status: ResultStatus
    output: LongText | None = None
    error_message: LongText | None = None
    metrics: Annotated[dict[Annotated[str, Meta(max_length=64)], Any], Meta(max_length=64)] = {}
    artifact_type: ArtifactType | None = None
    artifact_tags: Annotated[list[Tag], Meta(max_length=256)] = []
    retryable: bool = True

    def __post_init__(self) -> None:
        for name in ("output", "error_message"):
            text = getattr(self, name)
            if text is not None and "\x00" in text:
                msgspec.structs.force_setattr(self, name, clean_text(text))
        if self.metrics:
            metrics = free_json(self.metrics, "metrics")
            if metrics is not self.metrics:
                msgspec.structs.force_setattr(self, "metrics", metrics)


class Fence(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker call names to prove it holds the active lease (any may be absent).

    ``lease_token`` is the lease's callback token (from the grant); the engine checks
    it and hands the stores a fence naming the lease it proved."""

    lease_id: Id | None = None
    worker_id: Id | None = None
    lease_token: LeaseToken | None = None


class LeaseGrant(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    lease: Lease
    worker: Worker


class CompletionOutcome(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    result: Result
    artifact: Artifact
    lease: Lease | None


class Expiry(msgspec.Struct, frozen=True, kw_only=True):
    """One lease the sweep expired and what became of its task."""

    lease: Lease
    task: Task


class HistoryPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One stretch of time (a minute, or a bucket of minutes) of the runtime's history.

    Depths are the unfinished tasks by status when it closed (None: not sampled, e.g.
    while no engine ran); the counts are what happened within it."""

    at: int  # start, epoch ms
    queued: int | None
    leased: int | None
    running: int | None
    created: int = 0
    completed: int = 0
    failed: int = 0  # results with status error, retried or not
    expired: int = 0  # leases that expired


class HistoryWindow(msgspec.Struct, frozen=True, kw_only=True):
    """The history of the last ``minutes`` in buckets of ``bucket_minutes``, oldest first.

    The last bucket ends with the current minute, which is counted so far (live)."""

    minutes: int
    bucket_minutes: int
    start: int  # epoch ms: the first bucket's start
    end: int  # epoch ms: the end of the current minute
    points: list[HistoryPoint]


class OldestQueued(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created_at: int
    age_ms: int


class QueueState(msgspec.Struct, frozen=True, kw_only=True):
    """The unfinished tasks now, and the one that has waited longest to be leased."""

    queued: int
    leased: int
    running: int
    oldest_queued: OldestQueued | None


class Page(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Any]
    next_cursor: str | None


def validate(value: msgspec.Struct) -> Any:
    """Check a record built in Python against its field constraints.

    Constraints run when msgspec decodes; embedding programs build records
    directly, so the engine re-checks them here. Raises ``InvalidInput``.
    """
    from bloom_runtime.engine.errors import InvalidInput

    try:
        return msgspec.convert(msgspec.to_builtins(value), type(value))
    except msgspec.ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from None


def validation_message(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with the NUL rule said in words rather than as its regex."""
    text = str(exc)
    return text.replace(f"Expected `str` matching regex {NO_NUL!r}", "Expected text without NUL (U+0000)")
