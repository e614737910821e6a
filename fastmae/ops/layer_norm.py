"""layer_norm: LayerNorm over the last dimension, optionally fused with the residual add before it."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from fastmae.kernels._common import kernel_module_available, triton_why_not
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops.dispatch import Backend, Op

LayerNormOut = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> LayerNormOut:
    """The spec, in fp32. ``x (..., D)`` -> ``LN(x)``; with ``residual`` -> ``(LN(x + residual), x + residual)``.

    Biased variance, as ``nn.LayerNorm``; the result has the dtype of ``x`` (of the sum with residual).
    """
    total = x if residual is None else x + residual  # (..., D)
    with torch.autocast(total.device.type, enabled=False):
        xf = total.float()
        mean = xf.mean(dim=-1, keepdim=True)  # (..., 1)
        var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1)
        out = ((xf - mean) * torch.rsqrt(var + eps) * weight.float() + bias.float()).to(total.dtype)
    return out if residual is None else (out, total)


def layer_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> LayerNormOut:
    """``F.layer_norm`` (fused kernel on CPU and CUDA), residual added first when given."""
    total = x if residual is None else x + residual
    out = F.layer_norm(total, (total.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, total)


def _triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> LayerNormOut:
    from fastmae.kernels.layer_norm import layer_norm_triton

    return layer_norm_triton(x, weight, bias, eps, residual)


def _triton_supports(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> str | None:
    from fastmae.kernels.layer_norm import MAX_D

    tensors = (x, weight, bias) + (() if residual is None else (residual,))
    reason = triton_why_not(*tensors)
    if reason is not None:
        return reason
    if len({t.device for t in tensors}) > 1:
        return f"the Triton layer_norm needs all tensors on one device, got {sorted({str(t.device) for t in tensors})}"
    if x.ndim == 0 or x.shape[-1] == 0:
        return f"the Triton layer_norm needs a non-empty last dimension, got shape {tuple(x.shape)}"
    if x.shape[-1] > MAX_D:
        return f"the Triton layer_norm holds a row in registers: D = {x.shape[-1]} > {MAX_D}"
    return None


def _apex_available() -> str | None:
    """None when NVIDIA apex's fused LayerNorm imports with its CUDA extension, else why not."""
    try:
        importlib.import_module("apex.normalization.fused_layer_norm")
        importlib.import_module("fused_layer_norm_cuda")  # apex's CUDA extension, built with --cuda_ext
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "apex":
            return "apex is not installed"
        return f"NVIDIA apex's fused LayerNorm does not import: {exc}"
    return None


def _apex(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> LayerNormOut:
    """apex's ``fused_layer_norm_affine``, residual added first when given."""
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    total = x if residual is None else x + residual  # (..., D)
    with torch.autocast("cuda", enabled=False):  # apex would cast all to the autocast dtype; keep total's
        out = fused_layer_norm_affine(total, weight, bias, (total.shape[-1],), eps)
    return out if residual is None else (out, total)


def _apex_supports(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> str | None:
    total_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if not weight.dtype == bias.dtype == total_dtype:
        return (f"apex's fused LayerNorm takes weight and bias in the normalised tensor's dtype, got {total_dtype} "
                f"input, {weight.dtype} weight, {bias.dtype} bias")
    tensors = (x, weight, bias) + (() if residual is None else (residual,))
    devices = sorted({t.device.type for t in tensors})
    if devices != ["cuda"]:
        return f"apex's fused LayerNorm takes CUDA tensors only, got {devices}"
    if x.numel() == 0:
        return f"apex's fused LayerNorm needs a non-empty input, got shape {tuple(x.shape)}"
    return None


LAYER_NORM = Op(
    "layer_norm",
    [  # priority: apex when installed (issue 5); torch's kernel measured 2x faster than the triton one on an
        # H200, and a ViT-L step 22% faster with it (bench/results/)
        Backend("apex", _apex, available=_apex_available, supports=_apex_supports, auto_devices=("cuda",)),
        Backend("torch", layer_norm_torch),
        Backend("triton", _triton, available=kernel_module_available("layer_norm"), supports=_triton_supports,
                auto_devices=("cuda",)),
        Backend("reference", layer_norm_reference),
    ],
)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> LayerNormOut:
    """Normalised ``x``; with ``residual`` returns ``(normalised x + residual, x + residual)``."""
    check_tensor("x", x, floating=True)
    if x.ndim == 0:
        raise ValueError("layer_norm: x must have at least one dimension (..., D), got a scalar")
    d = x.shape[-1]
    check_tensor("weight", weight, ndim=1, shape=(d,))
    check_tensor("bias", bias, ndim=1, shape=(d,))
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape))
        check_same_device(x=x, residual=residual)
    return LAYER_NORM(x, weight, bias, float(eps), residual, backend=backend)
