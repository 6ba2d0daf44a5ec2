"""Pytest fixtures around ``MembridgeServer``; import the names you need in a test module:

    from .membridge_fixtures import membridge_server, agent_server  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .membridge_server import MembridgeServer


@pytest.fixture
def membridge_server() -> Iterator[MembridgeServer]:
    """A running membridge test server, closed (hung handlers released) at teardown."""
    with MembridgeServer() as server:
        yield server


@pytest.fixture
def agent_server() -> Iterator[MembridgeServer]:
    """A second server, used as a worker agent (``POST /execute-task``)."""
    with MembridgeServer() as server:
        yield server


@pytest.fixture
def dead_agent_server() -> Iterator[MembridgeServer]:
    """A worker agent whose port refuses connections."""
    server = MembridgeServer().start()
    server.refuse()
    try:
        yield server
    finally:
        server.close()
