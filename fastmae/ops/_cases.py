"""Deterministic inputs for the ops' :class:`~fastmae.ops.dispatch.Case` definitions (tests and benchmarks)."""

from __future__ import annotations

import torch


def randn(*shape: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal values of ``shape``, the same for a seed on every device (drawn on the CPU)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def rand(*shape: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform ``[0, 1)`` values of ``shape``, the same for a seed on every device (drawn on the CPU)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def masking(n: int, num_patches: int, len_keep: int, seed: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids_keep (N, K)``, ``ids_restore (N, L)`` int64 and ``mask (N, L)`` fp32 of a random shuffle."""
    ids_shuffle = rand(n, num_patches, seed=seed, device=torch.device("cpu")).argsort(dim=1)  # (N, L)
    ids_restore = ids_shuffle.argsort(dim=1)  # (N, L)
    mask = (ids_restore >= len_keep).float()  # (N, L)
    return ids_shuffle[:, :len_keep].to(device), ids_restore.to(device), mask.to(device)
