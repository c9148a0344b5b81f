"""Live progress over Server-Sent Events: POST /v1/generate/stream (or POST /v1/generate with
`Accept: text/event-stream`) takes /v1/generate's body and answers a stream of events:

    event: queued   data: {"steps": N}                  the request is in the queue
    event: step     data: {"stage", "step", "steps", "progress", "eta_s", "preview"}   after every step
    event: result   data: /v1/generate's JSON answer (images, parameters, timings, ...)
    event: error    data: {"error", "field", "status"}  the status /v1/generate would answer

`preview` (query parameter, default true) adds a base64 PNG of the cheap latent preview
(progress.py) to each step; false keeps stage 2's two-stream overlap. A client that
disconnects cancels its job: dropped from the queue, or stopped at the next step.
"""


import asyncio
import json
from typing import Any, Callable

from .doors import NativeDoor, Refused


def register(app: Any, door: NativeDoor, error: Callable[[Refused], Any], body_doc: dict[str, Any]) -> None:
    from fastapi import Request

    @app.post("/v1/generate/stream", openapi_extra={"requestBody": body_doc},
              responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})
    async def generate_stream(request: Request, preview: bool = True):
        try:
            data = await door.read(request)
        except Refused as e:
            return error(e)
        return stream_events(door, request, data, preview)


def stream_events(door: NativeDoor, request: Any, data: dict[str, Any], preview: bool) -> Any:
    """The EventSourceResponse of one native request (see the module's docstring)."""
    from sse_starlette.sse import EventSourceResponse

    async def events():
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def on_queued(ticket: Any) -> None:
            updates.put_nowait(("queued", {"steps": ticket.progress.total_steps}))
            ticket.progress.listen(lambda snap: loop.call_soon_threadsafe(updates.put_nowait, ("step", snap)))

        task = asyncio.ensure_future(door.run(request, data, preview=preview, on_queued=on_queued))
        task.add_done_callback(lambda _: updates.put_nowait(("done", None)))
        try:
            while True:
                kind, payload = await updates.get()
                if kind == "done":
                    break
                yield {"event": kind, "data": json.dumps(payload)}
            try:
                done = task.result()
            except Refused as e:
                yield {"event": "error", "data": json.dumps({"error": str(e), "field": e.field, "status": e.status})}
                return
            yield {"event": "result", "data": json.dumps(done.native_body())}
        finally:
            if not task.done():  # the client went away: the door's wait abandons the ticket when cancelled
                task.cancel()

    return EventSourceResponse(events())
