"""masked_mse: the MAE loss -- mean over removed patches of the per-patch MSE, optional per-patch norm."""

from __future__ import annotations

import torch

from fastmae.kernels._common import kernel_module_available, triton_why_not
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops.dispatch import Backend, Op
from fastmae.patchify import patchify


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


def _triton(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> torch.Tensor:
    from fastmae.kernels.masked_mse import masked_mse_triton

    return masked_mse_triton(pred, imgs, mask, patch_size, norm_pix, eps)


def _triton_supports(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6
) -> str | None:
    from fastmae.kernels.masked_mse import MAX_BLOCK_P

    reason = triton_why_not(pred, imgs, mask)
    if reason is not None:
        return reason
    if not mask.is_floating_point():
        return f"the Triton masked_mse takes a floating-point mask, got {mask.dtype}"
    if torch.is_grad_enabled() and (imgs.requires_grad or mask.requires_grad):
        return "the Triton masked_mse gives no gradient for imgs or mask (requires_grad is set on one)"
    if pred.shape[-1] > MAX_BLOCK_P:
        return f"the Triton masked_mse holds a patch in registers: P = {pred.shape[-1]} > {MAX_BLOCK_P}"
    return None


MASKED_MSE = Op(
    "masked_mse",
    [
        Backend("triton", _triton, available=kernel_module_available("masked_mse"), supports=_triton_supports, auto_devices=("cuda",)),
        Backend("reference", masked_mse_reference),
    ],
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
    """Scalar MAE loss over the removed patches; see the reference."""
    check_tensor("imgs", imgs, ndim=4, floating=True)
    n, c, hh, ww = imgs.shape
    if not isinstance(patch_size, int) or patch_size < 1 or hh % patch_size or ww % patch_size:
        raise ValueError(f"patch_size must be a positive int dividing H={hh} and W={ww}, got {patch_size!r}")
    num_patches = (hh // patch_size) * (ww // patch_size)
    check_tensor("pred", pred, ndim=3, floating=True, shape=(n, num_patches, patch_size * patch_size * c))
    check_tensor("mask", mask, ndim=2, shape=(n, num_patches))
    check_same_device(pred=pred, imgs=imgs, mask=mask)
    return MASKED_MSE(pred, imgs, mask, patch_size, bool(norm_pix), float(eps), backend=backend)
