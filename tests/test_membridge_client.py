"""Membridge and worker-agent clients against a real HTTP server on a loopback port."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bloom_runtime.engine.agent_client import AGENT_HEADER, AgentClient
from bloom_runtime.engine.breaker import BreakerRegistry
from bloom_runtime.engine.errors import (
    ConfigError,
    InvalidInput,
    MembridgeError,
    MembridgeUnavailable,
    UnsafeURL,
)
from bloom_runtime.engine.membridge import ADMIN_HEADER, MembridgeClient
from bloom_runtime.engine.outgoing import Backoff
from bloom_runtime.engine.urls import AllowList, join, safe_path_segment, validate_outgoing_url

from .agent_standin import AgentStandIn
from .membridge_fixtures import agent_server, dead_agent_server, membridge_server  # noqa: F401
from .membridge_server import Answer, MembridgeServer

KEY = "sk-membridge-SECRET-7f3a9c"
AGENT_KEY = "sk-agent-SECRET-41bd"
FAST_FAIL_S = 0.05  # a refused call does no I/O; 50 ms is a correctness bound, not a benchmark
RESET_S = 0.2
# Backoff(base_s=0.01, jitter_fraction=0.3) with rng() == 0.5 adds 15 % to each step.
EXPECTED_DELAYS = [0.01 * 1.15, 0.02 * 1.15, 0.04 * 1.15]


class Sleeps:
    """Stands in for time.sleep: records the delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(membridge_server: MembridgeServer, sleeps: Sleeps) -> Iterator[Callable[..., MembridgeClient]]:  # noqa: F811
    clients: list[MembridgeClient] = []

    def make(*, url: str | Callable[[], str | None] | None = None, key: str | None = KEY, **kwargs: Any) -> MembridgeClient:
        kwargs.setdefault("timeout_s", 2.0)
        kwargs.setdefault("backoff", Backoff(base_s=0.01, jitter_fraction=0.3, rng=lambda: 0.5, sleep=sleeps))
        provider = url if callable(url) else (lambda: url or membridge_server.url)
        client = MembridgeClient(provider, lambda: key, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def make_agent_client(sleeps: Sleeps) -> Iterator[Callable[..., AgentClient]]:
    clients: list[AgentClient] = []

    def make(**kwargs: Any) -> AgentClient:
        kwargs.setdefault("timeout_s", 2.0)
        kwargs.setdefault("backoff", Backoff(base_s=0.01, jitter_fraction=0.3, rng=lambda: 0.5, sleep=sleeps))
        client = AgentClient(**kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True


def timed(call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    start = time.perf_counter()
    try:
        call()
    except BaseException as exc:
        return exc, time.perf_counter() - start
    return None, time.perf_counter() - start


# --- URL safety ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://membridge.internal:8080", "http://membridge.internal:8080"),
        ("HTTPS://MemBridge.Example.ORG/", "https://membridge.example.org"),
        ("http://10.0.0.5:80/api/v1/", "http://10.0.0.5/api/v1"),
        ("  http://[::1]:9000  ", "http://[::1]:9000"),
        ("https://host.example.org:443", "https://host.example.org"),
    ],
)
def test_validate_outgoing_url_normalises(url: str, expected: str) -> None:
    assert validate_outgoing_url(url, None) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://membridge.internal/", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("membridge.internal:8080", "http or https"),
        ("http://user:hunter2@membridge.internal/", "credentials"),
        ("http://token@membridge.internal/", "credentials"),
        ("http://", "no host"),
        ("http:///path", "no host"),
        ("http://:8080/", "no host"),
        ("http://host.example.org/?next=x", "query"),
        ("http://host.example.org/#x", "query"),
        ("http://host.example.org:0/", "port"),
        ("http://host.example.org:99999/", "port"),
        ("http://host.example.org:abc/", "port"),
        ("http://evil.example\\@good.example/", "backslash"),
        ("http://host .example/", "whitespace"),
        ("http://host.example/a\nb", "whitespace"),
        ("http://0x7f.1/", "not a valid hostname"),
        ("http://2130706433/", "not a valid hostname"),
        ("http://ex%61mple.org/", "not a valid hostname"),
        ("http://0.0.0.0:8000/", "unicast"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://host.example.org/a/../admin", "plain prefix"),
        ("http://host.example.org/a/%2e%2e/admin", "plain prefix"),
        ("", "empty"),
    ],
)
def test_validate_outgoing_url_refuses(url: str, fragment: str) -> None:
    with pytest.raises(UnsafeURL) as info:
        validate_outgoing_url(url, None)
    assert fragment in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:169.254.169.254]/",  # IPv4-mapped
        "http://[::ffff:a9fe:a9fe]/latest",  # the same, in hex
        "http://[::169.254.169.254]/",  # IPv4-compatible
        "http://[2002:a9fe:a9fe::1]/",  # 6to4
        "http://[64:ff9b::169.254.169.254]/",  # NAT64, well-known prefix
        "http://[64:ff9b:1:a9fe:a9:fe00::]/",  # NAT64, local-use /48 layout
        "http://[2001:0:4136:e378:8000:63bf:5601:5601]/",  # Teredo, client 169.254.169.254 obfuscated
        "http://[fe80::1]/",
        "http://[fe80::1%25eth0]/",  # zone id
        "http://169.254.169.254./",  # trailing dot
        "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
        "http://100.100.100.200/",  # Alibaba metadata
        "http://[::ffff:0.0.0.0]/",
        "http://0.1.2.3/",  # 0/8 reaches this host on Linux
        "http://[::]/",
        "http://255.255.255.255/",
        "http://0251.0376.0251.0376/",  # octal
        "http://0xa9.0xfe.0xa9.0xfe/",  # hex
        "http://2852039166/",  # decimal
        "http://169.254.43518/",  # short form
        "http://[ff02::1]/",
    ],
)
def test_every_address_form_is_judged_by_the_address_it_carries(url: str) -> None:
    with pytest.raises(UnsafeURL):
        validate_outgoing_url(url, None)


