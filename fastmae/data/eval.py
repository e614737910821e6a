"""Fine-tuning and evaluation inputs, with ImageFolder labels, on the DALI or the torch backend.

``root`` is an ImageFolder tree (a file's class: its top-level folder) or a text file listing
image paths (a file's class: the name of the folder holding it); see ``class_labels`` in
fastmae/data/images.py.

- ``finetune_loader``: as the pretraining loader (endless, resumable, sharded, seeded), with the
  fine-tuning augmentation of the MAE recipe: RandomResizedCrop with scale 0.08–1.0, flip, then
  RandAugment, and labels; then optionally random erasing (timm's ``RandomErasing`` on the
  normalised batch, on its device, as timm's prefetcher applies it). RandAugment is a timm policy
  string (``rand-m9-mstd0.5-inc1``, the recipe's: timm's RandAugment on the torch backend; on DALI,
  DALI's ``auto_aug.rand_augment`` with the policy's operations and magnitude, mstd/inc ignored) or an
  ``(operations, magnitude of 30)`` pair (torchvision's / DALI's). Erasing is seeded per batch by
  ``(seed, epoch, batch)``, so a restored loader erases as the uninterrupted one did.
- ``eval_loader``: one pass over every image per iteration, in file order, sharded by rank:
  resize of the shorter side to ``img_size / crop_fraction`` and a center crop of ``img_size``
  (224 from 256 by default), and labels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch

from fastmae.data.bad_files import ScannedImages, scan_images
from fastmae.data.images import class_labels
from fastmae.data.loader import Backend, Batch, PretrainLoader, check_output, choose_backend, make_backend
from fastmae.data.sampling import EpochPlan, EvalPlan, uniforms

ERASE_STREAM = 4  # the uniforms() stream of the erasing seeds (0-3: order, augmentation, DALI, DataLoader seeds)
ERASE_MODES = ("const", "rand", "pixel")


def dali_rand_augment(policy: str) -> tuple[int, int]:
    """A timm RandAugment policy (``rand-m9-n2-...``) as DALI's ``(operations, magnitude of 30)``: timm's
    magnitude is out of 10 (default 10), its operations default to 2; other keys (mstd, inc, p) have no DALI
    counterpart (DALI's magnitudes already increase the distortion)."""
    fields = dict(re.findall(r"-(m|n)(\d+)(?=-|$)", policy))
    return int(fields.get("n", 2)), 3 * int(fields.get("m", 10))


class FinetuneLoader(PretrainLoader):
    """``PretrainLoader`` of ``(images, labels)`` batches that random-erases each batch (``erase``: timm's
    ``RandomErasing`` on the batch's device, or None) with the generators seeded from the batch's position."""

    def __init__(self, impl: Backend, plan: EpochPlan, scanned: ScannedImages,
                 erase: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        super().__init__(impl, plan, scanned)
        self.erase = erase

    def __next__(self) -> Batch:
        epoch, batch = self.epoch, self.batch
        images, labels = super().__next__()
        if self.erase is not None:
            from fastmae.data.torch_backend import seeded_rngs

            seed = int(uniforms(self._plan.seed, epoch, [batch], 1, stream=ERASE_STREAM)[0, 0] * 2**62)
            with seeded_rngs(seed, images.device):
                images = self.erase(images)  # (N, 3, S, S), in place
        return images, labels


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
    rand_augment: str | tuple[int, int] | None = (2, 9),
    scale: tuple[float, float] = (0.08, 1.0),
    max_skip_fraction: float = 0.01,
    check: str = "header",
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> FinetuneLoader:
    """Endless ``(images (N, 3, S, S), labels (N,) int64)`` batches for fine-tuning; ``rand_augment``
    is a timm policy string, ``(operations, magnitude)`` or None (module docstring); ``re_prob``,
    ``re_mode``, ``re_count``: timm's ``RandomErasing`` probability, fill mode and maximum count per
    image (``re_prob=0``: none). The other arguments as ``pretrain_loader``'s."""
    check_output(img_size, dtype)
    if isinstance(rand_augment, str):
        rand_augment_policy_check(rand_augment)
        if choose_backend(backend) == "dali":
            rand_augment = dali_rand_augment(rand_augment)
    if isinstance(rand_augment, tuple) and not (rand_augment[0] >= 1 and 0 <= rand_augment[1] <= 30):
        raise ValueError(f"rand_augment must be (operations >= 1, magnitude in [0, 30]), got {rand_augment}")
    if not 0 <= re_prob <= 1 or re_mode not in ERASE_MODES or re_count < 1:
        raise ValueError(f"random erasing needs re_prob in [0, 1], re_mode in {ERASE_MODES} and re_count >= 1, got "
                         f"{re_prob}, {re_mode!r}, {re_count}")
    scanned = scan_images(root, on_bad_file, max_skip_fraction, check)
    labels, classes = class_labels(scanned.files, root)
    plan = EpochPlan(scanned.sizes, batch_size, seed, rank, world_size, drop_last, scale=scale)
    impl = make_backend(backend, scanned, plan, img_size, device, dtype, num_workers, labels, rand_augment)
    erase = None
    if re_prob > 0:
        from timm.data.random_erasing import RandomErasing

        erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=impl.device)
    loader = FinetuneLoader(impl, plan, scanned, erase)
    loader.classes = classes
    return loader


def rand_augment_policy_check(policy: str) -> None:
    """ValueError unless timm parses ``policy`` as a RandAugment policy."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(policy, {})
    except (AssertionError, ValueError, KeyError) as exc:
        raise ValueError(f"rand_augment must be a timm RandAugment policy such as rand-m9-mstd0.5-inc1, got "
                         f"{policy!r}" + (f": {exc}" if str(exc) else "")) from None


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
