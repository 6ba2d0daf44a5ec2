"""``bloom-runtime migrate``: applies once, says so the second time, fails in one line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DB_OPEN_WAIT"] = "0.5"  # an unreachable server is given up on quickly
    return subprocess.run(
        [sys.executable, "-m", "bloom_runtime.cli", "migrate", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize(
    "url, says",
    [
        ("mysql://user@host/db", "DATABASE_URL must start with"),
        ("sqlite:///", "names no file"),
        ("postgresql://bloom@127.0.0.1:1/nothing", "cannot connect to PostgreSQL at 127.0.0.1:1/nothing"),
        ("postgresql://bloom:s3cret-pass@127.0.0.1:1/nothing", "cannot connect"),
    ],
)
def test_bad_database_url_is_one_line_and_exit_2(url, says):
    done = migrate("--database-url", url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "s3cret-pass" not in done.stderr


def test_missing_sqlite_directory(tmp_path):
    done = migrate("--database-url", f"sqlite:///{tmp_path}/missing/dir/x.db")
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_migrate_sqlite_twice(tmp_path):
    url = f"sqlite:///{tmp_path}/bloom.db"
    first = migrate("--database-url", url)
    assert first.returncode == 0 and "applied 0001_initial" in first.stdout and "applied 0002_fewer_index_entries" in first.stdout
    second = migrate("--database-url", url)
    assert second.returncode == 0 and "nothing to apply" in second.stdout


def test_migrate_postgres_is_idempotent(pg_url):
    # The session database is migrated already: a run applies nothing and says so.
    done = migrate("--database-url", pg_url)
    assert done.returncode == 0 and "nothing to apply" in done.stdout, done.stderr


def test_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/bloom.db"
    assert migrate("--database-url", url).returncode == 0
    conn = sqlite3.connect(tmp_path / "bloom.db")
    with conn:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ('0999_from_the_future', 1)")
    conn.close()
    done = migrate("--database-url", url)
    assert done.returncode == 2 and "newer than this bloom-runtime" in done.stderr
    assert "Traceback" not in done.stderr
