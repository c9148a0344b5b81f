"""OpenAI's Images API on xa-serve, as a translation onto the native request (doors.py):

POST /v1/images/generations  model, prompt, n, size "WxH" (or "auto"), response_format
                             b64_json (default here) | url; LocalAI-style extra fields in the
                             same body: negative_prompt, seed, steps / step, cfg_scale, and any
                             native field (guidance_scale, scheduler, adapter_guidance_start,
                             prompt_sd15, width_sd15, plugins, ...)
POST /v1/images/edits        multipart/form-data: image (one PNG / JPEG / WebP), prompt, n, size
                             (default: the image's size, in multiples the model takes),
                             response_format, extra fields as above: img2img from the image at
                             strength EDIT_STRENGTH unless `strength` is sent; a mask is refused
GET  /v1/images/files/NAME   the images of response_format=url: kept in memory, at most
                             URL_STORE_ITEMS of them, each for URL_TTL_S seconds; fetching one
                             needs the same credential as the API
GET  /v1/models              the served model (its id is the only `model` accepted)

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}; a bad field is 400
(OpenAI's status) naming it by its OpenAI name.
"""


import collections
import secrets
import threading
import time
from typing import Any

from .doors import NativeDoor, Refused, base_size

EDIT_STRENGTH = 0.75  # an edit without `strength`: as A1111's img2img default denoising_strength
TEXT_FIELDS = ("model", "prompt", "negative_prompt", "prompt_sd15", "size", "response_format", "output_format",
               "scheduler", "quality", "style", "user", "background", "moderation")
URL_STORE_ITEMS = 64
URL_TTL_S = 3600
# OpenAI fields that change nothing here (accepted, as OpenAI's own models ignore some of them)
IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression")
ALIASES = {"steps": "num_inference_steps", "step": "num_inference_steps", "cfg_scale": "guidance_scale"}
# native field -> the OpenAI name a client sent it under, for error messages
OPENAI_NAMES = {"num_images_per_prompt": "n", "width": "size", "height": "size"}


class ImageStore:
    """PNG bytes under random names, for response_format=url: bounded (oldest dropped) and expiring."""

    def __init__(self, max_items: int = URL_STORE_ITEMS, ttl_s: float = URL_TTL_S):
        self.max_items, self.ttl_s = max_items, ttl_s
        self._items: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        name = secrets.token_urlsafe(16) + ".png"
        with self._lock:
            self._expire()
            self._items[name] = (time.monotonic() + self.ttl_s, png)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(name)
        return None if item is None else item[1]

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [n for n, (until, _) in self._items.items() if until <= now]:
            del self._items[name]


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> Any:
    from fastapi.responses import JSONResponse

    kind = {429: "rate_limit_error", 503: "server_error", 500: "server_error", 504: "server_error"}.get(
        status, "invalid_request_error")
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def translate(body: dict[str, Any], native_fields: set[str], model_name: str, rules: Any) -> dict[str, Any]:
    """An OpenAI generations body -> the native /v1/generate body; Refused(400 / 404) naming the field."""
    model = body.get("model")
    if model is not None and model != model_name:
        raise Refused(404, f"the model {model!r} does not exist on this server; GET /v1/models lists it: "
                           f"{model_name!r}", "model")
    if "prompt" not in body:
        raise Refused(400, "missing required parameter: prompt", "prompt")
    native: dict[str, Any] = {"prompt": body["prompt"]}
    if body.get("n") is not None:
        native["num_images_per_prompt"] = body["n"]
    size = body.get("size")
    if size is not None and size != "auto":
        w, sep, h = str(size).partition("x")
        if not (isinstance(size, str) and sep and w.isdigit() and h.isdigit()):
            raise Refused(400, f"invalid size={size!r}: 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto'", "size")
        native["width"], native["height"] = int(w), int(h)
    fmt = body.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise Refused(400, f"invalid response_format={fmt!r}: 'b64_json' or 'url'", "response_format")
    out_fmt = body.get("output_format")
    if out_fmt not in (None, "png"):
        raise Refused(400, f"invalid output_format={out_fmt!r}: this server writes 'png' only", "output_format")
    taken = {"model", "prompt", "n", "size", "response_format", "output_format", *IGNORED}
    for key, value in body.items():
        if key in taken:
            continue
        name = ALIASES.get(key, key)
        if name not in native_fields or name in ("prompt", "num_images_per_prompt", "width", "height"):
            raise Refused(400, f"unrecognized request argument supplied: {key} (extra fields: negative_prompt, seed, "
                               f"steps, cfg_scale and /v1/generate's fields)", key)
        native[name] = value
    if "width" in native and "width_sd15" not in native and "height_sd15" not in native:
        native.update(base_size(native["width"], native["height"], rules))
    return native


