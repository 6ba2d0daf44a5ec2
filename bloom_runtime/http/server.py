"""``bloom-runtime serve``: the app under waitress, with a draining shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

import msgspec
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.settings import Settings, is_loopback
from bloom_runtime.http.app import RuntimeApp, create_app

log = logging.getLogger("bloom_runtime.http.server")

DRAIN_TIMEOUT_S = 10.0  # in-flight requests get this long to finish on shutdown
SIGNAL_POLL_S = 0.2  # longest the main thread sleeps before looking for a signal
SHORT_DRAIN_S = 2.0  # before the engine stops: short requests finish while it still takes work
POLL_S = 0.02
# Waitress buffers a whole body before the app runs; cap it well above the app's own
# limit so the app answers 413 as JSON for anything plausible.
WAITRESS_BODY_FACTOR = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``serve``; each falls back to the environment variable of the same name."""
    parser.add_argument("--host", help="address to bind (HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (PORT, default 5000; 0 picks a free one)")
    parser.add_argument("--threads", type=int, help="waitress threads (THREADS, default 64); long polls hold one each")
    parser.add_argument("--database-url", help="postgresql://… or sqlite:///path (DATABASE_URL)")
    parser.add_argument("--lease-fencing", choices=["lenient", "strict"], help="strict: heartbeat/complete must name the lease (LEASE_FENCING)")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (MAX_BODY_BYTES, default 2 MiB)")
    parser.add_argument("--max-in-flight", type=int, help="requests in flight before 503 (MAX_IN_FLIGHT)")
    parser.add_argument("--rate-limit-per-s", type=float, help="tokens per second per key; 0 disables (RATE_LIMIT_PER_S)")
    parser.add_argument("--rate-limit-burst", type=int, help="bucket size (RATE_LIMIT_BURST)")
    parser.add_argument("--lease-sweep-interval", type=float, help="seconds between expiry sweeps (LEASE_SWEEP_INTERVAL)")
    parser.add_argument("--public-url", help="base URL workers call back (RUNTIME_PUBLIC_URL)")
    parser.add_argument("--dispatch-grace", type=float,
                        help="seconds added to policy.timeout_sec while waiting for an agent's answer (DISPATCH_GRACE, default 60)")
    parser.add_argument("--auto-dispatch", action=argparse.BooleanOptionalAction, default=None,
                        help="push queued tasks to workers with a verified URL by themselves (AUTO_DISPATCH, default on)")
    parser.add_argument("--agent-probe-interval", type=float,
                        help="seconds between GET /health probes of push workers; 0: none (AGENT_PROBE_INTERVAL, default 10)")
    parser.add_argument(
        "--insecure-no-auth", action="store_true", default=None,
        help="allow a non-loopback bind with no RUNTIME_API_KEY (INSECURE_NO_AUTH)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    import os

    insecure = args.insecure_no_auth or os.environ.get("INSECURE_NO_AUTH", "").strip().lower() in ("1", "true", "yes")
    return Settings.from_env(
        host=args.host,
        port=args.port,
        threads=args.threads,
        database_url=args.database_url,
        lease_fencing=args.lease_fencing,
        max_body_bytes=args.max_body_bytes,
        max_in_flight=args.max_in_flight,
        rate_limit_per_s=args.rate_limit_per_s,
        rate_limit_burst=args.rate_limit_burst,
        lease_sweep_interval_s=args.lease_sweep_interval,
        public_url=args.public_url,
        dispatch_grace_s=args.dispatch_grace,
        auto_dispatch=args.auto_dispatch,
        agent_probe_interval_s=args.agent_probe_interval,
        insecure_no_auth=insecure or None,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.auth_enabled and not is_loopback(settings.host) and not settings.insecure_no_auth:
        print(
            f"bloom-runtime: refusing to serve on {settings.host} without RUNTIME_API_KEY (use --insecure-no-auth to override)",
            file=sys.stderr,
        )
        return 2
    if not settings.public_url and not is_loopback(settings.host) and (settings.auto_dispatch or settings.membridge_server_url):
        # Agents call back on RUNTIME_PUBLIC_URL; guessed from HOST it would be this machine's loopback.
        print(
            f"bloom-runtime: RUNTIME_PUBLIC_URL must be set when serving on {settings.host} with push dispatch "
            "(the URL worker agents call back on); set it, or AUTO_DISPATCH=off with no MEMBRIDGE_SERVER_URL "
            "for a pull-only fleet",
            file=sys.stderr,
        )
        return 2
    engine = Engine.start(settings)
    try:
        return _serve(engine, settings)
    finally:
        engine.stop()


class JsonErrorTask(ErrorTask):
    """Waitress's own refusals (400 malformed request, 413, 431, 501) in our JSON error shape."""

    SIZE_MESSAGES = {413: "request body too large", 431: "request headers too large"}

    def execute(self) -> None:
        error = self.request.error
        # Some of waitress's messages quote the offending request line; keep only its own words.
        detail = str(error.body or "").split('"', 1)[0].strip().rstrip(":.").lower()
        message = self.SIZE_MESSAGES.get(error.code) or detail or error.reason.lower()
        body = msgspec.json.encode({"error": message})
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def make_server(engine: Engine, settings: Settings) -> tuple[Any, RuntimeApp]:
    """The app and the waitress server bound to ``settings.host``/``port`` (not yet running)."""
    holder: dict[str, Any] = {}

    def backlog() -> int:
        server = holder.get("server")
        return len(server.task_dispatcher.queue) if server is not None else 0

    app = create_app(engine, settings, backlog=backlog)
    sockets: dict[int, Any] = {}
    server = create_server(
        app,
        map=sockets,
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        max_request_body_size=settings.max_body_bytes * WAITRESS_BODY_FACTOR,
        connection_limit=max(100, settings.threads * 4),
        channel_timeout=60,  # longer than the longest long poll (30 s)
        clear_untrusted_proxy_headers=True,
        ident="bloom-runtime",
        asyncore_use_poll=True,  # select() is capped at 1024 descriptors and costs more per call
    )
    for listener in {server, *sockets.values()}:
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = JsonErrorChannel
    holder["server"] = server
    return server, app


def _serve(engine: Engine, settings: Settings) -> int:
    server, app = make_server(engine, settings)
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        # Only a list append: the handler runs between two bytecodes of the main
        # thread, which may hold any lock at that moment.
        received.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    loop = threading.Thread(target=server.run, name="waitress-loop", daemon=False)
    loop.start()
    host, port = server.effective_host, server.effective_port
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"bloom-runtime listening on http://{shown}:{port} ({engine.store.kind})", flush=True)
    try:
        # Short sleeps, not one untimed wait: a signal the kernel hands to another
        # thread runs its Python handler only when the main thread wakes up.
        while not received:
            time.sleep(SIGNAL_POLL_S)
        log.info("signal %s: draining", signal.Signals(received[0]).name)
        _drain(server, app.context.shedder, engine)
    except BaseException:
        # Never leave the (non-daemon) loop thread serving with a stopped engine.
        close_connections(server)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        loop.join(timeout=DRAIN_TIMEOUT_S)
        if not loop.is_alive():
            server.trigger.close()
    log.info("stopped")
    return 0


def close_connections(server: Any) -> None:
    """From any thread: close the listener and every connection, so the loop ends.

    The trigger (the pipe that carries this request to the loop) stays open: closed
    inside the loop, it would race with our own write to it and with task threads
    waking the loop, and a write could then land on a descriptor reused meanwhile.
    Close it with ``server.trigger.close()`` once the loop thread has ended."""
    from waitress import wasyncore

    trigger = server.trigger

    def close_all_but_trigger() -> None:
        for dispatcher in list(server._map.values()):
            if dispatcher is trigger:
                continue
            try:
                # The server's own close() would close the trigger as well.
                wasyncore.dispatcher.close(dispatcher) if dispatcher is server else dispatcher.close()
            except OSError:
                pass
        server._map.clear()

    trigger.pull_trigger(close_all_but_trigger)


def _wait(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def _drain(server: Any, shedder: Any, engine: Engine) -> None:
    """Stop accepting, let requests finish, drain the engine, close every connection."""
    from waitress import wasyncore

    def stop_accepting() -> None:
        server.accepting = False
        try:
            wasyncore.dispatcher.close(server)  # the listening socket only
        except OSError:
            pass

    server.trigger.pull_trigger(stop_accepting)
    shedder.draining = True  # keep-alive connections get 503 + Connection: close
    # Short requests finish while the engine still takes work; long polls end when it stops.
    _wait(lambda: shedder.in_flight == 0, SHORT_DRAIN_S)
    engine.stop()  # wakes long polls (they answer 204), writes pending audit entries
    dispatcher = server.task_dispatcher
    _wait(lambda: shedder.busy == 0 and not dispatcher.queue and dispatcher.active_count == 0, DRAIN_TIMEOUT_S)
    close_connections(server)
    dispatcher.shutdown(timeout=DRAIN_TIMEOUT_S)
