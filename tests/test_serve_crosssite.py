"""xa-serve against cross-site pages and slow clients, on the stub pipeline: a body that is
not JSON is 415 (multipart only where OpenAI's spec has it), a foreign Origin is 403 unless
allowed; 100 connections sending one byte a second neither reset /healthz nor fail a
generation, and are closed by the head deadline; a client leaving mid-body logs no traceback."""

import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from xa_runtime.cli.serve import uvicorn_config  # noqa: E402
from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.serve.config import HttpOptions, Limits  # noqa: E402
from xa_runtime.serve.service import Service  # noqa: E402

from test_serve import FAST, StubPipe, _free_port  # noqa: E402

GENERATING = ["/v1/generate", "/v1/generate/stream", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
              "/v1/images/generations", "/v1/images/edits"]


@pytest.fixture
def client():
    pipe = StubPipe()
    service = Service(pipe, Limits()).start()
    with TestClient(create_app(service, http=HttpOptions(allowed_origins=("https://ok.example",)))) as c:
        yield c, pipe


@pytest.mark.parametrize("route", GENERATING)
@pytest.mark.parametrize("ctype, body", [
    ("text/plain", json.dumps(FAST)), ("application/x-www-form-urlencoded", "prompt=a+cat"),
    ("multipart/form-data; boundary=x", "--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na\r\n--x--\r\n"),
    (None, json.dumps(FAST))])
def test_a_body_that_is_not_json_is_415(client, route, ctype, body):
    c, pipe = client
    if route == "/v1/images/edits" and ctype and ctype.startswith("multipart"):
        pytest.skip("multipart is the edits route's own format (its Origin is still checked below)")
    headers = {"content-type": ctype} if ctype else {}
    r = c.post(route, content=body.encode(), headers=headers)
    assert r.status_code == 415 and r.json()["field"] == "Content-Type", (route, r.status_code, r.text)
    assert pipe.calls == 0


@pytest.mark.parametrize("route", GENERATING + ["/sdapi/v1/interrupt"])
@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1"])
def test_a_cross_origin_request_is_403(client, route, origin):
    c, pipe = client
    r = c.post(route, json=FAST, headers={"origin": origin})
    assert r.status_code == 403 and r.json()["field"] == "Origin", (route, r.text)
    r = c.post("/v1/images/edits", files={"image": ("a.png", b"x", "image/png")}, data={"prompt": "a"},
               headers={"origin": origin})
    assert r.status_code == 403
    assert pipe.calls == 0


def test_same_and_allowed_origins_generate(client):
    c, pipe = client
    for origin in ("http://testserver", "https://ok.example", "https://OK.example:443"):
        assert c.post("/v1/generate", json=FAST, headers={"origin": origin}).status_code == 200, origin
    assert c.post("/v1/generate", json=FAST).status_code == 200  # no Origin: not a browser's cross-site request
    assert c.get("/healthz", headers={"origin": "https://evil.example"}).status_code == 403


@pytest.fixture
def live():
    """A real uvicorn server on loopback with xa-serve's settings, a 1 s head/body deadline."""
    pipe = StubPipe(delay=0.01)
    service = Service(pipe, Limits(header_timeout_s=1.0, max_connections=200)).start()
    port = _free_port()
    import uvicorn

    server = uvicorn.Server(uvicorn_config(create_app(service), "127.0.0.1", port, service.limits, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port, pipe
    server.should_exit = True
    thread.join(10)
    service.shutdown(5)


def test_slow_connections_do_not_starve_the_server(live):
    url, port, pipe = live
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    stop = time.monotonic() + 3.0
    try:
        head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sent, closed = 0, set()
        while time.monotonic() < stop:  # one byte a second on each (stops by itself)
            for i, s in enumerate(socks):
                if i in closed:
                    continue
                try:
                    s.send(head[sent:sent + 1])
                except OSError:
                    closed.add(i)
            sent += 1
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            assert httpx.post(f"{url}/v1/generate", json=FAST, timeout=10).status_code == 200
            time.sleep(1.0)
        for i, s in enumerate(socks):  # past the 1 s head deadline: the server closed them (a timeout here fails)
            s.settimeout(2)
            try:
                data = s.recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b"", (i, data)
    finally:
        for s in socks:
            s.close()


def test_a_slow_body_is_408_and_a_client_leaving_mid_body_logs_no_traceback(live, caplog):
    url, port, pipe = live
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                  b"\r\n{\"pro")
        s.settimeout(5)
        assert b" 408 " in s.recv(4096).split(b"\r\n")[0]
    with caplog.at_level(logging.ERROR):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"pro")
            time.sleep(0.2)
        time.sleep(0.5)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert "Exception in ASGI application" not in caplog.text and "Traceback" not in caplog.text, caplog.text
    assert pipe.calls == 0
