"""unshuffle: the decoder input -- visible tokens back in patch order, mask tokens elsewhere, pos added."""

from __future__ import annotations

import torch

from fastmae.kernels._common import kernel_module_available, triton_why_not
from fastmae.ops._checks import check_same_device, check_tensor
from fastmae.ops.dispatch import Backend, Op


def unshuffle_reference(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The spec. ``x (N, 1+K, Dd)`` (cls first, kept tokens in ``ids_keep`` order),
    ``ids_restore (N, L)``, ``mask_token (1, 1, Dd)``, ``pos_embed (1, L+1, Dd)`` -> ``(N, L+1, Dd)``.

    As the official code: append ``L-K`` copies of the mask token, gather by ``ids_restore``,
    put cls back in front, add the decoder's pos table to every token (cls, visible and mask).
    """
    n, s, dd = x.shape
    num_patches = ids_restore.shape[1]
    mask_tokens = mask_token.expand(n, num_patches + 1 - s, dd)  # (N, L-K, Dd)
    shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd): kept, then removed
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # (N, L, Dd)
    tokens = torch.cat([x[:, :1], restored], dim=1)  # (N, L+1, Dd)
    return tokens + pos_embed


def _triton_supports(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> str | None:
    reason = triton_why_not(x, ids_restore, mask_token, pos_embed)
    if reason is not None:
        return reason
    if pos_embed.requires_grad:
        return "pos_embed requires grad, but the Triton kernel treats it as a fixed table (no gradient)"
    if x.shape[0] > 65535:  # CUDA's limit on grid dimension z
        return f"batch {x.shape[0]} > 65535 (the kernels' grid carries the batch in dimension z)"
    return None


def _triton(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    from fastmae.kernels.unshuffle import unshuffle_triton

    return unshuffle_triton(x, ids_restore, mask_token, pos_embed)


UNSHUFFLE = Op(
    "unshuffle",
    [
        Backend("triton", _triton, available=kernel_module_available("unshuffle"), supports=_triton_supports, auto_devices=("cuda",)),
        Backend("reference", unshuffle_reference),
    ],
)


def unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x (N, 1+K, Dd)`` -> decoder input ``(N, L+1, Dd)``; see the reference."""
    check_tensor("x", x, ndim=3, floating=True)
    n, s, dd = x.shape
    check_tensor("ids_restore", ids_restore, ndim=2, integer=True, shape=(n, None))
    num_patches = ids_restore.shape[1]
    if not 1 < s <= num_patches + 1:
        raise ValueError(f"x must hold cls plus 1..L={num_patches} kept tokens, got {s} tokens")
    check_tensor("mask_token", mask_token, shape=(1, 1, dd))
    check_tensor("pos_embed", pos_embed, ndim=3, shape=(1, num_patches + 1, dd))
    check_same_device(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    return UNSHUFFLE(x, ids_restore, mask_token, pos_embed, backend=backend)
