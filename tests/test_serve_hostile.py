"""xa-serve against hostile request bodies, on stub pipelines (no model): each one is a 422
naming the field, refused before any image of the request is decoded, and the server keeps
serving; the request body's schema is in /openapi.json; a request without a seed gets a
drawn one."""

import base64
import io

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from xa_runtime.serve import app as app_module  # noqa: E402
from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.serve.config import Limits  # noqa: E402
from xa_runtime.serve.service import Service  # noqa: E402

from test_serve import FAST, StubPipe  # noqa: E402


class ImagePlugin:
    """A step plugin that takes a per-request image (what the service checks for)."""

    def with_image(self, image):
        return self


def png_b64(width, height):
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")  # all zeros: a bomb compresses to little
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def client():
    service = Service(StubPipe(), Limits(max_image_pixels=64 * 64, max_request_pixels=3 * 64 * 64),
                      plugins={"a": ImagePlugin(), "b": ImagePlugin(), "c": ImagePlugin(), "d": ImagePlugin()}).start()
    with TestClient(create_app(service)) as c:
        yield c


@pytest.fixture
def image_reads(monkeypatch):
    """Counts the images opened (header read) and decoded (pixels) by the app."""
    counts = {"opened": 0, "decoded": 0}
    real_open, real_decode = app_module._open_image, app_module._decode

    def opened(*a):
        counts["opened"] += 1
        return real_open(*a)

    def decoded(*a):
        counts["decoded"] += 1
        return real_decode(*a)

    monkeypatch.setattr(app_module, "_open_image", opened)
    monkeypatch.setattr(app_module, "_decode", decoded)
    return counts


def test_deeply_nested_body_is_422_not_500(client):
    r = client.post("/v1/generate", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body" and "nested" in r.json()["error"]
    assert client.post("/v1/generate", json=FAST).status_code == 200


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "prompt_sd15"])
def test_lone_surrogate_is_422_naming_the_field(client, field):
    body = '{"prompt": "a cat", "num_inference_steps": 2, "adapter_guidance_start": 1.0, "%s": "a\\ud800b"}' % field
    if field == "prompt":
        body = '{"prompt": "a\\ud800b", "num_inference_steps": 2}'
    r = client.post("/v1/generate", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == field and "surrogate" in r.json()["error"], r.text


@pytest.mark.parametrize("field, value", [
    ("num_inference_steps", True), ("seed", False), ("num_images_per_prompt", True), ("guidance_scale", True),
    ("num_inference_steps", 2.5), ("prompt", 5), ("num_inference_steps", "2"),
])
def test_no_type_coercion(client, field, value):
    r = client.post("/v1/generate", json={**FAST, field: value})
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_integer_for_a_float_field_and_integral_float_for_an_integer_field_are_accepted(client):
    assert client.post("/v1/generate", json={**FAST, "guidance_scale": 7}).status_code == 200
    assert client.post("/v1/generate", json={**FAST, "num_inference_steps": 2.0}).status_code == 200  # JSON Schema: an integer


def test_images_of_unknown_plugins_are_refused_unread(client, image_reads):
    bombs = {f"p{i}": png_b64(4096, 4096) for i in range(4)}
    r = client.post("/v1/generate", json={**FAST, "plugins": ["a"], "images": bombs})
    assert r.status_code == 422 and r.json()["field"] == "images.p0"
    r = client.post("/v1/generate", json={**FAST, "plugins": ["zzz"], "images": {"zzz": png_b64(8, 8)}})
    assert r.status_code == 422 and r.json()["field"] == "plugins"
    assert image_reads == {"opened": 0, "decoded": 0}


def test_per_request_pixel_budget_is_checked_before_decoding(client, image_reads):
    four = {name: png_b64(64, 64) for name in "abcd"}  # each within the per-image limit, 4 over the budget of 3
    r = client.post("/v1/generate", json={**FAST, "plugins": list("abcd"), "images": four})
    assert r.status_code == 422 and r.json()["field"] == "images.d" and "in all per request" in r.json()["error"]
    assert image_reads["decoded"] == 0
    three = {name: png_b64(64, 64) for name in "abc"}
    assert client.post("/v1/generate", json={**FAST, "plugins": list("abc"), "images": three}).status_code == 200
    assert image_reads["decoded"] == 3


def test_one_image_over_the_limit_is_refused_before_decoding(client, image_reads):
    r = client.post("/v1/generate", json={**FAST, "plugins": ["a"], "images": {"a": png_b64(4096, 4096)}})
    assert r.status_code == 422 and r.json()["field"] == "images.a" and "4096x4096" in r.json()["error"]
    assert image_reads["decoded"] == 0


def test_corrupt_pixel_stream_is_422(client):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    idat = raw.index(b"IDAT")
    raw[idat + 8: idat + 20] = b"\xff" * 12  # header intact, zlib stream broken
    r = client.post("/v1/generate", json={**FAST, "plugins": ["a"], "images": {"a": base64.b64encode(bytes(raw)).decode()}})
    assert r.status_code == 422 and r.json()["field"] == "images.a", r.text


def test_openapi_declares_the_request_body(client):
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert schema["properties"]["num_inference_steps"]["type"] == "integer"


def test_a_request_without_a_seed_gets_a_drawn_one_and_is_told(client):
    seeds = set()
    unseeded = {k: v for k, v in FAST.items() if k != "seed"}
    for _ in range(3):
        r = client.post("/v1/generate", json=unseeded, headers={"Accept": "image/png"})
        assert r.status_code == 200
        seeds.add(int(r.headers["x-seed"]))
    assert len(seeds) == 3  # drawn, not a fixed default
    r = client.post("/v1/generate", json={**FAST, "seed": 5}, headers={"Accept": "image/png"})
    assert r.headers["x-seed"] == "5"


class AllocFails(StubPipe):
    """Holds a large tensor in its frame, then fails the way torch's CPU allocator does."""

    held = None

    def generate(self, params, plugins=(), step_callback=None, init_image=None):
        import weakref

        import torch

        block = torch.ones(1 << 22)  # 16 MB, referenced only from this frame (and its traceback)
        AllocFails.held = weakref.ref(block)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)")


def test_cpu_out_of_memory_is_503_and_the_request_memory_is_released():
    service = Service(AllocFails(), Limits(retry_after_s=4)).start()
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/generate", json=FAST)
        assert r.status_code == 503 and r.headers["retry-after"] == "4" and "out of device memory" in r.json()["error"]
        assert AllocFails.held() is None  # not kept alive by the failed request's traceback
