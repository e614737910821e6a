"""The torch backend of the pretraining loader: PIL decode on ``DataLoader`` workers.

The batch plans (files, crop boxes, flips) come from ``EpochPlan``; the workers decode, crop,
resize (bicubic), optionally apply RandAugment (fine-tuning: timm's, from ``create_transform`` as the
official MAE fine-tuning builds it, for a policy string such as ``rand-m9-mstd0.5-inc1``, or
torchvision's for an ``(operations, magnitude)`` pair; its random draws seeded by the sample's plan),
flip, and send ``uint8`` images (a quarter of float32's bytes); the main process moves them to the
device and normalises them there. With ``labels``, batches are ``(images, labels)``.

timm's training transform is RandomResizedCrop (bicubic) + flip, RandAugment, to-tensor/normalise and
random erasing. Here the crop box and flip come from the plan instead (the same sampling, but a
function of the sample's position: exact resume, and the same crops as the DALI backend), the flip
comes after RandAugment (as on DALI; RandAugment's operations are mirror-symmetric in distribution), and
random erasing runs on the normalised batch (``fastmae.data.eval.finetune_loader``), as timm's
prefetcher does.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fastmae.data.images import IMAGENET_MEAN, IMAGENET_STD, open_rgb
from fastmae.data.loader import Batch
from fastmae.data.sampling import EpochPlan, uniforms

SampleKey = tuple[int, int, int, int, int, bool, int]  # (image id, left, top, width, height, flip, RandAugment seed)


@functools.cache
def _mean_and_inverse_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and 1/std in uint8 units, ``(1, 3, 1, 1)`` each, made once per device (a tensor
    made from a list on a GPU waits for the device)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    return mean, 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, 3, S, S)`` uint8 RGB -> ``(N, 3, S, S)`` ``dtype``, ImageNet mean/std, computed in float32."""
    mean, inv_std = _mean_and_inverse_std(images.device)
    return ((images.float() - mean) * inv_std).to(dtype)


