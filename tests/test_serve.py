"""xa-serve on CPU, in process (fastapi TestClient over the ASGI app; no sockets): the
endpoints on the tiny model, bad requests (422 naming the field), and, with stub
pipelines, the queue (429), deadlines (504), internal failures (500), concurrency,
metrics and graceful shutdown."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from xa_runtime.errors import ParameterError  # noqa: E402
from xa_runtime.pipeline import GenerationParams, SizeRules, XAdapterOutput  # noqa: E402
from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.cli.serve import main as serve_main  # noqa: E402
from xa_runtime.serve.config import ConfigError, Limits, ServeConfig, load_config, parse_config  # noqa: E402
from xa_runtime.serve.service import Cancelled, QueueFull, Service, Unavailable, build_service  # noqa: E402

FAST = dict(prompt="a cat", num_inference_steps=2, adapter_guidance_start=1.0, seed=0)


def b64_image(size=(40, 24), seed=0, fmt="PNG"):
    import base64
    import io

    import numpy as np

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


PNG = b64_image()


@pytest.fixture(scope="module")
def tiny_client():
    service = build_service(ServeConfig()).start()
    with TestClient(create_app(service)) as client:
        yield client


class StubPipe:
    """generate() like XAdapterPipeline's: calls step_callback after each step; prompt 'boom'
    raises RuntimeError; `delay` seconds per step; `gate` (an Event) holds the first step."""

    size_rules = SizeRules(sd15_default=64, sdxl_default=128)

    def __init__(self, delay=0.0, gate=None, failures=True):
        self.delay, self.gate, self.steps_run, self.calls = delay, gate, [], 0
        self.failures = failures  # False: 'boom' and 'oom' are prompts like any other (the fuzzer may send them)

    def generate(self, params, plugins=(), step_callback=None, init_image=None):
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(30)
        done = 0
        try:
            for i in range(params.num_inference_steps):
                time.sleep(self.delay)
                done += 1
                if step_callback:
                    step_callback("stage1", i, params.num_inference_steps)
        finally:
            self.steps_run.append(done)
        if self.failures and params.prompt == "boom":
            raise RuntimeError("stub failure")
        if self.failures and params.prompt == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        n = len(params.prompts) * params.num_images_per_prompt
        return XAdapterOutput(images=[Image.new("RGB", (8, 8))] * n, params=params, timings={"stage1": 0.001})


def stub_client(pipe, **limits):
    service = Service(pipe, Limits(**limits), plugins={"sketch": object()}).start()
    return service, TestClient(create_app(service))


# ---------------------------------------------------------------------- tiny model, every endpoint
def test_health_ready_and_generate_json(tiny_client):
    assert tiny_client.get("/healthz").json() == {"status": "ok"}
    assert tiny_client.get("/readyz").status_code == 200
    r = tiny_client.post("/v1/generate", json={**FAST, "negative_prompt": "blurry", "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 1 and body["parameters"]["seed"] == 3
    assert body["parameters"]["height"] == 128 and body["parameters"]["num_inference_steps"] == 2
    assert {"stage1", "stage2", "vae_decode"} <= set(body["timings"])
    import base64
    import io

    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (128, 128)
    # A1111 infotext and the JSON record (tests/test_png_infotext.py parses them)
    assert image.text["parameters"].startswith(f"{FAST['prompt']}\nNegative prompt: blurry\nSteps: 2, ")
    assert json.loads(image.text["xa_runtime"])["seed"] == 3


def test_parameters_and_request_schema_come_from_the_one_definition():
    from xa_runtime.pipeline.params import PARAMETERS

    service, client = stub_client(StubPipe(), max_steps=40, max_side=512)
    with client:
        listed = client.get("/v1/parameters").json()["parameters"]
        body = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]["properties"]
    assert [p["name"] for p in listed] == [p.name for p in PARAMETERS if p.http] and "output_type" not in schema
    defaults = GenerationParams(prompt="")
    for p in listed:
        assert p["required"] == (p["name"] == "prompt")
        assert p.get("default") == (None if p["required"] else getattr(defaults, p["name"]))
        numbers = lambda d: json.loads(json.dumps(d), parse_int=float)  # noqa: E731 -- /openapi.json writes 2**63-1 as a float
        assert numbers({k: v for k, v in schema[p["name"]].items() if k not in ("title", "default")}) == numbers({
            k: v for k, v in p.items() if k not in ("name", "kind", "required", "label", "blank", "default")})
    by_name = {p["name"]: p for p in listed}
    # the server's limits narrow the range; the row's own bounds stay otherwise
    assert by_name["num_inference_steps"]["maximum"] == 40 and by_name["width"]["maximum"] == 512
    assert by_name["width_sd15"]["maximum"] == 2048 and by_name["adapter_guidance_start"]["exclusiveMinimum"] == 0
    assert by_name["adapter_guidance_start"]["default"] == 0.9 and by_name["adapter_guidance_start"]["label"]


def test_generate_png_and_metrics(tiny_client):
    r = tiny_client.post("/v1/generate", json=FAST, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG") and r.headers["x-seed"] == "0"
    text = tiny_client.get("/metrics").text
    assert 'xa_requests_total{outcome="ok"}' in text and "xa_queue_depth" in text
    assert 'xa_stage_seconds_bucket{le="0.01",stage="stage2"}' in text
    assert 'xa_stage_seconds_count{stage="queue"}' in text


LONG = "x" * 2001
BAD = [
    ({"plugins": ["/etc/passwd"]}, "plugins"),
    ({"plugins": ["../loras/anime.safetensors"]}, "plugins"),
    ({"plugins": ["C:\\loras\\anime.safetensors"]}, "plugins"),
    ({"plugins": ["no-such-plugin"]}, "plugins"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 151}, "num_inference_steps"),
    ({"num_inference_steps": "many"}, "num_inference_steps"),
    ({"height": 100}, "height"),
    ({"width": 4096}, "width"),
    ({"height_sd15": 100}, "height_sd15"),
    ({"prompt": LONG}, "prompt"),
    ({"negative_prompt": LONG}, "negative_prompt"),
    ({"prompt": []}, "prompt"),
    ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
    ({"num_images_per_prompt": 5}, "num_images_per_prompt"),
    ({"prompt": ["a", "b", "c"], "num_images_per_prompt": 2}, "num_images_per_prompt"),
    ({"seed": -1}, "seed"),
    ({"guidance_scale": 101}, "guidance_scale"),
    ({"adapter_guidance_start": 0}, "adapter_guidance_start"),
    ({"adapter_condition_scale": -1}, "adapter_condition_scale"),
    ({"scheduler": "nope"}, "scheduler"),
    ({"output_type": "np"}, "output_type"),
    ({"init_image": "/tmp/x.png"}, "init_image"),
    ({"colour": "red"}, "colour"),
    ({"timeout_s": -1}, "timeout_s"),
    ({"images": "abc"}, "images"),
    ({"images": {"x": "abc"}}, "images.x"),
    ({"images": {"x": PNG}}, "images.x"),
    ({"init_image": b64_image(fmt="GIF")}, "init_image"),
    ({"init_image": "data:image/png;base64,!!"}, "init_image"),
    ({"strength": 0.5}, "init_image"),
    ({"strength": 2, "init_image": PNG}, "strength"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_request_is_422_naming_the_field(tiny_client, change, field):
    r = tiny_client.post("/v1/generate", json={**FAST, **change})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


@pytest.mark.parametrize("content,field,status", [
    (b'{"prompt": "a", "guidance_scale": NaN}', "guidance_scale", 422),
    (b'{"num_inference_steps": 2}', "prompt", 422),
    (b"not json", "body", 422),
    (b'["a list"]', "body", 422),
])
def test_bad_body(tiny_client, content, field, status):
    r = tiny_client.post("/v1/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field


def test_body_over_the_limit_is_413():
    service, client = stub_client(StubPipe(), max_body_bytes=1000)
    with client:
        r = client.post("/v1/generate", json={**FAST, "prompt": "x" * 1000})
        assert r.status_code == 413 and r.json()["field"] == "body"
        r = client.post("/v1/generate", json={**FAST, "init_image": PNG})  # 40x24 PNG: ~4 kB of base64
        assert r.status_code == 413


def test_image_over_the_pixel_limit_is_422():
    service, client = stub_client(StubPipe(), max_image_pixels=40 * 24 - 1)
    with client:
        r = client.post("/v1/generate", json={**FAST, "init_image": PNG, "strength": 0.5})
        assert r.status_code == 422 and r.json()["field"] == "init_image" and "pixels" in r.json()["error"]


# ---------------------------------------------------------------------- stub pipelines
def test_queue_full_is_429_with_retry_after():
    gate = threading.Event()
    service, client = stub_client(StubPipe(gate=gate), queue_size=1, retry_after_s=7)
    with client:
        running = service.submit(GenerationParams(**FAST))
        for _ in range(200):  # until the worker holds the first one
            if service.metrics.in_flight._value.get() == 1:
                break
            time.sleep(0.01)
        queued = service.submit(GenerationParams(**FAST))
        r = client.post("/v1/generate", json=FAST)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        with pytest.raises(QueueFull):
            service.submit(GenerationParams(**FAST))
        gate.set()
        assert running.result(10).images and queued.result(10).images
        assert client.post("/v1/generate", json=FAST).status_code == 200
        assert 'xa_requests_total{outcome="rejected"} 2.0' in client.get("/metrics").text


def test_deadline_cancels_between_steps_then_next_request_runs():
    pipe = StubPipe(delay=0.05)
    service, client = stub_client(pipe)
    with client:
        t0 = time.monotonic()
        r = client.post("/v1/generate", json={**FAST, "num_inference_steps": 100, "timeout_s": 0.3})
        assert r.status_code == 504 and "deadline" in r.json()["error"]
        assert time.monotonic() - t0 < 3.0
        assert 1 <= pipe.steps_run[-1] < 100  # stopped between steps
        assert client.post("/v1/generate", json=FAST).status_code == 200
        assert pipe.steps_run[-1] == 2
        assert 'xa_requests_total{outcome="deadline"} 1.0' in client.get("/metrics").text


def test_internal_failure_is_500_and_the_server_keeps_serving():
    service, client = stub_client(StubPipe())
    with client:
        r = client.post("/v1/generate", json={**FAST, "prompt": "boom"})
        assert r.status_code == 500 and "RuntimeError: stub failure" in r.json()["error"]
        assert client.post("/v1/generate", json=FAST).status_code == 200
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
        assert 'xa_requests_total{outcome="error"} 1.0' in text and 'xa_requests_total{outcome="ok"} 1.0' in text


def test_configured_plugin_name_is_accepted():
    service, client = stub_client(StubPipe())
    with client:
        r = client.post("/v1/generate", json={**FAST, "plugins": ["sketch"]})
        assert r.status_code == 200 and r.json()["plugins"] == ["sketch"]


def test_out_of_memory_is_503_and_the_server_keeps_serving():
    service, client = stub_client(StubPipe(), retry_after_s=3)
    with client:
        r = client.post("/v1/generate", json={**FAST, "prompt": "oom"})
        assert r.status_code == 503 and "out of device memory" in r.json()["error"] and r.headers["retry-after"] == "3"
        assert client.post("/v1/generate", json=FAST).status_code == 200


def test_nan_latents_fail_the_request_not_the_server(tiny_client):
    """A UNet that overflows (NaN) fails that request with 500 naming the cause; the next is fine."""
    pipe = tiny_client.app.state.service.pipeline
    handle = pipe.sdxl.unet.conv_out.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        r = tiny_client.post("/v1/generate", json=FAST)
    finally:
        handle.remove()
    assert r.status_code == 500 and "NonFiniteError" in r.json()["error"] and "NaN" in r.json()["error"]
    assert tiny_client.post("/v1/generate", json=FAST).status_code == 200


def test_concurrent_load_every_request_gets_one_response():
    """32 clients, 256 requests, a queue of 4: each gets exactly one answer (200 or 429), in time."""
    service, client = stub_client(StubPipe(delay=0.001), queue_size=4)
    with client:
        def worker(k):
            return [client.post("/v1/generate", json={**FAST, "seed": k * 10 + j}).status_code for j in range(8)]

        t0 = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            codes = [c for batch in pool.map(worker, range(32)) for c in batch]
        assert time.monotonic() - t0 < 120
        assert len(codes) == 256 and set(codes) <= {200, 429} and codes.count(200) >= 5 and 429 in codes
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
        ok = float(text.split('xa_requests_total{outcome="ok"} ')[1].split()[0])
        rejected = float(text.split('xa_requests_total{outcome="rejected"} ')[1].split()[0])
        assert (ok, rejected) == (codes.count(200), codes.count(429))
        assert "xa_queue_depth 0.0" in text


def test_graceful_shutdown_finishes_in_flight_and_refuses_new():
    """Shutdown under load: every accepted request (running and queued) completes."""
    pipe = StubPipe(delay=0.02)
    service, client = stub_client(pipe, queue_size=8)
    with client:
        first = service.submit(GenerationParams(**{**FAST, "num_inference_steps": 6}))
        accepted = [first]
        for _ in range(200):  # until the worker holds the first one
            if service.metrics.in_flight._value.get() == 1:
                break
            time.sleep(0.01)
        with ThreadPoolExecutor(16) as pool:  # 16 clients at once: 8 queued, the rest 429
            def submit(k):
                try:
                    return service.submit(GenerationParams(**{**FAST, "seed": k}))
                except QueueFull:
                    return None

            accepted += [t for t in pool.map(submit, range(16)) if t is not None]
        assert len(accepted) == 9
        time.sleep(0.05)
        assert service.shutdown(timeout=30) is True
        assert all(t.result(1).images for t in accepted)
        assert pipe.steps_run[0] == 6 and pipe.steps_run[1:] == [2] * 8
        with pytest.raises(Unavailable):
            service.submit(GenerationParams(**FAST))
        assert client.post("/v1/generate", json=FAST).status_code == 503
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200


def test_shutdown_timeout_stops_the_running_request():
    service, _ = stub_client(StubPipe(delay=0.05))
    running = service.submit(GenerationParams(**{**FAST, "num_inference_steps": 150}))
    time.sleep(0.1)
    assert service.shutdown(timeout=0.2) is False
    with pytest.raises(Unavailable):
        running.result(5)


# ---------------------------------------------------------------------- config and CLI
def test_config_file(tmp_path):
    (tmp_path / "serve.toml").write_text(
        '[limits]\nqueue_size = 2\ndeadline_s = 30\n'
        '[plugins.anime]\nkind = "lora"\npath = "loras/anime.safetensors"\nscale = 0.8\n'
        '[plugins.edges]\nkind = "controlnet"\npath = "cn"\nimage = "edges.png"\n')
    cfg = load_config(tmp_path / "serve.toml")
    assert cfg.tiny and cfg.limits.queue_size == 2 and cfg.limits.deadline_s == 30.0
    assert cfg.plugins["anime"].path == str(tmp_path / "loras/anime.safetensors") and cfg.plugins["anime"].scale == 0.8
    assert cfg.plugins["edges"].image == str(tmp_path / "edges.png")


@pytest.mark.parametrize("data,word", [
    ({"models": {"sd15": "a"}}, "together"),
    ({"limits": {"queue_size": 0}}, "queue_size"),
    ({"limits": {"nope": 1}}, "nope"),
    ({"plugins": {"x": {"kind": "vae", "path": "p"}}}, "kind"),
    ({"plugins": {"x": {"kind": "lora", "path": "p", "image": "a.png"}}}, "image"),
    ({"plugins": {"x": {"kind": "t2i", "path": "p", "image_encoder": "e"}}}, "image_encoder"),
    ({"ray": {"max_replicas": 0}}, "max_replicas"),
    ({"ray": {"min_replicas": 2, "max_replicas": 1}}, "max_replicas"),
    ({"ray": {"gpus": 1}}, "gpus"),
    ({"server": {}}, "server"),
    ({"backend": {"kind": "openvino"}}, "backend.kind"),
    ({"backend": {"onnx_dir": "x"}}, "onnx_dir"),
    ({"backend": {"kind": "onnxruntime", "onnx_dir": "nope"}}, "onnx_dir"),
    ({"backend": {"kind": "onnxruntime"}, "plugins": {"x": {"kind": "lora", "path": "p"}}}, "plugins.x.kind"),
    ({"models": {"sd15": "a", "sdxl": "b", "adapter": "c"}, "backend": {"kind": "onnxruntime"}}, "onnx_dir"),
])
def test_bad_config(data, word):
    with pytest.raises(ConfigError, match=word):
        parse_config(data)


def test_service_on_the_onnxruntime_backend():
    """[backend] kind = "onnxruntime" with the tiny models: open_backend exports their graphs and
    the service's pipeline runs its UNets and mapping on onnxruntime."""
    pytest.importorskip("onnxruntime")
    from xa_runtime.runtime.backends.adapters import OrtSD15Branch

    service = build_service(parse_config({"backend": {"kind": "onnxruntime"}}), warm=False)
    assert isinstance(service.pipeline.sd15_branch, OrtSD15Branch)


