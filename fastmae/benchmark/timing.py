"""Timing one ``TrainStep``: ``warmup`` untimed steps, then ``steps`` timed ones; and counting its kernels.

On CUDA the timed span is measured with CUDA events recorded on the current stream before the
first and after the last timed step (so it includes any time the GPU waits for the host: input,
Python overhead, host syncs), and peak memory is ``torch.cuda.max_memory_allocated`` since the
caller last reset it. On a CPU it is wall-clock time and peak memory is not measured.

``count_kernels`` runs one more step under ``torch.profiler`` with only the CUDA activity and counts
the trace's events of category ``kernel`` (CUPTI's kernel records; memcpy/memset records are other
categories). A step replayed from a CUDA graph is counted too: CUPTI records each kernel node of
the graph as a kernel. It is how many kernels one step launches, the number that fusion and CUDA
graphs are about. It runs after the timed steps, and with ``TEARDOWN_CUPTI=1`` (unless set otherwise): Kineto
then detaches CUPTI when the profiler stops, which it otherwise leaves attached, slowing every later kernel
launch of the process (pytorch/pytorch#144455), i.e. the next rows' timings. torch itself keeps CUPTI attached
for CUDA graphs only with CUDA < 12.6, where re-attaching crashed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
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


def kernels_in_trace(trace: dict) -> int:
    """The number of GPU kernel records in a Chrome trace exported by ``torch.profiler`` (``{"traceEvents":
    [{"cat": "kernel", ...}, ...]}``): events of category ``kernel``, not memcpy, memset or CPU events."""
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError(f"a profiler trace is a dict with a traceEvents list, got {type(trace).__name__} "
                         f"with keys {sorted(trace) if isinstance(trace, dict) else None}")
    return sum(1 for event in trace["traceEvents"] if isinstance(event, dict) and event.get("cat") == "kernel")


def count_kernels(step: TrainStep, next_batch: Callable[[], torch.Tensor], device: torch.device) -> int | None:
    """The CUDA kernels one ``step.run`` launches (module docstring); ``None`` off CUDA. Run it after the
    warm-up: the first steps of a compiled or graphed step launch compilation and capture work."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    imgs = next_batch()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step.run(imgs)
        torch.cuda.synchronize(device)
    fd, path = tempfile.mkstemp(prefix="fastmae-kernels-", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return kernels_in_trace(json.load(f))
    finally:
        os.unlink(path)
