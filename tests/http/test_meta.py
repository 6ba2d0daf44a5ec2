"""Health, metrics, OpenAPI, request ids, the membridge stubs."""

from __future__ import annotations

import json

import falcon.inspect
from prometheus_client.parser import text_string_to_metric_families

from bloom_runtime.http.routes import ROUTES

from .conftest import new_task

API = "/api/runtime"


def test_health_open_and_503_when_store_down(client):
    r = client.simulate_get(f"{API}/health")
    assert r.status_code == 200
    body = r.json
    for key in ("status", "service", "version", "uptime", "storage", "storage_ok", "membridge"):
        assert key in body
    assert body["storage"] == "sqlite" and body["membridge"] == {"configured": False}

    from bloom_runtime.engine.errors import StoreUnavailable

    def down() -> None:
        raise StoreUnavailable("could not connect to db.internal:5432")

    client.engine.store.ping = down
    r = client.simulate_get(f"{API}/health")
    assert r.status_code == 503 and r.json["storage_ok"] is False and "db.internal" not in r.text


def test_request_id_echoed_or_generated(client):
    r = client.simulate_get(f"{API}/stats", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.simulate_get(f"{API}/stats", headers={"X-Request-Id": "bad id\n"})
    assert r.headers["x-request-id"] != "bad id\n" and len(r.headers["x-request-id"]) == 32


def test_metrics_parse(client):
    client.simulate_post(f"{API}/llm-tasks", json=new_task())
    client.simulate_get(f"{API}/llm-tasks/nope")
    r = client.simulate_get(f"{API}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("bloom_tasks", "bloom_leases", "bloom_workers", "bloom_active_leases", "bloom_lease_expiries",
                 "bloom_http_requests", "bloom_http_request_duration_seconds", "bloom_membridge_breaker_state"):
        assert name in families, name
    queued = [s for s in families["bloom_tasks"].samples if s.labels.get("status") == "queued"]
    assert queued[0].value == 1
    reqs = {(s.labels["route"], s.labels["status"]) for s in families["bloom_http_requests"].samples if s.name.endswith("_total")}
    assert (f"{API}/llm-tasks", "201") in reqs and (f"{API}/llm-tasks/{{task_id}}", "404") in reqs


def test_metrics_do_not_take_label_values_from_clients(client):
    """Methods outside the ones the API uses are counted as "other": a client cannot grow the label set."""
    assert client.simulate_request("TRACE", f"{API}/stats").status_code >= 400
    r = client.simulate_get(f"{API}/metrics")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    methods = {s.labels["method"] for s in families["bloom_http_requests"].samples}
    assert "other" in methods and "TRACE" not in methods


def test_openapi_documents_every_route_and_nothing_else(client):
    doc = client.simulate_get(f"{API}/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, item in doc["paths"].items() for method in item}
    mounted = {
        (route.path, m.method)
        for route in falcon.inspect.inspect_routes(client.app)
        for m in route.methods
        if not m.internal
    }
    assert documented == mounted
    # Every $ref resolves.
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in doc["components"]["schemas"]
    hb = doc["paths"][f"{API}/llm-tasks/{{task_id}}/heartbeat"]["post"]
    assert hb["requestBody"]["required"] is False
    assert doc["paths"][f"{API}/health"]["get"]["security"] == []
    assert len(ROUTES) == len(doc["paths"])


def test_membridge_stubs_answer_503(client):
    for method, path in (("GET", "/api/membridge/health"), ("POST", "/api/membridge/projects/p1/leadership/select")):
        r = client.simulate_request(method, path, json={"primary_node_id": "n1"} if path.endswith("select") else {})
        assert r.status_code == 503 and r.json["error"], path
