"""The fault proxy itself, against a local echo server: each mode does what it says."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import psycopg
import pytest

from .fault_proxy import FaultProxy

TIMEOUT_S = 5.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    echo = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=echo.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with FaultProxy("127.0.0.1", echo.server_address[1]) as p:
            yield p
    finally:
        echo.shutdown()
        echo.server_close()
        thread.join(TIMEOUT_S)


def _connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT_S)


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_forward_then_hang_then_forward_delivers_what_waited(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _roundtrip(sock, b"hello") == b"hello"
        proxy.hang()
        sock.settimeout(0.3)
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):
            sock.recv(10)  # nothing comes back, and nothing is closed
        proxy.forward()
        sock.settimeout(TIMEOUT_S)
        assert sock.recv(10) == b"held"


def test_hang_holds_new_connections_until_forward(proxy: FaultProxy) -> None:
    proxy.hang()
    with _connect(proxy) as sock:  # the kernel completes the handshake; the proxy does not answer
        sock.settimeout(0.3)
        sock.sendall(b"early")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.forward()
        sock.settimeout(TIMEOUT_S)
        assert sock.recv(10) == b"early"


def test_reset_closes_open_connections_and_accepts_new_ones(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _roundtrip(sock, b"x") == b"x"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"y")
            if not sock.recv(10):
                raise ConnectionResetError
    assert proxy.open_connections == 0
    with _connect(proxy) as sock:
        assert _roundtrip(sock, b"again") == b"again"


def test_refuse_stops_listening_and_forward_listens_again(proxy: FaultProxy) -> None:
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    proxy.forward()
    with _connect(proxy) as sock:
        assert _roundtrip(sock, b"back") == b"back"


def test_close_ends_the_thread_and_is_idempotent(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        _roundtrip(sock, b"z")
        proxy.close()
        try:
            assert not sock.recv(10)  # the proxy closed its side
        except ConnectionResetError:
            pass
    proxy.close()
    assert not any(t.name == f"fault-proxy-{proxy.port}" for t in threading.enumerate())


@pytest.mark.postgres
def test_postgres_through_the_proxy(proxied_pg_url: str, fault_proxy: FaultProxy) -> None:
    with psycopg.connect(proxied_pg_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert fault_proxy.accepted == 1
