"""layer_norm: LayerNorm over the last dimension, optionally fused with the residual add before it."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastmae.ops._cases import randn
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops._kernels import FLOAT_DTYPES, kernel, triton_available, triton_devices
from fastmae.ops.dispatch import Backend, Case, Op

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


# ---- the kernels' op: one schema, fake and autograd (the triton backend's kernels) ----

@torch.library.custom_op("fastmae::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (..., D)``, ``weight (D,)``, ``bias (D,)``, optional ``residual`` shaped as x -> ``(out (..., D),
    x + residual (..., D)`` or an empty placeholder ``(0,)``, ``mean (...)``, ``rstd (...))``; out and the sum in
    the promotion of x's and residual's dtypes, mean and rstd fp32 (kept for the backward)."""
    return kernel(backend, "layer_norm", "layer_norm")(x, weight, bias, eps, residual)


@layer_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None,
      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    total = x.new_empty(x.shape if residual is not None else (0,), dtype=dtype)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=dtype), total, stats, torch.empty_like(stats)


@torch.library.custom_op("fastmae::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad_out: torch.Tensor, grad_sum: torch.Tensor | None, total: torch.Tensor,
                           weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, bias_dtype: torch.dtype,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad_out (..., D)``, optional ``grad_sum (..., D)`` (the sum's gradient), the normalised input
    ``total (..., D)``, ``weight (D,)``, ``mean``/``rstd (...)`` fp32 -> ``(grad_total (..., D)`` in total's dtype,
    ``grad_weight (D,)`` in weight's dtype, ``grad_bias (D,)`` in ``bias_dtype``)."""
    return kernel(backend, "layer_norm", "layer_norm_backward")(grad_out, grad_sum, total, weight, mean, rstd,
                                                                bias_dtype)


@layer_norm_backward_op.register_fake
def _(grad_out: torch.Tensor, grad_sum: torch.Tensor | None, total: torch.Tensor, weight: torch.Tensor,
      mean: torch.Tensor, rstd: torch.Tensor, bias_dtype: torch.dtype,
      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(total), torch.empty_like(weight), weight.new_empty(weight.shape, dtype=bias_dtype)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                   output: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    x, weight, bias, _, residual, backend = inputs
    _, total, mean, rstd = output
    sum_has_grad = residual is not None and (x.requires_grad or residual.requires_grad)
    ctx.mark_non_differentiable(mean, rstd, *([] if sum_has_grad else [total]))  # as the reference's x + residual
    ctx.set_materialize_grads(False)  # an unused sum brings no gradient: nothing to read
    ctx.save_for_backward(x if residual is None else total, weight, mean, rstd)
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, bias.dtype)
    ctx.backend = backend


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor | None,
              grad_sum: torch.Tensor | None, _grad_mean: None, _grad_rstd: None) -> tuple:
    total, weight, mean, rstd = ctx.saved_tensors
    x_dtype, residual_dtype, bias_dtype = ctx.dtypes
    if grad_out is None:  # only the returned sum was used
        grad_total, grad_weight, grad_bias = grad_sum, None, None
    else:
        grad_total, grad_weight, grad_bias = layer_norm_backward_op(grad_out, grad_sum, total, weight, mean, rstd,
                                                                    bias_dtype, ctx.backend)
    needs = ctx.needs_input_grad  # x, weight, bias, eps, residual, backend
    return (grad_total.to(x_dtype) if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None,
            grad_total.to(residual_dtype) if needs[4] else None,
            None)


layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _layer_norm_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                        residual: torch.Tensor | None = None, *, backend: str) -> LayerNormOut:
    out, total, _, _ = layer_norm_op(x, weight, bias, eps, residual, backend)
    return out if residual is None else (out, total)


def _triton_limits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                   residual: torch.Tensor | None = None) -> str | None:
    if x.ndim == 0 or x.shape[-1] == 0:
        return f"the triton layer_norm needs a non-empty last dimension, got shape {tuple(x.shape)}"
    from fastmae.kernels.layer_norm import MAX_D

    if x.shape[-1] > MAX_D:
        return f"the triton layer_norm holds a row in registers: D = {x.shape[-1]} > {MAX_D}"
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


def _case(rows: int, width: int, residual: bool) -> Callable[..., tuple]:
    """``(x (N, rows, D), weight (D,), bias (D,), eps, residual (N, rows, D) or None)``."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        x = randn(batch, rows, width, seed=1, device=device, dtype=dtype)
        res = randn(batch, rows, width, seed=4, device=device, dtype=dtype) if residual else None
        return (x, 1 + randn(width, seed=2, device=device, dtype=dtype) / 4,
                randn(width, seed=3, device=device, dtype=dtype) / 4, 1e-6, res)

    return make


def _min_bytes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
               residual: torch.Tensor | None = None) -> int:
    """x (and residual) in, the output (and the sum) out, the parameters."""
    streams = 2 if residual is None else 4
    return streams * x.numel() * x.element_size() + 2 * weight.numel() * weight.element_size()


LAYER_NORM_CASES = (Case("50x48", _case(50, 48, False), batch=3, grad=("x", "weight", "bias")),
                   Case("50x48-residual", _case(50, 48, True), batch=3, grad=("x", "weight", "bias", "residual")),
                   Case("65x1280-residual", _case(65, 1280, True), batch=1, grad=("x", "weight", "bias", "residual")),
                   Case("7x100", _case(7, 100, False), batch=2, grad=("x", "weight", "bias")))

LAYER_NORM = Op(
    "layer_norm",
    [  # priority: apex when installed (issue 5), but not under torch.compile, where torch's LayerNorm fuses with
        # the residual add and the cast (fastmae.benchmark.fusion); torch's kernel measured 2x faster than the
        # triton one on an H200, and a ViT-L step 22% faster with it (bench/results/)
        Backend("apex", _apex, available=_apex_available, supports=_apex_supports, auto_devices=("cuda",),
                auto_compiled=False),
        Backend("torch", layer_norm_torch),
        Backend("triton", functools.partial(_layer_norm_kernels, backend="triton"),
                available=triton_available("layer_norm"), supports=_triton_limits, devices=triton_devices(),
                dtypes=FLOAT_DTYPES, auto_devices=("cuda",)),
        Backend("reference", layer_norm_reference),
    ],
    cases=LAYER_NORM_CASES, benchmark=Case("vit-b-encoder", _case(50, 768, False)), min_bytes=_min_bytes,
    kernel_op=layer_norm_op,
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
