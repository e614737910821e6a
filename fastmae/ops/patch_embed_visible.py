"""patch_embed_visible: embed only the kept patches, read straight from the image, plus their pos rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.kernels._common import autocast_enabled, kernel_module_available, triton_why_not
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops.dispatch import Backend, Op


def patch_embed_visible_reference(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The spec. ``imgs (N, C, H, W)``, ``ids_keep (N, K)``, ``weight (D, C, p, p)`` (the Conv2d's),
    ``bias (D,)``, ``pos_embed (1, L+1, D)`` -> ``(N, K, D)``.

    Equal to the official ``conv(imgs) + pos_embed[:, 1:]`` followed by the gather of the kept
    tokens, computed only for the kept patches.
    """
    n, c, hh, ww = imgs.shape
    d, p = weight.shape[0], weight.shape[-1]
    h, w = hh // p, ww // p
    patches = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, q)
    patches = patches.reshape(n, h * w, c * p * p)  # (N, L, C*p*p), the conv weight's (c, p, q) order
    kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, c * p * p))  # (N, K, C*p*p)
    tokens = F.linear(kept, weight.reshape(d, c * p * p), bias)  # (N, K, D)
    return tokens + pos_embed[0, 1:][ids_keep]  # (N, K, D) + (N, K, D)


def _triton_supports(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> str | None:
    reason = triton_why_not(imgs, ids_keep, weight, bias, pos_embed)
    if reason is not None:
        return reason
    if torch.is_grad_enabled() and imgs.requires_grad:
        return "the triton backend gives no gradient for imgs (imgs.requires_grad is set)"
    if torch.is_grad_enabled() and pos_embed.requires_grad:
        return "the triton backend gives no gradient for pos_embed (pos_embed.requires_grad is set)"
    device_type = imgs.device.type
    autocast = autocast_enabled(device_type)
    if not autocast and not imgs.dtype == weight.dtype == bias.dtype:
        return (f"imgs, weight and bias must share a dtype outside autocast (as for F.linear), got "
                f"{imgs.dtype}, {weight.dtype}, {bias.dtype}")
    return None


def _triton(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    from fastmae.kernels.patch_embed_visible import patch_embed_visible_triton

    return patch_embed_visible_triton(imgs, ids_keep, weight, bias, pos_embed)


PATCH_EMBED_VISIBLE = Op(
    "patch_embed_visible",
    [
        Backend("triton", _triton, available=kernel_module_available("patch_embed_visible"),
                supports=_triton_supports, auto_devices=("cuda",)),
        Backend("reference", patch_embed_visible_reference),
    ],
)


def patch_embed_visible(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``(N, C, H, W)`` images and ``ids_keep (N, K)`` -> kept patch tokens ``(N, K, D)`` with pos added."""
    check_tensor("imgs", imgs, ndim=4, floating=True)
    check_tensor("weight", weight, ndim=4, floating=True)
    d, c, p, q = weight.shape
    n, _, hh, ww = imgs.shape
    if p != q or imgs.shape[1] != c or hh % p or ww % p:
        raise ValueError(
            f"imgs (N, C={c}, H, W) with H and W multiples of the patch size {p} expected for a weight of "
            f"shape {tuple(weight.shape)}, got imgs {tuple(imgs.shape)}"
        )
    num_patches = (hh // p) * (ww // p)
    check_tensor("ids_keep", ids_keep, ndim=2, integer=True, shape=(n, None))
    check_tensor("bias", bias, shape=(d,))
    check_tensor("pos_embed", pos_embed, ndim=3, shape=(1, num_patches + 1, d))
    check_same_device(imgs=imgs, ids_keep=ids_keep, weight=weight, pos_embed=pos_embed)
    return PATCH_EMBED_VISIBLE(imgs, ids_keep, weight, bias, pos_embed, backend=backend)
