"""Argument checks shared by the ops' public functions: clear errors instead of shape crashes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(
    name: str,
    t: object,
    ndim: int | None = None,
    floating: bool = False,
    integer: bool = False,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming what was expected and what was given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if integer and t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if shape is not None and any(e is not None and e != g for e, g in zip(shape, t.shape)):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} must have shape ({want}{',' if len(shape) == 1 else ''}), got {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
