"""``--micro-batch auto``: split each batch into passes that fit the GPU, decided before training from measurements.

Design:

- What is split: the loader still yields batches of ``batch_size`` images and the masks are still drawn for the
  whole batch (``fastmae.train.masks``: counter ``step * accum + m``); the trainer runs each batch as ``passes``
  forward/backward passes of ``micro_batch = batch_size / passes`` images (row slices of the images and of the
  noise) and accumulates their gradients. Every sample removes the same number of patches, so the mean of the
  equal-sized passes' losses is the batch's loss: the run trains on the same images with the same masks and the
  same effective batch and learning rate as without the split; only the rounding of the gradient sums differs.
- How it is decided: on the CUDA device, before ``torch.compile`` and before the optimiser exists, one eager
  forward + backward of synthetic images (no data read, no random numbers drawn, gradients freed after) at a few
  sizes, its peak from ``torch.cuda.max_memory_allocated`` (parameters and gradients included), plus AdamW's two
  fp32 moments per trainable parameter (``ADAMW_STATE_BYTES``), which exist only after the first step. Two small
  probes (``p`` and ``2p`` images) give the peak's line in the pass size; the fewest passes whose predicted peak
  fits are then measured themselves, and taken when the measurement fits too (a probe that runs out of memory
  counts as not fitting). Usable memory: ``HEADROOM`` of what the process can have now (free plus what torch's
  allocator already holds), leaving room for fragmentation, cuBLAS workspaces and NCCL buffers.
- Honest limits: the probes run eagerly, so under ``torch.compile`` (whose fused kernels usually save activation
  memory) the choice errs towards more passes; a CUDA graph's private pool holds about one pass's activations, as
  the eager step's cache does. Not with FSDP (the probe would measure the unsharded model).
- Reproducible: the choice is written to ``config.json`` (``micro_batch_size``); a resumed run keeps it when it
  still fits (it changes only rounding, never the images, masks or learning rate), else decides again and says so.
- Refusal: when even one image per pass does not fit, ``SettingError`` names the measured numbers, before
  anything is written. Without ``--micro-batch auto`` an out-of-memory error in training becomes the same kind
  of message (:func:`out_of_memory_message`), not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from fastmae.train.config import SettingError, saved_run_config
from fastmae.train.distributed import Ranks

HEADROOM = 0.9  # the fraction of the process's available device memory a plan may fill
ADAMW_STATE_BYTES = 8  # per trainable parameter: AdamW's two fp32 moments (fp32 masters with bf16 parameters)
GIB = 1024**3


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """How each batch of ``batch_size`` images is run: ``passes`` passes of ``micro_batch`` images, and the
    numbers behind it (bytes): the measured peak of one pass, the optimiser state to come, the usable memory."""

    batch_size: int
    micro_batch: int
    peak: int  # measured peak of one forward+backward of micro_batch images
    state: int  # AdamW moments, allocated at the first step
    usable: int
    reason: str

    @property
    def passes(self) -> int:
        return self.batch_size // self.micro_batch

    def describe(self) -> str:
        """One line for the run's log."""
        split = (f"{self.passes} passes of {self.micro_batch} images per batch of {self.batch_size}"
                 if self.passes > 1 else f"one pass per batch of {self.batch_size} images")
        return (f"micro-batch {self.micro_batch}: {split} ({self.reason}; measured peak {_gib(self.peak)} + AdamW "
                f"state {_gib(self.state)} of {_gib(self.usable)} usable)")


def adamw_state_bytes(model: nn.Module) -> int:
    """Bytes AdamW's moments of ``model``'s trainable parameters will take (``ADAMW_STATE_BYTES`` each)."""
    return ADAMW_STATE_BYTES * sum(p.numel() for p in model.parameters() if p.requires_grad)


