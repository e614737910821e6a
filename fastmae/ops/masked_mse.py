"""masked_mse: the MAE loss -- mean over removed patches of the per-patch MSE, optional per-patch norm.

The op's one definition: the reference (the spec), the custom ops ``fastmae::masked_mse`` and
``fastmae::masked_mse_backward`` (one schema, fake and autograd for the triton and cuda kernels), the
backends' support rules, and the public function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fastmae.ops._cases import masking, randn
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops._kernels import (CUDA_DEVICES, FLOAT_DTYPES, autocast_enabled, cuda_available, kernel,
                                  triton_available, triton_devices)
from fastmae.ops.dispatch import Backend, Case, Op
from fastmae.patchify import patchify

MAX_CUDA_P = 4096  # csrc/masked_mse.cu holds a patch in registers: 8 warps x 16 values per thread
INT32_SPAN = 2**31  # csrc/masked_mse.cu indexes within a patch of imgs in 32 bits


def masked_mse_reference(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> torch.Tensor:
    """The spec. ``pred (N, L, P)``, ``imgs (N, C, H, W)``, ``mask (N, L)`` (1 = removed) -> scalar.

    With ``norm_pix`` the target patch is ``(t - mean) / sqrt(var + eps)`` with the *unbiased*
    variance over the patch's ``P`` values. As in the official code the result is
    ``sum(per_patch_mse * mask) / sum(mask)``: NaN when no patch is removed.
    """
    target = patchify(imgs, patch_size)  # (N, L, P)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
        var = target.var(dim=-1, keepdim=True)  # (N, L, 1), unbiased
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()


# ---- the kernels' op: one schema, fake and autograd for every kernel backend ----

def _loss_dtype(pred: torch.dtype, imgs: torch.dtype, mask: torch.dtype) -> torch.dtype:
    """The loss dtype: the promotion of the three, which among fp32/bf16/fp16 is their common dtype or else fp32
    (plain Python: no ``torch.promote_types`` node in a traced graph)."""
    dtypes = {pred, imgs, mask}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@torch.library.custom_op("fastmae::masked_mse", mutates_args=())
def masked_mse_op(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                  eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred (N, L, P)``, ``imgs (N, C, H, W)``, ``mask (N, L)`` -> ``(loss ()`` in the promotion of the three
    dtypes, ``sum(mask) ()`` fp32, kept for the backward)."""
    return kernel(backend, "masked_mse", "masked_mse")(pred, imgs, mask, patch_size, norm_pix, eps)


