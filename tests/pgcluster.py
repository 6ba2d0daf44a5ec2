"""A throwaway PostgreSQL cluster for the test suite.

Used when ``BLOOM_TEST_DATABASE_URL`` is not set: finds the installed server
binaries, runs ``initdb`` (as an unprivileged user when we are root, since initdb
refuses root), starts the server on a free loopback port with durability off
(these databases are thrown away), and removes everything at the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

SUPERUSER = "bloom"


class ClusterUnavailable(RuntimeError):
    pass


def find_bindir() -> str:
    override = os.environ.get("BLOOM_TEST_PG_BINDIR")
    candidates = [override] if override else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += ["/usr/local/pgsql/bin", "/usr/bin"]
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    raise ClusterUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL "
        "(e.g. apt-get install postgresql) or set BLOOM_TEST_DATABASE_URL to a server you own"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayCluster:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.dir = tempfile.mkdtemp(prefix="bloom-pg-")
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            # initdb refuses root: run the server as an unprivileged system user.
            for name in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    continue
                self.user = name
                break
            if self.user is None:
                raise ClusterUnavailable("running as root and no unprivileged user (postgres, nobody) exists")
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, self.user)

    def _run(self, args: Sequence[str]) -> None:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.dir)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(args[:1])} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        data = os.path.join(self.dir, "data")
        self._run([os.path.join(self.bindir, "initdb"), "-D", data, "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"])
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", data, "-l", os.path.join(self.dir, "log"), "-o", opts, "-w", "-t", "60", "start"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self.url
            time.sleep(0.05)
        raise ClusterUnavailable("PostgreSQL did not start listening within 30 s")

    def stop(self) -> None:
        data = os.path.join(self.dir, "data")
        if os.path.exists(data):
            try:
                self._run([os.path.join(self.bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"])
            except ClusterUnavailable:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