@contextlib.contextmanager
def seeded_rngs(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Inside: Python's ``random``, numpy's global generator, torch's CPU generator and, for a CUDA ``device``, its
    generator, all seeded with ``seed``; afterwards each is as it was (the caller's streams are untouched). For
    augmentations that draw from the global generators (timm's RandAugment, RandomErasing and Mixup)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = device is not None and device.type == "cuda"
    try:
        with torch.random.fork_rng(devices=[device] if cuda else []):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.random.default_generator.manual_seed(seed)  # the CPU generator only
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def rand_augment_transform(spec: str | tuple[int, int], size: int) -> Callable[[Image.Image], Image.Image]:
    """RandAugment on PIL images of ``size`` pixels: a timm policy string (e.g. ``rand-m9-mstd0.5-inc1``) gives
    timm's, taken from ``timm.data.create_transform`` with the official fine-tuning arguments (bicubic, ImageNet
    mean as the fill colour); an ``(operations, magnitude of 30)`` pair gives torchvision's."""
    if isinstance(spec, str):
        from timm.data import create_transform

        stages = create_transform(size, is_training=True, auto_augment=spec, interpolation="bicubic",
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD, separate=True, use_prefetcher=True)
        return stages[1]  # (crop + flip, RandAugment, to-tensor): the plan does the first, normalize() the last
    return transforms.RandAugment(*spec, interpolation=transforms.InterpolationMode.BICUBIC)


def crop_resize_flip(img: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool,
                     rand_augment: Callable[[Image.Image], Image.Image] | None = None,
                     augment_seed: int = 0) -> torch.Tensor:
    """The ``box`` (left, top, width, height) of ``img``, bicubic-resized to ``size``, RandAugment-ed
    (its draws seeded with ``augment_seed``), maybe mirrored: ``(3, size, size)`` uint8."""
    left, top, width, height = box
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
    if rand_augment is not None:
        with seeded_rngs(augment_seed):  # leaves the caller's generators as they were
            out = rand_augment(out)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)


class CroppedImages(Dataset):
    """``dataset[SampleKey]`` -> ``(3, size, size)`` uint8, or ``(image, label)`` with ``labels``."""

    def __init__(self, files: list[Path], sizes: np.ndarray, size: int, labels: list[int] | None = None,
                 rand_augment: str | tuple[int, int] | None = None) -> None:
        self.files, self.sizes, self.size, self.labels = files, sizes, size, labels
        self.rand_augment = None if rand_augment is None else rand_augment_transform(rand_augment, size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: SampleKey) -> torch.Tensor | tuple[torch.Tensor, int]:
        image_id, left, top, width, height, flip, augment_seed = key
        path = self.files[image_id]
        try:
            img = open_rgb(path)
        except Exception as exc:  # PIL raises many types for damaged files
            raise RuntimeError(f"cannot decode image {str(path)!r}, which passed the up-front check "
                               f"(check='decode' finds more damage): {exc}") from exc
        if img.size != tuple(self.sizes[image_id]):
            raise RuntimeError(f"image {str(path)!r} is {img.size[0]}x{img.size[1]} now but was "
                               f"{self.sizes[image_id][0]}x{self.sizes[image_id][1]} when scanned")
        out = crop_resize_flip(img, (left, top, width, height), self.size, flip, self.rand_augment, augment_seed)
        return out if self.labels is None else (out, self.labels[image_id])


class PlannedBatches:
    """Batch sampler: the sample keys of each batch of ``plan``, from ``(epoch, batch)`` on, forever."""

    def __init__(self, plan: EpochPlan, epoch: int, batch: int) -> None:
        self.plan, self.epoch, self.batch = plan, epoch, batch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, batch = self.epoch, self.batch
        while True:
            p = self.plan.batch(epoch, batch)
            yield [(int(i), *map(int, box), bool(flip), int(seed))
                   for i, box, flip, seed in zip(p.image_ids, p.boxes, p.flips, p.augment_seeds)]
            batch += 1
            if batch == len(self.plan):
                epoch, batch = epoch + 1, 0


class TorchBackend:
    """``batches(epoch, batch)``: an endless iterator of normalised ``(N, 3, S, S)`` batches on ``device``
    (``(images, labels (N,) int64)`` with ``labels``)."""

    name = "torch"

    def __init__(self, files: list[Path], sizes: np.ndarray, plan: EpochPlan, img_size: int, device: torch.device,
                 dtype: torch.dtype, num_workers: int, labels: list[int] | None = None,
                 rand_augment: str | tuple[int, int] | None = None) -> None:
        self.dataset = CroppedImages(files, sizes, img_size, labels, rand_augment)
        self.plan, self.device, self.dtype, self.num_workers = plan, device, dtype, num_workers

    def describe(self) -> str:
        return f"PIL decode on {self.num_workers} DataLoader workers" if self.num_workers else "PIL decode in-process"

    def batches(self, epoch: int, batch: int) -> Generator[Batch, None, None]:
        # The DataLoader draws its workers' base seed from its own generator, a function of the start
        # (seed, epoch, batch), not from torch's global one: a resumed run's global stream is unchanged.
        base_seed = int(uniforms(self.plan.seed, epoch, [batch], 1, stream=3)[0, 0] * 2**62)
        loader = DataLoader(self.dataset, batch_sampler=PlannedBatches(self.plan, epoch, batch),
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.num_workers else None,
                            generator=torch.Generator().manual_seed(base_seed))
        for batch in loader:  # (N, 3, S, S) uint8, or that and (N,) labels
            if self.dataset.labels is None:
                yield normalize(batch.to(self.device, non_blocking=True), self.dtype)
            else:
                images, labels = batch
                yield (normalize(images.to(self.device, non_blocking=True), self.dtype),
                       labels.to(self.device, non_blocking=True))
