"""Per-lease callback tokens over HTTP: no API key needed, good for one lease, never shown."""

from __future__ import annotations

import logging

from .conftest import ADMIN_KEY, CLIENT_KEY, new_task, snapshot

API = "/api/runtime"
KEY = {"X-Runtime-API-Key": CLIENT_KEY}


def _leased(keyed, n: int = 1) -> list[tuple[dict, dict, str]]:
    keyed.simulate_post(f"{API}/workers", json={"name": "w1", "capabilities": {"max_concurrency": 4}},
                        headers={"X-Runtime-API-Key": ADMIN_KEY})
    out = []
    for _ in range(n):
        task = keyed.simulate_post(f"{API}/llm-tasks", json=new_task(), headers=KEY).json
        granted = keyed.simulate_post(f"{API}/llm-tasks/{task['id']}/lease", headers=KEY).json
        out.append((task, granted["lease"], granted["lease_token"]))
    return out


def _callback(lease: dict, token: str, task_id: str, what: str) -> str:
    return f"/api/leases/{lease['id']}/{token}{API}/llm-tasks/{task_id}/{what}"


def test_token_callbacks_need_no_api_key_and_act_for_the_lease_s_worker(keyed, caplog):
    caplog.set_level(logging.INFO)
    [(task, lease, token)] = _leased(keyed)
    r = keyed.simulate_post(_callback(lease, token, task["id"], "heartbeat"))  # no key, no body: as the agent sends it
    assert r.status_code == 200 and r.json["task"]["status"] == "running"
    r = keyed.simulate_post(_callback(lease, token, task["id"], "complete"),
                            json={"status": "success", "output": "hi", "metrics": {"duration_ms": 3, "tokens_used": None}})
    assert r.status_code == 200 and r.json["task"]["status"] == "completed"
    actors = {e.action: e.actor for e in keyed.engine.audit.list(limit=50).items}
    assert actors["lease_renewed"] == "w1" and actors["task_completed"] == "w1"
    # The token is never listed, audited or logged.
    shown = [keyed.simulate_get(f"{API}/{p}", headers=KEY).text for p in ("leases", "audit", "llm-tasks", f"llm-tasks/{task['id']}")]
    assert all(token not in text for text in shown)
    assert token not in caplog.text and "/api/leases/" + lease["id"] + "/****/api/runtime" in caplog.text


def test_forged_and_stale_tokens_change_nothing(keyed):
    (task, lease, token), (other, _other_lease, other_token) = _leased(keyed, 2)
    before = snapshot(keyed.engine)
    forged = ("A" * 43, token[:-1] + ("A" if token[-1] != "A" else "B"), other_token, "short", "x" * 200)
    for bad in forged:
        for what, body in (("heartbeat", None), ("complete", {"status": "success", "output": "forged"})):
            r = keyed.simulate_post(_callback(lease, bad, task["id"], what), json=body)
            assert r.status_code in (401, 404), (bad, r.status_code)  # 404: a token that is not one path segment
            assert r.status_code == 404 or r.json["error"] == "invalid lease token"
    # A real token used for another task: that task's lease is not this one.
    r = keyed.simulate_post(_callback(lease, token, other["id"], "complete"), json={"status": "success", "output": "x"})
    assert r.status_code == 409
    # A body token that is not the lease's, or not the task's active lease's.
    r = keyed.simulate_post(f"{API}/llm-tasks/{task['id']}/heartbeat", json={"lease_id": lease["id"], "lease_token": other_token},
                            headers=KEY)
    assert r.status_code == 401
    r = keyed.simulate_post(f"{API}/llm-tasks/{task['id']}/complete", json={"status": "success", "lease_token": other_token},
                            headers=KEY)
    assert r.status_code == 409
    assert snapshot(keyed.engine) == before
    # Once the lease is over its token is stale: 409, and still nothing changes.
    keyed.engine.tasks.cancel(task["id"])
    after_cancel = snapshot(keyed.engine)
    for what, body in (("heartbeat", None), ("complete", {"status": "success", "output": "late"})):
        assert keyed.simulate_post(_callback(lease, token, task["id"], what), json=body).status_code == 409
    assert snapshot(keyed.engine) == after_cancel
