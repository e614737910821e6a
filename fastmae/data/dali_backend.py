"""The DALI backend of the pretraining loader: JPEG decode on the GPU (nvJPEG, ``device="mixed"``)
or on the CPU (``device_id=None``), crop, resize, flip and normalise inside a DALI pipeline.

Design: the order, the shards and the augmentation come from ``EpochPlan``, not from DALI's
random operators, so this backend yields the same images with the same crops and flips as the
torch backend, and resumes at any batch exactly. A pipeline reads a fixed ``files=`` list with
``fn.readers.file`` (no shuffling, one shard: the list is already this rank's shard, in plan
order, covering a segment of whole epochs from the resume point on), and an external source
feeds each iteration's crop boxes and flips, computed from the iteration number.
``fn.decoders.image_slice`` decodes only the crop box (ROI decode), ``fn.resize`` (bicubic,
antialiased) scales it to ``img_size``, ``fn.crop_mirror_normalize`` flips, normalises and writes
CHW float32 (float16 for an fp16 loader). A batch on a GPU is copied device to device into a torch
tensor, never via the host.
With ``labels`` the reader also emits each file's label and batches are ``(images, labels)``.

Fine-tuning adds DALI's RandAugment (``nvidia.dali.auto_aug``) after the resize. Its operation
choices come from DALI's generator, seeded per pipeline from ``(seed, epoch, batch)`` of the
segment start: a run is reproducible, but a run resumed mid-segment draws other RandAugment
operations than the uninterrupted one did (the order, crops and flips are still exact).

A last partial batch (``drop_last=False``) is padded with its last sample in the file list and
trimmed from the output. When a segment ends, the next pipeline is built for the following one
(segments hold at least ``SEGMENT_SAMPLES`` samples, so small datasets do not rebuild every epoch).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from fastmae.data.images import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.loader import Batch
from fastmae.data.sampling import EpochPlan, uniforms

SEGMENT_SAMPLES = 50_000  # at least this many samples per pipeline (whole epochs), unless one epoch is larger
TORCH_DTYPE_OF = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


def padded(values: np.ndarray, size: int) -> np.ndarray:
    """``values`` (n, ...) with its last row repeated up to ``size`` rows."""
    return np.concatenate([values, np.repeat(values[-1:], size - len(values), axis=0)])


class DaliBackend:
    """``batches(epoch, batch)``: an endless iterator of normalised ``(N, 3, S, S)`` batches on ``device``
    (``(images, labels (N,) int64)`` with ``labels``)."""

    name = "dali"

    def __init__(self, files: list[Path], plan: EpochPlan, img_size: int, device: torch.device,
                 dtype: torch.dtype, num_threads: int, labels: list[int] | None = None,
                 rand_augment: tuple[int, int] | None = None) -> None:
        self.files, self.plan, self.img_size = files, plan, img_size
        self.labels, self.rand_augment = labels, rand_augment
        self.device, self.dtype, self.num_threads = device, dtype, num_threads
        self.decode = "mixed" if device.type == "cuda" else "cpu"
        self.epochs_per_segment = max(1, math.ceil(SEGMENT_SAMPLES / (len(plan) * plan.batch_size)))

    def describe(self) -> str:
        where = f"nvJPEG on {self.device}" if self.decode == "mixed" else "CPU"
        return f"DALI decode on {where}, {self.num_threads} threads"

    def _segment(self, epoch: int, batch: int) -> list[tuple[int, int]]:
        """The (epoch, batch) pairs of the pipeline that starts at ``(epoch, batch)``."""
        last_epoch = epoch + self.epochs_per_segment - 1
        return [(e, b) for e in range(epoch, last_epoch + 1) for b in range(batch if e == epoch else 0, len(self.plan))]

    def _pipeline(self, segment: list[tuple[int, int]]) -> Pipeline:
        """The pipeline over the batches of ``segment``, each padded to ``batch_size`` samples."""
        size = self.plan.batch_size
        orders = {e: self.plan.epoch_image_ids(e) for e in dict.fromkeys(e for e, _ in segment)}  # once per epoch
        ids = np.concatenate([padded(orders[e][b * size: (b + 1) * size], size) for e, b in segment])
        labels = [0] * len(ids) if self.labels is None else [self.labels[i] for i in ids]

        def crop_and_flip(iteration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Iteration ``iteration``'s crop anchors (B, 2) and shapes (B, 2), (x, y) order, and flips (B,)."""
            if iteration >= len(segment):
                raise StopIteration
            p = self.plan.batch(*segment[iteration])
            boxes = padded(p.boxes, size).astype(np.int32)
            return (np.ascontiguousarray(boxes[:, :2]), np.ascontiguousarray(boxes[:, 2:]),
                    padded(p.flips, size).astype(np.int32))

        seed = int(uniforms(self.plan.seed, segment[0][0], [segment[0][1]], 1, stream=2)[0, 0] * 2**31)
        @pipeline_def(enable_conditionals=self.rand_augment is not None)  # RandAugment branches per sample
        def decode_crop_normalize() -> tuple:
            encoded, label = fn.readers.file(files=[str(self.files[i]) for i in ids], labels=labels,
                                             random_shuffle=False, name="reader")
            anchor, shape, flip = fn.external_source(source=crop_and_flip, num_outputs=3, batch=True,
                                                     dtype=[types.INT32, types.INT32, types.INT32])
            images = fn.decoders.image_slice(encoded, anchor, shape, device=self.decode, output_type=types.RGB,
                                             normalized_anchor=False, normalized_shape=False, axis_names="WH")
            images = fn.resize(images, resize_x=self.img_size, resize_y=self.img_size,
                               interp_type=types.INTERP_CUBIC, antialias=True)
            if self.rand_augment is not None:
                images = dali_rand_augment.rand_augment(images, *self.rand_augment,
                                                        shape=(self.img_size, self.img_size))
            images = fn.crop_mirror_normalize(images, mirror=flip, dtype=TORCH_DTYPE_OF.get(self.dtype, types.FLOAT),
                                              output_layout="CHW", mean=[255 * m for m in IMAGENET_MEAN],
                                              std=[255 * s for s in IMAGENET_STD])
            return images, label

        pipe = decode_crop_normalize(batch_size=size, num_threads=self.num_threads, seed=seed, prefetch_queue_depth=2,
                                     device_id=self.device.index if self.decode == "mixed" else None)
        pipe.build()
        return pipe

    def _to_torch(self, images: object, labels: object, real: int) -> Batch:
        """A DALI batch ``(B, 3, S, S)`` -> its first ``real`` images as a torch tensor on the device,
        with their labels ``(real,)`` when the backend has labels."""
        dense = images.as_tensor()
        dtype = self.dtype if self.dtype in TORCH_DTYPE_OF else torch.float32
        out = torch.empty(dense.shape(), dtype=dtype, device=self.device if self.decode == "mixed" else "cpu")
        stream = torch.cuda.current_stream(self.device) if self.decode == "mixed" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        out = out[:real].to(self.device, self.dtype, non_blocking=True)
        if self.labels is None:
            return out
        label_ids = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1)[:real].astype(np.int64))  # (real,)
        return out, label_ids.to(self.device, non_blocking=True)

    def batches(self, epoch: int, batch: int) -> Generator[Batch, None, None]:
        while True:
            segment = self._segment(epoch, batch)
            pipe = self._pipeline(segment)
            try:
                for e, b in segment:
                    try:
                        images, labels = pipe.run()
                    except RuntimeError as exc:
                        names = [str(self.files[i]) for i in self.plan.batch(e, b).image_ids]
                        raise RuntimeError(f"DALI failed on epoch {e} batch {b} (files {names}): {exc}") from exc
                    yield self._to_torch(images, labels, self.plan.batch_length(b))
            finally:
                del pipe
            epoch, batch = segment[-1][0] + 1, 0
