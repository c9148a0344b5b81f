"""Drive an xa-serve server: latency percentiles and images/s vs client concurrency, with the
server's queue time separated from the run time.

By default an in-process server (uvicorn on 127.0.0.1, a free port) serving the tiny models
(or --config's) is started; --url targets a running server instead (xa-serve, or
xa-serve --ray). For each concurrency C, C clients send --requests requests in total (each
client sends its next request when its previous one is answered), after one warm-up
request. Per request: the client's wall time, and from the JSON answer the queue seconds
(`timings.queue`) and the run seconds (the sum of the pipeline's stage timings); 429 and
other errors are counted, not timed. Prints a table and writes JSON (device, versions,
command, date, raw samples).

    python benchmarks/bench_serve.py --concurrency 1,2,4,8 --requests 24 \\
        --output benchmarks/results/serve-tiny-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xa_runtime.bench.report import git_commit, versions, write_atomic  # noqa: E402
from xa_runtime.bench.runner import summarize  # noqa: E402


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(not 1 <= c <= 256 for c in levels):
        raise SystemExit(f"error: --concurrency={text!r}: comma-separated integers in 1..256")
    return levels


def start_local_server(config: str | None) -> tuple[str, object, threading.Thread, object]:
    """uvicorn in a thread on a free loopback port; returns (url, server, thread, service)."""
    import uvicorn

    from xa_runtime.serve.app import create_app
    from xa_runtime.serve.config import load_config
    from xa_runtime.serve.service import build_service

    service = build_service(load_config(config)).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread, service


async def _level(url: str, body: dict, concurrency: int, total: int) -> dict:
    import httpx

    records: list[dict] = []
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for _ in counter:
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/generate", json=body)
            wall = time.perf_counter() - t0
            rec = {"status": r.status_code, "wall_s": wall}
            if r.status_code == 200:
                timings = r.json()["timings"]
                rec["queue_s"] = float(timings.pop("queue"))
                rec["run_s"] = float(sum(v for v in timings.values() if isinstance(v, (int, float))))
            records.append(rec)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = [r for r in records if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    images = len(ok) * body.get("num_images_per_prompt", 1)
    return {
        "concurrency": concurrency, "requests": total, "statuses": statuses, "elapsed_s": elapsed,
        "images_per_s": images / elapsed if elapsed > 0 else None,
        "latency": summarize([r["wall_s"] for r in ok]) if ok else None,
        "queue": summarize([r["queue_s"] for r in ok]) if ok else None,
        "run": summarize([r["run_s"] for r in ok]) if ok else None,
        "samples": records,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one in process)")
    ap.add_argument("--config", help="xa-serve config for the in-process server (default: tiny models)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="client counts (default %(default)s)")
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level (default %(default)s)")
    ap.add_argument("--steps", type=int, default=4, help="num_inference_steps per request (default %(default)s)")
    ap.add_argument("--prompt", default="a photo of a cat")
    ap.add_argument("--output", help="JSON file to write")
    args = ap.parse_args(argv)
    levels = _levels(args.concurrency)
    for flag, value, lo, hi in (("--requests", args.requests, 1, 10000), ("--steps", args.steps, 1, 150)):
        if not lo <= value <= hi:
            print(f"error: {flag} must be in {lo}..{hi}", file=sys.stderr)
            return 2
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("error: bench_serve needs httpx (pip install -e '.[test]')", file=sys.stderr)
        return 2
    body = {"prompt": args.prompt, "num_inference_steps": args.steps, "adapter_guidance_start": 0.5, "seed": 0}
    local = None if args.url else start_local_server(args.config)
    url = args.url or local[0]
    try:
        import httpx

        warm = httpx.post(f"{url}/v1/generate", json=body, timeout=600)
        if warm.status_code != 200:
            print(f"error: warm-up request: {warm.status_code} {warm.text[:300]}", file=sys.stderr)
            return 1
        results = [asyncio.run(_level(url, body, c, args.requests)) for c in levels]
    finally:
        if local is not None:
            _, server, thread, service = local
            server.should_exit = True
            thread.join(30)
            service.shutdown(10)
    print(f"{'clients':>7} {'img/s':>7} {'p50 s':>7} {'p99 s':>7} {'queue p50':>9} {'queue p99':>9} {'run p50':>7}  statuses")
    for r in results:
        lat, q, run = r["latency"] or {}, r["queue"] or {}, r["run"] or {}
        def p99(d: dict, width: int) -> str:  # left out below 100 samples: shown as "-", not 0
            return f"{d['p99']:>{width}.3f}" if "p99" in d else f"{'-':>{width}}"

        print(f"{r['concurrency']:>7} {r['images_per_s'] or 0:>7.2f} {lat.get('median', 0):>7.3f} {p99(lat, 7)} "
              f"{q.get('median', 0):>9.3f} {p99(q, 9)} {run.get('median', 0):>7.3f}  {r['statuses']}")
    if args.output:
        out = {
            "benchmark": "serve", "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "git_commit": git_commit(), "machine": platform.platform(), "processor": platform.processor(),
            "server": args.url or f"in-process uvicorn, {'config ' + args.config if args.config else 'tiny models'}",
            "request": body, "versions": versions(), "levels": results,
        }
        write_atomic(Path(args.output), json.dumps(out, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
