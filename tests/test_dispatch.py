"""Push dispatch end to end: a real runtime over HTTP, worker agents that behave like membridge's, both stores.

Times are scaled down through settings (policy.timeout_sec, DISPATCH_GRACE, the
agent client's own timeout, TTLs, sweep interval); the tests wait on conditions
with a bound, never for a fixed time. The agent stand-ins' runs are the only
sleeps: they are the CLI's run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bloom_runtime.engine.clock import Clock, ManualClock
from bloom_runtime.engine.settings import Secret, parse_api_keys

from .agent_standin import AgentStandIn, Run
from .conftest import truncate_pg, wait_for
from .runtime_server import RuntimeServer

CLIENT_KEY = "client-key-0001"
ADMIN_KEY = "admin-key-00003"
AGENT_KEY = "sk-agent-SECRET-77aa1"
FAST: dict[str, Any] = {
    "lease_sweep_interval_s": 0.1,
    "retry_backoff_base_ms": 10,
    "retry_backoff_cap_ms": 50,
    "dispatch_grace_s": 2.0,
    "auto_dispatch": False,
    "agent_probe_interval_s": 0,
    "ask_timeout_s": 10.0,
    # The agent client's own timeout, as short as the first version's fixed 10 s was against a
    # 40 s run: a delivery must wait policy.timeout_sec + grace instead.
    "extra": {"membridge_agent_timeout_s": 0.3, "membridge_agent_retries": 1, "membridge_backoff_base_s": 0.01,
              "membridge_agent_breaker_fail_max": 3, "membridge_agent_breaker_reset_s": 30.0},
}






@pytest.fixture
def runtime(database_url: str) -> Iterator[Callable[..., RuntimeServer]]:
    started: list[RuntimeServer] = []

    def start(clock: Clock | None = None, **over: Any) -> RuntimeServer:
        settings = {**FAST, "database_url": database_url,
                    "api_keys": parse_api_keys(f"ops={CLIENT_KEY}"),
                    "admin_keys": parse_api_keys(f"root={ADMIN_KEY}", default_prefix="admin"), **over}
        rt = RuntimeServer(api_key=CLIENT_KEY, clock=clock, **settings)
        started.append(rt)
        return rt

    yield start
    for rt in reversed(started):
        rt.close()




def vouch(rt: RuntimeServer, agent: AgentStandIn, **fields: Any) -> None:
    """Register the agent as its own payload does, then have an admin vouch for its URL."""
    assert rt.api("POST", "/workers", json=agent.registration()).status_code in (200, 201)
    r = rt.api("POST", "/workers", json={"name": agent.node_id, "url": agent.url, **fields},
               headers={"X-Runtime-API-Key": ADMIN_KEY})
    assert r.status_code == 200 and r.json()["url_verified"] is True


def create(rt: RuntimeServer, **fields: Any) -> dict[str, Any]:
    body = {"context_id": "ctx-1", "agent_slug": "writer", "prompt": "say hi", **fields}
    r = rt.api("POST", "/llm-tasks", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def task(rt: RuntimeServer, task_id: str) -> dict[str, Any]:
    return rt.api("GET", f"/llm-tasks/{task_id}").json()


def audit(rt: RuntimeServer, task_id: str) -> list[str]:
    return [e["action"] for e in reversed(rt.api("GET", "/audit", params={"entity_id": task_id}).json())]


# --- one delivery --------------------------------------------------------------------------------


def test_a_run_longer_than_the_agent_timeout_completes_exactly_once(runtime, agents):
    rt = runtime()
    agent = agents(run=Run(seconds=1.5, output="forty seconds of work"))
    vouch(rt, agent)
    t = create(rt, policy={"timeout_sec": 3})
    started = time.monotonic()
    r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch")
    assert r.status_code == 202, r.text
    assert time.monotonic() - started < 1.0  # answered at once, not after the run
    out = r.json()
    assert out["dispatched"] is True and out["delivery"]["state"] == "sent" and out["worker"]["id"] == "node-1"
    assert out["lease_id"] == out["lease"]["id"] == out["delivery"]["lease_id"] and out["lease_token"]
    assert out["watch"]["task"] == f"/api/runtime/llm-tasks/{t['id']}"
    assert task(rt, t["id"])["delivery"]["state"] == "sent"
    done = wait_for(lambda: (v := task(rt, t["id"]))["delivery"]["state"] != "sent" and v, what="the delivery's outcome")
    assert done["status"] == "completed" and done["attempts"] == 1
    assert done["delivery"]["state"] == "answered" and done["delivery"]["agent_status"] == 200
    assert rt.api("GET", f"/llm-tasks/{t['id']}/result").json()["output"] == "forty seconds of work"
    assert agent.count("POST /execute-task") == 1
    assert [(c.kind, c.status) for c in agent.callbacks] == [("heartbeat", 200), ("complete", 200)]
    assert audit(rt, t["id"])[-3:] == ["task_dispatched", "task_completed", "dispatch_answered"]


def test_wait_seconds_returns_the_agent_s_answer(runtime, agents):
    rt = runtime()
    agent = agents(run=Run(seconds=0.2, output="quick"))
    vouch(rt, agent)
    t = create(rt)
    r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["delivery"]["state"] == "answered" and out["task"]["status"] == "completed"
    assert out["execution"]["ok"] is True and out["execution"]["output"] == "quick"
    # A second dispatch of the same task answers with that delivery, not 409, and sends nothing.
    again = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch")
    assert again.status_code == 200 and again.json()["delivery"]["id"] == out["delivery"]["id"]
    assert "lease_token" not in again.json()
    assert agent.count("POST /execute-task") == 1


def test_a_second_dispatch_while_running_answers_with_the_delivery(runtime, agents):
    rt = runtime()
    agent = agents(run=Run(seconds=1.0))
    vouch(rt, agent)
    t = create(rt)
    first = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch").json()
    assert agent.wait_for_runs(1)
    second = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch")
    assert second.status_code == 202 and second.json()["delivery"]["id"] == first["delivery"]["id"]
    waited = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10})
    assert waited.status_code == 200 and waited.json()["delivery"]["state"] == "answered"
    assert agent.count("POST /execute-task") == 1


# An error holding NUL is stored as other free text is (PostgreSQL refused the record before).
@pytest.mark.parametrize(("stderr", "stored"), [("claude: rate limited", "claude: rate limited"), ("bad\u0000byte", "bad\ufffdbyte")])
def test_the_agent_s_error_is_recorded_and_the_task_retried(runtime, agents, stderr, stored):
    rt = runtime()
    agent = agents(run=Run(exit_code=1, stderr=stderr))
    vouch(rt, agent)
    t = create(rt)
    r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["delivery"]["state"] == "agent_error" and out["delivery"]["detail"] == stored
    assert task(rt, t["id"])["delivery"]["detail"] == stored
    assert out["execution"]["ok"] is False
    assert out["task"]["status"] == "queued" and out["task"]["attempts"] == 1  # its complete(error) arrived


def test_an_unreachable_agent_costs_no_attempt_and_its_open_breaker_answers_503(runtime, agents):
    rt = runtime()
    agent = agents()
    vouch(rt, agent)
    agent.refuse()
    t = create(rt, max_attempts=1)
    for _ in range(3):  # the breaker opens after 3 failed attempts (1 delivery = 2 attempts here)
        wait_for(lambda: task(rt, t["id"])["status"] == "queued" and (not task(rt, t["id"])["not_before"]
                 or task(rt, t["id"])["not_before"] <= time.time() * 1000), what="queued and due")
        r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10})
        if r.status_code == 503:
            break
        assert r.status_code == 502, r.text
        out = r.json()
        assert out["dispatched"] is False and out["delivery"]["state"] == "unreachable" and "unreachable" in out["error"]
        assert out["task"]["status"] == "queued" and out["task"]["attempts"] == 0
    r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"worker_id": "node-1"})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "circuit breaker" in r.json()["error"]
    r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch")  # picked: no push worker with a closed breaker
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    final = task(rt, t["id"])
    assert final["status"] == "queued" and final["attempts"] == 0  # max_attempts=1, and still never used
    assert agent.requests == []


def test_an_agent_that_refuses_uses_the_attempt(runtime, agents):
    rt = runtime(membridge_agent_key=Secret(AGENT_KEY))
    wrong_key = agents("node-1", agent_key="another-agent-key")
    vouch(rt, wrong_key)
    t = create(rt)
    out = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10}).json()
    assert out["delivery"]["state"] == "refused" and out["delivery"]["agent_status"] == 401
    assert "X-MEMBRIDGE-AGENT" in out["delivery"]["detail"]  # FastAPI's detail, relayed
    assert out["task"]["status"] == "queued" and out["task"]["attempts"] == 1
    assert wrong_key.requests[0].headers["X-MEMBRIDGE-AGENT"] == AGENT_KEY
    no_claude = agents("node-2", claude=False)
    vouch(rt, no_claude)
    t2 = create(rt)
    out = rt.api("POST", f"/llm-tasks/{t2['id']}/dispatch", json={"worker_id": "node-2", "wait_seconds": 10}).json()
    assert out["delivery"]["state"] == "refused" and out["delivery"]["agent_status"] == 503


def test_no_control_plane_no_agent_key_and_no_runtime_key_on_the_agent(runtime, agents):
    rt = runtime()  # RUNTIME_API_KEY set on the runtime; no MEMBRIDGE_SERVER_URL, no MEMBRIDGE_AGENT_KEY
    agent = agents()  # no RUNTIME_API_KEY in the agent's environment
    vouch(rt, agent)
    t = create(rt)
    out = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10}).json()
    assert out["task"]["status"] == "completed", out
    [sent] = agent.requests
    assert "x-membridge-agent" not in {h.lower() for h in sent.headers}
    assert "x-runtime-api-key" not in {h.lower() for c in agent.requests for h in c.headers}
    assert sent.json["runtime_url"] == f"{rt.url}/api/leases/{out['lease_id']}/{rt.engine.leases.token(out['lease_id'])}"


def test_a_late_result_is_not_reported_as_success(runtime, agents):
    rt = runtime()
    agent = agents(run=Run(seconds=2.0))
    vouch(rt, agent)
    t = create(rt, policy={"timeout_sec": 5})
    r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"ttl_seconds": 1, "wait_seconds": 10})
    out = r.json()
    # The lease expired during the run (one heartbeat only, at the start): the agent's
    # result got 409 though the agent answered ok.
    assert r.status_code == 200 and out["execution"]["ok"] is True
    assert out["delivery"]["state"] == "callback_missing" and "after its lease had expired" in out["delivery"]["detail"]
    assert rt.engine.leases.get(out["lease_id"]).status == "expired"
    assert [c.status for c in agent.callbacks if c.kind == "complete"] == [409]
    assert task(rt, t["id"])["status"] == "queued"


def test_refused_callbacks_are_not_reported_as_success_and_change_nothing(runtime, agents):
    rt = runtime()
    # Something between agent and runtime mangles the token in the callback URL: 401.
    agent = agents(callback_url=lambda url: url[:-4] + "AAAA")
    vouch(rt, agent)
    t = create(rt)
    out = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10}).json()
    assert [(c.kind, c.status) for c in agent.callbacks] == [("heartbeat", 401), ("complete", 401)]
    assert out["execution"]["ok"] is True  # the agent ignores its callbacks' answers
    assert out["delivery"]["state"] == "callback_missing" and "never reached" in out["delivery"]["detail"]
    final = task(rt, t["id"])
    assert final["status"] == "queued" and final["attempts"] == 1  # retried at once, not after the TTL
    assert rt.api("GET", f"/llm-tasks/{t['id']}/result").status_code == 404
    # Nothing the refused callbacks asked for: the one failure is the dispatcher's, for the missing result.
    assert audit(rt, t["id"]) == ["task_created", "task_leased", "task_dispatched", "lease_failed", "dispatch_callback_missing"]


def test_an_agent_killed_mid_run_is_left_to_its_lease(runtime, agents):
    rt = runtime()
    agent = agents(run=Run(seconds=30))
    vouch(rt, agent)
    t = create(rt, policy={"timeout_sec": 60})
    r = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"ttl_seconds": 1})
    assert r.status_code == 202
    assert agent.wait_for_runs(1)
    agent.kill()
    d = wait_for(lambda: (v := task(rt, t["id"])["delivery"])["state"] != "sent" and v, what="the delivery's outcome")
    assert d["state"] == "unknown"  # the run may still be going: no second run before the lease expires
    # The lease expires (TTL) and the sweep requeues the task.
    t2 = wait_for(lambda: (v := task(rt, t["id"]))["status"] == "queued" and v, what="requeued by the sweep")
    assert t2["attempts"] == 1 and "lease_expired" in [e["action"] for e in rt.api("GET", "/audit").json()]


def test_an_agent_s_malformed_json_output_is_a_retryable_error(runtime, agents):
    rt = runtime()
    agent = agents(run=Run(output="Here you go: {not json"))
    vouch(rt, agent)
    t = create(rt, desired_format="json")
    out = rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10}).json()
    assert out["execution"]["ok"] is True and out["delivery"]["state"] == "answered"  # its result did get in
    result = rt.api("GET", f"/llm-tasks/{t['id']}/result").json()
    assert result["status"] == "error" and "not valid JSON" in result["error_message"]
    assert task(rt, t["id"])["status"] == "queued"
    assert agent.requests[0].json["desired_format"] == "json"


# --- automatic dispatch ----------------------------------------------------------------------------


def executions_by_task(*fleet: AgentStandIn) -> dict[str, int]:
    counts: dict[str, int] = {}
    for agent in fleet:
        for body in agent.executions():
            counts[body["task_id"]] = counts.get(body["task_id"], 0) + 1
    return counts


def tasks_by_id(rt: RuntimeServer, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The tasks ``ids`` in one request (a request each would run into the rate limit)."""
    listed = {t["id"]: t for t in rt.api("GET", "/llm-tasks", params={"limit": 1000}).json()}
    return {i: listed[i] for i in ids}


