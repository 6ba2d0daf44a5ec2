"""HTTP API: the Falcon app (``create_app``) and the ``serve`` command (``server``)."""

from bloom_runtime.http.app import create_app

__all__ = ["create_app"]
