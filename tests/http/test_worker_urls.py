"""Who may point a worker at a URL: prompts and the agent key go only where an admin or the sync vouched."""

from __future__ import annotations

import pytest

from ..agent_standin import AgentStandIn
from .conftest import ADMIN_KEY, CLIENT_KEY, new_task, snapshot

API = "/api/runtime"
CLIENT = {"X-Runtime-API-Key": CLIENT_KEY}
ADMIN = {"X-Runtime-API-Key": ADMIN_KEY}


def test_self_registration_keeps_its_url_unverified_and_gets_nothing_sent(keyed):
    with AgentStandIn("node-1") as agent:
        r = keyed.simulate_post(f"{API}/workers", json=agent.registration(), headers=CLIENT)  # the agent's own payload
        assert r.status_code == 201 and r.json["url"] == agent.url and r.json["url_verified"] is False
        assert r.json["status"] == "online" and r.json["capabilities"]["max_concurrency"] == 2
        # Re-registering the same URL (every agent restart) is fine and keeps it as it was.
        r = keyed.simulate_post(f"{API}/workers", json=agent.registration(), headers=CLIENT)
        assert r.status_code == 200 and r.json["url_verified"] is False
        task = keyed.simulate_post(f"{API}/llm-tasks", json=new_task(), headers=CLIENT).json
        keyed.simulate_post(f"{API}/llm-tasks/{task['id']}/dispatch", json={"worker_id": "node-1"}, headers=CLIENT)
        assert agent.requests == []  # neither the prompt nor the agent key went there
        # An admin vouches for it by setting it.
        r = keyed.simulate_post(f"{API}/workers", json={"name": "node-1", "url": agent.url}, headers=ADMIN)
        assert r.status_code == 200 and r.json["url_verified"] is True
        assert keyed.simulate_get(f"{API}/workers/node-1", headers=CLIENT).json["url_verified"] is True
        assert [w["url_verified"] for w in keyed.simulate_get(f"{API}/workers", headers=CLIENT).json] == [True]
        detail = next(e.detail for e in keyed.engine.audit.list(limit=20).items if e.action == "worker_updated")
        assert "vouched for" in detail and e_actor(keyed, "worker_updated") == "root"


def e_actor(keyed, action: str) -> str:
    return next(e.actor for e in keyed.engine.audit.list(limit=20).items if e.action == action)


@pytest.mark.parametrize("source", ["client", "admin", "membridge"])
def test_a_client_key_cannot_change_a_worker_s_url(keyed, source):
    if source == "membridge":
        from bloom_runtime.engine.models import WorkerUpsert

        keyed.engine.workers.upsert_many([WorkerUpsert(id="w1", url="http://10.0.0.5:8001", source="membridge")])
    else:
        keyed.simulate_post(f"{API}/workers", json={"name": "w1", "url": "http://10.0.0.5:8001"},
                            headers=CLIENT if source == "client" else ADMIN)
    before = snapshot(keyed.engine)
    for url in ("http://10.9.9.9:8001", "http://10.0.0.5:8002", "http://attacker.example"):
        r = keyed.simulate_post(f"{API}/workers", json={"name": "w1", "url": url}, headers=CLIENT)
        assert r.status_code == 403 and "admin" in r.json["error"]
    assert snapshot(keyed.engine) == before
    assert keyed.simulate_post(f"{API}/workers", json={"name": "w1", "url": "http://10.9.9.9:8001"}, headers=ADMIN).json["url_verified"]


@pytest.mark.parametrize("url", ["http://[::ffff:169.254.169.254]/", "ftp://10.0.0.1/", "http://u:p@10.0.0.1/", "http://0x7f.1/"])
def test_registration_refuses_unsafe_urls(keyed, url):
    before = snapshot(keyed.engine)
    r = keyed.simulate_post(f"{API}/workers", json={"name": "w1", "url": url}, headers=ADMIN)
    assert r.status_code == 400 and r.json["error"]
    assert snapshot(keyed.engine) == before


def test_the_allow_list_vouches_for_the_hosts_it_names(make_client):
    from bloom_runtime.engine.settings import parse_api_keys

    c = make_client(api_keys=parse_api_keys(f"ops={CLIENT_KEY}"), admin_keys=parse_api_keys(f"root={ADMIN_KEY}", default_prefix="a"),
                    membridge_allowed_hosts="10.0.0.0/24")
    r = c.simulate_post(f"{API}/workers", json={"name": "w1", "url": "http://10.0.0.7:8001"}, headers=CLIENT)
    assert r.status_code == 201 and r.json["url_verified"] is True
    assert c.simulate_post(f"{API}/workers", json={"name": "w2", "url": "http://10.0.1.7:8001"}, headers=CLIENT).status_code == 400
