"""Membridge wiring end to end against the real fake membridge server: sync, failures, breaker, health."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import falcon.testing
import pytest

from bloom_runtime.engine.clock import ManualClock
from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import MembridgeError
from bloom_runtime.engine.models import NewTask
from bloom_runtime.engine.settings import Secret, Settings
from bloom_runtime.http import create_app

from .conftest import wait_for
from .membridge_fixtures import membridge_server  # noqa: F401
from .membridge_server import Answer, MembridgeServer, canonical_id

ADMIN_KEY = "sk-membridge-ADMIN-SECRET-9d2e"
FAST_FAIL_S = 0.05
RESET_S = 0.3
TUNING = {
    "membridge_timeout_s": 0.4,
    "membridge_retries": 1,
    "membridge_backoff_base_s": 0.01,
    "membridge_breaker_fail_max": 2,
    "membridge_breaker_reset_s": RESET_S,
}
SYNC_LOGGER = "bloom_runtime.actors.membridge_syncer"




def agent(name: str, now_s: float, *, status: str = "online", seen_ago_s: float = 1.0, url: str | None = None) -> dict[str, Any]:
    return {"name": name, "url": url or f"http://10.0.0.{len(name)}:8001", "status": status,
            "registered_at": now_s - 3600.5, "last_seen": now_s - seen_ago_s}




@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(int(time.time() * 1000))


@pytest.fixture
def make_engine(tmp_path, clock: ManualClock, membridge_server: MembridgeServer) -> Iterator[Callable[..., Engine]]:  # noqa: F811
    engines: list[Engine] = []

    def make(database_url: str | None = None, **over: Any) -> Engine:
        values: dict[str, Any] = {
            "database_url": database_url or "sqlite:///" + str(tmp_path / f"bloom{len(engines)}.db"),
            "membridge_server_url": membridge_server.url,
            "membridge_admin_key": Secret(ADMIN_KEY),
            "membridge_sync_interval_s": 3600.0,  # the tests run the syncs
            "lease_sweep_interval_s": 3600.0,
            "worker_offline_after_s": 60.0,
            "agent_probe_interval_s": 0,  # the agents' 10.0.0.x URLs lead nowhere
            "ask_timeout_s": 10.0,
            "extra": dict(TUNING),
        }
        values.update(over)
        engine = Engine.start(Settings(**values), clock=clock)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def workers(engine: Engine) -> dict[str, Any]:
    return {w.id: w for w in engine.workers.list()}


def test_sync_adds_merges_and_leaves_leases(make_engine, database_url, clock, membridge_server):  # noqa: F811
    engine = make_engine(database_url)
    now_s = clock.now_ms() / 1000
    membridge_server.set_agents([agent("node-a", now_s, seen_ago_s=1.25),
                                 agent("node-b", now_s, status="offline", seen_ago_s=300.0)])
    created = engine.membridge.sync_now()
    assert sorted((w.id, new) for w, new in created) == [("node-a", True), ("node-b", True)]
    ws = workers(engine)
    a = ws["node-a"]
    assert (a.status, a.source, a.url, a.url_verified) == ("online", "membridge", "http://10.0.0.6:8001", True)
    assert a.last_heartbeat == round((now_s - 1.25) * 1000)  # float seconds → ms
    assert ws["node-b"].status == "offline"
    # /agents, then where heartbeats show: every project's nodes, each node's own id.
    assert [r.route for r in membridge_server.requests] == [
        "GET /agents", "GET /projects", f"GET /projects/{canonical_id('node-a')}/nodes", f"GET /projects/{canonical_id('node-b')}/nodes"]
    assert {r.headers.get("X-MEMBRIDGE-ADMIN") for r in membridge_server.requests} == {ADMIN_KEY}

    task, _ = engine.tasks.create(NewTask(context_id="ctx", agent_slug="w", prompt="p"))
    grant = engine.leases.acquire(task.id, "node-a")

    # node-a moves and is seen again, node-b comes back, node-c appears.
    clock.advance(10_000)
    now_s = clock.now_ms() / 1000
    membridge_server.set_agents([agent("node-a", now_s, url="http://10.0.0.99:8001"),
                                 agent("node-b", now_s, status="healthy"), agent("node-c", now_s)])
    changed = engine.membridge.sync_now()
    assert sorted((w.id, new) for w, new in changed) == [("node-a", False), ("node-b", False), ("node-c", True)]
    ws = workers(engine)
    assert ws["node-a"].url == "http://10.0.0.99:8001" and ws["node-a"].url_verified
    assert ws["node-a"].last_heartbeat == round((now_s - 1) * 1000)
    assert ws["node-b"].status == "online" and ws["node-c"].status == "online"
    entries = [(e.action, e.entity_id, e.detail) for e in engine.audit.list(limit=100).items]
    assert ("worker_online", "node-b", "offline -> online: membridge last_seen 1 s ago") in entries

    # node-a disappears from /agents: a sync never offlines (the control plane forgets
    # everything when it restarts); its silence does, after WORKER_OFFLINE_AFTER.
    membridge_server.set_agents([agent("node-b", now_s), agent("node-c", now_s)])
    assert engine.membridge.sync_now() == []  # and nothing else changed: no write at all
    clock.advance(55_000)
    engine.workers.check_liveness_now()
    assert workers(engine)["node-a"].status == "online"
    clock.advance(10_000)
    engine.workers.check_liveness_now()
    assert workers(engine)["node-a"].status == "offline"
    assert ("worker_offline", "node-a") in [(e.action, e.entity_id) for e in engine.audit.list(limit=100).items]
    # Leases are never touched by a sync.
    assert engine.leases.get(grant.lease.id).status == "active"
    assert engine.tasks.get(task.id).status == "leased"


@pytest.mark.parametrize("mode", ["malformed", "500", "hang", "refuse", "bad-entry", "not-a-list"])
def test_failed_sync_changes_nothing_and_logs_one_line(make_engine, membridge_server, clock, caplog, mode):  # noqa: F811
    engine = make_engine()
    now_s = clock.now_ms() / 1000
    membridge_server.set_agents([agent("node-a", now_s)])
    engine.membridge.sync_now()
    before = (workers(engine), len(engine.audit.list(limit=1000).items))
    job_before = engine.jobs["membridge_sync"].snapshot()
    # The answer would change everything if it were applied.
    now_s = clock.now_ms() / 1000
    membridge_server.set_agents([agent("node-a", now_s, status="error"), agent("node-z", now_s)])
    if mode == "refuse":
        membridge_server.refuse()
    elif mode == "bad-entry":
        membridge_server.state.agents["bad"] = {"name": "bad name with spaces/..", "status": "online"}
    elif mode == "not-a-list":
        membridge_server.route = lambda *_: Answer(200, {"agents": []})  # type: ignore[method-assign]
    else:
        membridge_server.fail(mode, "GET /agents")
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(MembridgeError):
        engine.membridge.sync_now()
    assert time.monotonic() - started < 3.0
    assert (workers(engine), len(engine.audit.list(limit=1000).items)) == before
    job = engine.jobs["membridge_sync"].snapshot()
    assert job["failures"] == job_before["failures"] + 1 and job["last_success"] == job_before["last_success"]
    assert engine.membridge.state()["sync"]["failures"] == 1
    lines = [r for r in caplog.records if r.name == SYNC_LOGGER and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].exc_info is None and "membridge sync failed" in lines[0].getMessage()
    assert all(ADMIN_KEY not in r.getMessage() for r in caplog.records)


def test_tick_while_sync_running_is_skipped(make_engine, membridge_server, clock):  # noqa: F811
    membridge_server.set_agents([agent("node-a", clock.now_ms() / 1000)])
    engine = make_engine(extra={**TUNING, "membridge_timeout_s": 3.0, "membridge_retries": 0})
    membridge_server.fail("hang", "GET /agents", times=1)
    first: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: first.setdefault("error", _raises(engine.membridge.sync_now)))
    runner.start()
    try:
        assert membridge_server.wait_for_hanging(1)
        started = time.monotonic()
        assert engine.membridge.sync_now() is None  # skipped, and the inbox answered at once
        assert time.monotonic() - started < 0.5
        assert engine.membridge.state()["sync"]["skipped"] == 1
        assert membridge_server.count("GET /agents") == 1
    finally:
        membridge_server.release()
        runner.join()
    assert isinstance(first["error"], MembridgeError)
    assert engine.membridge.sync_now()  # the next tick syncs again
    assert membridge_server.count("GET /agents") == 2


def _raises(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


def test_breaker_opens_fails_fast_half_opens_and_closes(make_engine, membridge_server):  # noqa: F811
    engine = make_engine()
    settings = engine.settings
    client = falcon.testing.TestClient(create_app(engine, settings))

    def health() -> dict[str, Any]:
        return client.simulate_get("/api/runtime/health").json["membridge"]

    assert client.simulate_post("/api/runtime/test-connection").status_code == 200
    h = health()
    assert (h["breaker"], h["connected"], h["consecutiveFailures"]) == ("closed", True, 0) and h["lastSuccess"]

    membridge_server.refuse()
    r = client.simulate_post("/api/runtime/test-connection")
    assert r.status_code == 200 and r.json["connected"] is False and "unreachable" in r.json["error"]
    h = health()
    assert (h["breaker"], h["connected"], h["consecutiveFailures"]) == ("open", False, 2) and h["lastError"]

    started = time.monotonic()
    r = client.simulate_post("/api/runtime/test-connection")
    assert time.monotonic() - started < FAST_FAIL_S
    assert r.status_code == 200 and r.json["connected"] is False and "circuit open" in r.json["error"]
    assert r.json["retry_after_s"] > 0
    started = time.monotonic()
    r = client.simulate_get("/api/membridge/projects")
    assert time.monotonic() - started < FAST_FAIL_S
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "circuit open" in r.json["error"]
    with pytest.raises(MembridgeError):
        engine.membridge.sync_now()  # a sync while open fails fast too, counted
    assert health()["sync"]["failures"] == 1

    membridge_server.resume()
    wait_for(lambda: health()["breaker"] == "half-open", timeout_s=RESET_S * 10)
    r = client.simulate_post("/api/runtime/test-connection")
    assert r.status_code == 200 and r.json["connected"] is True
    h = health()
    assert (h["breaker"], h["connected"], h["consecutiveFailures"]) == ("closed", True, 0)
    assert h["last_test"]["connected"] is True
    metrics = client.simulate_get("/api/runtime/metrics").text
    assert 'bloom_membridge_breaker_state{state="closed"} 1.0' in metrics
    assert 'bloom_membridge_sync_total{outcome="failure"} 1.0' in metrics
    assert ADMIN_KEY not in metrics and ADMIN_KEY not in client.simulate_get("/api/runtime/health").text


def test_sync_ticker_runs_by_itself(make_engine, membridge_server, clock):  # noqa: F811
    membridge_server.set_agents([agent("node-a", clock.now_ms() / 1000)])
    engine = make_engine(membridge_sync_interval_s=0.05)
    wait_for(lambda: "node-a" in workers(engine))
    wait_for(lambda: engine.membridge.state()["sync"]["successes"] >= 2)


def test_an_agent_url_that_fails_the_check_is_shown_but_never_vouched_for(make_engine, membridge_server, clock):  # noqa: F811
    engine = make_engine()
    now_s = clock.now_ms() / 1000
    membridge_server.set_agents([agent("node-meta", now_s, url="http://[::ffff:169.254.169.254]:80"),
                                 agent("node-ok", now_s, url="http://10.0.0.7:8001/")])
    engine.membridge.sync_now()
    ws = workers(engine)
    assert ws["node-meta"].url == "http://[::ffff:169.254.169.254]:80" and not ws["node-meta"].url_verified
    assert ws["node-ok"].url == "http://10.0.0.7:8001" and ws["node-ok"].url_verified  # normalised, then vouched for
    assert engine.store.worker_trust() == {"node-ok": "http://10.0.0.7:8001"}
