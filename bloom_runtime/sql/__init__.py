"""Storage: the ``Store`` interface and its PostgreSQL and SQLite implementations."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from bloom_runtime.engine.errors import ConfigError
from bloom_runtime.sql.store import Store, Transaction, TransientConflict

DEFAULT_SQLITE_FILE = "bloom-runtime.db"


def sqlite_path(url: str) -> str:
    """``sqlite:///relative.db`` → ``relative.db``; ``sqlite:////abs/x.db`` → ``/abs/x.db``."""
    path = url[len("sqlite:///"):]
    if not path:
        raise ConfigError("DATABASE_URL sqlite:/// names no file (use sqlite:///path/to/file.db)")
    return path


def store_from_url(
    url: str | None,
    *,
    pool_min: int = 2,
    pool_max: int = 10,
    connect_timeout_s: float = 5.0,
    statement_timeout_s: float | None = 5.0,
) -> Store:
    """Build (not open) the store a ``DATABASE_URL`` names; unset → SQLite file in the working directory."""
    if not url:
        from bloom_runtime.sql.sqlite import SqliteStore

        return SqliteStore(os.path.abspath(DEFAULT_SQLITE_FILE))
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        from bloom_runtime.sql.postgres import PostgresStore

        return PostgresStore(
            url, pool_min=pool_min, pool_max=pool_max, connect_timeout_s=connect_timeout_s, statement_timeout_s=statement_timeout_s
        )
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ConfigError("DATABASE_URL for SQLite must look like sqlite:///path/to/file.db")
        from bloom_runtime.sql.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url))
    raise ConfigError("DATABASE_URL must start with postgresql://, postgres:// or sqlite:///")


__all__ = ["DEFAULT_SQLITE_FILE", "Store", "Transaction", "TransientConflict", "store_from_url"]
