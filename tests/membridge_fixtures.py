"""Pytest fixtures around the membridge stand-ins; import the names you need in a test module:

    from .membridge_fixtures import membridge_server, agent_server  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .agent_standin import AgentStandIn
from .membridge_server import MembridgeServer


@pytest.fixture
def membridge_server() -> Iterator[MembridgeServer]:
    """A running control-plane stand-in, closed (hung handlers released) at teardown."""
    with MembridgeServer() as server:
        yield server


@pytest.fixture
def agent_server() -> Iterator[AgentStandIn]:
    """A worker agent stand-in (``POST /execute-task``, ``GET /health``) whose runs take no time."""
    with AgentStandIn() as server:
        yield server


@pytest.fixture
def dead_agent_server() -> Iterator[AgentStandIn]:
    """A worker agent whose port refuses connections."""
    server = AgentStandIn().start()
    server.refuse()
    try:
        yield server
    finally:
        server.close()
