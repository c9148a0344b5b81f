"""xa-serve's other doors, with the real client libraries against a live server on loopback
(tiny models, 2 steps, 128 px): AUTOMATIC1111's API through `webuiapi`, OpenAI's Images API
through `openai`, the SSE stream; API keys on every route; per-key limits; the same request
through every API gives the same pixels."""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_serve import FAST, StubPipe, _free_port, b64_image  # noqa: E402

from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.serve.auth import AuthConfig, AuthError, key_id, parse_auth_table  # noqa: E402
from xa_runtime.serve.config import ConfigError, Limits, ServeConfig, parse_config  # noqa: E402
from xa_runtime.serve.service import Service, build_service  # noqa: E402

KEY, USER, PASSWORD = "sk-test-0123456789", "alice", "wonderland"
AUTH = AuthConfig(api_keys=[KEY], users=[(USER, PASSWORD)])
BEARER = {"Authorization": f"Bearer {KEY}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
OPEN = {"/healthz", "/readyz", "/"}


def pixels(data):
    """Decoded pixels of a PNG (bytes or base64): the metadata may differ between doors."""
    if isinstance(data, str):
        data = base64.b64decode(data)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------- keys, on a stub pipeline
def stub_app(auth=AUTH, **limits):
    service = Service(StubPipe(), Limits(**limits), plugins={"sketch": object()}).start()
    return service, TestClient(create_app(service, auth=auth))


def _calls(app):
    """(method, path) of every route the app registers, path parameters filled in."""
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method == "HEAD":
                continue
            path = route.path.replace("{rest:path}", "no-such-route").replace("{name}", "x.png")
            yield method, path


def test_every_route_needs_a_key_but_the_open_ones():
    """Walks the route table: without a key and with a wrong one every route but /healthz,
    /readyz and the playground page answers 401; with the key none does."""
    service, client = stub_app()
    calls = list(_calls(client.app))
    assert len(calls) > 30 and ("POST", "/sdapi/v1/txt2img") in calls and ("POST", "/v1/images/generations") in calls
    with client:
        for method, path in calls:
            bare = client.request(method, path, json={})
            wrong = client.request(method, path, json={}, headers={"Authorization": "Bearer sk-wrong"})
            if path in OPEN:
                assert bare.status_code == 200, (method, path)
                continue
            assert bare.status_code == 401 and wrong.status_code == 401, (method, path, bare.status_code, wrong.status_code)
            assert "bearer" in bare.headers["www-authenticate"].lower()
            ok = client.request(method, path, json={}, headers=BEARER)
            assert ok.status_code not in (401, 403) and ok.status_code < 500, (method, path, ok.status_code)
    assert KEY not in client.get("/metrics", headers=BEARER).text


def test_error_shapes_and_basic_auth_where_accepted():
    service, client = stub_app()
    with client:
        r = client.post("/v1/images/generations", json={"prompt": "a"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/generate", json=FAST).json()["field"] == "Authorization"
        assert client.get("/sdapi/v1/sd-models").status_code == 401
        assert client.get("/sdapi/v1/sd-models", headers=BASIC).status_code == 200
        assert client.get("/openapi.json", headers=BASIC).status_code == 200  # a browser can open the docs
        assert client.get("/metrics", headers=BASIC).status_code == 401  # Basic: A1111 routes and docs only
        assert client.get("/metrics", headers={"Authorization": f"Bearer {USER}:{PASSWORD}"}).status_code == 200
        wrong = "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": wrong}).status_code == 401


A1111_BAD = [({"prompt": 5}, "prompt"), ({"steps": "many"}, "steps"), ({"batch_size": "x"}, "batch_size"),
             ({"seed": "abc"}, "seed"), ({"width": True}, "width"), ({"sampler_name": "LMS"}, "sampler_name"),
             ({"scheduler": "Karras"}, "scheduler"), ({"alwayson_scripts": "x"}, "alwayson_scripts"),
             ({"alwayson_scripts": {"controlnet": {"args": [{"model": "nope"}]}}}, "alwayson_scripts.controlnet.args[0].model"),
             ({"alwayson_scripts": {"controlnet": {"args": "x"}}}, "alwayson_scripts.controlnet.args"),
             ({"alwayson_scripts": {"x-adapter": {"args": [{"start": 0}]}}}, "adapter_guidance_start"),
             ({"alwayson_scripts": {"x-adapter": {"args": [{"colour": 1}]}}}, "alwayson_scripts.x-adapter.args[0].colour"),
             ({"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, "alwayson_scripts.ADetailer"),
             ({"override_settings": {"sd_model_checkpoint": 3}}, "override_settings.sd_model_checkpoint"),
             ({"prompt": "<lora:nope:1>"}, "prompt"), ({"tiling": True}, "tiling"), ({"mask": "abc"}, "mask")]


@pytest.mark.parametrize("change,field", A1111_BAD, ids=[f for _, f in A1111_BAD])
def test_a1111_bad_fields_are_422_naming_them(change, field):
    service, client = stub_app(auth=None)
    with client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 128, "height": 128, **change})
        assert r.status_code == 422 and r.json()["field"] == field, r.text
        r = client.post("/sdapi/v1/img2img", json={"prompt": "a", "init_images": "x"})
        assert r.status_code == 422 and r.json()["field"] == "init_images"


OPENAI_BAD = [({"prompt": 3}, "prompt"), ({"n": "two"}, "n"), ({"n": 0}, "n"), ({"size": "128x"}, "size"),
              ({"response_format": "jpeg"}, "response_format"), ({"output_format": "webp"}, "output_format"),
              ({"steps": 0}, "steps"), ({"colour": "red"}, "colour"), ({"seed": -1}, "seed"), ({}, "prompt")]


@pytest.mark.parametrize("body,param", OPENAI_BAD, ids=[p for _, p in OPENAI_BAD])
def test_openai_bad_fields_are_400_naming_them(body, param):
    service, client = stub_app(auth=None)
    with client:
        r = client.post("/v1/images/generations", json={"prompt": "a", "size": "128x128", **body} if body else {})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_per_key_rate_limit_and_concurrent_jobs_answer_429():
    auth = AuthConfig(api_keys=[KEY, "sk-other-key"], requests_per_minute=2)
    service, client = stub_app(auth)
    with client:
        assert [client.post("/v1/generate", json=FAST, headers=BEARER).status_code for _ in range(3)] == [200, 200, 429]
        r = client.post("/v1/generate", json=FAST, headers=BEARER)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60 and "per minute" in r.json()["error"]
        other = {"Authorization": "Bearer sk-other-key"}
        assert client.post("/v1/generate", json=FAST, headers=other).status_code == 200  # per key
        text = client.get("/metrics", headers=BEARER).text
        assert f'xa_key_requests_total{{key_id="{key_id(KEY)}",status="429"}} 2.0' in text and KEY not in text

    gate = threading.Event()
    service = Service(StubPipe(gate=gate), Limits()).start()
    client = TestClient(create_app(service, auth=AuthConfig(api_keys=[KEY], concurrent_jobs=1)))
    with client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/generate", json=FAST, headers=BEARER)
        while service.running is None:
            time.sleep(0.01)
        r = client.post("/v1/generate", json=FAST, headers=BEARER)
        assert r.status_code == 429 and r.headers["retry-after"] == "5" and "jobs" in r.json()["error"]
        r = client.post("/v1/images/generations", json={"prompt": "a"}, headers=BEARER)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        assert first.result(10).status_code == 200
        assert client.post("/v1/generate", json=FAST, headers=BEARER).status_code == 200  # the slot came back


def test_auth_config_flags_and_key_file(tmp_path):
    (tmp_path / "keys.txt").write_text("# keys\nsk-a\n\nsk-b\n")
    cfg = parse_config({"auth": {"api_keys": ["sk-c"], "api_auth": "u:p,v:q", "key_file": "keys.txt",
                                 "requests_per_minute": 5}}, tmp_path)
    assert cfg.auth.api_keys == ["sk-c", "sk-a", "sk-b"] and cfg.auth.users == [("u", "p"), ("v", "q")]
    assert cfg.auth.requests_per_minute == 5 and cfg.auth.enabled
    for table, word in [({"api_auth": "nopass"}, "auth.api_auth"), ({"api_keys": "k"}, "auth.api_keys"),
                        ({"key_file": "missing.txt"}, "auth.key_file"), ({"colour": 1}, "auth.colour"),
                        ({"concurrent_jobs": -1}, "auth.concurrent_jobs")]:
        with pytest.raises(ConfigError, match=word):
            parse_config({"auth": table}, tmp_path)
    with pytest.raises(AuthError) as e:
        parse_auth_table({"api_auth": "secret-without-colon"})
    assert "secret-without-colon" not in str(e.value)  # a malformed entry may be a secret: never echoed


def test_cli_refuses_a_public_address_without_a_key(capsys, monkeypatch):
    from xa_runtime.cli.serve import main

    monkeypatch.delenv("XA_API_KEY", raising=False)
    assert main(["--host", "0.0.0.0"]) == 2  # before any model is loaded
    err = capsys.readouterr().err
    assert "--allow-no-auth" in err and "--api-key" in err
    assert main(["--api-auth", "nocolon"]) == 2 and "--api-auth" in capsys.readouterr().err


# ---------------------------------------------------------------------- live server, tiny models
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """xa-serve's app on loopback (uvicorn in a thread): tiny models, a LoRA `anime`, a
    ControlNet `edges` (no configured image), keys AUTH. Yields (url, service)."""
    import uvicorn

    from xa_runtime.pipeline import XAdapterPipeline
    from xa_runtime.serve.config import PluginSpec
    from xa_runtime.testing import write_random_lora, write_tiny_controlnet

    folder = tmp_path_factory.mktemp("apis")
    pipe = XAdapterPipeline.from_tiny(progress=False)
    lora = write_random_lora(folder / "anime.safetensors", pipe.sd15.unet, pipe.sd15.text_encoder, std=0.5)
    cn, _ = write_tiny_controlnet(folder, pipe.sd15.unet, seed=1)
    del pipe
    specs = {"anime": PluginSpec("anime", "lora", str(lora), 1.0), "edges": PluginSpec("edges", "controlnet", str(cn))}
    service = build_service(ServeConfig(plugins=specs, limits=Limits(max_steps=1000)), warm=False).start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, auth=AUTH), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(10)
    service.shutdown(5)


