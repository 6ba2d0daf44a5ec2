"""The HTTP transport of every outgoing call (membridge control plane, worker agents).

A ``requests`` session whose connections do two things ``requests`` cannot:

- **One wall-clock deadline per attempt** for connect, headers and body. The
  socket read timeout restarts with every byte, so a peer dripping one byte
  every half second would otherwise hold the thread for ever. Inside
  ``deadline(seconds)`` every blocking socket call of this thread gets at most
  the time left (and fails at once when none is), whichever connection of the
  pool it uses.
- **The address policy on the address actually connected to.** The URL was
  checked when it was configured, but a hostname can resolve anywhere; each new
  connection resolves the host itself, drops every address
  ``urls.address_refusal`` refuses and connects only to the rest.

``abort_all()`` shuts down the sockets of calls in flight (engine stop), so no
thread waits for a slow peer's answer after the engine is gone.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from .urls import AllowList, address_refusal

Resolver = Callable[[str, int], list[tuple[Any, ...]]]

_local = threading.local()


def _system_resolver(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Bound every socket call this thread makes inside the block to ``seconds`` in total."""
    previous = getattr(_local, "deadline", None)
    until = time.monotonic() + seconds
    _local.deadline = until if previous is None else min(until, previous)
    try:
        yield _local.deadline
    finally:
        _local.deadline = previous


class DeadlineExceeded(TimeoutError):
    """The caller's wall-clock deadline passed during a socket call."""


class RefusedAddress(NewConnectionError):
    """Every address the host resolved to is one outgoing calls must not reach."""


class _DeadlineSocket:
    """A socket (plain or TLS) whose blocking calls honour the thread's deadline.

    Everything else is delegated, so urllib3 and http.client see a socket."""

    def __init__(self, sock: socket.socket, live: weakref.WeakSet[_DeadlineSocket]) -> None:
        self._sock = sock
        self._timeout = sock.gettimeout()
        live.add(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def _arm(self) -> None:
        until = getattr(_local, "deadline", None)
        if until is None:
            self._sock.settimeout(self._timeout)
            return
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("timed out (deadline passed)")
        self._sock.settimeout(remaining if self._timeout is None else min(self._timeout, remaining))

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return self._sock.recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._arm()
        return self._sock.send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()  # since Python 3.5 the timeout bounds the whole sendall
        self._sock.sendall(data, flags)

    def makefile(self, mode: str = "r", buffering: int | None = None, **_: Any) -> Any:
        # As socket.makefile, over this object, so reads go through recv_into above.
        rawmode = "".join(c for c in "rw" if c in mode) + "b"
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        self._sock._io_refs += 1  # type: ignore[attr-defined]
        if buffering == 0:
            return raw
        size = io.DEFAULT_BUFFER_SIZE if buffering is None or buffering < 0 else buffering
        if "r" in rawmode and "w" in rawmode:
            return io.BufferedRWPair(raw, raw, size)
        return io.BufferedReader(raw, size) if "r" in rawmode else io.BufferedWriter(raw, size)

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()  # type: ignore[attr-defined]

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


class _Policy:
    """What the connections of one session share: the allow-list, the resolver, the live sockets."""

    def __init__(self, allowed: AllowList | None, resolver: Resolver) -> None:
        self.allowed = allowed
        self.resolver = resolver
        self.live: weakref.WeakSet[_DeadlineSocket] = weakref.WeakSet()


def _checked_connect(conn: Any, policy: _Policy) -> socket.socket:
    """Resolve ``conn``'s host, keep the addresses the policy allows, connect to the first that answers."""
    try:
        infos = policy.resolver(conn._dns_host, conn.port)
    except socket.gaierror as exc:
        raise NewConnectionError(conn, f"Failed to resolve host: [Errno {exc.errno}] {exc.strerror}") from exc
    refusals: list[str] = []
    last: OSError | None = None
    for family, kind, proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        reason = address_refusal(ip, policy.allowed)
        if reason is not None:
            refusals.append(reason)
            continue
        sock = socket.socket(family, kind, proto)
        try:
            for opt in conn.socket_options or ():
                sock.setsockopt(*opt)
            if conn.timeout is not None:
                sock.settimeout(conn.timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    if last is not None:
        if isinstance(last, TimeoutError):
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from last
        raise NewConnectionError(conn, f"Failed to establish a new connection: {last}") from last
    if refusals:
        raise RefusedAddress(conn, f"refused: {refusals[0]}")
    raise NewConnectionError(conn, "Failed to establish a new connection: host resolved to no address")


class _Checked:
    """What both connection classes add: the address check, then the deadline on the socket."""

    policy: _Policy
    sock: Any

    def _new_conn(self) -> socket.socket:
        return _checked_connect(self, self.policy)

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock = _DeadlineSocket(self.sock, self.policy.live)


def _connection_classes(policy: _Policy) -> tuple[type[HTTPConnection], type[HTTPSConnection]]:
    plain = type("CheckedHTTPConnection", (_Checked, HTTPConnection), {"policy": policy})
    tls = type("CheckedHTTPSConnection", (_Checked, HTTPSConnection), {"policy": policy})
    return plain, tls


class _CheckedAdapter(HTTPAdapter):
    def __init__(self, policy: _Policy) -> None:
        self._policy = policy
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        plain, tls = _connection_classes(self._policy)

        class Pool(HTTPConnectionPool):
            ConnectionCls = plain

        class TlsPool(HTTPSConnectionPool):
            ConnectionCls = tls

        self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TlsPool}


class Transport:
    """A pooled session with the deadline and the address policy; thread-safe."""

    def __init__(self, allowed: AllowList | None = None, *, resolver: Resolver | None = None) -> None:
        self._policy = _Policy(allowed, resolver or _system_resolver)
        session = requests.Session()
        # No proxies or ~/.netrc: an environment proxy would see our keys, and netrc
        # could add an Authorization header we did not mean to send.
        session.trust_env = False
        adapter = _CheckedAdapter(self._policy)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.session = session

    def abort_all(self) -> None:
        """Shut down the sockets of every call in flight; they fail at once."""
        for sock in list(self._policy.live):
            sock.abort()

    def close(self) -> None:
        self.abort_all()
        self.session.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["DeadlineExceeded", "RefusedAddress", "Transport", "deadline"]
