"""API-key authentication of the HTTP servers (the workers' and the router's), as plain ASGI middleware.

Imports no torch and no engine module: the router process uses it too.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse

from radixlm.errors import error_body

OPEN_ROUTES = frozenset({"/health"})  # answered without a key (load balancers' probes)


class ApiKeyMiddleware:
    """``Authorization: Bearer <key>`` on every route but ``OPEN_ROUTES``, compared in constant time (bytes, so any
    key, ASCII or not, and any header a client sends are compared the same way); a 401 with OpenAI's error object
    otherwise.  Plain ASGI, so that streaming and client-disconnect detection pass through untouched."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # compare_digest runs whatever the scheme, so the time taken says nothing about the header either
            if not hmac.compare_digest(token.strip(), self.expected) or scheme.lower() != b"bearer":
                message = "invalid or missing API key: send 'Authorization: Bearer <key>'"
                await JSONResponse(error_body(message, 401), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
