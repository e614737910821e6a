"""layer_norm: LayerNorm over the last dimension, optionally fused with the residual add before it."""

from __future__ import annotations

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


LAYER_NORM = Op(
    "layer_norm",
    [
        Backend("triton", _triton, available=kernel_module_available("layer_norm"), supports=_triton_supports, auto_devices=("cuda",)),
        Backend("torch", layer_norm_torch),
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
    d = x.shape[-1]
    check_tensor("weight", weight, ndim=1, shape=(d,))
    check_tensor("bias", bias, ndim=1, shape=(d,))
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape))
        check_same_device(x=x, residual=residual)
    return LAYER_NORM(x, weight, bias, float(eps), residual, backend=backend)
