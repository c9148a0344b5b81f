"""Replay of hostile cases against the command-line tools (and the shared image reader), as a
user or a failing machine would bring them: interrupted and concurrent writes, full disks,
signals, NaN / inf weights, configs beyond the architecture, odd images, limits. Each case runs
the code under --src in fresh processes on the tiny models and is counted handled (exit status
and one line as documented, no traceback, nothing partial left) or mishandled.

    python benchmarks/hostile_replay.py --src .           # this checkout
    python benchmarks/hostile_replay.py --src /work/main  # another one, for a before/after count

Prints a table per category and writes JSON (--json). Faults that need more than a command
line are injected through a sitecustomize module (os.replace made slow, failing, or raising
SIGTERM); full disks are small tmpfs mounts when run as root (skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

SITE = textwrap.dedent("""
    import os, signal, time
    _real = os.replace
    def _replace(src, dst, *a, **k):
        name = os.path.basename(str(dst))
        if os.environ.get("REPLAY_FAIL_REPLACE") == name:
            raise OSError(16, "Device or resource busy", str(dst))
        if os.environ.get("REPLAY_SIGTERM_REPLACE") and name.endswith(".png"):
            os.kill(os.getpid(), signal.SIGTERM)
        out = _real(src, dst, *a, **k)
        if name.endswith(".png") and os.environ.get("REPLAY_SLOW_REPLACE"):
            time.sleep(float(os.environ["REPLAY_SLOW_REPLACE"]))
        return out
    if any(k.startswith("REPLAY_") for k in os.environ):
        os.replace = _replace
""")

FIXTURES = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from xa_runtime.models.tiny import build_tiny_models
    from xa_runtime.testing import save_tiny_models
    from xa_runtime.testing.plugins import write_tiny_controlnet, write_tiny_image_encoder, write_tiny_ip_adapter
    root = Path(sys.argv[1])
    paths = save_tiny_models(root / "tiny")
    sd15 = build_tiny_models(0)[0]
    cn, _ = write_tiny_controlnet(root / "cn", sd15.unet)
    ip = write_tiny_ip_adapter(root / "ip", sd15.unet)["bin"]
    write_tiny_image_encoder(root / "ip" / "image_encoder")
    def poison(path, value):
        state = load_file(path)
        key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[key].view(-1)[1] = value
        save_file(state, path)
    state = {k: v.clone() for k, v in load_file(paths.adapter_safetensors).items()}
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    save_file(state, root / "adapter_nan.safetensors")
    import shutil
    shutil.copytree(cn, root / "cn_inf")
    poison(root / "cn_inf" / "diffusion_pytorch_model.safetensors", float("inf"))
    shutil.copytree(paths.sdxl_vae_dir, root / "vae_nan")
    poison(next((root / "vae_nan").glob("*.safetensors")), float("nan"))
    print(json.dumps({"sd15": str(paths.sd15_dir), "sdxl": str(paths.sdxl_dir), "adapter": str(paths.adapter_bin),
                      "controlnet": str(cn), "ip_adapter": str(ip)}))
""")


class Replay:
    def __init__(self, src: Path, work: Path):
        self.src, self.work = src.resolve(), work
        site = work / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITE)
        self.env = {**os.environ, "PYTHONPATH": f"{site}:{self.src}", "OMP_NUM_THREADS": "1"}
        for key in [k for k in self.env if k.startswith("REPLAY_")]:
            del self.env[key]
        self.results: list[dict] = []

    def run(self, args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
            signal_after: tuple[str | None, int, float] | None = None) -> tuple[int | None, str, float]:
        """(exit status or None on timeout, stderr, seconds) of `python -m args`."""
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, *args], cwd=cwd, env={**self.env, **(env or {})},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = ""
        if signal_after is not None:
            ready, sig, delay = signal_after
            for line in p.stderr if ready else ():
                err += line
                if ready in line:
                    break
            time.sleep(delay)
            p.send_signal(sig)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        rest = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)  # the child's own peak memory, not the largest child's
        p.returncode = os.waitstatus_to_exitcode(status)
        timed_out = not timer.is_alive()
        timer.cancel()
        self.peak_mb = usage.ru_maxrss / 1024
        return (None if timed_out else p.returncode), err + rest, time.monotonic() - t0

    def record(self, category: str, case: str, ok: bool, detail: str) -> None:
        self.results.append({"category": category, "case": case, "handled": bool(ok), "detail": detail[-300:]})
        print(f"  {'handled   ' if ok else 'MISHANDLED'} {category}: {case}: {detail[-160:]!r}", flush=True)


