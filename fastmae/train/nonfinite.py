"""Non-finite loss or gradients: the step is skipped on every rank, counted, and after ``max_nonfinite``
consecutive skipped steps the run stops with ``NonFiniteError`` (exit code ``EXIT_NONFINITE``) without saving,
so its last checkpoint is the last good one.

Each step, every rank writes whether its loss and its gradients are finite into its column of a
``(2, world_size)`` device tensor, and one all-reduce gives every rank every rank's flags: the ranks take the
same decision and none waits for another. The optimiser skips on the device when it can (torch's fused AdamW
takes a ``found_inf`` tensor, as ``GradScaler`` uses); the counters stay on the device and are read at log
intervals and before saves. Other optimisers (apex's FusedAdam, torch's foreach AdamW) have no device-side skip,
so with them (fp16 aside, where ``GradScaler`` decides) each step reads the skip flag on the host:
:func:`skip_syncs_host` says when, and ``fastmae pretrain`` says so in its log line naming the optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastmae.train.distributed import Ranks
from fastmae.train.exit_codes import EXIT_NONFINITE  # noqa: F401  (re-exported)



class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradients."""


class NonFiniteGuard:
    """Counts steps with a non-finite loss or gradients on any rank, on the device.

    :meth:`check` (every step, on every rank) returns the agreed skip flag and updates the ``consecutive`` and
    ``skipped`` counters (int64 device scalars) without syncing the host; :meth:`raise_if_exhausted` (at log
    intervals and before saves) raises ``NonFiniteError`` once ``max_consecutive`` steps in a row were bad.
    """

    def __init__(self, ranks: Ranks, max_consecutive: int) -> None:
        self.ranks = ranks
        self.max_consecutive = max_consecutive
        device = ranks.device
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        # the step at which the streak first reached max_consecutive (0: not yet), and its flags: kept even when
        # good steps follow before the next check, so a streak between two log intervals still stops the run
        self.exhausted_step = torch.zeros((), dtype=torch.int64, device=device)
        self.exhausted_flags = torch.zeros(2, ranks.world_size, device=device)  # rows: loss, gradients

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """Whether step ``step`` must be skipped: a bool scalar on the device, equal on every rank."""
        flags = torch.zeros(2, self.ranks.world_size, device=self.ranks.device)  # (2, W)
        flags[0, self.ranks.rank] = (~torch.isfinite(loss)).float()
        if grad_norm is not None:
            flags[1, self.ranks.rank] = (~torch.isfinite(grad_norm)).float()
        if self.ranks.distributed:
            dist.all_reduce(flags)
        bad = flags.sum() > 0
        self.consecutive = (self.consecutive + 1) * bad
        self.skipped += bad
        exhausted_now = (self.exhausted_step == 0) & (self.consecutive >= self.max_consecutive)
        self.exhausted_step = torch.where(exhausted_now, step, self.exhausted_step)
        self.exhausted_flags = torch.where(exhausted_now, flags, self.exhausted_flags)
        return bad

    def raise_if_exhausted(self) -> None:
        """Raise ``NonFiniteError`` once ``max_consecutive`` steps in a row were skipped since the run (re)started,
        naming the step that completed the streak and the ranks whose loss or gradients were non-finite there
        (syncs the host)."""
        step = int(self.exhausted_step.item())
        if step == 0:
            return
        flags = self.exhausted_flags.cpu()
        where = [f"non-finite {what} on rank{'s' if int(row.gt(0).sum()) > 1 else ''} "
                 + ", ".join(str(r) for r in row.nonzero().flatten().tolist())
                 for what, row in zip(("loss", "gradients"), flags) if row.any()]
        raise NonFiniteError(f"step {step}: {'; '.join(where)}; {self.max_consecutive} consecutive "
                             f"steps skipped (max_nonfinite={self.max_consecutive}); stopping without saving, the "
                             "last checkpoint is the last good state")

    def skipped_total(self) -> int:
        return int(self.skipped.item())


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW: its step reads a ``found_inf`` device tensor (apex's FusedAdam has no such input)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def skip_syncs_host(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Whether :func:`optimizer_step` reads the skip flag on the host every step (a device sync on CUDA)."""
    return not scaler.is_enabled() and not _skips_on_device(optimizer)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: torch.Tensor) -> None:
    """Step unless ``skip``; with fp16 the ``GradScaler`` decides (it skips steps with inf/NaN gradients).

    torch's fused AdamW skips on the device. Any other optimizer (apex's FusedAdam, a foreach AdamW) has no
    device-side skip, so ``skip`` is read with ``.item()``: a host sync per step (see :func:`skip_syncs_host`).
    """
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif _skips_on_device(optimizer):
        optimizer.found_inf = skip.float()  # fused AdamW skips the update on the device
        optimizer.step()
        del optimizer.found_inf
    elif not skip.item():
        optimizer.step()
