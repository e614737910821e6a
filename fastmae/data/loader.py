"""The pretraining loader: ``pretrain_loader(...)`` -> ``PretrainLoader``, over a DALI or a torch backend.

Augmentation as the official MAE pretraining: RandomResizedCrop to ``img_size`` with scale 0.2–1.0
and ratio 3/4–4/3 (bicubic), horizontal flip with p = 0.5, ImageNet mean/std. Batches arrive on
``device`` in ``dtype``, epoch after epoch, forever.

Both backends take the files of each batch, their crop boxes and flips from one ``EpochPlan``
(fastmae/data/sampling.py): epoch ``e``'s order is a function of ``(seed, e)``, each rank reads a
disjoint shard, and a sample's augmentation is a function of ``(seed, epoch, position)``. So
``state_dict()`` is just the position of the next batch, and after ``load_state_dict`` the next
batches are exactly those that followed (same images, same crops and flips) with either backend:
the backend restarts its reader at that batch, nothing is replayed. The files are checked up front
(fastmae/data/bad_files.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Generator
from pathlib import Path
from typing import Protocol

import torch

from fastmae.data.bad_files import ScannedImages, scan_images
from fastmae.data.sampling import EpochPlan

log = logging.getLogger("fastmae.data")

BACKENDS = ("auto", "dali", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_CHECKS = ("seed", "batch_size", "world_size", "rank", "num_images")  # must match to restore a position
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # images (N, 3, S, S), or those and labels (N,) int64


class Backend(Protocol):
    """What the loaders need of a backend (``DaliBackend``, ``TorchBackend``)."""

    name: str  # "dali" or "torch"

    def describe(self) -> str:
        """One line: how and where the images are decoded."""

    def batches(self, epoch: int, batch: int) -> Generator[Batch, None, None]:
        """The batches of the plan from ``(epoch, batch)`` on, forever; ``close()`` stops the workers."""


def dali_available() -> bool:
    """Whether NVIDIA DALI (``nvidia.dali``) is installed."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def choose_backend(backend: str) -> str:
    """``"auto"`` -> ``"dali"`` when DALI is installed, else ``"torch"``; an explicit name is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise ValueError("backend='dali' (fastmae pretrain --loader dali) but NVIDIA DALI is not installed (pip "
                         "install nvidia-dali-cuda130, or fastmae[dali]); backend='torch' (--loader torch) needs only "
                         "torchvision")
    if backend == "auto":
        return "dali" if dali_available() else "torch"
    return backend


class PretrainLoader:
    """Endless iterator of normalised ``(N, 3, img_size, img_size)`` batches with a resumable position
    (``(images, labels)`` pairs from ``finetune_loader``, which also sets ``classes``).

    ``len(loader)``: batches per epoch on this rank. ``backend``: ``"dali"`` or ``"torch"``.
    ``files``/``num_images``: the good image files / their number. ``skipped``: the bad files left out.
    """

    def __init__(self, impl: Backend, plan: EpochPlan, scanned: ScannedImages) -> None:
        self._impl, self._plan = impl, plan
        self.backend: str = impl.name
        self.files: list[Path] = scanned.files  # the good image files, sorted
        self.num_images = len(scanned.files)
        self.skipped: list[Path] = scanned.skipped
        self.classes: list[str] | None = None  # the class names, set by finetune_loader
        self.epoch, self.batch = 0, 0  # the position of the next batch
        self._batches: Generator[Batch, None, None] | None = None

    def __len__(self) -> int:
        return len(self._plan)

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._batches = self._impl.batches(self.epoch, self.batch)
        images = next(self._batches)
        self.batch += 1
        if self.batch == len(self._plan):
            self.epoch, self.batch = self.epoch + 1, 0
        return images

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch (plain ints, safe for ``torch.load(weights_only=True)``)."""
        plan = self._plan
        return {"epoch": self.epoch, "batch": self.batch, "seed": plan.seed, "batch_size": plan.batch_size,
                "world_size": plan.world_size, "rank": plan.rank, "num_images": self.num_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state``'s position: the next batch is the one that followed when it was taken."""
        current = self.state_dict()
        missing = sorted({"epoch", "batch", *STATE_CHECKS} - set(state))
        if missing:
            raise ValueError(f"loader state lacks {missing}; expected the keys of state_dict(): {sorted(current)}")
        changed = {k: (state[k], current[k]) for k in STATE_CHECKS if state[k] != current[k]}
        if changed:
            raise ValueError("the loader state belongs to another setup: "
                             + ", ".join(f"{k} {saved} (saved) != {now} (now)" for k, (saved, now) in changed.items()))
        if not (isinstance(state["epoch"], int) and state["epoch"] >= 0
                and isinstance(state["batch"], int) and 0 <= state["batch"] < len(self)):
            raise ValueError(f"loader state needs epoch >= 0 and batch in [0, {len(self)}), "
                             f"got epoch {state['epoch']!r}, batch {state['batch']!r}")
        self.close()
        self.epoch, self.batch = state["epoch"], state["batch"]

    def close(self) -> None:
        """Stop the backend (its workers or pipeline); iterating again restarts it at the current position."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def describe(self) -> str:
        """One line: backend, images, skipped files, batches per epoch."""
        return (f"{self.backend} loader ({self._impl.describe()}), {self.num_images} images"
                + (f", {len(self.skipped)} bad files skipped" if self.skipped else "")
                + f", {len(self)} batches of {self._plan.batch_size} per epoch on rank {self._plan.rank}")


def pretrain_loader(
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
    max_skip_fraction: float = 0.01,
    check: str = "header",
) -> PretrainLoader:
    """The MAE pretraining loader over the images of ``root`` (module docstring): a folder (an
    ImageFolder tree or a flat folder) or a text file listing image paths, one a line
    (fastmae/data/images.py, ``list_images``).

    ``backend``: ``"dali"`` (GPU decode with ``device="cuda"``, CPU pipeline otherwise), ``"torch"``
    (PIL on ``DataLoader`` workers) or ``"auto"`` (DALI when installed). ``device``: default cuda when
    available. ``num_workers``: DataLoader workers or DALI threads (default: the cores, at most 16).
    ``on_bad_file``, ``max_skip_fraction``, ``check``: see fastmae/data/bad_files.py.
    """
    check_output(img_size, dtype)
    scanned = scan_images(root, on_bad_file, max_skip_fraction, check)
    plan = EpochPlan(scanned.sizes, batch_size, seed, rank, world_size, drop_last)
    loader = PretrainLoader(make_backend(backend, scanned, plan, img_size, device, dtype, num_workers), plan, scanned)
    log.info("%s", loader.describe())
    return loader


def check_output(img_size: int, dtype: torch.dtype) -> None:
    """ValueError unless ``img_size >= 1`` and ``dtype`` is one the loaders produce."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")


def make_backend(backend: str, scanned: ScannedImages, plan: EpochPlan, img_size: int,
                 device: str | torch.device | None, dtype: torch.dtype, num_workers: int | None,
                 labels: list[int] | None = None, rand_augment: tuple[int, int] | None = None) -> Backend:
    """The DALI or torch backend (``choose_backend``) over the scanned files, following ``plan``."""
    name = choose_backend(backend)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    workers = num_workers if num_workers is not None else max(1, min(16, os.cpu_count() or 1))
    if name == "dali":
        from fastmae.data.dali_backend import DaliBackend

        return DaliBackend(scanned.files, plan, img_size, device, dtype, max(1, workers), labels, rand_augment)
    from fastmae.data.torch_backend import TorchBackend

    return TorchBackend(scanned.files, scanned.sizes, plan, img_size, device, dtype, workers, labels, rand_augment)
