"""Task lifecycle over HTTP on both stores: push, pull, retries, idempotency, pagination."""

from __future__ import annotations

import re

import pytest

from .conftest import new_task

API = "/api/runtime"


def test_push_lifecycle_with_agent_payloads(make_client, db_url):
    c = make_client(database_url=db_url, auto_dispatch=False)  # the test leases it itself
    r = c.simulate_post(f"{API}/workers", json={"name": "node-a", "url": "http://node-a:8001", "capabilities": {"max_concurrency": 2}})
    assert r.status_code == 201 and r.json["id"] == "node-a"
    r = c.simulate_post(f"{API}/workers", json={"name": "node-a", "agent_version": "1.2"})
    assert r.status_code == 200 and r.json["agent_version"] == "1.2" and r.json["url"] == "http://node-a:8001"

    task = c.simulate_post(f"{API}/llm-tasks", json=new_task()).json
    assert task["status"] == "queued"
    r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/lease", json={"ttl_seconds": 60})
    assert r.status_code == 201
    assert set(r.json) == {"lease", "worker", "lease_token"}
    lease = r.json["lease"]
    assert lease["ttl_seconds"] == 60 and lease["worker_id"] == "node-a" and r.json["worker"]["id"] == "node-a"

    # The membridge agent heartbeats with no body at all.
    r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/heartbeat")
    assert r.status_code == 200, r.text
    assert set(r.json) == {"task", "lease", "expires_at"} and r.json["task"]["status"] == "running"
    assert r.json["expires_at"] == r.json["lease"]["expires_at"]  # the first version's top-level field

    r = c.simulate_post(
        f"{API}/llm-tasks/{task['id']}/complete",
        json={"status": "success", "output": "hi", "error_message": None, "metrics": {"duration_ms": 12, "tokens_used": None}},
    )
    assert r.status_code == 200, r.text
    assert set(r.json) == {"task", "result", "artifact"}
    assert r.json["task"]["status"] == "completed" and r.json["result"]["metrics"]["tokens_used"] is None
    assert r.json["artifact"]["content"] == "hi"

    assert c.simulate_get(f"{API}/llm-tasks/{task['id']}/result").json["output"] == "hi"
    assert [a["task_id"] for a in c.simulate_get(f"{API}/artifacts", params={"task_id": task["id"]}).json] == [task["id"]]
    assert [r["task_id"] for r in c.simulate_get(f"{API}/results").json] == [task["id"]]
    assert [t["id"] for t in c.simulate_get(f"{API}/runs").json] == [task["id"]]
    assert c.simulate_get(f"{API}/leases", params={"status": "released"}).json[0]["id"] == lease["id"]
    stats = c.simulate_get(f"{API}/stats").json
    assert stats["tasks"]["completed"] == 1 and stats["leases"]["released"] == 1
    actions = [e["action"] for e in c.simulate_get(f"{API}/audit").json]
    assert "task_created" in actions and "task_completed" in actions


def test_pull_mode_claim(make_client, db_url):
    c = make_client(database_url=db_url)
    assert c.simulate_post(f"{API}/workers", json={"name": "puller"}).status_code == 201
    r = c.simulate_post(f"{API}/workers/puller/claim", json={"wait_seconds": 0})
    assert r.status_code == 204 and r.content == b""
    task = c.simulate_post(f"{API}/llm-tasks", json=new_task()).json
    r = c.simulate_post(f"{API}/workers/puller/claim", json={"wait_seconds": 1, "ttl_seconds": 30})
    assert r.status_code == 200
    assert set(r.json) == {"task", "lease", "lease_token"} and r.json["task"]["id"] == task["id"] and r.json["lease"]["ttl_seconds"] == 30
    lease_id = r.json["lease"]["id"]
    # A stale worker id changes nothing.
    r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/heartbeat", json={"worker_id": "someone-else"})
    assert r.status_code == 409 and "error" in r.json
    r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/heartbeat", json={"lease_id": lease_id, "worker_id": "puller"})
    assert r.status_code == 200
    r = c.simulate_post(
        f"{API}/llm-tasks/{task['id']}/complete",
        json={"status": "error", "error_message": "boom", "metrics": {}, "lease_id": lease_id, "retryable": False},
    )
    assert r.status_code == 200 and r.json["task"]["status"] == "failed"
    r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/requeue")
    assert r.status_code == 200 and r.json["status"] == "queued"
    r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/cancel")
    assert r.status_code == 200 and r.json["status"] == "cancelled"
    assert c.simulate_post(f"{API}/llm-tasks/{task['id']}/cancel").status_code == 409
    audit = c.simulate_get(f"{API}/audit", params={"entity_id": task["id"]}).json
    assert any(e["actor"] == "puller" for e in audit)


