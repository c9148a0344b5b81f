"""xa-serve's playground page in a real headless browser (Debian's chromium driven by
Playwright) against a live `xa-serve` process on the tiny models: the page lists the
configured plugins, generates an image from the form, shows its parameters, and shows the
server's message for a bad value; /docs renders offline (the browser reaches nothing but
loopback here). Skips with the reason where chromium or playwright is missing (.ci/run
installs both)."""

import os
import shutil

import pytest

pytest.importorskip("fastapi")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [test] extra has it)")

from test_serve import serve_process  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from xa_runtime.pipeline import XAdapterPipeline
    from xa_runtime.testing import write_random_lora

    folder = tmp_path_factory.mktemp("playground")
    pipe = XAdapterPipeline.from_tiny(progress=False)
    lora = write_random_lora(folder / "anime.safetensors", pipe.sd15.unet, pipe.sd15.text_encoder, std=0.5)
    config = folder / "serve.toml"
    config.write_text(f'[plugins.anime]\nkind = "lora"\npath = "{lora}"\nscale = 0.8\n')
    proc, url = serve_process("--config", str(config), env={**os.environ, "OMP_NUM_THREADS": "1"}, ready_s=90)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_playground_generates_and_shows_errors(server, page):
    failed = []  # what the browser console would show as a failed load (a /favicon.ico 404 included)
    page.on("response", lambda r: r.status >= 400 and "/v1/generate" not in r.url and failed.append((r.status, r.url)))
    page.goto(server + "/")
    page.wait_for_selector("input[name=plugin][value=anime]")
    assert "anime (lora, scale 0.8)" in page.inner_text("#plugins")
    # the form's defaults and ranges are the server's (GET /v1/parameters), not the page's own
    assert page.input_value("#adapter_guidance_start") == "0.9" and page.input_value("#num_inference_steps") == "50"
    assert page.get_attribute("#num_inference_steps", "max") == "150"  # Limits.max_steps of this server
    assert page.input_value("#scheduler") == "dpmpp-2m" and page.get_attribute("#seed", "placeholder") == "random"
    page.fill("#prompt", "a lighthouse")
    page.fill("#num_inference_steps", "4")
    page.fill("#adapter_guidance_start", "0.5")
    page.fill("#seed", "7")
    page.check("input[name=plugin][value=anime]")
    page.click("#generate")
    image = page.wait_for_selector("#result img", timeout=120_000)
    assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", image)
    shown = page.inner_text("#params")
    assert '"seed": 7' in shown and '"prompt": "a lighthouse"' in shown and '"anime"' in shown
    assert page.inner_text("#error") == ""

    page.fill("#num_inference_steps", "0")  # the server refuses it and the page says why
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    error = page.inner_text("#error")
    assert error.startswith("422") and "num_inference_steps" in error
    assert page.query_selector("#result img") is None and page.inner_text("#params") == ""  # the old image went
    assert page.query_selector("#num_images_per_prompt") is not None and failed == [], failed


def test_a_page_on_another_origin_cannot_generate(page):
    """A page served from another origin (http://elsewhere.test, answered by the browser's
    router) posts to the server as a cross-site page can without a preflight (text/plain,
    a form) and with JSON: nothing is generated."""
    import threading
    import time

    import uvicorn
    from test_serve import FAST, StubPipe, _free_port

    from xa_runtime.cli.serve import uvicorn_config
    from xa_runtime.serve.app import create_app
    from xa_runtime.serve.config import Limits
    from xa_runtime.serve.service import Service

    pipe = StubPipe()
    service = Service(pipe, Limits()).start()
    port = _free_port()
    server = uvicorn.Server(uvicorn_config(create_app(service), "127.0.0.1", port, service.limits, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    target = f"http://127.0.0.1:{port}/v1/generate"
    try:
        while not server.started:
            time.sleep(0.05)
        page.route("http://elsewhere.test/", lambda route: route.fulfill(
            status=200, content_type="text/html",
            body=f'<form id="f" method="post" action="{target}" enctype="text/plain">'
                 f'<input name=\'{{"prompt": "a", "x": "\' value=\'"}}\'></form>'))
        page.goto("http://elsewhere.test/")
        import json

        statuses = page.evaluate("""async ([url, body]) => {
            const out = [];
            for (const [mode, type] of [["no-cors", "text/plain"], ["no-cors", "application/x-www-form-urlencoded"],
                                        ["cors", "application/json"]]) {
              try {
                const r = await fetch(url, {method: "POST", mode, headers: {"Content-Type": type}, body});
                out.push(r.status);
              } catch (e) { out.push(String(e)); }
            }
            return out;
        }""", [target, json.dumps(FAST)])
        with page.expect_navigation(url=target):
            page.evaluate("document.getElementById('f').submit()")  # a plain form post, navigating away
        assert "Origin" in page.content() and pipe.calls == 0, (statuses, page.content())
        assert statuses[2] != 200, statuses  # JSON needs a preflight, which the server does not grant
    finally:
        server.should_exit = True
        thread.join(10)
        service.shutdown(5)


def test_api_docs_render_offline(server, page):
    page.goto(server + "/docs")
    title = page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "xa-serve" in title.inner_text()
    page.get_by_text("/v1/generate", exact=True).first.wait_for(timeout=10_000)


def test_playground_asks_for_a_key(page):
    """Against a server with an API key (stub pipeline): the page shows the key field after
    the 401, loads the plugins once a key is typed, and generates with it."""
    import threading
    import time

    import uvicorn
    from test_serve import StubPipe, _free_port

    from xa_runtime.serve.app import create_app
    from xa_runtime.serve.auth import AuthConfig
    from xa_runtime.serve.config import Limits
    from xa_runtime.serve.service import Service

    service = Service(StubPipe(), Limits(), plugins={"sketch": object()}).start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, auth=AuthConfig(api_keys=["sk-play"])),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#auth.on", timeout=10_000)
        page.fill("#api-key", "sk-play")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("input[name=plugin][value=sketch]", timeout=10_000)
        page.fill("#num_inference_steps", "2")
        page.click("#generate")
        page.wait_for_selector("#result img", timeout=30_000)
        assert page.inner_text("#error") == ""
    finally:
        server.should_exit = True
        thread.join(10)
        service.shutdown(5)
