"""xa-serve's /openapi.json, on the tiny models: every request example succeeds when posted
(what /docs' "Try it out" sends), and /v1/generate documents its 200 (PNG and JSON) and each
4xx/5xx answer with the error body."""

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.serve.config import ServeConfig  # noqa: E402
from xa_runtime.serve.service import build_service  # noqa: E402


@pytest.fixture(scope="module")
def client():
    service = build_service(ServeConfig(), warm=False).start()
    with TestClient(create_app(service)) as c:
        yield c


def test_every_example_succeeds_when_posted(client):
    spec = client.get("/openapi.json").json()
    posted = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            examples = ([content["example"]] if "example" in content else []) + \
                [e["value"] for e in content.get("examples", {}).values()]
            for example in examples:
                r = client.request(method.upper(), path, json=example, headers={"accept": "application/json"})
                assert 200 <= r.status_code < 300, (path, example, r.text)
                posted.append(path)
    assert "/v1/generate" in posted and "/v1/generate/stream" in posted


def test_generate_documents_its_answers(client):
    op = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]
    ok = op["responses"]["200"]["content"]
    assert ok["image/png"]["schema"]["format"] == "binary" and "images" in ok["application/json"]["schema"]["properties"]
    for code in ("401", "403", "413", "415", "422", "429", "500", "503", "504"):
        assert op["responses"][code]["content"]["application/json"]["schema"]["required"] == ["error"], code
