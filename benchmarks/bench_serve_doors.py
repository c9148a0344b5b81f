"""Two costs of xa-serve's doors, on an in-process server (uvicorn on loopback, the tiny models):

--measure disconnect  seconds from a client closing its socket mid-run to the job's stop (the
                      worker leaves the pipeline), per route: the native POST /v1/generate, the
                      SSE stream and A1111's txt2img (routes the code under test lacks are
                      skipped, so the same script measures main). The job runs 1000 steps; each
                      run waits until the job has done a few steps, then closes the socket.
--measure auth        the per-request cost of the key check: GET /v1/plugins (no model work)
                      over keep-alive connections to two servers at once, one without keys and
                      one with 8 keys (the client sends the last one; every key is compared),
                      requests alternating; and the key check alone, timed in process.

--code PATH imports xa_runtime from PATH (default: this checkout), so one command measures main
and the branch on the same machine. Prints a table and writes JSON (--output).

    OMP_NUM_THREADS=1 python benchmarks/bench_serve_doors.py --measure disconnect --runs 10 \\
        --code /work/main --output /tmp/disconnect-main.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import sys
import threading
import time
from pathlib import Path

BODY = {"prompt": "a cat", "num_inference_steps": 1000, "seed": 1, "width": 128, "height": 128}
ROUTES = {  # name -> (path, body, extra headers)
    "generate": ("/v1/generate", BODY, ""),
    "stream": ("/v1/generate/stream?preview=false", BODY, ""),
    "a1111": ("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 1000, "seed": 1, "width": 128, "height": 128}, ""),
}


def start(auth_keys: list[str] | None = None):
    """(port, service, server, thread): uvicorn in a thread serving the tiny models."""
    import uvicorn

    from xa_runtime.serve.app import create_app
    from xa_runtime.serve.config import Limits, ServeConfig
    from xa_runtime.serve.service import build_service

    service = build_service(ServeConfig(limits=Limits(max_steps=1000))).start()
    kwargs = {}
    if auth_keys is not None:
        from xa_runtime.serve.auth import AuthConfig

        kwargs["auth"] = AuthConfig(api_keys=auth_keys)
    app = create_app(service, **kwargs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return port, service, server, thread, app


def in_flight(service) -> bool:
    return service.metrics.in_flight._value.get() == 1


def measure_disconnect(runs: int, warm_steps: int) -> dict:
    port, service, server, thread, app = start()
    paths = {r.path for r in app.routes}
    out = {}
    try:
        from xa_runtime.pipeline import GenerationParams

        steps = []  # the bound: a job stops at its next step, so one step's time (stage 1 and 2 mixed)
        for _ in range(3):
            t0 = time.perf_counter()
            service.pipeline.generate(GenerationParams(**{**BODY, "num_inference_steps": 20}))
            steps.append((time.perf_counter() - t0) / (20 + 18))
        out["20-step run / 38 steps, overhead incl."] = {"step_s": summarize(steps)}
        for name, (path, body, _) in ROUTES.items():
            if path.split("?")[0] not in paths:
                out[name] = "not served by this code"
                continue
            samples = []
            for _ in range(runs):
                raw = json.dumps(body).encode()
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(raw), raw))
                while not in_flight(service):
                    time.sleep(0.001)
                time.sleep(warm_steps * 0.05)  # a few steps in (tiny models: ~10-40 ms per step here)
                sock.close()
                t0 = time.perf_counter()
                while in_flight(service):
                    time.sleep(0.0005)
                samples.append(time.perf_counter() - t0)
                time.sleep(0.2)
            out[name] = {"stop_after_disconnect_s": summarize(samples), "samples": samples}
    finally:
        server.should_exit = True
        thread.join(10)
        service.shutdown(5)
    return out


def measure_auth(requests: int) -> dict:
    """Two servers at once (no keys; 8 keys), requests alternating between them (the order
    flips every pair), so that the machine's load falls on both alike; plus the key check
    alone (Gate.identify) timed in process."""
    import statistics
    import timeit

    import httpx

    from xa_runtime.serve.auth import AuthConfig, Gate

    keys = [f"sk-bench-{i:02d}-0123456789abcdef" for i in range(8)]
    header = {"Authorization": f"Bearer {keys[-1]}"}
    servers = [start(None), start(keys)]
    try:
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{servers[0][0]}"),
                   httpx.Client(base_url=f"http://127.0.0.1:{servers[1][0]}", headers=header)]
        for client in clients:
            for _ in range(200):  # warm-up
                assert client.get("/v1/plugins").status_code == 200
        samples: list[list[float]] = [[], []]
        for i in range(requests):
            for k in ((0, 1) if i % 2 else (1, 0)):
                t0 = time.perf_counter()
                r = clients[k].get("/v1/plugins")
                samples[k].append(time.perf_counter() - t0)
                assert r.status_code == 200
        for client in clients:
            client.close()
    finally:
        for port, service, server, thread, _ in servers:
            server.should_exit = True
            thread.join(10)
            service.shutdown(5)
    gate = Gate(AuthConfig(api_keys=keys))
    n = 20000
    check = min(timeit.repeat(lambda: gate.identify(header["Authorization"], False), number=n, repeat=5)) / n
    diffs = [b - a for a, b in zip(samples[0], samples[1])]
    return {"no keys configured": {"request_s": summarize(samples[0])},
            "8 keys, Bearer (the last one)": {"request_s": summarize(samples[1])},
            "paired difference (keys - none)": {"diff_s": {"median": statistics.median(diffs),
                                                           "p90": sorted(diffs)[int(0.9 * len(diffs))],
                                                           "min": min(diffs), "max": max(diffs), "n": len(diffs)}},
            "key check alone (Gate.identify, 8 keys)": {"check_s": {"median": check, "p90": check, "min": check,
                                                                    "max": check, "n": n}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", choices=["disconnect", "auth"], required=True)
    ap.add_argument("--runs", type=int, default=10, help="disconnects per route (default %(default)s)")
    ap.add_argument("--requests", type=int, default=3000, help="timed requests per setting (default %(default)s)")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout to import xa_runtime from")
    ap.add_argument("--output", help="JSON file to write")
    args = ap.parse_args()
    sys.path.insert(0, args.code)
    global summarize
    from xa_runtime.bench.report import write_atomic  # after --code is on the path
    from xa_runtime.bench.runner import summarize

    import torch

    torch.set_flush_denormal(True)  # as the tests: random tiny weights make denormals
    result = measure_disconnect(args.runs, 3) if args.measure == "disconnect" else measure_auth(args.requests)
    print(f"{'setting':42} {'median':>12} {'p90':>12} {'min':>12} {'max':>12}  n")
    for name, value in result.items():
        stats = value if isinstance(value, str) else next(v for k, v in value.items() if k.endswith("_s"))
        if isinstance(stats, str):
            print(f"{name:42} {stats}")
            continue
        cells = " ".join(f"{stats[q] * 1e6:10.1f}us" for q in ("median", "p90", "min", "max"))
        print(f"{name:42} {cells}  {stats['n']}")
    if args.output:
        doc = {"measure": args.measure, "code": args.code, "result": result, "command": " ".join(sys.argv),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
               "torch_threads": torch.get_num_threads()}
        write_atomic(Path(args.output), json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
