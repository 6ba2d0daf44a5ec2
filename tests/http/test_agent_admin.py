"""agent-health, agent-update, agent-restart, agent-uninstall against a real agent stand-in, on both stores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bloom_runtime.engine.membridge_service import scalar_fields
from bloom_runtime.engine.settings import Secret, parse_api_keys

from ..agent_standin import AgentStandIn
from .conftest import ADMIN_KEY, CLIENT_KEY

API = "/api/runtime"
AGENT_KEY = "sk-agent-fleet-0099"
CLIENT = {"X-Runtime-API-Key": CLIENT_KEY}
ADMIN = {"X-Runtime-API-Key": ADMIN_KEY}
TUNING = {"membridge_agent_timeout_s": 2.0, "membridge_agent_retries": 2, "membridge_backoff_base_s": 0.01,
          "membridge_agent_breaker_fail_max": 5, "membridge_agent_breaker_reset_s": 60.0}


@pytest.fixture
def agent() -> Iterator[AgentStandIn]:
    with AgentStandIn("node-a", agent_key=AGENT_KEY) as server:
        yield server


@pytest.fixture
def fleet(make_client, db_url, agent):
    """A runtime with auth on (a client key by default) and the agent key set, and worker
    ``node-a`` at the agent's URL (set by an admin: verified)."""

    def make(**over: Any):
        values = {
            "api_keys": parse_api_keys(f"ops={CLIENT_KEY}"),
            "admin_keys": parse_api_keys(f"root={ADMIN_KEY}", default_prefix="admin"),
            "membridge_agent_key": Secret(AGENT_KEY), "extra": dict(TUNING),
            # The runtime's own probes and pushes off: the agent sees only the calls a test makes.
            "agent_probe_interval_s": 0.0, "auto_dispatch": False,
        }
        c = make_client(database_url=db_url, headers=CLIENT, **{**values, **over})
        r = c.simulate_post(f"{API}/workers", json={"name": "node-a", "url": agent.url, "status": "unknown"}, headers=ADMIN)
        assert r.status_code == 201
        return c

    return make


def audit(c, action_prefix: str = "") -> list[tuple[str, str, str | None]]:
    return [(e.action, e.actor, e.detail) for e in reversed(c.engine.audit.list(limit=100).items)
            if e.action.startswith(action_prefix)]


def test_agent_health_answers_reachable_and_refreshes_the_worker(fleet, agent):
    c = fleet()
    r = c.simulate_get(f"{API}/workers/node-a/agent-health", headers=CLIENT)
    assert r.status_code == 200
    body = r.json
    assert body["reachable"] is True and body["version"] == "0.4.0" and body["hostname"] == "node-a"
    assert body["disk"] == {"total_gb": 29.1, "free_gb": 17.4, "used_pct": 40.2}
    assert body["capabilities"]["self_update"] is True and body["git_commit"] is None
    assert "X-MEMBRIDGE-AGENT" not in agent.requests[-1].headers  # /health is open: the key stays home

    worker = c.simulate_get(f"{API}/workers/node-a").json
    assert (worker["status"], worker["agent_version"], worker["os_info"]) == (
        "online", "0.4.0", "node-a / Debian GNU/Linux 12 (bookworm)")
    assert audit(c, "worker_refreshed") == [(
        "worker_refreshed", "ops",
        "status unknown -> online, agent_version unknown -> 0.4.0, os_info  -> node-a / Debian GNU/Linux 12 (bookworm)"
        " (agent health)")]
    # Nothing changed: nothing audited, but the contact counts as a heartbeat.
    before = worker["last_heartbeat"]
    assert c.simulate_get(f"{API}/workers/node-a/agent-health", headers=CLIENT).json["reachable"] is True
    assert len(audit(c, "worker_refreshed")) == 1
    assert c.simulate_get(f"{API}/workers/node-a").json["last_heartbeat"] >= before


