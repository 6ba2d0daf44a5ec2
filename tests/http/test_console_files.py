"""The console's files as the server sends them: policy and hardening headers, caching
by version, gzip, and no key needed to load them."""

from __future__ import annotations

import gzip

from bloom_runtime.engine.settings import parse_api_keys

from .conftest import ADMIN_KEY, CLIENT_KEY


def test_console_page_and_assets(client) -> None:
    page = client.simulate_get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert page.headers["cache-control"] == "no-cache" and page.headers["x-content-type-options"] == "nosniff"
    assert "{{assets}}" not in page.text and "<script" in page.text
    base = page.text.split('src="', 1)[1].split("/app.js", 1)[0]
    assert base.startswith("/console/")
    app = client.simulate_get(f"{base}/app.js")
    assert app.status_code == 200 and app.headers["content-type"].startswith("text/javascript")
    assert "immutable" in app.headers["cache-control"]
    zipped = client.simulate_get(f"{base}/app.js", headers={"Accept-Encoding": "gzip, br"})
    assert zipped.headers["content-encoding"] == "gzip" and gzip.decompress(zipped.content) == app.content
    assert len(zipped.content) < len(app.content)
    again = client.simulate_get(f"{base}/app.js", headers={"If-None-Match": app.headers["etag"]})
    assert again.status_code == 304 and not again.content
    for missing in (f"{base}/nope.js", "/console/0000000000000000/app.js", f"{base}/index.html"):
        r = client.simulate_get(missing)
        assert r.status_code == 404 and r.json["error"], missing


def test_console_files_need_no_key_and_every_script_is_a_module(make_client) -> None:
    keyed = make_client(api_keys=parse_api_keys(f"ops={CLIENT_KEY}"), admin_keys=parse_api_keys(f"root={ADMIN_KEY}", default_prefix="admin"))
    page = keyed.simulate_get("/")
    assert page.status_code == 200
    assert 'type="module"' in page.text and "onclick" not in page.text and "style=" not in page.text
