"""The torch ``DataLoader`` pretraining input pipeline (PIL decode on CPU workers).

Augmentation as the official MAE pretraining: RandomResizedCrop to ``img_size`` with scale
0.2–1.0 and ratio 3/4–4/3 (bicubic), horizontal flip with p = 0.5, ImageNet mean/std. Batches
arrive on ``device`` in ``dtype``. The order is a function of ``(seed, epoch)``; each rank reads a
disjoint shard. A file that cannot be decoded stops the run with an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file below ``root`` (an ImageFolder tree or a flat folder), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data root must be a folder of images (ImageFolder tree), got {str(root)!r}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found below {str(root)!r}")
    return files


def pretrain_transform(img_size: int) -> transforms.Compose:
    """PIL image -> normalised ``(3, img_size, img_size)`` float tensor, the MAE pretraining augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(img_size: int) -> transforms.Compose:
    """PIL image -> normalised ``(3, img_size, img_size)``: bicubic resize of the short side, center crop."""
    return transforms.Compose([
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageFiles(Dataset):
    """Decoded, augmented images from a list of files; decode failures name the file."""

    def __init__(self, files: list[Path], transform: transforms.Compose) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:  # PIL raises several types for bad files
            raise RuntimeError(f"cannot decode image {str(path)!r}: {exc}") from exc
        return self.transform(img)  # (3, S, S)


def pretrain_loader(
    root: str | os.PathLike,
    batch_size: int,
    img_size: int = 224,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    start_epoch: int = 0,
) -> Iterator[torch.Tensor]:
    """Endless iterator of ``(batch_size, 3, img_size, img_size)`` batches, epoch after epoch.

    Epoch ``e`` is shuffled with ``seed + e`` (augmentations too), sharded by ``rank``; the last
    incomplete batch of an epoch is dropped.
    """
    files = list_images(root)
    if len(files) < batch_size * world_size:
        raise ValueError(f"{len(files)} images below {str(root)!r} cannot fill one batch of {batch_size} "
                         f"on each of {world_size} ranks")
    dataset = ImageFiles(files, pretrain_transform(img_size))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    device = torch.device(device)
    epoch = start_epoch
    while True:
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # seeds the workers' augmentations
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            drop_last=True, generator=generator, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        for batch in loader:
            yield batch.to(device, dtype, non_blocking=True)
        epoch += 1
