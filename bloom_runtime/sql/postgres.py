"""The PostgreSQL store: psycopg 3, a connection pool, every statement by name.

This module holds the store's lifecycle (pool, migrations) and its reads. Its
connections, and the bounds on every wait for the server, are ``pg_connection.py``'s;
the cross-process wake-ups ``pg_listener.py``'s; writes go through
``PostgresTransaction`` (see ``pg_transaction.py`` for the write path and its lock order).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from bloom_runtime.engine.errors import ConfigError, InvalidInput, NotFound, StoreUnavailable
from bloom_runtime.engine.models import (
    LEASE_STATUSES,
    TASK_STATUSES,
    UNFINISHED_STATUSES,
    WORKER_STATUSES,
    Delivery,
    HistoryPoint,
    Lease,
    Page,
    Result,
    Task,
    Worker,
)
from bloom_runtime.sql import adopt
from bloom_runtime.sql import cursor as cursors
from bloom_runtime.sql import migrate as migrations
from bloom_runtime.sql.pg_connection import BoundedConnection, connect_once, parse_url, session_params
from bloom_runtime.sql.pg_errors import reason as _reason
from bloom_runtime.sql.pg_errors import session_lost as _session_lost
from bloom_runtime.sql.pg_errors import translate as _translate
from bloom_runtime.sql.pg_errors import translating as _translating
from bloom_runtime.sql.pg_listener import TaskListener
from bloom_runtime.sql.pg_messages import PREPARED_READS, Q, read_prepared
from bloom_runtime.sql.pg_records import (
    RawJsonbLoader,
    artifact_record,
    audit_record,
    delivery_record,
    encode,
    lease_record,
    result_record,
    task_record,
    to_json,
    worker_row,
)
from bloom_runtime.sql.pg_transaction import PostgresTransaction
from bloom_runtime.sql.queries import AUDIT_QUERIES, SEARCH_QUERIES
from bloom_runtime.sql.store import MAX_PAGE, Store, history_point

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "bloom_tasks"
POOL_GETCONN_TIMEOUT_S = 10.0  # how long a write waits for a free pooled connection
READ_POOL_WAIT_S = 2.0  # how long a read waits for one: a busy or hung database answers 503 soon
PING_TIMEOUT_S = 0.5  # /health's ping, pool wait included: /health answers within a second
CHECK_TIMEOUT_S = 1.0  # the check of an idle connection before lending it
IO_GRACE_S = 1.0  # a round trip may take the statement timeout plus this before we give up on it
# A connection handed back less than this long ago is lent out again unchecked: it
# answered moments ago, and a check is one more round trip on every batch and read.
POOL_CHECK_IDLE_S = 1.0
OPEN_RETRY_INITIAL_S = 0.05  # first pause between connection attempts in open()
OPEN_RETRY_MAX_S = 1.0
POOL_FILL_MIN_S = 0.2  # filling the pool after a successful probe gets at least this
# The pool retries a lost connection with doubling pauses until this long has passed,
# then leaves the slot to the next caller that needs one (which tries at once). Its
# default (5 min) let the pauses grow past a minute: the pool refilled long after
# the database was back.
RECONNECT_TIMEOUT_S = 10.0
# First page of a keyset listing: every real row sorts below this bound.
_FIRST_PAGE = (2**63 - 1, "")


def _page_args(limit: int, cursor: str | None) -> dict[str, Any]:
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    after_at, after_id = cursors.decode(cursor) if cursor is not None else _FIRST_PAGE
    return {"after_at": after_at, "after_id": after_id, "limit": limit + 1}


def _page(items: list[Any], limit: int, key: Callable[[Any], int]) -> Page:
    if len(items) > limit:
        del items[limit:]
        last = items[-1]
        return Page(items=items, next_cursor=cursors.encode(key(last), last.id))
    return Page(items=items, next_cursor=None)


class PostgresStore(Store):
    """A ``Store`` on PostgreSQL through a psycopg connection pool."""

    kind = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 2,
        pool_max: int = 10,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float | None = 5.0,
    ) -> None:
        if not 1 <= pool_min <= pool_max:
            raise ConfigError("pool sizes must satisfy 1 <= pool_min <= pool_max")
        self._params, self._where = parse_url(url)
        self._url = url
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout_s = connect_timeout_s
        # libpq counts connect_timeout in whole seconds and treats anything below 2 as 2.
        self._connect_timeout = max(2, round(connect_timeout_s))
        # None or 0: statements are not bounded, by the server or by us.
        self._statement_timeout_s = statement_timeout_s or None
        self._io_timeout_s = self._statement_timeout_s + IO_GRACE_S if self._statement_timeout_s else None
        self._session = session_params(self._params, self._io_timeout_s)
        self._pool: ConnectionPool[BoundedConnection] | None = None
        self._lock = threading.Lock()
        self._returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()
        self._prepared: weakref.WeakKeyDictionary[psycopg.Connection[Any], set[str]] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"PostgresStore({self._where})"

    # --- lifecycle -----------------------------------------------------------

    def _configure(self, conn: BoundedConnection) -> None:
        conn.adapters.register_loader("jsonb", RawJsonbLoader)
        # The store prepares the statements it runs often itself (SCRIPTED). The driver's
        # own cache must stay off: after any rollback it deallocates every prepared
        # statement of the session, ours included, and the next batch would fail.
        conn.prepare_threshold = None
        conn.io_timeout_s = self._io_timeout_s
        if self._statement_timeout_s:
            with conn.bounded(io_timeout_s=CHECK_TIMEOUT_S + self._connect_timeout):
                conn.execute(Q["set_statement_timeout"], {"ms": str(round(self._statement_timeout_s * 1000))})

    def _live(self, conn: BoundedConnection, deadline: float | None) -> bool:
        """Whether a pooled connection can be used. One handed back moments ago is lent
        as it is (a check is one more round trip on every batch and read); should its
        session have died meanwhile, the server's answer says so and nothing is lost
        (see ``SessionLost``). The check of the others is bounded, by the caller's
        ``deadline`` too: /health must not wait out a full check."""
        if conn.closed or conn.broken:
            return False
        returned = self._returned_at.get(conn)
        if returned is not None and time.monotonic() - returned < POOL_CHECK_IDLE_S:
            return True
        try:
            with conn.bounded(deadline=deadline, io_timeout_s=CHECK_TIMEOUT_S):
                ConnectionPool.check_connection(conn)
        except psycopg.Error:
            return False
        return True

    def _probe(self, deadline: float) -> None:
        """Connect directly until ``deadline`` and no later, so a failure can name its reason."""
        conninfo = make_conninfo(self._url, **self._session).encode()
        pause = OPEN_RETRY_INITIAL_S
        while True:
            remaining = deadline - time.monotonic()
            failure = connect_once(conninfo, min(self._connect_timeout_s, max(remaining, 0.0)))
            if failure is None:
                return
            reason = _reason(failure)
            permanent = any(
                s in reason for s in ("authentication failed", "does not exist", "no pg_hba.conf entry", "invalid")
            )
            remaining = deadline - time.monotonic()
            if permanent or remaining <= 0:
                raise StoreUnavailable(f"cannot connect to PostgreSQL at {self._where}: {reason}") from failure
            time.sleep(min(pause, remaining))  # backoff between attempts while the server may be starting
            pause = min(pause * 2, OPEN_RETRY_MAX_S)

    def open(self, wait_s: float = 10.0) -> None:
        """Connect and fill the pool; give up with ``StoreUnavailable`` after ``wait_s``."""
        with self._lock:
            if self._pool is not None:
                return
            deadline = time.monotonic() + wait_s
            self._probe(deadline)
            pool: ConnectionPool[BoundedConnection] = ConnectionPool(
                self._url,
                connection_class=BoundedConnection,
                min_size=self._pool_min,
                max_size=self._pool_max,
                open=False,
                configure=self._configure,
                # Autocommit: a read is one round trip; writes send their own BEGIN.
                kwargs={"connect_timeout": self._connect_timeout, "autocommit": True, **self._session},
                timeout=POOL_GETCONN_TIMEOUT_S,
                reconnect_timeout=RECONNECT_TIMEOUT_S,
                name="bloom-runtime",
            )
            try:
                # The server answered the probe: filling the pool takes moments, unless it
                # stopped answering since, and then the wait must still end on time.
                pool.open(wait=True, timeout=max(deadline - time.monotonic(), POOL_FILL_MIN_S))
            except PoolTimeout as exc:
                pool.close(timeout=0)
                raise StoreUnavailable(f"cannot connect to PostgreSQL at {self._where}: pool did not fill in time") from exc
            self._pool = pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextlib.contextmanager
    def _conn(self, pool_wait_s: float | None = None, deadline: float | None = None) -> Iterator[BoundedConnection]:
        """A live pooled connection, waited for up to ``pool_wait_s`` (None: the pool's
        ``POOL_GETCONN_TIMEOUT_S``); ``deadline`` (``time.monotonic()``) bounds its whole use."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        give_up = time.monotonic() + (POOL_GETCONN_TIMEOUT_S if pool_wait_s is None else pool_wait_s)
        if deadline is not None:
            give_up = min(give_up, deadline)
        # Dead connections (the server restarted, or terminated their sessions) are
        # dropped here rather than by the pool's check, which pauses a second or more
        # after each failed one; the pool opens replacements in the background.
        for _ in range(self._pool_max + 1):
            conn = pool.getconn(timeout=max(give_up - time.monotonic(), 0.0))
            if self._live(conn, give_up):
                break
            conn.close()
            pool.putconn(conn)
        else:
            raise StoreUnavailable(f"no live PostgreSQL connection to {self._where}")
        try:
            with conn, conn.bounded(deadline=deadline):  # as pool.connection(): ends a transaction left open
                yield conn
        finally:
            # Not the pool's reset hook: with one, the pool returns every connection
            # through its worker thread.
            self._returned_at[conn] = time.monotonic()
            lost = conn.broken and not conn.gave_up
            pool.putconn(conn)
            if lost:
                # A lost session seldom comes alone (a restart, sessions terminated
                # together): check the idle ones before the retry takes one. Not after
                # a server that did not answer: each check would wait as long again.
                pool.check()

    @_translating
    def migrate(self) -> list[str]:
        applied: list[str] = []
        with self._conn() as conn:
            # A migration may take long (an index on a large table, adopting the first
            # version's tables), and so may waiting for another process's: neither is
            # bounded, by the server or by us.
            bound, conn.io_timeout_s = conn.io_timeout_s, None
            try:
                while True:
                    # One migration per transaction, each under the advisory lock; a second
                    # migrator waits here and then finds the work done.
                    with conn.transaction():
                        conn.execute(Q["no_statement_timeout"])
                        conn.execute(Q["migrations_lock"])
                        present = adopt.first_version_tables(conn)
                        if present:
                            # The first version's tables: made 0001's, recorded as 0001, in this transaction.
                            now = time.time_ns() // 1_000_000
                            report = adopt.adopt(conn, present, now)
                            conn.execute(Q["create_schema_migrations"])
                            conn.execute(Q["record_migration"], {"version": adopt.ADOPTED_AS, "now": now})
                            conn.execute(Q["insert_audit"], {"rows": encode(report.entries).decode()})
                            applied.append(f"{adopt.ADOPTED_AS} (adopted from the first version's tables)")
                            continue
                        conn.execute(Q["create_schema_migrations"])
                        done = {r[0] for r in conn.execute(Q["applied_migrations"]).fetchall()}
                        todo = migrations.pending("postgres", done)
                        if not todo:
                            return applied
                        step = todo[0]
                        conn.execute(step.sql.encode(), prepare=False)
                        conn.execute(Q["record_migration"], {"version": step.version, "now": time.time_ns() // 1_000_000})
                    log.info("applied migration %s", step.version)
                    applied.append(step.version)
            finally:
                conn.io_timeout_s = bound

    @_translating
    def check_schema(self) -> None:
        with self._conn() as conn:
            done: set[str] = set()
            exists = conn.execute(Q["schema_migrations_exists"]).fetchone()
            if exists is not None and exists[0]:
                done = {r[0] for r in conn.execute(Q["applied_migrations"]).fetchall()}
        todo = migrations.pending("postgres", done)
        if todo:
            raise StoreUnavailable(
                f"database schema has {len(todo)} pending migration(s); run `bloom-runtime migrate`",
                pending=[m.version for m in todo],
            )

    @_translating
    def ping(self) -> None:
        """``SELECT 1``, answered within ``PING_TIMEOUT_S`` (``StoreTimeout`` otherwise)."""
        with self._conn(pool_wait_s=PING_TIMEOUT_S, deadline=time.monotonic() + PING_TIMEOUT_S) as conn:
            conn.execute(Q["ping"]).fetchone()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        try:
            with self._conn() as conn:
                tx = PostgresTransaction(conn, self._where, self._prepared.setdefault(conn, set()))
                try:
                    yield tx
                    tx.commit()
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        tx.rollback()
                    raise
        except psycopg.Error as exc:
            raise _translate(exc, self._where) from exc

    def listen(self, callback: Callable[[], None], stop_event: threading.Event) -> None:
        """Call ``callback()`` on every ``bloom_tasks`` notification until ``stop_event`` is set.

        Blocks: run it on a thread of its own. See ``TaskListener``."""
        TaskListener(self._url, callback, connect_timeout_s=self._connect_timeout, session=self._session).run(stop_event)

    # --- reads ---------------------------------------------------------------

    def _read(self, name: str, params: dict[str, Any], fetch: Callable[[psycopg.Cursor[Any]], Any]) -> Any:
        """Run a read, waiting ``READ_POOL_WAIT_S`` at most for a connection; once more on
        another connection if the session was lost (a read changes nothing, so running it
        twice is harmless), but not after a server that did not answer in time."""
        try:
            with self._conn(pool_wait_s=READ_POOL_WAIT_S) as conn:
                return fetch(self._execute(conn, name, params))
        except psycopg.Error as exc:
            if not _session_lost(exc):  # a lost session, or one that lost its prepared statements
                raise
        with self._conn(pool_wait_s=READ_POOL_WAIT_S) as conn:
            return fetch(self._execute(conn, name, params))

    def _execute(self, conn: BoundedConnection, name: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        if name not in PREPARED_READS:
            return conn.execute(Q[name], params)
        return read_prepared(conn, self._prepared.setdefault(conn, set()), name, params)

    def _read_one(self, name: str, params: dict[str, Any]) -> Any:
        return self._read(name, params, psycopg.Cursor.fetchone)

    def _read_all(self, name: str, params: dict[str, Any]) -> list[Any]:
        return self._read(name, params, psycopg.Cursor.fetchall)

    @_translating
    def get_task(self, task_id: str) -> Task:
        row = self._read_one("get_task", {"id": task_id})
        if row is None:
            raise NotFound("task not found", task_id=task_id)
        return task_record(row)

    @_translating
    def get_task_by_idempotency_key(self, key: str) -> Task | None:
        row = self._read_one("get_task_by_idempotency_key", {"key": key})
        return task_record(row) if row is not None else None

    @_translating
    def list_tasks(self, status: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if status is None:
            rows = self._read_all("list_tasks", args)
        else:
            rows = self._read_all("list_tasks_by_status", {**args, "status": status})
        return _page([task_record(r) for r in rows], limit, lambda t: t.created_at)

    @_translating
    def get_lease(self, lease_id: str) -> Lease:
        row = self._read_one("get_lease", {"id": lease_id})
        if row is None:
            raise NotFound("lease not found", lease_id=lease_id)
        return lease_record(row)

    @_translating
    def list_leases(self, status: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if status is None:
            rows = self._read_all("list_leases", args)
        else:
            rows = self._read_all("list_leases_by_status", {**args, "status": status})
        return _page([lease_record(r) for r in rows], limit, lambda lease: lease.started_at)

    @_translating
    def get_worker(self, worker_id: str) -> Worker:
        row = self._read_one("get_worker", {"id": worker_id})
        if row is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return worker_row(row)

    @_translating
    def list_workers(self, status: str | None = None) -> list[Worker]:
        if status is None:
            rows = self._read_all("list_workers", {})
        else:
            rows = self._read_all("list_workers_by_status", {"status": status})
        return [worker_row(r) for r in rows]

    @_translating
    def worker_leases(self, worker_id: str) -> list[Lease]:
        return [lease_record(r) for r in self._read_all("worker_leases", {"worker_id": worker_id, "limit": MAX_PAGE})]

    @_translating
    def worker_candidates(self, labels: Sequence[str]) -> list[Worker]:
        rows = self._read_all("worker_candidates", {"labels": to_json(list(labels))})
        return [worker_row(r) for r in rows]

    @_translating
    def active_lease_owners(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._read_all("active_lease_owners", {})]

    @_translating
    def sticky_workers(self, context_id: str) -> set[str]:
        return {r[0] for r in self._read_all("sticky_workers", {"context_id": context_id})}

    @_translating
    def list_artifacts(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if task_id is None:
            rows = self._read_all("list_artifacts", args)
        else:
            rows = self._read_all("list_artifacts_by_task", {**args, "task_id": task_id})
        return _page([artifact_record(r) for r in rows], limit, lambda a: a.created_at)

    @_translating
    def list_results(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if task_id is None:
            rows = self._read_all("list_results", args)
        else:
            rows = self._read_all("list_results_by_task", {**args, "task_id": task_id})
        return _page([result_record(r) for r in rows], limit, lambda r: r.completed_at)

    @_translating
    def get_result(self, task_id: str) -> Result:
        row = self._read_one("latest_result", {"task_id": task_id})
        if row is None:
            raise NotFound("no result for task", task_id=task_id)
        return result_record(row)

    @_translating
    def list_audit(self, limit: int, cursor: str | None, entity_id: str | None = None, action: str | None = None) -> Page:
        args = {**_page_args(limit, cursor), "entity_id": entity_id, "action": action}
        rows = self._read_all(AUDIT_QUERIES[entity_id is not None, action is not None], args)
        return _page([audit_record(r) for r in rows], limit, lambda e: e.timestamp)

    @_translating
    def get_settings(self) -> dict[str, str]:
        return dict(self._read_all("get_settings", {}))

    @_translating
    def due_tasks(self, now: int, limit: int) -> list[Task]:
        return [task_record(r) for r in self._read_all("due_tasks", {"now": now, "limit": limit})]

    @_translating
    def latest_delivery(self, task_id: str) -> Delivery | None:
        row = self._read_one("latest_delivery", {"task_id": task_id})
        return delivery_record(row) if row is not None else None

    @_translating
    def worker_trust(self) -> dict[str, str]:
        return dict(self._read_all("worker_trust", {}))

    @_translating
    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {
            "tasks": dict.fromkeys(TASK_STATUSES, 0),
            "leases": dict.fromkeys(LEASE_STATUSES, 0),
            "workers": dict.fromkeys(WORKER_STATUSES, 0),
        }
        for kind, status, count in self._read_all("stats", {}):
            out[kind][status] = count
        return out

    # --- the read side of operators' tools -----------------------------------

    @_translating
    def search_tasks(self, field: str, value: str, statuses: Sequence[str], limit: int, cursor: str | None) -> Page:
        args = {**_page_args(limit, cursor), "value": value, "statuses": list(statuses)}
        rows = self._read_all(SEARCH_QUERIES[field], args)
        return _page([task_record(r) for r in rows], limit, lambda t: t.created_at)

    @_translating
    def list_task_leases(self, task_ids: Sequence[str], status: str | None, limit: int, cursor: str | None) -> Page:
        args = {**_page_args(limit, cursor), "task_ids": list(task_ids), "status": status}
        rows = self._read_all("leases_of_tasks", args)
        return _page([lease_record(r) for r in rows], limit, lambda lease: lease.started_at)

    @_translating
    def list_expired_leases(self, limit: int, cursor: str | None) -> Page:
        rows = self._read_all("list_expired_leases", _page_args(limit, cursor))
        return _page([lease_record(r) for r in rows], limit, lambda lease: lease.expires_at)

    @_translating
    def live_depth(self) -> dict[str, int]:
        return {**dict.fromkeys(UNFINISHED_STATUSES, 0), **dict(self._read_all("live_depth", {}))}

    @_translating
    def oldest_queued(self) -> tuple[str, int] | None:
        row = self._read_one("oldest_queued", {})
        return (row[0], row[1]) if row is not None else None

    @_translating
    def activity(self, since: int, until: int) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for kind, minute, count in self._read_all("activity", {"since": since, "until": until}):
            out.setdefault(minute, {})[kind] = count
        return out

    @_translating
    def last_history_minute(self) -> int | None:
        row = self._read_one("last_history_minute", {})
        return row[0] if row is not None else None

    @_translating
    def history(self, since: int, until: int) -> list[HistoryPoint]:
        rows = self._read_all("history", {"since": since, "until": until})
        return [history_point(r) for r in rows]
