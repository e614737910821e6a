"""Fine-tuning and evaluation inputs, with ImageFolder labels, on the DALI or the torch backend.

``root`` is an ImageFolder tree (a file's class: its top-level folder) or a text file listing
image paths (a file's class: the name of the folder holding it); see ``class_labels`` in
fastmae/data/images.py.

- ``finetune_loader``: as the pretraining loader (endless, resumable, sharded, seeded), with the
  fine-tuning augmentation of the MAE recipe: RandomResizedCrop with scale 0.08–1.0, flip, then
  RandAugment (2 operations of magnitude 9 by default: DALI's ``auto_aug.rand_augment`` or
  torchvision's ``RandAugment``), and labels.
- ``eval_loader``: one pass over every image per iteration, in file order, sharded by rank:
  resize of the shorter side to ``img_size / crop_fraction`` and a center crop of ``img_size``
  (224 from 256 by default), and labels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch

from fastmae.data.bad_files import scan_images
from fastmae.data.images import class_labels
from fastmae.data.loader import Backend, PretrainLoader, check_output, make_backend
from fastmae.data.sampling import EpochPlan, EvalPlan


def finetune_loader(
    root: str | os.PathLike,
    batch_size: int,
    img_size: int = 224,
    backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    on_bad_file: str = "error",
    num_workers: int | None = None,
    drop_last: bool = True,
    rand_augment: tuple[int, int] | None = (2, 9),
    scale: tuple[float, float] = (0.08, 1.0),
    max_skip_fraction: float = 0.01,
    check: str = "header",
) -> PretrainLoader:
    """Endless ``(images (N, 3, S, S), labels (N,) int64)`` batches for fine-tuning; ``rand_augment``
    is ``(operations, magnitude)`` or None. The other arguments as ``pretrain_loader``'s."""
    check_output(img_size, dtype)
    if rand_augment is not None and not (rand_augment[0] >= 1 and 0 <= rand_augment[1] <= 30):
        raise ValueError(f"rand_augment must be (operations >= 1, magnitude in [0, 30]), got {rand_augment}")
    scanned = scan_images(root, on_bad_file, max_skip_fraction, check)
    labels, classes = class_labels(scanned.files, root)
    plan = EpochPlan(scanned.sizes, batch_size, seed, rank, world_size, drop_last, scale=scale)
    loader = PretrainLoader(make_backend(backend, scanned, plan, img_size, device, dtype, num_workers, labels,
                                         rand_augment), plan, scanned)
    loader.classes = classes
    return loader


class EvalLoader:
    """Iterating gives one pass of ``(images (N, 3, S, S), labels (N,) int64)`` over this rank's images.

    ``len(loader)``: batches per pass, which can differ between ranks (no padding: see ``EvalPlan``,
    reduce results once after the pass, not per batch). ``classes``: the class names. ``backend``,
    ``files``, ``skipped`` as ``PretrainLoader``'s.
    """

    def __init__(self, impl: Backend, plan: EvalPlan, files: list[Path], skipped: list[Path],
                 classes: list[str]) -> None:
        self._impl, self._plan = impl, plan
        self.backend: str = impl.name
        self.files, self.skipped, self.classes = files, skipped, classes

    def __len__(self) -> int:
        return len(self._plan)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._impl.batches(0, 0)
        try:
            yield from islice(batches, len(self._plan))
        finally:
            batches.close()  # stops the workers or the pipeline


def eval_loader(
    root: str | os.PathLike,
    batch_size: int,
    img_size: int = 224,
    crop_fraction: float = 0.875,
    backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    on_bad_file: str = "error",
    num_workers: int | None = None,
    max_skip_fraction: float = 0.01,
    check: str = "header",
) -> EvalLoader:
    """Evaluation batches with labels: every image once per pass (rank ``r`` takes images ``r,
    r + world_size, ...``), resized and center-cropped (module docstring)."""
    check_output(img_size, dtype)
    scanned = scan_images(root, on_bad_file, max_skip_fraction, check)
    labels, classes = class_labels(scanned.files, root)
    plan = EvalPlan(scanned.sizes, batch_size, rank, world_size, crop_fraction)
    impl = make_backend(backend, scanned, plan, img_size, device, dtype, num_workers, labels)
    return EvalLoader(impl, plan, scanned.files, scanned.skipped, classes)