def test_allow_list_opts_in_to_a_refused_network_but_mapped_forms_only_match_their_ipv4() -> None:
    allowed = AllowList.parse("169.254.0.0/16,10.0.0.0/8")
    assert validate_outgoing_url("http://169.254.169.254/", allowed) == "http://169.254.169.254"
    assert validate_outgoing_url("http://[::ffff:10.0.0.5]:8001/", allowed) == "http://[::ffff:10.0.0.5]:8001"
    with pytest.raises(UnsafeURL):  # a 6to4 address is reached through a relay, not at 10.0.0.5
        validate_outgoing_url("http://[2002:a00:5::1]/", allowed)
    assert validate_outgoing_url("http://[::ffff:127.0.0.1]:9/", None) == "http://[::ffff:127.0.0.1]:9"  # loopback is fine


def test_allow_list_hosts_networks_and_suffixes() -> None:
    allowed = AllowList.parse(" membridge.internal, 10.0.0.0/8,*.example.org , 192.168.1.5, fd00::/8 ")
    assert allowed.allows("membridge.internal")
    assert allowed.allows("MEMBRIDGE.internal.")
    assert allowed.allows("10.200.3.4")
    assert allowed.allows("192.168.1.5")
    assert allowed.allows("[fd00::1]")
    assert allowed.allows("::ffff:10.1.1.1")  # IPv4-mapped form of an allowed address
    assert allowed.allows("node-1.example.org")
    assert allowed.allows("a.b.example.org")
    assert not allowed.allows("example.org")  # '*.' matches subdomains only
    assert not allowed.allows("badexample.org")
    assert not allowed.allows("example.org.evil.com")
    assert not allowed.allows("11.0.0.1")
    assert not allowed.allows("192.168.1.6")
    assert not allowed.allows("other.internal")

    assert validate_outgoing_url("http://10.1.2.3:8001/", allowed) == "http://10.1.2.3:8001"
    assert validate_outgoing_url("https://n1.example.org", allowed) == "https://n1.example.org"
    with pytest.raises(UnsafeURL, match="not in MEMBRIDGE_ALLOWED_HOSTS"):
        validate_outgoing_url("http://11.0.0.1:8001", allowed)
    with pytest.raises(UnsafeURL, match="not in MEMBRIDGE_ALLOWED_HOSTS"):
        validate_outgoing_url("http://example.org", allowed)
    # An allow-list that names a link-local network opts in to it.
    assert validate_outgoing_url("http://169.254.1.1", AllowList.parse("169.254.0.0/16")) == "http://169.254.1.1"


@pytest.mark.parametrize("spec", ["", " , ", "10.0.0.1/8", "bad host", "*.", "*.ex ample.org", "300.1.1.1/32"])
def test_allow_list_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        AllowList.parse(spec)


def test_allow_list_from_env_unset_means_no_restriction() -> None:
    assert AllowList.from_env(None) is None
    assert AllowList.from_env("  ") is None
    assert AllowList.from_env("a.example") == AllowList.parse("a.example")


@pytest.mark.parametrize("value", ["proj-1", "A.b_c:9", "x" * 128, "..."])
def test_safe_path_segment_accepts(value: str) -> None:
    assert safe_path_segment(value) == value


