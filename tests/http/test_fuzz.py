"""A bounded property run over the write endpoints: arbitrary JSON never yields a 5xx."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import new_task

API = "/api/runtime"

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
FIELDS = ["status", "output", "error_message", "metrics", "lease_id", "worker_id", "ttl_seconds", "wait_seconds",
          "context_id", "agent_slug", "prompt", "policy", "labels", "max_attempts", "name", "capabilities", "retryable"]
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6) | values
paths = st.sampled_from([
    "llm-tasks", "llm-tasks/{t}/lease", "llm-tasks/{t}/heartbeat", "llm-tasks/{t}/complete",
    "workers", "workers/w1/claim", "llm-tasks/{t}/requeue", "llm-tasks/{t}/cancel",
])
queries = st.dictionaries(st.sampled_from(["status", "limit", "cursor", "task_id", "entity_id"]), st.text(max_size=20), max_size=3)


def test_fuzz_no_5xx(make_client):
    client = make_client()
    client.simulate_post(f"{API}/workers", json={"name": "w1", "capabilities": {"max_concurrency": 32}})
    tid = client.simulate_post(f"{API}/llm-tasks", json=new_task()).json["id"]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=paths, body=bodies)
    def post(path: str, body: object) -> None:
        if path == "workers/w1/claim" and isinstance(body, dict):
            body.pop("wait_seconds", None)  # keep the run fast: no long polls
        r = client.simulate_post(f"{API}/{path.format(t=tid)}", json=body)
        assert r.status_code < 500 or (r.status_code == 503 and "capacity" in r.json["error"]), (path, body, r.text)
        assert isinstance(r.json, (dict, list)) or r.status_code == 204

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=st.sampled_from(["llm-tasks", "leases", "artifacts", "results", "runs", "audit", "workers"]), params=queries)
    def get(path: str, params: dict[str, str]) -> None:
        r = client.simulate_get(f"{API}/{path}", params=params)
        assert r.status_code < 500, (path, params, r.text)

    post()
    get()
