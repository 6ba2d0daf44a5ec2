"""A membridge worker agent on a loopback port, behaving as membridge's ``agent/main.py`` (v0.4.0) does.

Auth is the agent's middleware: every route but ``GET /health`` needs the right
``X-MEMBRIDGE-AGENT`` (401 otherwise), checked before the route is looked up.
``agent_key=None`` is an agent run with ``MEMBRIDGE_DEV=1`` (nothing checked);
``agent_key=""`` one with no key and no dev mode (500 on every route but
``/health``). ``GET /health`` answers as the agent's does.

``POST /execute-task`` is synchronous, like the real agent's: it sends **one**
heartbeat with an empty body to ``{runtime_url}/api/runtime/llm-tasks/{id}/heartbeat``,
"runs the CLI" for the time ``run_s`` says (an interruptible wait standing in
for ``claude --print``, cut at ``policy.timeout_sec`` with the real agent's
"Timed out after Ns" error), posts ``{status, output, error_message,
metrics{duration_ms, tokens_used: null}}`` to ``…/complete`` (ignoring the
answer, as the agent does), and only then answers ``{ok: true|false, …}``.
``X-Runtime-API-Key`` goes with the callbacks only when ``runtime_api_key``
is set (the agent's own ``RUNTIME_API_KEY``). Without ``claude`` it answers 503;
a body without the required fields gets FastAPI's 422.

``POST /self-update``, ``/restart`` and ``/uninstall`` change the agent: they
answer 403 unless process control is allowed (``MEMBRIDGE_ALLOW_PROCESS_CONTROL``),
and a self-update moves the version ``/health`` reports to ``next_version``.

``register(runtime_url)`` self-registers with the real payload; ``heartbeat_to``
posts the control-plane heartbeat a node without projects sends. ``kill()`` is a
crash mid-run: nothing more is sent, open requests lose their connection, the
port refuses connections.
"""

from __future__ import annotations

import hmac
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from .membridge_server import Answer, PeerServer, canonical_id, detail, missing_field

AGENT_VERSION = "0.4.0"
HEARTBEAT_TIMEOUT_S = 5.0  # the agent's own timeouts for its two callbacks
COMPLETE_TIMEOUT_S = 30.0
CONTROL_ROUTES = ("/self-update", "/restart", "/uninstall")


@dataclass(frozen=True)
class Run:
    """How one task goes: how long the CLI runs and what it prints (or its exit code and stderr)."""

    seconds: float = 0.0
    output: str | None = None  # None: "done: <prompt>"
    exit_code: int = 0
    stderr: str = "claude: something went wrong"


@dataclass
class Callback:
    task_id: str
    kind: str  # "heartbeat" or "complete"
    status: int | None  # the runtime's answer; None when it could not be reached
    body: Any


