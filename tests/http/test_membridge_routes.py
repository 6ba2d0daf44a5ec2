"""Membridge HTTP routes: config, test-connection, pass-through, dispatch and the lease-scoped callbacks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import falcon.testing
import pytest

from bloom_runtime.engine.clock import ManualClock
from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.settings import Secret, Settings, parse_api_keys
from bloom_runtime.http import create_app

from ..agent_standin import AgentStandIn
from ..membridge_fixtures import agent_server, dead_agent_server, membridge_server  # noqa: F401
from ..membridge_server import MembridgeServer, canonical_id, detail, missing_field
from .conftest import ADMIN_KEY, CLIENT_KEY, new_task

API = "/api/runtime"
MB = "/api/membridge"
MB_ADMIN_KEY = "sk-membridge-ADMIN-SECRET-5c1f"
AGENT_KEY = "sk-agent-SECRET-77aa1"
TUNING = {"membridge_timeout_s": 1.0, "membridge_retries": 1, "membridge_backoff_base_s": 0.01,
          "membridge_agent_timeout_s": 1.0, "membridge_agent_retries": 0}
CLIENT = {"X-Runtime-API-Key": CLIENT_KEY}
ADMIN = {"X-Runtime-API-Key": ADMIN_KEY}


@pytest.fixture
def build(tmp_path, membridge_server: MembridgeServer) -> Iterator[Callable[..., falcon.testing.TestClient]]:  # noqa: F811
    engines: list[Engine] = []

    def make(clock: Any = None, **over: Any) -> falcon.testing.TestClient:
        values: dict[str, Any] = {
            "database_url": "sqlite:///" + str(tmp_path / f"bloom{len(engines)}.db"),
            "api_keys": parse_api_keys(f"ops={CLIENT_KEY}"),
            "admin_keys": parse_api_keys(f"root={ADMIN_KEY}", default_prefix="admin"),
            "membridge_server_url": membridge_server.url,
            "membridge_admin_key": Secret(MB_ADMIN_KEY),
            "membridge_agent_key": Secret(AGENT_KEY),
            "membridge_sync_interval_s": 3600.0,
            "lease_sweep_interval_s": 3600.0,
            "public_url": "http://runtime.example:5000",
            "extra": dict(TUNING),
        }
        values.update(over)
        settings = Settings(**values)
        engine = Engine.start(settings, clock=clock) if clock is not None else Engine.start(settings)
        engines.append(engine)
        client = falcon.testing.TestClient(create_app(engine, settings), headers=CLIENT)
        client.engine = engine  # type: ignore[attr-defined]
        return client

    yield make
    for engine in engines:
        engine.stop()


def audit_text(engine: Engine) -> str:
    return " ".join(f"{e.action} {e.detail}" for e in engine.audit.list(limit=1000).items)


# --- config and test-connection ------------------------------------------------------


def test_config_masked_validated_and_applied_without_restart(build, membridge_server, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    with MembridgeServer() as other:
        _config_is_applied(build, membridge_server, other, caplog)


def _config_is_applied(build, membridge_server, agent_server, caplog):  # noqa: F811
    c = build(membridge_allowed_hosts="127.0.0.1")
    r = c.simulate_get(f"{API}/config", headers=ADMIN)
    assert r.json == {"membridge_server_url": membridge_server.url, "admin_key": "****" + MB_ADMIN_KEY[-4:],
                      "admin_key_masked": MB_ADMIN_KEY[:4] + "****" + MB_ADMIN_KEY[-4:],
                      "configured": True, "connected": False, "last_test": None}
    for bad in ("ftp://127.0.0.1/", "http://user:pw@127.0.0.1:1", "http://", "not a url", "http://10.1.2.3:8000"):
        r = c.simulate_post(f"{API}/config", json={"membridge_server_url": bad}, headers=ADMIN)
        assert r.status_code == 400 and r.json["error"], bad
    assert "MEMBRIDGE_ALLOWED_HOSTS" in c.simulate_post(f"{API}/config", json={"membridge_server_url": "http://10.1.2.3"}, headers=ADMIN).json["error"]
    assert c.simulate_post(f"{API}/config", json={"membridge_server_url": agent_server.url}).status_code == 403

    new_key = "sk-new-ADMIN-SECRET-0042"
    r = c.simulate_post(f"{API}/config", json={"membridge_server_url": agent_server.url, "admin_key": new_key}, headers=ADMIN)
    assert r.status_code == 200 and r.json == {"membridge_server_url": agent_server.url, "admin_key": "****0042",
                                               "admin_key_masked": "sk-n****0042", "configured": True,
                                               "connected": False, "last_test": None}
    # The next call goes to the new server with the new key.
    assert c.simulate_get(f"{MB}/projects").status_code == 200
    assert agent_server.requests[-1].headers["X-MEMBRIDGE-ADMIN"] == new_key
    assert membridge_server.count() == 0
    assert c.simulate_get(f"{API}/config", headers=ADMIN).json["admin_key"] == "****0042"

    texts = [c.simulate_get(p).text for p in (f"{API}/config", f"{API}/health", f"{API}/audit", f"{API}/metrics")]
    texts.append(audit_text(c.engine))
    texts.extend(rec.getMessage() for rec in caplog.records)
    for secret in (new_key, MB_ADMIN_KEY):
        assert all(secret not in t for t in texts)
    assert "config_updated changed=membridge_admin_key,membridge_server_url" in audit_text(c.engine)


def test_test_connection_records_result(build, membridge_server):  # noqa: F811
    c = build()
    r = c.simulate_post(f"{API}/test-connection")
    assert r.status_code == 200
    assert r.json["connected"] is True and r.json["status"] == 200
    assert r.json["health"] == {"status": "ok", "service": "membridge-control-plane", "version": "0.3.0",
                                "projects": 0, "agents": 0}
    assert c.simulate_get(f"{API}/health").json["membridge"]["last_test"]["connected"] is True
    membridge_server.fail("malformed", "GET /health", times=1)
    r = c.simulate_post(f"{API}/test-connection")
    assert r.status_code == 200 and r.json["connected"] is False and "malformed" in r.json["error"]
    assert "this is not json" not in r.text and "health" not in r.json
    assert c.simulate_get(f"{API}/health").json["membridge"]["last_test"]["connected"] is False


def test_not_configured_is_503(build):
    c = build(membridge_server_url=None, membridge_agent_key=None)
    for method, path in (("GET", f"{MB}/health"), ("GET", f"{MB}/projects/p1/nodes")):
        r = c.simulate_request(method, path)
        assert r.status_code == 503 and r.json["error"] == "membridge not configured" and r.headers["retry-after"] == "60"
    # The first version's test button reads its answer, not the status: 200, not connected.
    r = c.simulate_post(f"{API}/test-connection")
    assert r.status_code == 200 and r.json == {"connected": False, "configured": False, "error": "membridge not configured"}
    assert c.simulate_get(f"{API}/config").json["last_test"] is None
    assert c.simulate_get(f"{API}/health").json["membridge"] == {"configured": False}


# --- pass-through --------------------------------------------------------------------------


def test_proxy_routes_pass_answers_through(build, membridge_server):  # noqa: F811
    c = build()
    assert c.simulate_get(f"{MB}/health").json["service"] == "membridge-control-plane"
    cid = membridge_server.add_project("garden")
    with AgentStandIn("node-a") as agent:
        assert agent.heartbeat_to(membridge_server.url) == 200
    assert [p["canonical_id"] for p in c.simulate_get(f"{MB}/projects").json] == [cid]
    node_cid = canonical_id("node-a")  # a node without projects heartbeats under its own id
    assert [n["node_id"] for n in c.simulate_get(f"{MB}/projects/{node_cid}/nodes").json] == ["node-a"]
    assert c.simulate_get(f"{MB}/projects/{node_cid}/leadership").json["node_count"] == 1
    membridge_server.fail("404", "GET /projects", times=1)
    r = c.simulate_get(f"{MB}/projects")
    assert r.status_code == 404 and r.json == {"error": "injected not found", "upstream_status": 404}  # FastAPI's detail
    membridge_server.fail("500", "GET /projects")
    r = c.simulate_get(f"{MB}/projects")
    assert r.status_code == 502 and "answered 500" in r.json["error"] and r.headers["retry-after"]


def test_leadership_select_sends_primary_node_id_and_audits_it(build, membridge_server):  # noqa: F811
    c = build()
    path = f"{MB}/projects/proj-1/leadership/select"
    assert c.simulate_post(path, json={"primary_node_id": "node-b"}).status_code == 403
    r = c.simulate_post(path, json={"primary_node_id": "node-b", "lease_seconds": 600, "extra": 1}, headers=ADMIN)
    assert r.status_code == 200 and r.json["primary_node_id"] == "node-b" and r.json["lease_seconds"] == 600
    assert membridge_server.requests[-1].json == {"primary_node_id": "node-b", "lease_seconds": 600}
    entries = [(e.action, e.entity_id, e.actor, e.detail) for e in c.engine.audit.list(limit=10).items]
    assert ("leadership_selected", "proj-1", "root", "primary=node-b lease_seconds=600 status=200") in entries
    # A refusal upstream keeps its reason (FastAPI's detail) and is audited.
    membridge_server.route = lambda *_: detail(409, "node-b is draining")  # type: ignore[method-assign]
    r = c.simulate_post(path, json={"primary_node_id": "node-b"}, headers=ADMIN)
    assert r.status_code == 409 and r.json == {"error": "node-b is draining", "upstream_status": 409}
    membridge_server.route = lambda *_: missing_field("primary_node_id")  # type: ignore[method-assign]
    r = c.simulate_post(path, json={"primary_node_id": "node-b"}, headers=ADMIN)
    assert r.status_code == 422 and r.json["error"] == "primary_node_id: Field required"
    assert ("leadership_select_refused", "proj-1", "root", "primary=node-b status=409") in [
        (e.action, e.entity_id, e.actor, e.detail) for e in c.engine.audit.list(limit=10).items]


@pytest.mark.parametrize("body", [
    {}, {"node": "node-b"}, {"primary_node_id": None}, {"primary_node_id": 5}, {"primary_node_id": ["a"]},
    {"primary_node_id": ""}, {"primary_node_id": "a\u0000b"}, {"primary_node_id": "x" * 129},
    {"primary_node_id": "a\nb"}, {"primary_node_id": "a", "lease_seconds": "60"}, {"primary_node_id": "a", "lease_seconds": 0},
    {"primary_node_id": "a", "lease_seconds": True}, [], "node-b",
])
def test_leadership_select_bad_body_is_400_and_changes_nothing(build, membridge_server, body):  # noqa: F811
    c = build()
    before = audit_text(c.engine)
    r = c.simulate_post(f"{MB}/projects/proj-1/leadership/select", json=body, headers=ADMIN)
    assert r.status_code == 400 and r.json["error"], r.text
    assert membridge_server.count() == 0 and audit_text(c.engine) == before


@pytest.mark.parametrize("path", [
    f"{MB}/projects/../leadership",
    f"{MB}/projects/%2E%2E/leadership",
    f"{MB}/projects/@evil.example/leadership",
    f"{MB}/projects/x@evil.example:80/nodes",
    f"{MB}/projects/a%2Fb/nodes",
    f"{MB}/projects/a%5Cb/nodes",
    f"{MB}/projects/{'x' * 129}/nodes",
])
def test_path_parameter_injection_refused(build, membridge_server, path):  # noqa: F811
    c = build()
    r = c.simulate_get(path)
    # %2F is decoded by the WSGI server before routing, so no route matches (404); the rest are 400.
    assert r.status_code == (404 if "%2F" in path else 400), r.text
    r = c.simulate_post(path.replace("/nodes", "/leadership").replace("/leadership", "/leadership/select"),
                        json={"primary_node_id": "node-a"}, headers=ADMIN)
    assert r.status_code in (400, 404)
    assert membridge_server.count() == 0


# --- lease-fenced callbacks ---------------------------------------------------------------


@pytest.mark.parametrize("with_token", [True, False])
def test_late_callback_after_lease_expired_is_409(build, with_token):
    clock = ManualClock()
    c = build(clock=clock)
    c.simulate_post(f"{API}/workers", json={"name": "w1"}, headers=ADMIN)
    task = c.simulate_post(f"{API}/llm-tasks", json=new_task()).json
    granted = c.simulate_post(f"{API}/llm-tasks/{task['id']}/lease", json={"ttl_seconds": 5}).json
    lease_id = granted["lease"]["id"]
    # The callback URL a dispatched agent gets (the token is the credential), and the older
    # lease-fenced one that still needs the API key.
    base = f"/api/leases/{lease_id}/{granted['lease_token']}" if with_token else f"/api/leases/{lease_id}"
    prefix = f"{base}{API}/llm-tasks/{task['id']}"
    assert c.simulate_post(f"{prefix}/heartbeat").status_code == 200  # empty body, like the agent
    # Another lease id in the path, or in the body, is refused while the lease is active.
    assert c.simulate_post(f"/api/leases/other-lease{API}/llm-tasks/{task['id']}/heartbeat").status_code == 409
    assert c.simulate_post(f"{prefix}/heartbeat", json={"lease_id": "other"}).status_code == 409
    if not with_token:
        assert c.simulate_post(f"{prefix}/heartbeat", headers={"X-Runtime-API-Key": "wrong-key-123"}).status_code == 401
    clock.advance(6_000)
    assert c.engine.leases.sweep_now() == 1
    assert c.engine.tasks.get(task["id"]).status == "queued"
    r = c.simulate_post(f"{prefix}/heartbeat")
    assert r.status_code == 409
    r = c.simulate_post(f"{prefix}/complete", json={"status": "success", "output": "late", "metrics": {"tokens_used": None}})
    assert r.status_code == 409
    assert c.engine.tasks.get(task["id"]).status == "queued"
