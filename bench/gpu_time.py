"""GPU time of a step, with the CPU's launch cost hidden: the benchmarks' kernel-time yardstick.

pytest-benchmark's wall-clock mean includes Python dispatch and launch latency, which at MAE's
shapes (tens to hundreds of microseconds per op) is as large as the kernels themselves. Here
``calls`` steps are queued behind a ``torch.cuda._sleep`` kernel and timed by CUDA events, so the
GPU only starts them once all are queued: the events measure the kernels back to back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gpu_seconds(step: Callable[[], None], calls: int = 25) -> tuple[float, bool]:
    """``(GPU seconds of one step(), whether the launches were hidden)``: the sleep grows until the GPU
    was still asleep when the last step was queued (``hidden``), up to four tries."""
    cycles = 50_000_000  # ~25 ms at 2 GHz
    for _ in range(4):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        hidden = not start.query()  # the GPU had not reached `start` yet: every step was queued in time
        end.synchronize()
        if hidden:
            break
        cycles *= 4
    return start.elapsed_time(end) / 1e3 / calls, hidden
