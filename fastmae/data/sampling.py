"""What each batch holds: the epoch order, the rank shards and the augmentation parameters.

Both loader backends (torch and DALI) take every decision from here, so they read the same files
in the same order and crop and flip them the same way:

- Epoch ``e`` visits the images in the order of a permutation that is a function of ``(seed, e)``
  only. Rank ``r`` of ``world_size`` reads the positions ``r, r + world_size, r + 2 * world_size,
  ...`` of it, so the ranks' shards are disjoint and together cover the epoch once, except the
  ``num_images % world_size`` images at the end of the permutation, which no rank reads in that
  epoch (each epoch's permutation is new, so which images those are changes from epoch to epoch).
- The crop box and flip of a sample (and the seed of any further augmentation, e.g. RandAugment)
  are a function of ``(seed, epoch, position in the epoch)``, drawn
  from a counter-based hash (splitmix64), so they do not depend on the number of ranks or workers,
  nor on where a run was resumed, and any single batch can be planned without the ones before it.
- The crop is torchvision's ``RandomResizedCrop`` sampling (10 tries of an area fraction in
  ``scale`` and a log-uniform aspect ratio in ``ratio``, then a centered fallback), applied to the
  image size recorded when the files were scanned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centered fallback
DRAWS_PER_SAMPLE = 4 * CROP_TRIES + 2  # (area, ratio, top, left) per try, the flip, a seed for more
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 array ``x`` (wrapping arithmetic), same shape."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream_key(seed: int, epoch: int, stream: int) -> np.ndarray:
    """One uint64 key (shape ``(1,)``) per (seed, epoch, stream): stream 0 orders, stream 1 augments."""
    key = np.array([seed], dtype=np.uint64)
    for value in (epoch, stream):
        key = _splitmix64(key ^ _splitmix64(np.array([value], dtype=np.uint64)))
    return key


def uniforms(seed: int, epoch: int, positions: np.ndarray, count: int, stream: int = 1) -> np.ndarray:
    """``(n, count)`` float64 in [0, 1): draw ``k`` of the sample at epoch position ``positions[i]``."""
    positions = np.asarray(positions, dtype=np.uint64).reshape(-1, 1)  # (n, 1)
    counters = positions * np.uint64(count) + np.arange(count, dtype=np.uint64)  # (n, count)
    bits = _splitmix64(_stream_key(seed, epoch, stream) ^ _splitmix64(counters))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """``(num_images,)`` int64: the image index at each position of epoch ``epoch``."""
    keys = uniforms(seed, epoch, np.arange(num_images), 1, stream=0)[:, 0]  # (num_images,)
    return np.argsort(keys, kind="stable")


def rank_positions(num_images: int, rank: int, world_size: int) -> np.ndarray:
    """``(num_images // world_size,)`` int64: the epoch positions rank ``rank`` reads, in order."""
    per_rank = num_images // world_size
    return np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)


