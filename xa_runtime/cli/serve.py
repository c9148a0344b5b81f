"""`xa-serve [--config FILE] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--ray]`: serve X-Adapter over HTTP.

Without --config the built-in tiny random models are served (noise-like images). Models and
plugins are loaded and warmed before the port opens; SIGINT/SIGTERM drain: /readyz and new
requests answer 503, the request in flight (and those queued) finish within
limits.shutdown_timeout_s (then the running one is stopped between steps: 503), exit 0.
--ray serves the same API from Ray Serve replicas (one per GPU; the config's [ray] table).
With --api-key / XA_API_KEY / --api-key-file / --api-auth (or the config's [auth]) every route
but /healthz, /readyz and the playground page needs the key (docs/clients.md); listening on a
non-loopback address without any key needs --allow-no-auth.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import xa_runtime

from ..serve.auth import AuthError, from_flags, is_loopback, key_id
from ..serve.config import ConfigError, check_at_start, load_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="xa-serve", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", metavar="FILE", help="TOML config (models by path, device, dtype fp32/fp16/bf16, "
                    "plugins, limits); default: the built-in tiny models on the CPU")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default %(default)s)")
    ap.add_argument("--log-format", choices=["text", "json"], default=None,
                    help="the one line per request: text or json (default: the config's [http] log_format, else text)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="server log level (default %(default)s)")
    auth = ap.add_argument_group("API keys (docs/clients.md)")
    auth.add_argument("--api-key", action="append", default=[], metavar="KEY",
                      help="accept 'Authorization: Bearer KEY' (repeatable; also XA_API_KEY and the config's [auth])")
    auth.add_argument("--api-key-file", action="append", default=[], metavar="FILE",
                      help="accept the keys in FILE, one per line (repeatable)")
    auth.add_argument("--api-auth", action="append", default=[], metavar="USER:PASS[,USER2:PASS2]",
                      help="as A1111's --api-auth: HTTP Basic on /sdapi/... and the API docs, or Bearer USER:PASS")
    auth.add_argument("--requests-per-minute", type=int, default=0, metavar="N",
                      help="generation requests per key per minute, then 429 (default: the config's, else no limit)")
    auth.add_argument("--concurrent-jobs", type=int, default=0, metavar="N",
                      help="generation jobs queued or running per key, then 429 (default: the config's, else no limit)")
    auth.add_argument("--allow-no-auth", action="store_true",
                      help="listen on a non-loopback --host without any key (everyone who reaches the port may use it)")
    ap.add_argument("--ray", action="store_true",
                    help="serve on Ray Serve (local Ray, or the cluster named by RAY_ADDRESS); needs the ray extra")
    ap.add_argument("--version", action="version", version=f"%(prog)s {xa_runtime.__version__}")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error(f"--port {args.port}: a TCP port in [0, 65535] (0: any free port)")
    try:
        cfg = load_config(args.config)
        check_at_start(cfg)
    except ConfigError as e:
        print(f"error: --config: {e}", file=sys.stderr)
        return 2
    try:
        cfg.auth = cfg.auth.merged(from_flags(args.api_key, args.api_key_file, args.api_auth,
                                              args.requests_per_minute, args.concurrent_jobs))
    except AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.auth.enabled and not is_loopback(args.host):
        if not args.allow_no_auth:
            print(f"error: --host {args.host} is not a loopback address and no API key is configured: give "
                  "--api-key (or XA_API_KEY, --api-key-file, --api-auth, [auth] in the config), or --allow-no-auth "
                  "to serve everyone who reaches the port", file=sys.stderr)
            return 2
        print(f"warning: serving on {args.host} with no API key (--allow-no-auth): anyone who reaches the port "
              "may use this server", file=sys.stderr)
    elif cfg.auth.enabled:
        ids = sorted({key_id(k) for k in cfg.auth.api_keys} | {key_id(f"{u}:{p}") for u, p in cfg.auth.users})
        print(f"xa-serve: API keys required; key ids (in /metrics): {', '.join(ids)}", file=sys.stderr)
    if args.log_format is not None:
        cfg.http.log_format = args.log_format
    if args.ray:
        return _serve_on_ray(cfg, args.host, args.port)
    try:
        import uvicorn  # noqa: F401 -- the serve extra's presence, checked before the app is built

        from ..serve.app import create_app
    except ImportError as e:
        print(f"error: xa-serve needs the serve extra (pip install 'xa-runtime[serve]'): {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper())
    from ..serve.service import build_service

    try:
        service = build_service(cfg).start()
    except ConfigError as e:  # a file that is not what its key says (found while loading it)
        print(f"error: --config: {e}", file=sys.stderr)
        return 2
    app = create_app(service, auth=cfg.auth, http=cfg.http)
    config = uvicorn_config(app, args.host, args.port, cfg.limits, args.log_level)
    # one bare line per request (a JSON line parses as is); set only now that the server runs
    requests_log = logging.getLogger("xa_runtime.serve.requests")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    requests_log.addHandler(handler)
    requests_log.propagate = False
    _server_class()(config, service).run()
    if service.worker_alive:  # drained past shutdown_timeout_s inside one long step: leave it, exit now
        import os

        print("xa-serve: a step was still running after limits.shutdown_timeout_s; exiting", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # not interpreter teardown under a running torch op (it aborts)
    return 0


def uvicorn_config(app: Any, host: str, port: int, limits: Any, log_level: str = "info") -> Any:
    """uvicorn's settings for xa-serve: slow clients bounded (a deadline on each request head,
    limits.max_connections open at once, heads of at most 64 KiB), a short keep-alive."""
    import uvicorn

    from ..serve.guard import slow_client_protocol

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,  # serve.requestlog's line
                          timeout_graceful_shutdown=5,  # after the drain: only responses left to write
                          http=slow_client_protocol(limits.header_timeout_s), limit_concurrency=limits.max_connections,
                          timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)


def _serve_on_ray(cfg, host: str, port: int) -> int:
    try:
        from ..serve.ray_app import run
    except ImportError as e:
        print(f"error: --ray needs Ray Serve (pip install 'xa-runtime[ray]'): {e}", file=sys.stderr)
        return 2
    run(cfg, host, port)
    return 0


def _server_class() -> type:
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        """Drains before it stops. On SIGINT/SIGTERM the port stays open while the service
        stops accepting (/readyz and new requests answer 503 with Retry-After), finishes what it
        was given within limits.shutdown_timeout_s (then stops the running request between
        steps: 503), and only then does uvicorn shut down; a second signal exits at once.
        uvicorn >= 0.29 re-raises the signal after a graceful shutdown (exit -15); a finished
        drain is a clean exit here, so the signal is not re-raised."""

        def __init__(self, config: uvicorn.Config, service: Any):
            super().__init__(config)
            self.service = service
            self._drain: threading.Thread | None = None

        def handle_exit(self, sig, frame):  # noqa: ANN001
            if self._drain is None:
                self._drain = threading.Thread(target=self._drain_then_exit, args=(sig, frame), name="xa-serve-drain",
                                               daemon=True)
                self._drain.start()
            else:
                self._exit(sig, frame)

        def _drain_then_exit(self, sig, frame) -> None:  # noqa: ANN001
            self.service.shutdown()
            self._exit(sig, frame)

        def _exit(self, sig, frame) -> None:  # noqa: ANN001
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server


if __name__ == "__main__":
    raise SystemExit(main())
