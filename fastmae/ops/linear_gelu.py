"""linear_gelu: ``gelu(x @ weight^T + bias)`` with the exact (erf) GELU -- the MLP's fc1 and its activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.kernels._common import autocast_enabled, kernel_module_available, triton_why_not
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops.dispatch import Backend, Op


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``nn.Linear`` + ``F.gelu`` give: the autocast dtype under autocast (F.linear runs in it and GELU
    keeps it), else x's dtype."""
    return torch.get_autocast_dtype(x.device.type) if autocast_enabled(x.device.type) else x.dtype


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The spec, in fp32. ``x (..., Din)``, ``weight (F, Din)``, ``bias (F,)`` -> ``gelu(x @ weight^T + bias)
    (..., F)`` in x's dtype (the autocast dtype under autocast, as ``nn.Linear`` gives).

    ``gelu(z) = z * (1 + erf(z / sqrt 2)) / 2``, as ``nn.GELU()`` (``approximate="none"``).
    """
    out_dtype = _output_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        z = F.linear(x.float(), weight.float(), bias.float())  # (..., F) fp32
        out = F.gelu(z, approximate="none")  # (..., F) fp32
    return out.to(out_dtype)


def linear_gelu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))``, as ``nn.Linear`` then ``nn.GELU()``: on CUDA the bias rides in
    cuBLAS's GEMM epilogue, then one GELU pass; its backward is GELU's backward, then the bias gradient's
    row sum in a separate reduction."""
    return F.gelu(F.linear(x, weight, bias), approximate="none")


def _triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from fastmae.kernels.linear_gelu import bias_gelu_triton

    hidden = F.linear(x, weight)  # (..., F): cuBLAS without the bias (the autocast dtype under autocast)
    return bias_gelu_triton(hidden, bias)  # (..., F) in hidden's dtype


def _triton_supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    reason = triton_why_not(x, weight, bias)
    if reason is not None:
        return reason
    if weight.shape[0] == 0:
        return f"the Triton linear_gelu needs at least one output feature, got weight {tuple(weight.shape)}"
    return None


LINEAR_GELU = Op(
    "linear_gelu",
    [  # priority: a ViT-L step measured 19% faster with torch's GELU than with the triton kernel on an H200
        # (bench/results/): its backward's bias reduction is the slow part
        Backend("torch", linear_gelu_torch),
        Backend("triton", _triton, available=kernel_module_available("linear_gelu"), supports=_triton_supports,
                auto_devices=("cuda",)),
        Backend("reference", linear_gelu_reference),
    ],
)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """``x (..., Din)``, ``weight (F, Din)``, ``bias (F,)`` (an ``nn.Linear``'s) -> ``gelu(x @ weight^T + bias)
    (..., F)`` with the exact (erf) GELU, in x's dtype (the autocast dtype under autocast)."""
    check_tensor("x", x, floating=True)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (..., Din), got a scalar")
    check_tensor("weight", weight, ndim=2, floating=True, shape=(None, x.shape[-1]))
    check_tensor("bias", bias, ndim=1, floating=True, shape=(weight.shape[0],))
    check_same_device(x=x, weight=weight, bias=bias)
    if not autocast_enabled(x.device.type) and not x.dtype == weight.dtype == bias.dtype:
        raise TypeError(f"x, weight and bias must share a dtype outside autocast (as for F.linear), got "
                        f"{x.dtype}, {weight.dtype}, {bias.dtype}")
    return LINEAR_GELU(x, weight, bias, backend=backend)