def test_cli_bad_config_exits_2(tmp_path, capsys):
    assert serve_main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "--config" in capsys.readouterr().err


def test_service_check_needs_no_http():
    service = Service(StubPipe())
    with pytest.raises(ParameterError) as e:
        service.check(GenerationParams(prompt="a", num_inference_steps=0), [])
    assert e.value.name == "num_inference_steps"
    with pytest.raises(Unavailable):  # not started
        service.submit(GenerationParams(**FAST))


def test_configured_lora_on_the_tiny_model(tiny_client, tmp_path):
    from xa_runtime.testing import write_random_lora
    from xa_runtime.serve.config import PluginSpec
    from xa_runtime.serve.service import load_plugins

    service = tiny_client.app.state.service
    pipe = service.pipeline
    path = write_random_lora(tmp_path / "anime.safetensors", pipe.sd15.unet, pipe.sd15.text_encoder, std=0.5)
    service.plugins.update(load_plugins({"anime": PluginSpec("anime", "lora", str(path), 1.0)}, pipe))
    try:
        def png(plugins):
            r = tiny_client.post("/v1/generate", json={**FAST, "plugins": plugins}, headers={"Accept": "image/png"})
            assert r.status_code == 200, r.text
            return r.content

        plain, with_lora, plain_again = png([]), png(["anime"]), png([])
        assert with_lora != plain and plain_again == plain  # scale set per request, back to 0 after
    finally:
        service.plugins.pop("anime")


