"""xa-serve on Ray Serve: the same Service and FastAPI app, one replica per GPU.

Each replica loads the configured models and plugins, warms up, and serves the app of
xa_runtime.serve.app through Ray Serve's HTTP proxy, so the API, the status codes and the
metrics are those of `xa-serve`. Ray Serve routes requests across replicas (at most
`limits.queue_size + 1` in flight per replica, so a replica's own queue answers 429 when
full) and scales between `ray.min_replicas` and `ray.max_replicas` on ongoing requests.

    xa-serve --ray --config serve.toml --port 8000        # local Ray, or the cluster of RAY_ADDRESS
    python -c "from xa_runtime.serve.ray_app import build_app; ..."  # serve.run(build_app(cfg))

Ray is imported here only (pip install 'xa-runtime[ray]').
"""

from __future__ import annotations

from typing import Any

from ray import serve

from .config import ServeConfig


@serve.ingress()
class XAdapterDeployment:
    """One replica: a started Service and its FastAPI app (built by Ray after __init__)."""

    def __init__(self, cfg: ServeConfig):
        from .service import build_service

        self.service = build_service(cfg).start()
        self.auth = cfg.auth

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        return create_app(self.service, auth=self.auth)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose health check raises (its worker thread died)."""
        if not self.service.ready:
            raise RuntimeError("xa-serve replica not ready (worker stopped or shutting down)")

    def __del__(self) -> None:
        service = getattr(self, "service", None)  # absent when loading the models failed
        if service is not None:
            service.shutdown()


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """serve.deployment options from the config's [ray] table and limits."""
    opts = cfg.ray
    gpus = opts.num_gpus if opts.num_gpus is not None else (1.0 if cfg.device.startswith("cuda") else 0.0)
    out: dict[str, Any] = {
        "name": "xa-serve",
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": opts.num_cpus},
        "max_ongoing_requests": cfg.limits.queue_size + 1,
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": cfg.limits.shutdown_timeout_s,
    }
    if opts.max_replicas > opts.min_replicas:
        out["autoscaling_config"] = {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                                     "target_ongoing_requests": opts.target_ongoing_requests}
    else:
        out["num_replicas"] = opts.min_replicas
    return out


def build_app(cfg: ServeConfig) -> Any:
    """The Ray Serve application (serve.run(build_app(cfg), route_prefix="/"))."""
    return serve.deployment(XAdapterDeployment, **deployment_options(cfg)).bind(cfg)


def run(cfg: ServeConfig, host: str, port: int) -> None:
    """Start Ray (RAY_ADDRESS's cluster, or a local one), serve on host:port until SIGINT or
    SIGTERM, then shut the application down gracefully. The signal handlers are installed
    after ray.init (which sets its own, aborting the process) and before serving starts."""
    import signal
    import threading

    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="WARNING")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(cfg), name="xa-serve", route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
