"""Op microbenchmarks (pytest-benchmark): every op's ``benchmark`` case (ViT-B/16 MAE shapes, from the op's
definition in fastmae/ops/<op>.py) on every backend that runs here.

    python -m pytest bench/test_bench_ops.py --benchmark-only [--benchmark-json out.json]

Each row's ``extra_info`` holds ``op``, ``backend``, ``device``, ``dtype``, ``batch``, the bytes the
op must move at least (the op's ``min_bytes``) and the resulting ``GB/s``, to be compared with the
device's measured copy bandwidth (the ``copy`` row). On a GPU, ``GB/s`` comes from the kernels' GPU time
(``gpu_us``, bench/gpu_time.py: launches queued behind a sleep kernel, so Python and launch latency are
not counted) and ``GB/s_wall`` from the benchmark's wall-clock mean; on CPU both are wall clock.
A case that lists gradients (``linear_gelu`` at ViT-L's encoder MLP shape, ``N * 50`` rows, 1024 -> 4096) is
timed forward + backward; ``matmul_TFLOP/s`` rates the op's GEMMs (its ``matmul_flops``). Without a GPU this
times the CPU paths (Triton backends are not timed under the interpreter); GPU rows come from a GPU run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gpu_time import gpu_seconds  # bench/gpu_time.py (pytest puts bench/ on the path)

from fastmae import ops
from fastmae.ops.dispatch import Op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N = 256 if DEVICE == "cuda" else 4  # batch
COPY_ELEMENTS = 64 * 2**20  # fp32 elements of the copy yardstick: 256 MiB

ROWS = [(op, b.name) for op in ops.OPS.values() if op.benchmark is not None for b in op.backends]


@pytest.mark.parametrize("op,backend", ROWS, ids=[f"{op.name}-{b}" for op, b in ROWS])
def test_op(benchmark, op: Op, backend: str) -> None:  # noqa: ANN001
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("Triton backends run on CPU only in the interpreter: timing it means nothing")
    case = op.benchmark
    args = list(case.make(torch.device(DEVICE), DTYPE, N))
    for name in case.grad:
        i = op.arg_names.index(name)
        args[i] = args[i].requires_grad_(True)
    reason = op.backend(backend).why_not(tuple(args), op.arg_names)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op.name} here: {reason}")
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    upstream = torch.randn_like(op(*args, backend=backend)) if leaves else None

    def step() -> None:
        out = op(*args, backend=backend)
        if upstream is not None:
            torch.autograd.grad(out, leaves, upstream)  # returned, not accumulated into .grad

    def run() -> None:
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    flops = op.matmul_flops(*args) if op.matmul_flops is not None else None
    _record(benchmark, op.name, backend, step, op.min_bytes(*args), flops)


def _record(benchmark, op_name: str, backend: str, step: Callable[[], object], nbytes: int,  # noqa: ANN001
            flops: int | None, dtype: torch.dtype = DTYPE) -> None:
    """Attach the row's bytes, GB/s (GPU time on CUDA, wall clock on CPU) and matmul rate to ``benchmark``."""
    benchmark.extra_info.update(op=op_name, backend=backend, device=DEVICE, dtype=str(dtype), batch=N, min_bytes=nbytes)
    if flops is not None:
        benchmark.extra_info["matmul_flops"] = flops
    if benchmark.stats is None:  # --benchmark-disable (a smoke run)
        return
    wall = benchmark.stats.stats.mean
    seconds = wall
    if DEVICE == "cuda":
        seconds, hidden = gpu_seconds(step)
        benchmark.extra_info.update(gpu_us=seconds * 1e6, launch_hidden=hidden)
    benchmark.extra_info["GB/s"] = nbytes / seconds / 1e9
    benchmark.extra_info["GB/s_wall"] = nbytes / wall / 1e9
    if flops is not None:  # not "TFLOP/s": summarize_ops.py reads that key as an attention row's
        benchmark.extra_info["matmul_TFLOP/s"] = flops / seconds / 1e12


def test_copy_bandwidth(benchmark) -> None:  # noqa: ANN001
    """The yardstick: device-to-device copy of 512 MiB (256 MiB read + 256 MiB written) on DEVICE."""
    src = torch.empty(COPY_ELEMENTS, dtype=torch.float32, device=DEVICE)  # 256 MiB
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    _record(benchmark, "copy", "torch", lambda: dst.copy_(src), 2 * COPY_ELEMENTS * 4, None, dtype=torch.float32)