@pytest.mark.parametrize(
    "value", ["", ".", "..", "a/b", "../admin", "a%2fb", "a b", "a\n", "x" * 129, "é", "a?b", "a#b", "@evil.com"]
)
def test_safe_path_segment_refuses(value: str) -> None:
    with pytest.raises(InvalidInput):
        safe_path_segment(value)


def test_join_encodes_segments_and_refuses_dot_segments() -> None:
    assert join("http://h:1/base", "projects", "a b/c?d", "nodes") == "http://h:1/base/projects/a%20b%2Fc%3Fd/nodes"
    assert join("", "projects", "p1") == "/projects/p1"
    for bad in ("..", ".", ""):
        with pytest.raises(InvalidInput):
            join("http://h", "projects", bad)


# --- backoff -------------------------------------------------------------------------------


def test_backoff_delays() -> None:
    assert Backoff(rng=lambda: 0.0).delay(0) == 0.5
    assert Backoff(rng=lambda: 0.0).delay(2) == 2.0
    assert Backoff(rng=lambda: 1.0).delay(1) == pytest.approx(1.3)  # +30 % at most
    assert Backoff(base_s=1.0, max_s=4.0, rng=lambda: 0.0).delay(10) == 4.0
    backoff = Backoff()
    assert all(0.5 * 2**n <= backoff.delay(n) <= 0.5 * 2**n * 1.3 for n in range(4) for _ in range(20))


# --- requests, retries --------------------------------------------------------------------------


def seed(membridge_server: MembridgeServer) -> None:  # noqa: F811
    """Two agents: node-a contacted once by the control plane (float last_seen), node-b never."""
    now = time.time()
    membridge_server.add_agent("node-a", "http://10.0.0.11:8001", at_s=now - 3600.5)
    membridge_server.add_agent("node-b", "http://10.0.0.12:8001", at_s=now - 7200.0)
    membridge_server.state.agents["node-a"].update(status="online", last_seen=now - 1.25)


