"""PostgreSQL connections: the URL, the session settings every one gets, and waits
that are all bounded.

A server-side ``statement_timeout`` bounds a statement the server runs; it cannot help
when the server, or something on the way to it, stops answering. These bounds are
the client's own: per round trip, per use of a connection, per connection attempt.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import pq
from psycopg.abc import RV, PQGen
from psycopg.conninfo import conninfo_to_dict

from bloom_runtime.engine.errors import ConfigError

# TCP keepalives and tcp_user_timeout end a connection whose path to the server is gone
# (packets dropped, nothing acknowledged) even while no statement runs.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
MIN_TCP_USER_TIMEOUT_MS = 10_000
APPLICATION_NAME = "bloom-runtime"  # what pg_stat_activity shows for our sessions


class Unanswered(psycopg.OperationalError):
    """The server did not answer a round trip in time; the connection was closed."""


class BoundedConnection(psycopg.Connection[Any]):
    """A connection on which no wait for the server lasts longer than allowed.

    ``io_timeout_s`` bounds each round trip; ``deadline`` (``time.monotonic()``)
    bounds the whole of the current use. Past either, the connection is closed (its
    protocol state is unknown, so the pool replaces it), ``gave_up`` is set and
    ``Unanswered`` raised."""

    io_timeout_s: float | None = None
    deadline: float | None = None
    gave_up = False

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        bound = self.io_timeout_s
        if self.deadline is not None:
            left = max(self.deadline - time.monotonic(), 0.0)
            bound = left if bound is None else min(bound, left)
        if bound is None:
            return super().wait(gen, interval, timeout)
        started = time.monotonic()
        try:
            return super().wait(gen, interval, bound if timeout is None else min(bound, timeout))
        except psycopg.OperationalError:
            waited = time.monotonic() - started
            if waited < bound or (timeout is not None and timeout <= bound):
                raise  # the server answered with an error, or the caller's own timeout passed
            self.pgconn.finish()
            self.gave_up = True
            raise Unanswered(f"did not answer within {bound:.1f} s") from None

    @contextlib.contextmanager
    def bounded(self, *, deadline: float | None = None, io_timeout_s: float | None = None) -> Iterator[None]:
        """Tighten the bounds for a block (``None``: keep the current one)."""
        saved = self.deadline, self.io_timeout_s
        if deadline is not None:
            self.deadline = deadline if self.deadline is None else min(deadline, self.deadline)
        if io_timeout_s is not None:
            self.io_timeout_s = io_timeout_s if self.io_timeout_s is None else min(io_timeout_s, self.io_timeout_s)
        try:
            yield
        finally:
            self.deadline, self.io_timeout_s = saved


def parse_url(url: str) -> tuple[dict[str, Any], str]:
    """Validate a PostgreSQL URL (or libpq ``key=value`` string); return its parameters
    and a password-free label for messages."""
    if "://" in url:
        if url.split("://", 1)[0].lower() not in ("postgresql", "postgres"):
            raise ConfigError("DATABASE_URL for PostgreSQL must start with postgresql:// or postgres://")
    elif "=" not in url:
        raise ConfigError("DATABASE_URL for PostgreSQL must look like postgresql://user@host:port/dbname")
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        raise ConfigError("DATABASE_URL is not a valid PostgreSQL URL") from None
    port = params.get("port")
    if port is not None and not all(p.isdigit() and 0 < int(p) < 65536 for p in str(port).split(",")):
        raise ConfigError("DATABASE_URL has an invalid port")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    where = f"{host}:{port or 5432}/{params.get('dbname') or params.get('user') or ''}"
    return params, where


def session_params(params: dict[str, Any], io_timeout_s: float | None) -> dict[str, Any]:
    """libpq parameters every session of ours gets, unless the URL (``params``) sets them itself."""
    defaults: dict[str, Any] = {
        "application_name": APPLICATION_NAME,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": max(MIN_TCP_USER_TIMEOUT_MS, round((io_timeout_s or 0) * 1000)),
    }
    return {k: v for k, v in defaults.items() if k not in params}


def connect_once(conninfo: bytes, timeout_s: float) -> psycopg.OperationalError | None:
    """One connection attempt that gives up after ``timeout_s``; what went wrong, or None.

    Polled by hand: libpq's own connect_timeout counts whole seconds, at least 2."""
    deadline = time.monotonic() + timeout_s
    pgconn = pq.PGconn.connect_start(conninfo)
    try:
        while True:
            status = pgconn.connect_poll()
            if status == pq.PollingStatus.OK:
                return None
            if status == pq.PollingStatus.FAILED:
                return psycopg.OperationalError(pgconn.get_error_message())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Unanswered("the server did not answer in time")
            readable = [pgconn.socket] if status == pq.PollingStatus.READING else []
            writable = [] if readable else [pgconn.socket]
            select.select(readable, writable, [], remaining)
    finally:
        pgconn.finish()
