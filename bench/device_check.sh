#!/usr/bin/env bash
# bench/device_check.sh OUT_DIR [STEPS...] -- the prepared checks for a lent GPU machine (no network).
#
# STEPS picks single steps from: build info gpu_tests profile ops_bench attention_tune attention_bench ncu_attention
# e2e aot (default: all but attention_tune, ncu_attention and aot; aot needs no GPU: `python -m fastmae.kernels.aot`
# runs anywhere; ncu_attention: bench/ncu_attention.py, what bounds each attention kernel, ~90 s, where ncu can read
# the counters: on a Firecracker machine, not on gVisor, where it stops with ncu's one-line reason), or
# one of the step sets, each ending within its own budget (FASTMAE_CHECK_SECONDS overrides it):
#   perf   (issue 14, 470 s): the end-to-end table, ViT-B/L/H x {fastmae's best variants, official, hf, modern,
#          modern-cudagraph} at batch 256 (+512 for L and H), kernels per step in each row, the attention
#          microbenchmark, plots, the README table (written to OUT_DIR, never to README.md itself);
#   perf_compile (590 s): the compiled rows perf leaves out (below);
#   finetune (issue 17, 470 s): `fastmae bench --task finetune`, fine-tuning steps of ViT-B/16 and ViT-L/16 at 224 px,
#          batch 128, fastmae's ViT against timm's ViT (SDPA), eager and compiled: the eager rows (~60 s), then the
#          compiled rows of ViT-L (~2 x 80 s of compilation) and ViT-B (~2 x 50 s), the report;
#   large  (issue 16, 290 s): a 5,000-JPEG ImageNet-like set, DALI vs torch loader img/s, DALI's position restore
#          on the GPU, loader-fed pretraining of ViT-L and ViT-H against the bench rows of the same step,
#          torchrun DDP and FSDP (NCCL, one process) against one process, SIGTERM -> exit 75 -> resume, NaN ->
#          skipped on the device -> exit 3, ViT-H peak memory with and without activation checkpointing.
# FASTMAE_CHECK_PLAN=1 prints a set's plan (steps, budgets, commands) and runs nothing.
# FASTMAE_CHECK_ONLY="NAME ..." runs only those steps of a set (to rerun what failed; the install step always runs).
# FASTMAE_CHECK_SMOKE=1 runs a set's same commands on this machine's CPU with the tiny preset, a few steps, small
# images and batches, gloo instead of NCCL, results under OUT_DIR/results: it proves the commands and checkers
# (tests/test_device_scripts.py runs parts of it); what cannot run on a CPU is skipped by the command itself,
# with its reason (CUDA graphs, GPU-marked tests, peak memory). Its time limits are 5x the GPU run's, the torch
# loader replaces DALI's.
#
# Everything is written under OUT_DIR (a log per step, NAME.log) and a short summary is printed last; results
# rows land in bench/results/<gpu>*.csv as they are measured and are copied into OUT_DIR. A `run` call returns
# at most 8 files, so pack OUT_DIR: `bench/device_check.sh /tmp/chk perf; tar czf $OUT/perf.tgz -C /tmp chk`.
# Each step has its own time limit (capped by what is left of the set's budget), so a slow step cannot eat
# the rest; a failing step is reported and the next one still runs; a step with no time left is skipped.
#
# The time plan. Measured on an H200 (default set): build 50 s, gpu tests 75 s, profile 35 s, op and attention
# benchmarks 46 + 40 s, the ViT-L table 141 s for 5 rows: an uncompiled row takes 1-11 s of setup (hf 11 s: its
# model is built on the CPU) plus 14 steps (ViT-L at batch 256: fastmae 106 ms a step, official 180 ms, hf 121
# ms), a compiled row ~83 s of compilation (modern, ViT-L). ViT-H doubles a step, batch 512 doubles it again.
# So the perf set (470 s), in order of importance, each step capped: (1) the uncompiled rows of ViT-L, ViT-H and
# ViT-B at 256 (~115 s with the process start and the matmul-rate measurement), (2) ViT-L's compiled rows at 256,
# modern-cudagraph (the strongest baseline) and fastmae-compile-cudagraph (~175 s), (3) the attention
# microbenchmark (~40 s), (4) the uncompiled rows of ViT-L and ViT-H at 512 (~110 s), (5) plots and the README
# table. The compiled rows it cannot reach (ViT-H and ViT-B at 256, everything at 512: ~80-110 s each, ~17 min)
# are the step set perf_compile (590 s: compile_H256 and compile_B256; then, in another call,
# FASTMAE_CHECK_ONLY=compile_512), for later sessions.
# The large set (290 s): JPEGs ~10 s, loader benchmark ~25 s, restore tests ~20 s, DDP/FSDP ~60 s, resume ~30 s,
# NaN ~12 s, bench rows ~35 s + 12 s, ViT-L 200 steps ~35 s, ViT-H 100 steps ~40 s. Checkpoints go to /dev/shm.
#
# Wheels the GPU machine lacks go in .whl/ (carried with the working tree) and are installed first.
# Prepare them on a machine with PyPI, for the GPU machine's Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl xformers==0.0.35
# (the lent H100/H200 image already has pytest-benchmark, pytest-xdist, timm and transformers; DALI's wheels
# are too large to carry in one call: bench/carry_wheels.sh brings them over back-to-back calls).
#
# What the large set cannot check on one GPU, and a 2-GPU run must show (torchrun --nproc_per_node=2 with the
# same commands): DDP and FSDP losses of two ranks at --batch-size 32 equal to one process at --batch-size 64
# within bf16 tolerance (tests/test_distributed.py shows it with gloo on a CPU), every rank's loader shard
# disjoint, FSDP's sharded checkpoint resumed on 2 ranks with the same
# next losses, SIGTERM to torchrun stopping both ranks at the same step with exit 75, a NaN on rank 1 alone
# skipping the step on both ranks and stopping both with exit 3, and FSDP's per-GPU peak memory about half of
# one process's parameter and optimizer memory.
set -uo pipefail
out=$(realpath -m "${1:?usage: bench/device_check.sh OUT_DIR [STEPS...]}")
shift
steps=${*:-build info gpu_tests profile ops_bench attention_bench e2e}
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
summary=()
planned=0
plan_only=${FASTMAE_CHECK_PLAN:-0}
only=${FASTMAE_CHECK_ONLY:-}
smoke=${FASTMAE_CHECK_SMOKE:-0}
mkdir -p "$out"