SAME = dict(prompt="a red fox", seed=7, steps=2, cfg=7.0, size=128)


def native(url, **body):
    r = httpx.post(f"{url}/v1/generate", json={"num_inference_steps": 2, "seed": 7, **body}, headers=BEARER, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_same_request_same_image_through_every_api(live):
    """Native, A1111 (webuiapi) and OpenAI (openai): one request, identical pixels."""
    import openai
    import webuiapi

    url, service = live
    want = native(url, prompt=SAME["prompt"], guidance_scale=SAME["cfg"], width=128, height=128, scheduler="euler-a")
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username=USER, password=PASSWORD)
    a1111 = api.txt2img(prompt=SAME["prompt"], seed=7, steps=2, cfg_scale=7.0, width=128, height=128,
                        sampler_name="Euler a")
    client = openai.OpenAI(api_key=KEY, base_url=f"{url}/v1")
    oai = client.images.generate(model=service.model_name, prompt=SAME["prompt"], size="128x128",
                                 response_format="b64_json",
                                 extra_body={"seed": 7, "steps": 2, "cfg_scale": 7.0, "scheduler": "euler-a"})
    ref = pixels(want["images"][0])
    assert np.array_equal(np.asarray(a1111.image.convert("RGB")), ref)
    assert np.array_equal(pixels(oai.data[0].b64_json), ref)
    assert a1111.info["seed"] == 7 and a1111.info["xa_parameters"]["width_sd15"] == 64


