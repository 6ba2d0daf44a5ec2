"""What the open /health may show, and what a client may claim about a worker."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
import requests

from .conftest import wait_for


@pytest.mark.postgres
def test_open_health_names_no_database_host_port_or_name(proxied_pg_url, fault_proxy, live_server, caplog):
    server = live_server(database_url=proxied_pg_url, lease_sweep_interval_s=0.5, db_connect_timeout_s=2.0,
                         db_statement_timeout_s=0.5)
    fault_proxy.hang()  # every job that touches the database now fails, each within about 1.5 s
    try:

        def failing() -> dict | None:
            body = requests.get(server.url + "/health", timeout=10).json()
            return body if body["jobs"]["lease_sweep"]["last_error"] else None

        body = wait_for(failing)
        parts = urlsplit(proxied_pg_url)
        text = requests.get(server.url + "/health", timeout=10).text
    finally:
        fault_proxy.forward()
    for secret in (parts.hostname, str(parts.port), parts.path.strip("/")):
        assert secret not in text, (secret, text)
    assert body["status"] == "unhealthy" and body["storage_ok"] is False
    assert body["jobs"]["lease_sweep"]["last_error"] in (
        "StoreUnavailable: storage unavailable", "StoreTimeout: storage did not answer in time"
    )
    # The operator still finds the details in the server log.
    assert any(str(parts.port) in rec.getMessage() for rec in caplog.records if "sweep" in rec.getMessage())


def test_last_heartbeat_cannot_be_set_into_the_future(make_client, db_url):
    client = make_client(database_url=db_url)
    now_ms = int(time.time() * 1000)
    for value in (2**53, now_ms + 3_600_000):
        r = client.simulate_post("/api/runtime/workers", json={"name": "w-1", "last_heartbeat": value})
        assert r.status_code == 400 and "last_heartbeat" in r.json["error"], r.text
    assert client.simulate_get("/api/runtime/workers").json == []
    # A little skew is fine, and the past always is.
    for value in (now_ms + 5_000, now_ms - 86_400_000):
        r = client.simulate_post("/api/runtime/workers", json={"name": "w-1", "last_heartbeat": value})
        assert r.status_code in (200, 201), r.text
