"""attention: multi-head softmax attention straight from the packed output of the qkv Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastmae.kernels._common import kernel_module_available, triton_why_not
from fastmae.ops._checks import check_tensor
from fastmae.ops.dispatch import Backend, Op


def attention_reference(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The spec, explicit math in fp32. ``qkv (N, S, 3*H*Dh)`` -> ``(N, S, H*Dh)`` in ``qkv.dtype``.

    ``softmax((q @ k^T) * Dh**-0.5) @ v`` per head, as the official (timm) Attention computes it.
    """
    n, s, width = qkv.shape
    head_dim = width // (3 * num_heads)
    with torch.autocast(qkv.device.type, enabled=False):
        q, k, v = qkv.float().reshape(n, s, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x (N, H, S, Dh)
        scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5  # (N, H, S, S)
        out = scores.softmax(dim=-1) @ v  # (N, H, S, Dh)
        out = out.transpose(1, 2).reshape(n, s, num_heads * head_dim)  # (N, S, H*Dh)
    return out.to(qkv.dtype)


def _sdpa_kernel_for(qkv: torch.Tensor, head_dim: int) -> SDPBackend:
    """The SDPA kernel this call is pinned to: flash where it applies (fp16/bf16 on sm_80 and newer,
    head dim <= 256), else memory-efficient; the CPU flash kernel on CPU (and meta, for tracing)."""
    if qkv.device.type == "cuda":
        flash_ok = (qkv.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
                    and torch.cuda.get_device_capability(qkv.device) >= (8, 0))
        return SDPBackend.FLASH_ATTENTION if flash_ok else SDPBackend.EFFICIENT_ATTENTION
    return SDPBackend.FLASH_ATTENTION


def attention_torch(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on strided views of ``qkv``, its kernel pinned explicitly."""
    n, s, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4)  # 3 x (N, H, S, Dh) views
    with sdpa_kernel(_sdpa_kernel_for(qkv, head_dim)):
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, Dh)
    return out.transpose(1, 2).reshape(n, s, num_heads * head_dim)  # (N, S, H*Dh)


def _torch_supports(qkv: torch.Tensor, num_heads: int) -> str | None:
    if qkv.device.type not in ("cpu", "cuda", "meta"):
        return f"SDPA is pinned for cpu and cuda tensors, got {qkv.device.type}"
    if qkv.dtype == torch.float64:
        return "float64 is not supported by the pinned SDPA kernels"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if qkv.device.type == "cuda" and head_dim % 8:
        return f"the pinned CUDA SDPA kernels need a head dim divisible by 8, got {head_dim}"
    return None


def _triton(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    from fastmae.kernels.attention import attention_triton

    return attention_triton(qkv, num_heads)


def _triton_supports(qkv: torch.Tensor, num_heads: int) -> str | None:
    from fastmae.kernels.attention import MAX_HEAD_DIM, MAX_S

    reason = triton_why_not(qkv)
    if reason is not None:
        return reason
    seq, head_dim = qkv.shape[1], qkv.shape[-1] // (3 * num_heads)
    if seq > MAX_S:
        return f"the Triton attention holds a head's whole K/V in one tile: S = {seq} > {MAX_S}"
    if head_dim > MAX_HEAD_DIM:
        return f"the Triton attention takes head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    return None


ATTENTION = Op(
    "attention",
    [
        Backend("torch", attention_torch, supports=_torch_supports),
        Backend("triton", _triton, available=kernel_module_available("attention"), supports=_triton_supports,
                auto_devices=("cuda",)),
        Backend("reference", attention_reference),
    ],
)


def attention(qkv: torch.Tensor, num_heads: int, *, backend: str | None = None) -> torch.Tensor:
    """``qkv (N, S, 3*H*Dh)`` as the qkv Linear emits it -> ``(N, S, H*Dh)`` ready for the projection."""
    check_tensor("qkv", qkv, ndim=3, floating=True)
    if not isinstance(num_heads, int) or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv's last dimension must be 3 * num_heads * head_dim; got {qkv.shape[-1]} with num_heads={num_heads!r}"
        )
    return ATTENTION(qkv, num_heads, backend=backend)