case " $steps " in
  *" perf "*) set_budget=470 ;;
  *" perf_compile "*) set_budget=590 ;;  # one call's 600 s
  *" finetune "*) set_budget=470 ;;
  *" large "*) set_budget=290 ;;
  *) set_budget=470 ;;  # the default steps: end within 8 minutes with the summary
esac
# a smoke run on a small shared CPU is slower than the GPU run it stands for: its limits are 5x the GPU's
scale=$([ "$smoke" = 1 ] && echo 5 || echo 1)
budget=${FASTMAE_CHECK_SECONDS:-$((set_budget * scale))}

selected() {  # selected NAME...: whether FASTMAE_CHECK_ONLY (when set) names one of these steps
  [ -z "$only" ] && return 0
  local name
  for name in "$@"; do [[ " $only " == *" $name "* || $name == *_install ]] && return 0; done
  return 1
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, record the outcome
  local name=$1 limit=$(($2 * scale))
  shift 2
  selected "$name" || return 0
  if [ "$plan_only" = 1 ]; then
    printf '%-20s %4ss  %s\n' "$name" "$limit" "$*"
    planned=$((planned + limit))
    return 0
  fi
  local left=$((budget - SECONDS))
  if ((left < 15)); then
    summary+=("$(printf '%-20s skipped: the %ss budget is spent' "$name" "$budget")")
    return 1
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  echo "[$(printf '%4s' $SECONDS) s] $name (limit ${limit} s)"
  # -k 10: a step that ignores SIGTERM (a pretraining run saving on preemption) is killed 10 s later
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-20s exit %-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$out/$name.log")")")
  return $rc
}

