"""Fixtures: a real engine (SQLite per test, or the shared PostgreSQL test database) behind a TestClient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import falcon.testing
import pytest

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.settings import Settings, parse_api_keys
from bloom_runtime.http import create_app

from ..conftest import truncate_pg, wait_for  # noqa: F401  (the http tests import it from here)

CLIENT_KEY = "client-key-0001"
OTHER_KEY = "other-key-00002"
ADMIN_KEY = "admin-key-00003"

FAST = {"lease_sweep_interval_s": 0.1, "ask_timeout_s": 10.0, "retry_backoff_base_ms": 10, "retry_backoff_cap_ms": 50}


@pytest.fixture
def make_client(tmp_path) -> Iterator[Callable[..., falcon.testing.TestClient]]:
    """Build engines and clients with settings overrides; every engine is stopped afterwards."""
    engines: list[Engine] = []

    def make(database_url: str | None = None, headers: dict[str, str] | None = None, **overrides: Any) -> falcon.testing.TestClient:
        url = database_url or "sqlite:///" + str(tmp_path / f"bloom{len(engines)}.db")
        settings = Settings(database_url=url, **{**FAST, **overrides})
        engine = Engine.start(settings)
        engines.append(engine)
        client = falcon.testing.TestClient(create_app(engine, settings), headers=headers)
        client.engine = engine  # type: ignore[attr-defined]
        return client

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """The same test on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "bloom.db")
    url = request.getfixturevalue("pg_url")
    truncate_pg(url)
    return url


@pytest.fixture
def client(make_client) -> falcon.testing.TestClient:
    return make_client()


@pytest.fixture
def keyed(make_client) -> falcon.testing.TestClient:
    """Auth on: two client keys and one admin key; no default header."""
    return make_client(
        api_keys=parse_api_keys(f"ops={CLIENT_KEY},ci={OTHER_KEY}"),
        admin_keys=parse_api_keys(f"root={ADMIN_KEY}", default_prefix="admin"),
    )


def snapshot(engine: Engine) -> tuple[Any, ...]:
    """What a refused request must leave unchanged."""
    return engine.stats(), len(engine.audit.list(limit=1000).items), engine.store.get_settings()


def new_task(**extra: Any) -> dict[str, Any]:
    return {"context_id": "ctx-1", "agent_slug": "writer", "prompt": "say hi", **extra}
