"""xa-serve bounds a request's cost before queueing it, on the stub pipeline: both stages'
sizes within limits.max_side, (SDXL + SD1.5 pixels) x steps x images within
limits.max_pixel_steps (422 naming the fields); a bad strength is blamed on strength."""

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.serve.config import Limits  # noqa: E402
from xa_runtime.serve.service import Service  # noqa: E402

from test_serve import FAST, StubPipe  # noqa: E402


@pytest.fixture
def client():
    pipe = StubPipe()
    service = Service(pipe, Limits(max_side=256, max_pixel_steps=128 * 128 * 10)).start()
    with TestClient(create_app(service)) as c:
        yield c, pipe


@pytest.mark.parametrize("body, field", [
    ({"height_sd15": 1024}, "height_sd15"), ({"width_sd15": 2048}, "width_sd15"), ({"height": 512}, "height"),
    ({"strength": -0.5}, "strength"), ({"strength": 0.0}, "strength"), ({"strength": 0.5}, "init_image"),
])
def test_sizes_of_both_stages_and_strength_are_blamed_right(client, body, field):
    c, pipe = client
    r = c.post("/v1/generate", json={**FAST, "height": 128, "width": 128, **body})
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert pipe.calls == 0


def test_cost_over_the_budget_is_refused_before_queueing(client):
    c, pipe = client
    small = {**FAST, "height": 128, "width": 128, "height_sd15": 64, "width_sd15": 64}
    assert c.post("/v1/generate", json={**small, "num_inference_steps": 8}).status_code == 200  # 20480 x 8 < budget
    r = c.post("/v1/generate", json={**small, "num_inference_steps": 4, "num_images_per_prompt": 2})
    assert r.status_code == 200
    r = c.post("/v1/generate", json={**small, "num_inference_steps": 5, "num_images_per_prompt": 2})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == "height x width x num_inference_steps x num_images_per_prompt"
    assert "limits.max_pixel_steps" in err["error"] and "204800" in err["error"]
    assert pipe.calls == 2


def test_shutdown_within_its_timeout_even_inside_one_long_step():
    """A step that never ends (the stub's gate held): shutdown returns within its timeout and
    the running request is answered 503 (Unavailable), not left to the step."""
    import threading
    import time

    from xa_runtime.pipeline.params import GenerationParams
    from xa_runtime.serve.service import Unavailable

    gate = threading.Event()
    service = Service(StubPipe(gate=gate), Limits()).start()
    running = service.submit(GenerationParams(**FAST))
    while service.running is None:
        time.sleep(0.01)
    t0 = time.monotonic()
    assert service.shutdown(timeout=1.0) is False
    took = time.monotonic() - t0
    with pytest.raises(Unavailable, match="shutdown_timeout_s"):
        running.result(0.1)
    assert 0.9 < took < 1.5 and service.worker_alive
    gate.set()  # the step ends later: its late result is dropped quietly
    service._thread.join(5)
    assert not service.worker_alive
