"""API keys for xa-serve: the credentials (flags, XA_API_KEY, the config's [auth] table, a key
file), the ASGI middleware that checks them on every route but the open ones, per-key limits
(requests per minute, concurrent jobs: 429 + Retry-After) and per-key metrics under a key id
(a short hash, never the key).

The rule, route by route (docs/clients.md states it for users):
- open: GET /healthz, GET /readyz (probes), GET / (the playground page: static HTML that holds
  no data; it asks for a key and sends it with each call);
- everything else needs `Authorization: Bearer KEY`: an --api-key, or a "user:pass" of
  --api-auth;
- `Authorization: Basic` (a user:pass of --api-auth) is accepted as well on A1111's routes
  (/sdapi/..., /internal/ping) and on the API docs (/docs, /redoc, /openapi.json), so that a browser can open
  them (it asks for the user and password on the 401's Basic challenge).

Secrets are compared with hmac.compare_digest against every configured secret (no early exit),
never logged, never put in metrics. Importing this module imports neither FastAPI nor torch
(the config reads [auth] through it).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ENV_KEY = "XA_API_KEY"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
BASIC_PREFIXES = ("/sdapi/", "/internal/", "/docs", "/redoc", "/openapi.json")
OPENAI_PREFIXES = ("/v1/images/", "/v1/models")
ANONYMOUS = "anonymous"  # the key id of every request when no key is configured


class AuthError(ValueError):
    """A bad credential setting (flag, config key, key file); the message names it."""


@dataclass
class AuthConfig:
    """Who may call: API keys (Bearer), user:password pairs (Basic, or Bearer "user:pass"),
    and per-key limits (0: none)."""

    api_keys: list[str] = field(default_factory=list)
    users: list[tuple[str, str]] = field(default_factory=list)
    requests_per_minute: int = 0   # generation requests per key per rolling minute
    concurrent_jobs: int = 0       # generation jobs queued or running per key

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.users)

    def merged(self, other: "AuthConfig") -> "AuthConfig":
        """This config plus `other`'s credentials; `other`'s limits where it sets them."""
        return AuthConfig(self.api_keys + [k for k in other.api_keys if k not in self.api_keys],
                          self.users + [u for u in other.users if u not in self.users],
                          other.requests_per_minute or self.requests_per_minute,
                          other.concurrent_jobs or self.concurrent_jobs)


def parse_api_auth(text: str, where: str = "--api-auth") -> list[tuple[str, str]]:
    """A1111's --api-auth: "user:pass[,user2:pass2]" -> [(user, pass), ...]."""
    out = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise AuthError(f"{where}: 'user:password' pairs separated by commas (got an entry without "
                            "a user, a ':' or a password)")  # the entry itself may hold a secret: not echoed
        out.append((user, password))
    return out


def read_key_file(path: str | Path, where: str = "--api-key-file") -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"{where}={str(path)!r}: cannot read it ({type(e).__name__})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise AuthError(f"{where}={str(path)!r}: no key in it (one key per line)")
    return [_checked_key(k, where) for k in keys]


def _checked_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or any(c.isspace() for c in key) or not key.isprintable():
        raise AuthError(f"{where}: a key is a non-empty string of printable characters without spaces")
    return key