@masked_mse_op.register_fake
def _(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float,
      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    loss = pred.new_empty((), dtype=_loss_dtype(pred.dtype, imgs.dtype, mask.dtype))
    return loss, pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmae::masked_mse_backward", mutates_args=())
def masked_mse_backward_op(grad_loss: torch.Tensor, mask_sum: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor,
                           mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float,
                           backend: str) -> torch.Tensor:
    """``grad_loss ()``, ``mask_sum ()`` fp32 -> ``grad_pred (N, L, P)`` contiguous, in pred's dtype (recomputed
    from pred and imgs)."""
    return kernel(backend, "masked_mse", "masked_mse_backward")(grad_loss, mask_sum, pred, imgs, mask, patch_size,
                                                                 norm_pix, eps)


@masked_mse_backward_op.register_fake
def _(grad_loss: torch.Tensor, mask_sum: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
      patch_size: int, norm_pix: bool, eps: float, backend: str) -> torch.Tensor:
    return pred.new_empty(pred.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                   output: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, imgs, mask, patch_size, norm_pix, eps, backend = inputs
    ctx.save_for_backward(pred, imgs, mask, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.args = (patch_size, norm_pix, eps, backend)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor | None, _grad_mask_sum: None) -> tuple:
    """The gradient wrt ``pred`` only; the dispatch refuses ``imgs`` and ``mask`` requiring grad (``no_grad``), and so
    does a direct call of the op."""
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("fastmae::masked_mse gives no gradient for imgs or mask; they must not require grad")
    if grad_loss is None:  # grads are not materialised: nothing flowed into the loss
        return (None,) * 7
    pred, imgs, mask, mask_sum = ctx.saved_tensors
    grad = masked_mse_backward_op(grad_loss.contiguous(), mask_sum, pred, imgs, mask, *ctx.args)
    return (grad,) + (None,) * 6


masked_mse_op.register_autograd(_backward, setup_context=_setup_context)


def _masked_mse_kernels(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                        eps: float = 1e-6, *, backend: str) -> torch.Tensor:
    """As the reference, on ``backend``'s kernels. Its loss dtype too: the promotion of the three dtypes, and fp32
    under CUDA autocast (where the reference's ``pow`` runs in fp32), which an fp32 mask gives."""
    if pred.device.type == "cuda" and autocast_enabled("cuda") and mask.dtype != torch.float32:
        mask = mask.float()
    loss, _ = masked_mse_op(pred, imgs, mask, patch_size, norm_pix, eps, backend)
    return loss


def _floating_mask(mask: torch.Tensor, backend: str) -> str | None:
    if not mask.is_floating_point():
        return f"the {backend} masked_mse takes a floating-point mask, got {mask.dtype}"
    return None


def _triton_limits(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                   eps: float = 1e-6) -> str | None:
    from fastmae.kernels.masked_mse import MAX_BLOCK_P

    if pred.shape[-1] > MAX_BLOCK_P:
        return f"the triton masked_mse holds a patch in registers: P = {pred.shape[-1]} > {MAX_BLOCK_P}"
    return _floating_mask(mask, "triton")


def _cuda_limits(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                 eps: float = 1e-6) -> str | None:
    """A floating-point mask; the CUDA kernels' limits (the CPU implementation has none): P <= 4096, a patch of imgs
    within 2^31 elements."""
    if pred.device.type == "cpu":
        return _floating_mask(mask, "cuda")
    if pred.shape[-1] > MAX_CUDA_P:
        return f"the CUDA masked_mse holds a patch in registers: P = {pred.shape[-1]} > {MAX_CUDA_P}"
    img_span = (imgs.shape[1] - 1) * imgs.stride(1) + (patch_size - 1) * (imgs.stride(2) + imgs.stride(3))
    if img_span >= INT32_SPAN:
        return f"the CUDA masked_mse indexes within a patch in 32 bits: a patch spans {img_span} >= 2^31 elements"
    return _floating_mask(mask, "cuda")


def _case(p: int, hh: int, ww: int, norm_pix: bool, channels: int = 3) -> Callable[..., tuple]:
    """``(pred (N, L, P), imgs (N, C, H, W), mask (N, L) with a quarter kept, p, norm_pix, eps)``."""

    def make(device: torch.device, dtype: torch.dtype, batch: int) -> tuple:
        num_patches, patch_len = (hh // p) * (ww // p), p * p * channels
        imgs = randn(batch, channels, hh, ww, seed=1, device=device, dtype=dtype)
        pred = randn(batch, num_patches, patch_len, seed=2, device=device, dtype=dtype)
        _, _, mask = masking(batch, num_patches, num_patches // 4, seed=3, device=device)
        return pred, imgs, mask.to(dtype), p, norm_pix, 1e-6

    return make


def _min_bytes(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, *_: object) -> int:
    """The removed patches of pred and imgs, and the mask."""
    removed = int((mask != 0).sum())
    return removed * pred.shape[-1] * (pred.element_size() + imgs.element_size()) + mask.numel() * mask.element_size()


MASKED_MSE_CASES = (Case("p16-norm", _case(16, 64, 64, True), batch=3, grad=("pred",)),
                   Case("p16", _case(16, 64, 64, False), batch=3, grad=("pred",)),
                   Case("p14-norm-56x84", _case(14, 56, 84, True), batch=2, grad=("pred",)),
                   Case("p8-gray", _case(8, 32, 48, True, channels=1), batch=1, grad=("pred",)))

MASKED_MSE = Op(
    "masked_mse",
    [  # priority: the cuda kernel measured faster than the triton one on an H200 (bench/results/)
        Backend("cuda", functools.partial(_masked_mse_kernels, backend="cuda"), available=cuda_available,
                supports=_cuda_limits, devices=CUDA_DEVICES, dtypes=FLOAT_DTYPES, no_grad=("imgs", "mask"),
                auto_devices=("cuda",)),
        Backend("triton", functools.partial(_masked_mse_kernels, backend="triton"),
                available=triton_available("masked_mse"), supports=_triton_limits, devices=triton_devices(),
                dtypes=FLOAT_DTYPES, no_grad=("imgs", "mask"), auto_devices=("cuda",)),
        Backend("reference", masked_mse_reference),
    ],
    cases=MASKED_MSE_CASES, benchmark=Case("vit-b", _case(16, 224, 224, True)), min_bytes=_min_bytes,
    kernel_op=masked_mse_op,
)


def masked_mse(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``pred (N, L, P)``, ``imgs (N, C, H, W)``, ``mask (N, L)`` (1 = removed) -> the scalar MAE loss over the
    removed patches; see the reference."""
    check_tensor("imgs", imgs, ndim=4, floating=True)
    n, c, hh, ww = imgs.shape
    if not isinstance(patch_size, int) or patch_size < 1 or hh % patch_size or ww % patch_size:
        raise ValueError(f"patch_size must be a positive int dividing H={hh} and W={ww}, got {patch_size!r}")
    num_patches = (hh // patch_size) * (ww // patch_size)
    check_tensor("pred", pred, ndim=3, floating=True, shape=(n, num_patches, patch_size * patch_size * c))
    check_tensor("mask", mask, ndim=2, shape=(n, num_patches))
    check_same_device(pred=pred, imgs=imgs, mask=mask)
    return MASKED_MSE(pred, imgs, mask, patch_size, bool(norm_pix), float(eps), backend=backend)
