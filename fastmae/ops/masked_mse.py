"""masked_mse: the MAE loss -- mean over removed patches of the per-patch MSE, optional per-patch norm."""

from __future__ import annotations

import torch

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


MASKED_MSE = Op("masked_mse", [Backend("reference", masked_mse_reference)])


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
