"""Worker liveness against peers that behave like the real fleet: the control plane's scant
signals, the runtime's own probes, self-registrations merged with the sync, no flapping.

Real HTTP on loopback, both stores. Probe and liveness intervals are scaled down
through settings; the tests wait on conditions with a bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.models import WorkerUpsert
from bloom_runtime.engine.settings import Settings, parse_api_keys

from .conftest import wait_for
from .membridge_server import MembridgeServer
from .runtime_server import RuntimeServer

CLIENT_KEY = "client-key-0001"
ADMIN_KEY = "admin-key-00003"






@pytest.fixture
def control_plane() -> Iterator[MembridgeServer]:
    with MembridgeServer() as cp:
        yield cp


@pytest.fixture
def make_engine(database_url: str, control_plane: MembridgeServer) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**over: Any) -> Engine:
        values: dict[str, Any] = {
            "database_url": database_url, "membridge_server_url": control_plane.url,
            "membridge_sync_interval_s": 3600.0, "lease_sweep_interval_s": 3600.0, "auto_dispatch": False,
            "agent_probe_interval_s": 0, "worker_offline_after_s": 60.0, "ask_timeout_s": 10.0,
            "extra": {"membridge_agent_retries": 0, "membridge_agent_breaker_fail_max": 100},
        }
        values.update(over)
        engine = Engine.start(Settings(**values))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()




def audit_of(engine: Engine, worker_id: str) -> list[tuple[str, str | None]]:
    return [(e.action, e.detail) for e in reversed(engine.audit.list(limit=1000, entity_id=worker_id).items)]


def status(engine: Engine, worker_id: str) -> str:
    return engine.workers.get(worker_id).status


def test_agents_the_control_plane_never_contacted_are_unknown_and_stay_so_quietly(make_engine, control_plane, agents):
    engine = make_engine()
    quiet = agents("node-quiet")
    beating = agents("node-beating")
    control_plane.add_agent("node-quiet", quiet.url)
    control_plane.add_agent("node-beating", beating.url)
    assert beating.heartbeat_to(control_plane.url) == 200  # shows under /projects/{cid}/nodes only
    assert [a["status"] for a in control_plane.state.agents.values()] == ["unknown", "unknown"]
    engine.membridge.sync_now()
    assert status(engine, "node-quiet") == "unknown"  # unknown is not offline
    assert status(engine, "node-beating") == "online"  # its heartbeats count
    assert engine.workers.get("node-quiet").url_verified  # the control plane's URL is vouched for
    before = len(engine.audit.list(limit=1000).items)
    for _ in range(5):  # syncs and liveness ticks: neither flaps it nor writes anything
        engine.membridge.sync_now()
        engine.workers.check_liveness_now()
    assert status(engine, "node-quiet") == "unknown"
    assert len(engine.audit.list(limit=1000).items) == before
    # Once the control plane calls it itself, /agents says so too.
    assert control_plane.contact("node-quiet") == "online"
    engine.membridge.sync_now()
    assert status(engine, "node-quiet") == "online"
    assert audit_of(engine, "node-quiet")[-1][0] == "worker_online"


def test_probes_take_a_worker_online_and_offline_once_each_way(make_engine, control_plane, agents):
    engine = make_engine(agent_probe_interval_s=0.1, worker_offline_after_s=2.0)
    agent = agents("node-1")
    control_plane.add_agent("node-1", agent.url)
    engine.membridge.sync_now()
    wait_for(lambda: status(engine, "node-1") == "online", what="online by probe")
    assert agent.count("GET /health") >= 1 and audit_of(engine, "node-1")[-1] == ("worker_online", "unknown -> online: probe answered")
    # Alive and probed: the heartbeat stays fresh, nothing flaps, nothing is audited.
    seen = agent.count("GET /health")
    wait_for(lambda: agent.count("GET /health") >= seen + 30, what="more probes")
    engine.workers.check_liveness_now()
    assert status(engine, "node-1") == "online"
    assert [a for a, _ in audit_of(engine, "node-1")] == ["worker_registered", "worker_online"]
    agent.refuse()
    wait_for(lambda: status(engine, "node-1") == "offline", what="offline after two failed probes")
    offline = audit_of(engine, "node-1")[-1]
    assert offline[0] == "worker_offline" and "2 in a row" in (offline[1] or "")
    attempts = engine.membridge.agents.state()["attempts"]
    wait_for(lambda: engine.membridge.agents.state()["attempts"] >= attempts + 5, what="more probes that find nobody")
    engine.workers.check_liveness_now()  # ... and nothing more happens
    assert [a for a, _ in audit_of(engine, "node-1")] == ["worker_registered", "worker_online", "worker_offline"]
    agent.resume()
    wait_for(lambda: status(engine, "node-1") == "online", what="back online")
    assert [a for a, _ in audit_of(engine, "node-1")] == ["worker_registered", "worker_online", "worker_offline", "worker_online"]


def test_an_idle_fleet_writes_no_audit_rows_per_tick(make_engine, control_plane, agents):
    engine = make_engine(agent_probe_interval_s=0.05, worker_offline_after_s=1.0)
    fleet = [agents(f"node-{i}") for i in range(20)]
    for agent in fleet:
        control_plane.add_agent(agent.node_id, agent.url)
    engine.membridge.sync_now()
    wait_for(lambda: all(w.status == "online" for w in engine.workers.list()), what="all online")
    settled = len(engine.audit.list(limit=1000).items)
    assert settled == 40  # registered, then online: once each
    rounds = fleet[0].count("GET /health")
    wait_for(lambda: fleet[0].count("GET /health") >= rounds + 20, timeout_s=20, what="twenty more probe rounds")
    for _ in range(3):
        engine.membridge.sync_now()
        engine.workers.check_liveness_now()
    assert len(engine.audit.list(limit=1000).items) == settled
    assert all(w.status == "online" for w in engine.workers.list())


def test_a_self_registration_is_merged_with_the_sync_not_overridden(database_url, control_plane, agents):
    agent = agents("node-1")
    settings = {"database_url": database_url, "membridge_server_url": control_plane.url, "auto_dispatch": False,
                "agent_probe_interval_s": 0, "membridge_sync_interval_s": 3600.0,
                "api_keys": parse_api_keys(f"agents={CLIENT_KEY}"), "admin_keys": parse_api_keys(f"root={ADMIN_KEY}", default_prefix="a")}
    with RuntimeServer(api_key=CLIENT_KEY, **settings) as rt:
        agent.runtime_api_key = CLIENT_KEY  # the agent's own BLOOM_RUNTIME_URL registration needs a client key
        assert agent.register(rt.url) == 201
        registered = rt.api("GET", "/workers/node-1").json()
        assert (registered["status"], registered["source"], registered["url_verified"]) == ("online", "api", False)
        control_plane.add_agent("node-1", agent.url)  # listed too, never contacted: unknown, last_seen null
        rt.engine.membridge.sync_now()
        merged = rt.api("GET", "/workers/node-1").json()
        assert merged["status"] == "online" and merged["source"] == "api"  # not turned into unknown/membridge
        assert merged["capabilities"]["max_concurrency"] == 2 and merged["capabilities"]["labels"] == registered["capabilities"]["labels"]
        assert merged["agent_version"] == "0.4.0" and merged["url_verified"] is True  # the control plane vouches for its URL
        entries = [(e["action"], e["actor"], e["detail"]) for e in rt.api("GET", "/audit", params={"entity_id": "node-1"}).json()]
        assert ("worker_updated", "membridge-sync", f"url={agent.url} vouched for (membridge /agents)") in entries
        rt.engine.membridge.sync_now()
        assert len(rt.api("GET", "/audit", params={"entity_id": "node-1"}).json()) == len(entries)  # nothing new


def test_a_delivery_that_finds_nobody_counts_like_a_failed_probe(make_engine, control_plane, agents):
    engine = make_engine()
    agent = agents("node-1")
    engine.workers.register(WorkerUpsert(id="node-1", url=agent.url, status="online"))
    agent.refuse()
    from bloom_runtime.engine.models import NewTask

    for i in range(2):
        task, _ = engine.tasks.create(NewTask(context_id="c", agent_slug="a", prompt=f"p{i}"))
        engine.dispatch.dispatch(task.id, "node-1", wait_s=10)
    wait_for(lambda: status(engine, "node-1") == "offline", what="offline after two unreachable deliveries")
