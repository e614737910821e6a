"""Attention forward+backward at MAE's shapes, every attention backend that runs here (pytest-benchmark).

    python -m pytest -q bench/test_bench_attention.py --benchmark-only --benchmark-json OUT.json
    python bench/summarize_ops.py OUT.json

GPU: batch 256 in bf16, the attention of ViT-B/16 and ViT-L/16 encoders (S = 1 + 49 = 50, Dh = 64, H = 12 / 16),
the ViT-H/14 encoder (S = 1 + 64 = 65, H = 16, Dh = 80) and the 16-head, Dh 32 decoders (S = 197 for B and L,
257 for H), for the ``triton`` and ``xformers`` backends and SDPA pinned to each of its kernels (``torch-flash``,
``torch-efficient``, ``torch-cudnn``; the ``torch`` backend is one of them). A backend or kernel that cannot
run a shape is skipped with its reason. CPU: one tiny fp32 shape, ``torch`` and ``reference`` only (the Triton
interpreter is not timed), to show that the file runs.

FLOPs (flash-attention's convention): forward ``4*N*H*S*S*Dh`` (q k^T and P v, 2 FLOPs a multiply-add),
forward+backward 3.5x that (the backward's five matmuls, one of them the recomputed q k^T, count 2.5x).

Two times per row, both per forward+backward pass, in ``extra_info``:
  ``gpu_us``: CUDA events around CALLS passes queued behind a sleep kernel, so the CPU's launch cost is hidden
              (``launch_hidden`` says whether it was): the kernels' own time, which ``TFLOP/s`` comes from;
  ``wall_us``: the benchmark's mean over ITERS passes launched back to back and one synchronize (launch and
              Python overhead included where they exceed the GPU time), giving ``TFLOP/s_wall``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend

from gpu_time import gpu_seconds  # bench/gpu_time.py (pytest puts bench/ on the path)

from fastmae import ops
from fastmae.ops.attention import attention_sdpa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ITERS = 10  # forward+backward passes per benchmark round
CALLS = 25  # passes per CUDA-event measurement

# name: (batch, S, H, Dh)
SHAPES = {
    "vit_b encoder": (256, 50, 12, 64),
    "vit_l encoder": (256, 50, 16, 64),
    "vit_h encoder": (256, 65, 16, 80),
    "vit_b/l decoder": (256, 197, 16, 32),
    "vit_h decoder": (256, 257, 16, 32),
} if DEVICE == "cuda" else {"tiny": (2, 50, 2, 32)}

SDPA_KERNELS = {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "torch-cudnn": SDPBackend.CUDNN_ATTENTION}
BACKENDS = ["triton", *SDPA_KERNELS, "xformers"] if DEVICE == "cuda" else ["torch", "reference"]


def fwd_bwd_flops(n: int, s: int, h: int, dh: int) -> int:
    """Forward ``4*N*H*S^2*Dh``, times 3.5 for forward+backward."""
    forward = 4 * n * h * s * s * dh
    return 7 * forward // 2


def _attention_fn(backend: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The function timed for ``backend``: an SDPA kernel pinned, or the op's backend called without dispatch."""
    if backend in SDPA_KERNELS:
        return lambda qkv, h: attention_sdpa(qkv, h, SDPA_KERNELS[backend])
    return ops.OPS["attention"].backend(backend).fn


def _versions() -> dict[str, str]:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": str(torch.version.cuda)}
    if DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if ops.OPS["attention"].backend("xformers").available() is None:
        import xformers

        info["xformers"] = xformers.__version__
    return info


@pytest.mark.benchmark(min_rounds=3, max_time=0.25, warmup=True, warmup_iterations=3)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SHAPES))
def test_attention_fwd_bwd(benchmark, case: str, backend: str) -> None:  # noqa: ANN001
    n, s, h, dh = SHAPES[case]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, s, 3 * h * dh, generator=g).to(DEVICE, DTYPE).requires_grad_()  # (N, S, 3*H*Dh)
    upstream = torch.randn(n, s, h * dh, generator=g).to(DEVICE, DTYPE)  # (N, S, H*Dh)
    if backend not in SDPA_KERNELS:
        reason = ops.OPS["attention"].backend(backend).why_not((qkv, h))
        if reason is not None:
            pytest.skip(f"{backend}: {reason}")
    fn = _attention_fn(backend)

    def step() -> None:
        torch.autograd.grad(fn(qkv, h), qkv, upstream)

    try:  # the first pass also compiles (Triton) or plans (cuDNN) outside the timings
        step()
    except RuntimeError as error:  # SDPA: "No available kernel" when the pinned kernel cannot take this call
        if backend not in SDPA_KERNELS:
            raise
        pytest.skip(f"{backend} cannot run {case}: {str(error).splitlines()[0]}")

    def run() -> None:
        for _ in range(ITERS):
            step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"attention fwd+bwd {case}"
    benchmark(run)
    flops = fwd_bwd_flops(n, s, h, dh)
    benchmark.extra_info.update(op="attention_fwd_bwd", backend=backend, case=case, device=DEVICE, dtype=str(DTYPE),
                                batch=n, seq=s, heads=h, head_dim=dh, flops=flops, **_versions())
    if DEVICE == "cuda":
        seconds, hidden = gpu_seconds(step, CALLS)
        benchmark.extra_info.update(gpu_us=seconds * 1e6, launch_hidden=hidden, **{"TFLOP/s": flops / seconds / 1e12})
    if benchmark.stats is not None:  # None with --benchmark-disable (a smoke run)
        wall = benchmark.stats.stats.mean / ITERS
        benchmark.extra_info.update(wall_us=wall * 1e6, **{"TFLOP/s_wall": flops / wall / 1e12})
        if DEVICE == "cpu":
            benchmark.extra_info["TFLOP/s"] = flops / wall / 1e12