note() {  # note NAME REASON: a step left out here, and why
  if [ "$plan_only" = 1 ]; then
    printf '%-20s    -   skipped: %s\n' "$1" "$2"
  else
    summary+=("$(printf '%-20s skipped: %s' "$1" "$2")")
  fi
}

# ---------------------------------------------------------------------------------------------------------------
# The settings of the perf and large sets: the GPU values, or the CPU smoke values (same commands, tiny sizes).
# PYTHONSAFEPATH: the checkout's top-level kernels/ folder (installed as fastmae.kernels) must not shadow the PyPI
# package `kernels` that transformers looks for, so the fastmae commands do not put the current directory on the path
export FASTMAE="env PYTHONSAFEPATH=1 python -m fastmae.cli"
if [ "$smoke" = 1 ]; then
  export DEV=cpu M_B=mae_vit_tiny_patch16 M_L=mae_vit_tiny_patch16 M_H=mae_vit_tiny_patch16
  export MODELS_256=mae_vit_tiny_patch16 MODELS_LH=mae_vit_tiny_patch16 B1=8 B2=16 IMG=64 STEPS=2 WARMUP=1
  export JPEGS=48 LOADER_BATCH=8 LOADER_IMG=64 LOADER_BATCHES=3 LOADER_WARMUP_S=0.5 WORKERS=2
  export TRAIN_IMG=32 TRAIN_BATCH=8 STEPS_L=6 STEPS_H=6 LOG_L=2 LOG_H=2 PAR_BATCH=8 PAR_STEPS=3 SMALL_BATCH=8
  export RESUME_STEPS=12 KILL_AT=4 FT_B=vit_tiny_patch16 FT_L=vit_tiny_patch16 FT_MODELS=vit_tiny_patch16 FT_BATCH=8
  export MIN_RATIO=0 RESULTS="$out/results" SCRATCH="$out/scratch" LOADER=torch
  export HOST_SKIP="--host-skip-ok"  # a CPU trains with torch's foreach AdamW, which skips on the host
else
  export DEV=cuda M_B=mae_vit_base_patch16 M_L=mae_vit_large_patch16 M_H=mae_vit_huge_patch14
  export MODELS_256=$M_L,$M_H,$M_B MODELS_LH=$M_L,$M_H B1=256 B2=512 IMG=224 STEPS=10 WARMUP=3
  export JPEGS=5000 LOADER_BATCH=256 LOADER_IMG=224 LOADER_BATCHES=60 LOADER_WARMUP_S=3 WORKERS=15
  export TRAIN_IMG=224 TRAIN_BATCH=256 STEPS_L=200 STEPS_H=100 LOG_L=20 LOG_H=10 PAR_BATCH=32 PAR_STEPS=5
  export SMALL_BATCH=32 RESUME_STEPS=60 KILL_AT=10 MIN_RATIO=0.8 RESULTS=bench/results HOST_SKIP=""
  export FT_B=vit_base_patch16 FT_L=vit_large_patch16 FT_MODELS=vit_large_patch16,vit_base_patch16 FT_BATCH=128
  export LOADER=auto  # DALI when installed
  # checkpoints of ViT-H are ~7.6 GB: write them to memory where there is a /dev/shm, and delete them after
  if [ -w /dev/shm ]; then export SCRATCH=/dev/shm/fastmae-check; else export SCRATCH="$out/scratch"; fi
fi
export out DATA="$out/jpegs" smoke

impls_of() {  # two lines: fastmae's best variants and the baselines without torch.compile, then those with it
  python - <<'EOF'
from fastmae.benchmark.train_step import FASTMAE_IMPLS
best = ["fastmae-cudagraph", "fastmae-cudagraph-bf16params", "fastmae-compile-cudagraph"]
# the FP8 variants, where registered, those in a CUDA graph first
best += sorted((name for name in FASTMAE_IMPLS if "fp8" in name), key=lambda name: not FASTMAE_IMPLS[name].cuda_graph)
compiled = {name for name in best if FASTMAE_IMPLS[name].compile} | {"modern", "modern-cudagraph"}
print(",".join([name for name in best if name not in compiled] + ["official", "hf"]))
print(",".join(["modern-cudagraph", *[name for name in best if name in compiled], "modern"]))  # strongest first
EOF
}

