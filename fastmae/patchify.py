"""Patchify and unpatchify, the official MAE element order: ``nhwpqc`` (channel fastest in a patch)."""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``imgs (N, C, H, W)`` -> ``(N, L, p*p*C)`` with ``L = (H/p) * (W/p)``, patches row-major."""
    n, c, hh, ww = imgs.shape
    p = patch_size
    h, w = hh // p, ww // p
    x = imgs.reshape(n, c, h, p, w, p)  # (N, C, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, q, C)
    return x.reshape(n, h * w, p * p * c)  # (N, L, p*p*C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int = 3) -> torch.Tensor:
    """``x (N, L, p*p*C)`` -> ``imgs (N, C, h*p, w*p)`` for ``grid = (h, w)``."""
    n = x.shape[0]
    p, (h, w) = patch_size, grid
    x = x.reshape(n, h, w, p, p, in_chans)  # (N, h, w, p, q, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, q)
    return x.reshape(n, in_chans, h * p, w * p)  # (N, C, H, W)