def test_agent_health_unreachable_or_failing_is_200_reachable_false(fleet, agent):
    c = fleet()
    agent.fail("500", "GET /health", times=3)  # every attempt of one call
    r = c.simulate_get(f"{API}/workers/node-a/agent-health", headers=CLIENT)
    assert r.status_code == 200 and r.json["reachable"] is False and "answered 500" in r.json["error"]
    assert c.simulate_get(f"{API}/workers/node-a").json["status"] == "error"

    agent.refuse()
    r = c.simulate_get(f"{API}/workers/node-a/agent-health", headers=CLIENT)
    assert r.status_code == 200 and r.json == {"reachable": False, "error": r.json["error"]}
    assert "unreachable" in r.json["error"]
    assert c.simulate_get(f"{API}/workers/node-a").json["status"] == "offline"
    assert [d for _, _, d in audit(c, "worker_refreshed")] == [
        "status unknown -> error (agent health)", "status error -> offline (agent health)"]
    # The breaker is open now: fast, and no status is guessed from it.
    r = c.simulate_get(f"{API}/workers/node-a/agent-health", headers=CLIENT)
    assert r.status_code == 200 and r.json["reachable"] is False and "circuit open" in r.json["error"]
    assert r.json["retry_after_s"] > 0 and len(audit(c, "worker_refreshed")) == 2


def test_agent_routes_need_a_worker_with_a_url(fleet, agent):
    c = fleet()
    c.simulate_post(f"{API}/workers", json={"name": "puller"}, headers=ADMIN)
    for method, path in (("GET", "agent-health"), ("POST", "agent-update"), ("POST", "agent-restart"),
                         ("POST", "agent-uninstall")):
        r = c.simulate_request(method, f"{API}/workers/puller/{path}", headers=ADMIN)
        assert r.status_code == 400 and r.json["error"] == "worker has no url", path
        r = c.simulate_request(method, f"{API}/workers/nobody/{path}", headers=ADMIN)
        assert r.status_code == 404 and r.json["error"] == "worker not found", path
    assert agent.count() == 0


def test_agent_update_forwards_with_the_agent_key_and_stores_the_new_version(fleet, agent):
    c = fleet()
    assert c.simulate_post(f"{API}/workers/node-a/agent-update", json={}, headers=CLIENT).status_code == 403
    bad = c.simulate_post(f"{API}/workers/node-a/agent-update", json={"branch": "--upload-pack=touch /tmp/x"}, headers=ADMIN)
    assert bad.status_code == 400
    assert agent.count() == 0

    r = c.simulate_post(f"{API}/workers/node-a/agent-update", json={"branch": "main"}, headers=ADMIN)
    assert r.status_code == 200
    assert r.json["status"] == "updated" and r.json["ok"] is True and r.json["version"] == "0.4.1"
    assert r.json["steps"] == [{"step": "pull", "ok": True}, {"step": "restart", "ok": True}]  # the agent's answer
    sent = agent.requests[-1]
    assert sent.route == "POST /self-update" and sent.headers["X-MEMBRIDGE-AGENT"] == AGENT_KEY
    assert sent.json == {"branch": "main"}
    assert c.simulate_get(f"{API}/workers/node-a").json["agent_version"] == "0.4.1"
    assert audit(c, "agent_") == [("agent_updated", "root", "status=200 ok=True")]
    assert AGENT_KEY not in str(audit(c)) and AGENT_KEY not in r.text


def test_agent_restart_and_uninstall(fleet, agent):
    c = fleet()
    r = c.simulate_post(f"{API}/workers/node-a/agent-restart", json={}, headers=ADMIN)
    assert r.status_code == 200 and r.json["status"] == "restarted" and r.json["service"] == "membridge-agent"
    assert agent.requests[-1].route == "POST /restart"
    r = c.simulate_post(f"{API}/workers/node-a/agent-uninstall", headers=ADMIN)
    assert r.status_code == 200 and r.json["status"] == "uninstalled" and r.json["node_id"] == "node-a"
    worker = c.simulate_get(f"{API}/workers/node-a").json
    assert (worker["status"], worker["agent_version"]) == ("offline", "uninstalled")
    assert [a for a, _, _ in audit(c, "agent_")] == ["agent_restarted", "agent_uninstalled"]
    assert audit(c, "worker_refreshed")[-1][2] == "status unknown -> offline, agent_version unknown -> uninstalled (agent uninstall)"


