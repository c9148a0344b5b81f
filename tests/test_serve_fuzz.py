"""Fuzzing xa-serve's request schema with Schemathesis (Hypothesis strategies generated from
/openapi.json: schema-valid and schema-violating bodies) on a stub pipeline: no request may
get a 5xx, but for 504 when the request's own timeout_s passed (xa-serve's documented
answer). Bounded: a fixed number of derandomized examples per mode, no per-example deadline."""

import contextlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from xa_runtime.serve.app import create_app  # noqa: E402
from xa_runtime.serve.config import Limits  # noqa: E402
from xa_runtime.serve.service import Service  # noqa: E402

from test_serve import StubPipe  # noqa: E402
from test_serve_hostile import ImagePlugin  # noqa: E402

EXAMPLES = 120


def _flushing() -> bool:
    """Whether this thread flushes denormals (torch.set_flush_denormal only sets the mode)."""
    tiny = np.float64(float.fromhex("0x0.0000000000001p-1022"))
    return bool(tiny * np.float64(1.0) == 0)


@contextlib.contextmanager
def subnormal_floats():
    """conftest flushes denormals for the CPU models' sake; Hypothesis refuses to generate
    floats in that processor state, so it is lifted while the fuzzer runs."""
    flushed = _flushing()
    torch.set_flush_denormal(False)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushed)


def honouring_denormals(app):
    """`app`, run with denormals honoured in whatever thread serves it. Schemathesis serves
    every ASGI app of the process on one event-loop thread, started by the first test that
    needs it: started while conftest flushes denormals, that thread parses a JSON 5e-324 as
    0.0, and the negative fuzz saw an invalid seed accepted as 0 (only after other tests)."""

    async def serve(scope, receive, send):
        flushed = _flushing()
        torch.set_flush_denormal(False)
        try:
            await app(scope, receive, send)
        finally:
            torch.set_flush_denormal(flushed)

    return serve


@pytest.fixture(scope="module")
def app():
    # failures=False: Hypothesis draws strings among the project's own constants, the stub's 'boom' included
    service = Service(StubPipe(failures=False), Limits(max_steps=60, queue_size=64, max_image_pixels=256 * 256),
                      plugins={"sketch": ImagePlugin()}).start()
    yield create_app(service, shutdown_on_exit=False)
    service.shutdown(5)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(app, mode):
    operation = schemathesis.openapi.from_asgi("/openapi.json", honouring_denormals(app))["/v1/generate"]["POST"]
    statuses = []

    with subnormal_floats():
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case):
            response = case.call()
            statuses.append(response.status_code)
            if response.status_code == 504:  # the one designed 5xx: only for the client's own timeout_s
                own = isinstance(case.body, dict) and isinstance(case.body.get("timeout_s"), (int, float))
                assert own and "deadline" in response.text, (case.body, response.text)
                return
            assert response.status_code < 500, (case.body, response.text)

        run()
    assert len(statuses) >= EXAMPLES // 2  # it really sent requests
    if mode is GenerationMode.NEGATIVE:
        assert set(statuses) <= {400, 413, 422}
    else:  # the schema's ranges lead most valid bodies to the pipeline (others: strength without init_image ...)
        assert statuses.count(200) >= EXAMPLES // 5
