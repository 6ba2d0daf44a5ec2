"""Bad input: the right 4xx with a JSON error, and nothing changed in the store."""

from __future__ import annotations

import json

import pytest

from .conftest import new_task, snapshot

API = "/api/runtime"
MIB = 1024 * 1024


@pytest.fixture
def setup(client):
    client.simulate_post(f"{API}/workers", json={"name": "w1"})
    task = client.simulate_post(f"{API}/llm-tasks", json=new_task()).json
    return client, task["id"]


def _check(client, response, status):
    assert response.status_code == status, response.text
    body = response.json
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()


@pytest.mark.parametrize("ttl", ["abc", 1.5, -5, 1e12, 0, True])
def test_bad_ttl_on_lease(setup, ttl):
    client, tid = setup
    before = snapshot(client.engine)
    _check(client, client.simulate_post(f"{API}/llm-tasks/{tid}/lease", json={"ttl_seconds": ttl}), 400)
    assert snapshot(client.engine) == before


@pytest.mark.parametrize(
    "method,path,kwargs,status",
    [
        ("POST", "llm-tasks", {"body": "{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "llm-tasks", {"body": "[1,2]", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "llm-tasks", {"json": {"context_id": "c", "agent_slug": "a"}}, 400),  # prompt missing
        ("POST", "llm-tasks", {"json": new_task(prompt=123)}, 400),
        ("POST", "llm-tasks", {"json": new_task(prompt="x" * (MIB + 1))}, 400),
        ("POST", "llm-tasks", {"json": new_task(max_attempts=11)}, 400),
        ("POST", "llm-tasks", {"json": new_task(labels=["l"] * 257)}, 400),
        ("POST", "llm-tasks", {"json": new_task(policy={"timeout_sec": 0})}, 400),
        ("POST", "llm-tasks", {"body": "a=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415),
        ("POST", "llm-tasks", {"body": "x" * (10 * MIB), "headers": {"Content-Type": "application/json"}}, 413),
        ("POST", "workers", {"json": {"name": "bad name!"}}, 400),
        ("POST", "workers", {"json": {"name": "x" * 129}}, 400),
        ("POST", "workers", {"json": {"name": "w2", "capabilities": {"max_concurrency": 33}}}, 400),
        ("POST", "workers/w1/claim", {"json": {"wait_seconds": 31}}, 400),
        ("POST", "workers/w1/claim", {"json": {"wait_seconds": "soon"}}, 400),
        ("GET", "llm-tasks", {"params": {"status": "sleeping"}}, 400),
        ("GET", "llm-tasks", {"params": {"limit": "-1"}}, 400),
        ("GET", "llm-tasks", {"params": {"limit": "1001"}}, 400),
        ("GET", "llm-tasks", {"params": {"limit": "99999999999999"}}, 400),
        ("GET", "llm-tasks", {"params": {"limit": "ten"}}, 400),
        ("GET", "llm-tasks", {"params": {"cursor": "garbage!!"}}, 400),
        ("GET", "llm-tasks", {"params": {"cursor": "WzEsMl0"}}, 400),
        ("GET", "leases", {"params": {"status": "nope"}}, 400),
        ("GET", "workers", {"params": {"status": "nope"}}, 400),
        ("GET", "audit", {"params": {"cursor": "x" * 600}}, 400),
        ("GET", "artifacts", {"params": {"task_id": "../etc"}}, 400),
        ("GET", "llm-tasks/00000000-0000-0000-0000-000000000000", {}, 404),
        ("GET", "llm-tasks/..%2F..", {}, 404),
        ("GET", "llm-tasks/" + "a" * 129, {}, 400),
        ("POST", "llm-tasks/00000000-0000-0000-0000-000000000000/heartbeat", {}, 404),
        ("POST", "llm-tasks/00000000-0000-0000-0000-000000000000/complete", {"json": {"status": "success"}}, 404),
        ("GET", "llm-tasks/00000000-0000-0000-0000-000000000000/result", {}, 404),
        ("GET", "workers/nobody", {}, 404),
        ("DELETE", "workers/nobody", {}, 404),
        ("GET", "workers/%00", {}, 400),
        ("PUT", "llm-tasks", {}, 405),
        ("DELETE", "stats", {}, 405),
        ("GET", "no-such-route", {}, 404),
    ],
)
def test_bad_requests(setup, method, path, kwargs, status):
    client, _ = setup
    before = snapshot(client.engine)
    _check(client, client.simulate_request(method, f"{API}/{path}", **kwargs), status)
    assert snapshot(client.engine) == before


def test_complete_bad_status_and_heartbeat_wrong_type(setup):
    client, tid = setup
    client.simulate_post(f"{API}/llm-tasks/{tid}/lease")
    before = snapshot(client.engine)
    _check(client, client.simulate_post(f"{API}/llm-tasks/{tid}/complete", json={"status": "great"}), 400)
    _check(client, client.simulate_post(f"{API}/llm-tasks/{tid}/complete", json={"status": "success", "metrics": []}), 400)
    _check(client, client.simulate_post(f"{API}/llm-tasks/{tid}/heartbeat", json={"lease_id": 5}), 400)
    assert snapshot(client.engine) == before


def test_chunked_body_over_limit_is_413(make_client):
    client = make_client(max_body_bytes=4096)
    before = snapshot(client.engine)
    payload = json.dumps(new_task(prompt="x" * 8000)).encode()
    # No Content-Length: the app reads at most limit + 1 bytes and refuses.
    r = client.simulate_post(f"{API}/llm-tasks", body=payload, headers={"Content-Type": "application/json"},
                             extras={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    _check(client, r, 413)
    assert snapshot(client.engine) == before


def test_unknown_fields_are_ignored(client):
    r = client.simulate_post(f"{API}/llm-tasks", json=new_task(colour="blue"))
    assert r.status_code == 201 and "colour" not in r.json


def test_unexpected_exception_is_generic_500(client, caplog):
    def broken() -> dict:
        raise RuntimeError("secret internal detail: SELECT * FROM llm_tasks")

    client.engine.stats = broken
    r = client.simulate_get(f"{API}/stats")
    assert r.status_code == 500 and r.json == {"error": "internal error"}
    assert "SELECT" not in r.text
    assert any("unhandled error" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_store_down_is_503_without_driver_message(client):
    from bloom_runtime.engine.errors import StoreUnavailable

    def down(task_id: str):
        raise StoreUnavailable("connection to 10.0.0.5 refused: password authentication failed")

    client.engine.store.get_task = down
    r = client.simulate_get(f"{API}/llm-tasks/abc")
    assert r.status_code == 503 and r.json == {"error": "storage unavailable"} and r.headers["retry-after"]
