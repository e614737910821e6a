"""linear_gelu: ``gelu(x @ weight^T + bias)`` with the exact (erf) GELU -- the MLP's fc1 and its activation."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastmae.ops._cases import randn
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops._kernels import FLOAT_DTYPES, autocast_enabled, kernel, triton_available, triton_devices
from fastmae.ops.dispatch import Backend, Case, Op


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


# ---- the kernels' op: the bias + GELU around cuBLAS's GEMM; one schema, fake and autograd ----

@torch.library.custom_op("fastmae::bias_gelu", mutates_args=())
def bias_gelu_op(x: torch.Tensor, bias: torch.Tensor, backend: str) -> torch.Tensor:
    """``x (..., F)`` (the GEMM's output without its bias), ``bias (F,)`` -> ``gelu(x + bias) (..., F)`` in x's
    dtype."""
    return kernel(backend, "linear_gelu", "bias_gelu")(x, bias)


@bias_gelu_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor, backend: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("fastmae::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad (..., F)`` of the output, ``x (..., F)``, ``bias (F,)`` -> ``(grad_x (..., F)`` in x's dtype,
    ``grad_bias (F,)`` in the bias's dtype); ``x + bias`` is recomputed."""
    return kernel(backend, "linear_gelu", "bias_gelu_backward")(grad, x, bias)


@bias_gelu_backward_op.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, bias, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.backend = backend


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = bias_gelu_backward_op(grad, x, bias, ctx.backend)
    needs = ctx.needs_input_grad  # x, bias, backend
    return grad_x if needs[0] else None, grad_bias if needs[1] else None, None


bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def _linear_gelu_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: str) -> torch.Tensor:
    hidden = F.linear(x, weight)  # (..., F): cuBLAS without the bias (the autocast dtype under autocast)
    return bias_gelu_op(hidden, bias, backend)  # (..., F) in hidden's dtype


# ---- the triton-gemm backend's op: the GEMMs themselves, bias + GELU (and GELU') fused into them ----

@torch.library.custom_op("fastmae::linear_gelu", mutates_args=())
def linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., Din)``, ``weight (F, Din)`` in x's dtype, ``bias (F,)`` -> ``(out, gate)``, both ``(..., F)`` in x's
    dtype: ``out = gelu(z)``, ``gate = gelu'(z)`` (``z = x @ weight^T + bias``), which the backward reads instead
    of ``z`` (not differentiable)."""
    return kernel(backend, "linear_gelu", "linear_gelu")(x, weight, bias)


@linear_gelu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))  # (..., F), contiguous as the kernels' outputs
    return out, torch.empty_like(out)


@torch.library.custom_op("fastmae::linear_gelu_backward", mutates_args=())
def linear_gelu_backward_op(grad: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad (..., F)`` of out, ``gate (..., F)`` (the forward's), ``x (..., Din)``, ``weight (F, Din)``, ``bias
    (F,)`` -> ``(grad_x (..., Din)``, ``grad_weight (F, Din)`` in x's dtype, ``grad_bias (F,)`` in the bias's
    dtype)."""
    return kernel(backend, "linear_gelu", "linear_gelu_backward")(grad, gate, x, weight, bias)


@linear_gelu_backward_op.register_fake
def _(grad: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(weight.shape), bias.new_empty(bias.shape)  # contiguous


def _gemm_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, backend = inputs
    _, gate = output
    ctx.mark_non_differentiable(gate)
    ctx.save_for_backward(gate, x, weight, bias)
    ctx.backend = backend


def _gemm_backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _grad_gate: torch.Tensor) -> tuple:
    gate, x, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = linear_gelu_backward_op(grad, gate, x, weight, bias, ctx.backend)
    needs = ctx.needs_input_grad  # x, weight, bias, backend
    return (grad_x if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None,
            None)


linear_gelu_op.register_autograd(_gemm_backward, setup_context=_gemm_setup_context)


def _linear_gelu_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Under autocast x and weight go to the autocast dtype, as F.linear casts them; the bias keeps its dtype
    (the epilogue adds it in fp32), as in the triton backend."""
    dtype = _output_dtype(x)
    out, _ = linear_gelu_op(x.to(dtype), weight.to(dtype), bias, backend)  # (..., F) in dtype
    return out


def _named_only(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """never (named only: not yet measured faster than cuBLAS + the fused elementwise kernels on a GPU)."""
    return False


def _triton_limits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    if weight.shape[0] == 0:
        return f"the triton linear_gelu needs at least one output feature, got weight {tuple(weight.shape)}"
    return None


def _case(rows: int, d_in: int, d_out: int) -> Callable[..., tuple]:
    """``(x (N, rows, Din), weight (F, Din), bias (F,))``: an MLP's fc1."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        return (randn(batch, rows, d_in, seed=1, device=device, dtype=dtype),
                randn(d_out, d_in, seed=2, device=device, dtype=dtype) / d_in**0.5,
                randn(d_out, seed=3, device=device, dtype=dtype))

    return make


def _min_bytes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> int:
    """Forward + backward of the bias + GELU around the GEMMs, fused: h in, out out; g and h in, dh out; the bias
    and its gradient (the GEMMs' own traffic is FLOPs, not bytes)."""
    hidden = x.numel() // x.shape[-1] * weight.shape[0]
    return 5 * hidden * x.element_size() + 2 * bias.numel() * bias.element_size()


def _matmul_flops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> int:
    """The three GEMMs of forward + backward: ``x @ W^T``, ``dx = dh @ W``, ``dW = dh^T @ x``."""
    return 3 * 2 * (x.numel() // x.shape[-1]) * weight.numel()


LINEAR_GELU_CASES = (Case("50x48-192", _case(50, 48, 192), batch=3, grad=("x", "weight", "bias")),
                    Case("7x33-100", _case(7, 33, 100), batch=2, grad=("x", "weight", "bias")))

LINEAR_GELU = Op(
    "linear_gelu",
    [  # priority: a ViT-L step measured 19% faster with torch's GELU than with the triton kernel on an H200
        # (bench/results/): its backward's bias reduction is the slow part
        Backend("torch", linear_gelu_torch),
        Backend("triton", functools.partial(_linear_gelu_kernels, backend="triton"),
                available=triton_available("linear_gelu"), supports=_triton_limits, devices=triton_devices(),
                dtypes=FLOAT_DTYPES, auto_devices=("cuda",)),
        # Triton GEMMs with the bias, GELU and GELU' fused in (kernels/linear_gelu_gemm.py): it moves fewer bytes
        # but its GEMMs have not been timed against cuBLAS, so the priority list never picks it (auto_when)
        Backend("triton-gemm", functools.partial(_linear_gelu_gemm, backend="triton-gemm"),
                available=triton_available("linear_gelu_gemm"), devices=triton_devices(), dtypes=FLOAT_DTYPES,
                auto_when=_named_only),
        Backend("reference", linear_gelu_reference),
    ],
    cases=LINEAR_GELU_CASES, benchmark=Case("vit-l-fc1", _case(50, 1024, 4096), grad=("x", "weight", "bias")),
    min_bytes=_min_bytes, matmul_flops=_matmul_flops,
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