def test_openai_package(live):
    import openai

    url, service = live
    client = openai.OpenAI(api_key=KEY, base_url=f"{url}/v1")
    assert [m.id for m in client.models.list()] == [service.model_name]
    out = client.images.generate(prompt="a cat", n=2, size="128x96", response_format="b64_json",
                                 extra_body={"negative_prompt": "blurry", "seed": 3, "step": 2})
    assert len(out.data) == 2 and Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (128, 96)
    url_out = client.images.generate(prompt="a cat", size="128x128", response_format="url", extra_body={"steps": 2})
    fetched = httpx.get(url_out.data[0].url, headers=BEARER)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    assert httpx.get(url_out.data[0].url).status_code == 401  # the store is behind the key as well
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", size="big", extra_body={"steps": 2})
    assert e.value.body["param"] == "size" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", n=9, extra_body={"steps": 2})
    assert e.value.body["param"] == "n" and "num_images_per_prompt" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="a cat")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="sk-wrong", base_url=f"{url}/v1").images.generate(prompt="a cat")


def test_webuiapi_lora_controlnet_img2img(live):
    import webuiapi

    url, service = live
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username=USER, password=PASSWORD)
    models = api.get_sd_models()
    assert models[0]["title"] == service.model_name and api.get_options()["sd_model_checkpoint"] == service.model_name
    assert set(api.set_options(api.get_options())["applied"]) == {"sd_model_checkpoint", "live_previews_enable"}
    r = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_base_1.0"}, headers=BASIC)
    assert r.status_code == 422 and "sd_xl_base_1.0" in r.json()["detail"]
    assert [x["name"] for x in api.get_loras()] == ["anime"]
    assert {"Euler a", "DPM++ 2M"} <= {s["name"] for s in api.get_samplers()}
    assert api.get_schedulers()[0]["name"] == "automatic"
    common = dict(seed=5, steps=2, width=128, height=128, sampler_name="DPM++ 2M", cfg_scale=7.5)

    # <lora:anime:1> = the native request naming the LoRA, pixel for pixel; the tag is not encoded
    tagged = api.txt2img(prompt="a cat <lora:anime:1>", **common)
    with_lora = native(url, prompt="a cat", plugins=["anime"], width=128, height=128, seed=5)
    plain = native(url, prompt="a cat", width=128, height=128, seed=5)
    assert np.array_equal(np.asarray(tagged.image.convert("RGB")), pixels(with_lora["images"][0]))
    assert not np.array_equal(pixels(plain["images"][0]), pixels(with_lora["images"][0]))
    assert tagged.info["xa_parameters"]["prompt"] == "a cat" and tagged.info["extra_generation_params"]["plugins"] == ["anime"]
    with pytest.raises(RuntimeError, match="configured scale 1"):
        api.txt2img(prompt="a cat <lora:anime:0.5>", **common)

    # a ControlNet unit = the native request with that plugin and image
    control = Image.open(io.BytesIO(base64.b64decode(b64_image(size=(64, 64), seed=2))))
    unit = webuiapi.ControlNetUnit(image=control, module="none", model="edges [0a1b2c3d]")
    # alwayson_scripts={}: webuiapi adds the units to its mutable default dict otherwise (kept for later calls)
    cn = api.txt2img(prompt="a cat", controlnet_units=[unit], alwayson_scripts={}, **common)
    buf = io.BytesIO()
    control.save(buf, "PNG")
    want = native(url, prompt="a cat", plugins=["edges"], images={"edges": base64.b64encode(buf.getvalue()).decode()},
                  width=128, height=128, seed=5)
    assert np.array_equal(np.asarray(cn.image.convert("RGB")), pixels(want["images"][0]))
    with pytest.raises(RuntimeError, match=r"preprocessor .{1,3}canny.{1,3} is not run"):
        api.txt2img(prompt="a cat", controlnet_units=[webuiapi.ControlNetUnit(image=control, module="canny",
                                                                                model="edges")],
                     alwayson_scripts={}, **common)

    # img2img, X-Adapter knobs through alwayson_scripts, and unknown fields reported in info
    init = Image.open(io.BytesIO(base64.b64decode(b64_image(size=(128, 128), seed=4))))
    out = api.img2img(images=[init], prompt="a cat", denoising_strength=0.5, **{**common, "steps": 4},
                      alwayson_scripts={"X-Adapter": {"args": [{"adapter_guidance_start": 0.5}]}})
    assert out.image.size == (128, 128) and out.info["denoising_strength"] == 0.5
    assert out.info["xa_parameters"]["adapter_guidance_start"] == 0.5
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 128, "height": 128,
                                                    "eta": 0.3, "some_future_field": 1}, headers=BASIC, timeout=60)
    assert r.status_code == 200 and set(json.loads(r.json()["info"])["xa_ignored_fields"]) == {"eta", "some_future_field"}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a", "enable_hr": True}, headers=BASIC)
    assert r.status_code == 422 and r.json()["field"] == "enable_hr" and "hires" in r.json()["detail"]
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 0, "width": 128, "height": 128}, headers=BASIC)
    assert r.status_code == 422 and r.json()["field"] == "steps"
    r = httpx.get(f"{url}/sdapi/v1/extra-single-image", headers=BASIC)
    assert r.status_code == 404 and "txt2img" in r.json()["detail"]
    # png-info of the PNG as sent (webuiapi's png_info re-encodes the image, dropping its text chunks)
    r = httpx.post(f"{url}/sdapi/v1/png-info", json={"image": tagged.json["images"][0]}, headers=BASIC)
    assert r.json()["info"].startswith("a cat\n") and r.json()["parameters"]["plugins"] == ["anime"]


