"""Mechanical checks of ops/: the units, init scripts, nginx site and env example.

Each file gets a parse that always runs, and the real tool's check when the tool
is installed (``systemd-analyze verify``, ``nginx -t``); CI needs neither.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bloom_runtime.engine.settings import Settings
from bloom_runtime.worker import DEFAULT_GRACE_S, DEFAULT_POLL_WAIT_S
from bloom_runtime.worker.loop import FINAL_REPORT_S, MAX_BODY_BYTES

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ops"
BIN = "/opt/bloom-runtime/bin/bloom-runtime"
ENV_FILE = "/etc/bloom-runtime.env"
UNITS = ("bloom-runtime.service", "bloom-runtime-migrate.service", "bloom-runtime-worker@.service")
INITD = ("bloom-runtime.initd", "bloom-runtime-worker.initd")
# DESIGN §8
DESIGN_VARIABLES = {
    "DATABASE_URL", "RUNTIME_API_KEY", "MEMBRIDGE_SERVER_URL", "MEMBRIDGE_ADMIN_KEY", "MEMBRIDGE_AGENT_KEY",
    "PORT", "HOST", "RUNTIME_ADMIN_KEY", "RUNTIME_PUBLIC_URL", "LEASE_SWEEP_INTERVAL", "MEMBRIDGE_SYNC_INTERVAL",
    "WORKER_OFFLINE_AFTER", "MEMBRIDGE_ALLOWED_HOSTS",
}  # fmt: skip


# --- systemd ----------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → values (systemd allows repeated keys, which configparser does not)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key), f"not a Key=value line: {line!r}"
        current.setdefault(key, []).append(value)
    assert not pending, "dangling line continuation"
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((OPS / name).read_text())


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value.strip())
    assert m, f"not a time span: {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_sandboxed_and_reads_the_env_file(name: str) -> None:
    u = unit(name)
    assert set(u) >= {"Unit", "Service"}
    svc = u["Service"]
    assert u["Unit"]["Description"][0]
    exec_start = svc["ExecStart"][0].split()
    assert exec_start[0] == BIN
    assert ENV_FILE in svc["EnvironmentFile"]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["ProtectHome"] == ["yes"]
    assert svc.get("DynamicUser") == ["yes"] or svc["User"][0] not in ("", "root")
    assert svc["StateDirectory"], "the only writable place"
    assert svc["CapabilityBoundingSet"] == [""], "no capabilities"


@pytest.mark.parametrize("name", ["bloom-runtime.service", "bloom-runtime-worker@.service"])
def test_long_running_units_restart_and_stop_gracefully(name: str) -> None:
    u = unit(name)
    svc = u["Service"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["KillSignal"] == ["SIGTERM"]
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_server_unit_keeps_sqlite_in_its_state_directory() -> None:
    svc = unit("bloom-runtime.service")["Service"]
    assert svc["DynamicUser"] == ["yes"]
    state = f"/var/lib/{svc['StateDirectory'][0]}"
    assert f"DATABASE_URL=sqlite:///{state}/bloom-runtime.db" in svc["Environment"]
    assert svc["WorkingDirectory"] == [state]
    assert svc["ExecStart"][0].split()[1:] == ["serve"]
    assert seconds(svc["TimeoutStopSec"][0]) > 30, "long polls (30 s) must drain"
    migrate = unit("bloom-runtime-migrate.service")["Service"]
    assert migrate["ExecStart"][0].split()[1:] == ["migrate"]
    assert migrate["Type"] == ["oneshot"]
    # same user and same database as the server, or migrate would write another file
    for key in ("User", "StateDirectory", "Environment", "EnvironmentFile"):
        assert migrate[key] == svc[key], key


def test_worker_unit_stop_timeout_covers_the_grace() -> None:
    svc = unit("bloom-runtime-worker@.service")["Service"]
    assert svc["ExecStart"][0].split()[1:] == ["worker", "--name", "%i"]
    # SIGTERM to the worker only: its tasks must not die before the grace
    assert svc["KillMode"] == ["mixed"]
    assert seconds(svc["TimeoutStopSec"][0]) >= DEFAULT_GRACE_S + DEFAULT_POLL_WAIT_S + FINAL_REPORT_S
    initd = (OPS / "bloom-runtime-worker.initd").read_text()
    stop = int(re.search(r"BLOOM_WORKER_STOP_TIMEOUT:=(\d+)", initd).group(1))
    assert stop == seconds(svc["TimeoutStopSec"][0]), "systemd and OpenRC give the same stop timeout"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed (the parse checks above still ran)")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    names = []
    for name in UNITS:
        # verify insists ExecStart exists: point it at an executable that does
        text = (OPS / name).read_text().replace(BIN, sys.executable)
        target = name.replace("@.service", "@ci.service")
        (tmp_path / target).write_text(text)
        names.append(target)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    # verify exits 0 on unknown keys and bad values ("…, ignoring"): read what it says about our files
    ours = [line for line in output.splitlines() if any(n in line for n in names)]
    assert proc.returncode == 0 and not ours, output


# --- OpenRC -----------------------------------------------------------------------


@pytest.mark.parametrize("name", INITD)
def test_openrc_script_parses_and_uses_supervise_daemon(name: str) -> None:
    path = OPS / name
    text = path.read_text()
    assert text.startswith("#!/sbin/openrc-run\n")
    assert os.access(path, os.X_OK), "init scripts must be executable"
    for shell in ("sh", "dash", "busybox"):
        exe = shutil.which(shell)
        if exe:
            args = [exe, "sh", "-n", str(path)] if shell == "busybox" else [exe, "-n", str(path)]
            proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, f"{shell}: {proc.stderr}"
    assert re.search(r'^supervisor="supervise-daemon"$', text, re.M)
    assert re.search(r'^command="\$BLOOM_RUNTIME_BIN"$', text, re.M) and BIN in text
    assert re.search(r"^depend\(\) \{", text, re.M)
    assert re.search(r'^retry="TERM/', text, re.M)
    assert ENV_FILE in text
    assert "[[" not in text and "function " not in text, "busybox ash has no bashisms"


# --- nginx ------------------------------------------------------------------------


def nginx_statements(text: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(enclosing block names, directive words) for every statement; checks the braces."""
    text = re.sub(r"#[^\n]*", "", text)
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};]+', text)
    stack: list[str] = []
    words: list[str] = []
    out: list[tuple[tuple[str, ...], list[str]]] = []
    for tok in tokens:
        if tok == "{":
            assert words, "block without a name"
            out.append((tuple(stack), words))
            stack.append(" ".join(words))
            words = []
        elif tok == "}":
            assert not words, f"statement without ';' before '}}': {words}"
            assert stack, "unbalanced '}'"
            stack.pop()
        elif tok == ";":
            assert words, "empty statement"
            out.append((tuple(stack), words))
            words = []
        else:
            words.append(tok)
    assert not stack, f"unclosed block(s): {stack}"
    assert not words, f"statement without ';' at the end: {words}"
    return out


