"""The operator console, used as an operator would: in Chromium, against a real server."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import requests

from .conftest import ADMIN_KEY, CLIENT_KEY, Console, Runtime

pytestmark = pytest.mark.e2e

XSS_SCRIPT = "<script>window.__pwned = 'script'</script>"
XSS_IMG = '"><img src=x onerror="window.__pwned = \'img\'">'
PAGES = {
    "overview": "#/",
    "tasks": "#/tasks",
    "new-task": "#/tasks/new",
    "workers": "#/workers",
    "leases": "#/leases",
    "audit": "#/audit",
    "membridge": "#/membridge",
}


def task(rt: Runtime, **extra: Any) -> dict[str, Any]:
    return rt.call("POST", "/llm-tasks", json={"context_id": "ctx-1", "agent_slug": "writer", "prompt": "say hi", **extra})


def failed_task(rt: Runtime, worker: str = "node-1", **extra: Any) -> dict[str, Any]:
    """A task that failed on its only attempt."""
    t = task(rt, max_attempts=1, **extra)
    rt.call("POST", f"/llm-tasks/{t['id']}/lease", json={"worker_id": worker})
    rt.call("POST", f"/llm-tasks/{t['id']}/complete", json={"status": "error", "error_message": "boom", "retryable": False})
    return t


def seed(rt: Runtime) -> dict[str, Any]:
    """Workers, and tasks in most states."""
    rt.call("POST", "/workers", json={"name": "node-1", "capabilities": {"max_concurrency": 4, "labels": ["gpu"]}})
    rt.call("POST", "/workers", json={"name": "node-2", "status": "offline"})
    queued = [task(rt), task(rt, context_id="ctx-2")]
    leased = task(rt)
    rt.call("POST", f"/llm-tasks/{leased['id']}/lease", json={"worker_id": "node-1"})
    done = task(rt, agent_slug="critic")
    rt.call("POST", f"/llm-tasks/{done['id']}/lease", json={"worker_id": "node-1"})
    rt.call("POST", f"/llm-tasks/{done['id']}/complete", json={"status": "success", "output": "hello"})
    failed = failed_task(rt)
    cancelled = task(rt)
    rt.call("POST", f"/llm-tasks/{cancelled['id']}/cancel")
    return {"queued": queued, "leased": leased, "done": done, "failed": failed, "cancelled": cancelled}


def overview_numbers(c: Console) -> dict[str, int]:
    cells = c.page.locator("[data-stat]").evaluate_all("els => els.map(e => [e.dataset.stat, e.textContent])")
    return {name: int(text.replace(",", "")) for name, text in cells if name.count(".") == 1}


def stats_numbers(stats: dict[str, Any]) -> dict[str, int]:
    out = {}
    for group, counts in stats.items():
        by_status = counts.get("by_status", counts)
        out[f"{group}.total"] = counts.get("total", sum(v for k, v in by_status.items() if isinstance(v, int)))
        out.update({f"{group}.{status}": n for status, n in by_status.items() if isinstance(n, int) and status != "total"})
    return out


def confirm(c: Console, button: str) -> None:
    """Click an action, then confirm it in the dialog."""
    c.page.get_by_role("button", name=button).click()
    c.page.locator("dialog.confirm button[value=yes]").click()


# --- signing in, the overview --------------------------------------------------------


def test_sign_in_then_the_overview_shows_what_stats_says(make_console: Callable[..., Console], runtime: Runtime) -> None:
    seed(runtime)
    c = make_console()
    c.watch.allow(r"HTTP 401: GET .*/whoami")  # the wrong key below
    c.watch.allow(r"console error: Failed to load resource: .* 401")
    c.page.goto(f"{runtime.origin}/")
    dialog = c.page.locator("dialog.login")
    dialog.locator("#key").fill("not-the-key-at-all")
    dialog.locator("button[type=submit]").click()
    c.page.get_by_text("That key was refused").wait_for()
    dialog.locator("#key").fill(CLIENT_KEY)
    dialog.locator("button[type=submit]").click()
    c.loaded()
    assert c.page.locator("#who").inner_text().startswith("ops")
    assert c.page.evaluate("sessionStorage.length") == 1 and CLIENT_KEY not in c.page.url
    shown = overview_numbers(c)
    assert shown == stats_numbers(runtime.call("GET", "/stats"))
    assert shown["tasks.queued"] == 2 and shown["tasks.failed"] == 1 and shown["workers.total"] == 2
    capacity = c.page.locator("[data-stat=capacity]").inner_text()
    assert capacity.startswith("1 used, 3 free of 4 slots")
    assert c.page.locator("[data-stat=oldest-age]").is_visible()
    assert c.page.locator("figure.chart svg").count() == 2
    c.page.get_by_role("button", name="Last 24 h").click()
    c.page.get_by_text("Last 24 h: ").wait_for()
    c.shot("overview")
    # A reload keeps the key (sessionStorage); a key that stops working returns to the prompt.
    c.page.reload()
    c.loaded()
    c.page.evaluate("sessionStorage.setItem('bloom-runtime.api-key', 'rotated-away-key')")
    c.page.reload()
    c.page.locator("dialog.login").get_by_text("refused").wait_for()


# --- tasks ------------------------------------------------------------------------------


def test_a_task_created_in_the_form_appears_and_cancel_is_audited(admin: Console, runtime: Runtime) -> None:
    c = admin
    c.open("#/tasks/new")
    c.shot("new-task")
    form = c.page.locator("form.task-form")
    form.get_by_label("Context id").fill("ctx-form")
    form.get_by_label("Agent slug").fill("summariser")
    form.get_by_label("Prompt").fill("summarise the news")
    form.get_by_label("Context hints").fill("be brief\nuse bullets")
    form.get_by_label("Timeout (s)").fill("300")
    form.get_by_label("Budget").fill("2.5")
    form.get_by_label("Desired format").select_option("json")
    form.get_by_label("Max attempts").fill("5")
    form.get_by_label("Labels").fill("gpu, big")
    form.get_by_label("Idempotency key").fill("form-key-1")
    form.get_by_role("button", name="Queue the task").click()
    c.page.wait_for_url(re.compile(r"#/tasks/(?!new$)[^/]+$"))
    c.loaded()
    task_id = c.page.url.rsplit("/", 1)[1]
    stored = runtime.call("GET", f"/llm-tasks/{task_id}")
    assert (stored["context_hints"], stored["policy"], stored["desired_format"]) == (["be brief", "use bullets"], {"timeout_sec": 300, "budget": 2.5}, "json")
    assert (stored["max_attempts"], stored["labels"], stored["idempotency_key"]) == (5, ["gpu", "big"], "form-key-1")
    assert "201" in c.page.locator("#answer").inner_text()

    c.open("#/tasks")
    c.page.locator(f"a[href='#/tasks/{task_id}']").click()
    c.loaded()
    assert c.page.locator(".title-line .badge").inner_text() == "queued"
    confirm(c, "Cancel…")
    c.page.locator("#answer").get_by_text("POST cancel → 200").wait_for()
    c.page.locator(".title-line .badge", has_text="cancelled").wait_for()
    trail = c.page.locator("section[aria-labelledby=trail] tbody tr", has_text="task_cancelled")
    trail.wait_for()
    assert "root" in trail.inner_text()
    assert runtime.call("GET", f"/llm-tasks/{task_id}")["status"] == "cancelled"
    c.shot("task")


def test_requeue_of_a_failed_task_is_audited_with_its_leases_and_result(make_console: Callable[..., Console], runtime: Runtime) -> None:
    runtime.call("POST", "/workers", json={"name": "node-1", "capabilities": {"max_concurrency": 2}})
    failed = failed_task(runtime)
    c = make_console()
    c.sign_in(CLIENT_KEY)
    c.open(f"#/tasks/{failed['id']}")
    leases = c.page.locator("section[aria-labelledby=leases] tbody tr")
    assert leases.count() == 1 and "node-1" in leases.inner_text() and "released" in leases.inner_text()
    assert "boom" in c.page.locator("section[aria-labelledby=results]").inner_text()
    assert c.page.get_by_role("button", name="Cancel…").is_disabled()
    confirm(c, "Requeue…")
    c.page.locator(".title-line .badge", has_text="queued").wait_for()
    row = c.page.locator("section[aria-labelledby=trail] tbody tr", has_text="task_requeued")
    row.wait_for()
    assert "ops" in row.inner_text()
    task = runtime.call("GET", f"/llm-tasks/{failed['id']}")
    assert (task["status"], task["attempts"]) == ("queued", 0)
    # Queued again: it can be leased to a chosen worker from here.
    c.page.get_by_label("To").select_option("node-1")
    confirm(c, "Lease…")
    c.page.locator(".title-line .badge", has_text="leased").wait_for()
    assert runtime.call("GET", f"/llm-tasks/{failed['id']}")["worker_id"] == "node-1"


def test_search_filters_and_pages(admin: Console, runtime: Runtime) -> None:
    made = seed(runtime)
    extra = [task(runtime, context_id="ctx-many")["id"] for _ in range(55)]
    c = admin
    c.open("#/tasks?field=context_id&q=ctx-2")
    rows = c.page.locator("main tbody tr")
    assert rows.count() == 1 and made["queued"][1]["id"] in rows.inner_text()
    c.open("#/tasks?status=failed")
    assert c.page.locator("main tbody tr").count() == 1
    c.open(f"#/tasks?field=id&q={made['done']['id']}")
    assert "completed" in c.page.locator("main tbody").inner_text()
    c.open("#/tasks?field=agent_slug&q=critic")
    assert c.page.locator("main tbody tr").count() == 1
    c.open("#/tasks?field=context_id&q=ctx-many")
    assert c.page.locator("main tbody tr").count() == 50
    c.page.get_by_role("button", name="Older →").click()
    c.page.locator("main tbody tr").nth(5).wait_for(state="detached")
    assert c.page.locator("main tbody tr").count() == 5
    assert extra[0] in c.page.locator("main tbody").inner_text()
    c.open("#/tasks?field=context_id&q=nowhere")
    assert "No task matches" in c.page.locator("main tbody").inner_text()
    c.open("#/tasks?status=leased")
    assert c.page.locator("main tbody tr").count() == 1 and "in " in c.page.locator("main tbody td[data-label='Lease expires']").inner_text()


# --- workers, leases, audit -----------------------------------------------------------


def test_a_worker_registered_through_the_api_appears_with_its_capacity(admin: Console, runtime: Runtime) -> None:
    c = admin
    c.open("#/workers")
    assert "No workers yet" in c.page.locator("main").inner_text()
    runtime.call("POST", "/workers", json={"name": "gpu-box", "url": "http://127.0.0.1:9/agent",
                                           "capabilities": {"max_concurrency": 3, "labels": ["gpu", "large"]},
                                           "agent_version": "2.0.1", "os_info": "Debian 12"})
    t = task(runtime)
    runtime.call("POST", f"/llm-tasks/{t['id']}/lease", json={"worker_id": "gpu-box"})
    c.page.locator("[data-capacity=gpu-box]").wait_for()
    assert c.page.locator("[data-capacity=gpu-box]").inner_text() == "1 / 3"
    meter = c.page.locator("meter[aria-label^='gpu-box']")
    assert (meter.get_attribute("value"), meter.get_attribute("max")) == ("1", "3")
    row = c.page.locator("main tbody tr", has_text="gpu-box").inner_text()
    for shown in ("gpu", "large", "2.0.1", "Debian 12", "http://127.0.0.1:9/agent", "online"):
        assert shown in row
    c.shot("workers")
    c.open("#/leases")
    assert "gpu-box" in c.page.locator("section[aria-labelledby=active] tbody").inner_text()
    c.shot("leases")
    c.open("#/audit?action=worker_registered")
    assert c.page.locator("main tbody tr").count() == 1
    c.shot("audit")


def test_a_dispatched_task_shows_its_delivery_and_a_self_registered_url_shows_unverified(
    admin: Console, runtime: Runtime, agents: Callable[..., Any]
) -> None:
    agent = agents("node-push")
    runtime.call("POST", "/workers", json={"name": "node-push", "url": agent.url})  # an admin's URL: verified
    # An agent registering itself with a client key: its URL is kept, unverified.
    mine = agents("node-self")
    assert mine.register(runtime.origin) == 401
    mine.runtime_api_key = CLIENT_KEY
    assert mine.register(runtime.origin) == 201
    c = admin
    c.open("#/workers")
    self_row = c.page.locator("main tbody tr", has_text="node-self").inner_text()
    assert mine.url in self_row and "unverified" in self_row
    assert "verified" in (push_row := c.page.locator("main tbody tr", has_text="node-push").inner_text())
    assert "unverified" not in push_row
    c.shot("workers-urls")

    t = task(runtime, prompt="push me")
    c.open(f"#/tasks/{t['id']}")
    section = c.page.locator("section[aria-labelledby=delivery]")
    assert "Never pushed" in section.inner_text()
    assert "no push" in c.page.get_by_label("To").locator("option", has_text="node-self").inner_text()
    c.page.get_by_label("To").select_option("node-push")
    confirm(c, "Dispatch…")
    c.page.locator("#answer").get_by_text("POST dispatch → 202").wait_for()
    section.locator(".badge", has_text="answered").wait_for()
    shown = section.inner_text()
    assert "node-push" in shown and agent.url in shown and "HTTP 200" in shown and "its result arrived" in shown
    assert agent.executions()[0]["prompt"] == "push me"
    assert runtime.call("GET", f"/llm-tasks/{t['id']}")["status"] == "completed"
    c.shot("task-delivery")


def test_a_key_without_admin_sees_admin_actions_disabled_and_the_server_refuses_them(make_console: Callable[..., Console], runtime: Runtime) -> None:
    runtime.call("POST", "/workers", json={"name": "node-1"})
    c = make_console()
    c.sign_in(CLIENT_KEY)
    c.open("#/workers")
    remove = c.page.get_by_role("button", name="Remove node-1")
    assert remove.is_disabled() and "admin" in (remove.get_attribute("title") or "")
    c.open("#/membridge")
    assert c.page.get_by_role("button", name="Save").is_disabled()
    c.watch.allow(r"HTTP 403: DELETE .*/workers/node-1")
    c.watch.allow(r"console error: Failed to load resource: .* 403")
    status = c.page.evaluate(
        """async (key) => (await fetch('/api/runtime/workers/node-1', {method: 'DELETE', headers: {'X-Runtime-API-Key': key}})).status""",
        CLIENT_KEY,
    )
    assert status == 403
    assert runtime.call("GET", "/workers/node-1")["id"] == "node-1"


# --- safety ----------------------------------------------------------------------------


def test_markup_from_the_server_is_shown_as_text(admin: Console, runtime: Runtime) -> None:
    runtime.call("POST", "/workers", json={"name": "node-x", "node_id": f"node {XSS_IMG}", "os_info": XSS_SCRIPT,
                                           "agent_version": XSS_IMG[:100]})
    t = task(runtime, prompt=f"{XSS_SCRIPT} and {XSS_IMG}", context_id=f"ctx {XSS_IMG}", agent_slug=XSS_SCRIPT)
    runtime.call("POST", f"/llm-tasks/{t['id']}/lease", json={"worker_id": "node-x"})
    runtime.call("POST", f"/llm-tasks/{t['id']}/complete", json={"status": "success", "output": f"{XSS_IMG} {XSS_SCRIPT}"})
    c = admin
    for hash_, region in ((f"#/tasks/{t['id']}", "main"), ("#/tasks", "main tbody"), ("#/workers", "main tbody"), ("#/audit", "main tbody")):
        c.open(hash_)
        text = c.page.locator(region).inner_text()
        assert XSS_SCRIPT in text or XSS_IMG in text, hash_
        assert c.page.locator("main img, main script").count() == 0, hash_
        assert c.page.evaluate("window.__pwned") is None, hash_
    c.open(f"#/tasks/{t['id']}")
    assert c.page.locator("section[aria-labelledby=prompt] pre").inner_text() == f"{XSS_SCRIPT} and {XSS_IMG}"
    assert f"{XSS_IMG} {XSS_SCRIPT}" in c.page.locator("section[aria-labelledby=results]").inner_text()
    detail = c.page.locator("section[aria-labelledby=trail] tbody tr", has_text="task_created").inner_text()
    assert XSS_IMG in detail
    c.open("#/workers")
    assert XSS_SCRIPT in c.page.locator("main tbody").inner_text()


def test_responses_carry_a_strict_policy(make_console: Callable[..., Console], runtime: Runtime) -> None:
    c = make_console()
    page = c.page.goto(f"{runtime.origin}/")
    headers = page.all_headers()
    csp = headers["content-security-policy"]
    for rule in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert rule in csp
    assert "unsafe" not in csp
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assets = [r for r in c.watch.requests if "/console/" in r]
    assert assets and all(r.startswith("GET ") for r in assets)
    c.page.locator("dialog.login").wait_for()


# --- every page: light, dark, phone width, keyboard -------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_page_renders_without_errors(make_console: Callable[..., Console], runtime: Runtime, scheme: str) -> None:
    made = seed(runtime)
    c = make_console(color_scheme=scheme)
    c.sign_in(ADMIN_KEY)
    background = c.page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert (background == "rgb(20, 24, 27)") == (scheme == "dark"), background
    for name, hash_ in {**PAGES, "task": f"#/tasks/{made['done']['id']}"}.items():
        c.open(hash_)
        assert c.page.locator("main h1").inner_text()
        if scheme == "dark":
            c.shot(f"{name}-dark")


def test_phone_width_has_no_sideways_scroll(make_console: Callable[..., Console], runtime: Runtime) -> None:
    made = seed(runtime)
    c = make_console(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    c.sign_in(ADMIN_KEY)
    for name, hash_ in {**PAGES, "task": f"#/tasks/{made['done']['id']}"}.items():
        c.open(hash_)
        overflow = c.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, (name, overflow)
        c.shot(f"{name}-phone")


def test_keyboard_alone_reaches_the_pages(admin: Console) -> None:
    c = admin
    c.page.locator(".skip").focus()  # the first stop of the page: shown once focused
    assert c.page.locator(".skip").bounding_box()["x"] >= 0
    c.page.keyboard.press("Enter")
    assert c.page.evaluate("document.activeElement.id") == "main"
    c.page.locator(".skip").focus()
    for _ in range(3):  # brand, Overview, Tasks
        c.page.keyboard.press("Tab")
    assert c.page.evaluate("document.activeElement.textContent") == "Tasks"
    c.page.keyboard.press("Enter")
    c.page.wait_for_url("**/#/tasks")
    c.loaded()
    assert c.page.locator("nav a[aria-current=page]").inner_text() == "Tasks"
    c.page.get_by_label("Status").focus()
    c.page.keyboard.press("Tab")
    assert c.page.evaluate("document.activeElement.id") == "field"


# --- live refresh -----------------------------------------------------------------------


def test_live_refresh_shows_new_tasks_and_pause_stops_it(make_console: Callable[..., Console], runtime: Runtime) -> None:
    c = make_console()
    c.page.clock.install()
    c.sign_in(ADMIN_KEY)
    c.open("#/tasks")
    fresh = task(runtime)
    c.page.clock.run_for(5000)
    c.page.locator(f"a[href='#/tasks/{fresh['id']}']").wait_for()  # no reload: the page refreshed itself
    c.page.get_by_role("button", name="Pause").click()
    assert c.page.locator("#live-state").inner_text() == "Paused"
    c.page.get_by_role("button", name="Resume").click()
    c.page.locator("#live-state", has_text="Live, every 5 s").wait_for()


def test_one_open_page_makes_a_bounded_number_of_requests(make_console: Callable[..., Console], runtime: Runtime) -> None:
    seed(runtime)
    for _ in range(30):
        task(runtime)
    c = make_console()
    c.page.clock.install()
    c.sign_in(ADMIN_KEY)
    api = lambda: [r for r in c.watch.requests if "/api/" in r]  # noqa: E731
    first = len(api())
    for n in range(1, 4):
        c.page.clock.run_for(5000)
        c.loaded(n)
    per_refresh = (len(api()) - first) / 3
    assert per_refresh == 5, api()  # stats, health, workers, history, queue: whatever the data size
    # Paused, or hidden: nothing at all.
    c.page.get_by_role("button", name="Pause").click()
    before = len(api())
    c.page.clock.run_for(120_000)
    assert len(api()) == before
    c.page.get_by_role("button", name="Resume").click()
    c.loaded(4)
    c.page.evaluate("""() => { Object.defineProperty(document, 'hidden', {value: true, configurable: true});
                               document.dispatchEvent(new Event('visibilitychange')); }""")
    before = len(api())
    c.page.clock.run_for(120_000)
    assert len(api()) == before
    assert "hidden" in c.page.locator("#live-state").inner_text()


# --- membridge --------------------------------------------------------------------------


def _membridge_project(server: Any, name: str, nodes: list[str], primary: str) -> str:
    """A project whose nodes heartbeat to the control plane, as membridge agents do; returns its id."""
    cid = server.add_project(name)
    with requests.Session() as s:
        s.trust_env = False
        for node in nodes:
            s.post(f"{server.url}/agent/heartbeat", json={"node_id": node, "canonical_id": cid, "project_id": name,
                                                          "ip_addrs": ["10.0.0.11"]}, timeout=10).raise_for_status()
        s.post(f"{server.url}/projects/{cid}/leadership/select", json={"primary_node_id": primary}, timeout=10).raise_for_status()
    return cid


def test_membridge_configured_tested_and_its_projects_browsed(admin: Console, runtime: Runtime, membridge_server: Any) -> None:
    c = admin
    cid = _membridge_project(membridge_server, "proj-1", ["node-a", "node-b"], primary="node-a")
    c.open("#/membridge")
    assert "No control plane configured" in c.page.locator("main").inner_text()
    c.page.get_by_label("Control plane URL").fill(membridge_server.url)
    c.page.get_by_label("Admin key (X-MEMBRIDGE-ADMIN)").fill("membridge-admin-secret-1")
    c.page.get_by_role("button", name="Save").click()
    c.page.locator("#answer").get_by_text("POST /config → 200").wait_for()
    c.page.locator("section[aria-labelledby=mb-config] dd", has_text="****").wait_for()  # reloaded after the save
    config = c.page.locator("section[aria-labelledby=mb-config] dl").inner_text()
    assert "membridge-admin-secret-1" not in c.page.locator("main").inner_text() and "****" in config
    c.page.get_by_role("button", name="Test connection").click()
    c.page.locator("#answer").get_by_text("POST /test-connection → 200").wait_for()
    c.page.get_by_role("button", name="Leadership and nodes").first.click()
    c.page.get_by_text(f"Project {cid}").wait_for()
    nodes = c.page.locator("main table").last
    assert "node-a" in nodes.inner_text() and "leader" in nodes.inner_text() and "secondary" in nodes.inner_text()
    c.page.locator("main tr", has_text="node-b").get_by_role("button", name="Make leader…").click()
    c.page.locator("dialog.confirm button[value=yes]").click()
    c.page.locator("#answer").get_by_text("leadership/select → 200").wait_for()
    assert membridge_server.state.leadership[cid] == "node-b"
    [select] = [r for r in membridge_server.requests if r.route.endswith("/leadership/select")][1:]
    assert select.json == {"primary_node_id": "node-b"}
    c.shot("membridge")
