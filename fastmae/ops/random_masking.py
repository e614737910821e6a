"""random_masking: per-sample shuffle of the patches, keeping the ``len_keep`` with the smallest noise."""

from __future__ import annotations

import torch

from fastmae.ops._checks import check_tensor
from fastmae.ops.dispatch import Backend, Op


def random_masking_reference(
    noise: torch.Tensor, len_keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec. ``noise (N, L)`` -> ``ids_keep (N, K)``, ``ids_restore (N, L)`` int64, ``mask (N, L)`` float32.

    ``ids_keep`` lists the kept patches by ascending noise (as the official code gathers them);
    ``mask`` is 0 for kept and 1 for removed, in patch order; ``ids_restore`` is the inverse of the
    shuffle, so that ``cat([kept, removed])[ids_restore]`` is back in patch order.
    """
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # (N, L): ascending noise, kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)  # (N, L): inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
    mask = (ids_restore >= len_keep).to(torch.float32)  # (N, L): 1 = removed
    return ids_keep, ids_restore, mask


RANDOM_MASKING = Op("random_masking", [Backend("reference", random_masking_reference)])


def random_masking(
    noise: torch.Tensor, len_keep: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``noise (N, L)`` -> ``(ids_keep (N, K), ids_restore (N, L), mask (N, L))``; see the reference."""
    check_tensor("noise", noise, ndim=2, floating=True)
    if not isinstance(len_keep, int) or not 0 < len_keep <= noise.shape[1]:
        raise ValueError(f"len_keep must be an int in [1, L={noise.shape[1]}], got {len_keep!r}")
    return RANDOM_MASKING(noise, len_keep, backend=backend)