def test_an_agent_that_refuses_is_502_with_its_reason_and_audited(fleet, agent):
    c = fleet()
    agent.allow_process_control = False
    r = c.simulate_post(f"{API}/workers/node-a/agent-restart", headers=ADMIN)
    assert r.status_code == 502
    assert r.json["error"] == ("agent answered 403 for POST /restart: Process control is disabled."
                               " Set MEMBRIDGE_ALLOW_PROCESS_CONTROL=1 to enable.")
    assert r.json["upstream_status"] == 403
    agent.allow_process_control = True
    agent.agent_key = "another-agent-key"
    r = c.simulate_post(f"{API}/workers/node-a/agent-uninstall", headers=ADMIN)
    assert r.status_code == 502 and "answered 401" in r.json["error"]
    assert c.simulate_get(f"{API}/workers/node-a").json["status"] == "unknown"  # nothing stored
    assert [a for a, _, _ in audit(c, "agent_")] == ["agent_restarted_failed", "agent_uninstalled_failed"]


def test_the_changing_posts_are_never_repeated_once_they_may_have_reached_the_agent(fleet, agent):
    c = fleet(extra={**TUNING, "membridge_agent_breaker_fail_max": 4})  # two retries configured: GETs use them
    agent.fail("500", "POST /self-update", times=1)
    r = c.simulate_post(f"{API}/workers/node-a/agent-update", headers=ADMIN)
    assert r.status_code == 502 and "answered 500" in r.json["error"]
    assert agent.count("POST /self-update") == 1
    assert audit(c, "agent_")[-1][0] == "agent_updated_failed"

    agent.refuse()
    attempts = c.engine.membridge.agents.state()["attempts"]
    r = c.simulate_post(f"{API}/workers/node-a/agent-restart", headers=ADMIN)
    assert r.status_code == 502 and "unreachable" in r.json["error"]
    # A refused connection never reached it, so it was tried again (3 attempts), and opened the
    # breaker: the next call fails fast with Retry-After.
    assert c.engine.membridge.agents.state()["attempts"] - attempts == 3
    r = c.simulate_post(f"{API}/workers/node-a/agent-restart", headers=ADMIN)
    assert r.status_code == 503 and "circuit open" in r.json["error"] and int(r.headers["retry-after"]) >= 1


def test_an_unverified_url_gets_no_agent_key_so_the_changing_posts_are_refused(fleet, agent):
    c = fleet()
    # An agent registering itself with a client key: its URL is kept, but nobody vouched for it.
    r = c.simulate_post(f"{API}/workers", json={"name": "node-b", "url": agent.url}, headers=CLIENT)
    assert r.status_code == 201 and r.json["url_verified"] is False
    for path in ("agent-update", "agent-restart", "agent-uninstall"):
        r = c.simulate_post(f"{API}/workers/node-b/{path}", json={}, headers=ADMIN)
        assert r.status_code == 409 and "no verified URL" in r.json["error"], path
    assert agent.count() == 0 and audit(c, "agent_") == []
    # /health is the agent's open route: asked without the key, and it refreshes the worker.
    r = c.simulate_get(f"{API}/workers/node-b/agent-health", headers=CLIENT)
    assert r.status_code == 200 and r.json["reachable"] is True
    assert agent.count() == 1 and "X-MEMBRIDGE-AGENT" not in agent.requests[-1].headers
    # Once an admin sets the same URL, it is verified and the key goes with the POSTs.
    assert c.simulate_post(f"{API}/workers", json={"name": "node-b", "url": agent.url}, headers=ADMIN).json["url_verified"]
    r = c.simulate_post(f"{API}/workers/node-b/agent-restart", json={}, headers=ADMIN)
    assert r.status_code == 200 and agent.requests[-1].headers["X-MEMBRIDGE-AGENT"] == AGENT_KEY


def test_agent_health_shows_scalar_fields_and_objects_of_them_never_lists():
    answer = {"version": "0.4.0", "steps": ["a"], "disk": {"free_gb": 1.5, "mounts": ["/"], "deeper": {"x": 1}}}
    assert scalar_fields(answer, depth=1) == {"version": "0.4.0", "disk": {"free_gb": 1.5}}
