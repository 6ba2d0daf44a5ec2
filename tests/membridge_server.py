"""A real HTTP server on a loopback port that speaks membridge's protocol, for tests.

Routes: ``GET /health``, ``GET /agents``, ``GET /projects``,
``GET /projects/{cid}/leadership``, ``GET /projects/{cid}/nodes``,
``POST /projects/{cid}/leadership/select`` and, for the worker-agent side,
``POST /execute-task``. Every request is recorded (method, path, headers, body).

Failures can be injected globally or per route (``"GET /agents"``), for the next
``times`` requests or until cleared: ``refuse()`` closes the listening socket
(connections are refused) and ``resume()`` listens again on the same port;
``fail(mode)`` with mode ``500``, ``404``, ``hang`` (wait on an event, bounded,
released by ``release()`` and at ``close()``), ``malformed`` (invalid JSON with a
200) or ``redirect`` (302 to ``redirect_to``).

Use it as a context manager or through the fixtures in ``membridge_fixtures``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAIL_MODES = ("500", "404", "hang", "malformed", "redirect")
HANG_BOUND_S = 10.0  # a hung handler gives up after this even if nobody releases it


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class _Failure:
    mode: str
    times: int | None  # None: until cleared


def default_agents(now_s: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now_s is None else now_s
    return [
        {"name": "node-a", "url": "http://10.0.0.11:8001", "status": "online",
         "registered_at": now - 3600.5, "last_seen": now - 1.25},
        {"name": "node-b", "url": "http://10.0.0.12:8001", "status": "offline",
         "registered_at": now - 7200.0, "last_seen": now - 300.0},
    ]


@dataclass
class _Project:
    cid: str
    name: str
    nodes: list[str]
    leader: str | None = None
    term: int = 1


@dataclass
class MembridgeState:
    agents: list[dict[str, Any]] = field(default_factory=default_agents)
    projects: dict[str, _Project] = field(default_factory=lambda: {
        "proj-1": _Project("proj-1", "first", ["node-a", "node-b"], leader="node-a"),
        "proj-2": _Project("proj-2", "second", ["node-b"]),
    })
    health: dict[str, Any] = field(default_factory=lambda: {"status": "ok", "version": "test", "agents": 2})
    execute_status: int = 202


_LEADERSHIP = re.compile(r"/projects/([^/]+)/leadership")
_NODES = re.compile(r"/projects/([^/]+)/nodes")
_SELECT = re.compile(r"/projects/([^/]+)/leadership/select")


class MembridgeServer:
    """Threaded membridge (and worker-agent) test server on 127.0.0.1."""

    def __init__(self, *, state: MembridgeState | None = None, hang_bound_s: float = HANG_BOUND_S) -> None:
        self.state = state or MembridgeState()
        self.hang_bound_s = hang_bound_s
        self.redirect_to = "http://127.0.0.1:9/elsewhere"
        self._lock = threading.Condition()
        self._requests: list[Recorded] = []
        self._failures: dict[str | None, _Failure] = {}
        self._release = threading.Event()
        self._hanging = 0
        self._port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------

    def start(self) -> MembridgeServer:
        handler = _make_handler(self)
        httpd = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        # Handler threads are joined at close (no daemon threads hiding shutdown bugs).
        httpd.daemon_threads = False
        httpd.block_on_close = True
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"membridge-test-{self._port}")
        self._thread.start()
        return self

    def refuse(self) -> None:
        """Stop listening: new connections are refused until ``resume()``."""
        self.release()
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join()

    def resume(self) -> None:
        """Listen again on the same port."""
        self._release.clear()
        self.start()

    def close(self) -> None:
        self.refuse()

    def __enter__(self) -> MembridgeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    # failure injection ---------------------------------------------------------------

    def fail(self, mode: str, route: str | None = None, *, times: int | None = None) -> None:
        """Make ``route`` (``"GET /agents"``; None = every route) fail in ``mode``."""
        if mode not in FAIL_MODES:
            raise ValueError(f"unknown failure mode {mode!r}")
        with self._lock:
            self._failures[route] = _Failure(mode, times)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def release(self) -> None:
        """Let hung handlers answer (with a 500) now."""
        self._release.set()

    def _take_failure(self, route: str) -> str | None:
        with self._lock:
            for key in (route, None):
                failure = self._failures.get(key)
                if failure is None:
                    continue
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        del self._failures[key]
                return failure.mode
        return None

    # recorded requests ----------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def count(self, route: str | None = None) -> int:
        return sum(1 for r in self.requests if route is None or r.route == route)

    def wait_for_requests(self, n: int, timeout_s: float = 5.0) -> bool:
        """Wait until at least ``n`` requests have arrived."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._requests) >= n, timeout=timeout_s)

    def wait_for_hanging(self, n: int, timeout_s: float = 5.0) -> bool:
        """Wait until ``n`` handlers are hung at the same time."""
        with self._lock:
            return self._lock.wait_for(lambda: self._hanging >= n, timeout=timeout_s)

    def _record(self, entry: Recorded) -> None:
        with self._lock:
            self._requests.append(entry)
            self._lock.notify_all()

    def _hang(self) -> None:
        with self._lock:
            self._hanging += 1
            self._lock.notify_all()
        try:
            self._release.wait(self.hang_bound_s)
        finally:
            with self._lock:
                self._hanging -= 1

    # protocol ---------------------------------------------------------------------------

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        s = self.state
        if method == "GET" and path == "/health":
            return 200, s.health
        if method == "GET" and path == "/agents":
            return 200, s.agents
        if method == "GET" and path == "/projects":
            return 200, [{"cid": p.cid, "name": p.name} for p in s.projects.values()]
        if method == "POST" and path == "/execute-task":
            return s.execute_status, {"accepted": s.execute_status < 300}
        for pattern, allowed_method in ((_LEADERSHIP, "GET"), (_NODES, "GET"), (_SELECT, "POST")):
            match = pattern.fullmatch(path)
            if match is None or method != allowed_method:
                continue
            project = s.projects.get(match.group(1))
            if project is None:
                return 404, {"error": "unknown project"}
            if pattern is _LEADERSHIP:
                return 200, {"cid": project.cid, "leader": project.leader, "term": project.term}
            if pattern is _NODES:
                return 200, [{"name": n, "is_leader": n == project.leader} for n in project.nodes]
            node = body.get("node") if isinstance(body, dict) else None
            if node not in project.nodes:
                return 400, {"error": "unknown node"}
            with self._lock:
                project.leader, project.term = node, project.term + 1
            return 200, {"cid": project.cid, "leader": project.leader, "term": project.term}
        return 404, {"error": "not found"}


def _make_handler(server: MembridgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing left open at close

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: bytes, content_type: str = "application/json",
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def _handle(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            entry = Recorded(self.command, split.path, split.query, dict(self.headers.items()), raw)
            server._record(entry)
            mode = server._take_failure(entry.route)
            if mode == "hang":
                server._hang()
                mode = "500"
            try:
                if mode == "500":
                    self._send(500, b'{"error": "injected failure"}')
                elif mode == "404":
                    self._send(404, b'{"error": "injected not found"}')
                elif mode == "malformed":
                    self._send(200, b'{"agents": [ this is not json')
                elif mode == "redirect":
                    self._send(302, b"", extra={"Location": server.redirect_to})
                else:
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        self._send(400, b'{"error": "bad json"}')
                        return
                    status, payload = server.route(self.command, split.path, body)
                    self._send(status, json.dumps(payload).encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timed out) before we answered

        do_GET = _handle
        do_POST = _handle

    return Handler
