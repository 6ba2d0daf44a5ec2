"""PostgreSQL driver errors in the store's own terms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import psycopg
import psycopg.errors
from psycopg_pool import PoolTimeout

from bloom_runtime.engine.errors import BloomError, StoreFull, StoreRefused, StoreTimeout, StoreUnavailable
from bloom_runtime.sql.pg_connection import Unanswered
from bloom_runtime.sql.store import SessionLost, TransientConflict


def reason(exc: BaseException) -> str:
    """One line saying what went wrong, without SQL text."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = primary or str(exc) or type(exc).__name__
    # Connection errors repeat the target before the reason; the caller names it already.
    for prefix in ("connection failed: ",):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if " failed: " in text and text.startswith("connection to server"):
        text = text.split(" failed: ", 1)[1]
    text = text.replace("FATAL:  ", "")
    return " ".join(text.split())


# Server errors that end or empty the session: terminated, crashed or refusing
# connections, and prepared statements gone (DISCARD ALL, a pooler). Class 08 too.
SESSION_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "26000"})


def session_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the session failed rather than the statement. A server that
    did not answer in time is not a lost session: trying again would only double the wait."""
    if isinstance(exc, (PoolTimeout, Unanswered)):
        return False
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in SESSION_SQLSTATES or sqlstate.startswith("08")
    # No SQLSTATE: the driver itself lost the connection.
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def translate(exc: BaseException, where: str) -> BloomError:
    """Map a driver error onto our taxonomy (the caller chains the original). Errors of
    a message that carried a commit are classified by ``Messages.send`` before they get here."""
    if isinstance(exc, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)):
        return TransientConflict(f"PostgreSQL rolled the transaction back ({reason(exc)}); retry it")
    if isinstance(exc, Unanswered):
        return StoreTimeout(f"PostgreSQL at {where} {exc}")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return StoreTimeout(f"PostgreSQL at {where} cancelled a statement: {reason(exc)}")
    if isinstance(exc, PoolTimeout):
        return StoreTimeout(f"no PostgreSQL connection available at {where} in time")
    if isinstance(exc, psycopg.errors.DiskFull):
        return StoreFull(f"PostgreSQL at {where} cannot write: {reason(exc)}")
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        sqlstate = getattr(exc, "sqlstate", None)
        return StoreRefused(f"PostgreSQL at {where} refused a value: {reason(exc)}" + (f" (sqlstate {sqlstate})" if sqlstate else ""))
    if session_lost(exc):
        return SessionLost(f"PostgreSQL at {where} lost the session: {reason(exc)}")
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return StoreUnavailable(f"PostgreSQL at {where} is unavailable: {reason(exc)}")
    sqlstate = getattr(exc, "sqlstate", None)
    return StoreUnavailable(
        f"PostgreSQL at {where} failed: {reason(exc)}" + (f" (sqlstate {sqlstate})" if sqlstate else "")
    )


def translating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Translate driver errors raised by a store or transaction method."""

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except psycopg.Error as exc:
            raise translate(exc, self._where) from exc
        except msgspec.DecodeError as exc:
            raise StoreUnavailable(f"PostgreSQL at {self._where} holds a malformed JSON value: {exc}") from exc

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper
