"""xa-serve's request log, on the stub pipeline: one line per request with a request id (also
the X-Request-ID header), seed, steps, seconds per stage, queue wait and outcome; JSON on
request; prompts only when the operator turns them on."""

import json
import logging

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.serve.config import HttpOptions, Limits  # noqa: E402
from xa_runtime.serve.service import Service  # noqa: E402

from test_serve import FAST, StubPipe  # noqa: E402


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "xa_runtime.serve.requests"]


@pytest.mark.parametrize("log_prompts", [False, True])
def test_one_json_line_per_request(caplog, log_prompts):
    service = Service(StubPipe(), Limits()).start()
    with TestClient(create_app(service, http=HttpOptions(log_format="json", log_prompts=log_prompts))) as c:
        with caplog.at_level(logging.INFO, logger="xa_runtime.serve.requests"):
            ok = c.post("/v1/generate", json={**FAST, "seed": 7, "prompt": "a secret cat"})
            bad = c.post("/v1/generate", json={**FAST, "num_inference_steps": 0}, headers={"x-request-id": "mine-1"})
    assert ok.status_code == 200 and bad.status_code == 422
    got = [json.loads(line) for line in lines(caplog)]
    assert len(got) == 2
    first, second = got
    assert first["request_id"] == ok.headers["x-request-id"] and len(first["request_id"]) == 16
    assert first["status"] == 200 and first["outcome"] == "ok" and first["seed"] == 7 and first["steps"] == 2
    assert first["stage_seconds"] == {"stage1": 0.001} and first["queue_seconds"] >= 0 and first["seconds"] > 0
    assert ("prompt" in first) is log_prompts and ("secret" in json.dumps(first)) is log_prompts
    assert second["request_id"] == bad.headers["x-request-id"] == "mine-1"
    assert second["status"] == 422 and second["outcome"] == "refused"


def test_text_line_and_the_cli_flag(caplog):
    from xa_runtime.cli.serve import build_parser

    assert build_parser().parse_args(["--log-format", "json"]).log_format == "json"
    service = Service(StubPipe(), Limits()).start()
    with TestClient(create_app(service)) as c:
        with caplog.at_level(logging.INFO, logger="xa_runtime.serve.requests"):
            r = c.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    (line,) = lines(caplog)
    rid = r.headers["x-request-id"]
    assert rid != "bad id with spaces" and line.startswith(f"request_id={rid} method=GET path=/healthz status=200")
