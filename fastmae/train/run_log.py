"""What a run reports: a progress bar (img/s, loss, lr, ETA), ``metrics.jsonl`` and TensorBoard events, written
by rank 0 at log intervals. Between them the losses add up on the device: no host sync per step."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastmae.train.checkpoint import write_atomic
from fastmae.train.distributed import Ranks


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep only the complete rows of ``metrics.jsonl`` up to ``step`` (a resumed run logs the later steps again:
    one row per step), rewriting the file atomically."""
    if not path.is_file():
        return
    def logged_by_then(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):  # the half-written last row of a killed run
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_by_then(line)]
    if len(kept) != len(lines):
        write_atomic(path, lambda f: f.write("".join(kept).encode()))


class RunLog:
    def __init__(self, out: Path, ranks: Ranks, start_step: int, total_steps: int, images_per_step: int,
                 progress: bool) -> None:
        self.ranks = ranks
        self.images_per_step = images_per_step
        self.loss_sum = torch.zeros((), device=ranks.device)
        self.good_steps = torch.zeros((), device=ranks.device)
        self.steps = 0
        self.interval_start = time.perf_counter()
        self.run_images, self.run_seconds = 0, 0.0
        self.first_loss = self.final_loss = float("nan")
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and ranks.is_main),
                        unit="step", dynamic_ncols=True)
        self.metrics = self.writer = None
        if ranks.is_main:
            from torch.utils.tensorboard import SummaryWriter

            _drop_rows_after(out / "metrics.jsonl", start_step)  # logged after the checkpoint: they are redone
            self.metrics = open(out / "metrics.jsonl", "a")
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)

    def add_step(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        """``loss``: this rank's mean loss of the step (device scalar); skipped steps add nothing to the mean."""
        self.loss_sum += torch.where(skipped, 0.0, loss.float())
        self.good_steps += (~skipped).float()
        self.steps += 1
        self.bar.update(1)

    def exclude_time(self, seconds: float) -> None:
        """Leave ``seconds`` (spent on something else than training, e.g. scoring held-out images) out of the
        interval's time."""
        self.interval_start += seconds

    def pause_clock(self) -> None:
        """Restart the interval clock (after a checkpoint: saving is not training time)."""
        self.interval_start = time.perf_counter()

    def write(self, step: int, lr: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Sync, average the interval's loss over ranks and good steps, and write the row of ``step``."""
        totals = torch.stack([self.loss_sum, self.good_steps])
        if self.ranks.distributed:
            dist.all_reduce(totals)
        loss_sum, good = totals.tolist()  # the host sync of the interval
        loss = loss_sum / good if good else float("nan")  # good counts steps x ranks
        elapsed = time.perf_counter() - self.interval_start
        img_per_s = self.steps * self.images_per_step / elapsed
        self.run_images += self.steps * self.images_per_step
        self.run_seconds += elapsed
        if math.isnan(self.first_loss):
            self.first_loss = loss
        self.final_loss = loss
        row = {"step": step, "loss": loss, "lr": lr, "img_per_s": img_per_s, **extra}
        if self.metrics is not None:
            finite = {k: v if math.isfinite(v) else None for k, v in row.items()}  # JSON has no NaN: null
            self.metrics.write(json.dumps(finite) + "\n")
            self.metrics.flush()
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}")
        self.loss_sum.zero_()
        self.good_steps.zero_()
        self.steps = 0
        self.pause_clock()
        return row

    @property
    def img_per_s(self) -> float:
        return self.run_images / self.run_seconds if self.run_seconds else 0.0

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            self.writer.close()
