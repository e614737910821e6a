"""A PIL evaluation transform and a dataset of files through it (for figures and small evaluations;
``fastmae.data.eval_loader`` is the batched loader)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from fastmae.data.images import IMAGENET_MEAN, IMAGENET_STD, open_rgb


def eval_transform(img_size: int, crop_fraction: float = 1.0) -> transforms.Compose:
    """PIL image -> normalised ``(3, img_size, img_size)``: bicubic resize of the short side to
    ``img_size / crop_fraction``, center crop of ``img_size``."""
    return transforms.Compose([
        transforms.Resize(round(img_size / crop_fraction), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageFiles(Dataset):
    """Decoded, transformed images from a list of files; decode failures name the file."""

    def __init__(self, files: list[Path], transform: transforms.Compose) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            img = open_rgb(path)
        except Exception as exc:  # PIL raises several types for bad files
            raise RuntimeError(f"cannot decode image {str(path)!r}: {exc}") from exc
        return self.transform(img)  # (3, S, S)
