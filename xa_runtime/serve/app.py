"""The FastAPI app around a Service (fastapi and pydantic are imported here only).

POST /v1/generate  JSON body with the pipeline's parameter names (+ plugins, images,
                   init_image, timeout_s); images are base64 (PNG, JPEG, WebP);
                   Accept: image/png -> the first image; otherwise JSON with base64 PNGs,
                   the parameters used and seconds per stage (queue included). A client
                   that disconnects abandons its request (dropped from the queue, or
                   stopped at the next denoising step).
GET /              the playground: a page to try the server from a browser (no external assets)
GET /v1/plugins    the configured plugins: name, kind, scale, whether they take / need an image
GET /v1/parameters the generation parameters of the request body (from pipeline/params.py
                   PARAMETERS): JSON-Schema range and default on this server, the playground's label
GET /docs, /redoc  the API docs (Swagger UI, ReDoc) from packaged assets, offline; /openapi.json
GET /healthz       200 while the process serves
GET /readyz        200 when the models are loaded and warm and requests are accepted; else 503
GET /metrics       Prometheus text
Status codes: 413 body too large, 422 bad field (names it), 429 queue full (Retry-After),
500 internal failure (NaN latents included), 503 not ready / shutting down / out of device
memory (Retry-After), 504 deadline passed.
"""

import asyncio
import base64
import contextlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import ParameterError
from ..pipeline.params import CHOICE, FLOAT, INT, PARAMETERS, REQUIRED, SIDE, TEXT, GenerationParams, SizeRules
from .auth import AuthConfig, AuthMiddleware, Gate, KeyLimited
from .config import HttpOptions, Limits
from .doors import Generated, NativeDoor, Refused, key_of
from .doors import jsonable as _jsonable
from .a1111 import register as register_a1111
from .events import register as register_stream
from .guard import CrossSiteGuard
from .requestlog import RequestLog, note
from .events import stream_events
from .openai_images import register as register_openai
from .service import Cancelled, DeadlineExceeded, QueueFull, Service, Ticket, Unavailable, is_out_of_memory

PLAYGROUND = Path(__file__).with_name("static") / "playground.html"


def server_caps(limits: Limits) -> dict[str, int]:
    """The parameters whose range this server's limits narrow: name -> the lower maximum."""
    return {"num_inference_steps": limits.max_steps, "height": limits.max_side, "width": limits.max_side,
            "num_images_per_prompt": limits.max_batch}


def _request_model(limits: Limits = Limits(), rules: SizeRules = SizeRules(), plugin_names: Sequence[str] = (),
                   image_names: Sequence[str] = ()) -> Any:
    """The request body's pydantic model: a field per row of PARAMETERS that the HTTP door
    exposes (its type, default and range from the row, the range narrowed by this server's
    limits), + plugins, images, init_image, timeout_s. Validation beyond types stays with
    validate() and the service (their errors name the field and the accepted range); the
    ranges are written into the JSON schema so that /openapi.json tells clients, fuzzers and
    the playground what is accepted on this server."""
    from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

    types: dict[str, Any] = {TEXT: str | list[str], INT: int, FLOAT: float, CHOICE: str, SIDE: int}
    caps = server_caps(limits)
    fields: dict[str, Any] = {}
    for p in PARAMETERS:
        if not p.http:
            continue
        schema = p.json_schema(rules, caps.get(p.name))
        if p.kind == TEXT:
            schema["maxLength"] = limits.max_prompt_chars
        kind = types[p.kind] | None if p.optional else types[p.kind]
        fields[p.name] = (kind, Field(default=... if p.default is REQUIRED else p.default, json_schema_extra=schema))
    integral = [p.name for p in PARAMETERS if p.http and p.kind in (INT, SIDE)]

    class Strict(BaseModel):
        # strict: JSON true is not an integer (lax mode would run 1 step for "num_inference_steps": true)
        model_config = ConfigDict(extra="forbid", strict=True)

        @field_validator(*integral, mode="before", check_fields=False)  # the fields come with create_model
        @classmethod
        def _integral(cls, value: Any) -> Any:
            # JSON Schema counts 2.0 as an integer; strict mode alone would refuse it (true stays refused)
            return int(value) if isinstance(value, float) and value.is_integer() else value

    return create_model(
        "GenerateRequest", __base__=Strict, **fields,
        plugins=(list[str], Field(default_factory=list, json_schema_extra={"items": {"enum": list(plugin_names)},
                                                                           "uniqueItems": True})),
        # plugin name -> base64 image, for the plugins that take one
        images=(dict[str, str], Field(default_factory=dict,
                                      json_schema_extra={"propertyNames": {"enum": list(image_names)}})),
        init_image=(str | None, None),  # base64; img2img with strength < 1
        timeout_s=(float | None, Field(default=None, json_schema_extra={"exclusiveMinimum": 0})),
    )


def parameters_doc(model: Any) -> list[dict[str, Any]]:
    """GET /v1/parameters: the request's generation parameters in PARAMETERS' order, each with
    its JSON-Schema keywords on this server (type, default, range) and, for the playground's
    form, its `label` (null: not on the form) and `blank` (what an empty field means)."""
    schema = model.model_json_schema()
    out = []
    for p in PARAMETERS:
        if p.http:
            doc = {k: v for k, v in schema["properties"][p.name].items() if k != "title"}
            out.append({"name": p.name, "kind": p.kind, "required": p.name in schema.get("required", ()),
                        "label": p.label or None, "blank": p.blank or None, **doc})
    return out


def request_schema(limits: Limits = Limits(), rules: SizeRules = SizeRules(), plugin_names: Sequence[str] = (),
                   image_names: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON schema of POST /v1/generate's body (for /openapi.json and generated clients)."""
    return _request_model(limits, rules, plugin_names, image_names).model_json_schema()


def _open_image(field: str, text: str, max_pixels: int) -> Any:
    """A base64 (optionally a data: URL) PNG / JPEG / WebP, opened lazily: only its header is
    read, so its declared size can be checked before any pixel is decoded."""
    import binascii

    from PIL import Image

    from ..loading.images import check_image_size

    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterError(field, "<not base64>", "a base64-encoded PNG, JPEG or WebP image") from None
    try:
        im = Image.open(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 -- PIL raises several kinds for bad bytes
        raise ParameterError(field, "<undecodable image>", f"a PNG, JPEG or WebP image ({type(e).__name__})") from None
    if im.format not in ("PNG", "JPEG", "WEBP"):
        raise ParameterError(field, f"<{im.format} image>", "a PNG, JPEG or WebP image")
    check_image_size(field, im.width, im.height, max_pixels)  # pixels and aspect ratio, as xa-generate
    return im


def _decode(field: str, im: Any) -> Any:
    from ..loading.images import to_rgb

    try:
        return to_rgb(im)  # EXIF orientation, 16-bit grey scaled, as xa-generate reads files
    except Exception as e:  # noqa: BLE001 -- a header that opened can still hide a corrupt stream
        raise ParameterError(field, "<undecodable image>", f"a PNG, JPEG or WebP image ({type(e).__name__})") from None


def decode_image(field: str, text: str, max_pixels: int) -> Any:
    """A base64 (optionally a data: URL) PNG / JPEG / WebP -> RGB PIL image; ParameterError naming `field`."""
    return _decode(field, _open_image(field, text, max_pixels))


def decode_request_images(images: dict[str, str], init_image: str | None, max_pixels: int,
                          max_request_pixels: int) -> tuple[dict[str, Any], Any]:
    """The request's images, decoded one at a time after every header was checked: each image
    within `max_pixels`, all of them together within `max_request_pixels` (so a body of many
    small decompression bombs is refused before any of them is decoded)."""
    texts = {f"images.{name}": text for name, text in images.items()}
    if init_image is not None:
        texts["init_image"] = init_image
    opened: dict[str, Any] = {}
    total = 0
    for field, text in texts.items():
        opened[field] = im = _open_image(field, text, max_pixels)
        total += im.width * im.height
        if total > max_request_pixels:
            raise ParameterError(field, f"<{im.width}x{im.height} image>",
                                 f"images of at most {max_request_pixels} pixels in all per request")
    decoded = {field: _decode(field, opened.pop(field)) for field in list(opened)}
    init = decoded.pop("init_image", None)
    return {field.partition(".")[2]: im for field, im in decoded.items()}, init


def _png(image: Any, params: dict[str, Any], index: int, plugins: Any) -> bytes:
    """Image `index` of a response as PNG with xa-generate's two text chunks (infotext.py):
    A1111 infotext under `parameters`, the image's record as JSON under `xa_runtime`."""
    from PIL.PngImagePlugin import PngInfo

    import xa_runtime

    from ..infotext import png_text_chunks

    record = {**params, "image_index": index, "prompt_index": index // max(1, params.get("num_images_per_prompt") or 1),
              "plugins": plugins, "xa_runtime": xa_runtime.__version__}
    info = PngInfo()
    for key, value in png_text_chunks(params, _jsonable(record), record["prompt_index"],
                                      extra={"Version": f"xa-serve {xa_runtime.__version__}"}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def create_app(service: Service, shutdown_on_exit: bool = True, auth: AuthConfig | None = None,
               http: HttpOptions | None = None) -> Any:
    """A FastAPI app serving `service` (already started); its shutdown shuts the service down.
    `auth`: the API keys and per-key limits (auth.py; None: no key asked); `http`: the origins
    allowed besides the server's own (guard.py) and the request log."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi_offline import FastAPIOffline  # /docs and /redoc from packaged assets, no CDN

    names = sorted(service.plugins)
    GenerateRequest = _request_model(service.limits, service.rules, names, [n for n in names if service.takes_image(n)])

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        yield
        if shutdown_on_exit:
            await asyncio.to_thread(service.shutdown)

    app = FastAPIOffline(title="xa-serve", lifespan=lifespan)
    app.state.service = service

    def error(e: Refused):
        body: dict[str, Any] = {"error": str(e)}
        if e.field is not None:
            body["field"] = e.field
        headers = None if e.retry_after is None else {"Retry-After": str(e.retry_after)}
        return JSONResponse(body, status_code=e.status, headers=headers)

    @app.get("/", response_class=HTMLResponse)
    def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/v1/plugins")
    def plugins():
        return {"plugins": service.describe_plugins()}

    parameters = parameters_doc(GenerateRequest)

    @app.get("/v1/parameters")
    def generation_parameters():
        return {"parameters": parameters}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        if service.ready:
            return {"status": "ready"}
        return error(Refused(503, "not ready: models loading or warming up, or shutting down", None,
                             service.limits.retry_after_s))

    @app.get("/metrics")
    def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # The handler reads the raw body itself (size limit while streaming, one error format), so
    # FastAPI cannot infer the body's schema: it is declared here for /openapi.json.
    body_doc = {"required": True, "content": {"application/json": {"schema": GenerateRequest.model_json_schema(),
                                                                   "example": request_example(service)}}}

    gate = Gate(auth or AuthConfig(), service.metrics.registry, service.limits.retry_after_s)
    app.state.gate = gate

    async def run_native(request: Request, data: Any, preview: bool = False, on_queued: Any = None) -> Generated:
        """Every door's one path: the native body validated, queued under the caller's key limits, run."""
        req, params, images, init_image = await _parse_request(data, service, GenerateRequest)
        ident = key_of(request)
        try:
            release = gate.admit(ident)
        except KeyLimited as e:
            service.metrics.requests.labels("rejected").inc()
            raise Refused(429, str(e), None, e.retry_after) from None
        try:
            ticket = _submit(service, req, params, images, init_image, preview, ident)
        except BaseException:
            release()
            raise
        ticket.add_done_callback(lambda _: release())
        if on_queued is not None:
            on_queued(ticket)
        try:
            out = await _outcome(service, ticket, request)
        except Refused as e:
            note(request, outcome=f"{e.status}", queue_seconds=round(ticket.queue_seconds or 0.0, 6))
            raise
        p = out.params
        note(request, outcome="ok", seed=p.seed, steps=p.num_inference_steps, size=f"{p.width}x{p.height}",
             size_sd15=f"{p.width_sd15}x{p.height_sd15}", images=len(out.images), plugins=list(req.plugins),
             queue_seconds=round(ticket.queue_seconds or 0.0, 6),
             stage_seconds={k: round(v, 6) for k, v in getattr(out, "timings", {}).items()},
             prompt=p.prompt, negative_prompt=p.negative_prompt)
        used = {k: v for k, v in out.params.to_dict().items() if k != "extra"}
        return Generated(req, out, ticket, lambda i: _png(out.images[i], used, i, req.plugins))

    door = NativeDoor(run_native, service, GenerateRequest, lambda request: read_body(request, service),
                      lambda field, text: _refused_422(_open_image, field, text, service.limits.max_image_pixels))
    app.state.door = door

    @app.post("/v1/generate", openapi_extra={"requestBody": body_doc}, responses=GENERATE_RESPONSES)
    async def generate(request: Request):
        try:
            data = await read_body(request, service)
            if "text/event-stream" in request.headers.get("accept", ""):
                return stream_events(door, request, data, preview=True)
            done = await run_native(request, data)
        except Refused as e:
            return error(e)
        out, ticket = done.output, done.ticket
        if "image/png" in request.headers.get("accept", ""):
            return Response(done.png(0), media_type="image/png",
                            headers={"X-Seed": str(out.params.seed), "X-Queue-Seconds": f"{ticket.queue_seconds:.6f}"})
        return done.native_body()

    register_stream(app, door, error, body_doc)
    register_a1111(app, door)
    register_openai(app, door)
    app.add_middleware(AuthMiddleware, gate=gate)  # every route, those above included
    http = http or HttpOptions()
    app.add_middleware(CrossSiteGuard, allowed_origins=http.allowed_origins)
    app.add_middleware(RequestLog, log_format=http.log_format, log_prompts=http.log_prompts)  # outermost: every answer
    return app




def request_example(service: Service) -> dict[str, Any]:
    """/docs' "Try it out" body: one that this server answers 200 (cheap: few steps, the
    default sizes, a fixed seed), not the one Swagger would make from the schema's bounds."""
    return {"prompt": "a photo of a cat", "negative_prompt": "blurry",
            "num_inference_steps": min(4, service.limits.max_steps), "seed": 0}


_ERROR_BODY = {"application/json": {"schema": {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong and what is accepted"},
                   "field": {"type": "string", "description": "the field, header or key at fault"}}}}}
# POST /v1/generate's answers, for /openapi.json (the handler builds its responses itself)
GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the first image as PNG (Accept: image/png), else JSON with every image",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": {
                          "type": "object", "required": ["images", "parameters", "timings"],
                          "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"},
                                                    "description": "base64 PNGs"},
                                         "parameters": {"type": "object", "description": "the parameters used"},
                                         "plugins": {"type": "array", "items": {"type": "string"}},
                                         "timings": {"type": "object", "additionalProperties": {"type": "number"},
                                                     "description": "seconds per stage, queue included"},
                                         "overheads": {"type": "object"}}}}}},
    **{code: {"description": why, "content": _ERROR_BODY} for code, why in [
        (401, "no or a wrong API key"), (403, "a cross-origin request (Origin) not allowed"),
        (408, "the body did not arrive within limits.header_timeout_s"), (413, "body over limits.max_body_bytes"),
        (415, "a body that is not JSON"), (422, "a bad field (named in `field`) or a cost over the budget"),
        (429, "the queue or the key's limit is full (Retry-After)"), (499, "the client left"),
        (500, "internal failure"), (503, "not ready, shutting down or out of device memory (Retry-After)"),
        (504, "the deadline passed")]},
}


def _refused_422(fn: Any, field: str, *args: Any) -> Any:
    try:
        return fn(field, *args)
    except ParameterError as e:
        raise Refused(422, str(e), e.name) from None


def _invalid(service: Service, status: int, field: str, message: str) -> Refused:
    service.metrics.requests.labels("invalid").inc()
    return Refused(status, message, field)


async def read_body(request: Any, service: Service) -> dict[str, Any]:
    """The JSON object of a request's body, read within the size limit; Refused (413 / 422,
    counted as invalid) otherwise."""
    def invalid(status: int, field: str, message: str) -> Refused:
        return _invalid(service, status, field, message)

    from starlette.requests import ClientDisconnect

    limit = service.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise invalid(413, "body", f"request body over {limit} bytes")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise invalid(413, "body", f"request body over {limit} bytes")

    timeout = service.limits.header_timeout_s
    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise invalid(408, "body", f"request body not received within {timeout:g} s "
                      "(limits.header_timeout_s)") from None
    except ClientDisconnect:  # the client left mid-body: nobody reads an answer
        raise Refused(499, "cancelled: the client disconnected while sending its body") from None
    body = b"".join(chunks)
    try:
        data = json.loads(body)
    except RecursionError:
        raise invalid(422, "body", f"JSON nested deeper than Python can read ({sys.getrecursionlimit()} levels)") from None
    except ValueError as e:
        raise invalid(422, "body", f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise invalid(422, "body", "a JSON object")
    return data


async def _parse_request(data: dict[str, Any], service: Service, model: Any) -> tuple[Any, GenerationParams, dict, Any]:
    """A native body typed, its plugin names and then its images checked; Refused (422,
    counted as invalid) naming the field otherwise."""
    from pydantic import ValidationError

    def invalid(status: int, field: str, message: str) -> Refused:
        return _invalid(service, status, field, message)

    try:
        req = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "body"
        raise invalid(422, field, f"invalid {field}: {first['msg']}") from None
    params = GenerationParams(**req.model_dump(exclude={"plugins", "timeout_s", "images", "init_image"}), output_type="pil")
    if req.timeout_s is not None and not (math.isfinite(req.timeout_s) and req.timeout_s > 0):
        raise invalid(422, "timeout_s", f"invalid timeout_s={req.timeout_s!r}: a positive number of seconds")
    lim = service.limits
    try:
        service.check_plugins(req.plugins, list(req.images))  # names first: no image of an unknown plugin is read
        images, init_image = await asyncio.to_thread(decode_request_images, req.images, req.init_image,
                                                     lim.max_image_pixels, lim.max_request_pixels)
    except ParameterError as e:
        raise invalid(422, e.name, str(e)) from None
    return req, params, images, init_image


def _submit(service: Service, req: Any, params: GenerationParams, images: dict, init_image: Any,
            preview: bool = False, key_id: str | None = None) -> Ticket:
    """Queue the request (the service counts its own refusals)."""
    try:
        return service.submit(params, req.plugins, req.timeout_s, images, init_image, preview, key_id)
    except ParameterError as e:
        raise Refused(422, str(e), e.name) from None
    except QueueFull as e:
        raise Refused(429, str(e), None, e.retry_after) from None
    except Unavailable as e:
        raise Refused(503, str(e), None, service.limits.retry_after_s) from None


async def _outcome(service: Service, ticket: Ticket, request: Any) -> Any:
    """The request's XAdapterOutput, or Refused with the status its failure maps to."""
    retry = service.limits.retry_after_s
    try:
        return await _wait_or_abandon(ticket, request)
    except Cancelled as e:  # the client is gone (nobody reads this response), or A1111's interrupt
        if ticket.reason == "interrupted":
            raise Refused(409, f"interrupted (POST /sdapi/v1/interrupt): {e}") from None
        raise Refused(499, f"cancelled: {e}") from None
    except ParameterError as e:
        raise Refused(422, str(e), e.name) from None
    except DeadlineExceeded as e:
        raise Refused(504, f"deadline exceeded: {e}") from None
    except Unavailable as e:
        raise Refused(503, str(e), None, retry) from None
    except Exception as e:  # noqa: BLE001 -- the worker logged it and keeps serving
        if is_out_of_memory(e):
            raise Refused(503, f"out of device memory for this request (freed; retry, or ask less): {e}", None,
                          retry) from None
        raise Refused(500, f"internal error: {type(e).__name__}: {e}") from None


async def _wait_or_abandon(ticket: Ticket, request: Any) -> Any:
    """The ticket's result; if the client disconnects (or this handler is cancelled, as Ray
    Serve does when its client goes away) the request is abandoned and Cancelled raised.
    The disconnect is awaited (ASGI's http.disconnect), not polled: the job is told at once
    and stops at its next denoising step."""
    waiter = asyncio.wrap_future(ticket)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        ticket.abandon()
        _unread(waiter)
        raise Cancelled("the client disconnected")
    except asyncio.CancelledError:
        ticket.abandon()
        _unread(waiter)
        raise
    finally:
        gone.cancel()


async def _client_gone(request: Any) -> None:
    """Returns when the client has disconnected (the body was read before: the next ASGI
    message is http.disconnect; uvicorn repeats it to every reader)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 -- a server whose receive cannot be awaited here: its cancellation tells
        await asyncio.Event().wait()


def _unread(waiter: "asyncio.Future") -> None:
    """Nobody reads an abandoned request's outcome: retrieve it when it comes (asyncio would log it)."""
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