def one_line(code, err: str, want: int = 2, flag: str = "") -> bool:
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    return code == want and "Traceback" not in err and len(lines) == 1 and flag in lines[0]


def last(err: str) -> str:
    return (err.strip().splitlines() or [""])[-1]


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill(folder: Path) -> None:
    """Fill a tmpfs to its last bytes."""
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


GEN = ["-m", "xa_runtime.cli.generate", "--prompt", "a", "--steps", "2", "--no-progress"]
EXP = ["-m", "xa_runtime.cli.export", "--no-progress"]
BENCH = ["-m", "xa_runtime.cli.bench", "--steps", "2", "--adapter-guidance-start", "1.0", "--runs", "1",
         "--warmup", "0", "--no-flops"]


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def sidecar_matches_image(folder: Path) -> bool:
    from PIL import Image

    with Image.open(folder / "out.png") as im:
        seed = json.loads(im.text["xa_runtime"])["seed"]
    return json.loads((folder / "out.json").read_text())["parameters"]["seed"] == seed


def data_safety(r: Replay) -> None:
    cat = "data safety"
    d = r.work / "d1"
    d.mkdir()
    code, err, _ = r.run([*GEN, "--output", "out.png", "--seed", "1"], d)
    old = {p.name: p.read_bytes() for p in d.iterdir()}
    code, err, _ = r.run([*GEN, "--output", "out.png", "--seed", "2"], d, env={"REPLAY_FAIL_REPLACE": "out.json"})
    now = {p.name: p.read_bytes() for p in d.iterdir()}
    r.record(cat, "final write fails (target busy): old set whole", one_line(code, err) and now == old, last(err))

    d = r.work / "d2"
    d.mkdir()
    mixed = 0
    for round_ in range(3):
        ps = [subprocess.Popen([sys.executable, *GEN, "--output", "out.png", "--seed", str(10 + 2 * round_ + i)],
                               cwd=d, env={**r.env, "REPLAY_SLOW_REPLACE": "4" if i == 0 else "0"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
        for p in ps:
            p.wait(timeout=300)
        mixed += not sidecar_matches_image(d)
    r.record(cat, "two xa-generate runs to one --output (3 races)", mixed == 0, f"{mixed} of 3 mixed")

    d = r.work / "d3"
    d.mkdir()
    r.run([*GEN, "--output", "out.png", "--seed", "1"], d)
    code, err, _ = r.run([*GEN, "--output", "out.png", "--seed", "2"], d, env={"REPLAY_SIGTERM_REPLACE": "1"})
    whole = (d / "out.png").exists() and (d / "out.json").exists() and sidecar_matches_image(d)
    r.record(cat, "SIGTERM while the PNG is written: no .tmp left, a whole set", not hidden(d) and whole,
             f"exit {code}, hidden {hidden(d)}")

    disk = r.work / "full_export"
    if mount_tmpfs(disk, "600k"):
        try:
            code, err, _ = r.run([*EXP, "--output", str(disk / "onnx"), "--graphs", "mapping"], r.work)
            r.record(cat, "xa-export on a full disk: exit 2, no partial folder",
                     one_line(code, err) and not (disk / "onnx").exists(), last(err))
        finally:
            subprocess.run(["umount", str(disk)])
    disk = r.work / "full_bench"
    if mount_tmpfs(disk, "64k"):
        try:
            fill(disk)
            code, err, _ = r.run([*BENCH, "--output", str(disk / "b.json")], r.work)
            r.record(cat, "xa-bench on a full disk: exit 2, nothing written",
                     one_line(code, err) and not (disk / "b.json").exists(), last(err))
        finally:
            subprocess.run(["umount", str(disk)])


def signals(r: Replay) -> None:
    cat = "signals"
    cases = [("xa-generate", [*GEN[:-3], "--steps", "400", "--no-progress", "--output", "out.png"], "tiny random model"),
             ("xa-export", [*EXP, "--output", "onnx"], None),
             ("xa-bench", [*BENCH[:3], "400", *BENCH[4:], "--output", "b.json"], "xa-bench latency")]
    for tool, args, ready in cases:
        for sig, want in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            d = r.work / f"s-{tool}-{sig.name}"
            d.mkdir()
            code, err, _ = r.run(args, d, signal_after=(ready, sig, 1.0 if ready else 12.0))
            ok = (code == want and "Traceback" not in err and len(err.strip().splitlines()) <= 3
                  and not list(d.iterdir()))
            r.record(cat, f"{sig.name} to {tool} mid-run: exit {want}, one line, no files", ok,
                     f"exit {code}, {len(err.strip().splitlines())} lines, left {[p.name for p in d.iterdir()]}")


def model_values(r: Replay, fx: dict) -> None:
    cat = "model and config values"
    w = r.work
    models = ["--sd15", fx["sd15"], "--sdxl", fx["sdxl"], "--adapter", fx["adapter"]]
    for case, args, flag in (
        ("adapter with NaN weights", ["--sd15", fx["sd15"], "--sdxl", fx["sdxl"], "--adapter",
                                      str(w / "adapter_nan.safetensors")], "adapter_nan"),
        ("ControlNet with inf weights", [*models, "--controlnet", str(w / "cn_inf"), "--control-image",
                                         str(w / "ctrl.png")], "cn_inf"),
        ("SDXL VAE with NaN weights", [*models, "--sdxl-vae", str(w / "vae_nan")], "error:"),
    ):
        d = w / ("m-" + case.split()[0])
        d.mkdir()
        code, err, _ = r.run([*GEN, "--output", "out.png", *args], d)
        r.record(cat, case + ": refused naming the file, no PNG",
                 code not in (0, None) and "Traceback" not in err and flag in err and not (d / "out.png").exists(),
                 last(err))

    unet = json.loads((Path(fx["sd15"]) / "unet" / "config.json").read_text())
    for key, raw in (("layers_per_block", "1000000"), ("sample_size", "1e400"),
                     ("block_out_channels", "[32, 1000000000]"), ("norm_num_groups", "-5")):
        folder = w / f"sd15-{key}"
        if not folder.exists():
            subprocess.run(["cp", "-r", fx["sd15"], str(folder)], check=True)
        text = json.dumps({**unet, key: "__V__"}).replace('"__V__"', raw)
        (folder / "unet" / "config.json").write_text(text)
        code, err, secs = r.run([*GEN, "--output", "out.png", "--sd15", str(folder), "--sdxl", fx["sdxl"],
                                 "--adapter", fx["adapter"]], w, timeout=300)
        # before any allocation: the process stays at the size of torch and the tiny models (~1 GB)
        r.record(cat, f"UNet config {key} = {raw}: refused before allocating, naming file and key",
                 one_line(code, err, 2, "--sd15") and key in err and "--height" not in err and r.peak_mb < 2000,
                 f"{secs:.0f}s {r.peak_mb:.0f} MB " + last(err))

    deep = "[" * 100_000 + "]" * 100_000
    folder = w / "cn-deep"
    subprocess.run(["cp", "-r", fx["controlnet"], str(folder)], check=True)
    (folder / "config.json").write_text('{"_class_name": "ControlNetModel", "x": ' + deep + "}")
    code, err, _ = r.run([*GEN, "--output", "out.png", "--controlnet", str(folder), "--control-image",
                          str(w / "ctrl.png")], w)
    r.record(cat, "ControlNet config.json nested 100,000 deep", one_line(code, err, 2, "--controlnet"), last(err))
    header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + deep + "}}").encode()
    (w / "deep.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    code, err, _ = r.run([*GEN, "--output", "out.png", "--sd15", fx["sd15"], "--sdxl", fx["sdxl"], "--adapter",
                          str(w / "deep.safetensors")], w)
    r.record(cat, "safetensors header nested 100,000 deep", one_line(code, err, 2, "--adapter"), last(err))


IMAGE_CHECKS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    w = sys.argv[1]
    out = {}
    from xa_runtime.plugins.control_images import control_image_tensor, open_image
    t = control_image_tensor(w + "/ramp16.png", "none", 64, 256, 1)
    out["16-bit PNG control image keeps its ramp (saturated fraction < 1%)"] = float((t >= 1).float().mean()) < 0.01
    out["EXIF orientation applied to a control image"] = open_image(w + "/exif.jpg").size == (4, 6)
    from xa_runtime.cli.plugin_args import load_init_image
    out["EXIF orientation applied to an init image"] = load_init_image(w + "/exif.jpg").size == (4, 6)
    import base64
    from xa_runtime.errors import ParameterError
    from xa_runtime.serve.app import decode_image
    try:
        decode_image("images.ip", base64.b64encode(open(w + "/wide.png", "rb").read()).decode(), 4096 * 4096)
        out["xa-serve refuses an image of 16,777,216 x 1 (4xx)"] = False
    except ParameterError:
        out["xa-serve refuses an image of 16,777,216 x 1 (4xx)"] = True
    ramp = decode_image("images.c", base64.b64encode(open(w + "/ramp16.png", "rb").read()).decode(), 4096 * 4096)
    out["xa-serve reads a 16-bit PNG without saturating"] = float((np.asarray(ramp) == 255).mean()) < 0.01
    print(json.dumps(out))
""")


def images(r: Replay, fx: dict) -> None:
    import numpy as np
    from PIL import Image

    cat = "images"
    w = r.work
    Image.fromarray((np.arange(64 * 256).reshape(64, 256) * 4).astype(np.uint16)).save(w / "ramp16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (6, 4), "red").save(w / "exif.jpg", exif=exif.tobytes())
    Image.new("L", (16_777_216, 1)).save(w / "wide.png")
    done = subprocess.run([sys.executable, "-c", IMAGE_CHECKS, str(w)], env=r.env, capture_output=True, text=True,
                          timeout=300, cwd=w)  # not this checkout's folder: `-c` puts the cwd first on sys.path
    try:
        checks = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        checks = {"image checks ran": False}
    for case, ok in checks.items():
        r.record(cat, case, ok, done.stderr.strip()[-200:])
    code, err, _ = r.run([*GEN, "--output", "out.png", "--sd15", fx["sd15"], "--sdxl", fx["sdxl"],
                          "--adapter", fx["adapter"], "--ip-adapter", fx["ip_adapter"], "--ip-image",
                          str(w / "wide.png")], w)
    r.record(cat, "xa-generate --ip-image of 16,777,216 x 1: refused naming the flag",
             one_line(code, err, 2, "--ip-image"), last(err))


def limits(r: Replay) -> None:
    cat = "limits"
    w = r.work / "limits"
    w.mkdir()
    code, err, secs = r.run([*GEN, "--output", "out.png", "--batch", "64", "--height", "4096", "--width", "4096",
                             "--height-sd15", "2048", "--width-sd15", "2048"], w, timeout=120)
    r.record(cat, "max sizes with --batch 64: refused before running", one_line(code, err, 2, "--batch"),
             f"{secs:.0f}s " + last(err))
    for tool, base, flag, value in (("xa-generate", [*GEN, "--output", "out.png"], "--threads", 10**9),
                                    ("xa-bench", BENCH, "--threads", 10**9),
                                    ("xa-generate", [*GEN, "--output", "out.png"], "--tiny-seed", 2**64),
                                    ("xa-export", [*EXP, "--output", "onnx"], "--tiny-seed", 2**64),
                                    ("xa-bench", BENCH, "--tiny-seed", 2**64)):
        code, err, _ = r.run([*base, flag, str(value)], w, timeout=120)
        r.record(cat, f"{tool} {flag} {value}: refused with its range", one_line(code, err, 2, flag), last(err))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=".", help="checkout whose xa_runtime runs the cases (default: this one)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--categories", default="data,signals,models,images,limits")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xa-replay-") as tmp:
        r = Replay(Path(args.src), Path(tmp))
        wanted = args.categories.split(",")
        fx = {}
        if {"models", "images"} & set(wanted):
            from PIL import Image

            Image.new("RGB", (64, 64), "white").save(r.work / "ctrl.png")
            done = subprocess.run([sys.executable, "-c", FIXTURES, str(r.work)], env=r.env, capture_output=True,
                                  text=True, check=True, timeout=600, cwd=r.work)
            fx = json.loads(done.stdout.strip().splitlines()[-1])
        started = time.monotonic()
        for name, fn in (("data", data_safety), ("signals", signals), ("models", model_values), ("images", images),
                         ("limits", limits)):
            if name in wanted:
                print(f"{name}:", flush=True)
                fn(r, fx) if name in ("models", "images") else fn(r)
        by_cat: dict[str, list[int]] = {}
        for res in r.results:
            by_cat.setdefault(res["category"], [0, 0])[0 if res["handled"] else 1] += 1
        print(f"\n{'category':<26} {'handled':>8} {'mishandled':>11}   (src {r.src}, {time.monotonic() - started:.0f}s)")
        for cat, (ok, bad) in by_cat.items():
            print(f"{cat:<26} {ok:>8} {bad:>11}")
        total_ok = sum(v[0] for v in by_cat.values())
        print(f"{'total':<26} {total_ok:>8} {len(r.results) - total_ok:>11}")
        if args.json:
            Path(args.json).write_text(json.dumps({"src": str(r.src), "results": r.results,
                                                   "by_category": by_cat}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
