"""Where the benchmark's batches come from: ``synthetic`` (one batch already on the device, reused,
which isolates the model) or the pretraining loader end to end (``fastmae.data.pretrain_loader``
decoding a JPEG folder: ``loader`` with its default backend, DALI when installed, or ``loader-dali`` /
``loader-torch`` to name one). Every mode gives ``(N, 3, S, S)`` float32 batches on the device, as the
trainer's loader does (one process, no FSDP), and feeds the same ``TrainStep``: a loader row and a
synthetic row of one implementation differ only in where the images come from.

``BatchSource.detail`` is the line a results row keeps in ``input_detail``: which input it had (the
loader's backend, decode device, workers, image count and folder).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

INPUT_MODES = ("synthetic", "loader", "loader-dali", "loader-torch")
LOADER_BACKEND = {"loader": "auto", "loader-dali": "dali", "loader-torch": "torch"}  # input mode -> loader backend
DEMO_CROPS_STEP = 64  # the generated set grows in steps of 64 crops per photo, so sizes repeat (and are cached)


def default_loader_workers() -> int:
    """One worker per core, leaving one core to the training process, at most 16."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def input_unavailable_reason(mode: str) -> str | None:
    """Why input ``mode`` cannot run here (``loader-dali`` without DALI installed), or ``None``."""
    if mode not in INPUT_MODES:
        raise ValueError(f"input mode must be one of {INPUT_MODES}, got {mode!r}")
    if mode == "loader-dali":
        from fastmae.data.loader import dali_available

        if not dali_available():
            return "input loader-dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"
    return None


class BatchSource:
    """``source()`` -> the next ``(N, 3, S, S)`` batch on the device; ``close()`` stops loader workers."""

    def __init__(self, mode: str, batch_size: int, img_size: int, device: torch.device, batches_needed: int,
                 data_dir: Path | None = None, workers: int | None = None) -> None:
        reason = input_unavailable_reason(mode)
        if reason is not None:
            raise ValueError(reason)
        self._batch: torch.Tensor | None = None
        self._loader = None
        if mode == "synthetic":
            generator = torch.Generator(device).manual_seed(0)
            self._batch = torch.randn(batch_size, 3, img_size, img_size, device=device, generator=generator)
            self.detail = f"synthetic: one random ({batch_size}, 3, {img_size}, {img_size}) batch on {device}, reused"
        else:
            from fastmae.data.loader import pretrain_loader  # torchvision and PIL only when a loader is used

            root = data_dir if data_dir is not None else self.demo_root(batch_size * batches_needed)
            self._loader = pretrain_loader(root, batch_size, img_size, backend=LOADER_BACKEND[mode], device=device,
                                           num_workers=default_loader_workers() if workers is None else workers)
            self.detail = f"{self._loader.describe()}; from {root}"

    @staticmethod
    def demo_root(num_images: int) -> Path:
        """The demo JPEG set with at least ``num_images`` images (one epoch covers the whole row)."""
        from fastmae.data.demo import DEMO_PHOTOS, demo_dataset

        per_photo = DEMO_CROPS_STEP * math.ceil(num_images / len(DEMO_PHOTOS) / DEMO_CROPS_STEP)
        return demo_dataset(crops_per_photo=per_photo)

    def __call__(self) -> torch.Tensor:
        if self._batch is not None:
            return self._batch
        return next(self._loader)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()  # ends the generator, which drops the DataLoader and its workers
            self._loader = None
        self._batch = None