def parse_auth_table(table: Any, base: Path = Path(".")) -> AuthConfig:
    """The config's [auth] table: api_keys (list), api_auth ("user:pass,..." or a list of
    "user:pass"), key_file (relative to the config's folder), requests_per_minute,
    concurrent_jobs."""
    cfg = AuthConfig()
    if not isinstance(table, dict):
        raise AuthError("auth: a table ([auth])")
    for key, value in table.items():
        where = f"auth.{key}"
        if key == "api_keys":
            if not isinstance(value, list):
                raise AuthError(f"{where}: a list of keys")
            cfg.api_keys += [_checked_key(k, where) for k in value]
        elif key == "api_auth":
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise AuthError(f"{where}: \"user:pass,...\" or a list of \"user:pass\"")
            for item in items:
                cfg.users += parse_api_auth(item, where)
        elif key == "key_file":
            if not isinstance(value, str):
                raise AuthError(f"{where}: a file path")
            cfg.api_keys += read_key_file(base / value, where)
        elif key in ("requests_per_minute", "concurrent_jobs"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AuthError(f"{where}={value!r}: an integer >= 0 (0: no limit)")
            setattr(cfg, key, value)
        else:
            raise AuthError(f"{where}: unknown key; known: api_keys, api_auth, key_file, requests_per_minute, "
                            "concurrent_jobs")
    return cfg


def key_id(secret: str) -> str:
    """The name a key goes by in metrics and logs: 'k' + 10 hex digits of its SHA-256."""
    return "k" + hashlib.sha256(secret.encode()).hexdigest()[:10]


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyLimited(Exception):
    """Over a key's limit: answered 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Gate:
    """The configured credentials and the per-key state (limits, metrics)."""

    def __init__(self, cfg: AuthConfig, registry: Any = None, retry_after_s: int = 5):
        self.cfg, self.retry_after_s = cfg, retry_after_s
        # (secret, id): Bearer takes API keys and "user:pass"; Basic takes "user:pass"
        self._bearer = [(k.encode(), key_id(k)) for k in cfg.api_keys]
        self._basic = [(f"{u}:{p}".encode(), key_id(f"{u}:{p}")) for u, p in cfg.users]
        self._bearer += self._basic
        self._lock = threading.Lock()
        self._recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._jobs: dict[str, int] = collections.defaultdict(int)
        self._metrics = None
        if registry is not None:
            self._metrics = _key_metrics(registry)

    def key_ids(self) -> list[str]:
        return sorted({i for _, i in self._bearer})

    @staticmethod
    def _match(candidate: bytes, secrets: list[tuple[bytes, str]]) -> str | None:
        found = None
        for secret, ident in secrets:  # every secret is compared: the time does not tell which one matched
            if hmac.compare_digest(candidate, secret):
                found = ident
        return found

    def identify(self, authorization: str | None, basic_ok: bool) -> str | None:
        """The key id of an Authorization header, ANONYMOUS without configured keys, or None."""
        if not self.cfg.enabled:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return self._match(value.strip().encode(), self._bearer)
        if scheme == "basic" and basic_ok:
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
            return self._match(decoded, self._basic)
        return None

    # ------------------------------------------------------------------ limits
    def admit(self, ident: str) -> Callable[[], None]:
        """Count one generation request of key `ident`; KeyLimited past its limits. Returns the
        release to call when the job is finished (it frees the concurrent-job slot)."""
        now = time.monotonic()
        rpm, jobs = self.cfg.requests_per_minute, self.cfg.concurrent_jobs
        with self._lock:
            recent = self._recent[ident]
            while recent and recent[0] <= now - 60.0:
                recent.popleft()
            if rpm and len(recent) >= rpm:
                wait = max(1, math.ceil(recent[0] + 60.0 - now))
                raise KeyLimited(f"key {ident}: over {rpm} generation requests per minute; retry after {wait} s", wait)
            if jobs and self._jobs[ident] >= jobs:
                raise KeyLimited(f"key {ident}: {jobs} generation jobs already queued or running (the limit per "
                                 f"key); retry after {self.retry_after_s} s", self.retry_after_s)
            recent.append(now)
            self._jobs[ident] += 1
            self._set_jobs(ident)
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._jobs[ident] -= 1
                self._set_jobs(ident)

        return release

    def _set_jobs(self, ident: str) -> None:
        if self._metrics is not None:
            self._metrics[1].labels(ident).set(self._jobs[ident])

    def count(self, ident: str | None, status: int) -> None:
        if self._metrics is None:
            return
        if ident is None:
            self._metrics[2].inc()
        else:
            self._metrics[0].labels(ident, str(status)).inc()


def _key_metrics(registry: Any) -> tuple[Any, Any, Any]:
    """The per-key collectors of `registry`, made once per registry (a service may be given
    several apps: each test client, each Ray replica's rebuild)."""
    from prometheus_client import Counter, Gauge

    made = getattr(registry, "_xa_key_metrics", None)
    if made is None:
        made = (Counter("xa_key_requests", "Requests per key id and HTTP status", ["key_id", "status"], registry=registry),
                Gauge("xa_key_jobs", "Generation jobs queued or running per key id", ["key_id"], registry=registry),
                Counter("xa_auth_failures", "Requests refused for a missing or wrong credential", registry=registry))
        registry._xa_key_metrics = made
    return made


def _style(path: str) -> str:
    if path.startswith(OPENAI_PREFIXES):
        return "openai"
    if path.startswith(("/sdapi/", "/internal/")):
        return "a1111"
    return "native"


def refusal_body(path: str, status: int, message: str, code: str, field_name: str | None = None) -> dict[str, Any]:
    """An error body in the shape of the API the path belongs to."""
    style = _style(path)
    if style == "openai":
        kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": field_name, "code": code}}
    if style == "a1111":
        return {"error": code, "detail": message}
    body: dict[str, Any] = {"error": message}
    if field_name is not None:
        body["field"] = field_name
    return body


class AuthMiddleware:
    """Pure ASGI (streaming and disconnect detection pass through untouched): every HTTP
    request but OPEN_PATHS needs a credential; the key id goes to scope["state"]["key_id"]."""

    def __init__(self, app: Any, gate: Gate):
        self.app, self.gate = app, gate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN_PATHS and scope.get("method") in ("GET", "HEAD"):
            scope.setdefault("state", {})["key_id"] = ANONYMOUS
            return await self.app(scope, receive, send)
        basic_ok = path.startswith(BASIC_PREFIXES)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        ident = self.gate.identify(header, basic_ok)
        if ident is None:
            self.gate.count(None, 401)
            message = ("a valid API key: send 'Authorization: Bearer KEY'" +
                       (" or HTTP Basic auth (user:password of --api-auth)" if basic_ok else ""))
            challenge = 'Bearer realm="xa-serve"' + (', Basic realm="xa-serve"' if basic_ok else "")
            body = refusal_body(path, 401, ("missing API key: " if not header else "wrong API key: ") + message,
                                "invalid_api_key", "Authorization")
            return await _send_json(send, 401, body, {"www-authenticate": challenge})
        scope.setdefault("state", {})["key_id"] = ident

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.gate.count(ident, message["status"])
            await send(message)

        await self.app(scope, receive, counted_send)


async def _send_json(send: Any, status: int, body: dict, headers: dict[str, str]) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def from_flags(api_keys: list[str], key_files: list[str], api_auth: list[str], requests_per_minute: int,
               concurrent_jobs: int, environ: dict[str, str] = os.environ) -> AuthConfig:  # noqa: B006
    """The command line's credentials (plus XA_API_KEY); AuthError names the flag."""
    keys = [_checked_key(k, "--api-key") for k in api_keys]
    env = environ.get(ENV_KEY)
    if env:
        keys.append(_checked_key(env.strip(), ENV_KEY))
    for path in key_files:
        keys += read_key_file(path)
    users = [u for text in api_auth for u in parse_api_auth(text)]
    for name, value in (("--requests-per-minute", requests_per_minute), ("--concurrent-jobs", concurrent_jobs)):
        if value < 0:
            raise AuthError(f"{name}={value}: an integer >= 0 (0: no limit)")
    return AuthConfig(keys, users, requests_per_minute, concurrent_jobs)
