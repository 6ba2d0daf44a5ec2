"""NUL (U+0000) in request fields: both stores answer the same.

Identifiers and names (ids, labels, slugs, keys, tags, URLs, …) refuse it with 400 and
change nothing. Free text (prompts, context hints, outputs, error messages, metrics) is
accepted with each NUL replaced by U+FFFD before any store sees it, so a worker whose
output holds NUL can complete its task.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import requests

from .conftest import new_task

NUL = "\u0000"
REPLACED = "\ufffd"


@pytest.fixture
def api(live_server, db_url):
    server = live_server(database_url=db_url, rate_limit_per_s=0)
    s = requests.Session()
    s.post(server.url + "/workers", json={"name": "w-1", "capabilities": {"max_concurrency": 8}}).raise_for_status()
    return server, s


def _state(server, s: requests.Session) -> Any:
    """What a refused request must leave unchanged."""
    return (s.get(server.url + "/stats").json(), s.get(server.url + "/audit", params={"limit": 1000}).json(),
            s.get(server.url + "/workers").json(), s.get(server.url + "/config").json())


def _leased_task(server, s: requests.Session) -> str:
    task = s.post(server.url + "/llm-tasks", json=new_task()).json()
    s.post(server.url + f"/llm-tasks/{task['id']}/lease", json={"worker_id": "w-1"}).raise_for_status()
    return task["id"]


REFUSED = [
    ("llm-tasks", new_task(context_id=f"ctx{NUL}1")),
    ("llm-tasks", new_task(agent_slug=f"writer{NUL}")),
    ("llm-tasks", new_task(labels=[f"gpu{NUL}"])),
    ("llm-tasks", new_task(idempotency_key=f"key{NUL}1")),
    ("workers", {"name": f"w{NUL}2"}),
    ("workers", {"name": "w-2", "node_id": f"node{NUL}"}),
    ("workers", {"name": "w-2", "url": f"http://127.0.0.1:9/{NUL}"}),
    ("workers", {"name": "w-2", "ip_addrs": [f"10.0.0.1{NUL}"]}),
    ("workers", {"name": "w-2", "db_sha": f"abc{NUL}"}),
    ("workers", {"name": "w-2", "agent_version": f"1.0{NUL}"}),
    ("workers", {"name": "w-2", "os_info": f"Linux{NUL}"}),
    ("workers", {"name": "w-2", "install_method": f"pip{NUL}"}),
    ("workers", {"name": "w-2", "capabilities": {"labels": [f"gpu{NUL}"]}}),
    ("complete", {"status": "success", "artifact_type": f"text{NUL}"}),
    ("complete", {"status": "success", "artifact_tags": [f"tag{NUL}"]}),
    ("complete", {"status": "success", "worker_id": f"w-1{NUL}"}),
    ("heartbeat", {"lease_id": f"l{NUL}"}),
    ("config", {"membridge_server_url": f"http://membridge.local{NUL}:8000"}),
    ("config", {"admin_key": f"secret-admin-key{NUL}"}),
]


def _case_id(where: str, body: dict[str, Any]) -> str:
    field = next(k for k, v in body.items() if "\\u0000" in json.dumps(v))
    return f"{where}.{field}"


@pytest.mark.parametrize("where, body", REFUSED, ids=[_case_id(w, b) for w, b in REFUSED])
def test_nul_in_identifiers_and_names_is_400_and_changes_nothing(api, where, body):
    server, s = api
    path = where
    if where in ("complete", "heartbeat"):
        path = f"llm-tasks/{_leased_task(server, s)}/{where}"
    before = _state(server, s)
    r = s.post(f"{server.url}/{path}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] and "storage" not in r.json()["error"]
    assert _state(server, s) == before


def test_nul_in_the_idempotency_key_header_is_400(api):
    server, s = api
    before = _state(server, s)
    # http.client sends the byte as it is; waitress passes it on.
    r = s.post(server.url + "/llm-tasks", json=new_task(), headers={"Idempotency-Key": f"key{NUL}1"})
    assert r.status_code == 400, r.text
    assert _state(server, s) == before


@pytest.mark.parametrize("listing", ["llm-tasks", "leases", "artifacts", "results", "runs", "audit"])
def test_nul_in_a_cursor_or_filter_is_400(api, listing):
    server, s = api
    cursor = base64.urlsafe_b64encode(json.dumps([1, f"id{NUL}"]).encode()).decode().rstrip("=")
    assert s.get(f"{server.url}/{listing}", params={"cursor": cursor}).status_code == 400
    if listing in ("artifacts", "results"):
        assert s.get(f"{server.url}/{listing}", params={"task_id": f"t{NUL}"}).status_code == 400
    if listing == "audit":
        assert s.get(f"{server.url}/{listing}", params={"entity_id": f"e{NUL}"}).status_code == 400


def test_nul_in_prompt_and_hints_is_stored_replaced(api):
    server, s = api
    r = s.post(server.url + "/llm-tasks", json=new_task(prompt=f"say{NUL}hi", context_hints=[f"a{NUL}b", "plain"]))
    assert r.status_code == 201, r.text
    stored = s.get(server.url + f"/llm-tasks/{r.json()['id']}").json()
    assert stored["prompt"] == f"say{REPLACED}hi" and stored["context_hints"] == [f"a{REPLACED}b", "plain"]
    assert r.json()["prompt"] == stored["prompt"]


def test_a_worker_whose_output_holds_nul_completes(api):
    server, s = api
    tid = _leased_task(server, s)
    body = {
        "status": "success",
        "output": f"line{NUL}one",
        "error_message": f"warn{NUL}",
        "metrics": {"duration_ms": 5, "note": f"n{NUL}", "nested": {f"k{NUL}": [f"v{NUL}", 1]}},
    }
    r = s.post(server.url + f"/llm-tasks/{tid}/complete", json=body)
    assert r.status_code == 200, r.text
    result = s.get(server.url + f"/llm-tasks/{tid}/result").json()
    assert result["output"] == f"line{REPLACED}one" and result["error_message"] == f"warn{REPLACED}"
    assert result["metrics"] == {"duration_ms": 5, "note": f"n{REPLACED}", "nested": {f"k{REPLACED}": [f"v{REPLACED}", 1]}}
    assert s.get(server.url + f"/llm-tasks/{tid}").json()["status"] == "completed"
    artifact = s.get(server.url + "/artifacts", params={"task_id": tid}).json()[0]
    assert artifact["content"] == f"line{REPLACED}one"


def test_a_failed_run_whose_error_holds_nul_is_retried(api):
    server, s = api
    tid = _leased_task(server, s)
    r = s.post(server.url + f"/llm-tasks/{tid}/complete", json={"status": "error", "error_message": f"boom{NUL}"})
    assert r.status_code == 200, r.text
    assert r.json()["task"]["status"] == "queued" and r.json()["result"]["error_message"] == f"boom{REPLACED}"
