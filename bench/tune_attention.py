"""Times every tiling of the Triton attention at MAE's shapes on a GPU, next to SDPA's kernels.

    python bench/tune_attention.py --csv bench/results/<gpu>-attention-tuning.csv

For each shape of ``bench/test_bench_attention.py`` (batch 256, bf16: the ViT-B/L/H encoders and the decoders)
it times, by CUDA events with the launches hidden (``bench/gpu_time.py``), each alternative of
``fastmae.kernels.attention_tuning.tuning_plans``: the forward's plans (``attention``), the fused backward's
and the split backward's with one of its dK/dV or dQ launches changed (``attention_backward``, fed the default
forward's output). It then assembles the tuned plan (fastest forward; the faster of the fastest fused backward
and the split backward with the fastest dK/dV and dQ launches together, timed as assembled: part "backward")
and times forward + backward of the default plan and the tuned plan (both checked against the default plan's
gradient, which covers the saved lse) and of SDPA pinned to each kernel (flash, efficient, cuDNN; through
autograd, as the op runs it). Before the timing, ``--warm-workers`` processes run every alternative once, so that Triton's
compilations (one at a time in a process) overlap and the timing process loads them from the on-disk cache; a
plan that raised there is not run again. Every row lands in the CSV (``part``: forward, fused backward, dkdv, dq,
backward, fwd+bwd); a plan that fails to compile or whose result differs from the default plan's by more than
bf16 allows is a row with its error, never a timing. Printed as each shape finishes: the default and tuned plans
against SDPA's fastest, and the tuned plan as Python, for ``default_plan``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from gpu_time import gpu_seconds  # bench/ is on the path when this file is run
from test_bench_attention import SDPA_KERNELS, SHAPES, fwd_bwd_flops

from fastmae.kernels.attention import attention, attention_backward
from fastmae.kernels.attention_plan import AttentionPlan, default_plan
from fastmae.kernels.attention_tuning import tuning_plans
from fastmae.ops.attention import attention_sdpa

CALLS = 25  # passes per CUDA-event measurement
DEVICE, DTYPE = "cuda", torch.bfloat16
AGREE = 2.0**-6  # relative distance from the default plan's bf16 result (both round to bf16 once or twice)
FIELDS = ["case", "part", "plan", "gpu_us", "TFLOP/s", "error", "batch", "seq", "heads", "head_dim", "dtype",
          "gpu", "torch", "triton"]


def plan_label(plan: AttentionPlan) -> str:
    """One line: ``keys 64+16 dims 64+16 | fwd M64 w4 whole | fused M16 w8`` (``loop 32``: the forward walks the
    keys 32 at a time; ``split dkdv B32 T32 w4 dq B64 T64 w8``: B = block owned, T = step of the loop)."""
    (n, t), (d, e) = plan.key_parts, plan.dim_parts
    bwd = (f"fused M{plan.bwd_block_m} w{plan.bwd_warps}" if plan.bwd_fused else
           f"split dkdv B{plan.dkdv_block} T{plan.dkdv_step} w{plan.dkdv_warps} "
           f"dq B{plan.dq_block} T{plan.dq_step} w{plan.dq_warps}")
    keys = f"loop {plan.fwd_loop}" if plan.fwd_loop else "whole"
    return f"keys {n}+{t} dims {d}+{e} | fwd M{plan.fwd_block_m} w{plan.fwd_warps} {keys} | {bwd}"


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


class ShapeTuner:
    """The tensors of one shape and the timing of a launch on them."""

    def __init__(self, case: str, shape: tuple[int, int, int, int], writer: Callable[[dict], None],
                 dtype: torch.dtype = DTYPE, device: str = DEVICE) -> None:
        self.case = case
        self.n, self.s, self.h, self.dh = shape
        g = torch.Generator().manual_seed(0)
        self.qkv = torch.randn(self.n, self.s, 3 * self.h * self.dh, generator=g).to(device, dtype)  # (N, S, 3*H*Dh)
        self.upstream = torch.randn(self.n, self.s, self.h * self.dh, generator=g).to(device, dtype)  # (N, S, H*Dh)
        self.default = default_plan(self.s, self.dh)
        self.out, self.lse = attention(self.qkv, self.h, self.default)
        self.dqkv = attention_backward(self.upstream, self.qkv, self.out, self.lse, self.h, self.default)
        self.flops = fwd_bwd_flops(self.n, self.s, self.h, self.dh)
        self.writer = writer

    def forward(self, plan: AttentionPlan) -> torch.Tensor:
        return attention(self.qkv, self.h, plan)[0]

    def backward(self, plan: AttentionPlan) -> torch.Tensor:
        return attention_backward(self.upstream, self.qkv, self.out, self.lse, self.h, plan)

    def alternative(self, part: str, plan: AttentionPlan) -> tuple[Callable[[], torch.Tensor], torch.Tensor, float]:
        """``(step, the default plan's result it must match, its FLOPs)`` of a plan of ``tuning_plans``' part."""
        fwd_flops = self.flops * 2 / 7  # the forward is 2 of forward+backward's 7 units
        if part == "forward":
            return (lambda: self.forward(plan)), self.out, fwd_flops
        return (lambda: self.backward(plan)), self.dqkv, self.flops - fwd_flops

    def time(self, part: str, label: str, step: Callable[[], torch.Tensor], want: torch.Tensor | None,
             flops: float) -> float | None:
        """GPU microseconds of ``step`` (None when it fails or disagrees with ``want``); one CSV row either way."""
        row = {"case": self.case, "part": part, "plan": label}
        try:
            got = step()  # compiles
            distance = None if want is None else _rel(got, want)
            if distance is not None and not distance <= AGREE:  # NaN (a NaN or unwritten result) fails too
                raise RuntimeError(f"result differs from the default plan's by {distance:.2e} > {AGREE:.1e}")
            seconds, hidden = gpu_seconds(step, CALLS)
            if not hidden:
                raise RuntimeError("launches not hidden behind the sleep kernel: timing would include the CPU")
        except Exception as error:  # noqa: BLE001 -- a plan that cannot run is a row, the sweep goes on
            self.writer({**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
            return None
        self.writer({**row, "gpu_us": round(seconds * 1e6, 2), "TFLOP/s": round(flops / seconds / 1e12, 2)})
        return seconds * 1e6

    def fwd_bwd(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[], torch.Tensor]:
        qkv = self.qkv.detach().requires_grad_()
        return lambda: torch.autograd.grad(fn(qkv, self.h), qkv, self.upstream)[0]


def _best(timed: list[tuple[float | None, AttentionPlan]]) -> tuple[float, AttentionPlan] | None:
    ok = [(us, plan) for us, plan in timed if us is not None]
    return min(ok, key=lambda pair: pair[0]) if ok else None


def warm_part(case: str, shape: tuple[int, int, int, int], part: str, device: str, dtype: str) -> dict[str, str]:
    """Runs each plan of one part of ``tuning_plans`` once, compiling it into Triton's on-disk cache (a worker
    process of ``--warm-workers``): ``{plan label: error}`` of the plans that raised. After a CUDA error, which
    leaves the process's context unusable, the rest are left for the timing process to compile."""
    tuner = ShapeTuner(case, shape, lambda row: None, getattr(torch, dtype), device)
    failed = {}
    for plan in tuning_plans(tuner.s, tuner.dh)[part]:
        try:
            tuner.alternative(part, plan)[0]()
        except Exception as error:  # noqa: BLE001 -- reported, never retried by the timing process
            failed[plan_label(plan)] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if "CUDA" in str(error):
                break
    return failed


