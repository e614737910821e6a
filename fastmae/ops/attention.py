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
    """The SDPA kernel this call is pinned to. On CUDA with fp16/bf16: cuDNN on sm_90 and newer (head dim
    a multiple of 8, <= 128), which measured fastest at MAE's decoder and ViT-H encoder shapes on an H200
    (bench/results/), else flash (sm_80 and newer, head dim <= 256); fp32 and older GPUs get the
    memory-efficient kernel. The CPU flash kernel on CPU (and meta, for tracing)."""
    if qkv.device.type == "cuda":
        low_precision = qkv.dtype in (torch.float16, torch.bfloat16)
        capability = torch.cuda.get_device_capability(qkv.device)
        if low_precision and capability >= (9, 0) and head_dim % 8 == 0 and head_dim <= 128:
            return SDPBackend.CUDNN_ATTENTION
        if low_precision and capability >= (8, 0) and head_dim <= 256:
            return SDPBackend.FLASH_ATTENTION
        return SDPBackend.EFFICIENT_ATTENTION
    return SDPBackend.FLASH_ATTENTION


def attention_sdpa(qkv: torch.Tensor, num_heads: int, kernel: SDPBackend) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on strided views of ``qkv (N, S, 3*H*Dh)``, pinned to ``kernel``
    (flash, efficient, cuDNN, math) -> ``(N, S, H*Dh)``. SDPA raises a RuntimeError when that kernel cannot
    run the call; the ``torch`` backend and the benchmarks use it."""
    n, s, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4)  # 3 x (N, H, S, Dh) views
    with sdpa_kernel(kernel):
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, Dh)
    return out.transpose(1, 2).reshape(n, s, num_heads * head_dim)  # (N, S, H*Dh)


def attention_torch(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The ``torch`` backend: :func:`attention_sdpa` pinned to the kernel :func:`_sdpa_kernel_for` names."""
    return attention_sdpa(qkv, num_heads, _sdpa_kernel_for(qkv, qkv.shape[-1] // (3 * num_heads)))


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


def _triton_measured_faster(qkv: torch.Tensor, num_heads: int) -> bool:
    """in bf16/fp16 at S <= 257 and head dim <= 80 only (MAE's shapes), where it measured fastest

    Forward + backward with the tuned plans (kernels/attention.py default_plan) on an H200, bf16, batch 256,
    against SDPA's fastest kernel at each shape: 0.33x its time at the ViT-B/L encoder (S 50, Dh 64;
    memory-efficient), 0.43x at ViT-H's (S 65, Dh 80; cuDNN), 0.56x and 0.55x at the decoders (S 197 and 257,
    Dh 32; cuDNN) (bench/results/nvidia-h200-attention-tuning.csv). fp16 runs the same tensor-core kernels as
    bf16. fp32 (exact fp32 products here), longer sequences and wider heads were not measured: SDPA there."""
    seq, head_dim = int(qkv.shape[1]), int(qkv.shape[-1]) // (3 * num_heads)
    return qkv.dtype in (torch.bfloat16, torch.float16) and seq <= 257 and head_dim <= 80


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


# xformers documents one layout requirement for memory_efficient_attention's BMHK inputs: a unit last
# stride. Its CUDA kernels (flash, and cutlass = torch's mem-efficient kernel) also check that the head dim and
# the head, sequence and batch strides are multiples of their 16-byte alignment (8 elements in bf16/fp16, 4 in
# fp32 on sm_80+): with a head dim divisible by 8 the qkv Linear's output meets all of it.
_XFORMERS_ALIGN = 8  # elements


NO_XFORMERS_KERNEL = "xformers is installed without CUDA attention kernels (python -m xformers.info tells why)"


def _xformers_why_not() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name in ("xformers", "xformers.ops"):
            return "xformers is not installed"
        return f"import xformers.ops failed: {error}"
    except Exception as error:  # a build for another torch or CUDA fails to import in many ways; say which
        return f"import xformers.ops failed: {type(error).__name__}: {error}"
    if torch.cuda.is_available():  # a wheel built without CUDA imports fine but has no kernel (seen: 0.0.35)
        probe = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)  # (N, S, H, Dh)
        try:
            xformers.ops.memory_efficient_attention(probe, probe, probe)
        except NotImplementedError:
            return NO_XFORMERS_KERNEL
        except Exception as error:  # e.g. a build for another GPU or CUDA: say which instead of crashing
            return f"xformers' probe call failed: {type(error).__name__}: {error}"
    return None


def attention_xformers(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``xformers.ops.memory_efficient_attention`` on BMHK views of ``qkv (N, S, 3*H*Dh)`` -> ``(N, S, H*Dh)``.

    q, k, v are ``(N, S, H, Dh)`` strided views (no copies); ``xformers.ops.unbind`` is ``torch.unbind`` in
    the forward, and in the backward skips the stacking copy when xformers writes dq, dk, dv into one
    ``(N, S, 3, H, Dh)`` buffer. A view whose strides break the kernels' alignment is copied once.
    """
    import xformers.ops as xops

    n, s, width = qkv.shape
    head_dim = width // (3 * num_heads)
    aligned = all(x % _XFORMERS_ALIGN == 0 for x in (qkv.stride(0), qkv.stride(1), qkv.storage_offset()))
    if qkv.stride(-1) != 1 or not aligned:
        qkv = qkv.contiguous()
    q, k, v = xops.unbind(qkv.unflatten(-1, (3, num_heads, head_dim)), 2)  # 3 x (N, S, H, Dh) views
    out = xops.memory_efficient_attention(q, k, v)  # (N, S, H, Dh), scale Dh**-0.5
    return out.reshape(n, s, num_heads * head_dim)  # (N, S, H*Dh)


def _xformers_supports(qkv: torch.Tensor, num_heads: int) -> str | None:
    if qkv.device.type != "cuda":
        return f"xformers' memory_efficient_attention runs on CUDA tensors only, got {qkv.device.type}"
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers' kernels take fp16/bf16/fp32, got {qkv.dtype}"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim % _XFORMERS_ALIGN:
        return f"xformers' kernels need a head dim divisible by {_XFORMERS_ALIGN}, got {head_dim}"
    return None


ATTENTION = Op(
    "attention",
    [  # priority: triton at MAE's shapes in bf16/fp16 (S <= 257, Dh <= 80), where it measured fastest; SDPA elsewhere
        Backend("triton", _triton, available=kernel_module_available("attention"), supports=_triton_supports,
                auto_devices=("cuda",), auto_when=_triton_measured_faster),
        Backend("torch", attention_torch, supports=_torch_supports),
        Backend("xformers", attention_xformers, available=_xformers_why_not, supports=_xformers_supports,
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