class AgentStandIn(PeerServer):
    name = "agent"

    def __init__(
        self,
        node_id: str = "node-1",
        *,
        run: Run | Callable[[dict[str, Any]], Run] = Run(),
        agent_key: str | None = None,
        runtime_api_key: str | None = None,
        claude: bool = True,
        allow_process_control: bool = True,
        version: str = AGENT_VERSION,
        callback_url: Callable[[str], str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.callback_url = callback_url  # rewrites the runtime_url it is given (a proxy that mangles paths)
        self.node_id = node_id
        self.run = run
        self.agent_key = agent_key
        self.runtime_api_key = runtime_api_key
        self.claude = claude
        self.allow_process_control = allow_process_control
        self.version = version
        self.next_version = "0.4.1"  # what a self-update brings
        self.os_info = f"{node_id} / Debian GNU/Linux 12 (bookworm)"
        self.callbacks: list[Callback] = []
        self.started: list[str] = []  # task ids whose CLI run began
        self.finished: list[str] = []
        self._killed = threading.Event()
        self._born = time.time()

    # what the tests do --------------------------------------------------------------------------

    def kill(self) -> None:
        """Crash: running tasks stop without a word, their connections drop, the port refuses."""
        self._killed.set()
        self.refuse()

    def restart(self) -> None:
        """Come back on the same port after ``kill()``."""
        self._killed.clear()
        self.resume()

    def running(self) -> int:
        with self._lock:
            return len(self.started) - len(self.finished)

    def wait_for_runs(self, n: int, timeout_s: float = 10.0) -> bool:
        """Wait until ``n`` CLI runs have started."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self.started) >= n, timeout=timeout_s)

    def wait_for_callbacks(self, n: int, kind: str | None = None, timeout_s: float = 10.0) -> bool:
        with self._lock:
            return self._lock.wait_for(
                lambda: sum(1 for c in self.callbacks if kind is None or c.kind == kind) >= n, timeout=timeout_s
            )

    def executions(self) -> list[Any]:
        return [r.json for r in self.requests if r.route == "POST /execute-task"]

    def registration(self) -> dict[str, Any]:
        """The body the agent posts to ``{BLOOM_RUNTIME_URL}/api/runtime/workers`` at start."""
        return {
            "name": self.node_id,
            "url": self.url,
            "status": "online",
            "capabilities": {"claude_cli": self.claude, "max_concurrency": 2, "labels": ["systemd", platform.machine()]},
            "ip_addrs": ["127.0.0.1"],
            "agent_version": self.version,
            "os_info": self.os_info,
            "install_method": "manual",
        }

    def register(self, runtime_url: str) -> int:
        """Self-registration as the agent does it when ``BLOOM_RUNTIME_URL`` is set; returns the status."""
        headers = {"Content-Type": "application/json"}
        if self.runtime_api_key:
            headers["X-Runtime-API-Key"] = self.runtime_api_key
        with self._session() as s:
            r = s.post(f"{runtime_url.rstrip('/')}/api/runtime/workers", json=self.registration(), headers=headers, timeout=10)
        return r.status_code

    def heartbeat_to(self, control_plane_url: str, admin_key: str | None = None) -> int:
        """One control-plane heartbeat of a node with no projects (its own canonical id)."""
        headers = {"Content-Type": "application/json"}
        if admin_key:
            headers["X-MEMBRIDGE-ADMIN"] = admin_key
        payload = {"node_id": self.node_id, "canonical_id": canonical_id(self.node_id), "ip_addrs": ["127.0.0.1"],
                   "agent_version": self.version}
        with self._session() as s:
            return s.post(f"{control_plane_url}/agent/heartbeat", json=payload, headers=headers, timeout=10).status_code

    @staticmethod
    def _session() -> requests.Session:
        # A client per call, as the agent's httpx.AsyncClient per callback.
        session = requests.Session()
        session.trust_env = False
        return session

    # protocol -------------------------------------------------------------------------------------

    def route(self, method: str, path: str, headers: dict[str, str], body: Any) -> Answer | None:
        if path == "/health":
            return self._health() if method == "GET" else detail(405, "Method Not Allowed")
        refused = self._refuse_key(headers)
        if refused is not None:
            return refused
        if path == "/execute-task" and method == "POST":
            return self._execute(body)
        if path in CONTROL_ROUTES and method == "POST":
            return self._control(path, body)
        return detail(404, "Not Found")

    def _refuse_key(self, headers: dict[str, str]) -> Answer | None:
        """The agent's auth middleware: None when the request may go on."""
        if self.agent_key is None:
            return None  # MEMBRIDGE_DEV=1
        if not self.agent_key:
            return detail(500, "MEMBRIDGE_AGENT_KEY not configured on agent")
        given = {k.lower(): v for k, v in headers.items()}.get("x-membridge-agent", "")
        if not given or not hmac.compare_digest(given.encode(), self.agent_key.encode()):
            return detail(401, "Unauthorized — invalid or missing X-MEMBRIDGE-AGENT header")
        return None

    def _health(self) -> Answer:
        return Answer(200, {
            "status": "ok", "service": "membridge-agent", "version": self.version, "git_version": None,
            "git_commit": None, "hostname": self.node_id, "node_id": self.node_id, "os_info": self.os_info,
            "arch": "aarch64", "python": platform.python_version(), "init_system": "systemd", "dryrun": False,
            "allow_process_control": self.allow_process_control, "heartbeat_interval": 10, "runtime_url": None,
            "projects_count": 0, "uptime_seconds": round(time.time() - self._born, 1),
            "disk": {"total_gb": 29.1, "free_gb": 17.4, "used_pct": 40.2},
            "capabilities": {"self_update": True, "restart": True, "uninstall": True, "clone": True, "sync": True,
                             "process_control": self.allow_process_control},
        })

    def _control(self, path: str, body: Any) -> Answer:
        if path == "/self-update" and not isinstance(body, dict):
            return detail(422, [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
        if not self.allow_process_control:
            return detail(403, "Process control is disabled. Set MEMBRIDGE_ALLOW_PROCESS_CONTROL=1 to enable.")
        if path == "/self-update":
            self.version = self.next_version
            return Answer(200, {"ok": True, "version": self.version, "new_commit": "abc1234",
                                "steps": [{"step": "pull", "ok": True}, {"step": "restart", "ok": True}],
                                "detail": "Self-update completed"})
        if path == "/restart":
            return Answer(200, {"ok": True, "init_system": "systemd", "service": "membridge-agent",
                                "detail": "Service restart completed"})
        return Answer(200, {"ok": True, "node_id": self.node_id, "init_system": "systemd",
                            "steps": [{"step": "stop_service", "ok": True}],
                            "detail": "Agent uninstalled (service stopped and disabled)"})

    def _execute(self, body: Any) -> Answer | None:
        if not isinstance(body, dict):
            return missing_field("task_id")
        for name in ("task_id", "prompt", "context_id"):
            if not isinstance(body.get(name), str):
                return missing_field(name)
        if not self.claude:
            return detail(503, "Claude CLI is not installed on this node")
        task_id = body["task_id"]
        timeout = (body.get("policy") or {}).get("timeout_sec", 120)
        runtime_url = body.get("runtime_url")
        if runtime_url and self.callback_url is not None:
            runtime_url = self.callback_url(runtime_url)
        started = time.time()
        self._callback(runtime_url, task_id, "heartbeat", None, HEARTBEAT_TIMEOUT_S)
        run = self.run(body) if callable(self.run) else self.run
        with self._lock:
            self.started.append(task_id)
            self._lock.notify_all()
        try:
            timed_out = run.seconds > timeout
            if self._killed.wait(min(run.seconds, timeout)):
                return None  # crashed mid-run: no callback, no answer
            duration_ms = int((time.time() - started) * 1000)
            if timed_out:
                self._complete(runtime_url, task_id, "error", None, f"Timed out after {timeout}s", duration_ms)
                return Answer(200, {"ok": False, "task_id": task_id, "error": f"Claude CLI timed out after {timeout}s",
                                    "duration_ms": duration_ms, "detail": "Execution timed out"})
            if run.exit_code == 0:
                output = run.output if run.output is not None else f"done: {body['prompt']}"
                self._complete(runtime_url, task_id, "success", output, None, duration_ms)
                return Answer(200, {"ok": True, "task_id": task_id, "output": output, "duration_ms": duration_ms,
                                    "returncode": 0, "context_id": body["context_id"], "session_messages": 2,
                                    "detail": "Claude CLI execution completed"})
            self._complete(runtime_url, task_id, "error", None, run.stderr, duration_ms)
            return Answer(200, {"ok": False, "task_id": task_id, "error": run.stderr, "stdout": None,
                                "stderr": run.stderr, "duration_ms": duration_ms, "returncode": run.exit_code,
                                "detail": "Claude CLI execution failed"})
        finally:
            with self._lock:
                self.finished.append(task_id)
                self._lock.notify_all()

    def _complete(self, runtime_url: str | None, task_id: str, status: str, output: str | None,
                  error: str | None, duration_ms: int) -> None:
        payload = {"status": status, "output": output, "error_message": error,
                   "metrics": {"duration_ms": duration_ms, "tokens_used": None}}
        self._callback(runtime_url, task_id, "complete", payload, COMPLETE_TIMEOUT_S)

    def _callback(self, runtime_url: str | None, task_id: str, kind: str, payload: Any, timeout_s: float) -> None:
        if not runtime_url or self._killed.is_set():
            return
        headers = {"Content-Type": "application/json"}
        if self.runtime_api_key:
            headers["X-Runtime-API-Key"] = self.runtime_api_key
        url = f"{runtime_url}/api/runtime/llm-tasks/{task_id}/{kind}"
        status: int | None
        try:
            with self._session() as s:
                if payload is None:
                    r = s.post(url, headers=headers, timeout=timeout_s)  # no body at all
                else:
                    r = s.post(url, json=payload, headers=headers, timeout=timeout_s)
            status = r.status_code
        except requests.RequestException:
            status = None  # the agent logs and carries on
        with self._lock:
            self.callbacks.append(Callback(task_id, kind, status, payload))
            self._lock.notify_all()
