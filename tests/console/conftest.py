"""The console in a real headless Chromium (Debian's, driven by Playwright) against a
real ``bloom-runtime serve`` on a loopback port, on SQLite and on PostgreSQL, with API
keys on. Every test's page must log no console error and see no failed request
(unless the test names the ones it provokes); each page's screenshot is kept in
``test-artifacts/console``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from ..conftest import truncate_pg
from ..http.test_e2e import REPO, Server
from ..membridge_fixtures import membridge_server  # noqa: F401

CHROMIUM = os.environ.get("BLOOM_TEST_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium tries to reach its services, which
# a closed network refuses (and which a test must never depend on).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "test-artifacts" / "console"
CLIENT_KEY = "console-client-key-1"
ADMIN_KEY = "console-admin-key-01"
HEADER = "X-Runtime-API-Key"
WAIT_MS = 15_000


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"console tests need Chromium at {CHROMIUM} (apt-get install chromium, or set BLOOM_TEST_CHROMIUM)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Runtime:
    """A running server, an admin session on its API, and its store's name."""

    server: Server
    api: requests.Session
    store: str

    @property
    def origin(self) -> str:
        return self.server.origin

    def call(self, method: str, path: str, **kw: Any) -> Any:
        with self.api.request(method, self.server.url + path, timeout=10, **kw) as r:
            assert r.status_code < 300, (method, path, r.status_code, r.text)
            return r.json() if r.content else None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtime]:
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        truncate_pg(url)
    # Automatic dispatch off: the tests lease and dispatch by hand, some to URLs that answer nothing.
    env = {"RUNTIME_API_KEY": f"ops={CLIENT_KEY}", "RUNTIME_ADMIN_KEY": f"root={ADMIN_KEY}", "RATE_LIMIT_PER_S": "0",
           "AUTO_DISPATCH": "off"}
    server = Server(tmp_path / "console.db", env=env, database_url=url)
    with requests.Session() as session:
        session.headers[HEADER] = ADMIN_KEY
        try:
            server.wait_ready(session)
            yield Runtime(server, session, request.param)
        finally:
            server.stop()


@dataclass
class Watch:
    """What went wrong on a page: console errors, uncaught exceptions, failed requests."""

    allowed: list[re.Pattern[str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        """Expect problems matching ``pattern`` (a request this test provokes on purpose)."""
        self.allowed.append(re.compile(pattern))

    def note(self, text: str) -> None:
        if not any(p.search(text) for p in self.allowed):
            self.problems.append(text)


@dataclass
class Console:
    page: Any
    watch: Watch
    runtime: Runtime

    def open(self, hash_: str = "#/") -> None:
        """Go to a page and wait until its data has loaded once."""
        self.page.goto(f"{self.runtime.origin}/{hash_}")
        self.loaded()

    def loaded(self, after: int = 0) -> None:
        """Wait until the page has shown more than ``after`` loads of its data. (A selector,
        not a function: the console's policy forbids the eval a polled function needs.)"""
        shown = "".join(f':not([data-loads="{n}"])' for n in range(1, after + 1))
        self.page.locator(f"main[data-loads]{shown}").wait_for(state="attached", timeout=WAIT_MS)

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.runtime.origin}/")
        self.page.locator("dialog.login #key").fill(key)
        self.page.locator("dialog.login button[type=submit]").click()
        self.loaded()

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}-{self.runtime.store}.png"), full_page=True)


@pytest.fixture
def make_console(browser: Any, runtime: Runtime) -> Iterator[Callable[..., Console]]:
    """Pages in fresh browser contexts; each one's problems are asserted on at the end."""
    opened: list[tuple[Any, Watch]] = []

    def make(**context_options: Any) -> Console:
        context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        watch = Watch()
        page.on("console", lambda m: m.type == "error" and watch.note(f"console error: {m.text}"))
        page.on("pageerror", lambda e: watch.note(f"page error: {e}"))
        page.on("requestfailed", lambda r: watch.note(f"request failed: {r.method} {r.url} {r.failure}"))
        page.on("request", lambda r: watch.requests.append(f"{r.method} {r.url}"))

        def answered(r: Any) -> None:
            if r.status >= 400:
                watch.note(f"HTTP {r.status}: {r.request.method} {r.url}")
            if not r.url.startswith(runtime.origin + "/"):
                watch.note(f"request to another origin: {r.url}")

        page.on("response", answered)
        opened.append((context, watch))
        return Console(page, watch, runtime)

    yield make
    problems = [p for _, watch in opened for p in watch.problems]
    for context, _ in opened:
        context.close()
    assert not problems, problems


@pytest.fixture
def admin(make_console: Callable[..., Console]) -> Console:
    """A page signed in with the admin key."""
    console = make_console()
    console.sign_in(ADMIN_KEY)
    return console
