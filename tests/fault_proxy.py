"""A TCP proxy between the runtime and its database that a test can break on purpose.

    proxy = FaultProxy("127.0.0.1", 5432)      # listens on a free loopback port
    url = proxy.url_for("postgresql://bloom@127.0.0.1:5432/db")   # the same URL through the proxy
    proxy.hang()      # stop forwarding; nothing is closed (a hung server, or a path that swallows packets)
    proxy.forward()   # resume: what was sent meanwhile is delivered, new connections are accepted
    proxy.reset()     # close every open connection at once (RST), keep accepting new ones
    proxy.refuse()    # stop listening (connection refused) and reset the open connections
    proxy.close()     # stop the proxy; returns once its thread has ended

Modes:
- ``forward``: bytes flow both ways.
- ``hang``: no socket is read, written, accepted or closed. The runtime's kernel still
  gets TCP acknowledgements from ours, so neither TCP keepalives nor ``tcp_user_timeout``
  notice anything: only a client-side bound on each wait ends the wait. New connection
  attempts complete their TCP handshake in the listen backlog and then wait too.
- ``refuse``: the listening socket is closed; ``forward()`` listens on the same port again.

One thread runs a selector loop over every socket; a mode change is applied by that
thread and the call returns once it has been (bounded wait). No other thread touches a
socket, so there is no locking around them.
"""

from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
from urllib.parse import urlsplit, urlunsplit

CHUNK_BYTES = 65_536
BUFFER_LIMIT_BYTES = 4 << 20  # stop reading a side whose data the other side has not taken yet
COMMAND_TIMEOUT_S = 5.0  # longest a mode change or close waits for the loop thread
UPSTREAM_CONNECT_TIMEOUT_S = 2.0  # the upstream is local; this only bounds odd cases
IDLE_WAKE_S = 1.0


class _Pair:
    """A client connection and its upstream connection, with the bytes each has yet to receive."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.to_client = bytearray()
        self.to_upstream = bytearray()

    def buffers(self, sock: socket.socket) -> tuple[bytearray, bytearray]:
        """The buffer ``sock`` reads into (the other side's) and the one it writes from."""
        if sock is self.client:
            return self.to_upstream, self.to_client
        return self.to_client, self.to_upstream


class FaultProxy:
    """Forwards ``host:port`` (loopback, free port by default) to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._listener: socket.socket | None = self._listen(port)
        self.port: int = self._listener.getsockname()[1]
        self.mode = "forward"
        self.accepted = 0  # connections accepted so far (tests wait on it)
        self._pairs: dict[socket.socket, _Pair] = {}
        self._interest: dict[socket.socket, int] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._commands: queue.SimpleQueue[tuple[str, threading.Event]] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    # --- control (any thread) -----------------------------------------------------

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = (user + "@" if user else "") + f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def forward(self) -> None:
        self._command("forward")

    def hang(self) -> None:
        self._command("hang")

    def reset(self) -> None:
        self._command("reset")

    def refuse(self) -> None:
        self._command("refuse")

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def close(self) -> None:
        """Close every socket and end the loop thread. Idempotent."""
        if self._thread.is_alive():
            self._command("close")
            self._thread.join(COMMAND_TIMEOUT_S)
            if self._thread.is_alive():
                raise RuntimeError("fault proxy thread did not end")
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, name: str) -> None:
        done = threading.Event()
        self._commands.put((name, done))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the loop woke on its own, took the command and ended (a close) before this wake-up
        if not done.wait(COMMAND_TIMEOUT_S):
            raise RuntimeError(f"fault proxy did not apply {name!r} in time")

    # --- the loop (its own thread) ------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        try:
            while not self._closed:
                self._update_interest()
                for key, mask in self._selector.select(timeout=IDLE_WAKE_S):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        self._drain_wakeups()
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._pairs:  # may have been closed by an earlier event of this round
                        self._service(sock, mask)
                self._apply_commands()
        finally:
            self._reset_all()
            self._close_listener()
            self._selector.close()
            self._wake_r.close()
            self._apply_commands()  # release anyone still waiting on a command

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _apply_commands(self) -> None:
        while True:
            try:
                name, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if name == "close":
                self._closed = True
            elif name == "reset":
                self._reset_all()
            elif name == "refuse":
                self._reset_all()
                self._close_listener()
                self.mode = "refuse"
            elif name == "hang":
                self.mode = "hang"
            elif name == "forward":
                if self._listener is None:
                    self._listener = self._listen(self.port)
                self.mode = "forward"
            done.set()

    def _want(self, sock: socket.socket) -> int:
        if self.mode != "forward":
            return 0
        if sock is self._listener:
            return selectors.EVENT_READ
        inbound, outbound = self._pairs[sock].buffers(sock)
        return (selectors.EVENT_READ if len(inbound) < BUFFER_LIMIT_BYTES else 0) | (selectors.EVENT_WRITE if outbound else 0)

    def _update_interest(self) -> None:
        socks = list(self._pairs)
        if self._listener is not None:
            socks.append(self._listener)
        for sock in socks:
            want, have = self._want(sock), self._interest.get(sock, 0)
            if want == have:
                continue
            if not have:
                self._selector.register(sock, want)
            elif not want:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, want)
            self._interest[sock] = want

    def _forget(self, sock: socket.socket) -> None:
        if self._interest.pop(sock, 0):
            self._selector.unregister(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=UPSTREAM_CONNECT_TIMEOUT_S)
        except OSError:
            _abort(client)
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, upstream)
        self._pairs[client] = self._pairs[upstream] = pair
        self.accepted += 1

    def _service(self, sock: socket.socket, mask: int) -> None:
        pair = self._pairs[sock]
        inbound, outbound = pair.buffers(sock)
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(CHUNK_BYTES)
                if not data:
                    self._drop(pair)
                    return
                inbound += data
            if mask & selectors.EVENT_WRITE and outbound:
                sent = sock.send(outbound)
                del outbound[:sent]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pair)

    def _drop(self, pair: _Pair, *, hard: bool = False) -> None:
        for sock in (pair.client, pair.upstream):
            self._forget(sock)
            self._pairs.pop(sock, None)
            if hard:
                _abort(sock)
            else:
                sock.close()

    def _reset_all(self) -> None:
        for pair in {id(p): p for p in self._pairs.values()}.values():
            self._drop(pair, hard=True)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._forget(self._listener)
            self._listener.close()
            self._listener = None


def _abort(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN, as a crashed peer or a dropped route would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
