"""The Falcon app: routes from the route table, the middleware pipeline, errors mapped in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.settings import Settings
from bloom_runtime.http import errors
from bloom_runtime.http.metrics import Metrics, MetricsResource
from bloom_runtime.http.middleware import Gatekeeper, LoadShedder, RequestTracking
from bloom_runtime.http.openapi import OpenApiResource
from bloom_runtime.http.routes import ROUTES

MIN_HEARTBEAT_THREADS = 4


def long_poll_budget(threads: int) -> int:
    """Threads long polls may hold: the rest stay free for heartbeats and the API."""
    return max(1, threads - max(MIN_HEARTBEAT_THREADS, threads // 8))


def client_thread_budget(threads: int) -> int:
    """Threads client calls may hold: the rest stay free for heartbeats and completions."""
    return long_poll_budget(threads)


@dataclass
class AppContext:
    engine: Engine
    settings: Settings
    metrics: Metrics
    shedder: LoadShedder
    metrics_resource: MetricsResource
    openapi_resource: OpenApiResource


class RuntimeApp(falcon.App):
    """A ``falcon.App`` that keeps its context, so the server can reach the shedder."""

    context: AppContext


def create_app(engine: Engine, settings: Settings, *, backlog: Callable[[], int] | None = None) -> RuntimeApp:
    """Build the WSGI app over a started engine. ``backlog``: requests queued in the server."""
    metrics = Metrics(engine)
    shedder = LoadShedder(
        settings.max_in_flight, long_poll_budget(settings.threads), metrics, client_threads=client_thread_budget(settings.threads)
    )
    if backlog is not None:
        shedder.backlog = backlog
    ctx = AppContext(engine, settings, metrics, shedder, MetricsResource(metrics), OpenApiResource())
    app = RuntimeApp(middleware=[RequestTracking(metrics), shedder, Gatekeeper(settings, metrics)])
    app.context = ctx
    # Bodies are read and decoded by our middleware and schemas, not falcon's media handlers.
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    for route in ROUTES:
        app.add_route(route.path, route.make(ctx))
    return app
