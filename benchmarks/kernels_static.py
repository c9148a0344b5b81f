"""Every Triton kernel compiled for a GPU architecture on this machine (no GPU needed), at
the full-size shapes, with each cubin's registers, spills and shared memory, and the
occupancy and waves that follow on a given GPU. Static figures: nothing runs.

Every launch the pipeline makes (each layout and variant, every autotune config of the
remap-inject kernel) goes through Triton's NVIDIA backend and the ptxas in the triton
wheel, exactly as the JIT would compile it on that GPU (kernels_aot.py, beside this script).
Exit status 1 if any compile fails, or a kernel that is not autotuned spills registers.

    python benchmarks/kernels_static.py --arch 90 --gpus h100,h200 \\
        --output benchmarks/results/kernels-static-sm90-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton

import kernels_aot as aot  # beside this script (a script's folder is first on sys.path)
from xa_runtime.bench.report import write_atomic


def config_name(cfg: dict) -> str:
    if not cfg:
        return "-"
    tiles = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cfg)
    pre = " prefetch" if cfg.get("PREFETCH_H") else ""
    return f"{tiles} w{cfg.get('num_warps')} s{cfg.get('num_stages')}{pre}"


def _access(ops: dict) -> str:
    """{"ld.global.v4.b32": 2, "ld.global.b16": 8, ...} -> "ld 2 v4.b32 + 8 b16; st ..."."""
    out = []
    for kind in ("ld", "st"):
        parts = [f"{n} {op.split('.global.', 1)[1] if '.global.' in op else '?'}" for op, n in ops.items()
                 if op.startswith(kind + ".")]
        if parts:
            out.append(f"{kind} {' + '.join(parts)}")
    return "; ".join(out)


def _occ(o: dict) -> str:
    return f"{o['waves']:.2f}, {o['balance']:.2f}, {o['occupancy']:.2f}"


def markdown(results: list[aot.Compiled], gpus: list[str], arch: int, dtypes: list[str]) -> str:
    g0 = gpus[0]
    spec = aot.GPUS[g0]
    lines = [f"# Kernels compiled for sm_{arch} ({', '.join(dtypes)}), static resources", "",
             f"{datetime.date.today().isoformat()}, triton {triton.__version__}, on a CPU: "
             f"`python {' '.join(['benchmarks/kernels_static.py', *sys.argv[1:]])}`", "",
             f"On {spec.name} ({spec.sms} SMs). `balance`: the mean SM's share of the busiest SM's CTAs (tile "
             "quantisation: 1.00 = every SM gets as many); `occ`: warps resident per SM over the maximum. "
             "Static: nothing was run (benchmarks/kernels_aot.py).", ""]
    tuned = [r for r in results if r.kernel == "remap_inject_kernel" and not r.error]
    if tuned:
        sites = list(dict.fromkeys(r.site for r in tuned))
        lines += ["## remap-inject autotune configs (fp16/first dtype, NCHW, add)", "",
                  "| config | tensor cores | regs | smem KiB | CTAs/SM (limit) | "
                  + " | ".join(f"{s}: waves, balance, occ" for s in sites) + " |",
                  "|---|---|---|---|---|" + "---|" * len(sites)]
        by_cfg: dict[str, dict[str, aot.Compiled]] = defaultdict(dict)
        for r in tuned:
            if r.dtype == dtypes[0] and r.variant == "nchw":
                by_cfg[config_name(r.config)][r.site] = r
        for name, per_site in by_cfg.items():
            any_r = next(iter(per_site.values()))
            occ = any_r.occupancy[g0]
            cells = [_occ(per_site[s].occupancy[g0])
                     if s in per_site else "" for s in sites]
            lines.append(f"| {name} | {any_r.tensor_cores or 'none'} | {any_r.regs} | {any_r.shared_bytes / 1024:.0f} | {occ['ctas_per_sm']} ({occ['limit']}) | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## the other kernels", "", "global loads and stores: PTX instructions per thread by width (`v4.b32`: "
              "16 bytes; a scalar `b16` in a stream means Triton could not prove it contiguous)", "",
              "| kernel | site | variant | dtype | regs | spill B | smem KiB | global loads / stores | CTAs | "
              "CTAs/SM (limit) | waves, balance, occ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.kernel == "remap_inject_kernel" or r.error:
            continue
        occ = r.occupancy[g0]
        lines.append(f"| {r.kernel} | {r.site} | {r.variant or '-'} | {r.dtype} | {r.regs} | {r.local_bytes} | "
                     f"{r.shared_bytes / 1024:.1f} | {_access(r.global_ops)} | {r.ctas} | {occ['ctas_per_sm']} ({occ['limit']}) | "
                     f"{_occ(occ)} |")
    failed = [r for r in results if r.error]
    if failed:
        lines += ["", "## failed to compile", ""] + [f"- {r.kernel} {r.site} {r.variant} {r.dtype} "
                                                     f"{config_name(r.config)}: {r.error}" for r in failed]
    spilled = [r for r in results if not r.error and r.local_bytes]
    if spilled:
        lines += ["", "## spills (local memory per thread)", ""] + [
            f"- {r.kernel} {r.site} {r.variant} {r.dtype} {config_name(r.config)}: {r.regs} registers, "
            f"{r.local_bytes} B local" for r in spilled]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 to compile for (default 90: H100, H200)")
    ap.add_argument("--gpus", default=None,
                    help=f"comma-separated GPUs of that architecture for the occupancy figures ({', '.join(aot.GPUS)}); "
                         "default: all of them")
    ap.add_argument("--dtypes", default="fp16", help="comma-separated, from fp16, bf16, fp32 (default fp16)")
    ap.add_argument("--configs", choices=["all", "first"], default="all",
                    help="autotuned kernels: compile every autotune config (default) or only the first")
    ap.add_argument("--output", default=None, help="JSON file to write (a .md table is written beside it)")
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in aot.DTYPES:
            ap.error(f"--dtypes: each one of {', '.join(aot.DTYPES)}, got {d!r}")
    gpus = [g for g, s in aot.GPUS.items() if s.arch == args.arch] if args.gpus is None else args.gpus.split(",")
    for g in gpus:
        if g not in aot.GPUS or aot.GPUS[g].arch != args.arch:
            ap.error(f"--gpus: GPUs of sm_{args.arch}, from "
                     f"{', '.join(k for k, s in aot.GPUS.items() if s.arch == args.arch) or '(none known)'}; got {g!r}")
    if not gpus:
        ap.error(f"--arch {args.arch}: no GPU of that architecture is known ({', '.join(f'{k} sm_{s.arch}' for k, s in aot.GPUS.items())})")
    if args.output and not Path(args.output).parent.is_dir():
        ap.error(f"--output: {args.output!r} is not in an existing folder")
    if not aot.compilable():
        print("error: this process has TRITON_INTERPRET=1 set; run without it (compiling needs triton's real "
              "JIT functions)", file=sys.stderr)
        return 2
    launches = [launch for d in dtypes for launch in aot.full_size_launches(d)]
    jobs = sum(len(aot.configs(launch)) for launch in launches) if args.configs == "all" else len(launches)
    print(f"{len(launches)} launches, {jobs} compilations for sm_{args.arch} (identical specialisations compiled once)",
          file=sys.stderr)

    def progress(i: int, n: int) -> None:
        if i % 25 == 0 or i == n:
            print(f"  {i}/{n}", file=sys.stderr)

    results = aot.compile_all(launches, args.arch, tuple(gpus), progress=progress, first_config=args.configs == "first")
    table = markdown(results, gpus, args.arch, dtypes)
    print(table)
    failed = [r for r in results if r.error]
    spilled = [r for r in results if not r.error and r.local_bytes]
    # An autotune candidate that spills is a finding (the autotuner times it and passes it
    # over); a kernel that always runs as compiled must not spill.
    spilled_fixed = [r for r in spilled if not r.config]
    print(f"{len(results)} compilations: {len(failed)} failed, {len(spilled)} with spills "
          f"({len(spilled_fixed)} outside autotuning); {sum(r.compile_s for r in results):.0f} s compiling",
          file=sys.stderr)
    if args.output:
        result = {
            "benchmark": "kernels-static", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "device": f"none (compiled for sm_{args.arch} on {platform.machine()} CPU)", "arch": args.arch,
            "gpus": {g: aot.GPUS[g].__dict__ for g in gpus}, "triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv), "dtypes": dtypes,
        }
        out = Path(args.output)
        rows = ",\n".join("    " + json.dumps(r.to_json(), default=str) for r in results)  # a row per line
        write_atomic(out, json.dumps(result, indent=2, default=str)[:-2] + ',\n  "rows": [\n' + rows + "\n  ]\n}\n")
        write_atomic(out.with_suffix(".md"), table)
    return 1 if failed or spilled_fixed else 0


if __name__ == "__main__":
    raise SystemExit(main())
