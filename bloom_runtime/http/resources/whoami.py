"""Which kind of key the caller holds: its name and whether it is an admin key (never the key).

Open, so a page can learn whether it must ask for a key without a failing request:
no key gives ``authenticated: false``; a wrong key gives 401 like everywhere else.
"""

from __future__ import annotations

import falcon

from bloom_runtime.engine.settings import Settings
from bloom_runtime.http import schemas
from bloom_runtime.http.auth import HEADER, Authenticator
from bloom_runtime.http.util import send


class WhoAmI:
    def __init__(self, settings: Settings) -> None:
        self.auth = Authenticator(settings)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        presented = req.get_header(HEADER)
        if self.auth.enabled and presented is None:
            send(resp, schemas.WhoAmI(name=None, admin=False, auth_enabled=True, authenticated=False))
            return
        principal = self.auth.authenticate(presented)
        if principal is None:
            raise falcon.HTTPUnauthorized(description=f"missing or wrong {HEADER}", challenges=[f'ApiKey header="{HEADER}"'])
        send(resp, schemas.WhoAmI(name=principal.name, admin=principal.admin, auth_enabled=self.auth.enabled, authenticated=True))