def test_claim_unknown_worker_is_404(client):
    r = client.simulate_post(f"{API}/workers/ghost/claim")
    assert r.status_code == 404 and "error" in r.json


def test_lease_conflicts_and_capacity(client):
    task = client.simulate_post(f"{API}/llm-tasks", json=new_task()).json
    r = client.simulate_post(f"{API}/llm-tasks/{task['id']}/lease")
    assert r.status_code == 503 and "error" in r.json and r.headers.get("retry-after")
    client.simulate_post(f"{API}/workers", json={"name": "w1"})
    assert client.simulate_post(f"{API}/llm-tasks/{task['id']}/lease", json={"worker_id": "w1"}).status_code == 201
    r = client.simulate_post(f"{API}/llm-tasks/{task['id']}/lease", json={"worker_id": "w1"})
    assert r.status_code == 409 and "error" in r.json


def test_idempotency_key(make_client, db_url):
    c = make_client(database_url=db_url)
    headers = {"Idempotency-Key": "order-42"}
    first = c.simulate_post(f"{API}/llm-tasks", json=new_task(), headers=headers)
    again = c.simulate_post(f"{API}/llm-tasks", json=new_task(), headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json == first.json
    assert c.simulate_get(f"{API}/stats").json["tasks"]["queued"] == 1
    r = c.simulate_post(f"{API}/llm-tasks", json=new_task(idempotency_key="other"), headers=headers)
    assert r.status_code == 400


def test_strict_fencing_requires_the_lease_token(make_client):
    c = make_client(lease_fencing="strict")
    c.simulate_post(f"{API}/workers", json={"name": "w1"})
    task = c.simulate_post(f"{API}/llm-tasks", json=new_task()).json
    granted = c.simulate_post(f"{API}/llm-tasks/{task['id']}/lease").json
    lease, token = granted["lease"], granted["lease_token"]
    assert lease["id"] not in token and len(token) == 43
    # A lease id read from GET /leases is not enough.
    listed = c.simulate_get(f"{API}/leases").json[0]
    assert listed["id"] == lease["id"] and token not in c.simulate_get(f"{API}/leases").text
    for body in (None, {"lease_id": listed["id"]}, {"lease_id": lease["id"], "worker_id": "w1"}):
        r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/heartbeat", json=body)
        assert r.status_code == 400 and "lease_token" in r.json["error"]
    r = c.simulate_post(f"{API}/llm-tasks/{task['id']}/heartbeat", json={"lease_id": lease["id"], "lease_token": "f" * 43})
    assert r.status_code == 401
    assert c.simulate_post(f"{API}/llm-tasks/{task['id']}/heartbeat", json={"lease_token": token}).status_code == 200
    done = c.simulate_post(f"{API}/llm-tasks/{task['id']}/complete",
                           json={"status": "success", "output": "hi", "lease_id": lease["id"], "lease_token": token})
    assert done.status_code == 200 and done.json["task"]["status"] == "completed"
    assert token not in " ".join(f"{e['action']} {e['detail']}" for e in c.simulate_get(f"{API}/audit").json)


@pytest.mark.parametrize("path", ["llm-tasks", "audit"])
def test_pagination_link_walk(make_client, db_url, path):
    c = make_client(database_url=db_url)
    created = {c.simulate_post(f"{API}/llm-tasks", json=new_task(prompt=f"p{i}")).json["id"] for i in range(7)}
    seen: list[dict] = []
    url, params = f"{API}/{path}", {"limit": "3"}
    pages = 0
    while True:
        r = c.simulate_get(url, params=params)
        assert r.status_code == 200 and isinstance(r.json, list)
        seen.extend(r.json)
        pages += 1
        link = r.headers.get("link")
        if not link:
            break
        m = re.fullmatch(r'<([^>?]+)\?([^>]*)>; rel="next"', link)
        assert m, link
        url, params = m.group(1), dict(p.split("=", 1) for p in m.group(2).split("&"))
        assert params["limit"] == "3"
    assert pages == 3
    ids = [e["id"] if path == "llm-tasks" else e["entity_id"] for e in seen]
    assert len(ids) == len(set(ids)) == 7 and set(ids) == created


def test_http_lease_of_a_cancelled_task_is_409(make_client, db_url):
    client = make_client(database_url=db_url)
    task = client.simulate_post("/api/runtime/llm-tasks", json=new_task()).json
    client.simulate_post(f"/api/runtime/llm-tasks/{task['id']}/cancel")
    r = client.simulate_post(f"/api/runtime/llm-tasks/{task['id']}/lease", json={})
    assert r.status_code == 409 and r.json["error"] == "task is cancelled, not queued", r.text
    assert "retry-after" not in r.headers