async def _read_form(request: Any, door: NativeDoor) -> tuple[dict[str, Any], str]:
    """A multipart edits body within the body limit -> (its fields, numbers as numbers; the
    image as base64). Refused naming the field otherwise."""
    import base64
    import json

    limit = door.service.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit() or int(declared) > limit:
        raise Refused(413, f"a multipart body with a Content-Length of at most {limit} bytes", "body")
    try:
        form = await request.form(max_files=2, max_fields=64)
    except Exception as e:  # noqa: BLE001 -- Starlette raises several kinds for a malformed body
        raise Refused(400, f"not a multipart/form-data body: {e}", "body") from None
    if form.get("mask"):
        raise Refused(400, "masks (inpainting) are not available; send the image alone (img2img)", "mask")
    files = form.getlist("image") + form.getlist("image[]")
    if len(files) != 1 or isinstance(files[0], str):
        raise Refused(400, f"one image file (got {len(files)})", "image")
    image = base64.b64encode(await files[0].read()).decode()
    body: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in ("image", "image[]", "mask") or not isinstance(value, str):
            continue
        if key not in TEXT_FIELDS:  # form fields are text: numbers and lists (plugins) as JSON
            try:
                value = json.loads(value)
            except ValueError:
                pass
        body[key] = value
    return body, image


def register(app: Any, door: NativeDoor) -> None:
    from fastapi import Request
    from fastapi.responses import Response

    store = ImageStore()
    created = int(time.time())
    app.state.image_store = store
    native_fields = set(door.model.model_fields)

    def refused(e: Refused, sent: dict[str, Any]) -> Any:
        param = e.field
        if param is not None and param not in sent:
            param = OPENAI_NAMES.get(param, next((k for k, v in ALIASES.items() if v == param and k in sent), param))
        status = 400 if e.status == 422 else e.status
        code = {404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}.get(status)
        return openai_error(status, str(e), param, code or ("invalid_value" if status == 400 else None), e.retry_after)

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        body: dict[str, Any] = {}
        try:
            body = await door.read(request)
            native = translate(body, native_fields, door.model_name, door.service.rules)
            done = await door.run(request, native)
        except Refused as e:
            return refused(e, body)
        return answer(request, body, done)

    def answer(request: Request, body: dict[str, Any], done: Any) -> dict[str, Any]:
        if (body.get("response_format") or "b64_json") == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/images/files/{store.put(done.png(i))}"} for i in range(len(done.output.images))]
        else:
            data = [{"b64_json": b} for b in done.images_base64()]
        return {"created": int(time.time()), "data": data, "output_format": "png"}

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        body: dict[str, Any] = {}
        try:
            body, image = await _read_form(request, door)
            if body.get("size") in (None, "auto"):  # the image's own size, in multiples the model takes
                im, m = door.open_image("image", image), door.service.rules.sdxl_multiple
                body["size"] = f"{max(m, im.width // m * m)}x{max(m, im.height // m * m)}"
            native = translate(body, native_fields, door.model_name, door.service.rules)
            native["init_image"] = image
            native.setdefault("strength", EDIT_STRENGTH)
            done = await door.run(request, native)
        except Refused as e:
            return refused(e, body)
        return answer(request, body, done)

    @app.get("/v1/images/files/{name}")
    def image_file(name: str):
        png = store.get(name)
        if png is None:
            return openai_error(404, f"no image {name!r}: unknown, or expired ({URL_TTL_S} s after it was made, "
                                     f"or pushed out by {URL_STORE_ITEMS} newer ones)", "name", "not_found")
        return Response(png, media_type="image/png")

    @app.get("/v1/models")
    def models():
        return {"object": "list",
                "data": [{"id": door.model_name, "object": "model", "created": created, "owned_by": "xa-runtime"}]}
