"""`xa-serve`: an HTTP server around one XAdapterPipeline (FastAPI, imported lazily).

service.py holds the queue, the worker, deadlines and metrics and needs no HTTP library;
app.py builds the FastAPI app; doors.py is the one path from a native request body to images
that the other APIs translate onto: a1111.py (AUTOMATIC1111's /sdapi/v1), openai_images.py
(OpenAI's Images API), events.py (Server-Sent Events with progress.py's step state and
previews); auth.py checks API keys and per-key limits; config.py reads the TOML config. The
`xa-serve` command is xa_runtime/cli/serve.py, beside the other entry points.
"""