# Directives the site may use; a known name inside a statement means a missing ';'.
NGINX_DIRECTIVES = {
    "upstream", "least_conn", "server", "keepalive", "map", "listen", "server_name", "return",
    "ssl_certificate", "ssl_certificate_key", "ssl_protocols", "ssl_prefer_server_ciphers",
    "ssl_session_cache", "ssl_session_timeout", "ssl_session_tickets", "add_header",
    "client_max_body_size", "client_body_buffer_size", "location", "proxy_pass", "proxy_http_version",
    "proxy_set_header", "proxy_connect_timeout", "proxy_send_timeout", "proxy_read_timeout",
    "proxy_next_upstream", "proxy_next_upstream_tries", "access_log",
}  # fmt: skip


def test_nginx_site_has_tls_limits_and_proxy_headers() -> None:
    stmts = nginx_statements((OPS / "nginx-bloom-runtime.conf").read_text())
    for ctx, words in stmts:
        if any(c.startswith("map ") for c in ctx):
            continue  # map entries are pairs of values, not directives
        assert words[0] in NGINX_DIRECTIVES, f"unknown directive {words[0]!r}"
        joined = [w for w in words[1:] if w in NGINX_DIRECTIVES and w != "server"]
        assert not joined, f"missing ';' before {joined[0]!r} in {' '.join(words)!r}"
    flat = [" ".join(w) for _, w in stmts]
    upstream = [w for ctx, w in stmts if ctx and ctx[0].startswith("upstream") and w[0] == "server"]
    assert len(upstream) >= 2, "several runtime instances"
    assert any(re.fullmatch(r"listen (\[::\]:)?443 ssl.*", s) for s in flat)
    assert any(s.startswith("ssl_certificate ") for s in flat) and any(s.startswith("ssl_certificate_key ") for s in flat)
    assert "ssl_protocols TLSv1.2 TLSv1.3" in flat
    body = [w[1] for _, w in stmts if w[0] == "client_max_body_size"]
    assert body == ["2m"] and 2 * 1024 * 1024 == MAX_BODY_BYTES == Settings().max_body_bytes
    api = [w for ctx, w in stmts if any(c == "location /api/" for c in ctx)]
    headers = {w[1]: w[2] for w in api if w[0] == "proxy_set_header"}
    assert headers["X-Forwarded-Proto"] == "$scheme"
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["Host"] == "$host"
    assert headers["X-Request-Id"].startswith("$")
    assert ["proxy_pass", "http://bloom_runtime"] in api
    read_timeout = [seconds(w[1]) for w in api if w[0] == "proxy_read_timeout"]
    assert read_timeout and read_timeout[0] >= 30 + 15, "a 30 s long poll plus slack"
    assert not any(w[0] == "proxy_next_upstream" and "non_idempotent" in w for w in api), "POSTs must not be replayed"


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (the parse check above still ran)")
def test_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    site = (OPS / "nginx-bloom-runtime.conf").read_text()
    site = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
    site = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {tmp_path}/site.conf;\n}}\n"
    )
    proc = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "logs/error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


