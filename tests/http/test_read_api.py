"""The read API the console is built on (any script can use it too): whoami, history,
queue, task search, leases of tasks, recent expiries, audit by action. On SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest

from bloom_runtime.engine.settings import parse_api_keys

from .conftest import ADMIN_KEY, CLIENT_KEY, new_task, snapshot, wait_for

API = "/api/runtime"
H = {"X-Runtime-API-Key": CLIENT_KEY}


@pytest.fixture
def keyed_db(make_client, db_url):
    return make_client(
        database_url=db_url,
        api_keys=parse_api_keys(f"ops={CLIENT_KEY}"),
        admin_keys=parse_api_keys(f"root={ADMIN_KEY}", default_prefix="admin"),
    )


def create(client, **extra) -> dict:
    r = client.simulate_post(f"{API}/llm-tasks", json=new_task(**extra), headers=H)
    assert r.status_code == 201, r.text
    return r.json


def test_whoami_names_the_key_never_shows_it(keyed_db) -> None:
    assert keyed_db.simulate_get(f"{API}/whoami").json == {"name": None, "admin": False, "auth_enabled": True, "authenticated": False}
    r = keyed_db.simulate_get(f"{API}/whoami", headers=H)
    assert r.json == {"name": "ops", "admin": False, "auth_enabled": True, "authenticated": True}
    assert CLIENT_KEY not in r.text
    admin = keyed_db.simulate_get(f"{API}/whoami", headers={"X-Runtime-API-Key": ADMIN_KEY}).json
    assert (admin["name"], admin["admin"]) == ("root", True)
    wrong = keyed_db.simulate_get(f"{API}/whoami", headers={"X-Runtime-API-Key": "not-a-key-at-all"})
    assert wrong.status_code == 401 and "not-a-key" not in wrong.text


def test_whoami_in_open_mode(client) -> None:
    assert client.simulate_get(f"{API}/whoami").json == {"name": "api", "admin": True, "auth_enabled": False, "authenticated": True}


def test_task_search_by_context_and_agent_with_status_and_paging(keyed_db) -> None:
    ids = [create(keyed_db, context_id="ctx-a" if i % 2 else "ctx-b", agent_slug="critic" if i < 3 else "writer")["id"] for i in range(7)]
    r = keyed_db.simulate_get(f"{API}/llm-tasks", params={"context_id": "ctx-a", "limit": "2"}, headers=H)
    assert [t["id"] for t in r.json] == [ids[5], ids[3]]
    link = r.headers["link"]
    assert "context_id=ctx-a" in link and 'rel="next"' in link
    path, query = link[1:link.index(">")].split("?", 1)
    second = keyed_db.simulate_get(path, query_string=query, headers=H)
    assert [t["id"] for t in second.json] == [ids[1]] and "link" not in second.headers
    critic = keyed_db.simulate_get(f"{API}/llm-tasks", params={"agent_slug": "critic"}, headers=H).json
    assert [t["id"] for t in critic] == ids[2::-1]
    keyed_db.simulate_post(f"{API}/llm-tasks/{ids[0]}/cancel", headers=H)
    cancelled = keyed_db.simulate_get(f"{API}/llm-tasks", params={"agent_slug": "critic", "status": "cancelled"}, headers=H).json
    assert [t["id"] for t in cancelled] == [ids[0]]


@pytest.mark.parametrize("params", [
    {"context_id": "a", "agent_slug": "b"},
    {"context_id": "x" * 129},
    {"agent_slug": "tab\there"},
    {"context_id": "a", "status": "sleeping"},
    {"context_id": "a", "cursor": "garbage"},
])
def test_task_search_refuses_bad_input(keyed_db, params) -> None:
    r = keyed_db.simulate_get(f"{API}/llm-tasks", params=params, headers=H)
    assert r.status_code == 400 and r.json["error"]


def test_leases_of_tasks_and_recent_expiries(make_client, db_url) -> None:
    client = make_client(database_url=db_url)
    client.simulate_post(f"{API}/workers", json={"name": "w1", "capabilities": {"max_concurrency": 5}})
    a, b, c = (client.simulate_post(f"{API}/llm-tasks", json=new_task()).json for _ in range(3))
    first = client.simulate_post(f"{API}/llm-tasks/{a['id']}/lease", json={"worker_id": "w1", "ttl_seconds": 1}).json["lease"]
    second = client.simulate_post(f"{API}/llm-tasks/{b['id']}/lease", json={"worker_id": "w1"}).json["lease"]
    # The sweep runs every 0.1 s here: the 1 s lease expires on its own.
    wait_for(lambda: client.simulate_get(f"{API}/llm-tasks/{a['id']}").json["status"] == "queued", timeout_s=15)
    again = client.simulate_post(f"{API}/llm-tasks/{a['id']}/lease", json={"worker_id": "w1"}).json["lease"]

    of_a = client.simulate_get(f"{API}/leases", params={"task_id": a["id"]}).json
    assert [(lease["id"], lease["status"]) for lease in of_a] == [(again["id"], "active"), (first["id"], "expired")]
    both = client.simulate_get(f"{API}/leases", params={"task_id": f"{a['id']},{b['id']}", "status": "active"}).json
    assert {lease["id"] for lease in both} == {again["id"], second["id"]}
    repeated = client.simulate_get(f"{API}/leases", query_string=f"task_id={a['id']}&task_id={c['id']}").json
    assert [lease["id"] for lease in repeated] == [again["id"], first["id"]]
    expired = client.simulate_get(f"{API}/leases/expired").json
    assert [lease["id"] for lease in expired] == [first["id"]]
    too_many = ",".join(f"t-{i}" for i in range(101))
    assert client.simulate_get(f"{API}/leases", params={"task_id": too_many}).status_code == 400
    assert client.simulate_get(f"{API}/leases", params={"task_id": "bad id!"}).status_code == 400


def test_audit_by_action_and_entity(keyed_db) -> None:
    t = create(keyed_db)
    other = create(keyed_db)
    keyed_db.simulate_post(f"{API}/llm-tasks/{t['id']}/cancel", headers=H)
    r = keyed_db.simulate_get(f"{API}/audit", params={"action": "task_cancelled"}, headers=H)
    assert [(e["entity_id"], e["actor"]) for e in r.json] == [(t["id"], "ops")]
    created = keyed_db.simulate_get(f"{API}/audit", params={"action": "task_created", "entity_id": other["id"]}, headers=H).json
    assert [e["entity_id"] for e in created] == [other["id"]]
    assert keyed_db.simulate_get(f"{API}/audit", params={"action": "\x00"}, headers=H).status_code == 400


def test_history_and_queue(keyed_db) -> None:
    first = create(keyed_db)
    create(keyed_db)
    r = keyed_db.simulate_get(f"{API}/history", params={"minutes": "30", "bucket_minutes": "5"}, headers=H)
    assert r.status_code == 200
    body = r.json
    assert (body["minutes"], body["bucket_minutes"], len(body["points"])) == (30, 5, 6)
    assert body["points"][-1]["queued"] == 2 and sum(p["created"] for p in body["points"]) == 2
    assert keyed_db.simulate_get(f"{API}/history", headers=H).json["bucket_minutes"] == 1
    for bad in ({"minutes": "0"}, {"minutes": "99999999"}, {"minutes": "60", "bucket_minutes": "0"}, {"minutes": "x"}):
        assert keyed_db.simulate_get(f"{API}/history", params=bad, headers=H).status_code == 400
    queue = keyed_db.simulate_get(f"{API}/queue", headers=H).json
    assert (queue["queued"], queue["leased"], queue["running"]) == (2, 0, 0)
    assert queue["oldest_queued"]["id"] == first["id"] and queue["oldest_queued"]["age_ms"] >= 0
    assert keyed_db.simulate_get(f"{API}/history").status_code == 401


def test_reads_change_nothing(keyed_db) -> None:
    create(keyed_db)
    before = snapshot(keyed_db.engine)
    for path in ("/whoami", "/history", "/queue", "/leases/expired", "/audit?action=task_created", "/llm-tasks?context_id=ctx-1"):
        assert keyed_db.simulate_get(API + path, headers=H).status_code == 200, path
    assert snapshot(keyed_db.engine) == before


def test_openapi_documents_the_read_api(client) -> None:
    doc = client.simulate_get(f"{API}/openapi.json").json
    for path in ("/whoami", "/history", "/queue", "/leases/expired"):
        assert f"{API}{path}" in doc["paths"], path
    params = {p["name"] for p in doc["paths"][f"{API}/llm-tasks"]["get"]["parameters"]}
    assert {"context_id", "agent_slug", "status", "cursor", "limit"} <= params
    assert "action" in {p["name"] for p in doc["paths"][f"{API}/audit"]["get"]["parameters"]}
    assert doc["paths"][f"{API}/whoami"]["get"]["security"] == []
