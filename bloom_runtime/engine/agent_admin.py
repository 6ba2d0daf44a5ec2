"""Managing a worker's membridge agent: its health, and self-update, restart and uninstall.

The calls go out on the caller's thread through ``engine.membridge.agents``, the
hardened agent client (URL validation, a wall-clock deadline, a breaker per worker
URL). The three calls that change an agent carry the agent key, so they go only to
a verified URL (``worker_trust``): a URL a client key set is refused. What the agent
reports about itself is stored through the registry, audited only when a field the
fleet views show changes; the three calls that change an agent are audited with
the caller's name whatever their outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import BloomError, InvalidInput, MembridgeError, MembridgeUnavailable, StoreUnavailable, UnsafeURL
from .membridge_service import scalar_fields
from .models import AuditEntry, Worker, WorkerUpsert, new_id
from .outgoing import MembridgeResponse
from .worker_trust import require_verified

if TYPE_CHECKING:
    from .engine import Engine

MAX_AGENT_TEXT = {"agent_version": 128, "os_info": 512}  # the worker fields' limits
MAX_UPSTREAM_DETAIL_CHARS = 200
HEALTH = "agent health"


@dataclass(frozen=True)
class Control:
    """One of the agent's POST routes that change it."""

    path: str
    done: str  # the answer's "status", as the first version words it
    audit: str  # the audit action on success; "<audit>_failed" otherwise
    timeout_s: float  # the agent answers when it is done: as long as the first version waited


CONTROLS: dict[str, Control] = {
    "update": Control("self-update", "updated", "agent_updated", 120.0),
    "restart": Control("restart", "restarted", "agent_restarted", 30.0),
    "uninstall": Control("uninstall", "uninstalled", "agent_uninstalled", 60.0),
}


def _text(value: Any, field: str) -> str | None:
    """A string the agent reported, fit for a worker field (bounded, no NUL); else None."""
    if not isinstance(value, str) or not value.strip():
        return None
    return value.replace("\x00", "")[: MAX_AGENT_TEXT[field]]


def _refusal(response: MembridgeResponse, what: str) -> str:
    """Why an answer is not a usable JSON object, with the agent's own reason when it gave one."""
    if not response.ok:
        detail = response.data.get("detail") if isinstance(response.data, dict) else None
        reason = f": {detail[:MAX_UPSTREAM_DETAIL_CHARS]}" if isinstance(detail, str) and detail.strip() else ""
        return f"agent answered {response.status} for {what}{reason}"
    return f"malformed answer from the agent for {what}"


class AgentAdmin:
    """``engine.agent_admin``: the first version's agent-health, agent-update, agent-restart and agent-uninstall."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _target(self, worker_id: str) -> Worker:
        worker = self._engine.workers.get(worker_id)
        if not worker.url:
            raise InvalidInput("worker has no url", worker_id=worker_id)
        return worker

    def _agent_key(self) -> str | None:
        secret = self._engine.settings.membridge_agent_key
        return secret.reveal() if secret is not None else None

    def _audit(self, action: str, worker_id: str, actor: str, detail: str) -> AuditEntry:
        return AuditEntry(id=new_id(), timestamp=self._engine.clock.now_ms(), action=action,
                          entity_type="worker", entity_id=worker_id, actor=actor, detail=detail[:1000])

    def health(self, worker_id: str, actor: str = "api") -> dict[str, Any]:
        """GET the agent's ``/health``: ``{reachable: true, …its scalar fields}`` or
        ``{reachable: false, error}``. The worker is refreshed from what was learnt: online
        with the reported version and OS; ``error`` when the agent answered badly,
        ``offline`` when it could not be reached (an open breaker or a URL not allowed
        teaches nothing new: no change)."""
        worker = self._target(worker_id)
        try:
            response = self._engine.membridge.agents.health(worker.url, retries=True)
        except MembridgeUnavailable as exc:
            return {"reachable": False, "error": exc.message, "retry_after_s": exc.details.get("retry_after_s")}
        except UnsafeURL as exc:
            return {"reachable": False, "error": exc.message}
        except MembridgeError as exc:
            answered = "status" in exc.details  # a 5xx: the agent runs but is not healthy
            self._refresh(worker_id, status="error" if answered else "offline", actor=actor)
            return {"reachable": False, "error": exc.message}
        if not response.ok or response.malformed or not isinstance(response.data, dict):
            self._refresh(worker_id, status="error", actor=actor)
            return {"reachable": False, "error": _refusal(response, "GET /health"), "upstream_status": response.status}
        data = response.data
        self._refresh(
            worker_id, status="online", actor=actor, last_heartbeat=self._engine.clock.now_ms(),
            agent_version=_text(data.get("version"), "agent_version"),
            os_info=_text(data.get("os_info"), "os_info") or _text(data.get("hostname"), "os_info"),
        )
        return {**scalar_fields(data, depth=1), "reachable": True}

    def control(self, worker_id: str, name: str, payload: dict[str, Any], actor: str) -> dict[str, Any]:
        """POST ``payload`` to the agent's route for ``name`` (``update``, ``restart``,
        ``uninstall``) with the agent key; the agent's answer with the first version's
        ``status``. Raises ``Conflict`` (409) for a worker whose URL is not verified
        (nothing is sent), ``MembridgeError`` (502) when the agent refuses, answers
        badly or cannot be reached, ``MembridgeUnavailable`` (503) while its breaker is
        open. Audited either way; an update's reported version and an uninstall are
        stored on the worker."""
        control = CONTROLS[name]
        worker = self._target(worker_id)
        require_verified(worker)  # the agent key goes only where an admin or the sync said
        what = f"POST /{control.path}"
        try:
            response = self._engine.membridge.agents.post_control(
                worker.url, control.path, payload, self._agent_key(), timeout_s=control.timeout_s)
            if not response.ok or response.malformed or not isinstance(response.data, dict):
                raise MembridgeError(_refusal(response, what), upstream_status=response.status)
        except StoreUnavailable:
            raise
        except BloomError as exc:
            self._engine.record([self._audit(f"{control.audit}_failed", worker_id, actor, exc.message)])
            raise
        data: dict[str, Any] = response.data
        ok = data.get("ok")
        self._engine.record([self._audit(control.audit, worker_id, actor, f"status={response.status} ok={ok}")])
        if name == "update" and _text(data.get("version"), "agent_version"):
            self._refresh(worker_id, actor=actor, agent_version=_text(data["version"], "agent_version"), cause="agent update")
        elif name == "uninstall":
            self._refresh(worker_id, actor=actor, status="offline", agent_version="uninstalled", cause="agent uninstall")
        return {"status": control.done, **data}

    def _refresh(self, worker_id: str, *, actor: str, cause: str = HEALTH, **fields: Any) -> Worker:
        given = {k: v for k, v in fields.items() if v is not None}
        return self._engine.workers.refresh(WorkerUpsert(id=worker_id, **given), cause, actor=actor)