results_slug() {
  if [ "$smoke" = 1 ]; then echo cpu; return; fi
  python -c "import torch; from fastmae.benchmark.results import gpu_slug
print(gpu_slug(torch.cuda.get_device_name()))"
}

ensure_installed() {  # fastmae importable with its CUDA extension (the build step: ~50 s), unless it already is
  if [ "$smoke" = 1 ]; then
    echo "smoke: the checkout is used as installed here (no CUDA extension to build on a CPU)"
    python -c "import fastmae.kernels; from fastmae.extension import extension_status; print(extension_status()[1])"
    return
  fi
  if python -c "import fastmae.kernels; from fastmae.extension import extension_status as s
raise SystemExit(not s()[0])"
  then echo "fastmae and fastmae._C are installed"; return; fi
  FASTMAE_BUILD_CUDA=1 MAX_JOBS="$(nproc)" python -m pip install --no-deps --no-build-isolation --use-pep517 -e .
}

perf_report() {  # plots, the README table (into OUT_DIR), the results files copied into OUT_DIR
  local csv="$RESULTS/$SLUG.csv"
  python bench/plot_results.py "$csv" || return
  if grep -q -- "<!-- bench-table:begin" README.md; then
    cp README.md "$out/README.md" && python bench/readme_table.py "$csv" "$out/README.md" || return
  else
    echo "README.md has no bench-table markers yet: the table goes to $out/results_table.md"
  fi
  python bench/readme_table.py "$csv" --table-out "$out/results_table.md" || return
  cp "$RESULTS/$SLUG"*.csv "$RESULTS/$SLUG"*.png "$out/" 2>/dev/null
  cat "$out/results_table.md"
}

# --- the large set's multi-command steps ------------------------------------------------------------------------
train_args() {  # train_args MODEL BATCH STEPS LOG_EVERY: the pretraining flags the large set's runs share
  # --no-compile: compiling ViT-L/H takes 80-110 s a run, more than this set has; the CUDA graph stays automatic
  # (on for one process on CUDA), and the compiled step is what the perf set times
  echo --data "$DATA" --model "$1" --batch-size "$2" --steps "$3" --log-every "$4" --img-size "$TRAIN_IMG" \
    --device "$DEV" --num-workers "$WORKERS" --loader "$LOADER" --no-progress --save-every 100000 --no-compile
}

train_impl() {  # the fastmae bench variant whose step `fastmae pretrain $(train_args ...)` runs on $DEV, one process
  python - <<'EOF'
import os

import torch

from fastmae.benchmark.registry import impl_of_step
from fastmae.train.config import PretrainConfig
from fastmae.train.cuda_graph import choose_fast_path

device = torch.device(os.environ["DEV"])
cfg = PretrainConfig(data=os.environ["DATA"], model=os.environ["M_L"], compile=False, device=os.environ["DEV"])
fast = choose_fast_path(cfg, device, 1, cfg.precision or ("bf16" if device.type == "cuda" else "fp32"), False)
print(impl_of_step(fast.compile, fast.cuda_graph, fast.param_dtype == "bf16", fast.fp8_recipe is not None))
EOF
}

keep_run() {  # keep_run NAME: the run's metrics and config into OUT_DIR/NAME/, its checkpoints deleted
  mkdir -p "$out/$1"
  cp "$SCRATCH/$1/metrics.jsonl" "$SCRATCH/$1/config.json" "$out/$1/" 2>/dev/null
  rm -rf "${SCRATCH:?}/$1"
}

