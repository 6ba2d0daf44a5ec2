"""The operator console: static HTML, CSS and JavaScript modules shipped in the package.

``/`` serves the page; ``/console/{version}/{asset}`` everything it loads. The
version is a hash of every asset, so an upgrade changes every asset URL: assets are
cached for a year, the page is revalidated on each load. Every file is read once,
at first use, and kept in memory with its gzip form. The page only talks to the
public JSON API of this origin; the headers below hold it to that.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

import falcon

PAGE = "index.html"
ASSET_PREFIX = "/console"
VERSION_PLACEHOLDER = "{{assets}}"
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}
ASSET_CACHE = "public, max-age=31536000, immutable"
# No inline script or style, nothing from another origin, no framing, no form posts.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HARDENING = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}


@dataclass(frozen=True)
class File:
    data: bytes
    gzipped: bytes
    content_type: str
    etag: str


def _file(name: str, data: bytes) -> File:
    suffix = name[name.rfind("."):]
    # mtime=0: the same bytes on every start, so ETags hold across restarts.
    return File(data, gzip.compress(data, 9, mtime=0), TYPES[suffix], '"' + hashlib.sha256(data).hexdigest()[:20] + '"')


@dataclass(frozen=True)
class Console:
    version: str
    page: File
    assets: dict[str, File]


@functools.cache
def console() -> Console:
    folder = resources.files("bloom_runtime.http").joinpath("console")
    raw = {entry.name: entry.read_bytes() for entry in folder.iterdir() if entry.name[entry.name.rfind("."):] in TYPES}
    digest = hashlib.sha256()
    for name in sorted(raw):
        digest.update(name.encode() + b"\0" + raw[name] + b"\0")
    version = digest.hexdigest()[:16]
    page = raw.pop(PAGE).replace(VERSION_PLACEHOLDER.encode(), f"{ASSET_PREFIX}/{version}".encode())
    return Console(version, _file(PAGE, page), {name: _file(name, data) for name, data in raw.items()})


def _send(req: falcon.Request, resp: falcon.Response, file: File, cache: str) -> None:
    for name, value in HARDENING.items():
        resp.set_header(name, value)
    resp.set_header("Cache-Control", cache)
    resp.set_header("Vary", "Accept-Encoding")
    zipped = "gzip" in (req.get_header("Accept-Encoding") or "").lower()
    etag = file.etag[:-1] + '-gz"' if zipped else file.etag  # one tag per representation
    resp.set_header("ETag", etag)
    if etag in (req.get_header("If-None-Match") or ""):
        resp.status = falcon.HTTP_304  # no body, so no Content-Type either
        return
    resp.content_type = file.content_type
    if zipped:
        resp.set_header("Content-Encoding", "gzip")
    resp.data = file.gzipped if zipped else file.data


class ConsolePage:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send(req, resp, console().page, "no-cache")


class ConsoleAsset:
    def on_get(self, req: falcon.Request, resp: falcon.Response, version: str, asset: str) -> None:
        files = console()
        file = files.assets.get(asset)
        if version != files.version or file is None:
            raise falcon.HTTPNotFound(description="no such console file (reload the page after an upgrade)")
        _send(req, resp, file, ASSET_CACHE)
