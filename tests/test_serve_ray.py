"""xa-serve on Ray Serve (CPU, a local Ray instance, the tiny models, loopback only): the same
API contract as tests/test_serve.py through Ray Serve's HTTP proxy."""

import os
import socket
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from test_serve import BAD, FAST, PNG, serve_process  # noqa: E402

from xa_runtime.serve.config import ServeConfig, parse_config  # noqa: E402
from xa_runtime.serve.ray_app import build_app, deployment_options  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_xa_serve_ray_command_serves_and_exits_0_on_sigterm():
    """`xa-serve --ray` (a local Ray instance of its own): ready, one request, SIGTERM -> exit 0.
    Runs before the module's shared Ray instance starts."""
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    proc, url = serve_process("--ray", env=env, ready_s=120)
    try:
        r = httpx.post(f"{url}/v1/generate", json=FAST, headers={"Accept": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ray_url():
    from ray import serve

    port = _free_port()
    # Ray's workers inherit this environment: they import xa_runtime from this checkout too.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeConfig()), name="xa-serve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_endpoints_through_ray_serve(ray_url):
    assert httpx.get(f"{ray_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{ray_url}/readyz").status_code == 200
    r = httpx.post(f"{ray_url}/v1/generate", json={**FAST, "seed": 3}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 1 and body["parameters"]["seed"] == 3 and "queue" in body["timings"]
    r = httpx.post(f"{ray_url}/v1/generate", json={**FAST, "init_image": PNG, "strength": 0.5},
                   headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert 'xa_requests_total{outcome="ok"}' in httpx.get(f"{ray_url}/metrics").text
    assert "/v1/generate" in httpx.get(f"{ray_url}/openapi.json").json()["paths"]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_request_is_422_naming_the_field_through_ray_serve(ray_url, change, field):
    r = httpx.post(f"{ray_url}/v1/generate", json={**FAST, **change}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_deployment_options_from_the_config():
    cfg = parse_config({"models": {"device": "cuda"}, "limits": {"queue_size": 3},
                        "ray": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1}})
    opts = deployment_options(cfg)
    assert opts["ray_actor_options"]["num_gpus"] == 1.0 and opts["max_ongoing_requests"] == 4
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1}
    fixed = deployment_options(parse_config({"ray": {"min_replicas": 2, "max_replicas": 2, "num_gpus": 0.5}}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_gpus"] == 0.5
    assert deployment_options(ServeConfig())["ray_actor_options"]["num_gpus"] == 0.0  # cpu