large_parallel() {  # (d) one process, then torchrun with one process (NCCL on a GPU) for ddp and fsdp
  local args
  # --no-cuda-graph: the same eager step in all three runs (torchrun with one rank counts as one process for the
  # automatic CUDA graph, which would then capture DDP's and FSDP's collectives)
  args="$(train_args "$M_H" "$PAR_BATCH" "$PAR_STEPS" 1) --no-cuda-graph"
  # shellcheck disable=SC2086
  $FASTMAE pretrain $args --precision bf16 --activation-checkpointing --output "$SCRATCH/single" || return
  for mode in ddp fsdp; do
    # shellcheck disable=SC2086
    PYTHONSAFEPATH=1 python -m torch.distributed.run --standalone --nproc_per_node=1 -m fastmae.cli pretrain $args \
      --precision bf16 --activation-checkpointing --parallel "$mode" --output "$SCRATCH/$mode" || return
  done
  for run in single ddp fsdp; do keep_run "$run"; done
  # bf16: each run rounds differently (FSDP casts the parameters, DDP reduces through NCCL); 1% of the loss
  python bench/check_runs.py losses "$out/single" "$out/ddp" "$out/fsdp" --rtol 0.01
}

large_resume() {  # (e) SIGTERM from outside mid-run -> checkpoint, exit 75 -> the same command -> the same losses
  local args pid rc
  args=$(train_args "$M_B" "$SMALL_BATCH" "$RESUME_STEPS" 1)
  # shellcheck disable=SC2086
  $FASTMAE pretrain $args --precision fp32 --deterministic --output "$SCRATCH/resume_ref" || return
  # shellcheck disable=SC2086
  $FASTMAE pretrain $args --precision fp32 --deterministic --output "$SCRATCH/resume" &
  pid=$!
  until [ "$(cat "$SCRATCH/resume/metrics.jsonl" 2>/dev/null | wc -l)" -ge "$KILL_AT" ] || ! kill -0 "$pid" 2>/dev/null
  do sleep 0.05; done
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"
  rc=$?
  if [ "$rc" != 75 ]; then
    echo "the run sent SIGTERM after step $KILL_AT exited with $rc, expected 75 (preempted; 0: it ended first)"
    return 1
  fi
  echo "SIGTERM after step $KILL_AT: exit 75 with the checkpoint $(ls "$SCRATCH/resume/checkpoints" | tail -n 1); \
the same command resumes"
  # shellcheck disable=SC2086
  $FASTMAE pretrain $args --precision fp32 --deterministic --output "$SCRATCH/resume" || return
  keep_run resume_ref
  keep_run resume
  python bench/check_runs.py losses "$out/resume_ref" "$out/resume" --rtol 0 --atol 0  # bit for bit
}

large_nonfinite() {  # (f) NaN from step 3 on: steps 3-5 skipped on the device, then exit 3; checkpoint 2 is good
  local args rc
  args=$(train_args "$M_B" "$SMALL_BATCH" 10 1)
  # shellcheck disable=SC2086
  FASTMAE_FAULT=nan@3 $FASTMAE pretrain $args --save-every 2 --max-nonfinite 3 --output "$SCRATCH/nonfinite" \
    > "$out/nonfinite_run.log" 2>&1
  rc=$?
  tail -n 5 "$out/nonfinite_run.log"
  # shellcheck disable=SC2086
  python bench/check_runs.py nonfinite "$SCRATCH/nonfinite" --log "$out/nonfinite_run.log" --exit-code "$rc" \
    --max-nonfinite 3 $HOST_SKIP
  rc=$?
  keep_run nonfinite
  return $rc
}

large_train() {  # (c) large_train MODEL STEPS LOG_EVERY NAME: loader-fed pretraining vs the bench rows of its step
  local args
  args=$(train_args "$1" "$TRAIN_BATCH" "$2" "$3")
  # shellcheck disable=SC2086
  $FASTMAE pretrain $args --output "$SCRATCH/$4" || return
  keep_run "$4"
  python bench/check_runs.py throughput "$out/$4" --csv "$RESULTS/$SLUG.csv" --model "$1" --impl "$TRAIN_IMPL" \
    --batch "$TRAIN_BATCH" --min-ratio "$MIN_RATIO"
}
export -f ensure_installed perf_report train_args train_impl keep_run
export -f large_parallel large_resume large_nonfinite large_train