def all_done(rt: RuntimeServer, ids: list[str], status: str = "completed") -> bool:
    return all(t["status"] == status for t in tasks_by_id(rt, ids).values())


def test_fifty_tasks_created_and_nothing_else_complete_exactly_once_across_three_agents(runtime, agents):
    rt = runtime(auto_dispatch=True)
    fleet = [agents(f"node-{i}", run=Run(seconds=0.02)) for i in range(3)]
    for agent in fleet:
        vouch(rt, agent)  # max_concurrency 2 each, as the agents register themselves
    ids = [create(rt, context_id=f"ctx-{i % 7}", prompt=f"task {i}")["id"] for i in range(50)]
    wait_for(lambda: all_done(rt, ids), timeout_s=60, what="all 50 tasks completed")
    assert executions_by_task(*fleet) == dict.fromkeys(ids, 1)
    assert all(t["attempts"] == 1 for t in tasks_by_id(rt, ids).values())
    assert all(agent.executions() for agent in fleet)  # the work was spread
    results = {r["task_id"]: r["output"] for r in rt.api("GET", "/results", params={"limit": 100}).json()}
    assert results == {i: f"done: task {n}" for n, i in enumerate(ids)}


def test_an_error_result_is_retried_on_another_agent_by_itself(runtime, agents):
    rt = runtime(auto_dispatch=True)
    failing = agents("node-a", run=Run(exit_code=1, stderr="claude: out of credits"))
    healthy = agents("node-b", run=Run(output="fine"))
    vouch(rt, failing, capabilities={"max_concurrency": 4})  # the most free room: the first attempt goes there
    vouch(rt, healthy)
    t = create(rt)
    done = wait_for(lambda: (v := task(rt, t["id"]))["status"] == "completed" and v, what="retried and completed")
    assert done["attempts"] == 2 and done["worker_id"] == "node-b"
    assert len(failing.executions()) == 1 and len(healthy.executions()) == 1
    assert rt.api("GET", f"/llm-tasks/{t['id']}/result").json()["output"] == "fine"