def test_request_images_on_the_tiny_model(tiny_client, tmp_path):
    """Per-request control / IP images (base64): the same image sent equals it configured; another
    image changes the output; an IP-Adapter is on only for the requests naming it; img2img."""
    import base64

    from xa_runtime.testing import write_tiny_controlnet, write_tiny_image_encoder, write_tiny_ip_adapter
    from xa_runtime.serve.config import PluginSpec
    from xa_runtime.serve.service import load_plugins

    service = tiny_client.app.state.service
    pipe = service.pipeline
    folder, _ = write_tiny_controlnet(tmp_path, pipe.sd15.unet, seed=1)
    (tmp_path / "edges.png").write_bytes(base64.b64decode(PNG))
    ip = write_tiny_ip_adapter(tmp_path / "ip", pipe.sd15.unet, seed=2)["safetensors"]
    write_tiny_image_encoder(tmp_path / "ip" / "image_encoder")
    specs = {"edges": PluginSpec("edges", "controlnet", str(folder), 1.0, str(tmp_path / "edges.png")),
             "edges_free": PluginSpec("edges_free", "controlnet", str(folder), 1.0),
             "face": PluginSpec("face", "ip_adapter", str(ip), 1.0),
             "face2": PluginSpec("face2", "ip_adapter", str(ip), 0.5, str(tmp_path / "edges.png"))}
    service.plugins.update(load_plugins(specs, pipe))
    service.needs_image.update({"edges_free", "face"})
    try:
        def post(**body):
            return tiny_client.post("/v1/generate", json={**FAST, **body}, headers={"Accept": "image/png"})

        def png(**body):  # the decoded pixels (the PNG's metadata names the request's plugins)
            r = post(**body)
            assert r.status_code == 200, r.text
            import io

            import numpy as np

            return np.asarray(Image.open(io.BytesIO(r.content))).tobytes()

        plain = png()
        configured = png(plugins=["edges"])
        assert configured != plain
        assert png(plugins=["edges_free"], images={"edges_free": PNG}) == configured
        assert png(plugins=["edges"], images={"edges": b64_image(seed=3)}) != configured
        assert png(plugins=["edges"]) == configured  # the configured image is still the default
        r = post(plugins=["edges_free"])
        assert r.status_code == 422 and r.json()["field"] == "images.edges_free"
        r = post(plugins=["edges"], images={"face": PNG})
        assert r.status_code == 422 and r.json()["field"] == "images.face"

        with_face = png(plugins=["face"], images={"face": PNG})
        assert with_face != plain
        assert png() == plain  # suspended again: the stock UNet
        assert png(plugins=["face2"]) not in (plain, with_face)
        assert png(plugins=["face"], images={"face": PNG}) == with_face
        r = post(plugins=["face", "face2"], images={"face": PNG})
        assert r.status_code == 422 and r.json()["field"] == "plugins" and "one IP-Adapter" in r.json()["error"]

        init = png(init_image=b64_image(size=(128, 128), seed=4), strength=0.5, num_inference_steps=4)
        assert init != png(num_inference_steps=4)
    finally:
        for name in specs:
            plugin = service.plugins.pop(name)
            if isinstance(plugin, tuple):
                plugin[1].adapter.unload()
        service.needs_image.clear()
    assert pipe.sd15.unet.encoder_hid_proj is None