# ---------------------------------------------------------------------------------------------------------------
run_perf() {
  step perf_install 120 bash -c ensure_installed
  local cheap compiled
  { read -r cheap; read -r compiled; } < <(impls_of)
  local common=(--steps "$STEPS" --warmup "$WARMUP" --img-size "$IMG" --device "$DEV" --results-dir "$RESULTS")
  # 1. every model at 256 without compilation (~115 s); a row that runs out of memory is retried at half its batch
  step perf_256 150 $FASTMAE bench --models "$MODELS_256" --batch-size "$B1" --impls "$cheap" --max-seconds 130 \
    "${common[@]}"
  # 2. ViT-L's compiled rows at 256, the strongest baseline first (~85 s each: two fit)
  step perf_compile_L 180 $FASTMAE bench --models "$M_L" --batch-size "$B1" --impls "$compiled" --max-seconds 95 \
    "${common[@]}"
  # 3. the attention microbenchmark (~40 s)
  step perf_attention 50 python -m pytest -q bench/test_bench_attention.py --benchmark-only \
    --benchmark-json "$out/attention_bench.json" -p no:cacheprovider
  step perf_attention_csv 10 python bench/summarize_ops.py "$out/attention_bench.json" \
    --csv "$RESULTS/$SLUG-attention.csv"
  # 4. ViT-L and ViT-H at 512 without compilation (~110 s), in the time left
  step perf_512 120 $FASTMAE bench --models "$MODELS_LH" --batch-size "$B2" --impls "$cheap" --max-seconds 100 \
    "${common[@]}"
  step perf_report 20 bash -c perf_report
}

run_perf_compile() {  # the compiled rows the perf set leaves out (the header): ~80-110 s a row
  local cheap compiled
  local common=(--steps "$STEPS" --warmup "$WARMUP" --img-size "$IMG" --device "$DEV" --results-dir "$RESULTS")
  step compile_install 120 bash -c ensure_installed
  { read -r cheap; read -r compiled; } < <(impls_of)
  # --max-seconds: no row starts unless its ~110 s (ViT-H) or ~60 s (ViT-B) of compilation fit the step's limit
  step compile_H256 330 $FASTMAE bench --models "$M_H" --batch-size "$B1" --impls "$compiled" --max-seconds 210 \
    "${common[@]}"
  step compile_B256 250 $FASTMAE bench --models "$M_B" --batch-size "$B1" --impls "$compiled" --max-seconds 180 \
    "${common[@]}"
  step compile_512 590 $FASTMAE bench --models "$MODELS_LH" --batch-size "$B2" --impls "$compiled" --max-seconds 450 \
    "${common[@]}"
  step compile_report 20 bash -c perf_report
}

run_finetune() {  # issue 17: fine-tuning rows, fastmae's ViT against timm's (SDPA), eager then compiled
  local common=(--task finetune --steps "$STEPS" --warmup "$WARMUP" --img-size "$IMG" --device "$DEV"
                --results-dir "$RESULTS")
  step finetune_install 120 bash -c ensure_installed
  step finetune_eager 90 $FASTMAE bench --models "$FT_MODELS" --batch-size "$FT_BATCH" --impls timm,fastmae-finetune \
    --max-seconds 70 "${common[@]}"
  # the baseline the issue names first: timm's ViT compiled; --max-seconds: no row starts unless its compilation fits
  step finetune_compile_L 200 $FASTMAE bench --models "$FT_L" --batch-size "$FT_BATCH" \
    --impls timm-compile,fastmae-finetune-compile --max-seconds 110 "${common[@]}"
  step finetune_compile_B 150 $FASTMAE bench --models "$FT_B" --batch-size "$FT_BATCH" \
    --impls timm-compile,fastmae-finetune-compile --max-seconds 80 "${common[@]}"
  step finetune_report 20 bash -c perf_report
}