def test_an_agent_killed_mid_run_has_its_task_dispatched_again_after_ttl_and_sweep(runtime, agents):
    clock = ManualClock(int(time.time() * 1000))  # the runtime's time: the TTL passes when the test says
    rt = runtime(clock=clock, auto_dispatch=True)
    doomed = agents("node-a", run=Run(seconds=30))
    vouch(rt, doomed)
    t = create(rt, policy={"timeout_sec": 60})
    assert doomed.wait_for_runs(1)
    first = task(rt, t["id"])
    lease = rt.engine.leases.get(first["lease_id"])
    doomed.kill()
    assert wait_for(lambda: task(rt, t["id"])["delivery"]["state"] == "unknown", what="the delivery's outcome")
    survivor = agents("node-b", run=Run(output="second run"))
    vouch(rt, survivor)
    assert task(rt, t["id"])["status"] == "running"  # nobody runs it twice while the first run may go on
    clock.advance(lease.ttl_seconds * 1000 + 1)  # the TTL passes; the sweep (every 0.1 s) requeues it
    done = wait_for(lambda: (v := task(rt, t["id"]))["status"] == "completed" and v, timeout_s=20, what="re-dispatched")
    assert done["worker_id"] == "node-b" and done["attempts"] == 2
    assert rt.engine.leases.get(lease.id).status == "expired"
    assert executions_by_task(doomed, survivor) == {t["id"]: 2}


