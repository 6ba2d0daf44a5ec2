"""Auth matrix, admin operations, rate limit, load shedding."""

from __future__ import annotations

import threading

import pytest

from bloom_runtime.engine.settings import parse_api_keys
from bloom_runtime.http.routes import OPS, ROUTES

from .conftest import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, new_task, snapshot, wait_for

API = "/api/runtime"
HEADER = "X-Runtime-API-Key"


FORGED_TOKEN = "f" * 43  # the shape of a lease token, not any lease's


def _concrete(path: str) -> str:
    return (path.replace("{task_id}", "t-1").replace("{worker_id}", "w-1").replace("{cid}", "p-1")
            .replace("{lease_id}", "l-1").replace("{lease_token}", FORGED_TOKEN))


ALL_OPS = [(m, r.path) for r in ROUTES for m in r.ops]


@pytest.mark.parametrize("method,path", ALL_OPS)
def test_every_route_needs_a_key_except_the_open_ones(keyed, method, path):
    before = snapshot(keyed.engine)
    wrong = "x" * len(CLIENT_KEY)  # same length as a real key
    token_route = "{lease_token}" in path  # a dispatched agent's callback: the lease token is the credential
    for headers in ({}, {HEADER: wrong}, {HEADER: ""}, {HEADER: CLIENT_KEY} if token_route else {}):
        r = keyed.simulate_request(method, _concrete(path), headers=headers, json={} if method == "POST" else None)
        if path == f"{API}/health":
            assert r.status_code == 200
        elif token_route:
            assert r.status_code == 401 and r.json["error"] == "invalid lease token", (method, path, r.status_code)
        elif path == f"{API}/whoami":  # open, so a page can ask whether it needs a key; a wrong key is still 401
            assert r.status_code == (200 if not headers else 401), (headers, r.status_code)
        elif OPS[(path, method)].access == "open":  # the console's static files
            assert r.status_code in (200, 404), (method, path, r.status_code)
        else:
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json["error"] and r.headers.get("www-authenticate")
    assert snapshot(keyed.engine) == before


ADMIN_OPS = [(m, r.path) for r in ROUTES for m, op in r.ops.items() if op.access == "admin"]


@pytest.mark.parametrize("method,path", ADMIN_OPS)
def test_admin_routes_refuse_client_keys(keyed, method, path):
    keyed.simulate_post(f"{API}/workers", json={"name": "w-1"}, headers={HEADER: CLIENT_KEY})
    before = snapshot(keyed.engine)
    r = keyed.simulate_request(method, _concrete(path), headers={HEADER: CLIENT_KEY}, json={})
    assert r.status_code == 403 and r.json["error"]
    assert snapshot(keyed.engine) == before
    r = keyed.simulate_request(method, _concrete(path), headers={HEADER: ADMIN_KEY}, json={})
    assert r.status_code not in (401, 403)


def test_key_name_is_the_audit_actor_and_admin_unset_means_any_key_is_admin(make_client):
    c = make_client(api_keys=parse_api_keys(f"ops={CLIENT_KEY}"), headers={HEADER: CLIENT_KEY})
    task = c.simulate_post(f"{API}/llm-tasks", json=new_task()).json
    entries = c.simulate_get(f"{API}/audit", params={"entity_id": task["id"]}).json
    assert [e["actor"] for e in entries] == ["ops"]
    c.simulate_post(f"{API}/workers", json={"name": "w-1"})
    assert c.simulate_delete(f"{API}/workers/w-1").status_code == 200