def test_health_and_agents_send_the_admin_key(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    seed(membridge_server)
    membridge_server.admin_key = KEY  # the real control plane checks it on every route but /health
    client = make_client()
    assert client.health()["status"] == "ok"
    agents = client.agents()
    assert [a["name"] for a in agents] == ["node-a", "node-b"]
    assert isinstance(agents[0]["last_seen"], float) and agents[1]["last_seen"] is None
    assert agents[1]["status"] == "unknown"
    assert all(r.headers[ADMIN_HEADER] == KEY for r in membridge_server.requests)
    state = client.state()
    assert state["connected"] is True
    assert state["breaker"] == "closed"
    assert state["consecutiveFailures"] == 0
    assert state["lastSuccess"] is not None and abs(state["lastSuccess"] - time.time() * 1000) < 60_000
    assert (state["requests"], state["attempts"], state["retries"], state["failures"]) == (2, 2, 0, 0)


def test_no_key_sends_no_header(make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer) -> None:  # noqa: F811
    make_client(key=None).health()
    assert ADMIN_HEADER.lower() not in {h.lower() for h in membridge_server.requests[0].headers}


def test_5xx_is_retried_with_the_expected_delays(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    client = make_client(breaker_fail_max=100)
    membridge_server.fail("500")
    with pytest.raises(MembridgeError) as info:
        client.health()
    assert not isinstance(info.value, MembridgeUnavailable)
    assert info.value.details["status"] == 500
    assert "500" in info.value.message
    assert membridge_server.count("GET /health") == 4  # 1 + 3 retries
    assert sleeps.delays == pytest.approx(EXPECTED_DELAYS)
    state = client.state()
    assert (state["attempts"], state["retries"], state["failures"]) == (4, 3, 1)
    assert state["consecutiveFailures"] == 4
    assert state["connected"] is False
    assert state["lastError"] == "membridge answered 500"


def test_transient_5xx_then_success(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    seed(membridge_server)
    client = make_client()
    membridge_server.fail("500", "GET /agents", times=2)
    assert len(client.agents()) == 2
    assert sleeps.delays == pytest.approx(EXPECTED_DELAYS[:2])
    state = client.state()
    assert (state["requests"], state["attempts"], state["retries"], state["failures"]) == (1, 3, 2, 0)
    assert state["consecutiveFailures"] == 0 and state["connected"] is True


def test_4xx_is_returned_at_once_and_counts_as_success(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    client = make_client(breaker_fail_max=1)
    membridge_server.fail("404")
    response = client.request("GET", "/health")
    assert response.status == 404 and not response.ok
    assert response.data == {"detail": "injected not found"}
    assert membridge_server.count() == 1
    assert sleeps.delays == []
    assert client.state()["breaker"] == "closed"
    assert client.state()["consecutiveFailures"] == 0
    with pytest.raises(MembridgeError, match="answered 404") as info:
        client.get_json("/health")
    assert info.value.details["status"] == 404


def test_connection_refused_is_retried(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    client = make_client(breaker_fail_max=100)
    membridge_server.refuse()
    with pytest.raises(MembridgeError) as info:
        client.health()
    assert info.value.message == "membridge unreachable: connection refused"
    assert sleeps.delays == pytest.approx(EXPECTED_DELAYS)
    assert client.state()["attempts"] == 4
    assert client.state()["lastError"] == "membridge unreachable: connection refused"


def test_timeout_is_retried(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    client = make_client(timeout_s=0.2, retries=1, breaker_fail_max=100)
    membridge_server.fail("hang")
    error, elapsed = timed(client.health)
    assert isinstance(error, MembridgeError)
    assert error.message == "membridge timed out after 0.2 s"
    assert membridge_server.count() == 2
    assert sleeps.delays == pytest.approx(EXPECTED_DELAYS[:1])
    assert elapsed < 3.0


def test_post_is_not_repeated_after_it_reached_the_server(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    client = make_client(breaker_fail_max=100)
    path = join("", "projects", "proj-1", "leadership", "select")
    membridge_server.fail("500", f"POST {path}")
    with pytest.raises(MembridgeError, match="answered 500"):
        client.request("POST", path, json={"node": "node-b"})
    assert membridge_server.count() == 1 and sleeps.delays == []
    # ... unless the caller says repeating it is harmless.
    with pytest.raises(MembridgeError):
        client.request("POST", path, json={"node": "node-b"}, idempotent=True)
    assert membridge_server.count() == 5
    # A POST that never left this host is retried.
    membridge_server.refuse()
    sleeps.delays.clear()
    with pytest.raises(MembridgeError, match="unreachable"):
        client.request("POST", path, json={"node": "node-b"})
    assert sleeps.delays == pytest.approx(EXPECTED_DELAYS)


def test_redirects_are_not_followed(
    make_client: Callable[..., MembridgeClient],
    membridge_server: MembridgeServer,  # noqa: F811
    agent_server: MembridgeServer,  # noqa: F811
) -> None:
    client = make_client()
    membridge_server.redirect_to = agent_server.url + "/health"
    membridge_server.fail("redirect")
    response = client.request("GET", "/health")
    assert response.status == 302
    assert response.headers["location"] == agent_server.url + "/health"
    with pytest.raises(MembridgeError, match="answered 302"):
        client.health()
    assert agent_server.requests == []


@pytest.mark.parametrize(
    "agents",
    [
        {"agents": []},
        [{"url": "http://x"}],
        [{"name": "a", "registered_at": "yesterday"}],
        [{"name": "a", "last_seen": True}],
        [{"name": "a", "url": 5}],
        ["node-a"],
    ],
)
def test_malformed_agents_answers(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, agents: Any  # noqa: F811
) -> None:
    membridge_server.route = lambda *_: Answer(200, agents)  # type: ignore[method-assign]
    with pytest.raises(MembridgeError, match="malformed /agents response"):
        make_client().agents()


def test_malformed_json(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    client = make_client(breaker_fail_max=1)
    membridge_server.fail("malformed")
    with pytest.raises(MembridgeError) as info:
        client.agents()
    assert info.value.message == "malformed /agents response"
    with pytest.raises(MembridgeError, match="malformed JSON"):
        client.health()
    response = client.request("GET", "/health")
    assert response.malformed and response.data is None
    # A peer that answers, even badly, is up: no retries, breaker still closed.
    assert sleeps.delays == [] and client.state()["breaker"] == "closed"


def test_oversized_answer_is_refused(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    seed(membridge_server)
    client = make_client(max_body_bytes=64)
    with pytest.raises(MembridgeError, match="response too large"):
        client.agents()
    assert membridge_server.count() == 1


def test_pass_through_routes(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    client = make_client()
    cid = membridge_server.add_project("garden")
    assert [p["canonical_id"] for p in client.get_json("/projects")] == [cid]
    cid = safe_path_segment(cid, what="project id")
    assert client.request("POST", "/agent/heartbeat", json={"node_id": "node-a", "canonical_id": cid}).ok
    assert client.get_json(join("", "projects", cid, "leadership"))["node_count"] == 1
    assert [n["node_id"] for n in client.get_json(join("", "projects", cid, "nodes"))] == ["node-a"]
    body = {"primary_node_id": "node-a", "lease_seconds": 60}
    selected = client.request("POST", join("", "projects", cid, "leadership", "select"), json=body)
    assert selected.status == 200 and selected.data["primary_node_id"] == "node-a"
    assert membridge_server.requests[-1].json == body
    assert membridge_server.requests[-1].headers[ADMIN_HEADER] == KEY
    refused = client.request("POST", join("", "projects", cid, "leadership", "select"), json={"node": "node-a"})
    assert refused.status == 422 and refused.data["detail"][0]["loc"] == ["body", "primary_node_id"]
    assert client.request("GET", "/nope").status == 404


@pytest.mark.parametrize(
    "path", ["/projects/../admin", "/projects/%2e%2E/admin", "/projects/a%2Fb", "//evil.example/x",
             "http://evil.example/x", "projects", "/a?b=c", "/a#b", "/a b"],
)
def test_paths_cannot_leave_the_base_url(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, path: str  # noqa: F811
) -> None:
    with pytest.raises(MembridgeError):
        make_client().request("GET", path)
    assert membridge_server.requests == []


# --- configuration through providers --------------------------------------------------------------


def test_url_change_takes_effect_on_the_next_call(
    make_client: Callable[..., MembridgeClient],
    membridge_server: MembridgeServer,  # noqa: F811
    dead_agent_server: MembridgeServer,  # noqa: F811
) -> None:
    current = {"url": dead_agent_server.url}
    client = make_client(url=lambda: current["url"], retries=0, breaker_fail_max=1)
    with pytest.raises(MembridgeError, match="unreachable"):
        client.health()
    assert client.state()["breaker"] == "open"
    current["url"] = membridge_server.url + "/"
    assert client.health()["status"] == "ok"  # a new URL gets a fresh breaker
    assert client.state()["breaker"] == "closed"


def test_unconfigured_and_unsafe_urls(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    unconfigured = make_client(url=lambda: None)
    with pytest.raises(MembridgeError, match="not configured"):
        unconfigured.health()
    assert unconfigured.state()["lastError"] == "membridge server URL is not configured"
    assert unconfigured.state()["failures"] == 1
    with pytest.raises(UnsafeURL):
        make_client(url=lambda: "ftp://127.0.0.1/").health()
    port = membridge_server.port
    with pytest.raises(UnsafeURL, match="not in MEMBRIDGE_ALLOWED_HOSTS"):
        make_client(allowed=AllowList.parse("10.0.0.0/8, *.example.org")).health()
    with pytest.raises(UnsafeURL, match="credentials"):
        make_client(url=f"http://admin:{KEY}@127.0.0.1:{port}").health()
    assert membridge_server.requests == []
    assert make_client(allowed=AllowList.parse("127.0.0.0/8")).health()["status"] == "ok"


# --- circuit breaker ------------------------------------------------------------------------------


def test_breaker_opens_after_the_configured_failures_and_fails_fast(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    client = make_client(retries=0, breaker_fail_max=3, breaker_reset_s=30.0)
    membridge_server.fail("500")
    for _ in range(3):
        with pytest.raises(MembridgeError, match="answered 500"):
            client.health()
    assert client.state()["breaker"] == "open"
    for _ in range(20):
        error, elapsed = timed(client.health)
        assert isinstance(error, MembridgeUnavailable)
        assert elapsed < FAST_FAIL_S
    assert error.message.startswith("membridge circuit open, retry after ")
    assert 0 < error.details["retry_after_s"] <= 30.0
    assert membridge_server.count() == 3  # nothing reached the server while open
    state = client.state()
    assert state["connected"] is False
    assert state["consecutiveFailures"] == 3
    assert state["rejected"] == 20 and state["failures"] == 23


def test_breaker_stops_the_retry_loop_when_it_opens(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer, sleeps: Sleeps  # noqa: F811
) -> None:
    client = make_client(retries=3, breaker_fail_max=2)
    membridge_server.fail("500")
    with pytest.raises(MembridgeError, match="answered 500"):
        client.health()
    assert membridge_server.count() == 2
    assert sleeps.delays == pytest.approx(EXPECTED_DELAYS[:1])  # no sleep after the tripping attempt
    assert client.state()["breaker"] == "open"


def test_breaker_half_opens_then_closes_when_the_server_is_back(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    client = make_client(retries=0, breaker_fail_max=2, breaker_reset_s=RESET_S)
    membridge_server.refuse()
    for _ in range(2):
        with pytest.raises(MembridgeError, match="unreachable"):
            client.health()
    assert client.state()["breaker"] == "open"
    with pytest.raises(MembridgeUnavailable):
        client.health()

    assert wait_until(lambda: client.state()["breaker"] == "half-open")
    membridge_server.resume()
    assert client.health()["status"] == "ok"  # the trial call
    state = client.state()
    assert state["breaker"] == "closed"
    assert state["connected"] is True and state["consecutiveFailures"] == 0
    assert client.health()["status"] == "ok"


def test_failed_trial_reopens_the_breaker(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    client = make_client(retries=3, breaker_fail_max=1, breaker_reset_s=RESET_S)
    membridge_server.fail("500")
    with pytest.raises(MembridgeError):
        client.health()
    assert wait_until(lambda: client.state()["breaker"] == "half-open")
    with pytest.raises(MembridgeError, match="answered 500"):
        client.health()
    assert membridge_server.count() == 2  # one trial attempt, no retries behind it
    assert client.state()["breaker"] == "open"
    error, elapsed = timed(client.health)
    assert isinstance(error, MembridgeUnavailable) and elapsed < FAST_FAIL_S


def test_calls_fail_fast_while_a_trial_call_hangs(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    client = make_client(retries=0, breaker_fail_max=1, breaker_reset_s=RESET_S, timeout_s=5.0)
    membridge_server.fail("500", times=1)
    with pytest.raises(MembridgeError):
        client.health()
    membridge_server.fail("hang")
    assert wait_until(lambda: client.state()["breaker"] == "half-open")

    outcome: list[BaseException | None] = []
    trial = threading.Thread(target=lambda: outcome.append(timed(client.health)[0]))
    trial.start()
    try:
        assert membridge_server.wait_for_hanging(1)
        # pybreaker alone would queue this call behind the hung trial on its lock.
        error, elapsed = timed(client.health)
        assert isinstance(error, MembridgeUnavailable)
        assert elapsed < FAST_FAIL_S
    finally:
        membridge_server.clear_failures()
        membridge_server.release()
        trial.join(timeout=10)
    assert not trial.is_alive()
    assert isinstance(outcome[0], MembridgeError)  # the released handler answers 500
    assert client.state()["breaker"] == "open"


def test_closed_breaker_does_not_serialise_callers(
    make_client: Callable[..., MembridgeClient], membridge_server: MembridgeServer  # noqa: F811
) -> None:
    client = make_client(retries=0, breaker_fail_max=10, timeout_s=5.0)
    membridge_server.fail("hang")
    callers = [threading.Thread(target=lambda: timed(client.health)) for _ in range(3)]
    for caller in callers:
        caller.start()
    try:
        # All three are inside the server at once: no lock is held across the I/O.
        assert membridge_server.wait_for_hanging(3)
    finally:
        membridge_server.clear_failures()
        membridge_server.release()
        for caller in callers:
            caller.join(timeout=10)
    assert client.state()["attempts"] == 3


def test_breaker_registry_keeps_breakers_apart() -> None:
    registry = BreakerRegistry(fail_max=1, reset_s=30.0, max_entries=2)
    a = registry.get("http://a")
    assert registry.get("http://a") is a
    a.record(a.admit(), ok=False)
    assert registry.states() == {"http://a": "open"}
    registry.get("http://b")
    registry.get("http://c")  # evicts the oldest closed one (b), never the open one
    assert registry.states() == {"http://a": "open", "http://c": "closed"}


# --- secrets ------------------------------------------------------------------------------------------


def test_admin_key_never_leaks(
    make_client: Callable[..., MembridgeClient],
    membridge_server: MembridgeServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(retries=1, breaker_fail_max=3, timeout_s=0.2)
    errors: list[BaseException] = []

    def attempt(call: Callable[[], Any]) -> None:
        error, _ = timed(call)
        if error is not None:
            errors.append(error)

    attempt(client.health)
    membridge_server.fail("500", times=2)
    attempt(client.health)
    membridge_server.fail("hang", times=1)
    attempt(client.agents)
    membridge_server.refuse()
    attempt(client.health)
    attempt(client.health)  # breaker open
    attempt(make_client(key="bad\r\nX-Injected: " + KEY).health)  # refused before sending
    attempt(make_client(url=f"http://u:{KEY}@127.0.0.1:1").health)

    assert len(errors) == 6
    assert any(isinstance(e, MembridgeUnavailable) for e in errors)
    assert membridge_server.requests and all(r.headers[ADMIN_HEADER] == KEY for r in membridge_server.requests)
    texts = [caplog.text, repr(client), str(client.state())]
    for error in errors:
        texts += [str(error), repr(error), str(error.to_dict()) if hasattr(error, "to_dict") else ""]
        texts += traceback.format_exception(error)  # the whole __cause__ chain
    for text in texts:
        assert KEY not in text
    assert "SECRET" not in "".join(texts)


# --- worker agents ----------------------------------------------------------------------------------------


TASK = {"task_id": "t1", "prompt": "hi", "context_id": "ctx"}


def test_post_execute_task(make_agent_client: Callable[..., AgentClient], agent_server: AgentStandIn) -> None:  # noqa: F811
    client = make_agent_client()
    agent_server.agent_key = AGENT_KEY
    payload = {**TASK, "runtime_url": None}
    response = client.post_execute_task(agent_server.url + "/", payload, AGENT_KEY)
    assert response.status == 200 and response.data["ok"] is True and response.data["output"] == "done: hi"
    [received] = agent_server.requests
    assert received.route == "POST /execute-task"
    assert received.headers[AGENT_HEADER] == AGENT_KEY
    assert ADMIN_HEADER not in received.headers
    assert received.headers["Content-Type"] == "application/json"
    assert received.json == payload

    refused = client.post_execute_task(agent_server.url, payload, "another-agent-key")
    assert refused.status == 401 and "X-MEMBRIDGE-AGENT" in refused.data["detail"]  # refusal is returned
    assert client.health(agent_server.url).data["service"] == "membridge-agent"


def test_agent_key_header_only_when_set(make_agent_client: Callable[..., AgentClient], agent_server: AgentStandIn) -> None:  # noqa: F811
    client = make_agent_client()
    assert client.post_execute_task(agent_server.url, TASK, None).data["ok"] is True
    assert client.post_execute_task(agent_server.url, TASK, "").data["ok"] is True
    assert all(AGENT_HEADER.lower() not in {h.lower() for h in r.headers} for r in agent_server.requests)


def test_execute_task_retries(
    make_agent_client: Callable[..., AgentClient],
    agent_server: AgentStandIn,  # noqa: F811
    dead_agent_server: AgentStandIn,  # noqa: F811
    sleeps: Sleeps,
) -> None:
    client = make_agent_client(breaker_fail_max=100)
    agent_server.fail("500")
    with pytest.raises(MembridgeError, match="worker agent answered 500") as info:
        client.post_execute_task(agent_server.url, TASK, AGENT_KEY)
    assert info.value.details == {"url": agent_server.url, "status": 500, "reached": True}
    assert agent_server.count() == 1 and sleeps.delays == []  # it may have started the task
    with pytest.raises(MembridgeError, match="worker agent unreachable: connection refused") as info:
        client.post_execute_task(dead_agent_server.url, TASK, AGENT_KEY)
    assert info.value.details["reached"] is False
    assert sleeps.delays == pytest.approx(EXPECTED_DELAYS)


def test_per_worker_breakers_are_independent(
    make_agent_client: Callable[..., AgentClient],
    agent_server: AgentStandIn,  # noqa: F811
    dead_agent_server: AgentStandIn,  # noqa: F811
) -> None:
    client = make_agent_client(retries=0, breaker_fail_max=1, breaker_reset_s=30.0)
    with pytest.raises(MembridgeError, match="unreachable"):
        client.post_execute_task(dead_agent_server.url, TASK, AGENT_KEY)
    error, elapsed = timed(lambda: client.post_execute_task(dead_agent_server.url, TASK, AGENT_KEY))
    assert isinstance(error, MembridgeUnavailable) and elapsed < FAST_FAIL_S
    assert error.message.startswith("worker agent circuit open") and error.details["reached"] is False
    assert 29 < (client.breaker_retry_after(dead_agent_server.url) or 0) <= 30
    assert client.post_execute_task(agent_server.url, TASK, AGENT_KEY).status == 200
    assert client.breaker_state(dead_agent_server.url) == "open"
    assert client.breaker_state(agent_server.url) == "closed"
    assert client.state()["breakers"] == {dead_agent_server.url: "open", agent_server.url: "closed"}


def test_execute_task_validates_the_worker_url(
    make_agent_client: Callable[..., AgentClient], agent_server: AgentStandIn  # noqa: F811
) -> None:
    client = make_agent_client(allowed=AllowList.parse("10.0.0.0/8"))
    for url in (agent_server.url, "ftp://10.0.0.1/", "http://u:pw@10.0.0.1/", "http://10.0.0.1/?x=1"):
        with pytest.raises(UnsafeURL) as info:
            client.post_execute_task(url, {"task_id": "t1"}, AGENT_KEY)
        assert "pw" not in str(info.value)
    assert agent_server.requests == []
    error, _ = timed(lambda: make_agent_client().post_execute_task(agent_server.url, {}, "bad key " + AGENT_KEY))
    assert isinstance(error, MembridgeError) and AGENT_KEY not in str(error)
    assert agent_server.requests == []


# --- the transport: one wall-clock deadline, the address policy at connect time ------------------


@pytest.mark.parametrize("which", ["membridge", "agent"])
def test_a_dripping_peer_is_cut_at_the_deadline(
    make_client: Callable[..., MembridgeClient],
    make_agent_client: Callable[..., AgentClient],
    membridge_server: MembridgeServer,  # noqa: F811
    agent_server: AgentStandIn,  # noqa: F811
    which: str,
) -> None:
    # Headers at once, then one byte every 50 ms: each read returns within the read
    # timeout, so only a wall-clock deadline stops it (the body would take 50 s).
    timeout_s = 0.4
    server: Any = membridge_server if which == "membridge" else agent_server
    server.drip_interval_s = 0.05
    server.fail("drip", "GET /health")
    if which == "membridge":
        call: Callable[[], Any] = lambda: make_client(timeout_s=timeout_s, retries=0).health()  # noqa: E731
    else:
        call = lambda: make_agent_client(timeout_s=timeout_s).health(agent_server.url)  # noqa: E731
    assert server.count("GET /health") == 0
    error, elapsed = timed(call)
    assert isinstance(error, MembridgeError) and "timed out" in error.message, error
    assert error.details["reached"] is True
    assert timeout_s <= elapsed < timeout_s + 0.3, elapsed
    assert server.wait_for_requests(1, route="GET /health")


def test_the_deadline_covers_the_whole_attempt_not_each_read(agent_server: AgentStandIn) -> None:  # noqa: F811
    from bloom_runtime.engine.transport import Transport, deadline

    agent_server.drip_interval_s = 0.02
    agent_server.fail("drip")
    with Transport() as transport, deadline(0.3):
        started = time.monotonic()
        with pytest.raises(Exception, match="timed out"), transport.session.get(agent_server.url + "/health", stream=True, timeout=5) as r:
            for _ in r.iter_content(1):
                pass
        assert time.monotonic() - started < 0.6


def fake_resolver(*addresses: str) -> Callable[[str, int], list[tuple[Any, ...]]]:
    import socket

    def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for a in addresses:
            family = socket.AF_INET6 if ":" in a else socket.AF_INET
            out.append((family, socket.SOCK_STREAM, 6, "", (a, port) if family == socket.AF_INET else (a, port, 0, 0)))
        return out

    return resolve


def test_a_hostname_resolving_to_a_refused_address_is_not_connected_to(agent_server: AgentStandIn) -> None:  # noqa: F811
    from bloom_runtime.engine.transport import Transport

    for refused in (["169.254.169.254"], ["::ffff:169.254.169.254"], ["fd00:ec2::254", "0.0.0.0"]):
        with AgentClient(retries=3, transport=Transport(resolver=fake_resolver(*refused)), breaker_fail_max=1) as client:
            try:
                client.post_execute_task(f"http://agent.internal:{agent_server.port}", TASK, AGENT_KEY)
            except MembridgeError as exc:
                error = exc
            assert isinstance(error, MembridgeError) and "refused" in error.message, error
            assert error.details["reached"] is False and AGENT_KEY not in str(error)
            # The policy, not a down peer: no retries, and the breaker stays closed.
            assert client.state()["attempts"] == 1 and client.breaker_state(f"http://agent.internal:{agent_server.port}") == "closed"
    assert agent_server.requests == []
    # Among several addresses, only the allowed ones are tried.
    with AgentClient(transport=Transport(resolver=fake_resolver("169.254.169.254", "127.0.0.1"))) as client:
        assert client.health(f"http://agent.internal:{agent_server.port}").ok
    assert agent_server.count("GET /health") == 1


def test_abort_all_ends_calls_in_flight(agent_server: AgentStandIn) -> None:  # noqa: F811
    agent_server.fail("hang", "POST /execute-task")
    client = AgentClient(timeout_s=30.0, retries=0)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("error", timed(lambda: client.post_execute_task(agent_server.url, TASK, None))))
    runner.start()
    try:
        assert agent_server.wait_for_hanging(1)
        client.abort_all()
        runner.join(timeout=5)
        assert not runner.is_alive()
    finally:
        agent_server.release()
        runner.join()
        client.close()
    error, elapsed = outcome["error"]
    assert isinstance(error, MembridgeError) and elapsed < 5
