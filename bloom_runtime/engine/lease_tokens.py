"""Per-lease callback tokens: what lets a worker act on its own lease without an API key.

A token is derived, not stored: HMAC-SHA256 of the lease id under a random
secret kept in ``runtime_settings``, created once by whichever engine process
starts first, so every process sharing the database agrees and no write path
needs a new column. Knowing a lease id (``GET /leases`` lists them) gives no
token; a token is compared in constant time and is never logged, listed or
audited.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable

from .clock import Clock
from .errors import InvalidInput, StaleLease, StoreUnavailable, Unauthorized
from .models import Fence

SECRET_SETTING = "lease_token_secret"
SECRET_BYTES = 32
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


class LeaseTokens:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def __repr__(self) -> str:
        return "LeaseTokens(****)"

    @classmethod
    def load(cls, store: object, clock: Clock) -> LeaseTokens:
        """The database's secret, created first if this is the first process to need it."""
        stored = store.get_settings()  # type: ignore[attr-defined]
        if SECRET_SETTING not in stored:
            fresh = secrets.token_urlsafe(SECRET_BYTES)
            store.run(lambda tx: tx.add_settings_if_absent({SECRET_SETTING: fresh}, clock.now_ms()))  # type: ignore[attr-defined]
            stored = store.get_settings()  # type: ignore[attr-defined]
        secret = stored.get(SECRET_SETTING)
        if not secret:
            raise StoreUnavailable("lease token secret is missing from runtime_settings")
        return cls(secret)

    def token(self, lease_id: str) -> str:
        """The lease's token: 43 URL-safe characters (256 bits)."""
        mac = hmac.new(self._key, b"lease:" + lease_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def matches(self, lease_id: str, token: str | None) -> bool:
        """Whether ``token`` is ``lease_id``'s, in constant time (a malformed token never is)."""
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            return False
        return hmac.compare_digest(self.token(lease_id).encode(), token.encode())

    def prove(self, fence: Fence, *, strict: bool, held: Callable[[], str | None], task_id: str) -> Fence:
        """The fence to hand the store once ``fence.lease_token`` is checked.

        A token with ``lease_id`` must be that lease's (else ``Unauthorized``); a token
        alone must be the lease the task holds (``held()``; else ``StaleLease``: it may
        be an older lease's). Without a token the fence is used as it is, unless
        ``strict`` (then ``InvalidInput``)."""
        token = fence.lease_token
        if token is None:
            if strict:
                raise InvalidInput("lease_token is required (lease fencing is strict)")
            return fence
        lease_id = fence.lease_id
        if lease_id is not None:
            if not self.matches(lease_id, token):
                raise Unauthorized("lease_token does not match lease_id", lease_id=lease_id)
        else:
            lease_id = held()
            if lease_id is None or not self.matches(lease_id, token):
                raise StaleLease("lease_token is not the task's active lease's", task_id=task_id)
        return Fence(lease_id=lease_id, worker_id=fence.worker_id)
