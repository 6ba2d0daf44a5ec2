"""Runtime settings: environment variables, overridable by CLI flags or arguments.

Every setting has an environment variable of the same name (upper case).
Secrets are kept in ``Secret`` wrappers whose repr is masked, so a settings
object can be logged safely.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bloom_runtime.engine.errors import ConfigError

MIB = 1024 * 1024


class Secret:
    """A string that never shows itself in repr/str (use ``.reveal()``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str | None:
        return mask(self._value)

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def mask(value: str | None) -> str | None:
    """Show at most the last 4 characters of a secret, and only of a long one."""
    if not value:
        return None
    return "****" + value[-4:] if len(value) >= 12 else "****"


def mask_ends(value: str | None) -> str | None:
    """The first version's masked key, ``adm-****cdef``: its first and last 4 characters,
    and only of a key of 16 or more (of a shorter one they would give too much away)."""
    if not value:
        return None
    return value[:4] + "****" + value[-4:] if len(value) >= 16 else "****"


@dataclass(frozen=True)
class ApiKey:
    """A client key; ``name`` is what the audit log records as the actor."""

    name: str
    secret: Secret


def _printable_ascii(value: str) -> bool:
    # What a client can send in a header and we compare byte for byte: no spaces, no controls.
    return value.isascii() and value.isprintable() and " " not in value


def parse_api_keys(spec: str | None, *, default_prefix: str = "key", variable: str = "RUNTIME_API_KEY") -> tuple[ApiKey, ...]:
    """Parse ``"ops=k1,ci=k2,k3"``: named pairs, or bare keys named ``key1``, ``key2``…

    A list that names no key at all (``","``) is refused rather than read as "no auth"."""
    if not spec or not spec.strip():
        return ()
    keys: list[ApiKey] = []
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, secret = part.partition("=")
        if not sep:
            name, secret = f"{default_prefix}{i + 1}", part
        name, secret = name.strip(), secret.strip()
        if not name or not secret:
            raise ConfigError(f"{variable}: API keys must be 'name=key' pairs or bare keys, separated by commas")
        if len(secret) < 8:
            raise ConfigError(f"{variable}: API key {name!r} is shorter than 8 characters")
        if not _printable_ascii(secret):
            raise ConfigError(f"{variable}: API key {name!r} must be printable ASCII without spaces (no header could match it)")
        keys.append(ApiKey(name, Secret(secret)))
    if not keys:
        raise ConfigError(f"{variable} names no key (it holds only commas and spaces); unset it to run without auth")
    check_distinct(keys, variable)
    return tuple(keys)


def check_distinct(keys: list[ApiKey], where: str) -> None:
    """Refuse two keys with one name (one would shadow the other) or one value under two names."""
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: API key names must be unique")
    seen: dict[str, str] = {}
    for k in keys:
        other = seen.setdefault(k.secret.reveal(), k.name)
        if other != k.name:
            raise ConfigError(f"{where}: keys {other!r} and {k.name!r} have the same value; give each key its own")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 5000
    threads: int = 64  # waitress threads; long polls each hold one
    api_keys: tuple[ApiKey, ...] = ()
    admin_keys: tuple[ApiKey, ...] = ()
    membridge_server_url: str | None = None
    membridge_admin_key: Secret | None = None
    membridge_agent_key: Secret | None = None
    membridge_allowed_hosts: str | None = None
    public_url: str | None = None
    lease_sweep_interval_s: float = 2.0
    membridge_sync_interval_s: float = 10.0
    worker_offline_after_s: float = 60.0
    pool_min: int = 2
    pool_max: int = 16
    db_connect_timeout_s: float = 5.0
    db_open_wait_s: float = 10.0
    db_statement_timeout_s: float = 5.0  # PostgreSQL: longest statement, and round trip (+1 s); 0: unbounded
    ask_timeout_s: float = 30.0
    audit_backlog_max_s: float = 10.0  # /health is unhealthy while an audit entry waits longer than this
    audit_group_commit: bool = True
    audit_batch_max: int = 2000
    write_batch_max: int = 256
    actor_shards: int = 0  # task-queue / lease-supervisor shards; 0: one of each (bigger batches beat more transactions)
    retry_backoff_base_ms: int = 1000
    retry_backoff_cap_ms: int = 60_000
    lease_fencing: str = "lenient"  # or "strict": heartbeat/complete must name the lease
    max_body_bytes: int = 2 * MIB
    max_in_flight: int = 256
    rate_limit_per_s: float = 50.0
    rate_limit_burst: int = 200
    rate_limit_fleet_factor: float = 4.0  # a key's worker calls in total: this many times rate and burst
    insecure_no_auth: bool = False
    # Push dispatch: the wait for an agent's answer is policy.timeout_sec + this grace
    # (the agent answers only once the run is over and its result was sent).
    dispatch_grace_s: float = 60.0
    dispatch_max_in_flight: int = 256  # deliveries waiting for an answer at once (one thread each)
    auto_dispatch: bool = True  # push queued tasks to workers with a verified URL without being asked
    agent_probe_interval_s: float = 10.0  # GET {url}/health of push workers; 0: never
    history_retention_days: float = 7.0  # per-minute history rows older than this are pruned
    history_tick_s: float = 5.0  # how often the history sampler looks for a closed minute
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def callback_known(self) -> bool:
        """Whether agents elsewhere can call back: RUNTIME_PUBLIC_URL is set, or HOST is loopback
        (then they run on this machine)."""
        return bool(self.public_url) or is_loopback(self.host)

    @property
    def callback_base_url(self) -> str:
        """The base URL workers use to call back (``RUNTIME_PUBLIC_URL``)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``env`` (default ``os.environ``); ``overrides`` win when not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}

        def text(name: str) -> str | None:
            v = env.get(name)
            return v.strip() if v and v.strip() else None

        def flag(name: str) -> bool | None:
            raw = text(name)
            if raw is None:
                return None
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name} must be on or off, got {raw!r}")

        def number(name: str, kind: type, low: float, high: float) -> Any:
            raw = text(name)
            if raw is None:
                return None
            try:
                v = kind(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {raw!r}") from None
            if not low <= v <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, got {raw}")
            return v

        values["database_url"] = text("DATABASE_URL")
        values["host"] = text("HOST")
        values["port"] = number("PORT", int, 0, 65535)
        values["threads"] = number("THREADS", int, 4, 1024)
        values["api_keys"] = parse_api_keys(env.get("RUNTIME_API_KEY")) or None
        values["admin_keys"] = parse_api_keys(env.get("RUNTIME_ADMIN_KEY"), default_prefix="admin", variable="RUNTIME_ADMIN_KEY") or None
        values["membridge_server_url"] = text("MEMBRIDGE_SERVER_URL")
        for name in ("MEMBRIDGE_ADMIN_KEY", "MEMBRIDGE_AGENT_KEY"):
            raw = text(name)
            values[name.lower()] = Secret(raw) if raw else None
        values["membridge_allowed_hosts"] = text("MEMBRIDGE_ALLOWED_HOSTS")
        values["public_url"] = text("RUNTIME_PUBLIC_URL")
        values["lease_sweep_interval_s"] = number("LEASE_SWEEP_INTERVAL", float, 0.05, 3600)
        values["membridge_sync_interval_s"] = number("MEMBRIDGE_SYNC_INTERVAL", float, 0.05, 86400)
        values["worker_offline_after_s"] = number("WORKER_OFFLINE_AFTER", float, 1, 86400 * 30)
        values["pool_max"] = number("DB_POOL_SIZE", int, 1, 500)
        values["db_open_wait_s"] = number("DB_OPEN_WAIT", float, 0.1, 3600)
        values["db_statement_timeout_s"] = number("DB_STATEMENT_TIMEOUT", float, 0, 86400)
        values["lease_fencing"] = text("LEASE_FENCING")
        values["max_body_bytes"] = number("MAX_BODY_BYTES", int, 1024, 1024 * MIB)
        values["max_in_flight"] = number("MAX_IN_FLIGHT", int, 1, 100_000)
        values["rate_limit_per_s"] = number("RATE_LIMIT_PER_S", float, 0, 1e9)
        values["rate_limit_burst"] = number("RATE_LIMIT_BURST", int, 1, 10**9)
        values["rate_limit_fleet_factor"] = number("RATE_LIMIT_FLEET_FACTOR", float, 1, 10_000)
        values["dispatch_grace_s"] = number("DISPATCH_GRACE", float, 1, 86400)
        values["dispatch_max_in_flight"] = number("DISPATCH_MAX_IN_FLIGHT", int, 1, 10_000)
        values["auto_dispatch"] = flag("AUTO_DISPATCH")
        values["agent_probe_interval_s"] = number("AGENT_PROBE_INTERVAL", float, 0, 86400)
        values["history_retention_days"] = number("HISTORY_RETENTION_DAYS", float, 1, 3650)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**{k: v for k, v in values.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.lease_fencing not in ("lenient", "strict"):
            raise ConfigError("LEASE_FENCING must be 'lenient' or 'strict'")
        if self.public_url:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("RUNTIME_PUBLIC_URL must be an http(s) URL with a host")
        if self.pool_min > self.pool_max:
            raise ConfigError("pool_min must not exceed pool_max")
        if self.agent_probe_interval_s and self.agent_probe_interval_s > self.worker_offline_after_s / 2:
            # A probe success must come before the worker counts as silent, or it flaps.
            raise ConfigError("AGENT_PROBE_INTERVAL must be at most half of WORKER_OFFLINE_AFTER (or 0: no probes)")
        admin_names = {k.name for k in self.admin_keys}
        for k in self.api_keys:
            if k.name in admin_names:
                # The authenticator keys principals by name: one of the two would be dropped.
                raise ConfigError(
                    f"API key name {k.name!r} is both a client key and an admin key; "
                    "admin keys are valid client keys already, so list it once (in RUNTIME_ADMIN_KEY) or rename one"
                )
        check_distinct([*self.api_keys, *self.admin_keys], "RUNTIME_API_KEY and RUNTIME_ADMIN_KEY")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)