def test_abandoned_request_leaves_the_queue_or_stops_between_steps():
    gate = threading.Event()
    pipe = StubPipe(delay=0.02, gate=gate)
    service = Service(pipe, Limits(max_steps=1000)).start()
    try:
        running = service.submit(GenerationParams(**{**FAST, "num_inference_steps": 500}))
        queued = service.submit(GenerationParams(**FAST))
        queued.abandon()
        gate.set()
        time.sleep(0.2)
        running.abandon()
        with pytest.raises(Cancelled, match="abandoned during"):
            running.result(10)
        with pytest.raises(Cancelled, match="queue"):
            queued.result(10)
        assert pipe.calls == 1 and 1 <= pipe.steps_run[-1] < 500
        assert service.submit(GenerationParams(**FAST)).result(10).images
        assert 'xa_requests_total{outcome="cancelled"} 2.0' in service.metrics.text().decode()
    finally:
        service.shutdown(5)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(*flags, env=None, ready_s=60.0):
    """`python -m xa_runtime.cli.serve --port P *flags` on loopback, returned once /readyz
    answers 200: (process, url). The caller kills it if the test does not end it."""
    import subprocess
    import sys

    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xa_runtime.cli.serve", "--port", str(port), "--log-level", "warning",
                             *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + ready_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"xa-serve {' '.join(flags)} not ready: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.1)


