"""Migration files: ``migrations/<dialect>/NNNN_name.sql``, applied in order."""

from __future__ import annotations

import re
from importlib import resources
from typing import NamedTuple

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Migration(NamedTuple):
    version: str  # "0001_initial": the file name without .sql, recorded in schema_migrations
    sql: str


def available(dialect: str) -> list[Migration]:
    """Every migration shipped for ``dialect``, oldest first."""
    folder = resources.files("bloom_runtime.sql").joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        if _FILE.match(entry.name):
            found.append(Migration(entry.name[:-4], entry.read_text("utf-8")))
    found.sort()
    return found


def pending(dialect: str, applied: set[str]) -> list[Migration]:
    """Migrations not yet applied; raise ``SchemaTooNew`` if the database knows more than we do."""
    from bloom_runtime.engine.errors import SchemaTooNew

    known = available(dialect)
    unknown = applied - {m.version for m in known}
    if unknown:
        raise SchemaTooNew(
            f"database schema is newer than this bloom-runtime (unknown migrations: {', '.join(sorted(unknown))}); "
            "upgrade bloom-runtime"
        )
    return [m for m in known if m.version not in applied]
