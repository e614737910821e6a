"""Op microbenchmarks (pytest-benchmark) at ViT-B/16 MAE shapes, every backend that runs here.

    python -m pytest bench/test_bench_ops.py --benchmark-only [--benchmark-json out.json]

Each row's ``extra_info`` holds ``op``, ``backend``, ``device``, ``dtype``, ``batch``, the bytes the
op must move at least (formula in ``min_bytes``) and the resulting ``GB/s`` from the mean time, to be
compared with the device's measured copy bandwidth. Without a GPU this times the CPU paths (Triton
backends are not timed under the interpreter); GPU rows come from a GPU run.
"""

from __future__ import annotations

import pytest
import torch

from fastmae import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N = 256 if DEVICE == "cuda" else 4  # batch
L, K, D, DD, P, H = 196, 49, 768, 512, 768, 12  # ViT-B/16 at 224 px, mask 0.75


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
    }[op]


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

    def run() -> None:
        fn(*args, backend=backend)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    nbytes = min_bytes(op_name)
    benchmark.extra_info.update(op=op_name, backend=backend, device=DEVICE, dtype=str(DTYPE), batch=N, min_bytes=nbytes)
    if benchmark.stats is not None:  # None with --benchmark-disable (a smoke run)
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.mean / 1e9


def test_copy_bandwidth(benchmark) -> None:  # noqa: ANN001
    """The yardstick: device-to-device copy of 512 MiB (256 MiB read + 256 MiB written) on DEVICE."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=DEVICE)  # 256 MiB
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    nbytes = 2 * src.numel() * src.element_size()
    benchmark.extra_info.update(op="copy", backend="torch", device=DEVICE, dtype="torch.float32", min_bytes=nbytes)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.mean / 1e9
