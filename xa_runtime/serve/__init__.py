"""`xa-serve`: an HTTP server around one XAdapterPipeline (FastAPI, imported lazily).

service.py holds the queue, the worker, deadlines and metrics and needs no HTTP library;
app.py builds the FastAPI app; config.py reads the TOML config. The `xa-serve` command
is xa_runtime/cli/serve.py, beside the other entry points.
"""
