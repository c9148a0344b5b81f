"""What keeps xa-serve standing against cross-site pages and slow clients.

CrossSiteGuard (ASGI middleware): a request that sends `Origin` must come from the server's
own origin (Origin's host:port = the Host header) or one the operator allows
([http] allowed_origins), else 403: any web page the operator opens could otherwise drive a
local server. A POST with a body must be JSON (`application/json`), else 415: text/plain,
form-urlencoded and multipart are what a page may send cross-site without a CORS preflight.
OpenAI's /v1/images/edits takes multipart by its spec: it is accepted there, the Origin check
still applies (a browser always sends Origin on a cross-site POST).

slow_client_protocol (uvicorn): h11's protocol with a deadline on each request head: a
connection that has not sent a whole request head within `head_timeout_s` of opening (or of
its previous response) is closed, so slow connections (one byte a second) do not hold the
connection slots (uvicorn has a keep-alive timeout, but none for a head that trickles in).
The body's read time is bounded by the app (app.read_body).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

MULTIPART_ROUTES = frozenset({"/v1/images/edits"})  # multipart by the OpenAI API's spec
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _origin_of(url: str) -> str | None:
    """scheme://host:port of an Origin value (default ports made explicit); None if not a URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


class CrossSiteGuard:
    """ASGI middleware: Origin and Content-Type checks on every request (see the module doc)."""

    def __init__(self, app: Any, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.allowed = {o for o in (_origin_of(a) for a in allowed_origins) if o is not None}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        problem = self.problem(scope, headers)
        if problem is None:
            return await self.app(scope, receive, send)
        status, field, message = problem
        body = json.dumps({"error": message, "field": field}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def problem(self, scope: dict, headers: dict[str, str]) -> tuple[int, str, str] | None:
        origin = headers.get("origin")
        if origin is not None:
            own = _origin_of(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
            seen = _origin_of(origin)
            if seen is None or (seen != own and seen not in self.allowed):
                return (403, "Origin", f"cross-origin request from Origin {origin!r} refused: only this server's own "
                        "origin or one in [http] allowed_origins")
        if scope["method"] not in _BODY_METHODS:
            return None
        has_body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if not has_body or ctype == "application/json" or ctype.endswith("+json"):
            return None
        if scope["path"] in MULTIPART_ROUTES and ctype == "multipart/form-data":
            return None
        want = "application/json" + (" or multipart/form-data" if scope["path"] in MULTIPART_ROUTES else "")
        return (415, "Content-Type", f"Content-Type {ctype or '(none)'!r} refused: the body must be {want}")


def slow_client_protocol(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request head (see the module doc)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientProtocol(H11Protocol):
        _head_timer: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:  # no request in flight: only a slow head
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a whole head arrived: the app bounds its body and its run

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return SlowClientProtocol
