"""``python -m bloom_runtime.worker``: the ``worker`` subcommand without the rest of the CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from bloom_runtime.engine.errors import BloomError
from bloom_runtime.worker.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloom_runtime.worker")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except BloomError as exc:
        print(f"bloom-runtime worker: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
