"""End to end: a real ``bloom-runtime serve`` process on a loopback port, driven with requests."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import CLIENT_KEY, new_task, wait_for

pytestmark = pytest.mark.e2e
HEADER = "X-Runtime-API-Key"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db: Path, *extra: str, env: dict[str, str] | None = None, database_url: str | None = None) -> None:
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.origin}/api/runtime"
        self.db = db
        full_env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY", "DATABASE_URL")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bloom_runtime.cli", "serve", "--port", str(self.port),
             "--database-url", database_url or f"sqlite:///{db}", "--lease-sweep-interval", "0.2", *extra],
            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def wait_ready(self, session: requests.Session) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.communicate()}")
            try:
                with session.get(self.url + "/health", timeout=1) as r:
                    return r.status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, timeout_s=20, interval_s=0.05)

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[Server, requests.Session]]:
    # Automatic dispatch off: these tests drive the lease calls themselves, for a worker whose URL answers nothing.
    srv = Server(tmp_path / "e2e.db", "--threads", "80", env={"RUNTIME_API_KEY": f"agents={CLIENT_KEY}", "AUTO_DISPATCH": "off"})
    with requests.Session() as session:
        session.headers[HEADER] = CLIENT_KEY
        try:
            srv.wait_ready(session)
            yield srv, session
        finally:
            srv.stop()


def test_lifecycle_push_and_pull(server):
    srv, s = server
    with s.post(srv.url + "/workers", json={"name": "node-1", "url": "http://127.0.0.1:9/agent"}) as r:
        assert r.status_code == 201
    with s.post(srv.url + "/llm-tasks", json=new_task()) as r:
        task = r.json()
    with s.post(srv.url + f"/llm-tasks/{task['id']}/lease", json={}) as r:
        assert r.status_code == 201 and set(r.json()) == {"lease", "worker", "lease_token"}
    # The membridge agent's exact calls: heartbeat with no body, complete with tokens_used null.
    with requests.post(srv.url + f"/llm-tasks/{task['id']}/heartbeat", headers={HEADER: CLIENT_KEY}) as r:
        assert r.status_code == 200 and r.json()["task"]["status"] == "running"
    with s.post(srv.url + f"/llm-tasks/{task['id']}/complete",
                json={"status": "success", "output": "done", "metrics": {"duration_ms": 5, "tokens_used": None}}) as r:
        assert r.status_code == 200 and r.json()["task"]["status"] == "completed"

    # Pull mode: a long poll that a new task ends.
    with s.post(srv.url + "/workers", json={"name": "puller"}) as r:
        assert r.status_code == 201
    got: list[requests.Response] = []

    def claim() -> None:
        with requests.post(srv.url + "/workers/puller/claim", json={"wait_seconds": 10}, headers={HEADER: CLIENT_KEY}, timeout=20) as r:
            got.append(r)
            _ = r.content  # read before the connection closes

    t = threading.Thread(target=claim)
    t.start()
    with s.post(srv.url + "/llm-tasks", json=new_task(context_id="ctx-2")) as r:
        pulled = r.json()
    t.join(timeout=15)
    assert got and got[0].status_code == 200 and got[0].json()["task"]["id"] == pulled["id"]

    # Auth from outside: no key and a wrong key of the same length.
    with requests.get(srv.url + "/stats") as r:
        assert r.status_code == 401 and r.json()["error"]
    with requests.get(srv.url + "/stats", headers={HEADER: "y" * len(CLIENT_KEY)}) as r:
        assert r.status_code == 401
    with s.get(srv.url + "/stats", headers={"X-Request-Id": "e2e-1"}) as r:
        assert r.headers["X-Request-Id"] == "e2e-1"

    code, out, err = srv.stop()
    assert code == 0, err
    assert f"http://127.0.0.1:{srv.port}" in out
    assert "e2e-1" in err and CLIENT_KEY not in err and CLIENT_KEY not in out


def test_sigterm_during_50_long_polls(server):
    srv, s = server
    for i in range(50):
        with s.post(srv.url + "/workers", json={"name": f"w{i}"}) as r:
            assert r.status_code == 201
    codes: list[int] = []
    lock = threading.Lock()

    def poll(i: int) -> None:
        try:
            with requests.post(srv.url + f"/workers/w{i}/claim", json={"wait_seconds": 25},
                               headers={HEADER: CLIENT_KEY}, timeout=40) as r:
                _ = r.content
                with lock:
                    codes.append(r.status_code)
        except requests.ConnectionError:
            with lock:
                codes.append(0)

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()

    # Let some polls be answered by new tasks, then stop while the rest wait.
    created = []
    for i in range(5):
        with s.post(srv.url + "/llm-tasks", json=new_task(prompt=f"job {i}")) as r:
            created.append(r.json()["id"])
    wait_for(lambda: len(codes) >= 5, timeout_s=15)
    srv.proc.send_signal(signal.SIGTERM)
    code, _, err = srv.stop()
    for t in threads:
        t.join(timeout=30)
    assert code == 0, err
    assert len(codes) == 50
    assert codes.count(200) == 5 and all(c in (200, 204, 503, 0) for c in codes)

    con = sqlite3.connect(srv.db)
    try:
        created_audit = {r[0] for r in con.execute("SELECT entity_id FROM audit_logs WHERE action = 'task_created'")}
        leased_audit = {r[0] for r in con.execute("SELECT entity_id FROM audit_logs WHERE action = 'task_leased'")}
        leased_rows = {r[0] for r in con.execute("SELECT id FROM llm_tasks WHERE status = 'leased'")}
        workers = con.execute("SELECT count(*) FROM audit_logs WHERE action = 'worker_registered'").fetchone()[0]
    finally:
        con.close()
    assert created_audit == set(created)
    assert leased_audit == leased_rows == set(created)
    assert workers == 50


def test_refuses_public_bind_without_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY")}
    proc = subprocess.run(
        [sys.executable, "-m", "bloom_runtime.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port()),
         "--database-url", f"sqlite:///{tmp_path / 'x.db'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--insecure-no-auth" in proc.stderr


@pytest.mark.parametrize("extra", [[], ["--auto-dispatch"], ["--no-auto-dispatch", "--membridge"]])
def test_refuses_public_bind_with_push_dispatch_but_no_public_url(tmp_path, extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_PUBLIC_URL", "AUTO_DISPATCH", "MEMBRIDGE_SERVER_URL")}
    env["RUNTIME_API_KEY"] = f"agents={CLIENT_KEY}"
    if "--membridge" in extra:
        extra = [e for e in extra if e != "--membridge"]
        env["MEMBRIDGE_SERVER_URL"] = "http://10.0.0.5:8000"
    proc = subprocess.run(
        [sys.executable, "-m", "bloom_runtime.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port()),
         "--database-url", f"sqlite:///{tmp_path / 'x.db'}", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "RUNTIME_PUBLIC_URL must be set" in proc.stderr


def test_errors_stay_json_under_waitress(server):
    """Waitress applies checks the test client does not (e.g. no hop-by-hop headers)."""
    srv, session = server
    big = b'{"context_id": "c", "agent_slug": "a", "prompt": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    with session.post(srv.url + "/llm-tasks", data=big, headers={"Content-Type": "application/json"}) as r:
        assert r.status_code == 413
        assert "error" in r.json()
    with session.post(srv.url + "/llm-tasks", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status_code == 400 and "error" in r.json()
    with session.get(srv.url + "/llm-tasks/..%2Fetc") as r:
        assert r.status_code in (400, 404) and "error" in r.json()
    with session.get(srv.url + "/llm-tasks") as r:
        assert r.status_code == 200 and r.json() == []
    code, _, err = srv.stop()
    assert code == 0
    assert "Traceback" not in err and "Exception while serving" not in err
