"""API key authentication: ``X-Runtime-API-Key`` against every configured key, in constant time."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from bloom_runtime.engine.settings import ApiKey, Settings

HEADER = "X-Runtime-API-Key"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name (the audit actor) and whether it may do admin operations."""

    name: str
    admin: bool


ANONYMOUS_ADMIN = Principal("api", True)  # auth disabled: the first version treated everyone as admin


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        # Admin keys are valid client keys too; each key appears once, admin wins.
        keys: dict[str, tuple[ApiKey, bool]] = {}
        for k in settings.api_keys:
            keys[k.name] = (k, False)
        for k in settings.admin_keys:
            keys[k.name] = (k, True)
        self._admin_configured = bool(settings.admin_keys)
        self._keys = [(k.name, k.secret.reveal().encode(), admin) for k, admin in keys.values()]
        self.enabled = bool(self._keys)

    def authenticate(self, presented: str | None) -> Principal | None:
        """The matching key's principal, or None. Compares against every key, no early exit."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if presented is None:
            return None
        raw = presented.encode("utf-8", "surrogateescape")
        found: Principal | None = None
        for name, secret, admin in self._keys:
            if hmac.compare_digest(raw, secret) and found is None:
                found = Principal(name, admin or not self._admin_configured)
        return found