def test_a_down_agent_costs_no_attempt_and_the_task_goes_elsewhere(runtime, agents):
    rt = runtime(auto_dispatch=True)
    down = agents("node-a")
    vouch(rt, down, capabilities={"max_concurrency": 8})  # most free room: picked first
    down.refuse()
    up = agents("node-b")
    vouch(rt, up)
    ids = [create(rt, max_attempts=1)["id"] for _ in range(4)]
    wait_for(lambda: all_done(rt, ids), timeout_s=30, what="all completed by node-b")
    assert all(task(rt, i)["attempts"] == 1 and task(rt, i)["worker_id"] == "node-b" for i in ids)
    unreachable = [e for e in rt.api("GET", "/audit", params={"limit": 1000}).json() if e["action"] == "dispatch_unreachable"]
    assert unreachable and down.requests == []


def test_a_mixed_fleet_pushes_and_pulls_from_one_queue(runtime, agents):
    rt = runtime(auto_dispatch=True)
    pusher = agents("node-push")
    vouch(rt, pusher)
    assert rt.api("POST", "/workers", json={"name": "puller", "capabilities": {"max_concurrency": 4, "labels": ["gpu"]}}).status_code == 201
    pushed = [create(rt)["id"] for _ in range(5)]
    pulled = [create(rt, labels=["gpu"])["id"] for _ in range(3)]  # no push worker has the label
    wait_for(lambda: all_done(rt, pushed), what="pushed tasks done")
    assert all(task(rt, i)["status"] == "queued" for i in pulled)
    for _ in pulled:
        r = rt.api("POST", "/workers/puller/claim", json={"wait_seconds": 5})
        assert r.status_code == 200 and r.json()["task"]["labels"] == ["gpu"]
        grant = r.json()
        assert rt.api("POST", f"/llm-tasks/{grant['task']['id']}/complete",
                      json={"status": "success", "output": "pulled", "lease_token": grant["lease_token"]}).status_code == 200
    assert all_done(rt, pulled)
    assert sorted(executions_by_task(pusher)) == sorted(pushed)