# --- the env example ---------------------------------------------------------------


def documented_variables() -> dict[str, str]:
    """NAME → the comment block above its (possibly commented-out) assignment."""
    found: dict[str, str] = {}
    comment: list[str] = []
    for line in (OPS / "bloom-runtime.env.example").read_text().splitlines():
        if m := re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line):
            assert m.group(1) not in found, f"{m.group(1)} appears twice"
            found[m.group(1)] = " ".join(comment)
            if not line.startswith("#"):
                value = m.group(2)
                assert not re.search(r"\s", value) or re.fullmatch(r'"[^"$`\\]*"', value), f"quote values with spaces: {line}"
            continue
        if line.startswith("#"):
            comment.append(line.lstrip("# ").strip())
        elif not line.strip():
            comment = []
        else:
            raise AssertionError(f"not a NAME=value line or a comment: {line!r}")
    return found


def variables_the_code_reads() -> set[str]:
    server = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', inspect.getsource(Settings.from_env)))
    worker_src = "".join((REPO / "bloom_runtime" / "worker" / f).read_text() for f in ("__init__.py", "cli.py"))
    worker = set(re.findall(r'"((?:RUNTIME|WORKER)_[A-Z0-9_]+)"', worker_src))
    return server | worker


def test_env_example_documents_every_variable() -> None:
    documented = documented_variables()
    wanted = DESIGN_VARIABLES | variables_the_code_reads()
    assert {"DB_POOL_SIZE", "RATE_LIMIT_PER_S", "MAX_BODY_BYTES", "LEASE_FENCING", "WORKER_EXEC"} <= wanted
    missing = sorted(wanted - set(documented))
    assert not missing, f"undocumented in bloom-runtime.env.example: {missing}"
    undescribed = sorted(name for name, comment in documented.items() if len(comment) < 15)
    assert not undescribed, f"no comment above: {undescribed}"
    stale = sorted(set(documented) - wanted)
    assert not stale, f"documented but read by nothing: {stale}"


def test_env_example_is_valid_for_sh() -> None:
    proc = subprocess.run(
        ["sh", "-c", 'set -a; . "$1"; set +a; printf "%s\\n" "$HOST:$PORT"', "sh", str(OPS / "bloom-runtime.env.example")],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "127.0.0.1:5000"


def test_readme_covers_the_deployment_guide() -> None:
    text = (OPS / "README.md").read_text()
    for needle in (
        "Single node, SQLite",
        "Single node, PostgreSQL",
        "Several runtime instances",
        "`migrate`: once",
        "without downtime",
        ".backup",
        "pg_dump",
        "Rotating the API key",
    ):
        assert needle in text, needle
    for name in (*UNITS, *INITD, "nginx-bloom-runtime.conf", "bloom-runtime.env.example"):
        assert (OPS / name).exists() and name in text, name
