"""The answers the first version's clients read, on both stores: its keys and types, ours beside them."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from bloom_runtime.engine.models import LEASE_STATUSES, TASK_STATUSES, WORKER_STATUSES
from bloom_runtime.engine.settings import Secret, parse_api_keys
from bloom_runtime.http import schemas

from ..membridge_fixtures import membridge_server  # noqa: F401
from .conftest import ADMIN_KEY, CLIENT_KEY, new_task

API = "/api/runtime"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def test_stats_has_the_first_versions_structure_and_every_count(make_client, db_url):
    c = make_client(database_url=db_url)
    c.simulate_post(f"{API}/workers", json={"name": "w-on"})
    c.simulate_post(f"{API}/workers", json={"name": "w-off", "status": "offline"})
    for _ in range(3):
        c.simulate_post(f"{API}/llm-tasks", json=new_task())
    [first, *_] = c.simulate_get(f"{API}/llm-tasks").json
    assert c.simulate_post(f"{API}/llm-tasks/{first['id']}/lease", json={"worker_id": "w-on"}).status_code == 201

    stats = c.simulate_get(f"{API}/stats").json
    tasks, leases, workers = stats["tasks"], stats["leases"], stats["workers"]
    # The first version's keys and types.
    assert _is_int(tasks["total"]) and tasks["total"] == 3
    assert tasks["by_status"]["queued"] == 2 and tasks["by_status"]["leased"] == 1
    assert leases["total"] == 1 and leases["active"] == 1
    assert workers["total"] == 2 and workers["online"] == 1
    # Every status counted, in by_status and flat beside it, as before.
    for entity, statuses in ((tasks, TASK_STATUSES), (leases, LEASE_STATUSES), (workers, WORKER_STATUSES)):
        assert set(entity["by_status"]) == set(statuses)
        assert all(_is_int(entity[s]) and entity[s] == entity["by_status"][s] for s in statuses)
        assert entity["total"] == sum(entity["by_status"].values())
    msgspec.convert(stats, schemas.Stats)  # the documented shape


def test_worker_fields_absent_take_the_first_versions_defaults(make_client, db_url):
    c = make_client(database_url=db_url)
    r = c.simulate_post(f"{API}/workers", json={"name": "bare"})
    assert r.status_code == 201
    created = r.json
    assert {k: created[k] for k in ("url", "db_sha", "agent_version", "os_info", "install_method")} == {
        "url": "", "db_sha": "", "agent_version": "unknown", "os_info": "", "install_method": "manual",
    }
    assert _is_int(created["last_heartbeat"]) and created["last_heartbeat"] == created["registered_at"]
    # Every read shows the same.
    assert c.simulate_get(f"{API}/workers/bare").json | {"leases": []} == created | {"leases": []}
    assert c.simulate_get(f"{API}/workers").json == [created]
    # Given values are kept, and an update leaves the others alone.
    r = c.simulate_post(f"{API}/workers", json={"name": "bare", "agent_version": "0.4.0", "url": "http://10.0.0.9:8001"})
    assert r.status_code == 200
    assert r.json["agent_version"] == "0.4.0" and r.json["url"] == "http://10.0.0.9:8001" and r.json["install_method"] == "manual"


def test_get_worker_has_its_active_leases(make_client, db_url):
    c = make_client(database_url=db_url)
    c.simulate_post(f"{API}/workers", json={"name": "w-1", "capabilities": {"max_concurrency": 2}})
    c.simulate_post(f"{API}/workers", json={"name": "w-2"})
    leased = []
    for worker in ("w-1", "w-1", "w-2"):
        task = c.simulate_post(f"{API}/llm-tasks", json=new_task()).json
        leased.append(c.simulate_post(f"{API}/llm-tasks/{task['id']}/lease", json={"worker_id": worker}).json["lease"])
    c.simulate_post(f"{API}/llm-tasks/{leased[0]['task_id']}/complete", json={"status": "success", "output": "x"})

    r = c.simulate_get(f"{API}/workers/w-1")
    assert r.status_code == 200
    body = r.json
    assert body["id"] == "w-1" and body["active_leases"] == 1
    assert body["leases"] == [leased[1]]  # active only, its own only
    assert {k: v for k, v in body.items() if k != "leases"} == c.simulate_get(f"{API}/workers").json[0]
    assert c.simulate_get(f"{API}/workers/nobody").status_code == 404


def test_delete_worker_answers_removed_and_id(make_client, db_url):
    c = make_client(database_url=db_url)
    worker = c.simulate_post(f"{API}/workers", json={"name": "w-gone", "url": "http://10.0.0.7:8001"}).json
    r = c.simulate_delete(f"{API}/workers/w-gone")
    assert r.status_code == 200
    assert r.json["removed"] is True and r.json["id"] == "w-gone"
    assert {k: v for k, v in r.json.items() if k != "removed"} == worker
    assert c.simulate_get(f"{API}/workers/w-gone").status_code == 404
    r = c.simulate_delete(f"{API}/workers/w-gone")
    assert r.status_code == 404 and r.json["error"]


def test_runs_are_the_50_newest_tasks_and_results_have_their_own_path(make_client, db_url):
    c = make_client(database_url=db_url)
    c.simulate_post(f"{API}/workers", json={"name": "w-1", "capabilities": {"max_concurrency": 32}})
    ids = [c.simulate_post(f"{API}/llm-tasks", json=new_task(prompt=f"p{n}")).json["id"] for n in range(55)]
    r = c.simulate_post(f"{API}/llm-tasks/{ids[-1]}/lease", json={"worker_id": "w-1"})
    c.simulate_post(f"{API}/llm-tasks/{ids[-1]}/complete", json={"status": "success", "output": "done"})

    runs = c.simulate_get(f"{API}/runs")
    assert runs.status_code == 200
    assert [t["id"] for t in runs.json] == ids[::-1][:50]  # task objects, newest first
    assert set(runs.json[0]) >= {"id", "context_id", "agent_slug", "prompt", "status", "created_at", "attempts"}
    assert runs.json[0]["status"] == "completed"
    rest = c.simulate_get(runs.headers["link"].split(";")[0].strip("<>"))
    assert [t["id"] for t in rest.json] == ids[::-1][50:]
    assert [t["id"] for t in c.simulate_get(f"{API}/runs", params={"limit": 2}).json] == ids[::-1][:2]
    assert c.simulate_get(f"{API}/runs", params={"limit": 0}).status_code == 400

    results = c.simulate_get(f"{API}/results").json
    assert [(x["task_id"], x["output"]) for x in results] == [(ids[-1], "done")]
    assert r.json["lease"]["id"] and c.simulate_get(f"{API}/results", params={"task_id": ids[0]}).json == []


# --- /config and /test-connection ------------------------------------------------------------

MB_ADMIN_KEY = "adm-membridge-key-cdef"
AUTH = {
    "api_keys": parse_api_keys(f"ops={CLIENT_KEY}"),
    "admin_keys": parse_api_keys(f"root={ADMIN_KEY}", default_prefix="admin"),
}
CLIENT = {"X-Runtime-API-Key": CLIENT_KEY}
ADMIN = {"X-Runtime-API-Key": ADMIN_KEY}
QUICK_MEMBRIDGE = {"membridge_timeout_s": 1.0, "membridge_retries": 0}


@pytest.fixture
def with_membridge(make_client, db_url, membridge_server):  # noqa: F811
    def make(**over: Any):
        values = {"membridge_server_url": membridge_server.url, "membridge_admin_key": Secret(MB_ADMIN_KEY),
                  "membridge_sync_interval_s": 3600.0, "extra": dict(QUICK_MEMBRIDGE), **AUTH}
        return make_client(database_url=db_url, **{**values, **over})

    return make


def test_config_has_the_first_versions_fields_and_masks_by_key(with_membridge, membridge_server):  # noqa: F811
    c = with_membridge()
    admin = c.simulate_get(f"{API}/config", headers=ADMIN).json
    assert admin == {
        "membridge_server_url": membridge_server.url, "admin_key_masked": "adm-****cdef", "connected": False,
        "last_test": None, "admin_key": "****cdef", "configured": True,
    }
    # A client key learns that a key is set, none of its characters.
    client = c.simulate_get(f"{API}/config", headers=CLIENT).json
    assert client == {**admin, "admin_key_masked": "****", "admin_key": "****"}
    # No key at all: the first version's empty string.
    bare = with_membridge(membridge_admin_key=None).simulate_get(f"{API}/config", headers=ADMIN).json
    assert bare["admin_key_masked"] == "" and bare["admin_key"] is None
    # The ends of a short key would give too much of it away, even to an admin.
    short = with_membridge(membridge_admin_key=Secret("adm-short-cdef")).simulate_get(f"{API}/config", headers=ADMIN).json
    assert short["admin_key_masked"] == "****"


def test_config_shows_the_last_test_everywhere_and_after_a_restart(with_membridge, membridge_server):  # noqa: F811
    c = with_membridge()
    before = c.engine.clock.now_ms()
    r = c.simulate_post(f"{API}/test-connection", headers=CLIENT)
    assert r.status_code == 200
    assert r.json["connected"] is True and r.json["health"] == {
        "status": "ok", "service": "membridge-control-plane", "version": "0.3.0", "projects": 0, "agents": 0}
    config = c.simulate_get(f"{API}/config", headers=CLIENT).json
    assert config["connected"] is True and isinstance(config["last_test"], int)
    assert before <= config["last_test"] <= c.engine.clock.now_ms() and config["last_test"] == r.json["tested_at"]
    # Another engine on the same database (another process, or this one restarted) agrees.
    other = with_membridge()
    assert other.simulate_get(f"{API}/config", headers=CLIENT).json == config

    membridge_server.refuse()
    r = c.simulate_post(f"{API}/test-connection", headers=CLIENT)
    assert r.status_code == 200
    assert r.json["connected"] is False and "unreachable" in r.json["error"] and "health" not in r.json
    down = other.simulate_get(f"{API}/config", headers=CLIENT).json
    assert down["connected"] is False and down["last_test"] == r.json["tested_at"] >= config["last_test"]


def test_changing_the_config_resets_the_test_and_an_empty_key_keeps_the_key(with_membridge, membridge_server):  # noqa: F811
    c = with_membridge()
    assert c.simulate_post(f"{API}/test-connection", headers=CLIENT).json["connected"] is True
    # The first version's form sends admin_key "" when only the URL was edited.
    r = c.simulate_post(f"{API}/config", json={"membridge_server_url": membridge_server.url, "admin_key": ""}, headers=ADMIN)
    assert r.status_code == 200
    assert r.json["admin_key_masked"] == "adm-****cdef" and r.json["connected"] is False and r.json["last_test"] is None
    assert c.simulate_get(f"{API}/config", headers=CLIENT).json["connected"] is False
    assert c.simulate_post(f"{API}/test-connection", headers=CLIENT).json["connected"] is True
    assert membridge_server.requests[-1].headers["X-MEMBRIDGE-ADMIN"] == MB_ADMIN_KEY