def warm_up(cases: list[str], workers: int, device: str, dtype: str) -> dict[str, dict[tuple[str, str], str]]:
    """Compiles every alternative of ``cases`` in ``workers`` processes at once (Triton compiles one kernel at
    a time per process; the timing process then loads them from the cache): ``{case: {(part, label): error}}``
    (one plan can be in two parts, e.g. the default split plan in "dkdv" and "dq")."""
    import multiprocessing

    tasks = [(case, SHAPES[case], part, device, dtype) for case in cases
             for part in tuning_plans(SHAPES[case][1], SHAPES[case][3])]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        results = pool.starmap(warm_part, tasks)
    failed: dict[str, dict[tuple[str, str], str]] = {case: {} for case in cases}
    for (case, _, part, *_), errors in zip(tasks, results):
        failed[case].update({(part, label): error for label, error in errors.items()})
    return failed


def tune_shape(tuner: ShapeTuner, failed: dict[tuple[str, str], str] | None = None) -> dict[str, object]:
    """Times every alternative of one shape (but those in ``failed``, {(part, label): error} from the warm-up:
    rows with their error), then the default, tuned and SDPA forward + backward."""
    bwd_flops = tuner.alternative("backward", tuner.default)[2]
    timed: dict[str, list[tuple[float | None, AttentionPlan]]] = {}
    for part, part_plans in tuning_plans(tuner.s, tuner.dh).items():
        timed[part] = []
        for plan in part_plans:
            label = plan_label(plan)
            if failed and (part, label) in failed:
                tuner.writer({"case": tuner.case, "part": part, "plan": label,
                              "error": "warm-up: " + failed[part, label]})
                timed[part].append((None, plan))
                continue
            step, want, flops = tuner.alternative(part, plan)
            timed[part].append((tuner.time(part, label, step, want, flops), plan))
    best_fwd, best_fused = _best(timed["forward"]), _best(timed["fused backward"])
    best_dkdv, best_dq = _best(timed["dkdv"]), _best(timed["dq"])
    tuned = tuner.default if best_fwd is None else replace(
        tuner.default, key_parts=best_fwd[1].key_parts, fwd_block_m=best_fwd[1].fwd_block_m,
        fwd_warps=best_fwd[1].fwd_warps, fwd_loop=best_fwd[1].fwd_loop)
    candidates = []
    if best_dkdv and best_dq:
        dkdv, dq = best_dkdv[1], best_dq[1]
        split = replace(tuned, bwd_fused=False, dkdv_block=dkdv.dkdv_block, dkdv_step=dkdv.dkdv_step,
                        dkdv_warps=dkdv.dkdv_warps, dq_block=dq.dq_block, dq_step=dq.dq_step, dq_warps=dq.dq_warps)
        candidates.append((tuner.time("backward", plan_label(split), lambda: tuner.backward(split), tuner.dqkv,
                                      bwd_flops), split))
    if best_fused:
        fused = replace(tuned, bwd_fused=True, bwd_block_m=best_fused[1].bwd_block_m, bwd_warps=best_fused[1].bwd_warps)
        us = best_fused[0]
        if best_fused[1].key_parts != fused.key_parts:  # one key-parts choice serves both: time it as it will run
            us = tuner.time("backward", plan_label(fused), lambda: tuner.backward(fused), tuner.dqkv, bwd_flops)
        candidates.append((us, fused))
    bwd = _best(candidates)
    if bwd is not None:
        tuned = bwd[1]
    results = {"default": tuner.time("fwd+bwd", "default: " + plan_label(tuner.default),
                                     _plan_fwd_bwd(tuner, tuner.default), tuner.dqkv, tuner.flops),
               "tuned": tuner.time("fwd+bwd", "tuned: " + plan_label(tuned), _plan_fwd_bwd(tuner, tuned),
                                   tuner.dqkv, tuner.flops)}
    for name, kernel in SDPA_KERNELS.items():
        results[name] = tuner.time("fwd+bwd", name, tuner.fwd_bwd(lambda qkv, h, k=kernel: attention_sdpa(qkv, h, k)),
                                   None, tuner.flops)
    return {"times": results, "tuned": tuned}


