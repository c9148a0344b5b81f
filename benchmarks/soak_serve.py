"""Soak an xa-serve process: N clients for M minutes, then check that every request got
exactly one response and that the server's memory came back down.

One `xa-serve` process is started on a free loopback port (the built-in tiny models unless
--config names others; --url targets a running server instead, without the memory
figures unless --pid names its process). Each client sends its next request when the
previous one is answered and stops by itself at the end of the soak (or after
--max-requests); every --bad-every-th request is invalid on purpose (steps 0), so the 4xx
path is soaked too. Per request: the status, or the exception if no response came ("lost",
which must stay 0). The server's VmRSS (/proc/PID/status) is read after start-up, after
the warm-up request (the baseline) and after the load, polling up to --settle-s until it
is back within 10% of the baseline. Writes JSON (raw counts, percentiles, memory, command,
versions) and a Markdown table; exits 1 if a request was lost, a 5xx came back or the
memory did not return within 10%.

    python benchmarks/soak_serve.py --clients 8 --minutes 3 \\
        --output benchmarks/results/soak-serve-tiny-cpu-<date>.json   # and .md beside it
    python benchmarks/soak_serve.py --smoke   # a few seconds: 2 clients, 3 s, every 2nd request invalid
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xa_runtime.bench.report import git_commit, versions, write_atomic  # noqa: E402

MEMORY_TOLERANCE = 0.10  # after the load, RSS within 10% of the post-warm-up baseline


def rss_bytes(pid: int) -> int | None:
    """VmRSS of process `pid` in bytes (None where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str | None, log: Path) -> tuple[str, subprocess.Popen]:
    """`xa-serve` in its own process on a free loopback port; returns (url, process) once /readyz is 200."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-c", "import sys; from xa_runtime.cli.serve import main; sys.exit(main())",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if config:
        cmd += ["--config", config]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"xa-serve exited with {proc.returncode} at start; its log: {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"xa-serve not ready after 300 s; its log: {log}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (the documented drain), SIGKILL after 60 s; the exit code."""
    proc.terminate()
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return ordered[int(rank) - 1]


def status_class(status: int) -> str:
    if status == 200:
        return "200"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


async def soak(url: str, body: dict, bad_body: dict, clients: int, seconds: float, max_requests: int,
               bad_every: int, timeout_s: float) -> list[dict]:
    """The request records: {client, index, status | error, wall_s}, one per request sent."""
    import httpx

    records: list[dict] = []
    end = time.monotonic() + seconds
    sent = iter(range(1, 1 << 62))  # request numbers across all clients: every bad_every-th is invalid

    async def client(i: int, http: httpx.AsyncClient) -> None:
        for n in range(max_requests):
            if time.monotonic() >= end:
                return
            bad = bad_every > 0 and next(sent) % bad_every == 0
            rec: dict = {"client": i, "index": n, "bad": bad}
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/generate", json=bad_body if bad else body)
                rec["status"] = r.status_code
            except httpx.HTTPError as e:  # no response: lost
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
            if rec.get("status") == 429:
                await asyncio.sleep(0.2)  # a well-behaved client backs off

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return records


def summarize(records: list[dict]) -> dict:
    counts = {"requests": len(records), "200": 0, "429": 0, "4xx": 0, "5xx": 0, "other": 0, "lost": 0}
    for r in records:
        if "status" not in r:
            counts["lost"] += 1
            continue
        key = status_class(r["status"])
        counts[key if key in counts else "other"] += 1
    ok = [r["wall_s"] for r in records if r.get("status") == 200]
    counts["bad_sent"] = sum(r["bad"] for r in records)
    counts["bad_answered_4xx"] = sum(1 for r in records if r["bad"] and 400 <= r.get("status", 0) < 500)
    latency = {"p50_s": percentile(ok, 50), "p99_s": percentile(ok, 99), "max_s": max(ok) if ok else None}
    return {"counts": counts, "latency_200": latency}


def settle_rss(pid: int | None, baseline: int | None, settle_s: float) -> tuple[int | None, float]:
    """RSS after the load: polled until within MEMORY_TOLERANCE of `baseline` or `settle_s` passed."""
    if pid is None:
        return None, 0.0
    t0 = time.monotonic()
    rss = rss_bytes(pid)
    while baseline and rss and rss > baseline * (1 + MEMORY_TOLERANCE) and time.monotonic() - t0 < settle_s:
        time.sleep(0.5)
        rss = rss_bytes(pid)
    return rss, time.monotonic() - t0


