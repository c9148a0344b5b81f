"""What every API door of xa-serve shares: Refused (an answer with an error status), Generated
(a finished request) and NativeDoor, the one path from a native request body to images.

The A1111 routes (a1111.py), the OpenAI routes (openai_images.py) and the SSE stream translate
their bodies into the native body of POST /v1/generate and hand it to NativeDoor.run: the same
pydantic model, the same validation, queue, deadlines and metrics; nothing is validated twice.
app.py builds the door (it owns the request model) and passes it to the route modules.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable


class Refused(Exception):
    """A request answered with an error status: the JSON body {"error": message, "field": field}
    on the native routes; the A1111 and OpenAI routes reshape it to their APIs' error bodies."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.field, self.retry_after = status, field, retry_after


@dataclass
class Generated:
    """A finished request: the validated native request, the pipeline's output, its ticket."""

    req: Any
    output: Any
    ticket: Any
    png: Callable[[int], bytes]  # image i as PNG with the infotext chunks

    @property
    def params(self) -> dict[str, Any]:
        """The parameters used (seed drawn and sizes resolved), as /v1/generate reports them."""
        return {k: v for k, v in self.output.params.to_dict().items() if k != "extra"}

    def images_base64(self) -> list[str]:
        return [base64.b64encode(self.png(i)).decode() for i in range(len(self.output.images))]

    def native_body(self) -> dict[str, Any]:
        """POST /v1/generate's JSON answer."""
        out, ticket = self.output, self.ticket
        return {
            "images": self.images_base64(),
            "parameters": jsonable(self.params),
            "plugins": self.req.plugins,
            "timings": jsonable({"queue": ticket.queue_seconds, **dict(out.timings)}),
            "overheads": jsonable(dict(getattr(out, "overheads", {}) or {})),
        }


def jsonable(value: Any) -> Any:
    """`value` with non-finite floats as strings and unknown objects as their repr (JSON-safe)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


@dataclass
class NativeDoor:
    """run(request, body, preview=False, on_queued=None) -> Generated, or Refused.

    `body` is a native /v1/generate body (a dict); `preview` keeps the latents for previews;
    `on_queued(ticket)` is called once the request is queued (the SSE stream listens to its
    progress from there). The caller's key id (auth.py) is read from the request's state."""

    run: Callable[..., Awaitable[Generated]]
    service: Any
    model: Any  # the native request's pydantic model
    read: Callable[[Any], Awaitable[dict[str, Any]]]  # a request's JSON object, within the body limit
    open_image: Callable[[str, str], Any]  # (field, base64) -> a PIL image opened within the pixel limit

    @property
    def model_name(self) -> str:
        return getattr(self.service, "model_name", "xa-runtime")


def base_size(width: Any, height: Any, rules: Any) -> dict[str, int]:
    """The SD1.5 size for an SDXL size, for clients that know nothing of X-Adapter (A1111,
    OpenAI): the aspect ratio of width x height at the area of the SD1.5 default size, in
    multiples of rules.sd15_multiple (a square gives the default: 1024x1024 -> 512x512 on the
    real models). {} when the size is not two positive integers (validation names them)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        return {}
    area, m = rules.sd15_default ** 2, rules.sd15_multiple
    w, h = math.sqrt(area * width / height), math.sqrt(area * height / width)
    return {"width_sd15": max(m, round(w / m) * m), "height_sd15": max(m, round(h / m) * m)}


def key_of(request: Any) -> str:
    """The key id the auth middleware gave this request (auth.ANONYMOUS without it)."""
    return getattr(request.state, "key_id", "anonymous")
