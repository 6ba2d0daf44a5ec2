"""``bloom-runtime`` command line: serve | migrate | worker.

Each subcommand lives with its concern; this module only routes to it and turns
configuration and connection errors into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bloom_runtime import __version__
from bloom_runtime.engine.errors import BloomError, ConfigError, NotAdoptable, SchemaTooNew, StoreUnavailable

# subcommand → module providing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "serve": ("bloom_runtime.http.server", "run the HTTP API under waitress"),
    "migrate": ("bloom_runtime.cli", "apply pending database migrations"),
    "worker": ("bloom_runtime.worker.cli", "run a worker that claims tasks and runs a command for each"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``migrate``."""
    parser.add_argument(
        "--database-url",
        help="postgresql://… or sqlite:///path (default: $DATABASE_URL, else ./bloom-runtime.db)",
    )


def run(args: argparse.Namespace) -> int:
    """``migrate``: apply pending migrations; a second run says there is nothing to do."""
    from bloom_runtime.engine.settings import Settings
    from bloom_runtime.sql import store_from_url

    settings = Settings.from_env(database_url=args.database_url)
    store = store_from_url(
        settings.database_url, pool_min=1, pool_max=2, connect_timeout_s=settings.db_connect_timeout_s,
        statement_timeout_s=settings.db_statement_timeout_s,
    )
    store.open(wait_s=settings.db_open_wait_s)
    try:
        applied = store.migrate()
    finally:
        store.close()
    if applied:
        for name in applied:
            print(f"applied {name}")
        print(f"{store.kind} schema up to date ({len(applied)} migration{'s' if len(applied) != 1 else ''} applied)")
    else:
        print(f"{store.kind} schema already up to date; nothing to apply")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bloom-runtime", description="Lease LLM tasks to worker nodes, durably and audited.")
    parser.add_argument("--version", action="version", version=f"bloom-runtime {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,migrate,worker}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(handler=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, StoreUnavailable, SchemaTooNew, NotAdoptable) as exc:
        print(f"bloom-runtime: {exc.message}", file=sys.stderr)
        return 2
    except BloomError as exc:
        print(f"bloom-runtime: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
