"""Timing one ``TrainStep``: ``warmup`` untimed steps, then ``steps`` timed ones.

On CUDA the timed span is measured with CUDA events recorded on the current stream before the
first and after the last timed step (so it includes any time the GPU waits for the host: input,
Python overhead, host syncs), and peak memory is ``torch.cuda.max_memory_allocated`` since the
caller last reset it. On a CPU it is wall-clock time and peak memory is not measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastmae.benchmark.train_step import TrainStep


@dataclass(frozen=True)
class Timing:
    batch_size: int
    steps: int
    seconds: float  # the timed steps together
    warmup_seconds: float  # the warmup steps (compilation, autotuning, capture live here)
    peak_mem_bytes: int | None  # None on a CPU
    loss: float  # the last step's loss

    @property
    def img_per_s(self) -> float:
        return self.batch_size * self.steps / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps


def time_train_step(step: TrainStep, next_batch: Callable[[], torch.Tensor], steps: int, warmup: int,
                    device: torch.device) -> Timing:
    """Run ``warmup`` then ``steps`` steps of ``step`` on batches from ``next_batch()``; time the latter.

    Raises ``FloatingPointError`` when the last loss is not finite (a broken step is not a result).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    on_cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)
    warmup_start = time.perf_counter()
    for _ in range(warmup):
        step.run(next_batch())
    sync()
    warmup_seconds = time.perf_counter() - warmup_start
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step.run(next_batch())
        end.record()
        sync()
        seconds = start.elapsed_time(end) / 1e3
        peak = torch.cuda.max_memory_allocated(device)
    else:
        wall_start = time.perf_counter()
        for _ in range(steps):
            loss = step.run(next_batch())
        seconds = time.perf_counter() - wall_start
        peak = None
    loss_value = float(loss)
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"{step.impl} on {step.model_name}: the loss is {loss_value} "
                                 f"after {warmup + steps} steps")
    return Timing(step.batch_size, steps, seconds, warmup_seconds, peak, loss_value)
