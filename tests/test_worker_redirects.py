"""The worker client never carries its API key across a redirect: it reports the redirect instead."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bloom_runtime.worker.client import API_KEY_HEADER, RuntimeClient, WorkerError

KEY = "worker-key-0001"


class _Recorder(BaseHTTPRequestHandler):
    """Another host: records what reaches it and answers 200 {}."""

    seen: list[dict[str, str]]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def _redirector(target: str, status: int) -> type[BaseHTTPRequestHandler]:
    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Redirect


class _Server(ThreadingHTTPServer):
    daemon_threads = False


@pytest.fixture
def servers() -> Iterator[tuple[str, list[dict[str, str]], list[_Server]]]:
    recorder = type("Rec", (_Recorder,), {"seen": []})
    other = _Server(("127.0.0.1", 0), recorder)
    started = [other]
    threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05}).start()
    try:
        yield f"http://localhost:{other.server_address[1]}", recorder.seen, started
    finally:
        for srv in started:
            srv.shutdown()
            srv.server_close()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_an_error_and_the_key_stays_home(servers, status):
    other_url, seen, started = servers
    redirect = _Server(("127.0.0.1", 0), _redirector(other_url, status))
    started.append(redirect)
    threading.Thread(target=redirect.serve_forever, kwargs={"poll_interval": 0.05}).start()
    with RuntimeClient(f"http://127.0.0.1:{redirect.server_address[1]}", KEY) as client:
        with pytest.raises(WorkerError, match=f"redirect.*{status}") as caught:
            client.register({"name": "w-1"})
        with pytest.raises(WorkerError, match="redirect"):
            client.heartbeat("t-1", "l-1", "w-1")
        with pytest.raises(WorkerError, match="redirect"):
            client.complete("t-1", {"status": "success"})
        with pytest.raises(WorkerError, match="redirect"):
            client.claim("w-1", 0, None)
    assert seen == [], f"the redirect was followed: {seen}"
    assert KEY not in str(caught.value) and other_url in str(caught.value)  # where it points, so the operator can fix the URL
    assert all(API_KEY_HEADER not in h for h in seen)
