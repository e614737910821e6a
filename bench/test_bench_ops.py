"""Op microbenchmarks (pytest-benchmark) at ViT-B/16 MAE shapes, every backend that runs here.

    python -m pytest bench/test_bench_ops.py --benchmark-only [--benchmark-json out.json]

Each row's ``extra_info`` holds ``op``, ``backend``, ``device``, ``dtype``, ``batch``, the bytes the
op must move at least (formula in ``min_bytes``) and the resulting ``GB/s``, to be compared with the
device's measured copy bandwidth (the ``copy`` row). On a GPU, ``GB/s`` comes from the kernels' GPU time
(``gpu_us``, bench/gpu_time.py: launches queued behind a sleep kernel, so Python and launch latency are
not counted) and ``GB/s_wall`` from the benchmark's wall-clock mean; on CPU both are wall clock.
``linear_gelu`` runs at ViT-L's encoder MLP shape (``N * 50`` rows, 1024 -> 4096) and is timed forward +
backward; its bytes are the bias + GELU pass's, and ``matmul_TFLOP/s`` rates its three GEMMs. Without a GPU this times the CPU paths (Triton
backends are not timed under the interpreter); GPU rows come from a GPU run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gpu_time import gpu_seconds  # bench/gpu_time.py (pytest puts bench/ on the path)

from fastmae import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N = 256 if DEVICE == "cuda" else 4  # batch
L, K, D, DD, P, H = 196, 49, 768, 512, 768, 12  # ViT-B/16 at 224 px, mask 0.75
D_L, F_L = 1024, 4096  # ViT-L's width and MLP hidden width: linear_gelu's row (N * (1 + K) rows)
COPY_ELEMENTS = 64 * 2**20  # fp32 elements of the copy yardstick: 256 MiB
BACKWARD_OPS = {"linear_gelu"}  # timed forward + backward (the gradients of every input that requires grad)


def min_bytes(op: str) -> int:
    """Bytes each op must read and write at least (e = element size of DTYPE; tables in fp32)."""
    e = torch.finfo(DTYPE).bits // 8
    return {
        "random_masking": N * L * 4 + N * K * 8 + N * L * 8 + N * L * 4,  # noise in; ids_keep, ids_restore, mask out
        "random_masking_philox": N * K * 8 + N * L * 8 + N * L * 4,  # no noise tensor: the outputs only
        "patch_embed_visible": N * K * P * e + D * P * e + N * K * D * 4 + N * K * 8 + N * K * D * 4,  # px, W, pos, ids in
        "unshuffle": N * (1 + K) * DD * e + (L + 1) * DD * 4 + N * L * 8 + N * (L + 1) * DD * 4,
        "masked_mse": 2 * N * (L - K) * P * e + N * L * 4,  # removed patches of pred and imgs, the mask
        "attention": N * (1 + K) * 3 * D * e + N * (1 + K) * D * e,
        "layer_norm": 2 * N * (1 + K) * D * e + 2 * D * e + 8 * N * (1 + K),  # x in, y out, params, mean/rstd
        # forward + backward of the bias + GELU around the GEMMs, fused: h in, out out; g and h in, dh out; the
        # bias and its gradient (the GEMMs' own traffic is counted as FLOPs: matmul_flops)
        "linear_gelu": 5 * N * (1 + K) * F_L * e + 2 * F_L * e,
        "copy": 2 * COPY_ELEMENTS * 4,  # fp32 read + written
    }[op]


def matmul_flops(op: str) -> int | None:
    """FLOPs of an op's matmuls (forward + backward for BACKWARD_OPS), None for ops without any."""
    rows = N * (1 + K)
    return {"linear_gelu": 3 * 2 * rows * D_L * F_L}.get(op)  # x @ W^T; dx = dh @ W and dW = dh^T @ x


def _inputs() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(N, L, generator=g).to(DEVICE)
    ids_keep, ids_restore, mask = ops.random_masking(noise, K, backend="reference")

    def randn(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    imgs = randn(N, 3, 224, 224)
    return {
        "random_masking": (noise, K),
        "random_masking_philox": (N, L, K, 1234, 7, torch.device(DEVICE)),
        "patch_embed_visible": (imgs, ids_keep, randn(D, 3, 16, 16), randn(D), randn(1, L + 1, D, dtype=torch.float32)),
        "unshuffle": (randn(N, 1 + K, DD), ids_restore, randn(1, 1, DD, dtype=torch.float32),
                      randn(1, L + 1, DD, dtype=torch.float32)),
        "masked_mse": (randn(N, L, P), imgs, mask, 16, True),
        "attention": (randn(N, 1 + K, 3 * D), H),
        "layer_norm": (randn(N, 1 + K, D), randn(D), randn(D), 1e-6),
        "linear_gelu": tuple(t.requires_grad_() for t in (randn(N, 1 + K, D_L), randn(F_L, D_L) / D_L**0.5,
                                                          randn(F_L))),  # ViT-L's encoder fc1 + GELU
    }


CASES = [(op.name, b.name) for op in ops.OPS.values() for b in op.backends]


@pytest.mark.parametrize("op_name,backend", CASES, ids=[f"{o}-{b}" for o, b in CASES])
def test_op(benchmark, op_name: str, backend: str) -> None:  # noqa: ANN001
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("Triton backends run on CPU only in the interpreter: timing it means nothing")
    args = _inputs()[op_name]
    reason = ops.OPS[op_name].backend(backend).why_not(args)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op_name} here: {reason}")
    fn = getattr(ops, op_name)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    upstream = torch.randn_like(fn(*args, backend=backend)) if op_name in BACKWARD_OPS else None

    def step() -> None:
        out = fn(*args, backend=backend)
        if upstream is not None:
            torch.autograd.grad(out, leaves, upstream)  # returned, not accumulated into .grad

    def run() -> None:
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    _record(benchmark, op_name, backend, step, matmul_flops(op_name))


def _record(benchmark, op_name: str, backend: str, step: Callable[[], object], flops: int | None,  # noqa: ANN001
            dtype: torch.dtype = DTYPE) -> None:
    """Attach the row's bytes, GB/s (GPU time on CUDA, wall clock on CPU) and matmul rate to ``benchmark``."""
    nbytes = min_bytes(op_name)
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
    _record(benchmark, "copy", "torch", lambda: dst.copy_(src), None, dtype=torch.float32)
