"""attention: multi-head softmax attention straight from the packed output of the qkv Linear."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastmae.ops._cases import randn
from fastmae.ops._checks import check_tensor
from fastmae.ops._kernels import FLOAT_DTYPES, kernel, triton_available, triton_devices
from fastmae.ops.dispatch import Backend, Case, Op


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


# ---- the kernels' op: one schema, fake and autograd (the triton backend's kernels) ----

@torch.library.custom_op("fastmae::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``qkv (N, S, 3*H*Dh)`` -> ``(out (N, S, H*Dh)`` in qkv's dtype, ``lse (N, H, S)`` fp32: each query row's
    log-sum-exp of its scaled scores, kept for the backward)."""
    return kernel(backend, "attention", "attention")(qkv, num_heads)


@attention_op.register_fake
def _(qkv: torch.Tensor, num_heads: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, seq, packed = qkv.shape
    out = qkv.new_empty((n, seq, packed // 3))  # (N, S, H*Dh)
    return out, qkv.new_empty((n, num_heads, seq), dtype=torch.float32)


@torch.library.custom_op("fastmae::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          num_heads: int, backend: str) -> torch.Tensor:
    """``grad_out (N, S, H*Dh)``, the forward's ``qkv``, ``out`` and ``lse`` -> ``d(qkv) (N, S, 3*H*Dh)`` in qkv's
    dtype."""
    return kernel(backend, "attention", "attention_backward")(grad_out, qkv, out, lse, num_heads)


@attention_backward_op.register_fake
def _(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
      backend: str) -> torch.Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                   output: tuple[torch.Tensor, torch.Tensor]) -> None:
    qkv, num_heads, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_heads, backend)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, _grad_lse: None) -> tuple:
    qkv, out, lse = ctx.saved_tensors
    return attention_backward_op(grad_out, qkv, out, lse, *ctx.args), None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _attention_kernels(qkv: torch.Tensor, num_heads: int, *, backend: str) -> torch.Tensor:
    return attention_op(qkv, num_heads, backend)[0]


def _triton_measured_faster(qkv: torch.Tensor, num_heads: int) -> bool:
    """in bf16/fp16 at S <= 257 and head dim <= 80 only (MAE's shapes), where it measured fastest

    Forward + backward with the tuned plans (kernels/attention_plan.py default_plan) on an H200, bf16, batch 256,
    against SDPA's fastest kernel at each shape: 0.33x its time at the ViT-B/L encoder (S 50, Dh 64;
    memory-efficient), 0.43x at ViT-H's (S 65, Dh 80; cuDNN), 0.56x and 0.55x at the decoders (S 197 and 257,
    Dh 32; cuDNN) (bench/results/nvidia-h200-attention-tuning.csv). fp16 runs the same tensor-core kernels as
    bf16. fp32 (exact fp32 products here), longer sequences and wider heads were not measured: SDPA there."""
    seq, head_dim = int(qkv.shape[1]), int(qkv.shape[-1]) // (3 * num_heads)
    return qkv.dtype in (torch.bfloat16, torch.float16) and seq <= 257 and head_dim <= 80


def _triton_limits(qkv: torch.Tensor, num_heads: int) -> str | None:
    from fastmae.kernels.attention_plan import MAX_HEAD_DIM, MAX_S

    seq, head_dim = qkv.shape[1], qkv.shape[-1] // (3 * num_heads)
    if seq > MAX_S:
        return f"the triton attention holds a head's whole K/V in one tile: S = {seq} > {MAX_S}"
    if head_dim > MAX_HEAD_DIM:
        return f"the triton attention takes head dims up to {MAX_HEAD_DIM}, got {head_dim}"
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


def _case(seq: int, heads: int, head_dim: int) -> Callable[..., tuple]:
    """``(qkv (N, S, 3*H*Dh), num_heads)``."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        return randn(batch, seq, 3 * heads * head_dim, seed=1, device=device, dtype=dtype), heads

    return make


def _min_bytes(qkv: torch.Tensor, num_heads: int) -> int:
    """qkv in, the output out."""
    return qkv.numel() * qkv.element_size() * 4 // 3


ATTENTION_CASES = (Case("S50-Dh64", _case(50, 2, 64), batch=3, grad=("qkv",)),
                  Case("S65-Dh80", _case(65, 2, 80), batch=2, grad=("qkv",)),
                  Case("S197-Dh32", _case(197, 2, 32), batch=1, grad=("qkv",)),
                  Case("S257-Dh32", _case(257, 1, 32), batch=1, grad=("qkv",)),
                  Case("S17-Dh16", _case(17, 3, 16), batch=2, grad=("qkv",)))

ATTENTION = Op(
    "attention",
    [  # priority: triton at MAE's shapes in bf16/fp16 (S <= 257, Dh <= 80), where it measured fastest; SDPA elsewhere
        Backend("triton", functools.partial(_attention_kernels, backend="triton"),
                available=triton_available("attention"), supports=_triton_limits, devices=triton_devices(),
                dtypes=FLOAT_DTYPES, auto_devices=("cuda",), auto_when=_triton_measured_faster),
        Backend("torch", attention_torch, supports=_torch_supports),
        Backend("xformers", attention_xformers, available=_xformers_why_not, supports=_xformers_supports,
                auto_devices=("cuda",)),
        Backend("reference", attention_reference),
    ],
    cases=ATTENTION_CASES, benchmark=Case("vit-b-encoder", _case(50, 12, 64)), min_bytes=_min_bytes,
    kernel_op=attention_op,
)


def attention(qkv: torch.Tensor, num_heads: int, *, backend: str | None = None) -> torch.Tensor:
    """``qkv (N, S, 3*H*Dh)`` as the qkv Linear emits it -> ``(N, S, H*Dh)`` ready for the projection."""
    check_tensor("qkv", qkv, ndim=3, floating=True)
    if not isinstance(num_heads, int) or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv's last dimension must be 3 * num_heads * head_dim; got {qkv.shape[-1]} with num_heads={num_heads!r}"
        )
    return ATTENTION(qkv, num_heads, backend=backend)
