"""Per-step cost of the SD1.5 plugins on the SD1.5 branch, and the time to switch LoRAs.

One SD1.5 UNet call (CFG batch: 2 rows) with: nothing; a LoRA fused; the same LoRA unfused;
a ControlNet (its call + the residuals); an IP-Adapter (plain; the per-step part: image
tokens through the extra cross-attention). Real SD1.5 architectures with random weights by
default (speed does not depend on the values); `--preset tiny-sd15` for a quick run. Also:
load a LoRA file, fuse it (add), change its scale, unfuse it (remove). Prints a table and
writes JSON.

    python benchmarks/bench_plugins.py --size 512 --device cuda --dtype fp16 --output benchmarks/results/plugins-<gpu>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from xa_runtime.models import build_random_components
from xa_runtime.plugins import ControlNetPlugin, IPAdapter, LoraManager, load_lora
from xa_runtime.plugins.base import PluginContext, StepInfo, merge_unet_kwargs
from xa_runtime.plugins.controlnet import build_tiny_controlnet
from xa_runtime.plugins.ip_adapter_loading import tiny_ip_adapter_state
from xa_runtime.testing import write_random_lora
from xa_runtime.runtime.timing import synchronize, time_callable

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd15", choices=["sd15", "tiny-sd15"])
    ap.add_argument("--size", type=int, default=512, help="SD1.5 image side in pixels")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None)
    ap.add_argument("--iters", type=int, default=5, help="rounds over all configurations")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--output")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # Random weights can leave denormal floats in some activations, which make CPU math
        # (not GPU math) much slower and would mix that effect into the comparison.
        torch.set_flush_denormal(True)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    sd15 = build_random_components(args.preset, 0, device=device, dtype=dtype)
    unet = sd15.unet
    n = args.size // 8
    x = torch.randn(2, 4, n, n, device=device, dtype=dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    ctx = PluginContext(batch=1, cfg=True, device=device, dtype=dtype, height=args.size, width=args.size,
                        prompt_embeds=text, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, args.size, args.size)

    def step(plugins=()):
        extra = merge_unet_kwargs([p.unet_kwargs(ctx, StepInfo("stage2", 0, 1, t), x) for p in plugins])
        with torch.no_grad():
            unet(x, t, text, **extra)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_lora(Path(tmp) / "lora.safetensors", unet, sd15.text_encoder, rank=args.rank)
        t0 = time.perf_counter()
        lora = load_lora(path)
        switch = {"load_s": time.perf_counter() - t0}
    managers = {mode: LoraManager.for_branch(sd15, mode) for mode in ("fused", "unfused")}
    with torch.no_grad():
        controlnet = build_tiny_controlnet(unet).to(device=device, dtype=dtype)
    cn = ControlNetPlugin(controlnet, image)
    cn.prepare(ctx)
    adapter_state = tiny_ip_adapter_state(unet, "plain", image_embed_dim=1024)
    # Per step the IP-Adapter plugin only passes image embeddings (the CLIP encoder runs once per generation).
    embeds = torch.randn(2, 1, 1024, device=device, dtype=dtype)
    holder: dict[str, IPAdapter] = {}

    def timed_add(mode: str) -> None:
        synchronize(device)
        t0 = time.perf_counter()
        managers[mode].add("l", lora, 1.0)
        synchronize(device)
        switch.setdefault(f"{mode}_add_s", []).append(time.perf_counter() - t0)

    def timed_remove(mode: str) -> None:
        t0 = time.perf_counter()
        managers[mode].set_scale("l", 0.5)
        synchronize(device)
        switch.setdefault(f"{mode}_set_scale_s", []).append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        managers[mode].remove("l")
        synchronize(device)
        switch.setdefault(f"{mode}_remove_s", []).append(time.perf_counter() - t0)

    def ip_on() -> None:
        holder["ip"] = IPAdapter(unet, adapter_state)
        holder["ip"].set_scale(1.0)

    configs = {  # name: (set up, one step, tear down); set-up and tear-down are not in the step time
        "base": (None, step, None),
        "lora_fused": (lambda: timed_add("fused"), step, lambda: timed_remove("fused")),
        "lora_unfused": (lambda: timed_add("unfused"), step, lambda: timed_remove("unfused")),
        "controlnet": (None, lambda: step([cn]), None),
        "ip_adapter": (ip_on, lambda: unet(x, t, text, added_cond_kwargs={"image_embeds": [embeds]}),
                       lambda: holder.pop("ip").unload()),
    }
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.iters):  # rounds visit every configuration in turn, so drift hits all alike
        for name, (setup, fn, teardown) in configs.items():
            if setup:
                setup()
            with torch.no_grad():
                samples[name] += time_callable(fn, device, warmup=1, iters=1)
            if teardown:
                teardown()
    rows = {k: statistics.median(v) for k, v in samples.items()}
    switch = {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in switch.items()}

    print(f"SD1.5 UNet step, {args.preset} at {args.size} px, CFG batch 2, {device} {dtype}")
    for name, sec in rows.items():
        print(f"  {name:<14} {sec * 1e3:10.1f} ms   x{sec / rows['base']:.3f}")
    print("LoRA switching (rank %d): " % args.rank + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in switch.items()))
    result = {
        "benchmark": "plugins", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(sys.argv), "rounds": args.iters, "raw_step_seconds": samples, "preset": args.preset, "size": args.size, "rank": args.rank,
        "step_seconds": rows, "relative_to_base": {k: v / rows["base"] for k, v in rows.items()}, "lora_switch_seconds": switch,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