def test_config_masks_key_and_audits_change(keyed):
    admin = {HEADER: ADMIN_KEY}
    r = keyed.simulate_post(f"{API}/config", json={"membridge_server_url": "http://membridge.local:8000", "admin_key": "supersecretvalue1234"}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json == {"membridge_server_url": "http://membridge.local:8000", "admin_key": "****1234", "configured": True,
                      "admin_key_masked": "supe****1234", "connected": False, "last_test": None}
    assert "supersecret" not in keyed.simulate_get(f"{API}/config", headers=admin).text
    entry = keyed.simulate_get(f"{API}/audit", headers=admin).json[0]
    assert entry["action"] == "config_updated" and entry["actor"] == "root" and "supersecret" not in entry["detail"]
    r = keyed.simulate_post(f"{API}/config", json={"membridge_server_url": "http://user:pw@evil"}, headers=admin)
    assert r.status_code == 400


def test_rate_limit_429_with_headers(make_client):
    c = make_client(rate_limit_per_s=0.001, rate_limit_burst=3)
    codes = [c.simulate_get(f"{API}/stats").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = c.simulate_get(f"{API}/stats")
    assert r.status_code == 429 and r.json["error"]
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0" and r.headers["ratelimit-reset"]


def test_default_rate_limit_lets_a_fleet_heartbeat_and_claim(make_client):
    """64 workers sharing one key: a minute of heartbeats (every 10 s) and claims all pass."""
    c = make_client(api_keys=parse_api_keys(f"fleet={CLIENT_KEY}"), headers={HEADER: CLIENT_KEY})
    for i in range(64):
        c.simulate_post(f"{API}/workers", json={"name": f"w{i}"})
    for _ in range(6):
        for i in range(64):
            assert c.simulate_post(f"{API}/workers/w{i}/claim", json={"wait_seconds": 0}).status_code == 204
            assert c.simulate_post(f"{API}/llm-tasks/t{i}/heartbeat").status_code == 404  # not throttled


def test_load_shedding_503_at_once(make_client):
    c = make_client(max_in_flight=2)
    shedder = c.app.context.shedder
    shedder.backlog = lambda: 5  # the server reports a deep queue
    r = c.simulate_get(f"{API}/stats")
    assert r.status_code == 503 and r.headers["retry-after"] and r.json["error"]
    shedder.backlog = lambda: 0
    assert c.simulate_get(f"{API}/stats").status_code == 200
    assert shedder.in_flight == 0


def test_long_polls_have_their_own_budget(make_client):
    c = make_client(threads=6, max_in_flight=4)  # long-poll budget: 2
    shedder = c.app.context.shedder
    assert shedder.long_poll_budget == 2
    c.simulate_post(f"{API}/workers", json={"name": "w1"})
    started = threading.Barrier(3)
    results: list[int] = []

    def poll() -> None:
        started.wait()
        results.append(c.simulate_post(f"{API}/workers/w1/claim", json={"wait_seconds": 2}).status_code)

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait()
    wait_for(lambda: shedder.long_polls == 2)
    # Budget spent: a third claim is answered at once (short poll), heartbeats still pass.
    r = c.simulate_post(f"{API}/workers/w1/claim", json={"wait_seconds": 30})
    assert r.status_code == 204 and r.headers["retry-after"] == "1"
    assert c.simulate_get(f"{API}/stats").status_code == 200
    c.simulate_post(f"{API}/llm-tasks", json=new_task())
    for t in threads:
        t.join()
    assert sorted(results) == [200, 204]
    assert shedder.busy == 0


def test_worker_routes_have_a_per_key_total_so_new_ids_do_not_bypass_the_limit(live_server, tmp_path):
    """A new path id per request used to get a fresh bucket each time: 100 000 heartbeats at 883 req/s passed."""
    import time

    import requests

    rate, burst, factor = 1.0, 10, 4
    server = live_server(
        database_url=f"sqlite:///{tmp_path}/rl.db", api_keys=parse_api_keys(f"fleet={CLIENT_KEY},other={OTHER_KEY}"),
        rate_limit_per_s=rate, rate_limit_burst=burst, rate_limit_fleet_factor=factor,
    )
    s = requests.Session()
    s.headers[HEADER] = CLIENT_KEY
    started = time.monotonic()
    codes = [s.post(f"{server.url}/llm-tasks/minted-{i}/heartbeat", timeout=10).status_code for i in range(150)]
    elapsed = time.monotonic() - started
    passed = codes.count(404)
    assert set(codes) <= {404, 429}
    assert passed <= burst * factor + rate * factor * elapsed + 1, (passed, elapsed)
    assert codes.count(429) >= 150 - burst * factor - rate * factor * elapsed - 1
    r = s.post(f"{server.url}/llm-tasks/minted-x/heartbeat", timeout=10)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]
    # Another key's workers are not held back by this one.
    assert s.post(f"{server.url}/llm-tasks/minted-y/heartbeat", headers={HEADER: OTHER_KEY}, timeout=10).status_code == 404


def test_slow_client_calls_cannot_take_the_slots_heartbeats_need(live_server, tmp_path):
    """Client calls stuck in the app (here: /stats held on an event) fill up to their share, never the whole server."""
    import concurrent.futures

    import requests

    server = live_server(database_url=f"sqlite:///{tmp_path}/shed.db", threads=8, max_in_flight=6, rate_limit_per_s=0)
    s = requests.Session()
    s.post(server.url + "/workers", json={"name": "w-1", "capabilities": {"max_concurrency": 4}}).raise_for_status()
    task = s.post(server.url + "/llm-tasks", json=new_task()).json()
    lease = s.post(server.url + f"/llm-tasks/{task['id']}/lease", json={"worker_id": "w-1"}).json()["lease"]

    release = threading.Event()
    real_stats = server.engine.stats

    def slow_stats() -> dict:
        release.wait(30)
        return real_stats()

    server.engine.stats = slow_stats  # type: ignore[method-assign]
    shedder = server.app.context.shedder
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        try:
            slow = [pool.submit(requests.get, server.url + "/stats", timeout=30) for _ in range(8)]
            # Client calls take what they may; those over their share are refused at once.
            wait_for(lambda: sum(f.done() for f in slow) + shedder.in_flight >= 8)
            refused = [f.result() for f in slow if f.done()]
            assert refused and all(r.status_code == 503 and r.headers["retry-after"] for r in refused)
            for _ in range(3):
                beat = s.post(server.url + f"/llm-tasks/{task['id']}/heartbeat", json={"lease_id": lease["id"]}, timeout=10)
                assert beat.status_code == 200, beat.text
            done = s.post(server.url + f"/llm-tasks/{task['id']}/complete",
                          json={"status": "success", "output": "ok", "lease_id": lease["id"]}, timeout=10)
            assert done.status_code == 200, done.text
        finally:
            release.set()
        held = [f.result() for f in slow if f.result().status_code == 200]
    assert held, "client calls were refused altogether"