def test_a_self_registered_agent_gets_no_pushes_until_vouched_for(runtime, agents):
    rt = runtime(auto_dispatch=True)
    agent = agents()
    assert agent.register(rt.url) == 401  # without RUNTIME_API_KEY in its environment, the runtime refuses it
    assert rt.api("POST", "/workers", json=agent.registration()).status_code == 201
    t = create(rt)
    rt.engine.dispatch.plan_once()
    assert agent.requests == [] and task(rt, t["id"])["status"] == "queued"
    vouch(rt, agent)
    wait_for(lambda: task(rt, t["id"])["status"] == "completed", what="pushed once vouched for")


@pytest.mark.postgres
def test_two_engine_processes_on_one_database_never_dispatch_a_task_twice(pg_url, agents):
    truncate_pg(pg_url)
    settings = {**FAST, "database_url": pg_url, "auto_dispatch": True}
    with RuntimeServer(**settings) as one, RuntimeServer(**settings) as two:
        fleet = [agents(f"node-{i}", run=Run(seconds=0.01)) for i in range(3)]
        for agent in fleet:
            assert one.api("POST", "/workers", json={**agent.registration(), "capabilities": {"max_concurrency": 4}}).status_code == 201
        ids = [(one if i % 2 else two).api("POST", "/llm-tasks", json={"context_id": f"c{i}", "agent_slug": "a",
                                                                      "prompt": f"p{i}"}).json()["id"] for i in range(40)]
        wait_for(lambda: all(one.api("GET", f"/llm-tasks/{i}").json()["status"] == "completed" for i in ids),
                 timeout_s=60, what="all completed")
        assert executions_by_task(*fleet) == dict.fromkeys(ids, 1)
        actors = {e["actor"] for e in one.api("GET", "/audit", params={"limit": 1000}).json() if e["action"] == "task_leased"}
        assert actors == {"auto-dispatch"}


