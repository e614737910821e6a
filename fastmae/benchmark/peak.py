"""The two denominators of MFU: the dense bf16 matmul rate measured on this GPU, and the card's spec.

The measured rate is one large square bf16 matmul, timed with CUDA events; it is what the card
actually sustains under its power and clock limits (an H100 SXM measures about 790 of its 989
TFLOP/s). The spec table holds NVIDIA's datasheet dense (not 2:4 sparse) bf16 tensor-core rates;
an unknown card gets ``None`` (an empty MFU-vs-spec column), never a guess.
"""

from __future__ import annotations

import re

import torch

# (pattern on torch.cuda.get_device_name(), dense bf16 TFLOP/s); the first match wins, so the more
# specific variants come before the generic name.
SPEC_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGB200\b", 2500.0),
    (r"\bB200\b", 2250.0),
    (r"\bB100\b", 1750.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM5 ("H100 80GB HBM3")
    (r"\bH800 PCIe\b", 756.0),
    (r"\bH800\b", 989.0),
    (r"\bGH200\b", 989.0),
    (r"\bH20\b", 148.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bA40\b", 149.7),
    (r"\bA30\b", 165.0),
    (r"\bA10\b", 125.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 6000 Ada\b", 364.2),
    (r"\bRTX A6000\b", 154.8),
    (r"\bRTX 4090\b", 165.2),
)


def spec_tflops(gpu_name: str) -> float | None:
    """Datasheet dense bf16 TFLOP/s of the card called ``gpu_name``, or ``None`` when it is not in the table."""
    if not isinstance(gpu_name, str):
        raise TypeError(f"gpu_name must be a str, got {type(gpu_name).__name__}")
    for pattern, tflops in SPEC_BF16_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return tflops
    return None


def measure_matmul_tflops(device: torch.device, size: int = 8192, iters: int = 20, warmup: int = 3) -> float:
    """Dense bf16 TFLOP/s of ``(size, size) @ (size, size)`` on the CUDA ``device``, timed with events."""
    if device.type != "cuda":
        raise ValueError(f"the matmul rate is measured on a CUDA device, got {device}")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        torch.matmul(a, b, out=out)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / iters
    del a, b, out
    torch.cuda.empty_cache()
    return 2 * size**3 / seconds / 1e12


def mfu(flops_per_img: float, img_per_s: float, tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s (``flops_per_img * img_per_s``) over ``tflops * 1e12``."""
    if tflops is None or tflops <= 0:
        return None
    return flops_per_img * img_per_s / (tflops * 1e12)