run_large() {
  step large_install 120 bash -c ensure_installed
  if [ "$smoke" = 1 ]; then
    export LOADER_INPUT=loader-torch  # the CPU stand-in: DataLoader workers
  elif python -c "import nvidia.dali" 2>/dev/null; then
    export LOADER_INPUT=loader-dali
  else
    export LOADER_INPUT=loader-torch
    note large_dali "NVIDIA DALI does not import (install it first: bench/carry_wheels.sh); the torch loader runs \
in its place, bench_loader and the GPU restore test skip DALI with that reason"
  fi
  # the bench variant whose step the training runs take (uncompiled: on CUDA fastmae-cudagraph, on a CPU fastmae)
  TRAIN_IMPL='<train_impl>'
  if [ "$plan_only" != 1 ] && selected large_bench_rows large_train_L large_train_H; then TRAIN_IMPL=$(train_impl); fi
  export TRAIN_IMPL
  step large_jpegs 40 python bench/make_jpeg_set.py "$DATA" --count "$JPEGS"
  step large_loader 50 python bench/bench_loader.py --backends dali torch --data-dir "$DATA" \
    --batch-size "$LOADER_BATCH" --img-size "$LOADER_IMG" --batches "$LOADER_BATCHES" --warmup-s "$LOADER_WARMUP_S" \
    --device "$DEV" --workers "$WORKERS" --csv "$RESULTS/$SLUG-loader.csv"
  step large_dali_restore 40 python -m pytest -q -m gpu tests/test_data_loader.py -p no:cacheprovider -rs
  step large_parallel 75 bash -c large_parallel
  step large_resume 40 bash -c large_resume
  step large_nonfinite 25 bash -c large_nonfinite
  local common=(--steps "$STEPS" --warmup "$WARMUP" --img-size "$TRAIN_IMG" --device "$DEV" --results-dir "$RESULTS")
  step large_bench_rows 45 $FASTMAE bench --models "$MODELS_LH" --batch-size "$TRAIN_BATCH" --impls "$TRAIN_IMPL" \
    --input "synthetic,$LOADER_INPUT" --data "$DATA" --workers "$WORKERS" "${common[@]}"
  step large_memory_rows 30 $FASTMAE bench --models "$M_H" --batch-size "$TRAIN_BATCH" --impls fastmae-actckpt,fastmae \
    "${common[@]}"
  step large_memory 10 python bench/check_runs.py memory "$RESULTS/$SLUG.csv" --model "$M_H" --batch "$TRAIN_BATCH"
  step large_train_L 45 bash -c "large_train $M_L $STEPS_L $LOG_L train_L"
  step large_train_H 45 bash -c "large_train $M_H $STEPS_H $LOG_H train_H"
  if [ "$plan_only" != 1 ]; then
    rm -rf "${SCRATCH:?}"
    cp "$RESULTS/$SLUG.csv" "$RESULTS/$SLUG-loader.csv" "$out/" 2>/dev/null
  fi
}

wants() { [[ " $steps " == *" $1 "* ]]; }

if [ "$plan_only" != 1 ]; then
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
      || echo "nvidia-smi: not here"
    python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, \
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
    git rev-parse HEAD 2>/dev/null || echo "no git revision"
    [ "$smoke" = 1 ] && echo "smoke run: CPU, tiny sizes (FASTMAE_CHECK_SMOKE=1)"
  } > "$out/env.txt" 2>&1
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 120 python -m pip install --no-deps --no-index .whl/*.whl
fi

if wants perf || wants large || wants perf_compile || wants finetune; then
  export SLUG
  SLUG=$(if [ "$plan_only" = 1 ]; then echo "<gpu>"; else results_slug; fi)
  mkdir -p "$RESULTS" "$SCRATCH"
  if [ "$plan_only" = 1 ]; then
    echo "plan ($([ "$smoke" = 1 ] && echo "CPU smoke" || echo GPU), budget ${budget} s; each step's limit is capped" \
      "by what is left):"
  fi
  wants perf && run_perf
  wants perf_compile && run_perf_compile
  wants finetune && run_finetune
  wants large && run_large
  if [ "$plan_only" = 1 ]; then
    echo "sum of the step limits: ${planned} s (the set stops starting steps at ${budget} s)"
    exit 0
  fi
  echo
  cat "$out/env.txt"
  printf '%s\n' "${summary[@]}"
  exit 0
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
wants ncu_attention && step ncu_attention 300 python bench/ncu_attention.py --out "$out/ncu"
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
