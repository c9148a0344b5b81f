#!/usr/bin/env bash
# GPU validation in one device call (see README "What ran where"): the GPU-marked tests,
# the kernel benchmark, the stage-2 profile and xa-bench at full size with random weights.
# Steps (STEPS="..."): tests kernels profile latency (default), runtime-tests runtime
# components (the lean runtime: run these first in a new GPU session), throughput, train (one
# full-size xa-train step, random weights, bf16: naive vs ours, step time and peak memory).
# A session has ~15 min of device time, machine start included, and one call may run 10 min
# (the step timeouts keep each call below under 600 s; a step cut short still leaves its log):
#   call 1: STEPS="runtime-tests runtime components" PACK=1   (the lean runtime, never run on a GPU)
#   call 2: STEPS="tests kernels profile" PACK=1              (conv epilogues, the GroupNorm kernel,
#           the mixed layout and the layout-keeping swaps, never run; the rest re-measured)
#   call 3: STEPS="train" PACK=1                              (xa-train's step at full size, never run)
# The GPU image has torch, triton, onnx and onnxruntime but not diffusers: carry the wheels of
# diffusers, importlib_metadata and lazy_loader (a runtime dependency) in .whl/.
# Run from the repository root on a CUDA machine; results go to $OUT (default ./out/gpu).
set -uo pipefail
OUT="${OUT:-out/gpu}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
steps="${STEPS:-tests kernels profile latency}"
for s in $steps; do
  echo "=== $s"; start=$(date +%s)
  case $s in
    tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    kernels) timeout 180 python3 benchmarks/bench_kernels.py --output "$OUT/kernels.json" 2>&1 | tail -40 ;;
    profile) timeout 200 python3 benchmarks/profile_stage2.py --output "$OUT/profile.json" > "$OUT/profile.log" 2>&1; tail -48 "$OUT/profile.log" ;;
    runtime-tests) timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runtime_lean.py \
               "tests/test_kernels.py::test_autotuned_kernel_matches_reference_on_gpu" 2>&1 | tee "$OUT/pytest_runtime_gpu.log" | tail -30 ;;
    runtime) timeout "${RUNTIME_TIMEOUT:-240}" python3 benchmarks/bench_runtime.py ${RUNTIME_ARGS:---skip-compile --runs 2} \
               --output "$OUT/runtime.json" 2>&1 | tail -25 ;;
    components) timeout 150 python3 -m xa_runtime.cli.bench --random-weights --device cuda --dtype fp16 \
               --mode latency,components --compare eager,lean --baseline sdxl-alone,mapping --warmup 1 --runs 2 \
               --output "$OUT/xabench.json" --plots "$OUT" 2>&1 | grep -v "round" | tail -30 ;;
    throughput) timeout 240 python3 -m xa_runtime.cli.bench --random-weights --device cuda --dtype fp16 \
               --mode throughput --batches 1,2,4 --concurrency 1,2 --compare eager --steps 10 --warmup 1 --runs 2 \
               --output "$OUT/throughput.json" --plots "$OUT" 2>&1 | grep -v "round" | tail -20 ;;
    train) timeout 300 python3 benchmarks/bench_train.py --models random --device cuda --dtype bf16 --batch-size 1 \
               --warmup 1 --runs 3 --rounds 1 --output "$OUT/train.json" 2>&1 | tail -12 ;;
    latency) timeout 220 python3 -m xa_runtime.cli.bench --models random --device cuda --dtype fp16 \
               --compare eager,kernels --warmup 1 --runs 3 --output "$OUT/latency.json" 2>&1 | grep -v "round" | tail -12 ;;
  esac
  echo "=== $s took $(( $(date +%s) - start )) s"
done
# The device tool brings back at most 8 files: pack everything into one archive.
if [ -n "${PACK:-}" ]; then (cd "$OUT" && tar czf /tmp/results.tgz . && rm -rf ./* && mv /tmp/results.tgz .); fi