def random_resized_crops(u: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                         scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """``(n, 4)`` int64 boxes ``(left, top, width, height)`` from draws ``u`` ``(n, >= 4 * CROP_TRIES)``.

    torchvision's ``RandomResizedCrop.get_params``, vectorised: the first of ``CROP_TRIES`` tries
    whose box fits the ``widths[i] x heights[i]`` image, else the largest centered box whose aspect
    ratio is clamped into ``ratio``.
    """
    widths = np.asarray(widths, dtype=np.int64).reshape(-1, 1)  # (n, 1)
    heights = np.asarray(heights, dtype=np.int64).reshape(-1, 1)
    tries = u[:, : 4 * CROP_TRIES].reshape(len(u), CROP_TRIES, 4)  # (n, tries, [area, ratio, top, left])
    area = (widths * heights) * (scale[0] + tries[..., 0] * (scale[1] - scale[0]))  # (n, tries)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + tries[..., 1] * (log_hi - log_lo))
    box_w = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint rounds half to even, as round()
    box_h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (box_w > 0) & (box_w <= widths) & (box_h > 0) & (box_h <= heights)  # (n, tries)
    top = np.floor(tries[..., 2] * (heights - box_h + 1)).astype(np.int64)
    left = np.floor(tries[..., 3] * (widths - box_w + 1)).astype(np.int64)
    first = np.argmax(fits, axis=1)  # (n,) the first fitting try (0 when none fits)
    rows = np.arange(len(u))
    boxes = np.stack([left[rows, first], top[rows, first], box_w[rows, first], box_h[rows, first]], axis=1)

    none_fit = ~fits.any(axis=1)
    if none_fit.any():  # centered fallback, aspect ratio clamped into [ratio[0], ratio[1]]
        w, h = widths[none_fit, 0], heights[none_fit, 0]
        in_ratio = w / h
        fb_w = np.where(in_ratio < ratio[0], w, np.where(in_ratio > ratio[1], np.rint(h * ratio[1]), w))
        fb_h = np.where(in_ratio < ratio[0], np.rint(w / ratio[0]), h)
        fb_w, fb_h = fb_w.astype(np.int64), fb_h.astype(np.int64)
        boxes[none_fit] = np.stack([(w - fb_w) // 2, (h - fb_h) // 2, fb_w, fb_h], axis=1)
    return boxes


@dataclass(frozen=True)
class BatchPlan:
    """One batch: ``image_ids (n,)`` indices into the scanned file list, ``boxes (n, 4)`` crop boxes
    ``(left, top, width, height)`` in pixels of the upright image, ``flips (n,)`` bool,
    ``augment_seeds (n,)`` int64 in [0, 2**31) for further random augmentation."""

    image_ids: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray
    augment_seeds: np.ndarray


class EpochPlan:
    """The batches of one rank, epoch after epoch. ``sizes`` is ``(num_images, 2)`` (width, height)."""

    def __init__(self, sizes: np.ndarray, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sizes = np.asarray(sizes, dtype=np.int64)  # (num_images, 2)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.scale, self.ratio = drop_last, scale, ratio
        self.positions = rank_positions(len(self.sizes), rank, world_size)  # (per_rank,)
        full, rest = divmod(len(self.positions), batch_size)
        self.num_batches = full + (1 if rest and not drop_last else 0)
        if self.num_batches == 0:
            raise ValueError(f"{len(self.sizes)} images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks")
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_batches

    def _permutation(self, epoch: int) -> np.ndarray:
        """``epoch``'s permutation of all images; one epoch's is kept: batches are asked in order."""
        if epoch != self._order_epoch:
            self._order = epoch_permutation(len(self.sizes), self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def epoch_image_ids(self, epoch: int) -> np.ndarray:
        """``(num_batches * batch_size or fewer,)``: this rank's image indices for ``epoch``, in order."""
        return self._permutation(epoch)[self.positions[: self.num_batches * self.batch_size]]

    def batch_length(self, index: int) -> int:
        """The number of samples in batch ``index`` of every epoch."""
        return min(self.batch_size, len(self.positions) - index * self.batch_size)

    def batch(self, epoch: int, index: int) -> BatchPlan:
        """The plan of batch ``index`` (0-based, < ``len(self)``) of ``epoch``."""
        if not 0 <= index < self.num_batches:
            raise ValueError(f"batch index must be in [0, {self.num_batches}), got {index}")
        positions = self.positions[index * self.batch_size: (index + 1) * self.batch_size]  # (n,)
        image_ids = self._permutation(epoch)[positions]  # (n,): this batch's slice of epoch_image_ids(epoch)
        u = uniforms(self.seed, epoch, positions, DRAWS_PER_SAMPLE)  # (n, DRAWS_PER_SAMPLE)
        sizes = self.sizes[image_ids]  # (n, 2)
        boxes = random_resized_crops(u, sizes[:, 0], sizes[:, 1], self.scale, self.ratio)
        flips = u[:, 4 * CROP_TRIES] < 0.5
        return BatchPlan(image_ids, boxes, flips, (u[:, 4 * CROP_TRIES + 1] * 2**31).astype(np.int64))


class EvalPlan(EpochPlan):
    """Evaluation: every image once, in file order (rank ``r`` of ``world_size`` takes the positions
    ``r, r + world_size, ...``; the last batch may be short), no flips, and a centered square box of
    ``crop_fraction`` of the shorter side: resized to ``img_size`` that is the usual resize of the
    shorter side to ``img_size / crop_fraction`` followed by a center crop of ``img_size``.

    Nothing is padded, so ranks can hold different numbers of images and of batches (47 images on 3
    ranks of batch 5: 4, 4 and 3 batches). A distributed evaluation must therefore not run a
    collective per batch (the rank with fewer batches would leave the others waiting forever): sum
    the per-rank results (e.g. correct predictions and image counts) over the pass, then reduce once.
    """

    def __init__(self, sizes: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 crop_fraction: float = 0.875) -> None:
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        super().__init__(sizes, batch_size, rank=rank, world_size=world_size, drop_last=False)
        self.positions = np.arange(rank, len(self.sizes), world_size, dtype=np.int64)  # no image left out
        self.num_batches = math.ceil(len(self.positions) / batch_size)
        self.crop_fraction = crop_fraction

    def epoch_image_ids(self, epoch: int) -> np.ndarray:
        return self.positions  # file order, every epoch

    def batch(self, epoch: int, index: int) -> BatchPlan:
        if not 0 <= index < self.num_batches:
            raise ValueError(f"batch index must be in [0, {self.num_batches}), got {index}")
        image_ids = self.positions[index * self.batch_size: (index + 1) * self.batch_size]  # (n,)
        width, height = self.sizes[image_ids].T  # (n,) each
        side = np.maximum(1, np.rint(self.crop_fraction * np.minimum(width, height))).astype(np.int64)
        boxes = np.stack([(width - side) // 2, (height - side) // 2, side, side], axis=1)  # (n, 4)
        zeros = np.zeros(len(image_ids), dtype=np.int64)
        return BatchPlan(image_ids, boxes, zeros.astype(bool), zeros)
