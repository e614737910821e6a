"""Op microbenchmarks (pytest-benchmark) at ViT-B/16 MAE shapes: every backend that runs here.

    python -m pytest bench/test_bench_ops.py --benchmark-only [--benchmark-json out.json]

Rows carry ``op``, ``backend`` and ``device`` in ``extra_info``. On a machine without a GPU this
times the CPU paths only; GPU rows come from a GPU run.
"""

from __future__ import annotations

import pytest
import torch

from fastmae import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 64 if DEVICE == "cuda" else 4  # batch
L, K, D, DD, P, H = 196, 49, 768, 512, 768, 12  # ViT-B/16 at 224 px, mask 0.75


def _inputs() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(N, L, generator=g).to(DEVICE)
    ids_keep, ids_restore, mask = ops.random_masking(noise, K, backend="reference")
    imgs = torch.randn(N, 3, 224, 224, generator=g).to(DEVICE)
    return {
        "random_masking": (noise, K),
        "patch_embed_visible": (imgs, ids_keep, torch.randn(D, 3, 16, 16, device=DEVICE),
                                torch.randn(D, device=DEVICE), torch.randn(1, L + 1, D, device=DEVICE)),
        "unshuffle": (torch.randn(N, 1 + K, DD, device=DEVICE), ids_restore, torch.randn(1, 1, DD, device=DEVICE),
                      torch.randn(1, L + 1, DD, device=DEVICE)),
        "masked_mse": (torch.randn(N, L, P, device=DEVICE), imgs, mask, 16, True),
        "attention": (torch.randn(N, 1 + K, 3 * D, device=DEVICE), H),
        "layer_norm": (torch.randn(N, 1 + K, D, device=DEVICE), torch.ones(D, device=DEVICE),
                       torch.zeros(D, device=DEVICE), 1e-6),
    }


CASES = [(op.name, b.name) for op in ops.OPS.values() for b in op.backends]


@pytest.mark.parametrize("op_name,backend", CASES, ids=[f"{o}-{b}" for o, b in CASES])
def test_op(benchmark, op_name: str, backend: str) -> None:  # noqa: ANN001
    args = _inputs()[op_name]
    reason = ops.OPS[op_name].backend(backend).why_not(args)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op_name} here: {reason}")
    fn = getattr(ops, op_name)
    benchmark.extra_info.update(op=op_name, backend=backend, device=DEVICE, batch=N)

    def run() -> None:
        fn(*args, backend=backend)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
