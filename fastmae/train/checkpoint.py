"""Checkpoints that are never half-written: temporary file, fsync, atomic rename; keep the last k.

Files are ``<dir>/ckpt-<step:08d>.pt``; a crash mid-save leaves only a ``.tmp`` file, which is
ignored. Loading uses ``weights_only=True`` (no arbitrary unpickling) and falls back to the
previous checkpoint when the newest cannot be read.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; delete all but the newest ``keep_last``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    return final


def load_latest_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint ``(path, state)``, or ``None`` when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say so and use the one before
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}", stacklevel=2)
    return None
