"""PostgreSQL rows into records: every statement returns its columns in fixed orders
(listed at the top of ``queries/postgres.sql``), read here by position.

JSONB columns arrive as raw bytes (see ``RawJsonbLoader``) and are decoded straight
into their typed field by msgspec: one C call per field, no dict in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg.adapt import Loader

from bloom_runtime.engine.models import (
    Artifact,
    AuditEntry,
    CompletionOutcome,
    Delivery,
    Lease,
    Result,
    Task,
    Worker,
    WorkerUpsert,
    or_default,
)
from bloom_runtime.sql import stored_json

json_object = stored_json.json_object
encode = stored_json.encode
to_json = stored_json.to_json
_strs = stored_json.strings
_policy = stored_json.policy
_caps = stored_json.capabilities


class RawJsonbLoader(Loader):
    """Hand JSONB over as bytes; the record builders decode it with its type."""

    def load(self, data: Any) -> bytes:
        return bytes(data)


def task_record(r: Sequence[Any], o: int = 0) -> Task:
    return Task(
        id=r[o],
        context_id=r[o + 1],
        agent_slug=r[o + 2],
        prompt=r[o + 3],
        context_hints=_strs(r[o + 4]),
        policy=_policy(r[o + 5]),
        desired_format=r[o + 6],
        status=r[o + 7],
        created_at=r[o + 8],
        updated_at=r[o + 9],
        lease_id=r[o + 10],
        worker_id=r[o + 11],
        attempts=r[o + 12],
        max_attempts=r[o + 13],
        labels=_strs(r[o + 14]),
        not_before=r[o + 15],
        idempotency_key=r[o + 16],
    )


TASK_N = 17


def lease_record(r: Sequence[Any], o: int = 0) -> Lease:
    return Lease(
        id=r[o],
        task_id=r[o + 1],
        worker_id=r[o + 2],
        started_at=r[o + 3],
        expires_at=r[o + 4],
        ttl_seconds=r[o + 5],
        status=r[o + 6],
        last_heartbeat=r[o + 7],
        context_id=r[o + 8],
    )


LEASE_N = 9


def worker_record(r: Sequence[Any], active: int, o: int = 0) -> Worker:
    return Worker(
        id=r[o],
        node_id=r[o + 1],
        url=or_default(r[o + 2], "url"),
        status=r[o + 3],
        capabilities=_caps(r[o + 4]),
        last_heartbeat=r[o + 5] if r[o + 5] is not None else r[o + 9],
        ip_addrs=_strs(r[o + 6]),
        obs_count=r[o + 7],
        db_sha=or_default(r[o + 8], "db_sha"),
        registered_at=r[o + 9],
        active_leases=active,
        agent_version=or_default(r[o + 10], "agent_version"),
        os_info=or_default(r[o + 11], "os_info"),
        install_method=or_default(r[o + 12], "install_method"),
        source=r[o + 13],
    )


WORKER_N = 14  # stored columns; the active-lease count follows them


def worker_columns(w: WorkerUpsert) -> dict[str, Any]:
    """A fully populated upsert (``new_worker``) as column values."""
    return {
        "node_id": w.node_id, "url": w.url, "status": w.status, "capabilities": to_json(w.capabilities),
        "last_heartbeat": w.last_heartbeat, "ip_addrs": to_json(w.ip_addrs), "obs_count": w.obs_count,
        "db_sha": w.db_sha, "agent_version": w.agent_version, "os_info": w.os_info,
        "install_method": w.install_method, "source": w.source,
    }


def worker_row(r: Sequence[Any]) -> Worker:
    return worker_record(r, r[WORKER_N])


def artifact_record(r: Sequence[Any], o: int = 0) -> Artifact:
    return Artifact(
        id=r[o],
        task_id=r[o + 1],
        job_id=r[o + 2],
        type=r[o + 3],
        created_at=r[o + 4],
        finalized=r[o + 5],
        url=r[o + 6],
        entity_refs=_strs(r[o + 7]),
        tags=_strs(r[o + 8]),
        content=r[o + 9],
    )


ARTIFACT_N = 10


def result_record(r: Sequence[Any], o: int = 0) -> Result:
    return Result(
        id=r[o],
        task_id=r[o + 1],
        worker_id=r[o + 2],
        artifact_id=r[o + 3],
        status=r[o + 4],
        output=r[o + 5],
        error_message=r[o + 6],
        metrics=json_object(r[o + 7]),
        completed_at=r[o + 8],
    )


RESULT_N = 9


def delivery_record(r: Sequence[Any]) -> Delivery:
    return Delivery(
        id=r[0], task_id=r[1], lease_id=r[2], worker_id=r[3], url=r[4], state=r[5], agent_status=r[6],
        detail=r[7], actor=r[8], created_at=r[9], deadline_at=r[10], finished_at=r[11],
    )


def audit_record(r: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        id=r[0], timestamp=r[1], action=r[2], entity_type=r[3], entity_id=r[4], actor=r[5], detail=r[6]
    )


def outcome_record(row: Sequence[Any], o: int = 0) -> CompletionOutcome:
    """A completion's row: task, lease (null when none was released), artifact, result."""
    lease_at, artifact_at, result_at = o + TASK_N, o + TASK_N + LEASE_N, o + TASK_N + LEASE_N + ARTIFACT_N
    return CompletionOutcome(
        task=task_record(row, o),
        lease=lease_record(row, lease_at) if row[lease_at] is not None else None,
        artifact=artifact_record(row, artifact_at),
        result=result_record(row, result_at),
    )