def _plan_fwd_bwd(tuner: ShapeTuner, plan: AttentionPlan) -> Callable[[], torch.Tensor]:
    """Forward then backward with ``plan``, as the op's autograd runs them."""
    def step() -> torch.Tensor:
        out, lse = attention(tuner.qkv, tuner.h, plan)
        return attention_backward(tuner.upstream, tuner.qkv, out, lse, tuner.h, plan)
    return step


def _shape_line(case: str, result: dict[str, object]) -> str:
    """``case: default … us tuned … us torch-flash … us …; tuned / fastest SDPA (kernel) = ratio``."""
    times = result["times"]
    sdpa = {k: v for k, v in times.items() if k in SDPA_KERNELS and v is not None}
    fastest = min(sdpa.items(), key=lambda kv: kv[1]) if sdpa else None
    line = " ".join(f"{k} {v:.1f} us" if v is not None else f"{k} failed" for k, v in times.items())
    ratio = (f"; tuned / fastest SDPA ({fastest[0]}) = {times['tuned'] / fastest[1]:.2f}"
             if fastest and times["tuned"] is not None else "")
    return f"{case}: {line}{ratio}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True, help="rows appended here (created with a header)")
    parser.add_argument("--cases", default=",".join(SHAPES), help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="stop starting shapes after this")
    parser.add_argument("--warm-workers", type=int, default=8,
                        help="processes compiling every alternative before the timing (0: compile while timing)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/tune_attention.py times GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in SHAPES]
    if unknown:
        parser.error(f"unknown cases {unknown}; expected some of {list(SHAPES)}")
    import triton

    versions = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "dtype": str(DTYPE)}
    start = time.monotonic()  # --max-seconds counts the warm-up too
    failed: dict[str, dict[tuple[str, str], str]] = {}
    if args.warm_workers > 0:
        failed = warm_up(cases, args.warm_workers, DEVICE, str(DTYPE).removeprefix("torch."))
        print(f"warm-up: {args.warm_workers} processes ran every alternative once in {time.monotonic() - start:.0f} s",
              flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists() or os.path.getsize(args.csv) == 0
    with open(args.csv, "a", newline="") as handle:
        out = csv.DictWriter(handle, FIELDS)
        if new:
            out.writeheader()
        for case in cases:
            if time.monotonic() - start > args.max_seconds:
                print(f"{case}: skipped, --max-seconds {args.max_seconds} spent")
                continue
            n, s, h, dh = SHAPES[case]

            def write(row: dict, n: int = n, s: int = s, h: int = h, dh: int = dh) -> None:
                out.writerow({**row, "batch": n, "seq": s, "heads": h, "head_dim": dh, **versions})
                handle.flush()

            result = tune_shape(ShapeTuner(case, SHAPES[case], write, DTYPE, DEVICE), failed.get(case))
            print(_shape_line(case, result), f"({time.monotonic() - start:.0f} s)")  # printed now: kept if killed later
            print(f"  tuned: ({s}, {dh}): AttentionPlan(**{asdict(result['tuned'])})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
