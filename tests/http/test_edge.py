"""The HTTP edge over real sockets: hostile bodies, cursors and requests waitress itself refuses."""

from __future__ import annotations

import base64
import json
import logging
import socket

import pytest
import requests

from bloom_runtime.http.routes import ROUTES

from .conftest import new_task

BODY_ROUTES = sorted({(m, r.path) for r in ROUTES for m, op in r.ops.items() if op.body is not None})


def _concrete(path: str, server=None) -> str:
    """``path`` with ids filled in. With ``server``, a lease token route names a real lease
    and its token, so the request gets as far as its body."""
    if server is not None and "{lease_token}" in path:
        s = requests.Session()
        s.post(server.url + "/workers", json={"name": "w-token"}).raise_for_status()
        task = s.post(server.url + "/llm-tasks", json=new_task()).json()
        grant = s.post(server.url + f"/llm-tasks/{task['id']}/lease", json={"worker_id": "w-token"}).json()
        path = path.replace("{lease_id}", grant["lease"]["id"]).replace("{lease_token}", grant["lease_token"])
        path = path.replace("{task_id}", task["id"])
    return path.replace("{task_id}", "t-1").replace("{worker_id}", "w-1").replace("{cid}", "p-1").replace("{lease_id}", "l-1")


def _json_error(r: requests.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in r.text
    return body["error"]


@pytest.fixture
def server(live_server, db_url):
    return live_server(database_url=db_url, rate_limit_per_s=0)


@pytest.fixture
def sqlite_server(live_server, tmp_path):
    return live_server(database_url=f"sqlite:///{tmp_path}/edge.db", rate_limit_per_s=0, max_body_bytes=4096)


# --- bodies -------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", BODY_ROUTES)
def test_json_nested_a_thousand_deep_is_400_on_every_route_with_a_body(sqlite_server, caplog, method, path):
    deep = "[" * 987 + "]" * 987  # about 2 KB
    body = '{"x": ' + deep + '}'
    with caplog.at_level(logging.ERROR):
        r = requests.request(method, sqlite_server.base + _concrete(path, sqlite_server), data=body,
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert "nested" in _json_error(r, 400)
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


def test_deep_metrics_are_refused_before_they_reach_the_store(server):
    s = requests.Session()
    s.post(server.url + "/workers", json={"name": "w-1"}).raise_for_status()
    task = s.post(server.url + "/llm-tasks", json=new_task()).json()
    s.post(server.url + f"/llm-tasks/{task['id']}/lease", json={"worker_id": "w-1"}).raise_for_status()
    deep: object = 1
    for _ in range(100):
        deep = [deep]
    r = s.post(server.url + f"/llm-tasks/{task['id']}/complete", json={"status": "success", "metrics": {"x": deep}})
    assert "nested" in _json_error(r, 400)
    shallow = s.post(server.url + f"/llm-tasks/{task['id']}/complete", json={"status": "success", "metrics": {"x": [[{"y": 1}]]}})
    assert shallow.status_code == 200, shallow.text


def test_a_body_without_content_type_is_415_and_an_empty_one_is_fine(sqlite_server):
    s = requests.Session()
    before = s.get(sqlite_server.url + "/stats").json()
    r = s.post(sqlite_server.url + "/llm-tasks", data=json.dumps(new_task()).encode())  # bytes: requests sets no Content-Type
    assert "Content-Type" not in r.request.headers
    assert "application/json" in _json_error(r, 415)
    assert s.get(sqlite_server.url + "/stats").json() == before
    # The membridge agent's heartbeat has no body and no Content-Type.
    empty = s.post(sqlite_server.url + "/llm-tasks/00000000-0000-0000-0000-000000000000/heartbeat", data=b"")
    assert "Content-Type" not in empty.request.headers
    assert _json_error(empty, 404) == "task not found"


# --- cursors -------------------------------------------------------------------------


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("sort_value", [2**63, 2**64 + 5, -(2**63) - 1, 10**30])
@pytest.mark.parametrize("listing", ["llm-tasks", "leases", "artifacts", "runs", "audit"])
def test_cursor_sort_value_outside_64_bits_is_400(server, listing, sort_value):
    r = requests.get(server.url + f"/{listing}", params={"cursor": _cursor([sort_value, "x"])}, timeout=10)
    assert _json_error(r, 400) == "invalid cursor"


def test_cursor_at_the_64_bit_edge_still_pages(server):
    r = requests.get(server.url + "/llm-tasks", params={"cursor": _cursor([2**63 - 1, "x"])}, timeout=10)
    assert r.status_code == 200 and r.json() == []


# --- waitress's own refusals --------------------------------------------------------------


WAITRESS_MAX_HEADER = 262_144  # waitress's default max_request_header_size
HEAD_431 = b"GET /api/runtime/stats HTTP/1.1\r\nHost: x\r\nX-Big: "


def _raw(server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        # Exactly waitress's header limit: it refuses having read every byte (unread bytes would turn its close into a reset).
        (HEAD_431.ljust(WAITRESS_MAX_HEADER, b"a"), 431),
        # Over waitress's body limit (8 x MAX_BODY_BYTES), refused from the headers alone.
        (b"POST /api/runtime/llm-tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40000\r\n\r\n", 413),
        (b"GET /api/runtime/stats HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        (b"GET /api/runtime/stats HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
        (b"POST /api/runtime/llm-tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
    ids=["431-headers", "413-over-waitress-limit", "400-invalid-header", "400-bad-content-length", "501-transfer-encoding"],
)
def test_waitress_refusals_are_our_json_errors(sqlite_server, request_bytes, status):
    code, headers, body = _raw(sqlite_server, request_bytes)
    assert code == status
    assert headers["content-type"] == "application/json", headers
    answer = json.loads(body)
    assert set(answer) == {"error"} and answer["error"] and "generated by" not in answer["error"]