def test_client_disconnect_cancels_the_run():
    """A real uvicorn server on loopback: the client closes its socket mid-run -> the run stops
    at the next step (outcome cancelled) and the next request is served at once."""
    import json
    import socket

    import httpx
    import uvicorn

    pipe = StubPipe(delay=0.02)
    service = Service(pipe, Limits(max_steps=1000)).start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if server.started:
                break
            time.sleep(0.05)
        body = json.dumps({**FAST, "num_inference_steps": 1000}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            for _ in range(200):  # until the worker runs it
                if service.metrics.in_flight._value.get() == 1:
                    break
                time.sleep(0.01)
            time.sleep(0.1)
        t0 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=FAST, timeout=30)
        assert r.status_code == 200 and time.monotonic() - t0 < 5  # not 1000 x 20 ms behind the abandoned run
        assert pipe.calls == 2 and pipe.steps_run[0] < 1000
        assert 'xa_requests_total{outcome="cancelled"} 1.0' in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.should_exit = True
        thread.join(10)
        service.shutdown(5)


def test_xa_serve_process_serves_and_exits_0_on_sigterm(tmp_path):
    """The real command on loopback: ready, a request, SIGTERM mid-request -> it finishes, exit 0."""
    import os
    import signal

    import httpx

    proc, url = serve_process(env={**os.environ, "OMP_NUM_THREADS": "2"}, ready_s=60)
    try:
        r = httpx.post(f"{url}/v1/generate", json=FAST, headers={"Accept": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        with ThreadPoolExecutor(1) as pool:  # SIGTERM while a request runs: it still gets its image
            slow = pool.submit(httpx.post, f"{url}/v1/generate", json={**FAST, "num_inference_steps": 8}, timeout=60)
            deadline = time.monotonic() + 30
            while not _in_flight(url) and not slow.done():  # on a busy machine 0.5 s may not reach the worker
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            r = slow.result()
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _in_flight(url):
    import httpx

    return 'xa_in_flight 1.0' in httpx.get(f"{url}/metrics", timeout=5).text


@pytest.mark.parametrize("shutdown_timeout_s, in_flight_status", [(60, 200), (1, 503)])
def test_sigterm_drains(tmp_path, shutdown_timeout_s, in_flight_status):
    """SIGTERM mid-request: the port stays open while draining (/readyz and new requests 503
    with Retry-After); the running request finishes (200) or, past shutdown_timeout_s, is
    stopped between steps (503, not a bare 500); exit 0 and no traceback in the log."""
    import os
    import signal

    import httpx

    config = tmp_path / "serve.toml"
    config.write_text(f"[limits]\nshutdown_timeout_s = {shutdown_timeout_s}\nretry_after_s = 2\nmax_steps = 1000\n")
    proc, url = serve_process("--config", str(config), env={**os.environ, "OMP_NUM_THREADS": "1"}, ready_s=60)
    try:
        with ThreadPoolExecutor(1) as pool:
            steps = 40 if in_flight_status == 200 else 1000
            slow = pool.submit(httpx.post, f"{url}/v1/generate", json={**FAST, "num_inference_steps": steps}, timeout=120)
            deadline = time.monotonic() + 30
            while not _in_flight(url):
                assert time.monotonic() < deadline and not slow.done(), "the request never started"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            ready = httpx.get(f"{url}/readyz", timeout=5)
            assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
            refused = httpx.post(f"{url}/v1/generate", json=FAST, timeout=5)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            assert not slow.done()  # all of that while the request still ran
            r = slow.result()
        assert r.status_code == in_flight_status, r.text
        assert proc.wait(30) == 0
        log = proc.stdout.read().decode()
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_docs_config_example_parses():
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    block = page.split("```toml\n")[1].split("```")[0]
    from xa_runtime.serve.config import tomllib  # tomli on Python 3.10

    cfg = parse_config(tomllib.loads(block))
    from xa_runtime.serve.config import RayOptions

    assert not cfg.tiny and set(cfg.plugins) == {"anime", "edges", "face"} and cfg.limits == Limits()
    assert cfg.ray == RayOptions() and cfg.plugins["face"].image is None


def test_two_configured_loras_of_one_branch_start_and_switch(tmp_path):
    from xa_runtime.pipeline import XAdapterPipeline
    from xa_runtime.testing import write_random_lora
    from xa_runtime.serve.config import PluginSpec

    pipe = XAdapterPipeline.from_tiny(progress=False)  # the server's tiny models: same shapes
    specs = {name: PluginSpec(name, "lora", str(write_random_lora(tmp_path / f"{name}.safetensors", pipe.sd15.unet,
                                                                  pipe.sd15.text_encoder, std=0.5, seed=k)), 1.0)
             for k, name in enumerate(("anime", "ink"))}
    service = build_service(ServeConfig(plugins=specs), warm=False).start()  # exited at start before
    with TestClient(create_app(service)) as client:
        def png(plugins):
            r = client.post("/v1/generate", json={**FAST, "plugins": plugins}, headers={"Accept": "image/png"})
            assert r.status_code == 200, r.text
            return r.content

        plain, anime, ink, both = png([]), png(["anime"]), png(["ink"]), png(["anime", "ink"])
        assert len({plain, anime, ink, both}) == 4 and png([]) == plain
