"""Profile fastmae pretraining steps on a GPU: img/s per backend choice and the top kernels by CUDA time.

    python bench/profile_step.py --model mae_vit_large_patch16 --batch-size 256 --out OUT_DIR

For each variant (``default`` backends, ``op=backend`` pins, ``reference`` for everything) it times
``--steps`` complete steps of ``fastmae bench``'s eager ``fastmae`` step (forward, backward, AdamW; bf16
autocast; synthetic images on the device) with its timer (CUDA events), then profiles two steps of the
default variant and writes the kernel table (``profile_<model>.txt``) and a JSON summary (``profile_<model>.json``).
This is a diagnostic for finding where a step's time goes; the comparable benchmark is ``fastmae bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import fastmae
from fastmae.benchmark.timing import time_train_step
from fastmae.benchmark.train_step import build_fastmae_step
from fastmae.flops import mae_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mae_vit_large_patch16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join([
        "default", "attention=torch", "attention=triton", "attention=xformers", "layer_norm=triton",
        "linear_gelu=triton", "reference"]))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    device = torch.device("cuda")
    step = build_fastmae_step("fastmae", args.model, args.batch_size, 224, device)  # the benchmark's eager step
    imgs = torch.randn(args.batch_size, 3, 224, 224, device=device)
    train_flops = mae_flops(step.model).train_step * args.batch_size

    results = {"model": args.model, "batch_size": args.batch_size, "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "variants": {}}
    for variant in args.variants.split(","):
        if variant == "default":
            ctx = contextlib.nullcontext()
        elif variant == "reference":
            ctx = fastmae.ops.use_backend("reference")
        else:
            op, backend = variant.split("=")
            ctx = fastmae.ops.use_backend(**{op: backend})
        t0 = time.perf_counter()
        try:
            with ctx:
                torch.cuda.reset_peak_memory_stats()
                timing = time_train_step(step, lambda: imgs, args.steps, args.warmup, device)
            ms = timing.seconds * 1e3 / timing.steps
            row = {"ms_per_step": ms, "img_per_s": timing.img_per_s,
                   "tflops": train_flops / ms / 1e9, "peak_mem_gib": timing.peak_mem_bytes / 2**30}
        except Exception as exc:  # a failing variant is reported, the next one still runs
            row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        row["wall_s"] = time.perf_counter() - t0
        results["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step.run(imgs)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90)
    (args.out / f"profile_{args.model}.txt").write_text(table)
    (args.out / f"profile_{args.model}.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
