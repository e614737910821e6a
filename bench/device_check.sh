#!/usr/bin/env bash
# bench/device_check.sh OUT_DIR [STEPS...] -- the one prepared check for a lent GPU machine (no network).
# STEPS picks from: build info gpu_tests profile ops_bench attention_tune attention_bench e2e aot (default: all
# but attention_tune and aot; aot needs no GPU: `python -m fastmae.kernels.aot` runs anywhere).
#
# Runs, from the repository root: the environment report, the fastmae._C build (FASTMAE_BUILD_CUDA=1),
# every test marked gpu (bf16/fp16 parity of the triton and cuda backends, opcheck on CUDA, torch.compile
# with the triton backends; pytest-xdist with FASTMAE_CHECK_WORKERS processes), a profiled ViT-L step
# (bench/profile_step.py), the op microbenchmarks with GB/s against the measured copy bandwidth, the Triton
# attention's tiling sweep (bench/tune_attention.py; not run by default; 78 s on an H200, 40 of them compiling
# in FASTMAE_TUNE_WORKERS (default 14) processes; --max-seconds 200 stops it starting further shapes), the
# attention benchmark (TFLOP/s per backend at MAE's shapes), the end-to-end `fastmae bench` table with its CSV
# and plots, and the AOT register report; everything is written under OUT_DIR and a short summary is printed last.
# Each step has its own time limit, and all of them share FASTMAE_CHECK_SECONDS (default 470 s, so the
# check and its summary end within 8 minutes; measured on an H200: build 50 s, gpu tests 75 s, profile
# 35 s, op and attention benchmarks 46 + 40 s, the ViT-L table 141 s). A failing step is reported and the
# next one still runs; a step with no time left is reported as skipped.
#
# Wheels the GPU machine lacks go in .whl/ (carried with the working tree) and are installed first.
# Prepare them on a machine with PyPI, for the GPU machine's Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl xformers==0.0.35
# (the lent H100/H200 image already has pytest-benchmark, pytest-xdist, timm and transformers; DALI's
# wheel is too large to carry in one call).
set -uo pipefail
out=$(realpath -m "${1:?usage: bench/device_check.sh OUT_DIR [STEPS...]}")
shift
steps=${*:-build info gpu_tests profile ops_bench attention_bench e2e}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
summary=()

budget=${FASTMAE_CHECK_SECONDS:-470}  # the whole check, so it ends within 8 minutes with the summary

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  if ((left < 15)); then
    summary+=("$(printf '%-12s skipped: the %ss budget is spent' "$name" "$budget")")
    return 1
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-12s exit %-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$out/$name.log")")")
  return $rc
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || echo "no git revision"
} > "$out/env.txt" 2>&1

wants() { [[ " $steps " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 120 python -m pip install --no-deps --no-index .whl/*.whl
fi
wants build && step build 120 env FASTMAE_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
  python -m pip install --no-deps --no-build-isolation --use-pep517 -e .
wants info && step info 60 python -m fastmae.cli info
wants gpu_tests && step gpu_tests 170 python -m pytest -q -m gpu tests \
  -n "${FASTMAE_CHECK_WORKERS:-8}" --junitxml "$out/gpu_tests.xml" -p no:cacheprovider
wants profile && step profile 90 python bench/profile_step.py --model mae_vit_large_patch16 --batch-size 256 \
  --out "$out"
if wants ops_bench; then
  step ops_bench 100 python -m pytest -q bench/test_bench_ops.py --benchmark-only \
    --benchmark-json "$out/ops_bench.json" -p no:cacheprovider
  if [ -f "$out/ops_bench.json" ]; then
    step ops_table 30 python bench/summarize_ops.py "$out/ops_bench.json" --csv "$out/ops_bench.csv"
  fi
fi
wants attention_tune && step attention_tune 240 python bench/tune_attention.py --max-seconds 200 \
  --warm-workers "${FASTMAE_TUNE_WORKERS:-14}" \
  --csv "$out/attention_tuning.csv"
wants attention_bench && step attention_bench 120 python -m pytest -q bench/test_bench_attention.py --benchmark-only \
  --benchmark-json "$out/attention_bench.json" -p no:cacheprovider
if wants e2e; then  # the end-to-end table: cheap rows first; rows land in bench/results/<gpu>.csv as they finish
  # (--results-dir explicitly: fastmae bench's default is ./bench-results, the committed results are here)
  step e2e_large 180 fastmae bench --models mae_vit_large_patch16 --steps 10 --warmup 3 --max-seconds 100 \
    --impls fastmae-cudagraph,fastmae,official,hf,modern,modern-cudagraph,hf-compile,fastmae-compile \
    --results-dir bench/results
  step e2e_base_huge 90 fastmae bench --models mae_vit_base_patch16,mae_vit_huge_patch14 --steps 10 --warmup 3 \
    --max-seconds 40 --impls fastmae-cudagraph,fastmae --results-dir bench/results
  step plots 60 python bench/plot_results.py bench/results/*.csv
  cp bench/results/*.csv bench/results/*.png "$out/" 2>/dev/null
fi
wants aot && step aot 240 env -u TRITON_INTERPRET python -m fastmae.kernels.aot --json "$out/aot.json"

echo
cat "$out/env.txt"
[ -f "$out/ops_table.log" ] && cat "$out/ops_table.log"
printf '%s\n' "${summary[@]}"
