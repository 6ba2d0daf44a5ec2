"""Membridge wiring: runtime configuration, test-connection, pass-through and sync fetch.

``MembridgeService`` is what ``engine.membridge`` holds. It owns the two
hardened clients (``MembridgeClient`` for the control plane, ``AgentClient``
for worker agents, which push dispatch and the liveness probes use) and the
membridge configuration:

- The URL and admin key are persisted in ``runtime_settings``; the environment
  values are the defaults. The clients read them through providers on every
  call, so a change takes effect on the next call without a restart.
- Keys never leave this module except in the outgoing headers: views mask
  them, audit details name only what changed, errors come from the clients,
  which never echo them.
- Everything that does network I/O here runs on the caller's thread (an API
  request thread, or the syncer's fetch thread), never inside an actor's
  message handler.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .agent_client import AgentClient
from .errors import BloomError, InvalidInput, MembridgeError, MembridgeUnavailable, StoreUnavailable
from .membridge import MembridgeClient
from .models import AuditEntry, Worker, new_id
from .outgoing import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Backoff, MembridgeResponse, key_header
from .settings import mask, mask_ends
from .urls import join, safe_path_segment, validate_outgoing_url

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("bloom_runtime.membridge")

URL_KEY = "membridge_server_url"
ADMIN_KEY = "membridge_admin_key"
# The outcome of the last test-connection, under the first version's keys so an adopted
# database keeps its own: "true"/"false", and epoch ms ("" once the configuration changed).
CONNECTED_KEY = "connected"
LAST_TEST_KEY = "last_test"
MAX_FIELD_CHARS = 256  # parsed /health fields are shown, bounded; raw bodies never are
MAX_FIELDS = 32
NOT_CONFIGURED_RETRY_AFTER_S = 60
HIDDEN = "****"  # a set key, as callers that may not see its ends are shown it
MAX_NODE_QUERIES = 64  # /projects/{cid}/nodes reads one sync may make
MAX_NODE_ID_CHARS = 128
MAX_LEASE_SECONDS = 366 * 86_400
_NODE_ID_RE = re.compile(r"[^\x00-\x1f\x7f]+")  # printable: no NUL or other control characters


def node_canonical_id(name: str) -> str:
    """The id a node with no projects heartbeats under (membridge's sha256(name)[:16])."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MembridgeTuning:
    """Client constants; tests shrink them through ``Settings.extra`` (same names)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_base_s: float = 0.5
    breaker_fail_max: int = 5
    breaker_reset_s: float = 30.0
    agent_timeout_s: float = DEFAULT_TIMEOUT_S
    agent_retries: int = DEFAULT_RETRIES
    agent_breaker_fail_max: int = 5
    agent_breaker_reset_s: float = 30.0

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> MembridgeTuning:
        """Read ``membridge_<field>`` entries (e.g. ``membridge_breaker_fail_max``)."""
        values = {f: extra[f"membridge_{f}"] for f in cls.__dataclass_fields__ if f"membridge_{f}" in extra}
        return cls(**values)


class SyncStats:
    """Counters of the membridge sync for /health and metrics (written by the syncer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.successes = 0
        self.failures = 0
        self.skipped = 0  # ticks that found a sync still running
        self.agents_seen = 0
        self.last_duration_ms: int | None = None

    def success(self, agents: int, duration_ms: int) -> None:
        with self._lock:
            self.successes += 1
            self.agents_seen = agents
            self.last_duration_ms = duration_ms

    def failure(self, duration_ms: int) -> None:
        with self._lock:
            self.failures += 1
            self.last_duration_ms = duration_ms

    def skip(self) -> None:
        with self._lock:
            self.skipped += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "successes": self.successes,
                "failures": self.failures,
                "skipped": self.skipped,
                "agents_seen": self.agents_seen,
                "last_duration_ms": self.last_duration_ms,
            }


def scalar_fields(data: Any, depth: int = 0) -> dict[str, Any]:
    """The scalar fields of a JSON object, bounded, and of the objects in it down to
    ``depth`` levels: what a peer's /health may show a client (raw bodies never)."""
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in list(data.items())[:MAX_FIELDS]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        if isinstance(value, str):
            out[key] = value[:MAX_FIELD_CHARS]
        elif value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
            out[key] = value
        elif isinstance(value, dict) and depth > 0:
            out[key] = scalar_fields(value, depth - 1)
    return out


class MembridgeService:
    """``engine.membridge``: configuration, the clients and the calls built on them."""

    def __init__(self, engine: Engine, tuning: MembridgeTuning | None = None) -> None:
        self._engine = engine
        settings = engine.settings
        self.tuning = tuning or MembridgeTuning.from_extra(settings.extra)
        self.allowed = engine.allowed
        self.sync_stats = SyncStats()
        self._lock = threading.Lock()
        self._stored: dict[str, str] | None = None
        self._last_test: dict[str, Any] | None = None
        t = self.tuning
        self.client = MembridgeClient(
            self._url, self._admin_key, timeout_s=t.timeout_s, retries=t.retries,
            backoff=Backoff(base_s=t.backoff_base_s), breaker_fail_max=t.breaker_fail_max,
            breaker_reset_s=t.breaker_reset_s, allowed=self.allowed,
        )
        self.agents = AgentClient(
            timeout_s=t.agent_timeout_s, retries=t.agent_retries, backoff=Backoff(base_s=t.backoff_base_s),
            breaker_fail_max=t.agent_breaker_fail_max, breaker_reset_s=t.agent_breaker_reset_s, allowed=self.allowed,
        )
        try:
            self._load()
        except StoreUnavailable as exc:  # loaded on first use instead
            log.warning("membridge configuration not loaded yet: %s", exc.message)

    def __repr__(self) -> str:
        return f"MembridgeService(configured={self.configured})"

    def close(self) -> None:
        """Release both clients' connection pools (idempotent)."""
        self.client.close()
        self.agents.close()

    # --- configuration -------------------------------------------------------------

    def _load(self) -> dict[str, str]:
        stored = self._engine.store.get_settings()
        values = {k: stored[k] for k in (URL_KEY, ADMIN_KEY, CONNECTED_KEY, LAST_TEST_KEY) if stored.get(k)}
        with self._lock:
            self._stored = values
        return values

    def _values(self) -> dict[str, str]:
        with self._lock:
            stored = self._stored
        return stored if stored is not None else self._load()

    def _url(self) -> str | None:
        return self._values().get(URL_KEY) or self._engine.settings.membridge_server_url

    def _admin_key(self) -> str | None:
        key = self._values().get(ADMIN_KEY)
        if key:
            return key
        secret = self._engine.settings.membridge_admin_key
        return secret.reveal() if secret is not None else None

    def agent_key(self) -> str | None:
        """``MEMBRIDGE_AGENT_KEY``, sent as ``X-MEMBRIDGE-AGENT`` to agents only when set."""
        secret = self._engine.settings.membridge_agent_key
        return secret.reveal() if secret is not None else None

    @property
    def configured(self) -> bool:
        """A membridge URL is set (env or runtime config)."""
        try:
            return bool(self._url())
        except StoreUnavailable:
            return bool(self._engine.settings.membridge_server_url)

    def get_config(self, refresh: bool = True, *, show_key: bool = False) -> dict[str, Any]:
        """``{membridge_server_url, admin_key, admin_key_masked, configured, connected, last_test}``.

        The key's ends show only with ``show_key`` (admin callers): ``admin_key`` its last
        4 characters, ``admin_key_masked`` the first version's ``adm-****cdef``; others
        learn only whether a key is set. ``connected`` and ``last_test`` are the recorded
        outcome of the last test-connection since the configuration changed. Re-reads the
        store so a change made by another engine process shows (and applies) here too."""
        values = self._load() if refresh else self._values()
        url, key = self._url(), self._admin_key()
        hidden = HIDDEN if key else None
        last_test = values.get(LAST_TEST_KEY, "")
        return {
            "membridge_server_url": url,
            "admin_key": mask(key) if show_key else hidden,
            "admin_key_masked": (mask_ends(key) if show_key else hidden) or "",
            "configured": bool(url),
            "connected": values.get(CONNECTED_KEY) == "true",
            "last_test": int(last_test) if last_test.isdigit() else None,
        }

    def update_config(self, url: str | None = None, admin_key: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Validate, persist and apply a new URL and/or admin key; audited by name only.

        An empty ``admin_key`` leaves the key as it is: the first version's settings form
        sends one whenever only the URL was edited."""
        values: dict[str, str] = {}
        if url is not None:
            values[URL_KEY] = validate_outgoing_url(url, self.allowed)
        if admin_key:
            try:
                key_header("X", admin_key, "admin_key")
            except MembridgeError as exc:
                raise InvalidInput(exc.message) from None
            values[ADMIN_KEY] = admin_key
        if values:
            changed = ",".join(sorted(values))  # names only: never the key itself
            # The last test described the old configuration.
            values.update({CONNECTED_KEY: "false", LAST_TEST_KEY: ""})
            self._engine.store.run(lambda tx: tx.set_settings(values))
            self._load()
            self._last_test = None
            self._engine.record([self._audit("config_updated", "config", "runtime", actor, f"changed={changed}")])
        return self.get_config(refresh=False, show_key=True)

    def _audit(self, action: str, entity_type: str, entity_id: str, actor: str, detail: str | None) -> AuditEntry:
        return AuditEntry(id=new_id(), timestamp=self._engine.clock.now_ms(), action=action,
                          entity_type=entity_type, entity_id=entity_id, actor=actor, detail=detail)

    def _require_configured(self) -> None:
        if not self.configured:
            raise MembridgeUnavailable("membridge not configured", retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)

    # --- calls -------------------------------------------------------------------------

    def test_connection(self) -> dict[str, Any]:
        """GET membridge ``/health``; record the outcome (``connected``, ``last_test``) and
        answer it, reachable or not, as the first version does.

        ``{connected: true, status, health: {parsed scalar fields}, latency_ms, tested_at}``,
        or ``{connected: false, error, …}`` (with ``status`` when membridge answered, and
        ``retry_after_s`` while its breaker is open). Not configured: ``{connected: false,
        configured: false, error}``, nothing recorded. Raises only ``StoreUnavailable``."""
        if not self.configured:
            return {"connected": False, "configured": False, "error": "membridge not configured"}
        started = time.monotonic()
        tested_at = self._engine.clock.now_ms()
        result: dict[str, Any] = {"connected": False, "tested_at": tested_at}
        try:
            response = self.client.request("GET", "/health")
            if not response.ok:
                raise MembridgeError(f"membridge answered {response.status} for GET /health", status=response.status)
            if response.malformed or not isinstance(response.data, dict):
                raise MembridgeError("malformed /health response from membridge", status=response.status)
        except StoreUnavailable:
            raise
        except BloomError as exc:  # unreachable, refused, a bad answer, the breaker open, a URL not allowed
            result["error"] = exc.message
            for detail in ("status", "retry_after_s"):
                if detail in exc.details:
                    result[detail] = exc.details[detail]
        else:
            result.update(connected=True, status=response.status, health=scalar_fields(response.data))
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        self._last_test = result
        self._record_test(result["connected"], tested_at)
        return result

    def _record_test(self, connected: bool, tested_at: int) -> None:
        values = {CONNECTED_KEY: "true" if connected else "false", LAST_TEST_KEY: str(tested_at)}
        try:
            self._engine.store.run(lambda tx: tx.set_settings(values))
            self._load()
        except StoreUnavailable as exc:  # the caller still gets the outcome; /config shows the one before
            log.warning("test-connection outcome not recorded: %s", exc.message)

    def proxy(self, method: str, segments: Sequence[str], body: Any = None) -> MembridgeResponse:
        """Call membridge at ``/seg/seg/...``; each segment must be a safe path segment.

        Raises ``InvalidInput`` for a bad segment, ``MembridgeUnavailable`` when not
        configured or the breaker is open, ``MembridgeError`` when unreachable."""
        for segment in segments:
            safe_path_segment(segment, what="path parameter")
        self._require_configured()
        return self.client.request(method, join("", *segments), json=body)

    def select_leader(self, cid: str, body: dict[str, Any], actor: str) -> MembridgeResponse:
        """POST ``/projects/{cid}/leadership/select`` with ``{primary_node_id, lease_seconds?}``.

        The body is checked before anything is sent or audited (``InvalidInput``);
        the attempt and its outcome are audited."""
        safe_path_segment(cid, what="project id")
        primary = body.get("primary_node_id")
        if not isinstance(primary, str) or not 1 <= len(primary) <= MAX_NODE_ID_CHARS or not _NODE_ID_RE.fullmatch(primary):
            raise InvalidInput(f"primary_node_id must be a string of 1-{MAX_NODE_ID_CHARS} printable characters")
        sent: dict[str, Any] = {"primary_node_id": primary}
        lease_seconds = body.get("lease_seconds")
        if lease_seconds is not None:
            if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, int) or not 1 <= lease_seconds <= MAX_LEASE_SECONDS:
                raise InvalidInput(f"lease_seconds must be an integer between 1 and {MAX_LEASE_SECONDS}")
            sent["lease_seconds"] = lease_seconds
        shown = f"primary={primary}" + (f" lease_seconds={lease_seconds}" if lease_seconds is not None else "")
        try:
            response = self.proxy("POST", ["projects", cid, "leadership", "select"], sent)
        except BloomError as exc:
            self._engine.record([self._audit("leadership_select_failed", "project", cid, actor,
                                             f"{shown}: {exc.message}"[:1000])])
            raise
        action = "leadership_selected" if response.ok else "leadership_select_refused"
        self._engine.record([self._audit(action, "project", cid, actor, f"{shown} status={response.status}")])
        return response

    def fetch_agents(self) -> list[dict[str, Any]]:
        """``GET /agents`` (blocking; the syncer calls it off its actor thread)."""
        self._require_configured()
        return self.client.agents()

    def fetch_node_sightings(self, agent_names: Sequence[str]) -> dict[str, float]:
        """When each node last heartbeated the control plane (float seconds), from
        ``/projects/{cid}/nodes``: each project's, then the node-only id
        (sha256(name)[:16]) of agents no project listed. The control plane fills
        ``/agents`` only when it calls an agent itself, so these are often the
        only signs of life it has. Best effort: a failed query only means no
        sighting; at most ``MAX_NODE_QUERIES`` queries a sync."""
        seen: dict[str, float] = {}
        budget = MAX_NODE_QUERIES

        def nodes(cid: str) -> None:
            nonlocal budget
            budget -= 1
            try:
                data = self.client.get_json(join("", "projects", safe_path_segment(cid), "nodes"))
            except (MembridgeError, InvalidInput) as exc:
                log.debug("membridge nodes of %s not read: %s", cid, getattr(exc, "message", exc))
                return
            for node in data if isinstance(data, list) else ():
                if not isinstance(node, dict) or not isinstance(node.get("node_id"), str):
                    continue
                at = node.get("last_seen")
                if isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at) and at > 0:
                    seen[node["node_id"]] = max(seen.get(node["node_id"], 0.0), float(at))

        try:
            projects = self.client.get_json("/projects")
        except MembridgeError as exc:
            log.debug("membridge projects not read: %s", exc.message)
            projects = []
        for project in projects if isinstance(projects, list) else ():
            cid = project.get("canonical_id") if isinstance(project, dict) else None
            if isinstance(cid, str) and budget > 0:
                nodes(cid)
        for name in agent_names:
            if name not in seen and budget > 0:
                nodes(node_canonical_id(name))
        return seen

    def sync_now(self, timeout_s: float | None = None) -> list[Any] | None:
        """Run one sync now and wait until its upserts are committed.

        Returns the ``(worker, created)`` pairs, ``[]`` when nothing changed, or
        ``None`` when not configured or a sync was already running; raises the
        sync's error when it failed."""
        from bloom_runtime.actors.base import Tick

        return self._engine.call("membridge", lambda r: Tick(r), timeout_s)

    def known_workers(self) -> list[Worker]:
        """Every worker, ``url_verified`` filled in: the sync merges with what others registered."""
        return self._engine.workers.list()

    # --- state ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Client state, last test and sync counters for /health and metrics (never a key);
        just ``{"configured": False}`` while no membridge URL is set."""
        if not self.configured:
            return {"configured": False}
        state = self.client.state()
        breaker = state.get("breaker")
        state.update({
            "configured": self.configured,
            "breaker_state": breaker,
            "last_test": self._last_test,
            "sync": {**self._engine.jobs["membridge_sync"].snapshot(), **self.sync_stats.snapshot()},
            "agents": {
                "open_breakers": sum(1 for s in self.agents.breakers.states().values() if s != "closed"),
                "failures": self.agents.state()["failures"],
            },
        })
        return state
