"""layer_norm: LayerNorm over the last dimension, optionally fused with the residual add before it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


LAYER_NORM = Op("layer_norm", [Backend("torch", layer_norm_torch), Backend("reference", layer_norm_reference)])


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
