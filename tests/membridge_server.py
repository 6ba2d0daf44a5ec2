"""Real HTTP servers on loopback ports that speak membridge's protocols, for tests.

``PeerServer`` is what both stand-ins share: a threaded HTTP/1.1 server that
records every request (method, path, headers, body) and injects failures,
globally or per route (``"GET /agents"``), for the next ``times`` requests or
until cleared. ``refuse()`` closes the listening socket and every open
connection (connections are then refused) and ``resume()`` listens again on the
same port; ``fail(mode)`` with mode ``500``, ``404``, ``hang`` (wait on an
event, bounded, released by ``release()`` and at ``close()``), ``malformed``
(invalid JSON with a 200), ``redirect`` (302 to ``redirect_to``), ``drip`` (a
200 whose body arrives one byte every ``drip_interval_s``) or ``reset`` (the
connection is closed without an answer).

``MembridgeServer`` is the control plane as membridge's ``server/main.py``
behaves: in memory (``restart()`` empties it), ``X-MEMBRIDGE-ADMIN`` checked on
every route but ``/health`` when an admin key is set, errors as
``{"detail": …}`` (422 bodies list the invalid fields), agents ``unknown`` with
``last_seen: null`` until the control plane itself calls them (``contact()``),
``POST /agent/heartbeat`` feeding ``/projects/{cid}/nodes`` (never ``/agents``),
leadership select taking ``{primary_node_id, lease_seconds}``.

The worker agent stand-in is in ``agent_standin.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import requests

FAIL_MODES = ("500", "404", "hang", "malformed", "redirect", "drip", "reset")
HANG_BOUND_S = 10.0  # a hung or dripping handler gives up after this even if nobody releases it


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


class Answer:
    """What a route returns: a status and a JSON payload (or raw bytes)."""

    def __init__(self, status: int, payload: Any = None, *, raw: bytes | None = None) -> None:
        self.status = status
        self.body = raw if raw is not None else json.dumps(payload).encode()


def detail(status: int, message: Any) -> Answer:
    """FastAPI's error shape."""
    return Answer(status, {"detail": message})


def missing_field(name: str) -> Answer:
    """FastAPI's 422 for a required body field that is absent."""
    return detail(422, [{"type": "missing", "loc": ["body", name], "msg": "Field required", "input": None}])


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client closed its keep-alive connection: nothing to report
        super().handle_error(request, client_address)


class PeerServer:
    """Threaded test server on 127.0.0.1: recording, failure injection, clean shutdown."""

    name = "peer"

    def __init__(self, *, hang_bound_s: float = HANG_BOUND_S, drip_interval_s: float = 0.5) -> None:
        self.hang_bound_s = hang_bound_s
        self.drip_interval_s = drip_interval_s
        self.redirect_to = "http://127.0.0.1:9/elsewhere"
        self._lock = threading.Condition()
        self._requests: list[Recorded] = []
        self._failures: dict[str | None, _Failure] = {}
        self._release = threading.Event()
        self._hanging = 0
        self._port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # lifecycle ---------------------------------------------------------------

    def start(self) -> PeerServer:
        httpd = _QuietServer(("127.0.0.1", self._port), _make_handler(self))
        # Handler threads are joined at close (no daemon threads hiding shutdown bugs).
        httpd.daemon_threads = False
        httpd.block_on_close = True
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}-test-{self._port}")
        self._thread.start()
        return self

    def refuse(self) -> None:
        """Stop listening and drop every open connection: new connections are refused until ``resume()``."""
        self.release()
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            self._drop_connections()
            httpd.server_close()
        if thread is not None:
            thread.join()

    def resume(self) -> None:
        """Listen again on the same port."""
        self._release.clear()
        self.start()

    def close(self) -> None:
        self.refuse()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def _drop_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

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
        """Let hung handlers answer (with a 500) and dripping ones stop, now."""
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

    def wait_for_requests(self, n: int, timeout_s: float = 5.0, route: str | None = None) -> bool:
        """Wait until at least ``n`` requests (of ``route``, if given) have arrived."""
        with self._lock:
            return self._lock.wait_for(
                lambda: sum(1 for r in self._requests if route is None or r.route == route) >= n, timeout=timeout_s
            )

    def wait_for_hanging(self, n: int, timeout_s: float = 5.0) -> bool:
        """Wait until ``n`` handlers are hung (or dripping) at the same time."""
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

    def _drip(self, handler: BaseHTTPRequestHandler) -> None:
        body = b'{"status": "ok", "padding": "' + b"x" * 1000 + b'"}'
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.flush()
        with self._lock:
            self._hanging += 1
            self._lock.notify_all()
        try:
            started = time.monotonic()
            for i in range(len(body)):
                if self._release.wait(self.drip_interval_s) or time.monotonic() - started > self.hang_bound_s:
                    return
                handler.wfile.write(body[i:i + 1])
                handler.wfile.flush()
        finally:
            with self._lock:
                self._hanging -= 1

    # protocol ---------------------------------------------------------------------------

    def route(self, method: str, path: str, headers: dict[str, str], body: Any) -> Answer:
        """Answer one request; override."""
        return detail(404, "Not Found")