def test_webuiapi_progress_and_interrupt(live):
    """A long txt2img: /progress reports its steps (and a preview with live previews on); interrupt
    stops it between steps (409), and the next request is served."""
    import webuiapi

    url, service = live
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username=USER, password=PASSWORD)
    api.set_options({"live_previews_enable": True})
    try:
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(api.txt2img, prompt="a cat", steps=1000, width=128, height=128, seed=1)
            deadline = time.monotonic() + 60
            while True:
                p = api.get_progress()
                if p["state"]["sampling_step"] >= 2:
                    break
                assert time.monotonic() < deadline and not long.done(), p
                time.sleep(0.05)
            assert p["state"]["sampling_steps"] == 1000 + 900 and 0 < p["progress"] < 0.01
            assert p["eta_relative"] > 0 and Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).size == (8, 8)
            t0 = time.monotonic()
            api.interrupt()
            with pytest.raises(RuntimeError, match="409") as e:
                long.result(30)
            assert time.monotonic() - t0 < 5 and "interrupted" in str(e.value)
        deadline = time.monotonic() + 10  # the worker clears its job just after the 409 is answered
        while api.get_progress()["state"]["job_count"] != 0:
            assert time.monotonic() < deadline, api.get_progress()
            time.sleep(0.05)
        assert api.txt2img(prompt="a cat", steps=2, width=128, height=128).image.size == (128, 128)
    finally:
        api.set_options({"live_previews_enable": False})


