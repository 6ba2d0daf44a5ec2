"""Named SQL statements, kept in ``queries/<dialect>.sql`` and parsed once at import.

Each statement starts with a ``-- name: <identifier>`` line; the comment lines
right after it are its description. Python code asks for statements by name and
never builds SQL from strings.
"""

from __future__ import annotations

import re
from importlib import resources

# Statements both dialects name alike, chosen by what a read filters on.
SEARCH_QUERIES = {"context_id": "search_tasks_by_context", "agent_slug": "search_tasks_by_agent"}
AUDIT_QUERIES = {  # (by entity, by action) → statement
    (False, False): "list_audit",
    (True, False): "list_audit_by_entity",
    (False, True): "list_audit_by_action",
    (True, True): "list_audit_by_entity_action",
}

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: statement}``; duplicate names are an error."""
    out: dict[str, str] = {}
    marks = list(_NAME.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = "\n".join(
            line for line in text[m.end():end].strip().splitlines() if not line.lstrip().startswith("--")
        ).strip().rstrip(";")
        if m.group(1) in out:
            raise ValueError(f"query {m.group(1)!r} defined twice")
        out[m.group(1)] = body
    return out


def load(dialect: str) -> dict[str, str]:
    """The named statements of ``dialect`` ("postgres" or "sqlite")."""
    text = resources.files("bloom_runtime.sql").joinpath("queries", f"{dialect}.sql").read_text("utf-8")
    return parse(text)
