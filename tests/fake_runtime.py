"""An in-memory stand-in for the runtime's worker API, over real HTTP.

Implements register / claim (long poll) / heartbeat / complete as the worker
contract describes them, records every call, and can be told to misbehave:
answer 409 to a task's heartbeats, fail the next calls with 503 + Retry-After,
forget its workers (as a restarted runtime with a fresh registry would), or
stop listening so connections are refused.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/api/runtime"
MAX_WAIT_S = 30


@dataclass
class Call:
    method: str
    path: str
    body: Any
    headers: dict[str, str]
    status: int = 0
    at: float = field(default_factory=time.monotonic)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close joins request threads: nothing outlives a test
    allow_reuse_address = True


class FakeRuntime:
    """Start with ``start()`` (or as a context manager); ``url`` is its base URL."""

    def __init__(self, *, port: int = 0, api_key: str | None = None) -> None:
        self._port = port
        self.api_key = api_key
        self.cond = threading.Condition()
        self.calls: list[Call] = []
        self.workers: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.leases: dict[str, dict[str, Any]] = {}
        self.completions: dict[str, list[dict[str, Any]]] = {}
        self.stale_heartbeats: set[str] = set()  # task ids whose heartbeats get 409
        self._failures: list[tuple[str, int, float | None]] = []  # (path suffix, status, retry-after)
        self._closing = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> FakeRuntime:
        self._server = _Server(("127.0.0.1", self._port), self._handler_class())
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-runtime")
        self._thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None

    def __enter__(self) -> FakeRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # --- test controls ------------------------------------------------------------

    def add_task(self, prompt: str = "hello", **fields: Any) -> dict[str, Any]:
        task = {
            "id": str(uuid.uuid4()),
            "context_id": "ctx-1",
            "agent_slug": "writer",
            "prompt": prompt,
            "context_hints": [],
            "policy": {"timeout_sec": 120, "budget": 0},
            "desired_format": "text",
            "status": "queued",
            "attempts": 0,
            "max_attempts": 3,
            "labels": [],
            "lease_id": None,
            "worker_id": None,
        }
        task.update(fields)
        with self.cond:
            self.tasks[task["id"]] = task
            self.order.append(task["id"])
            self.cond.notify_all()
        return task

    def fail_next(self, path_suffix: str, status: int = 503, *, times: int = 1, retry_after: float | None = None) -> None:
        """The next ``times`` calls whose path ends with ``path_suffix`` get ``status``."""
        with self.cond:
            self._failures.extend([(path_suffix, status, retry_after)] * times)

    def forget_workers(self) -> None:
        with self.cond:
            self.workers.clear()

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Wait until ``predicate()`` (called under the lock) is truthy; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not (value := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"condition not met within {timeout_s} s; calls: {[(c.path, c.status) for c in self.calls]}")
                self.cond.wait(left)
            return value

    def calls_to(self, suffix: str) -> list[Call]:
        with self.cond:
            return [c for c in self.calls if c.path.endswith(suffix)]

    # --- the API -------------------------------------------------------------------

    def _handle(self, method: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if self.api_key is not None and headers.get("x-runtime-api-key") != self.api_key:
            return 401, {"error": "missing or wrong API key"}, {}
        for i, (suffix, status, retry_after) in enumerate(self._failures):
            if path.endswith(suffix):
                del self._failures[i]
                extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
                return status, {"error": "injected failure"}, extra
        if method != "POST" or not path.startswith(PREFIX):
            return 404, {"error": "no such route"}, {}
        route = path[len(PREFIX) :]
        if route == "/workers":
            return self._register(body)
        if m := re.fullmatch(r"/workers/([^/]+)/claim", route):
            return self._claim(m.group(1), body)
        if m := re.fullmatch(r"/llm-tasks/([^/]+)/(heartbeat|complete)", route):
            task = self.tasks.get(m.group(1))
            if task is None:
                return 404, {"error": "task not found"}, {}
            return self._heartbeat(task, body) if m.group(2) == "heartbeat" else self._complete(task, body)
        return 404, {"error": "no such route"}, {}

    def _register(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        name = body.get("name")
        if not name:
            return 400, {"error": "name is required"}, {}
        created = name not in self.workers
        worker = {**body, "id": name}
        self.workers[name] = worker
        return (201 if created else 200), worker, {}

    def _claim(self, name: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        worker = self.workers.get(name)
        if worker is None:
            return 404, {"error": f"worker {name} not found"}, {}
        wait_s = min(float(body.get("wait_seconds") or 0), MAX_WAIT_S)
        labels = set(worker.get("capabilities", {}).get("labels", []))
        many = body.get("max_tasks")  # then answer a list, as the runtime does
        deadline = time.monotonic() + wait_s
        while True:
            active = sum(1 for lease in self.leases.values() if lease["worker_id"] == name and lease["status"] == "active")
            room = int(worker.get("capabilities", {}).get("max_concurrency", 1)) - active
            takeable = [t for t in (self.tasks[i] for i in self.order) if t["status"] == "queued" and set(t["labels"]) <= labels]
            if takeable and not many:
                return 200, self._lease(takeable[0], name, body.get("ttl_seconds")), {}
            if takeable and room > 0:
                return 200, [self._lease(t, name, body.get("ttl_seconds")) for t in takeable[: min(int(many), room)]], {}
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                return 204, None, {}
            self.cond.wait(left)

    def _lease(self, task: dict[str, Any], worker_id: str, ttl: int | None) -> dict[str, Any]:
        ttl = int(ttl or task["policy"]["timeout_sec"] + 30)
        lease = {
            "id": str(uuid.uuid4()),
            "task_id": task["id"],
            "worker_id": worker_id,
            "expires_at": int(time.time() * 1000) + ttl * 1000,
            "ttl_seconds": ttl,
            "status": "active",
        }
        self.leases[lease["id"]] = lease
        task.update(status="leased", attempts=task["attempts"] + 1, lease_id=lease["id"], worker_id=worker_id)
        return {"task": dict(task), "lease": dict(lease), "lease_token": "token-of-" + lease["id"]}

    def _fenced(self, task: dict[str, Any], body: dict[str, Any]) -> bool:
        return (
            task["status"] in ("leased", "running")
            and body.get("lease_id") == task["lease_id"]
            and body.get("worker_id") == task["worker_id"]
            and body.get("lease_token") == "token-of-" + task["lease_id"]
        )

    def _heartbeat(self, task: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if task["id"] in self.stale_heartbeats or not self._fenced(task, body):
            return 409, {"error": "stale lease"}, {}
        lease = self.leases[task["lease_id"]]
        lease["expires_at"] = int(time.time() * 1000) + lease["ttl_seconds"] * 1000
        task["status"] = "running"
        return 200, {"task": dict(task), "lease": dict(lease)}, {}

    def _complete(self, task: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if not self._fenced(task, body):
            return 409, {"error": "stale lease"}, {}
        self.completions.setdefault(task["id"], []).append(body)
        self.leases[task["lease_id"]]["status"] = "released"
        task["status"] = "completed" if body["status"] == "success" else "failed"
        result = {"id": str(uuid.uuid4()), "task_id": task["id"], **{k: body.get(k) for k in ("status", "output", "error_message", "metrics")}}
        return 200, {"task": dict(task), "result": result, "artifact": {"id": str(uuid.uuid4()), "task_id": task["id"]}}, {}

    # --- HTTP plumbing -------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    self._send(400, {"error": "invalid JSON"}, {})
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                call = Call("POST", self.path, body, headers)
                with fake.cond:
                    fake.calls.append(call)
                    status, payload, extra = fake._handle("POST", self.path, body, headers)
                    call.status = status
                    fake.cond.notify_all()
                self._send(status, payload, extra)

            def _send(self, status: int, payload: Any, extra: dict[str, str]) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                if status != 204:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if status != 204:
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet tests

        return Handler