def usable_memory(device: torch.device) -> int | None:
    """``HEADROOM`` of the device memory this process can have now (free plus what torch's caching allocator
    holds), in bytes; ``None`` for a device whose memory torch cannot measure (anything but CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return int(HEADROOM * (free + torch.cuda.memory_reserved(device)))


def measure_pass_peak(model: nn.Module, autocast: torch.autocast, img_size: int, mask_ratio: float,
                      device: torch.device, batch: int) -> int | None:
    """The peak device memory (bytes, ``torch.cuda.max_memory_allocated``) of one forward + backward of ``model``
    on ``batch`` synthetic images ``(batch, 3, img_size, img_size)`` under ``autocast``; ``None`` when it runs out of
    memory. No data is read and no random number drawn (fixed images and masking noise); gradients are freed."""
    patches = model.patch_embed.num_patches
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        imgs = torch.ones(batch, 3, img_size, img_size, device=device)  # (B, 3, S, S)
        noise = torch.arange(patches, device=device, dtype=torch.float32).expand(batch, patches)  # (B, L)
        with autocast:
            loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise)
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def plan_micro_batch(batch_size: int, usable: int, peak_of: Callable[[int], int | None], state: int,
                     keep: int | None = None) -> MemoryPlan:
    """The fewest equal passes (a divisor of ``batch_size``) whose measured peak plus ``state`` fits ``usable``.

    ``peak_of(n)``: the peak bytes of one forward+backward of ``n`` images, or ``None`` when it runs out of memory.
    ``keep``: a micro-batch recorded by the run being resumed, taken when it still fits. ``SettingError`` when
    one image per pass does not fit."""
    for name, value in (("batch_size", batch_size), ("usable", usable), ("state", state)):
        if not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'batch_size' else 0}, got {value!r}")
    measured: dict[int, int | None] = {}

    def peak(n: int) -> int | None:
        if n not in measured:
            measured[n] = peak_of(n)
        return measured[n]

    def fits(n: int) -> bool:
        got = peak(n)
        return got is not None and got + state <= usable

    def plan(n: int, reason: str) -> MemoryPlan:
        return MemoryPlan(batch_size, n, measured[n], state, usable, reason)

    note = ""
    if keep is not None:
        if batch_size % keep == 0 and fits(keep):
            return plan(keep, "kept from the run being resumed")
        note = f"; the resumed run's micro-batch {keep} no longer fits"
    small = max(1, batch_size // 8)  # the two probes: small and 2 * small images
    first, second = peak(small), peak(2 * small)
    if first is None:
        small, first, second = 1, peak(1), peak(2)
    if first is None:
        raise SettingError(f"batch_size {batch_size} cannot be trained on this device: one forward+backward of a "
                           f"single image runs out of memory ({_gib(usable)} usable); choose a smaller model or "
                           "img_size", ("batch_size", "micro_batch"))
    if second is None:  # 2 * small images run out of memory: assume the whole peak grows with the images
        per_image, fixed = first / small, 0.0
    else:
        per_image = max(0.0, (second - first) / small)  # activations per image
        fixed = first - per_image * small  # parameters, gradients, workspaces
    for n in (n for n in range(batch_size, 0, -1) if batch_size % n == 0):  # fewest passes first
        predicted = fixed + per_image * n
        if (n == 1 or predicted + state <= usable) and fits(n):  # one image is measured whatever the line says
            return plan(n, ("the whole batch fits" if n == batch_size else
                            f"the whole batch does not fit: about {_gib(per_image)} per image") + note)
    raise SettingError(f"batch_size {batch_size} cannot fit on this device even as {batch_size} passes of one image: "
                       f"one pass measured {_gib(measured[1]) if measured[1] is not None else 'out of memory'} at its "
                       f"peak, plus {_gib(state)} of AdamW state, over the {_gib(usable)} usable ({HEADROOM:.0%} of "
                       "the free device memory); choose a smaller model or img_size, or free the GPU",
                       ("batch_size", "micro_batch"))


def recorded_micro_batch(output: Path, batch_size: int) -> int | None:
    """The micro-batch the run in ``output`` recorded in its ``config.json`` for the same ``batch_size``, if any."""
    saved = saved_run_config(output) or {}
    micro = saved.get("micro_batch_size")
    return micro if saved.get("batch_size") == batch_size and isinstance(micro, int) and micro >= 1 else None


def agree_micro_batch(plan: MemoryPlan | None, error: SettingError | None, ranks: Ranks) -> MemoryPlan:
    """Every rank's plan made one: the smallest micro-batch of all ranks (DDP needs the same passes everywhere).
    ``plan`` is this rank's (``None`` when it raised ``error``); a rank that could not fit makes every rank raise."""
    mine = plan.micro_batch if plan is not None else 0
    chosen = mine
    if ranks.distributed:
        flag = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ranks.control)
        chosen = int(flag.item())
    if plan is None or chosen == 0:  # this rank or another could not fit
        if error is not None:
            raise error
        raise SettingError("batch_size cannot fit on another rank's device (see its message)",
                           ("batch_size", "micro_batch"))
    if chosen == plan.micro_batch:
        return plan
    return MemoryPlan(plan.batch_size, chosen, plan.peak, plan.state, plan.usable,
                      f"{plan.reason}; {chosen} images to match another rank")


def out_of_memory_message(batch_size: int, passes: int, device: torch.device) -> str:
    """What a run that ran out of device memory says: the pass size, the device's memory, what to do."""
    total = (f" of {_gib(torch.cuda.get_device_properties(device).total_memory)}"
             if device.type == "cuda" and torch.cuda.is_available() else "")
    size = f"{batch_size} images per pass" if passes == 1 else f"{batch_size // passes} images per pass"
    return (f"batch_size {batch_size} ran out of {device} memory{total} ({size}); run with micro_batch auto "
            "(the same batch, masks and learning rate, split into passes that are measured to fit), or a smaller "
            "batch_size with a larger accum")
