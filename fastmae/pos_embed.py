"""Fixed 2-D sin-cos positional embeddings, as in the official MAE, and their interpolation.

Layout of a table for a ``grid_h x grid_w`` patch grid and width ``dim`` (row 0 is the cls token,
all zeros; token ``1 + i * grid_w + j`` is the patch in row ``i``, column ``j``):

    channels [0, dim/2)      encode the column index j: [sin(j * omega), cos(j * omega)]
    channels [dim/2, dim)    encode the row index i:    [sin(i * omega), cos(i * omega)]
    omega_k = 1 / 10000 ** (k / (dim / 4)),  k = 0 .. dim/4 - 1

Computed in float64 and returned as float32, exactly like the official numpy code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``positions (M,)`` float64 -> ``(M, dim)`` float64 table ``[sin(pos * omega), cos(pos * omega)]``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """``(grid_h * grid_w [+1], dim)`` float32 table for a ``grid_h x grid_w`` grid (cls row first, zeros)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # (gh*gw,) i
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # (gh*gw,) j
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (gh*gw, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)  # (1+gh*gw, dim)
    return table.float()


def grid_for(num_patches: int, aspect: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The ``(rows, cols)`` grid of ``num_patches`` cells: square, else of the ``aspect`` ratio; None if neither."""
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    if aspect is not None:
        scale = math.sqrt(num_patches / (aspect[0] * aspect[1]))
        rows, cols = round(aspect[0] * scale), round(aspect[1] * scale)
        if rows * cols == num_patches:
            return rows, cols
    return None


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize ``pos_embed (1, 1 + gh0*gw0, D)`` to ``(1, 1 + gh*gw, D)`` for ``grid = (gh, gw)``.

    The cls row is kept; the patch rows are resized bicubically as a ``(D, gh0, gw0)`` image, the way
    the official fine-tuning code adapts checkpoints to a new resolution. ``old_grid`` defaults to
    a square grid, else one of the new grid's aspect ratio; otherwise it must be given.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, 1 + L, D), got {tuple(pos_embed.shape)}")
    num_old = pos_embed.shape[1] - 1
    if old_grid is None:
        old_grid = grid_for(num_old, aspect=grid)
        if old_grid is None:
            raise ValueError(
                f"cannot infer the grid of a pos_embed with {num_old} patch rows (neither a square nor the "
                f"aspect ratio of {tuple(grid)}); pass old_grid=(rows, cols)"
            )
    if old_grid[0] * old_grid[1] != num_old:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells, pos_embed has {num_old} rows")
    if tuple(old_grid) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[2]
    patches = pos_embed[:, 1:].reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, gh0, gw0)
    patches = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)  # (1, gh*gw, D)
    return torch.cat([pos_embed[:, :1], patches.to(pos_embed.dtype)], dim=1)
