"""One log line per request: a request id (also the response's `X-Request-ID` header; a
client's own id is kept when it is short and plain), method, path, status, seconds; for a
generation also its seed, steps, size, images, queue wait, seconds per stage and outcome.
Text (`key=value ...`) or JSON (`xa-serve --log-format json`, [http] log_format); prompts
only when the operator turns them on ([http] log_prompts), since they may be private.

The generation's details reach the line through scope["state"]["xa_log"] (note() below),
which the handlers fill; the line is written when the response has been sent (or the
client left)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

log = logging.getLogger("xa_runtime.serve.requests")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def note(request: Any, **fields: Any) -> None:
    """Add `fields` to the request's log line (no-op outside RequestLog)."""
    entry = request.scope.get("state", {}).get("xa_log")
    if entry is not None:
        entry.update(fields)


class RequestLog:
    """ASGI middleware writing one line per HTTP request (see the module doc)."""

    def __init__(self, app: Any, log_format: str = "text", log_prompts: bool = False):
        self.app, self.json, self.prompts = app, log_format == "json", log_prompts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID.match(given) else uuid.uuid4().hex[:16]
        entry: dict[str, Any] = {}
        scope.setdefault("state", {})["xa_log"] = entry
        status = [0]
        t0 = time.monotonic()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.write(rid, scope, status[0], time.monotonic() - t0, entry)

    def write(self, rid: str, scope: dict, status: int, seconds: float, entry: dict[str, Any]) -> None:
        if not self.prompts:
            entry = {k: v for k, v in entry.items() if "prompt" not in k}
        line = {"request_id": rid, "method": scope.get("method"), "path": scope.get("path"), "status": status,
                "seconds": round(seconds, 6), **entry}
        if "outcome" not in line:
            line["outcome"] = "ok" if 200 <= status < 400 else ("client_gone" if status == 0 else "refused")
        if self.json:
            log.info(json.dumps(line, default=str, ensure_ascii=False))
        else:
            log.info(" ".join(f"{k}={json.dumps(v, default=str, ensure_ascii=False) if isinstance(v, (str, dict, list)) and k not in ('method', 'path', 'request_id', 'outcome') else v}"
                              for k, v in line.items()))