def _make_handler(server: PeerServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn; every answer has a Content-Length

        def setup(self) -> None:
            super().setup()
            # As uvicorn does: headers and body are two writes here, and with Nagle on the
            # second waits for a delayed ACK (40 ms) the real peers never cost.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server._track(self.connection, True)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                server._track(self.connection, False)

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
                    self._send(500, b'{"detail": "injected failure"}')
                elif mode == "404":
                    self._send(404, b'{"detail": "injected not found"}')
                elif mode == "malformed":
                    self._send(200, b'{"agents": [ this is not json')
                elif mode == "redirect":
                    self._send(302, b"", extra={"Location": server.redirect_to})
                elif mode == "drip":
                    server._drip(self)
                    self.close_connection = True
                elif mode == "reset":
                    self.close_connection = True
                else:
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        self._send(422, b'{"detail": [{"type": "json_invalid", "msg": "JSON decode error"}]}')
                        return
                    answer = server.route(self.command, split.path, dict(self.headers.items()), body)
                    if answer is None:  # the route dropped the connection (an agent killed mid-run)
                        self.close_connection = True
                        return
                    self._send(answer.status, answer.body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timed out) before we answered

        do_GET = _handle
        do_POST = _handle
        do_DELETE = _handle

    return Handler


# --- the control plane ------------------------------------------------------------------------------


def canonical_id(name: str) -> str:
    """membridge's project (and node-only heartbeat) id: sha256 of the name, 16 hex digits."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


@dataclass
class ControlPlaneState:
    projects: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {name, canonical_id, created_at}
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {name, url, status, registered_at, last_seen}
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # "cid:node_id" → node record
    leadership: dict[str, str] = field(default_factory=dict)  # cid → preferred primary


_NODES = re.compile(r"/projects/([^/]+)/nodes")
_LEADERSHIP = re.compile(r"/projects/([^/]+)/leadership")
_SELECT = re.compile(r"/projects/([^/]+)/leadership/select")
_AGENT = re.compile(r"/agents/([^/]+)")
_OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc")


class MembridgeServer(PeerServer):
    """The membridge control plane, in memory, on a loopback port."""

    name = "membridge"

    def __init__(self, *, admin_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.admin_key = admin_key
        self.state = ControlPlaneState()
        self.health = {"status": "ok", "service": "membridge-control-plane", "version": "0.3.0"}

    # what an operator or the control plane's own jobs do -----------------------------------------

    def restart(self) -> None:
        """Everything is in memory: a restart forgets projects, agents and nodes."""
        with self._lock:
            self.state = ControlPlaneState()

    def add_agent(self, name: str, url: str, *, at_s: float | None = None) -> dict[str, Any]:
        """``POST /agents`` as an operator would (status unknown, last_seen null)."""
        with self._lock:
            agent = {"name": name, "url": url.rstrip("/"), "status": "unknown",
                     "registered_at": time.time() if at_s is None else at_s, "last_seen": None}
            self.state.agents[name] = agent
            return dict(agent)

    def set_agents(self, agents: list[dict[str, Any]]) -> None:
        """Replace the agent list (as the control plane's state after its own calls would be)."""
        with self._lock:
            self.state.agents = {a["name"]: dict(a) for a in agents}

    def add_project(self, name: str) -> str:
        with self._lock:
            cid = canonical_id(name)
            self.state.projects[name] = {"name": name, "canonical_id": cid, "created_at": time.time()}
            return cid

    def contact(self, name: str) -> str:
        """The control plane calls an agent (as its sync jobs do, ``GET {url}/health`` here):
        only this sets the agent's ``status`` and ``last_seen``. Returns the new status."""
        with self._lock:
            agent = self.state.agents[name]
            url = agent["url"]
        try:
            with requests.Session() as s:
                s.trust_env = False
                r = s.get(f"{url}/health", timeout=5)
            r.raise_for_status()
            status, seen = "online", time.time()
        except requests.ConnectionError:
            status, seen = "offline", None
        except requests.RequestException:
            status, seen = "error", None
        with self._lock:
            agent["status"] = status
            if seen is not None:
                agent["last_seen"] = seen
        return status

    # protocol ---------------------------------------------------------------------------------

    def route(self, method: str, path: str, headers: dict[str, str], body: Any) -> Answer:
        if self.admin_key is not None and path not in _OPEN_PATHS:
            given = {k.lower(): v for k, v in headers.items()}.get("x-membridge-admin")
            if given != self.admin_key:
                return detail(401, "Unauthorized — invalid or missing X-MEMBRIDGE-ADMIN header")
        with self._lock:
            return self._route(method, path, body)

    def _route(self, method: str, path: str, body: Any) -> Answer:
        s = self.state
        if path == "/health" and method == "GET":
            return Answer(200, {**self.health, "projects": len(s.projects), "agents": len(s.agents)})
        if path == "/projects":
            if method == "GET":
                return Answer(200, list(s.projects.values()))
            if method == "POST":
                name = body.get("name") if isinstance(body, dict) else None
                if not isinstance(name, str):
                    return missing_field("name")
                if name in s.projects:
                    return detail(409, f"Project '{name}' already exists")
                project = {"name": name, "canonical_id": canonical_id(name), "created_at": time.time()}
                s.projects[name] = project
                return Answer(201, project)
        if path == "/agents":
            if method == "GET":
                return Answer(200, [dict(a) for a in s.agents.values()])
            if method == "POST":
                if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                    return missing_field("name")
                if not isinstance(body.get("url"), str):
                    return missing_field("url")
                if body["name"] in s.agents:
                    return detail(409, f"Agent '{body['name']}' already registered")
                agent = {"name": body["name"], "url": body["url"].rstrip("/"), "status": "unknown",
                         "registered_at": time.time(), "last_seen": None}
                s.agents[body["name"]] = agent
                return Answer(201, dict(agent))
        if (m := _AGENT.fullmatch(path)) and method == "DELETE":
            if s.agents.pop(m.group(1), None) is None:
                return detail(404, f"Agent '{m.group(1)}' not found")
            return Answer(204, raw=b"")
        if path == "/agent/heartbeat" and method == "POST":
            return self._heartbeat(body)
        if (m := _NODES.fullmatch(path)) and method == "GET":
            return Answer(200, [dict(n) for n in s.nodes.values() if n["canonical_id"] == m.group(1)])
        if (m := _SELECT.fullmatch(path)) and method == "POST":
            return self._select(m.group(1), body)
        if (m := _LEADERSHIP.fullmatch(path)) and method == "GET":
            cid = m.group(1)
            nodes = [dict(n) for n in s.nodes.values() if n["canonical_id"] == cid]
            return Answer(200, {"canonical_id": cid, "preferred_primary": s.leadership.get(cid),
                                "node_count": len(nodes), "nodes": nodes})
        if path in ("/health", "/projects", "/agents", "/agent/heartbeat") or _NODES.fullmatch(path) \
                or _SELECT.fullmatch(path) or _LEADERSHIP.fullmatch(path) or _AGENT.fullmatch(path):
            return detail(405, "Method Not Allowed")
        return detail(404, "Not Found")

    def _heartbeat(self, body: Any) -> Answer:
        if not isinstance(body, dict):
            return missing_field("node_id")
        for name in ("node_id", "canonical_id"):
            if not isinstance(body.get(name), str):
                return missing_field(name)
        now = time.time()
        cid, node_id = body["canonical_id"], body["node_id"]
        key = f"{cid}:{node_id}"
        primary = self.state.leadership.get(cid, "")
        role = ("primary" if node_id == primary else "secondary") if primary else "unknown"
        existing = self.state.nodes.get(key)
        self.state.nodes[key] = {
            "node_id": node_id, "canonical_id": cid, "role": role, "obs_count": body.get("obs_count"),
            "db_sha": body.get("db_sha"), "last_seen": body.get("last_seen") or now,
            "ip_addrs": body.get("ip_addrs") or [], "registered_at": existing["registered_at"] if existing else now,
        }
        return Answer(200, {"ok": True, "role": role, "canonical_id": cid})

    def _select(self, cid: str, body: Any) -> Answer:
        if not isinstance(body, dict) or "primary_node_id" not in body:
            return missing_field("primary_node_id")
        primary = body["primary_node_id"]
        if not isinstance(primary, str):
            return detail(422, [{"type": "string_type", "loc": ["body", "primary_node_id"],
                                 "msg": "Input should be a valid string", "input": primary}])
        lease_seconds = body.get("lease_seconds", 3600)
        self.state.leadership[cid] = primary
        for node in self.state.nodes.values():
            if node["canonical_id"] == cid:
                node["role"] = "primary" if node["node_id"] == primary else "secondary"
        return Answer(200, {"ok": True, "canonical_id": cid, "primary_node_id": primary, "lease_seconds": lease_seconds,
                            "detail": f"Leadership preference set: primary={primary}."})