def test_dispatch_without_a_callback_url_is_503_and_changes_nothing(tmp_path):
    from bloom_runtime.engine.engine import Engine
    from bloom_runtime.engine.errors import MembridgeUnavailable
    from bloom_runtime.engine.models import NewTask
    from bloom_runtime.engine.settings import Settings

    # Served on a public address with no RUNTIME_PUBLIC_URL (allowed only for a pull-only fleet).
    with Engine.start(Settings(database_url="sqlite:///" + str(tmp_path / "x.db"), host="10.1.2.3", auto_dispatch=False,
                               agent_probe_interval_s=0)) as engine:
        task, _ = engine.tasks.create(NewTask(context_id="c", agent_slug="a", prompt="p"))
        with pytest.raises(MembridgeUnavailable, match="RUNTIME_PUBLIC_URL"):
            engine.dispatch.dispatch(task.id)
        assert engine.tasks.get(task.id).status == "queued" and engine.leases.list().items == []


def test_health_and_metrics_show_the_deliveries(runtime, agents):
    rt = runtime()
    agent = agents()
    vouch(rt, agent)
    t = create(rt)
    rt.api("POST", f"/llm-tasks/{t['id']}/dispatch", json={"wait_seconds": 10})
    health = rt.api("GET", "/health").json()["dispatch"]
    assert health["deliveries"]["answered"] == 1 and health["in_flight"] == 0 and health["auto_dispatch"] is False
    metrics = rt.api("GET", "/metrics").text
    assert 'bloom_dispatch_deliveries_total{state="answered"} 1.0' in metrics and "bloom_dispatch_in_flight 0.0" in metrics