def test_sse_stream_steps_previews_and_result(live):
    url, _ = live
    body = {"prompt": "a cat", "num_inference_steps": 4, "seed": 2, "width": 128, "height": 128}
    events = []
    with httpx.stream("POST", f"{url}/v1/generate/stream", json=body, headers=BEARER, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "result" and kinds.count("step") == 4 + 3  # stage 1 + stage 2
    steps = [d for k, d in events if k == "step"]
    assert [d["step"] for d in steps] == list(range(1, 8)) and steps[-1]["progress"] == 1.0
    assert pixels(steps[0]["preview"]).shape == (8, 8, 3) and pixels(steps[-1]["preview"]).shape == (16, 16, 3)
    result = events[-1][1]
    assert np.array_equal(pixels(result["images"][0]), pixels(native(url, **body)["images"][0]))
    r = httpx.post(f"{url}/v1/generate", json={**body, "num_inference_steps": 0},
                   headers={**BEARER, "Accept": "text/event-stream"}, timeout=60)
    error = [json.loads(x[5:]) for x in r.text.splitlines() if x.startswith("data:")][-1]
    assert error["status"] == 422 and error["field"] == "num_inference_steps"


def test_sse_client_disconnect_cancels_the_job(live):
    url, service = live
    before = service.metrics.requests.labels("cancelled")._value.get()
    body = {"prompt": "a cat", "num_inference_steps": 1000, "seed": 2, "width": 128, "height": 128}
    with httpx.stream("POST", f"{url}/v1/generate/stream?preview=false", json=body, headers=BEARER, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: step"):
                break
    t0 = time.monotonic()
    while service.running is not None:
        assert time.monotonic() - t0 < 10, "the job kept running after its client left"
        time.sleep(0.01)
    assert service.metrics.requests.labels("cancelled")._value.get() == before + 1


def test_openai_edit_is_the_native_img2img(live):
    import openai

    url, _ = live
    client = openai.OpenAI(api_key=KEY, base_url=f"{url}/v1")
    init = base64.b64decode(b64_image(size=(128, 96), seed=4))
    out = client.images.edit(image=("init.png", init, "image/png"), prompt="a cat",
                             extra_body={"steps": 4, "strength": 0.5, "seed": 1})
    want = native(url, prompt="a cat", num_inference_steps=4, strength=0.5, seed=1, width=128, height=96,
                  width_sd15=64, height_sd15=64, init_image=base64.b64encode(init).decode())
    got = pixels(out.data[0].b64_json)
    assert got.shape == (96, 128, 3) and np.array_equal(got, pixels(want["images"][0]))
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("init.png", init, "image/png"), mask=("m.png", init, "image/png"), prompt="a")
    assert e.value.body["param"] == "mask"


def test_open_webui_and_sillytavern_call_sequences(live):
    """The calls Open WebUI's automatic1111 engine and SillyTavern's SD WebUI source make (from
    their sources), with Basic auth: probes and lists, the options posted back, txt2img."""
    url, service = live

    def get(path):
        r = httpx.get(f"{url}{path}", headers=BASIC)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    # Open WebUI: the current model from options, the models, the whole options dict back, txt2img
    options = get("/sdapi/v1/options")
    assert options["sd_model_checkpoint"] in [m["title"] for m in get("/sdapi/v1/sd-models")]
    assert httpx.post(f"{url}/sdapi/v1/options", json=options, headers=BASIC).status_code == 200
    r = httpx.post(f"{url}/sdapi/v1/txt2img", headers=BASIC, timeout=60, json={
        "prompt": "a cat", "negative_prompt": "", "batch_size": 1, "width": 128, "height": 128, "steps": 2})
    assert r.status_code == 200 and len(r.json()["images"]) == 1

    # SillyTavern: ping (options), upscalers, VAEs, samplers, schedulers, models, set-model then
    # wait for progress 0 and job_count 0, generate with its whole settings body (url, auth included)
    assert all(isinstance(get(f"/sdapi/v1/{p}"), list) for p in
               ("upscalers", "latent-upscale-modes", "sd-vae", "sd-modules", "samplers", "schedulers", "sd-models"))
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": service.model_name},
                      headers=BASIC).status_code == 200
    idle = get("/sdapi/v1/progress")
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    body = {"url": url, "auth": f"{USER}:{PASSWORD}", "prompt": "a cat", "negative_prompt": "blurry",
            "sampler_name": "DPM++ 2M", "scheduler": "automatic", "steps": 2, "cfg_scale": 7, "width": 128,
            "height": 128, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2,
            "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": -1,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": False, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, headers=BASIC, timeout=60)
    assert r.status_code == 200 and "auth" not in r.json()["parameters"]
    ignored = json.loads(r.json()["info"])["xa_ignored_fields"]
    assert set(ignored) == {"url", "auth", "clip_skip", "override_settings.CLIP_stop_at_last_layers",
                            "override_settings.sd_vae"}