def markdown(result: dict) -> str:
    c, lat, mem = result["summary"]["counts"], result["summary"]["latency_200"], result["memory"]

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    ratio = "-" if mem["after_over_baseline"] is None else f"{mem['after_over_baseline']:.3f}"

    def mb(v: int | None) -> str:
        return "-" if v is None else f"{v / 2**20:.0f}"

    lines = [
        f"# xa-serve soak, {result['date']}",
        "",
        f"Server: {result['server']}; device: {result['device']}.",
        f"Load: {result['clients']} clients for {result['seconds']:.0f} s, request {json.dumps(result['request'])}, "
        f"every {result['bad_every']}th request invalid (steps 0).",
        "",
        "| requests | 200 | 429 | 4xx | 5xx | lost | p50 s | p99 s | RSS start MB | RSS baseline MB | RSS after MB | after/baseline | pass |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|",
        f"| {c['requests']} | {c['200']} | {c['429']} | {c['4xx']} | {c['5xx']} | {c['lost']} | {s(lat['p50_s'])} | "
        f"{s(lat['p99_s'])} | {mb(mem['start_bytes'])} | {mb(mem['baseline_bytes'])} | {mb(mem['after_bytes'])} | "
        f"{ratio} | "
        f"{'yes' if result['passed'] else 'NO: ' + '; '.join(result['failures'])} |",
        "",
        f"RSS: VmRSS of the server process; baseline after the warm-up request, after the load polled up to "
        f"{result['settle_s']} s (took {mem['settle_seconds']:.1f} s). Server exit code after SIGTERM: "
        f"{result['server_exit_code']}.",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start xa-serve on loopback)")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for the memory figures")
    ap.add_argument("--config", help="xa-serve config for the started server (default: the tiny models)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients, 1..256 (default %(default)s)")
    ap.add_argument("--minutes", type=float, default=3.0, help="soak length, (0, 1440] (default %(default)s)")
    ap.add_argument("--max-requests", type=int, default=100000, help="per client, at most (default %(default)s)")
    ap.add_argument("--steps", type=int, default=2, help="num_inference_steps per request (default %(default)s)")
    ap.add_argument("--bad-every", type=int, default=10,
                    help="every Nth request is invalid (0: none) (default %(default)s)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per request, client side (default %(default)s)")
    ap.add_argument("--settle-s", type=float, default=30.0,
                    help="after the load, wait up to this for the RSS to come back (default %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: 2 clients, 3 s, settle 5 s, every 2nd "
                    "request invalid (so that a busy machine still sends one)")
    ap.add_argument("--output", help="JSON file to write (the .md table beside it)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.clients, args.minutes, args.settle_s, args.bad_every = 2, 0.05, 5.0, 2
    checks = (("--clients", args.clients, 1, 256), ("--minutes", args.minutes, 1e-6, 1440),
              ("--steps", args.steps, 1, 150), ("--max-requests", args.max_requests, 1, 10**7),
              ("--bad-every", args.bad_every, 0, 10**6), ("--settle-s", args.settle_s, 0, 3600))
    for flag, value, lo, hi in checks:
        if not lo <= value <= hi:
            print(f"error: invalid {flag} {value!r}: expected {lo}..{hi}", file=sys.stderr)
            return 2
    if args.output and not Path(args.output).parent.is_dir():
        print(f"error: invalid --output {args.output!r}: expected a path in an existing folder", file=sys.stderr)
        return 2
    if args.pid is not None and not args.url:
        print("error: --pid only together with --url", file=sys.stderr)
        return 2
    try:
        import httpx
    except ImportError:
        print("error: soak_serve needs httpx (pip install -e '.[test]')", file=sys.stderr)
        return 2
    body = {"prompt": "a photo of a cat", "num_inference_steps": args.steps, "adapter_guidance_start": 0.5, "seed": 1}
    bad_body = {**body, "num_inference_steps": 0}
    seconds = args.minutes * 60
    proc = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        url, proc = start_server(args.config, Path(tempfile.gettempdir()) / f"soak-serve-{os.getpid()}.log")
        pid = proc.pid
    try:
        start_rss = rss_bytes(pid) if pid else None
        warm = httpx.post(f"{url}/v1/generate", json=body, timeout=600)
        if warm.status_code != 200:
            print(f"error: warm-up request: {warm.status_code} {warm.text[:300]}", file=sys.stderr)
            return 1
        baseline = rss_bytes(pid) if pid else None
        t0 = time.perf_counter()
        records = asyncio.run(soak(url, body, bad_body, args.clients, seconds, args.max_requests, args.bad_every,
                                   args.timeout_s))
        elapsed = time.perf_counter() - t0
        peak_note = rss_bytes(pid) if pid else None
        after, settle_seconds = settle_rss(pid, baseline, args.settle_s)
    finally:
        exit_code = stop_server(proc) if proc is not None else None
    summary = summarize(records)
    ratio = after / baseline if after and baseline else None
    failures = []
    if summary["counts"]["lost"]:
        failures.append(f"{summary['counts']['lost']} lost")
    if summary["counts"]["5xx"]:
        failures.append(f"{summary['counts']['5xx']} 5xx")
    if summary["counts"]["bad_answered_4xx"] != summary["counts"]["bad_sent"]:
        failures.append("an invalid request was not answered 4xx")
    if ratio is not None and ratio > 1 + MEMORY_TOLERANCE:
        failures.append(f"RSS after {ratio:.2f}x the baseline")
    result = {
        "benchmark": "soak_serve", "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/soak_serve.py", *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": git_commit(), "machine": platform.platform(),
        "device": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "server": args.url or f"xa-serve process on loopback, {'config ' + args.config if args.config else 'tiny models'}",
        "clients": args.clients, "seconds": elapsed, "request": body, "bad_every": args.bad_every,
        "settle_s": args.settle_s, "summary": summary,
        "throughput_rps": len(records) / elapsed if elapsed > 0 else None,
        "memory": {"start_bytes": start_rss, "baseline_bytes": baseline, "end_of_load_bytes": peak_note,
                   "after_bytes": after, "after_over_baseline": ratio, "settle_seconds": settle_seconds,
                   "tolerance": MEMORY_TOLERANCE},
        "server_exit_code": exit_code, "passed": not failures, "failures": failures, "versions": versions(),
    }
    c, lat = summary["counts"], summary["latency_200"]
    print(f"requests {c['requests']}: 200 {c['200']}, 429 {c['429']}, 4xx {c['4xx']}, 5xx {c['5xx']}, lost {c['lost']}; "
          f"p50 {lat['p50_s']}, p99 {lat['p99_s']} s; RSS baseline {baseline}, after {after} "
          f"({'-' if ratio is None else f'{ratio:.3f}'}x); {'pass' if not failures else 'FAIL: ' + '; '.join(failures)}")
    if args.output:
        out = Path(args.output)
        write_atomic(out, json.dumps(result, indent=1))
        write_atomic(out.with_suffix(".md"), markdown(result))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
